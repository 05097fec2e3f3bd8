//! PyTorch's CUDA caching allocator rules (`c10/cuda/CUDACachingAllocator.cpp`), in its two
//! modes, over tessera's [`Driver`] trait: the `native` and `expandable` replay policies.
//!
//! Written from the rules (see `docs/policies.md`, which names the PyTorch function behind each),
//! not from PyTorch's code. It follows PyTorch's *placement* decisions, so that the memory it
//! obtains from the driver over a trace is what PyTorch would obtain; it leaves out what a replay
//! cannot exercise (events and `record_stream`, CUDA graph pools, IPC, statistics, history) and
//! the settings that are off by default (`max_split_size_mb`, `garbage_collection_threshold`,
//! `roundup_power2_divisions`, a memory fraction).
//!
//! # The allocation sequence (`DeviceCachingAllocator::malloc`)
//! 1. Round the request up to a multiple of 512 B (`round_size`); at most 1 MiB goes to the small
//!    pool, anything larger to the large pool (`get_pool`).
//! 2. Best fit in the pool for the stream (`get_free_block`); with expandable segments, a block
//!    that could grow into unmapped space yields to a larger one that cannot.
//! 3. On a miss, new memory (`alloc_block`): a `cuMemAlloc` segment sized by
//!    `get_allocation_size` ([`Rules::Native`], `native.rs`), or pages mapped into the stream's
//!    growing segment ([`Rules::Expandable`], `expandable.rs`).
//! 4. If the driver is out of memory: release every cached block that can be released
//!    (`release_cached_blocks`), retry step 3 once, else fail with [`Error::OutOfMemory`].
//!    (`release_available_cached_blocks` comes first in PyTorch but does nothing without
//!    `max_split_size_mb`.)
//! 5. Split the block when the rest is worth keeping (`should_split`), hand out the front.
//!
//! A free makes the block free at once (a replay's frees are immediate: no events) and merges it
//! with its free neighbours in the same segment (`free_block`, `try_merge_blocks`).
//!
//! # Data structure
//! - `blocks` ([`blocks::Blocks`]): every block by address, with the free index keyed
//!   `(stream, size, addr)` and the unmapped index keyed `(stream, addr)`, per pool.
//! - `segments`: by base address. A native segment is one `cuMemAlloc`; an expandable segment is
//!   one `cuMemAddressReserve` with its page size and the physical handle of each mapped page.
//! - `stuck`: physical memory that a failed driver call kept from going back (a rollback whose
//!   unmap or release failed); retried before every growth and every release, given back on drop.
//! - `allocated` and `reserved` counters.
//!
//! # Invariants (checked by [`PytorchAllocator::check_invariants`])
//! - Segments do not overlap. The blocks of a segment tile it exactly, from its base to its end:
//!   a native segment's whole size, an expandable segment's whole reservation (unmapped blocks
//!   included). No block lies outside a segment. Every block has its segment's stream and pool,
//!   and a size and address that are multiples of 512 B.
//! - No two neighbours in a segment are both free, or both unmapped: they would have been merged.
//! - The free and unmapped indexes hold exactly the free and unmapped blocks.
//! - Native segments have no unmapped blocks. In an expandable segment, unmapped blocks start and
//!   end on page boundaries and no page under them is mapped, and every other page is.
//! - `allocated` is the sum of the sizes of the allocated blocks; `reserved` is the sum of the
//!   native segments' sizes, the expandable segments' mapped pages and the stuck memory; the
//!   driver's bytes in use are `reserved` plus what it held when this allocator was made.
//!
//! They are checked after every mutation when `check` is on (by default in debug builds).
//!
//! # Locking
//! None. The allocator is used through `&mut self` by one replay, which owns its device.

mod blocks;
mod expandable;
mod native;
#[cfg(test)]
mod tests;

use crate::driver::{DevicePtr, Driver, DriverError, PhysHandle, Stream};
use crate::error::{Error, OomReport};
use crate::sync::Arc;
use blocks::{Block, Blocks, Pool, Use};
use std::collections::BTreeMap;

