//! The slow path: finding memory when the stream's cache has none, and giving memory back.
//!
//! Order, for a request that missed the cache (the design notes explain why):
//! 1. parked frees whose recorded streams are done join the pools;
//! 2. a free block (or empty small granule) of another stream whose work on it is done;
//! 3. new memory: pages from the page pool, then new pages while under the limit, then fully free
//!    pages unmapped from free blocks and empty granules anywhere (their work done). Pages are
//!    mapped at the end of a free block followed by unmapped space when one exists, else at fresh
//!    holes. The legacy backend asks `cuMemAlloc` for a new segment instead.
//!
//! Memory moves between streams only inside one pool (`Owner`): the ordinary cache, or a private
//! pool of CUDA graphs. Only ordinary memory is ever unmapped, stolen or released; a private
//! pool's pages stay where they are until it has no use left (`graphs.rs`).
//!
//! While a capture may be underway (`capturing()`), nothing here records, queries or waits for an
//! event, unmaps or frees: only the page pool and new memory serve a miss, and the driver calls
//! that allocate (`cuMemAddressReserve`, `cuMemCreate`, `cuMemMap`, `cuMemSetAccess`,
//! `cuMemAlloc`) run in relaxed capture mode, as PyTorch runs `cudaMalloc` during a capture.
//!
//! Nothing here waits on the GPU unless told to (`wait`); nothing here drops the device lock.
//! Every driver failure leaves the state consistent: pages obtained but not placed go back to the
//! pool, and a block is carved only around pages whose unmap succeeded.

use super::DeviceState;
use crate::config::{Backend, Placement};
use crate::driver::{CaptureMode, DevicePtr, DriverError, Stream};
use crate::error::Error;
use crate::pages::{PageId, RangeKind};
use crate::pool::large::BlockState;
use crate::pool::lifetimes::Stamp;
use crate::pool::{Owner, ORDINARY};
use crate::sync::Arc;
use std::collections::HashMap;

/// Why the slow path gave up.
#[derive(Debug)]
pub(crate) enum Shortfall {
    /// Not enough memory; the driver's out-of-memory error, if it was the driver that refused.
    NoMemory(Option<DriverError>),
    /// Any other failure: passed to the caller as it is.
    Fatal(Error),
}

impl From<DriverError> for Shortfall {
    fn from(e: DriverError) -> Self {
        if e.is_out_of_memory() {
            Shortfall::NoMemory(Some(e))
        } else {
            Shortfall::Fatal(Error::Driver(e))
        }
    }
}

type Slow<T> = std::result::Result<T, Shortfall>;

impl DeviceState {
    /// Serves a request that missed the cache, without the OOM sequence. With `wait`, waits for
    /// streams whose work holds memory back.
    pub(crate) fn allocate_slow(
        &mut self,
        rounded: u64,
        requested: u64,
        owner: Owner,
        wait: bool,
    ) -> Slow<DevicePtr> {
        // Released graph pools join the ordinary cache once the device is idle (a failed
        // synchronize keeps them private; counted).
        if let Err(e) = self.drain_released_pools() {
            self.c.note_driver_error(&e);
        }
        // Parked frees join the pools when their streams are done. A fence that cannot be had
        // here (a stream destroyed after `record_stream`, say) must not fail a request that may
        // not need that memory: the free stays parked, and the error is counted in the stats.
        if wait {
            self.wait_for_streams()?;
        } else if let Err(e) = self.settle_pending(false) {
            self.c.note_driver_error(&e);
        }
        if let Some(p) = self.try_cached(rounded, requested, owner) {
            return Ok(p);
        }
        if rounded <= self.small_max {
            self.small_slow(rounded, requested, owner)
        } else {
            self.large_slow(rounded, requested, owner)
        }
    }

