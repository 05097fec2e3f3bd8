//! The device allocator: one per device, behind one lock.
//!
//! # Data structure
//! [`DeviceState`] holds, for one device: the [`PageTable`] (virtual ranges, physical pages, the
//! page pool), the large [`BlockPool`], the [`SmallPool`], the legacy segments (legacy backend), the
//! stream [`Fences`], frees waiting on recorded streams, and the counters behind [`Stats`].
//!
//! - Allocation: round to 512 B; the hot path ([`DeviceState::try_cached`]) takes a slot of the
//!   size class (small) or the best fit of the stream's free blocks (large): no driver call, no heap
//!   allocation beyond the block record. A miss goes to the slow path (`grow.rs`): free blocks of
//!   other streams whose work is done, then new memory (new pages while under the limit, then fully
//!   free pages unmapped from wherever they sit), and when even that fails, the OOM sequence
//!   (`oom.rs`), the one place where the lock is dropped (to call hooks).
//! - Free: mark free and merge with free neighbours of the same stream, or, if other streams were
//!   recorded on the allocation, park it until their work is done. No driver call.
//! - In front of all this, each thread's cache (`tcache.rs`, `threads.rs`): a hit allocates or
//!   frees a block of its own with no lock at all; only a miss takes the device lock.
//!
//! # Invariants
//! See [`DeviceState::check_invariants`] (`inspect.rs`): blocks tile mapped memory, no unmerged
//! free neighbours, every page has one owner, stats equal the sums over blocks and slots, and the
//! driver's physical usage equals `reserved`. With `check_invariants` configured (the default in
//! debug builds) they are checked after every mutation.
//!
//! # Locking
//! `DeviceAllocator::state` is the device lock. Every method of `DeviceState` runs under it and
//! returns with it held; only the OOM sequence releases it, explicitly, around the hooks. A thread
//! cache's hit takes no lock; its handshake with whoever drains it is in `tcache.rs`.

mod breakdown;
mod fences;
mod graphs;
mod grow;
mod inspect;
mod oom;
pub(crate) mod tcache;
mod threads;

use crate::config::{Backend, Config, Placement};
use crate::driver::{DevicePtr, Driver, DriverError, Stream};
use crate::error::{Error, Result};
use crate::pages::PageTable;
use crate::pool::large::{BlockPool, BlockState, Lookup, ROUND};
use crate::pool::lifetimes::{Lifetimes, Stamp};
use crate::pool::small::{SmallFree, SmallPool};
use crate::pool::Owner;
use crate::stats::{Counters, Peaks};
use crate::sync::{Arc, AtomicUsize, Mutex};
use crate::{AddressMap, Hooks};
use fences::Fences;
use graphs::Graphs;
pub use graphs::{CaptureFilter, MempoolId};
use rustc_hash::FxHashMap as HashMap;
use std::collections::BTreeMap;
pub(crate) use threads::Threads;

/// Largest request accepted at all: larger sizes are bad input, not an OOM.
pub(crate) const MAX_REQUEST: u64 = 1 << 56;

/// A free waiting for the streams recorded on the allocation.
#[derive(Debug)]
pub(crate) struct PendingFree {
    ptr: DevicePtr,
    small: bool,
    streams: Vec<Stream>,
    seq: u64,
}

/// Everything about one device, under its lock.
#[derive(Debug)]
pub(crate) struct DeviceState {
    pub(crate) dev: usize,
    pub(crate) drv: Arc<dyn Driver>,
    pub(crate) backend: Backend,
    pub(crate) page_size: u64,
    pub(crate) small_max: u64,
    /// Total memory of the device.
    pub(crate) capacity: u64,
    pub(crate) limit: Option<u64>,
    pub(crate) fraction: Option<f64>,
    pub(crate) pages: PageTable,
    pub(crate) large: BlockPool,
    pub(crate) small: SmallPool,
    /// Legacy backend: every `cuMemAlloc` segment, base → size.
    pub(crate) legacy: BTreeMap<DevicePtr, u64>,
    pub(crate) legacy_bytes: u64,
    pub(crate) fences: Fences,
    /// The latest free sequence number.
    pub(crate) seq: u64,
    /// Parked frees, by pointer.
    pub(crate) pending: HashMap<DevicePtr, PendingFree>,
    /// Streams recorded on live allocations (`record_stream`), besides their own.
    pub(crate) recorded: HashMap<DevicePtr, Vec<Stream>>,
    pub(crate) c: Counters,
    /// The user's peaks, and the headroom below them (`stats::Peaks`).
    pub(crate) peaks: Peaks,
    /// The thread caches and the blocks they hold (`tcache.rs`, `threads.rs`).
    pub(crate) threads: Threads,
    /// Private pools and the routes to them (CUDA graphs, `graphs.rs`).
    pub(crate) graphs: Graphs,
    /// Where large blocks go, and the lifetimes that guide it (`pool/lifetimes.rs`).
    pub(crate) placement: Placement,
    pub(crate) lifetimes: Lifetimes,
    pub(crate) address_map: Arc<AddressMap>,
    pub(crate) check: bool,
}

