//! [`Rules::Expandable`](super::Rules::Expandable): PyTorch's `expandable_segments:True`, one
//! growing virtual segment per stream and pool (the `ExpandableSegment` class).
//!
//! # Data structure
//! An expandable segment is one `reserve` (`cuMemAddressReserve`) of room for 1 1/8 of the
//! device's memory, rounded up to whole pages, recorded in the allocator's `segments` with its
//! page size (`kSmallBuffer`, 2 MiB, for the small pool; `kLargeBuffer`, 20 MiB, for the large
//! pool) and the handle of each mapped page. A page is one `create_physical` of the page size
//! (`cuMemCreate`), mapped with `map` and made accessible with one `set_access` per mapping call.
//! Its blocks tile the whole reservation: allocated and free blocks over mapped pages, unmapped
//! blocks over the rest. A fresh segment is one unmapped block.
//!
//! # Growth (`try_allocate_expandable_block`)
//! `find_expandable_block` looks, in address order, at the stream's unmapped blocks of the pool;
//! for each it starts at the free block just before it, if there is one, else at the unmapped
//! block itself, and takes the first start from which free and unmapped blocks add up to the
//! request. None: a new segment. Then `map_block` maps just enough pages at the start of each
//! unmapped block on the way (the lowest address first, so holes left by a release are filled
//! before the end grows), and the new pages merge with the free blocks around them.
//!
//! # Release (`release_cached_blocks` → `release_blocks` → `unmap_block`)
//! Every whole page inside a free block is unmapped and its memory released; the free bytes on
//! either side stay free blocks, the unmapped pages become (or join) an unmapped block. A segment
//! left with one unmapped block gives its reservation back (`release_expandable_segment`).
//!
//! # Invariants
//! Those of the parent module. Every page of a segment is mapped exactly when it lies under no
//! unmapped block; unmapped blocks are page-aligned.
//!
//! # Driver failures
//! `create_physical` running out of memory releases the pages already created for that call and
//! reports "no memory" (PyTorch's `ExpandableSegment::map`). Any other failure is
//! [`Error::Driver`], after undoing what the call had done: pages mapped by it are unmapped and
//! released, and nothing changes in the blocks. Memory that such an undo cannot give back is kept
//! in `stuck` (counted as reserved) and retried before every growth and release, and on drop. A
//! failed unmap during a release leaves the pages before it released and the rest mapped, with
//! the blocks carved accordingly.
//!
//! # Locking
//! None (see the parent module).

use super::blocks::{Block, Pool, Use};
use super::{whole_pages, PytorchAllocator, Segment, Stuck};
use crate::driver::{DevicePtr, DriverError, PhysHandle, Stream};
use crate::error::Error;
use std::collections::BTreeMap;

impl PytorchAllocator {
    fn page_size(&self, pool: Pool) -> u64 {
        match pool {
            Pool::Small => self.small_page,
            Pool::Large => self.large_page,
        }
    }

    /// The size a free block could reach by mapping the unmapped block after it, if any (the
    /// measure `get_free_block` compares expandable blocks by).
    pub(super) fn expandable_size(&self, addr: DevicePtr) -> u64 {
        let Some(b) = self.blocks.get(addr) else {
            return 0;
        };
        let next = self
            .blocks
            .next(addr)
            .filter(|(_, n)| n.usage == Use::Unmapped);
        b.size + next.map_or(0, |(_, n)| n.size)
    }

    /// `alloc_block` with expandable segments: a free block of at least `size` bytes, made by
    /// mapping pages into the stream's segment (a new segment if none has room). `Ok(None)` when
    /// the driver is out of memory; pages mapped before that stay mapped, as free memory.
    pub(super) fn try_allocate_expandable_block(
        &mut self,
        pool: Pool,
        stream: Stream,
        size: u64,
        refused: &mut Option<DriverError>,
    ) -> Result<Option<DevicePtr>, Error> {
        self.retry_stuck();
        let Some(mut cand) = self.find_expandable_block(pool, stream, size, refused)? else {
            return Ok(None);
        };
        if let Some(b) = self.blocks.get(cand).filter(|b| b.usage == Use::Unmapped) {
            match self.map_block(cand, b.size.min(size), refused)? {
                Some(a) => cand = a,
                None => return Ok(None),
            }
        }
        loop {
            let Some(b) = self.blocks.get(cand) else {
                return Ok(None);
            };
            if b.size >= size {
                return Ok(Some(cand));
            }
            // Free blocks and unmapped blocks alternate from the candidate on (neighbours of one
            // kind are merged), so the block after a too-small free one is unmapped.
            let Some((next, nb)) = self
                .blocks
                .next(cand)
                .filter(|(_, n)| n.usage == Use::Unmapped)
            else {
                debug_assert!(false, "no unmapped block after candidate {cand:#x}");
                return Ok(None);
            };
            match self.map_block(next, (size - b.size).min(nb.size), refused)? {
                Some(a) => cand = a,
                None => return Ok(None),
            }
        }
    }