    /// Runs driver calls that allocate: in relaxed capture mode while a capture may be underway
    /// (so that they neither fail nor invalidate it), as they are otherwise.
    fn allocating<T>(&mut self, f: impl FnOnce(&mut Self) -> Slow<T>) -> Slow<T> {
        if !self.capturing() {
            return f(self);
        }
        let drv = Arc::clone(&self.drv);
        let old = drv.exchange_capture_mode(CaptureMode::Relaxed)?;
        let r = f(self);
        if let Err(e) = drv.exchange_capture_mode(old) {
            // The thread stays relaxed: nothing tessera does is wrong for that, but say so.
            self.c.note_driver_error(&e);
        }
        r
    }

    fn small_slow(&mut self, rounded: u64, requested: u64, owner: Owner) -> Slow<DevicePtr> {
        let class = self.small.classes.class_of(rounded);
        if !self.small.grow(owner, class) {
            self.adopt_empty_granule(owner)?;
            if !self.small.grow(owner, class) {
                self.new_granule(owner)?;
                let grown = self.small.grow(owner, class);
                debug_assert!(grown, "a fresh granule holds a run of every class");
            }
        }
        let ptr = self
            .small
            .alloc(owner, class, requested)
            .expect("a fresh run has a free slot");
        self.c
            .note_alloc(self.small.classes.sizes[class], requested);
        Ok(ptr)
    }

    /// Gives `owner` an empty granule of another stream of its pool whose work on it is done, if
    /// any.
    fn adopt_empty_granule(&mut self, owner: Owner) -> Slow<()> {
        self.small.reclaim_idle_runs(None);
        let candidates: Vec<(DevicePtr, Stream, u64)> = self
            .small
            .empty_granules()
            .filter(|g| g.owner.pool == owner.pool && g.owner != owner)
            .map(|g| (g.base, g.owner.stream, g.free_seq))
            .collect();
        for (base, s, seq) in candidates {
            if self.settle_fence(s, seq)? {
                self.small.retag_granule(base, owner);
                return Ok(());
            }
        }
        Ok(())
    }

    /// Whether the work of `stream` up to free `seq` is done; records and queries a fence if
    /// needed. A fence that cannot be had means "not known to be done" (the error is counted).
    /// During a capture only what is already known counts.
    fn settle_fence(&mut self, stream: Stream, seq: u64) -> Slow<bool> {
        if self.fences.is_settled(stream, seq) {
            return Ok(true);
        }
        if self.capturing() {
            return Ok(false);
        }
        let drv = Arc::clone(&self.drv);
        if let Err(e) = self.fences.request(&*drv, self.dev, stream, seq) {
            self.c.note_driver_error(&e);
        }
        if let Err(e) = self.fences.poll(&*drv, self.dev) {
            self.c.note_driver_error(&e);
        }
        Ok(self.fences.is_settled(stream, seq))
    }

    /// Waits for every stream holding freed memory back (free blocks, empty granules, parked
    /// frees), then moves the parked frees into the pools. Nothing during a capture.
    pub(crate) fn wait_for_streams(&mut self) -> std::result::Result<(), DriverError> {
        if self.capturing() {
            return Ok(());
        }
        self.request_all_fences();
        // Requests the parked frees' fences too, and waits for every outstanding one.
        self.settle_pending(true)
    }

    /// Records fences on every stream with freed memory not yet known to be done, and polls them.
    /// Best effort, per stream: one stream whose event cannot be recorded or queried (destroyed
    /// after use, say) keeps its own memory back, not everyone's; the error is counted.
    pub(crate) fn refresh_fences(&mut self) {
        if self.capturing() {
            return;
        }
        self.request_all_fences();
        if let Err(e) = self.fences.poll(&*Arc::clone(&self.drv), self.dev) {
            self.c.note_driver_error(&e);
        }
    }