/// One device's allocator.
#[derive(Debug)]
pub(crate) struct DeviceAllocator {
    pub(crate) dev: usize,
    /// The device lock. Shared with the threads' TLS, whose exit gives their caches back.
    pub(crate) state: Arc<Mutex<DeviceState>>,
    pub(crate) hooks: Arc<Hooks>,
    /// Names this allocator in threads' TLS (never reused).
    pub(crate) uid: u64,
    /// Free bytes a thread cache may hold (0: none) and the largest block it caches.
    pub(crate) tc_bound: u64,
    pub(crate) tc_max_block: u64,
    /// The small pool's classes, read without the lock to find a request's bin.
    pub(crate) classes: crate::pool::small::SizeClasses,
    pub(crate) small_max: u64,
    /// Non-zero while any device of this allocator routes to a private pool: no cache hits then.
    pub(crate) captures: Arc<AtomicUsize>,
    pub(crate) check: bool,
}

/// Rounds a request to the allocation granularity, or says why it cannot be served.
#[inline]
pub(crate) fn round_request(size: u64) -> Result<u64> {
    if size == 0 {
        return Err(Error::InvalidSize {
            size,
            reason: "a request must be at least one byte",
        });
    }
    if size > MAX_REQUEST {
        return Err(Error::InvalidSize {
            size,
            reason: "larger than any device (more than 64 PiB)",
        });
    }
    Ok(size.div_ceil(ROUND) * ROUND)
}

impl DeviceAllocator {
    pub(crate) fn new(
        dev: usize,
        drv: Arc<dyn Driver>,
        config: &Config,
        address_map: Arc<AddressMap>,
        hooks: Arc<Hooks>,
        captures: Arc<AtomicUsize>,
    ) -> Result<Self> {
        let granularity = drv.granularity(dev)?;
        let mut backend = config.backend;
        if backend == Backend::Vmm && !drv.supports_vmm(dev)? {
            // The documented fallback: the same pools over cuMemAlloc segments.
            backend = Backend::Legacy;
        }
        let page_size = config.page_size.unwrap_or(granularity);
        if !page_size.is_power_of_two() || !page_size.is_multiple_of(granularity) {
            return Err(Error::Config(format!(
                "page_size {page_size} is not a power-of-two multiple of device {dev}'s granularity {granularity}"
            )));
        }
        if config.small_max > page_size / 2 {
            return Err(Error::Config(format!(
                "small_max {} is more than half the page size {page_size}",
                config.small_max
            )));
        }
        let capacity = drv.mem_info(dev)?.total;
        let small = SmallPool::new(page_size, config.small_max, config.classes_per_doubling);
        let classes = small.classes.clone();
        let small_max = small.classes.max_size();
        let tc_bound = config.thread_cache;
        let uid = threads::next_uid();
        let state = DeviceState {
            dev,
            backend,
            page_size,
            small_max: small.classes.max_size(),
            capacity,
            limit: config.limit,
            fraction: config.memory_fraction,
            pages: PageTable::new(page_size, capacity),
            large: BlockPool::default(),
            small,
            legacy: BTreeMap::new(),
            legacy_bytes: 0,
            fences: Fences::default(),
            seq: 0,
            pending: HashMap::default(),
            recorded: HashMap::default(),
            c: Counters::default(),
            peaks: Peaks::default(),
            threads: Threads::default(),
            graphs: Graphs::new(Arc::clone(&captures)),
            placement: config.placement,
            lifetimes: Lifetimes::default(),
            address_map,
            check: config.check_invariants,
            drv,
        };
        Ok(DeviceAllocator {
            dev,
            state: Arc::new(Mutex::new(state)),
            hooks,
            uid,
            tc_bound,
            tc_max_block: tc_bound / 4,
            classes,
            small_max,
            captures,
            check: config.check_invariants,
        })
    }