    /// `find_expandable_block`: the lowest start, in the stream's segments of `pool`, from which
    /// free and unmapped blocks add up to `size` bytes; else a new segment's unmapped block.
    fn find_expandable_block(
        &mut self,
        pool: Pool,
        stream: Stream,
        size: u64,
        refused: &mut Option<DriverError>,
    ) -> Result<Option<DevicePtr>, Error> {
        let found = self
            .blocks
            .unmapped_of(pool, stream)
            .map(|u| match self.blocks.prev(u) {
                Some((p, pb)) if pb.usage == Use::Free => p,
                _ => u,
            })
            .find(|&c| self.has_available_address_space(c, size));
        if found.is_some() {
            return Ok(found);
        }
        let page = self.page_size(pool);
        let room = (self.total + self.total / 8).div_ceil(page).max(1) * page;
        let base = match self.drv.reserve(self.dev, room, 0) {
            Ok(base) => base,
            Err(e) if e.is_out_of_memory() => {
                *refused = Some(e);
                return Ok(None);
            }
            Err(e) => return Err(Error::Driver(e)),
        };
        self.segments.insert(
            base,
            Segment {
                size: room,
                stream,
                pool,
                page,
                pages: BTreeMap::new(),
            },
        );
        self.blocks.insert(
            base,
            Block {
                size: room,
                usage: Use::Unmapped,
                stream,
                pool,
                seg: base,
            },
        );
        Ok(Some(base))
    }

    /// Whether free and unmapped blocks from `start` on, in its segment, add up to `size` bytes.
    fn has_available_address_space(&self, start: DevicePtr, size: u64) -> bool {
        let Some(seg) = self.blocks.get(start).map(|b| b.seg) else {
            return false;
        };
        let (mut bytes, mut at) = (0u64, start);
        while bytes < size {
            match self.blocks.get(at) {
                Some(b) if b.seg == seg && !b.is_allocated() => {
                    bytes += b.size;
                    at += b.size;
                }
                _ => break,
            }
        }
        bytes >= size
    }

    /// `map_block`: maps the pages covering the first `size` bytes of the unmapped block at
    /// `addr` (whole pages: possibly more than `size`), which become a free block merged with its
    /// free neighbours; the rest of the unmapped block stays unmapped. Returns the merged free
    /// block's address, or `Ok(None)` when `create_physical` is out of memory (nothing changed).
    fn map_block(
        &mut self,
        addr: DevicePtr,
        size: u64,
        refused: &mut Option<DriverError>,
    ) -> Result<Option<DevicePtr>, Error> {
        let Some(b) = self.blocks.get(addr).filter(|b| b.usage == Use::Unmapped) else {
            debug_assert!(false, "map_block of {addr:#x}, not an unmapped block");
            return Ok(None);
        };
        let (base, page) = (b.seg, self.page_size(b.pool));
        let begin = (addr - base) / page;
        let end = (addr + size - base).div_ceil(page);
        debug_assert!(base + begin * page == addr && (end - begin) * page <= b.size);
        // ExpandableSegment::map: every handle first, then the mappings, then access.
        let mut handles = Vec::with_capacity((end - begin) as usize);
        for _ in begin..end {
            match self.drv.create_physical(self.dev, page) {
                Ok(h) => handles.push(h),
                Err(e) => {
                    for &h in &handles {
                        self.discard(None, h, page);
                    }
                    if e.is_out_of_memory() {
                        *refused = Some(e);
                        return Ok(None);
                    }
                    return Err(Error::Driver(e));
                }
            }
        }
        for (k, &h) in handles.iter().enumerate() {
            if let Err(e) = self.drv.map(self.dev, addr + k as u64 * page, page, h) {
                self.undo_mapping(addr, page, &handles, k);
                return Err(Error::Driver(e));
            }
        }
        let len = (end - begin) * page;
        if let Err(e) = self.drv.set_access(self.dev, addr, len) {
            self.undo_mapping(addr, page, &handles, handles.len());
            return Err(Error::Driver(e));
        }
        if let Some(seg) = self.segments.get_mut(&base) {
            for (k, &h) in handles.iter().enumerate() {
                seg.pages.insert(begin + k as u64, h);
            }
        }
        self.reserved += len;
        if len < b.size {
            self.blocks.split(addr, len);
        }
        self.blocks.set_use(addr, Use::Free);
        Ok(Some(self.blocks.merge(addr)))
    }