    /// Records a fence on every stream that has freed memory not yet known to be done (best
    /// effort, per stream; errors counted). Nothing during a capture.
    pub(crate) fn request_all_fences(&mut self) {
        if self.capturing() {
            return;
        }
        let drv = Arc::clone(&self.drv);
        // One fence per stream, covering its latest free.
        let mut need: HashMap<Stream, u64> = HashMap::new();
        let blocks = self
            .large
            .free_blocks()
            .map(|(_, b)| (b.owner.stream, b.free_seq));
        let granules = self.small.granules().map(|g| (g.owner.stream, g.free_seq));
        for (s, seq) in blocks.chain(granules) {
            let e = need.entry(s).or_default();
            *e = (*e).max(seq);
        }
        for (s, seq) in need {
            if !self.fences.is_settled(s, seq) {
                if let Err(e) = self.fences.request(&*drv, self.dev, s, seq) {
                    self.c.note_driver_error(&e);
                }
            }
        }
    }

    /// A new granule for the small pool of `owner`.
    fn new_granule(&mut self, owner: Owner) -> Slow<()> {
        let ps = self.page_size;
        if self.backend == Backend::Legacy {
            let base = self.new_legacy_segment(ps)?;
            self.small.add_granule(base, None, owner);
            return Ok(());
        }
        let va = self.find_holes(RangeKind::Small, 1)?;
        let pages = self.obtain_pages(1, None)?;
        self.map_pages(va, &pages)?;
        self.small.add_granule(va, Some(pages[0]), owner);
        Ok(())
    }

    fn large_slow(&mut self, rounded: u64, requested: u64, owner: Owner) -> Slow<DevicePtr> {
        // A free block of another stream of the pool, once that stream's work on it is done.
        for addr in self.large.other_stream_fits(owner, rounded) {
            let b = self.large.get(addr).expect("listed block");
            if self.settle_fence(b.owner.stream, b.free_seq)? {
                let at = self.large.retag(addr, owner);
                return Ok(self.hand_out(at, rounded, requested, owner));
            }
        }
        let at = if self.backend == Backend::Legacy {
            let seg = rounded.div_ceil(self.page_size) * self.page_size;
            let base = self.new_legacy_segment(seg)?;
            self.large.insert_free(base, seg, owner, 0, base)
        } else {
            self.grow_large(rounded, owner)?
        };
        Ok(self.hand_out(at, rounded, requested, owner))
    }

    /// Hands out the start of the free block at `at` (new memory, or another stream's block: no
    /// live neighbour to choose by), stamped when placement learns lifetimes.
    fn hand_out(&mut self, at: DevicePtr, rounded: u64, requested: u64, owner: Owner) -> DevicePtr {
        let stamp = match self.placement {
            Placement::Lifetime => self.lifetimes.predict(rounded),
            Placement::BestFit => Stamp::default(),
        };
        self.place_large(at, 0, rounded, requested, owner, stamp)
    }

    /// Maps new pages so that a free block of `owner` holds `size` bytes; returns its address.
    fn grow_large(&mut self, size: u64, owner: Owner) -> Slow<DevicePtr> {
        let ps = self.page_size;
        // Prefer extending a free block (ours, or another stream's of our pool whose work is done)
        // that ends where unmapped space begins: fewer pages, and it reuses the block's bytes.
        let mut best: Option<(DevicePtr, u64)> = None;
        for (a, b) in self.large.free_blocks() {
            let end = a + b.size;
            if end % ps != 0 || b.size >= size || best.is_some_and(|(_, s)| s >= b.size) {
                continue;
            }
            if b.owner.pool != owner.pool
                || (b.owner != owner && !self.fences.is_settled(b.owner.stream, b.free_seq))
            {
                continue;
            }
            let need = (size - b.size).div_ceil(ps) as usize;
            if self.pages.holes_at(end, RangeKind::Large, need) == need {
                best = Some((a, b.size));
            }
        }
        let (va, count) = match best {
            Some((a, s)) => (a + s, (size - s).div_ceil(ps) as usize),
            None => {
                let count = size.div_ceil(ps) as usize;
                (self.find_holes(RangeKind::Large, count)?, count)
            }
        };
        let pages = self.obtain_pages(count, best.map(|_| va))?;
        self.map_pages(va, &pages)?;
        if let Some((a, _)) = best {
            // Gathering pages neither merged nor carved the block being extended (`keep_end`), so
            // it is still there, free, and ours or another stream's whose work on it is done.
            debug_assert_eq!(self.large.free_block_ending_at(va), Some(a));
            if self.large.get(a).is_some_and(|b| b.owner != owner) {
                self.large.retag(a, owner);
            }
        }
        let at = self.large.insert_free(va, count as u64 * ps, owner, 0, 0);
        if self.large.get(at).is_none_or(|b| b.size < size) {
            // Cannot happen (see above); if it did, the new pages stay cached as a free block.
            debug_assert!(false, "extended block at {at:#x} is smaller than {size}");
            return Err(Shortfall::NoMemory(None));
        }
        Ok(at)
    }