    /// The size a request of `rounded` bytes takes: its size class, or itself when large.
    #[inline]
    pub(crate) fn bin_size(&self, rounded: u64) -> u64 {
        if rounded <= self.small_max {
            self.classes.sizes[self.classes.class_of(rounded)]
        } else {
            rounded
        }
    }

    /// Allocates `size` bytes for use on `stream`: a hit in this thread's cache, with no lock,
    /// or the slow path under the device lock.
    #[inline]
    pub(crate) fn allocate(&self, size: u64, stream: Stream) -> Result<DevicePtr> {
        let rounded = round_request(size)?;
        let tc = self.my_cache();
        if let Some(tc) = tc {
            let bin = self.bin_size(rounded);
            if bin <= self.tc_max_block {
                if let Some(p) = tc.try_alloc(stream, bin, size, &self.captures) {
                    if self.check {
                        self.check_after_hit();
                    }
                    return Ok(p);
                }
            }
        }
        self.allocate_slow(tc, rounded, size, stream)
    }

    /// Frees `ptr`, returning the bytes it held: into this thread's cache with no lock when the
    /// block was handed out from it, else under the device lock.
    #[inline]
    pub(crate) fn free(&self, ptr: DevicePtr) -> Result<u64> {
        let tc = self.my_cache();
        if let Some(tc) = tc {
            if let Some(size) = tc.try_free(ptr) {
                if self.check {
                    self.check_after_hit();
                }
                return Ok(size);
            }
        }
        self.free_slow(tc, ptr)
    }
}

impl DeviceState {
    /// The effective byte limit on reserved memory.
    pub(crate) fn limit_bytes(&self) -> u64 {
        let by_fraction = self
            .fraction
            .map_or(u64::MAX, |f| (f * self.capacity as f64) as u64);
        self.limit.unwrap_or(u64::MAX).min(by_fraction)
    }

    /// Bytes of physical memory held.
    #[inline]
    pub(crate) fn reserved(&self) -> u64 {
        self.pages.live_pages() * self.page_size + self.legacy_bytes
    }

    /// Runs the invariant checks when configured to; a failure is a bug in tessera, so it panics
    /// with the broken invariant (tests and debug builds only: release builds default to off).
    #[inline]
    pub(crate) fn checked(&self) {
        if self.check {
            if let Err(e) = self.check_invariants() {
                panic!("tessera invariant broken on device {}: {e}", self.dev);
            }
        }
    }

    /// The hot path: a cached slot or block of `owner`, or `None`.
    #[inline]
    pub(crate) fn try_cached(
        &mut self,
        rounded: u64,
        requested: u64,
        owner: Owner,
    ) -> Option<DevicePtr> {
        if rounded <= self.small_max {
            let class = self.small.classes.class_of(rounded);
            let ptr = self.small.alloc(owner, class, requested)?;
            self.c
                .note_alloc(self.small.classes.sizes[class], requested);
            Some(ptr)
        } else {
            let (addr, offset, stamp) = match self.placement {
                Placement::Lifetime => {
                    let stamp = self.lifetimes.predict(rounded);
                    let (a, off) = self.large.fit_near(owner, rounded, stamp.death)?;
                    (a, off, stamp)
                }
                Placement::BestFit => (self.large.best_fit(owner, rounded)?, 0, Stamp::default()),
            };
            Some(self.place_large(addr, offset, rounded, requested, owner, stamp))
        }
    }

    /// Hands out `rounded` bytes at `offset` into the free block at `addr`, stamped (and the
    /// lifetime clock moved on) when placed by prediction.
    #[inline]
    pub(crate) fn place_large(
        &mut self,
        addr: DevicePtr,
        offset: u64,
        rounded: u64,
        requested: u64,
        owner: Owner,
        stamp: Stamp,
    ) -> DevicePtr {
        if stamp.key != 0 {
            self.lifetimes.commit(rounded, stamp);
        }
        let at = self
            .large
            .allocate_at(addr, rounded, requested, owner, offset, stamp);
        self.c.note_alloc(rounded, requested);
        at
    }