/// `kMinBlockSize`: every size is rounded up to a multiple of it.
const MIN_BLOCK: u64 = 512;
/// `kSmallSize`: the largest request served by the small pool.
const SMALL_SIZE: u64 = 1 << 20;
/// `kSmallBuffer`: native small segments, and expandable small-pool pages.
const SMALL_BUFFER: u64 = 2 << 20;
/// `kMinLargeAlloc`: large requests below it get a `kLargeBuffer` segment.
const MIN_LARGE_ALLOC: u64 = 10 << 20;
/// `kRoundLarge`: larger requests get a segment rounded up to a multiple of it.
const ROUND_LARGE: u64 = 2 << 20;
/// `kLargeBuffer`: native segments for requests of 1–10 MiB, and expandable large-pool pages.
const LARGE_BUFFER: u64 = 20 << 20;
/// PyTorch refuses requests of 1 EiB or more with an out-of-memory error, before any rounding.
const MAX_REQUEST: u64 = 1 << 60;

/// Which of PyTorch's two modes to follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Rules {
    /// `expandable_segments:False` (the default): one `cuMemAlloc` per segment.
    Native,
    /// `expandable_segments:True`: one growing virtual segment per stream and pool.
    Expandable,
}

/// One segment: a `cuMemAlloc` allocation (native) or a virtual reservation (expandable).
#[derive(Debug)]
struct Segment {
    /// Bytes of address space: the `cuMemAlloc` size, or the reservation size.
    size: u64,
    stream: Stream,
    pool: Pool,
    /// Page size of an expandable segment (`kSmallBuffer` or `kLargeBuffer`); 0 for a native one.
    page: u64,
    /// Expandable: the mapped pages, by index from the base, with their physical handles.
    pages: BTreeMap<u64, PhysHandle>,
}

impl Segment {
    /// Bytes of device memory the segment holds.
    fn reserved(&self) -> u64 {
        if self.page == 0 {
            self.size
        } else {
            self.pages.len() as u64 * self.page
        }
    }
}

/// Physical memory that could not be given back: still mapped at `va` when `va` is set.
#[derive(Clone, Copy, Debug)]
struct Stuck {
    va: Option<DevicePtr>,
    handle: PhysHandle,
    size: u64,
}

/// An allocator that follows PyTorch's CUDACachingAllocator rules on one device. See the module
/// documentation.
#[derive(Debug)]
pub(crate) struct PytorchAllocator {
    drv: Arc<dyn Driver>,
    dev: usize,
    rules: Rules,
    blocks: Blocks,
    segments: BTreeMap<DevicePtr, Segment>,
    stuck: Vec<Stuck>,
    allocated: u64,
    reserved: u64,
    /// The driver's bytes in use on the device when this allocator was made.
    baseline: u64,
    /// Total device memory (`cuMemGetInfo`): sizes expandable reservations, fills OOM reports.
    total: u64,
    /// Expandable page sizes, small and large pool: `kSmallBuffer` and `kLargeBuffer`, rounded up
    /// to the driver's granularity should it be coarser.
    small_page: u64,
    large_page: u64,
    /// Check the invariants after every mutation (and panic if one is broken).
    check: bool,
}

/// `round_size` with `roundup_power2_divisions` off: at least 512 B, a multiple of 512 B.
/// `size` is below [`MAX_REQUEST`], so this cannot overflow.
fn round_size(size: u64) -> u64 {
    size.max(1).div_ceil(MIN_BLOCK) * MIN_BLOCK
}

impl PytorchAllocator {
    /// An allocator for device `dev` of `drv`, following `rules`. Fails if the driver cannot
    /// report the device's memory, or (expandable) if the device has no virtual-memory API.
    pub(crate) fn new(drv: Arc<dyn Driver>, dev: usize, rules: Rules) -> Result<Self, Error> {
        let total = drv.mem_info(dev)?.total;
        let (mut small_page, mut large_page) = (SMALL_BUFFER, LARGE_BUFFER);
        if rules == Rules::Expandable {
            if !drv.supports_vmm(dev)? {
                return Err(Error::Unsupported(format!(
                    "device {dev} has no virtual-memory API, which PyTorch's expandable segments need"
                )));
            }
            let g = drv.granularity(dev)?.max(1);
            small_page = SMALL_BUFFER.div_ceil(g) * g;
            large_page = LARGE_BUFFER.div_ceil(g) * g;
        }
        Ok(PytorchAllocator {
            baseline: drv.bytes_in_use(dev),
            drv,
            dev,
            rules,
            blocks: Blocks::default(),
            segments: BTreeMap::new(),
            stuck: Vec::new(),
            allocated: 0,
            reserved: 0,
            total,
            small_page,
            large_page,
            check: cfg!(debug_assertions),
        })
    }