    /// `count` consecutive holes in a range of `kind`, reserving (and registering) a new range if
    /// needed.
    fn find_holes(&mut self, kind: RangeKind, count: usize) -> Slow<DevicePtr> {
        let before = self.pages.ranges.len();
        let drv = Arc::clone(&self.drv);
        let va = self.allocating(|st| Ok(st.pages.find_holes(&*drv, st.dev, kind, count)?))?;
        if self.pages.ranges.len() != before {
            let r = self.pages.range_of(va).expect("new range");
            let range = &self.pages.ranges[r];
            self.address_map
                .insert(range.base, range.size(self.page_size), self.dev);
        }
        Ok(va)
    }

    fn map_pages(&mut self, va: DevicePtr, pages: &[PageId]) -> Slow<()> {
        // On error `map_run` has put the pages back (in the pool, or quarantined).
        let drv = Arc::clone(&self.drv);
        let remaps = self.allocating(|st| Ok(st.pages.map_run(&*drv, st.dev, va, pages)?))?;
        self.c.remaps += remaps;
        Ok(())
    }

    /// `count` unmapped pages: from the pool, then new ones under the limit, then stolen (never from
    /// the free block ending at `keep_end`). All or nothing: on failure every page obtained is back
    /// in the pool.
    fn obtain_pages(&mut self, count: usize, keep_end: Option<DevicePtr>) -> Slow<Vec<PageId>> {
        let mut got: Vec<PageId> = Vec::with_capacity(count);
        while got.len() < count {
            match self.pages.pool.pop() {
                Some(p) => got.push(p),
                None => break,
            }
        }
        let mut refused = None;
        let drv = Arc::clone(&self.drv);
        while got.len() < count && self.reserved() + self.page_size <= self.limit_bytes() {
            match self.allocating(|st| Ok(st.pages.create_page(&*drv, st.dev)?)) {
                Ok(p) => {
                    got.push(p);
                    self.c.note_reserved(self.reserved());
                }
                Err(Shortfall::NoMemory(e)) => {
                    refused = e;
                    break;
                }
                Err(e) => {
                    self.pages.pool.extend(got);
                    return Err(e);
                }
            }
        }
        if got.len() < count {
            if let Err(e) = self.unmap_free_pages(Some(count - got.len()), keep_end, &mut got) {
                self.pages.pool.extend(got);
                return Err(Shortfall::Fatal(e.into()));
            }
        }
        if got.len() < count {
            self.pages.pool.extend(got);
            return Err(Shortfall::NoMemory(refused));
        }
        Ok(got)
    }