    /// Frees `ptr`, a user's free: at once, or parked until recorded streams finish. Returns
    /// (size, requested).
    #[inline]
    pub(crate) fn free(&mut self, ptr: DevicePtr) -> Result<(u64, u64)> {
        self.release(ptr, true)
    }

    /// Returns `ptr` to the pools: a user's free (`user`, counted as one) or a thread cache's
    /// block coming back. Returns (size, requested).
    #[inline]
    pub(crate) fn release(&mut self, ptr: DevicePtr, user: bool) -> Result<(u64, u64)> {
        let seq = self.seq + 1;
        let recorded = if self.recorded.is_empty() {
            None
        } else {
            self.recorded.remove(&ptr)
        };
        if !self.pending.is_empty() && self.pending.contains_key(&ptr) {
            return Err(self.bad_free(Error::DoubleFree {
                ptr,
                device: self.dev,
            }));
        }
        if recorded.is_none() {
            // The common case: one lookup says whether it is small, and frees it if so.
            match self.small.free(ptr, seq) {
                SmallFree::Freed { size, requested } => {
                    self.seq = seq;
                    self.note_release(size, requested, user);
                    return Ok((size, requested));
                }
                SmallFree::NotSmall => {}
                _ => return Err(self.small_free_error(ptr)),
            }
        } else if self.small.owns(ptr) {
            // Validate now; the slot itself is freed when the recorded streams are done.
            let Some((_, size, req, _)) = self.small.slot_of(ptr).filter(|s| s.0 == ptr) else {
                return Err(self.small_free_error(ptr));
            };
            self.seq = seq;
            self.note_release(size, req, user);
            self.park(ptr, true, recorded.unwrap_or_default(), seq);
            return Ok((size, req));
        }
        if let Some((size, req, stamp)) = self.large.release(ptr, seq, recorded.is_some()) {
            self.lifetimes.observe(stamp);
            if let Some(streams) = recorded {
                self.park(ptr, false, streams, seq);
            }
            self.seq = seq;
            self.note_release(size, req, user);
            return Ok((size, req));
        }
        // Not the start of an allocated large block (`release` frees every one it finds): say what
        // it is. (A recorded pointer is always live, so `recorded` is `None` here.)
        match self.large.lookup(ptr) {
            Lookup::Start(_) => Err(self.bad_free(Error::DoubleFree {
                ptr,
                device: self.dev,
            })),
            Lookup::Interior(base, b) if b.state == BlockState::Allocated => {
                Err(self.bad_free(Error::UnknownPointer {
                    ptr,
                    device: Some(self.dev),
                    interior_of: Some(base),
                }))
            }
            // Inside free memory: it was freed (and merged) already.
            Lookup::Interior(..) => Err(self.bad_free(Error::DoubleFree {
                ptr,
                device: self.dev,
            })),
            Lookup::Outside => Err(self.bad_free(Error::UnknownPointer {
                ptr,
                device: Some(self.dev),
                interior_of: None,
            })),
        }
    }

    #[inline]
    fn note_release(&mut self, size: u64, requested: u64, user: bool) {
        self.c.note_pool_free(size, requested);
        if user {
            self.c.note_user_free(size);
        }
    }

    #[cold]
    fn small_free_error(&mut self, ptr: DevicePtr) -> Error {
        // Classify without changing anything: a second `free` call on the pool would mutate it.
        let e = match self.small.slot_of(ptr) {
            Some((base, ..)) if base != ptr => Error::UnknownPointer {
                ptr,
                device: Some(self.dev),
                interior_of: Some(base),
            },
            Some(_) => Error::UnknownPointer {
                ptr,
                device: Some(self.dev),
                interior_of: None,
            },
            None if self.small.owns(ptr) => Error::DoubleFree {
                ptr,
                device: self.dev,
            },
            None => Error::UnknownPointer {
                ptr,
                device: Some(self.dev),
                interior_of: None,
            },
        };
        self.bad_free(e)
    }

    #[cold]
    fn bad_free(&mut self, e: Error) -> Error {
        self.c.invalid_frees += 1;
        e
    }