    /// Allocates `size` bytes on `stream`: rounded, placed by the rules. When the driver is out of
    /// memory, releases the cache and retries once (PyTorch's fallback), then fails with
    /// [`Error::OutOfMemory`]. Any other driver failure is [`Error::Driver`]. A size of zero is
    /// [`Error::InvalidSize`]; 1 EiB or more is out of memory at once, as in PyTorch.
    pub(crate) fn allocate(&mut self, size: u64, stream: Stream) -> Result<DevicePtr, Error> {
        if size == 0 {
            return Err(Error::InvalidSize {
                size,
                reason: "a request must be at least one byte",
            });
        }
        if size >= MAX_REQUEST {
            return Err(self.oom(size, None));
        }
        let rounded = round_size(size);
        let pool = if rounded <= SMALL_SIZE {
            Pool::Small
        } else {
            Pool::Large
        };
        let r = self.malloc(size, rounded, pool, stream);
        self.checked();
        r
    }

    fn malloc(
        &mut self,
        size: u64,
        rounded: u64,
        pool: Pool,
        stream: Stream,
    ) -> Result<DevicePtr, Error> {
        let found = match self.get_free_block(pool, stream, rounded) {
            Some(addr) => addr,
            None => {
                let mut refused = None;
                match self.alloc_block(pool, stream, rounded, &mut refused)? {
                    Some(addr) => addr,
                    None => {
                        self.release_cached_blocks()?;
                        match self.alloc_block(pool, stream, rounded, &mut refused)? {
                            Some(addr) => addr,
                            None => return Err(self.oom(size, refused)),
                        }
                    }
                }
            }
        };
        Ok(self.alloc_found_block(found, rounded, size))
    }

    /// `get_free_block`: the smallest free block of the pool and stream holding `size` bytes,
    /// ties by address. With expandable segments, PyTorch measures a block followed by unmapped
    /// space as the size it could grow to, and walks on to a larger block while that one's
    /// measure is smaller: growable tail blocks are kept for requests nothing else fits.
    fn get_free_block(&self, pool: Pool, stream: Stream, size: u64) -> Option<DevicePtr> {
        let mut fits = self.blocks.fits(pool, stream, size);
        let (_, mut best) = fits.next()?;
        if self.rules == Rules::Expandable {
            let mut best_size = self.expandable_size(best);
            for (_, addr) in fits {
                let s = self.expandable_size(addr);
                if s >= best_size {
                    break;
                }
                (best, best_size) = (addr, s);
            }
        }
        Some(best)
    }

    /// `alloc_block`: new memory for a free block of `pool` on `stream` holding `size` bytes.
    /// `Ok(None)` when the driver is out of memory (its error kept in `refused`).
    fn alloc_block(
        &mut self,
        pool: Pool,
        stream: Stream,
        size: u64,
        refused: &mut Option<DriverError>,
    ) -> Result<Option<DevicePtr>, Error> {
        match self.rules {
            Rules::Native => self.native_alloc_block(pool, stream, size, refused),
            Rules::Expandable => self.try_allocate_expandable_block(pool, stream, size, refused),
        }
    }

    /// `should_split`: the small pool, and every pool with expandable segments, split when at
    /// least 512 B would remain; the native large pool only when more than 1 MiB would remain.
    fn should_split(&self, pool: Pool, block_size: u64, size: u64) -> bool {
        let remaining = block_size - size;
        if pool == Pool::Small || self.rules == Rules::Expandable {
            remaining >= MIN_BLOCK
        } else {
            remaining > SMALL_SIZE
        }
    }