    /// Unmaps fully free pages whose work is done (from empty small granules, then from free large
    /// blocks, smallest first, never from the block ending at `keep_end`: the one being extended,
    /// found by its end because merges may move its start), at most `max`, into `out`.
    /// Non-blocking. Only ordinary memory: a private pool's pages stay put while it has uses.
    /// Nothing during a capture (an unmap would invalidate it).
    pub(crate) fn unmap_free_pages(
        &mut self,
        max: Option<usize>,
        keep_end: Option<DevicePtr>,
        out: &mut Vec<PageId>,
    ) -> std::result::Result<(), DriverError> {
        let drv = Arc::clone(&self.drv);
        let (dev, ps) = (self.dev, self.page_size);
        // `max` counts pages added here; `out` may already hold some.
        let target = max.map(|m| out.len() + m);
        let want = |out: &Vec<PageId>| target.is_none_or(|t| out.len() < t);
        if self.capturing() {
            return Ok(());
        }
        self.small.reclaim_idle_runs(None);
        // Learn which streams are done with their freed memory (records and queries; no waiting).
        self.refresh_fences();
        self.merge_settled_neighbours(keep_end);
        let granules: Vec<(DevicePtr, Stream, u64)> = self
            .small
            .empty_granules()
            .filter(|g| g.page.is_some() && g.owner.pool == ORDINARY)
            .map(|g| (g.base, g.owner.stream, g.free_seq))
            .collect();
        for (base, s, seq) in granules {
            if !want(out) {
                return Ok(());
            }
            if self.fences.is_settled(s, seq) {
                let id = self.pages.unmap_page(&*drv, dev, base)?;
                self.small.remove_granule(base);
                out.push(id);
            }
        }
        let mut blocks: Vec<(u64, DevicePtr)> = self
            .large
            .free_blocks()
            .filter(|&(a, b)| {
                b.owner.pool == ORDINARY
                    && Some(a + b.size) != keep_end
                    && self.fences.is_settled(b.owner.stream, b.free_seq)
            })
            .filter(|&(a, b)| (a + b.size) / ps * ps > a.div_ceil(ps) * ps)
            .map(|(a, b)| (b.size, a))
            .collect();
        blocks.sort_unstable();
        for (size, addr) in blocks {
            if !want(out) {
                break;
            }
            let (from, to) = (addr.div_ceil(ps) * ps, (addr + size) / ps * ps);
            // Take pages from the block's end, so what remains of it stays in one piece.
            let mut cut = to;
            let mut result = Ok(());
            while cut > from && want(out) {
                match self.pages.unmap_page(&*drv, dev, cut - ps) {
                    Ok(id) => {
                        out.push(id);
                        cut -= ps;
                    }
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
            if cut < to {
                self.large.carve(addr, cut, to);
            }
            result?;
        }
        Ok(())
    }

    /// Merges address-adjacent free blocks of different streams of one pool once the work of both
    /// is done
    /// (either stream may have the memory then), so that pages straddling them count as fully free.
    /// The free block ending at `keep_end` (the one being extended) is left alone: merging it with
    /// a neighbour still busy on its own stream would hand that neighbour's memory to the
    /// requesting stream.
    fn merge_settled_neighbours(&mut self, keep_end: Option<DevicePtr>) {
        let settled = |st: &Self, a: DevicePtr| {
            st.large.get(a).is_some_and(|b| {
                b.state == BlockState::Free && st.fences.is_settled(b.owner.stream, b.free_seq)
            })
        };
        let mut addrs: Vec<DevicePtr> = self.large.free_blocks().map(|(a, _)| a).collect();
        addrs.sort_unstable();
        let mut i = 0;
        while i + 1 < addrs.len() {
            let (a, next) = (addrs[i], addrs[i + 1]);
            let b = self.large.get(a).expect("free block");
            let (end, owner, region) = (a + b.size, b.owner, b.region);
            let nb = self.large.get(next).expect("free block");
            let protected = Some(end) == keep_end || Some(next + nb.size) == keep_end;
            if end == next
                && !protected
                && nb.region == region
                && nb.owner.pool == owner.pool
                && nb.owner != owner
                && settled(self, a)
                && settled(self, next)
            {
                // The left block joins the right one's stream and merges with it (and with its
                // own left neighbour, if that is of the same stream now).
                let merged = self.large.retag(a, nb.owner);
                addrs.remove(i + 1);
                if i > 0 && addrs[i - 1] == merged {
                    addrs.remove(i);
                    i -= 1;
                } else {
                    addrs[i] = merged;
                }
            } else {
                i += 1;
            }
        }
    }

    /// `cuMemAlloc` of a new legacy segment of `size` bytes, under the limit.
    fn new_legacy_segment(&mut self, size: u64) -> Slow<DevicePtr> {
        if self.reserved() + size > self.limit_bytes() {
            return Err(Shortfall::NoMemory(None));
        }
        let drv = Arc::clone(&self.drv);
        let base = self.allocating(|st| Ok(drv.alloc_legacy(st.dev, size)?))?;
        self.legacy.insert(base, size);
        self.legacy_bytes += size;
        self.c.note_reserved(self.reserved());
        self.address_map.insert(base, size, self.dev);
        Ok(base)
    }

    /// Gives every fully free page and segment whose work is done back to the driver; returns
    /// the bytes released. Non-blocking: the caller waits first if it wants everything. Only
    /// ordinary memory; nothing during a capture (a release or `cuMemFree` would invalidate it).
    pub(crate) fn release_cache(&mut self) -> std::result::Result<u64, DriverError> {
        if self.capturing() {
            return Ok(0);
        }
        let drv = Arc::clone(&self.drv);
        let dev = self.dev;
        let before = self.reserved();
        // Released graph pools first: their free memory may then be released too.
        let mut result = self.drain_released_pools();
        if self.backend == Backend::Legacy {
            self.small.reclaim_idle_runs(None);
            self.refresh_fences();
            // A segment whose free blocks belong to several finished streams is wholly free.
            self.merge_settled_neighbours(None);
            let mut free_segments: Vec<DevicePtr> = self
                .small
                .empty_granules()
                .filter(|g| {
                    g.owner.pool == ORDINARY && self.fences.is_settled(g.owner.stream, g.free_seq)
                })
                .map(|g| g.base)
                .collect();
            free_segments.extend(
                self.large
                    .free_blocks()
                    .filter(|&(a, b)| {
                        self.legacy.get(&a) == Some(&b.size)
                            && b.owner.pool == ORDINARY
                            && self.fences.is_settled(b.owner.stream, b.free_seq)
                    })
                    .map(|(a, _)| a),
            );
            for base in free_segments {
                if let Err(e) = drv.free_legacy(dev, base) {
                    result = Err(e);
                    break;
                }
                if self.small.owns(base) {
                    self.small.remove_granule(base);
                } else {
                    self.large.remove_free(base);
                }
                self.legacy_bytes -= self.legacy.remove(&base).expect("known segment");
                self.address_map.remove(base);
            }
        } else {
            let mut pages = Vec::new();
            result = result.and(self.pages.retry_stuck(&*drv, dev));
            result = result.and(self.unmap_free_pages(None, None, &mut pages));
            self.pages.pool.extend(pages);
            while let Some(id) = self.pages.pool.pop() {
                if let Err(e) = self.pages.release_page(&*drv, dev, id) {
                    self.pages.pool.push(id);
                    result = result.and(Err(e));
                    break;
                }
            }
        }
        let released = before - self.reserved();
        if released > 0 {
            self.c.cache_releases += 1;
            self.c.released_bytes += released;
        }
        result.map(|()| released)
    }

    /// Gives everything back to the driver (the allocator is going away). Errors are ignored.
    pub(crate) fn teardown(&mut self) {
        let drv = Arc::clone(&self.drv);
        self.fences.teardown(&*drv, self.dev);
        for r in &self.pages.ranges {
            self.address_map.remove(r.base);
        }
        self.pages.teardown(&*drv, self.dev);
        for &base in self.legacy.keys() {
            let _ = drv.free_legacy(self.dev, base);
            self.address_map.remove(base);
        }
        self.legacy.clear();
        self.legacy_bytes = 0;
    }
}