    /// The live allocation starting at `ptr`, or containing it: (base, size, requested, owner).
    pub(crate) fn allocation(&self, ptr: DevicePtr) -> Option<(DevicePtr, u64, u64, Owner)> {
        if self.small.owns(ptr) {
            // A parked free is not live, whichever pointer into it is asked about.
            return self.small.slot_of(ptr).filter(|s| !self.is_pending(s.0));
        }
        let (base, b) = match self.large.lookup(ptr) {
            Lookup::Start(b) => (ptr, b),
            Lookup::Interior(a, b) => (a, b),
            Lookup::Outside => return None,
        };
        (b.state == BlockState::Allocated).then_some((base, b.size, b.requested, b.owner))
    }

    fn is_pending(&self, ptr: DevicePtr) -> bool {
        self.pending.contains_key(&ptr)
    }

    /// Parks a free until the work queued on `streams` before it has finished. Their events are
    /// recorded now, at the free, as PyTorch does: a stream the user destroys later cannot leave
    /// the memory unprotected. A record that fails is counted and tried again when settling.
    /// During a capture nothing is recorded (an event recorded there could never be queried):
    /// the free waits until the capture ends, and the events are recorded then, later than the
    /// free, which is conservative (`fences.rs`).
    #[cold]
    fn park(&mut self, ptr: DevicePtr, small: bool, streams: Vec<Stream>, seq: u64) {
        let drv = Arc::clone(&self.drv);
        let record = if self.capturing() {
            &[][..]
        } else {
            &streams[..]
        };
        for &s in record {
            if let Err(e) = self.fences.request(&*drv, self.dev, s, seq) {
                self.c.note_driver_error(&e);
            }
        }
        self.pending.insert(
            ptr,
            PendingFree {
                ptr,
                small,
                streams,
                seq,
            },
        );
    }

    /// `record_stream`: the allocation at `ptr` is also used on `stream`; its memory is reused or
    /// unmapped only after the work queued on `stream` before its free has finished.
    pub(crate) fn record_stream(&mut self, ptr: DevicePtr, stream: Stream) -> Result<()> {
        let Some((base, _, _, own)) = self.allocation(ptr) else {
            return Err(Error::UnknownPointer {
                ptr,
                device: Some(self.dev),
                interior_of: None,
            });
        };
        if stream != own.stream {
            let list = self.recorded.entry(base).or_default();
            if !list.contains(&stream) {
                list.push(stream);
            }
        }
        Ok(())
    }

    /// Moves parked frees whose recorded streams are done into the pools. With `wait`, waits for
    /// them. Does nothing during a capture: that would record, query or wait for events.
    pub(crate) fn settle_pending(&mut self, wait: bool) -> std::result::Result<(), DriverError> {
        if (self.pending.is_empty() && !wait) || self.capturing() {
            return Ok(());
        }
        let drv = Arc::clone(&self.drv);
        // Per stream, best effort: a stream whose event cannot be had keeps its own frees parked.
        let mut errors = Vec::new();
        for p in self.pending.values() {
            for &s in &p.streams {
                if let Err(e) = self.fences.request(&*drv, self.dev, s, p.seq) {
                    errors.push(e);
                }
            }
        }
        for e in &errors {
            self.c.note_driver_error(e);
        }
        if wait {
            self.fences.wait_all(&*drv, self.dev)?;
        } else if let Err(e) = self.fences.poll(&*drv, self.dev) {
            self.c.note_driver_error(&e);
        }
        let done: Vec<DevicePtr> = self
            .pending
            .values()
            .filter(|p| p.streams.iter().all(|&s| self.fences.is_settled(s, p.seq)))
            .map(|p| p.ptr)
            .collect();
        for ptr in done {
            let p = self.pending.remove(&ptr).expect("parked free");
            if p.small {
                let freed = self.small.free(p.ptr, p.seq);
                debug_assert!(matches!(freed, SmallFree::Freed { .. }));
            } else {
                self.large.settle_pending(p.ptr);
            }
        }
        Ok(())
    }
}

impl Drop for DeviceAllocator {
    fn drop(&mut self) {
        // Everything goes back to the driver; errors are ignored (this may run at process exit,
        // after the driver has shut down). Never panics. Threads that still have a cache of this
        // device find it torn down at their exit and give nothing back.
        let mut st = self.state.lock();
        st.threads.torn_down = true;
        st.teardown();
    }
}

#[cfg(test)]
mod graphs_tests;