    /// Undoes a failed `map_block`: unmaps the first `mapped` handles (mapped from `addr` on) and
    /// releases them all.
    fn undo_mapping(&mut self, addr: DevicePtr, page: u64, handles: &[PhysHandle], mapped: usize) {
        for (k, &h) in handles.iter().enumerate() {
            let va = (k < mapped).then_some(addr + k as u64 * page);
            self.discard(va, h, page);
        }
    }

    /// Gives back physical memory not counted in `reserved`: unmaps it from `va` (if mapped) and
    /// releases it. What cannot be given back is kept in `stuck` and counted in `reserved`.
    fn discard(&mut self, va: Option<DevicePtr>, handle: PhysHandle, size: u64) {
        if let Some(at) = va {
            if self.drv.unmap(self.dev, at, size).is_err() {
                self.stuck.push(Stuck { va, handle, size });
                self.reserved += size;
                return;
            }
        }
        if self.drv.release_physical(self.dev, handle).is_err() {
            self.stuck.push(Stuck {
                va: None,
                handle,
                size,
            });
            self.reserved += size;
        }
    }

    /// Tries again to give back the stuck memory.
    pub(super) fn retry_stuck(&mut self) {
        for s in std::mem::take(&mut self.stuck) {
            self.reserved -= s.size;
            self.discard(s.va, s.handle, s.size);
        }
    }

    /// `release_cached_blocks` with expandable segments: `unmap_block` on every free block of
    /// each pool (large first, all streams), then `release_expandable_segment` on a segment left
    /// with nothing mapped. A driver failure stops the release, leaving the state consistent.
    pub(super) fn expandable_release(&mut self) -> Result<(), Error> {
        for pool in Pool::RELEASE_ORDER {
            for addr in self.blocks.free_list(pool) {
                if let Some(u) = self.unmap_block(addr)? {
                    self.release_expandable_segment(u)?;
                }
            }
        }
        Ok(())
    }

    /// `unmap_block`: unmaps and releases the whole pages inside the free block at `addr` (the
    /// stream is synchronized first, as `unmapHandles` does). The free bytes before and after
    /// stay free blocks; the unmapped pages become an unmapped block, merged with unmapped
    /// neighbours, whose address is returned (`None`: no whole page, nothing done).
    fn unmap_block(&mut self, addr: DevicePtr) -> Result<Option<DevicePtr>, Error> {
        let Some(b) = self.blocks.get(addr).filter(|b| b.usage == Use::Free) else {
            return Ok(None);
        };
        let (base, page) = (b.seg, self.page_size(b.pool));
        let (begin, bytes) = whole_pages(base, page, addr, b.size);
        if bytes == 0 {
            return Ok(None);
        }
        self.drv.stream_synchronize(self.dev, b.stream)?;
        let (mut done, mut failed) = (0u64, None);
        for i in begin..begin + bytes / page {
            if let Err(e) = self.drv.unmap(self.dev, base + i * page, page) {
                failed = Some(e);
                break;
            }
            let handle = self
                .segments
                .get_mut(&base)
                .and_then(|s| s.pages.remove(&i));
            self.reserved -= page;
            if let Some(h) = handle {
                self.discard(None, h, page);
            }
            done += 1;
        }
        let mut unmapped = None;
        if done > 0 {
            let (from, to, end) = (
                base + begin * page,
                base + (begin + done) * page,
                addr + b.size,
            );
            self.blocks.remove(addr);
            for (at, len, usage) in [
                (addr, from - addr, Use::Free),
                (from, to - from, Use::Unmapped),
                (to, end - to, Use::Free),
            ] {
                if len > 0 {
                    self.blocks.insert(
                        at,
                        Block {
                            size: len,
                            usage,
                            ..b
                        },
                    );
                }
            }
            unmapped = Some(self.blocks.merge(from));
        }
        match failed {
            Some(e) => Err(Error::Driver(e)),
            None => Ok(unmapped),
        }
    }

    /// `release_expandable_segment`: when the unmapped block at `addr` is its whole segment,
    /// frees the reservation and forgets the segment.
    fn release_expandable_segment(&mut self, addr: DevicePtr) -> Result<(), Error> {
        let Some(b) = self.blocks.get(addr) else {
            return Ok(());
        };
        let whole = b.usage == Use::Unmapped
            && addr == b.seg
            && self.segments.get(&addr).is_some_and(|s| s.size == b.size);
        if whole {
            self.drv.free_reservation(self.dev, addr, b.size)?;
            self.blocks.remove(addr);
            self.segments.remove(&addr);
        }
        Ok(())
    }
}