    /// `alloc_found_block`: hands out the front of the free block at `addr`, splitting off the
    /// rest when `should_split` says so (the rest stays free, in the same segment and pool).
    fn alloc_found_block(&mut self, addr: DevicePtr, rounded: u64, requested: u64) -> DevicePtr {
        let Some(b) = self.blocks.get(addr) else {
            debug_assert!(false, "found block {addr:#x} is not a block");
            return addr;
        };
        debug_assert!(b.usage == Use::Free && b.size >= rounded);
        let size = if self.should_split(b.pool, b.size, rounded) {
            self.blocks.split(addr, rounded);
            rounded
        } else {
            b.size
        };
        self.blocks.set_use(addr, Use::Allocated { requested });
        self.allocated += size;
        addr
    }

    /// Frees the allocation at `ptr`: the block becomes free and merges with its free neighbours
    /// in the same segment. A pointer that does not start a live allocation is
    /// [`Error::UnknownPointer`] (naming the allocation it points into, if any) or
    /// [`Error::DoubleFree`] (it points into cached memory), and nothing changes.
    pub(crate) fn free(&mut self, ptr: DevicePtr) -> Result<(), Error> {
        match self.blocks.containing(ptr) {
            Some((a, b)) if a == ptr && b.is_allocated() => {
                self.blocks.set_use(a, Use::Free);
                self.allocated -= b.size;
                self.blocks.merge(a);
                self.checked();
                Ok(())
            }
            Some((a, b)) if b.is_allocated() => Err(Error::UnknownPointer {
                ptr,
                device: Some(self.dev),
                interior_of: Some(a),
            }),
            Some(_) => Err(Error::DoubleFree {
                ptr,
                device: self.dev,
            }),
            None => Err(Error::UnknownPointer {
                ptr,
                device: Some(self.dev),
                interior_of: None,
            }),
        }
    }

    /// `emptyCache`: releases every cached block that can be released (`release_cached_blocks`)
    /// and returns the bytes given back to the driver.
    #[cfg_attr(not(test), allow(dead_code))] // the replay does not empty caches; the tests do
    pub(crate) fn empty_cache(&mut self) -> Result<u64, Error> {
        let before = self.reserved;
        let r = self.release_cached_blocks();
        self.checked();
        r?;
        Ok(before.saturating_sub(self.reserved))
    }

    /// `release_cached_blocks`: native, every free block that is a whole segment goes back
    /// (`cuMemFree`); expandable, every whole page inside a free block is unmapped and released,
    /// and a segment left with nothing mapped gives back its reservation. Large pool first.
    fn release_cached_blocks(&mut self) -> Result<(), Error> {
        self.retry_stuck();
        match self.rules {
            Rules::Native => self.native_release(),
            Rules::Expandable => self.expandable_release(),
        }
    }

    /// Every segment and block in PyTorch's snapshot format, as `DeviceCachingAllocator::snapshot`
    /// lists them: a native segment whole, an expandable segment as one segment per mapped run.
    pub(crate) fn segments(&self) -> Vec<crate::torch_snapshot::Segment> {
        use crate::torch_snapshot::{Block as OutBlock, BlockState, Segment as OutSegment};
        let mut out: Vec<OutSegment> = Vec::new();
        for (&base, seg) in &self.segments {
            let mut current: Option<OutSegment> = None;
            for (addr, b) in self.blocks.range(base, base + seg.size) {
                let state = match b.usage {
                    Use::Allocated { requested } => Some((BlockState::Allocated, requested)),
                    Use::Free => Some((BlockState::Inactive, 0)),
                    Use::Unmapped => None,
                };
                match state {
                    None => out.extend(current.take()),
                    Some((state, requested_size)) => {
                        let s = current.get_or_insert_with(|| OutSegment {
                            device: self.dev,
                            address: addr,
                            total_size: 0,
                            stream: b.stream.0,
                            small: b.pool == Pool::Small,
                            expandable: seg.page != 0,
                            // The replay does not model CUDA graphs' private pools.
                            pool: (0, 0),
                            blocks: Vec::new(),
                        });
                        s.total_size += b.size;
                        s.blocks.push(OutBlock {
                            address: addr,
                            size: b.size,
                            requested_size,
                            state,
                            frames: None,
                        });
                    }
                }
            }
            out.extend(current);
        }
        out
    }

    /// Memory obtained from the driver and not returned: segments (native), mapped pages
    /// (expandable), and any memory a failed driver call kept from going back.
    pub(crate) fn reserved_bytes(&self) -> u64 {
        self.reserved
    }

    /// Sizes of the live blocks: the rounded request, or the whole block when the rest was too
    /// small to split (PyTorch's `allocated_bytes`).
    #[cfg_attr(not(test), allow(dead_code))] // the replay does not empty caches; the tests do
    pub(crate) fn allocated_bytes(&self) -> u64 {
        self.allocated
    }

    /// Turns the invariant check after every mutation on or off (on by default in debug builds).
    pub(crate) fn set_check(&mut self, on: bool) {
        self.check = on;
    }

    fn checked(&self) {
        if self.check {
            if let Err(e) = self.check_invariants() {
                panic!(
                    "pytorch allocator invariant broken on device {}: {e}",
                    self.dev
                );
            }
        }
    }

    /// Checks the invariants of the module documentation; the first broken one is the error.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        self.blocks.check_index()?;
        let (mut allocated, mut reserved, mut seen) = (0u64, 0u64, 0usize);
        let mut prev_end = 0;
        for (&base, seg) in &self.segments {
            if base < prev_end {
                return Err(format!("segment {base:#x} overlaps the one before it"));
            }
            prev_end = base + seg.size;
            if (seg.page == 0) != (self.rules == Rules::Native) {
                return Err(format!(
                    "segment {base:#x} is of the wrong kind for {:?}",
                    self.rules
                ));
            }
            let (mut cursor, mut last, mut unmapped) = (base, None, 0u64);
            for (a, b) in self.blocks.range(base, base + seg.size) {
                check_block(base, seg, cursor, last, a, &b)?;
                match b.usage {
                    Use::Allocated { .. } => allocated += b.size,
                    Use::Free => {}
                    Use::Unmapped => unmapped += b.size,
                }
                last = Some(b.usage);
                cursor = a + b.size;
                seen += 1;
            }
            if cursor != base + seg.size {
                return Err(format!(
                    "blocks of segment {base:#x} end at {cursor:#x}, the segment at {:#x}",
                    base + seg.size
                ));
            }
            if let Some(pages) = seg.size.checked_div(seg.page) {
                if seg.pages.keys().next_back().is_some_and(|&i| i >= pages)
                    || seg.pages.len() as u64 * seg.page != seg.size - unmapped
                {
                    return Err(format!(
                        "segment {base:#x} maps {} pages of {} B but its blocks hold {} mapped bytes",
                        seg.pages.len(),
                        seg.page,
                        seg.size - unmapped
                    ));
                }
            }
            reserved += seg.reserved();
        }
        if seen != self.blocks.len() {
            return Err(format!(
                "{} blocks lie outside every segment",
                self.blocks.len() - seen
            ));
        }
        reserved += self.stuck.iter().map(|s| s.size).sum::<u64>();
        if allocated != self.allocated {
            return Err(format!(
                "allocated counter {} but allocated blocks hold {allocated}",
                self.allocated
            ));
        }
        if reserved != self.reserved {
            return Err(format!(
                "reserved counter {} but segments and stuck memory hold {reserved}",
                self.reserved
            ));
        }
        let held = self.drv.bytes_in_use(self.dev);
        if held != self.baseline + self.reserved {
            return Err(format!(
                "the driver holds {held} B, expected {} reserved + {} held before",
                self.reserved, self.baseline
            ));
        }
        Ok(())
    }

    /// Free bytes no release can give back: in native segments that also hold live blocks, and in
    /// expandable pages that also hold live bytes.
    fn stranded_bytes(&self) -> u64 {
        self.blocks
            .free_blocks()
            .map(|(a, b)| match self.segments.get(&b.seg) {
                Some(s) if s.page == 0 => {
                    if a == b.seg && b.size == s.size {
                        0
                    } else {
                        b.size
                    }
                }
                Some(s) => b.size - whole_pages(b.seg, s.page, a, b.size).1,
                None => 0,
            })
            .sum()
    }

    /// The out-of-memory error for a request of `requested` bytes, with the figures as they are now.
    fn oom(&self, requested: u64, refused: Option<DriverError>) -> Error {
        let mut driver_error = refused.map(|e| e.to_string());
        let (device_free, capacity) = match self.drv.mem_info(self.dev) {
            Ok(m) => (Some(m.free), m.total),
            Err(e) => {
                driver_error = Some(match driver_error {
                    Some(d) => format!("{d}; then {e}"),
                    None => e.to_string(),
                });
                (None, self.total)
            }
        };
        Error::OutOfMemory(Box::new(OomReport {
            device: self.dev,
            requested,
            capacity,
            device_free,
            limit: None,
            allocated: self.allocated,
            reserved: self.reserved,
            cached_free: self.reserved.saturating_sub(self.allocated),
            largest_free: self
                .blocks
                .free_blocks()
                .map(|(_, b)| b.size)
                .max()
                .unwrap_or(0),
            stranded: self.stranded_bytes(),
            hooks_freed: 0,
            hooks_called: 0,
            driver_error,
            remapping: self.rules == Rules::Expandable,
            capture_underway: false,
        }))
    }
}

/// One block of a segment, against the tiling rules (see the module documentation).
fn check_block(
    base: DevicePtr,
    seg: &Segment,
    cursor: DevicePtr,
    last: Option<Use>,
    a: DevicePtr,
    b: &Block,
) -> Result<(), String> {
    if a != cursor {
        return Err(format!(
            "segment {base:#x}: block {a:#x} does not start where the one before ends ({cursor:#x})"
        ));
    }
    if b.seg != base || b.stream != seg.stream || b.pool != seg.pool {
        return Err(format!(
            "block {a:#x} names segment {:#x}, stream {:?}, {:?} pool; it lies in {base:#x} ({:?}, {:?})",
            b.seg, b.stream, b.pool, seg.stream, seg.pool
        ));
    }
    if b.size == 0 || !b.size.is_multiple_of(MIN_BLOCK) || !a.is_multiple_of(MIN_BLOCK) {
        return Err(format!(
            "block {a:#x} of {} B: size or address not a positive multiple of 512",
            b.size
        ));
    }
    if !b.is_allocated() && last == Some(b.usage) {
        return Err(format!(
            "block {a:#x} and the one before it are both {:?}: not merged",
            b.usage
        ));
    }
    if b.usage == Use::Unmapped {
        if seg.page == 0 {
            return Err(format!("unmapped block {a:#x} in a cuMemAlloc segment"));
        }
        let (lo, hi) = (a - base, a - base + b.size);
        if !lo.is_multiple_of(seg.page) || !hi.is_multiple_of(seg.page) {
            return Err(format!("unmapped block {a:#x} is not page-aligned"));
        }
        if seg
            .pages
            .range(lo / seg.page..hi / seg.page)
            .next()
            .is_some()
        {
            return Err(format!("a page under unmapped block {a:#x} is mapped"));
        }
    }
    Ok(())
}

/// The whole pages of a segment at `base` (page size `page`) inside `[addr, addr + size)`:
/// (index of the first, bytes).
fn whole_pages(base: DevicePtr, page: u64, addr: DevicePtr, size: u64) -> (u64, u64) {
    let begin = (addr - base).div_ceil(page);
    let end = (addr + size - base) / page;
    (begin, end.saturating_sub(begin) * page)
}

impl Drop for PytorchAllocator {
    /// Gives every segment, page and reservation back to the driver. Errors are ignored: there is
    /// no one left to tell, and a drop must not panic.
    fn drop(&mut self) {
        let (drv, dev) = (Arc::clone(&self.drv), self.dev);
        // Stuck pages first: one still mapped would keep its reservation from being freed.
        for s in std::mem::take(&mut self.stuck) {
            if let Some(va) = s.va {
                let _ = drv.unmap(dev, va, s.size);
            }
            let _ = drv.release_physical(dev, s.handle);
        }
        for (base, seg) in std::mem::take(&mut self.segments) {
            if seg.page == 0 {
                let _ = drv.free_legacy(dev, base);
                continue;
            }
            for (i, h) in seg.pages {
                let _ = drv.unmap(dev, base + i * seg.page, seg.page);
                let _ = drv.release_physical(dev, h);
            }
            let _ = drv.free_reservation(dev, base, seg.size);
        }
        self.blocks = Blocks::default();
        self.allocated = 0;
        self.reserved = 0;
    }
}
