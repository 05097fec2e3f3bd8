//! Statistics and snapshots: what a device holds, copied out under its lock.
//!
//! `Counters` are plain fields updated under the device lock (no atomics on the hot path);
//! [`Stats`] is the copy a caller gets, with the figures that need a walk over the pools
//! (cached free, largest free range, stranded) computed at read time. [`Snapshot`] lists every
//! segment and block, for debugging and for PyTorch's `memory_snapshot()`.

use crate::device::MempoolId;
use crate::driver::{DevicePtr, Stream};
#[cfg(feature = "serde")]
use serde::Serialize;

/// Running counters of one device (kept under its lock).
///
/// `allocated`, `requested` and `active` are the pools' view: blocks that thread caches hold
/// (`device/tcache.rs`), free in a cache or handed out from it, count as allocated, with the
/// request the pool recorded. The user's view, in [`Stats`], takes the caches' published figures
/// off. `allocations`, `frees`, `alloc_bytes` and `freed_bytes` count the user's calls that went
/// through the lock (a cache hit is counted by its thread).
#[derive(Clone, Debug, Default)]
pub(crate) struct Counters {
    pub(crate) allocated: u64,
    pub(crate) requested: u64,
    pub(crate) active: u64,
    pub(crate) peak_reserved: u64,
    pub(crate) allocations: u64,
    pub(crate) frees: u64,
    /// Bytes allocated, ever (rounded sizes).
    pub(crate) alloc_bytes: u64,
    /// Bytes freed, ever (the OOM sequence measures what hooks freed with it).
    pub(crate) freed_bytes: u64,
    pub(crate) remaps: u64,
    pub(crate) cache_releases: u64,
    pub(crate) released_bytes: u64,
    pub(crate) hook_calls: u64,
    pub(crate) ooms: u64,
    pub(crate) alloc_retries: u64,
    pub(crate) invalid_frees: u64,
    pub(crate) driver_errors: u64,
    pub(crate) last_driver_error: Option<String>,
}

impl Counters {
    /// A user's allocation taken from the pools.
    #[inline]
    pub(crate) fn note_alloc(&mut self, size: u64, requested: u64) {
        self.note_pool_alloc(size, requested);
        self.note_user_alloc(size);
    }

    /// The pools hand a block out (to a user, or to a thread cache).
    #[inline]
    pub(crate) fn note_pool_alloc(&mut self, size: u64, requested: u64) {
        self.allocated += size;
        self.requested += requested;
        self.active += 1;
    }

    /// A block returns to the pools.
    #[inline]
    pub(crate) fn note_pool_free(&mut self, size: u64, requested: u64) {
        self.allocated -= size;
        self.requested -= requested;
        self.active -= 1;
    }

    /// A user's allocation, counted.
    #[inline]
    pub(crate) fn note_user_alloc(&mut self, size: u64) {
        self.allocations += 1;
        self.alloc_bytes += size;
    }

    /// A user's free, counted.
    #[inline]
    pub(crate) fn note_user_free(&mut self, size: u64) {
        self.frees += 1;
        self.freed_bytes += size;
    }

    /// A driver error that did not fail the operation in progress.
    #[cold]
    pub(crate) fn note_driver_error(&mut self, e: &crate::driver::DriverError) {
        self.driver_errors += 1;
        self.last_driver_error = Some(e.to_string());
    }

    pub(crate) fn note_reserved(&mut self, reserved: u64) {
        self.peak_reserved = self.peak_reserved.max(reserved);
    }
}

/// An amount of live memory: bytes (rounded), bytes requested, blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Amount {
    pub(crate) bytes: u64,
    pub(crate) requested: u64,
    pub(crate) blocks: u64,
}

impl Amount {
    /// One block of `bytes` bytes serving a request of `requested`.
    #[inline]
    pub(crate) const fn block(bytes: u64, requested: u64) -> Amount {
        Amount {
            bytes,
            requested,
            blocks: 1,
        }
    }

    /// Whether every field is at least `other`'s.
    #[inline]
    pub(crate) fn covers(&self, other: Amount) -> bool {
        self.bytes >= other.bytes
            && self.requested >= other.requested
            && self.blocks >= other.blocks
    }

    #[inline]
    pub(crate) fn add(&mut self, other: Amount) {
        self.bytes += other.bytes;
        self.requested += other.requested;
        self.blocks += other.blocks;
    }

    /// Takes `other` off, each field at most down to 0; returns what could not be taken.
    #[inline]
    pub(crate) fn take(&mut self, other: Amount) -> Amount {
        let t = |have: &mut u64, want: u64| {
            let got = want.min(*have);
            *have -= got;
            want - got
        };
        Amount {
            bytes: t(&mut self.bytes, other.bytes),
            requested: t(&mut self.requested, other.requested),
            blocks: t(&mut self.blocks, other.blocks),
        }
    }
}

/// The peaks of the user's live memory, kept exact without a shared counter on the hot path.
///
/// Invariant: `live + Σ budgets + headroom == peak`, field by field, where `live` is the user's
/// live memory, each thread cache's budget is what its thread may allocate without the lock, and
/// `headroom` (here, under the device lock) is the rest. A cache hit spends its thread's budget and
/// a hit free gives to it; everything else happens under the lock: an allocation spends the
/// caller's budget, then the headroom, and only the remainder raises the peak; a free adds to the
/// headroom. So live never exceeds `peak`, and the peak rises only when live memory would pass it
/// with every budget but the caller's spent: exact with one thread allocating, and above the true
/// peak by at most the other threads' budgets (each at most twice `thread_cache`) otherwise.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Peaks {
    pub(crate) peak: Amount,
    pub(crate) headroom: Amount,
}

impl Peaks {
    /// An allocation of `a` under the lock, spending `budget` (the caller's) first.
    #[inline]
    pub(crate) fn charge(&mut self, budget: Option<&mut Amount>, a: Amount) {
        let rest = match budget {
            Some(b) => b.take(a),
            None => a,
        };
        let rest = self.headroom.take(rest);
        self.peak.add(rest);
    }

    /// A free of `a` under the lock.
    #[inline]
    pub(crate) fn credit(&mut self, a: Amount) {
        self.headroom.add(a);
    }

    /// Moves up to `want` of the headroom into `budget`.
    pub(crate) fn grant(&mut self, budget: &mut Amount, want: Amount) {
        let mut g = want;
        let short = self.headroom.take(g);
        g.bytes -= short.bytes;
        g.requested -= short.requested;
        g.blocks -= short.blocks;
        budget.add(g);
    }

    /// Peaks restart at `live`; every budget must have been returned (zeroed) by the caller.
    pub(crate) fn reset(&mut self, live: Amount) {
        self.peak = live;
        self.headroom = Amount::default();
    }
}

/// The statistics of one device at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct Stats {
    /// Bytes in live allocations (rounded sizes: 512 B steps, or the size class).
    pub allocated_bytes: u64,
    /// The most `allocated_bytes` has been since the start or the last
    /// [`reset_peak_stats`](crate::Tessera::reset_peak_stats).
    pub peak_allocated_bytes: u64,
    /// Bytes the callers asked for, in live allocations.
    pub requested_bytes: u64,
    /// The most `requested_bytes` has been since the start or the last
    /// [`reset_peak_stats`](crate::Tessera::reset_peak_stats).
    pub peak_requested_bytes: u64,
    /// Physical memory held from the driver.
    pub reserved_bytes: u64,
    /// The most `reserved_bytes` has been since the start or the last
    /// [`reset_peak_stats`](crate::Tessera::reset_peak_stats).
    pub peak_reserved_bytes: u64,
    /// Live allocations.
    pub active_blocks: u64,
    /// The most `active_blocks` has been since the start or the last
    /// [`reset_peak_stats`](crate::Tessera::reset_peak_stats).
    pub peak_active_blocks: u64,
    /// `reserved - allocated`: free memory in the pools and in thread caches.
    pub cached_free_bytes: u64,
    /// Free bytes held in thread caches (part of `cached_free_bytes`): served to their own
    /// thread without the device lock, returned to the device by `empty_cache`, `trim`, the OOM
    /// sequence and thread exit.
    pub thread_cached_bytes: u64,
    /// The largest request that cached memory could serve without new memory: the largest free
    /// block, or all fully free pages gathered by remapping, whichever is larger.
    pub largest_free_bytes: u64,
    /// Free bytes in pages that also hold live data: no remap can gather them.
    pub stranded_bytes: u64,
    /// Contiguous mapped runs of large blocks (VMM) or `cuMemAlloc` segments (legacy), plus small
    /// granules.
    pub segments: u64,
    /// Pages mapped now.
    pub mapped_pages: u64,
    /// Pages created and mapped nowhere.
    pub pool_pages: u64,
    /// Allocations served since the start.
    pub allocations: u64,
    /// Frees accepted since the start (one that waits for recorded streams counts at once).
    pub frees: u64,
    /// Bytes allocated since the start (rounded sizes); bytes freed since the start are
    /// `allocated_bytes_total - allocated_bytes`.
    pub allocated_bytes_total: u64,
    /// Pages unmapped from one place and mapped at another.
    pub remaps: u64,
    /// Times the cache was released to the driver, and the bytes released.
    pub cache_releases: u64,
    /// Bytes those releases gave back to the driver, in total.
    pub released_bytes: u64,
    /// Eviction hook calls made by the OOM sequence, in total.
    pub hook_calls: u64,
    /// Requests that failed with [`Error::OutOfMemory`](crate::Error::OutOfMemory).
    pub ooms: u64,
    /// Requests that released the cache to the driver and retried (PyTorch's `num_alloc_retries`).
    pub alloc_retries: u64,
    /// Frees of unknown pointers and double frees (rejected, nothing changed).
    pub invalid_frees: u64,
    /// Driver errors that did not fail an operation (a fence for memory the request did not
    /// need), and the last one's message.
    pub driver_errors: u64,
    /// The message of the last of those driver errors; `None` if there was none.
    pub last_driver_error: Option<String>,
    /// The reserved-bytes limit in force, if any.
    pub limit_bytes: Option<u64>,
    /// The device's page size in bytes ([`Config::page_size`](crate::Config::page_size), or the
    /// driver's granularity).
    pub page_size: u64,
    /// Whether a CUDA-graph capture may be underway (an allocation is being routed to a private
    /// pool on some device of this allocator): until it ends, tessera unmaps, releases and waits
    /// for nothing.
    pub capture_underway: bool,
    /// The private pools of CUDA graphs with uses left, by id. Their bytes are part of the
    /// figures above.
    pub private_pools: Vec<PrivatePoolStats>,
}

/// One private pool (CUDA graphs) in [`Stats`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct PrivatePoolStats {
    /// The pool's id (PyTorch's `MempoolId_t`).
    pub id: MempoolId,
    /// Graphs (or captures) holding it: at zero its memory joins the ordinary cache.
    pub uses: u32,
    /// Whether allocations are routed to it now (a capture into it is underway).
    pub routed: bool,
    /// Bytes in its live allocations.
    pub allocated_bytes: u64,
    /// Bytes of its blocks and granules, live or free: memory only it may use.
    pub held_bytes: u64,
    /// Its live allocations.
    pub active_blocks: u64,
}

/// What a block in a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum BlockStateInfo {
    /// Handed out and not freed.
    Allocated,
    /// Free and cached (large blocks only: a small segment lists only its allocated slots).
    Free,
    /// Freed, waiting for streams recorded with `record_stream`.
    PendingFree,
}

/// One block in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct BlockInfo {
    /// Start of the block (device address).
    pub address: DevicePtr,
    /// Bytes it spans (the rounded size, or the slot size of its size class).
    pub size: u64,
    /// Bytes the caller asked for; 0 for a free block and for a pending large one (a pending small
    /// slot keeps its request).
    pub requested_size: u64,
    /// Allocated, free, or waiting for recorded streams.
    pub state: BlockStateInfo,
    /// The stream it was allocated on (a free block: the stream that last used it).
    pub stream: Stream,
    /// The private pool (CUDA graphs) it belongs to; `None`: the ordinary cache.
    pub pool: Option<MempoolId>,
}

/// What a segment in a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
#[cfg_attr(feature = "serde", serde(rename_all = "snake_case"))]
pub enum SegmentKind {
    /// A contiguous run of mapped pages holding large blocks (VMM backend).
    Large,
    /// A granule of the small pool (one page); its blocks are the allocated slots.
    Small,
    /// A `cuMemAlloc` segment holding large blocks (legacy backend).
    Legacy,
}

/// One segment in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct SegmentInfo {
    /// Start of the segment (device address).
    pub address: DevicePtr,
    /// Bytes it spans (one page for a small granule).
    pub size: u64,
    /// Large, small or legacy.
    pub kind: SegmentKind,
    /// The stream of its first block (large and legacy segments) or of its granule (small).
    pub stream: Stream,
    /// The private pool all its blocks belong to (a small granule: its pool); `None` when that
    /// is the ordinary cache, or when its blocks belong to several pools (a large run of pages
    /// can hold blocks of several: see each block's `pool`).
    pub pool: Option<MempoolId>,
    /// Its blocks in address order: every block of a large or legacy segment, the allocated and
    /// pending slots of a small one.
    pub blocks: Vec<BlockInfo>,
}

/// Every segment and block of one device.
#[derive(Clone, Debug, PartialEq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct Snapshot {
    /// The device's index.
    pub device: usize,
    /// The device's page size in bytes.
    pub page_size: u64,
    /// Every segment, large, legacy and small, in address order.
    pub segments: Vec<SegmentInfo>,
    /// The device's statistics at the same moment.
    pub stats: Stats,
}

/// Where every reserved byte of one device is, at one moment: each byte the driver holds for it
/// is counted in exactly one field, so the fields sum to `reserved_bytes`
/// ([`Breakdown::total`]). What is above `requested_bytes` is the memory the allocator spends
/// beyond what the program asked for, split by cause (`tessera replay --explain` prints it).
///
/// A *page* is a granule of the VMM backend or a `cuMemAlloc` segment of the legacy one. A page
/// that holds no live byte is fungible: tessera remaps it wherever a request needs it, so its
/// bytes are counted apart (`free_page_bytes`) from the free space that shares a page with live
/// data, which only requests that fit in it can use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(Serialize))]
pub struct Breakdown {
    /// Bytes the driver holds for the device (created pages and `cuMemAlloc` segments).
    pub reserved_bytes: u64,
    /// Bytes the live allocations asked for.
    pub requested_bytes: u64,
    /// Rounding of live allocations up to 512 B.
    pub rounding_bytes: u64,
    /// Small live allocations: their size class's slot beyond the 512 B-rounded request.
    pub class_bytes: u64,
    /// Free slots in small runs that hold a live slot.
    pub small_free_slot_bytes: u64,
    /// The tails of small runs that hold a live slot, too short for one more slot.
    pub small_run_tail_bytes: u64,
    /// Small runs with no live slot (kept as a cache) in granules that hold live data.
    pub small_idle_run_bytes: u64,
    /// Units of small granules that hold live data, in no run.
    pub small_free_unit_bytes: u64,
    /// Free large blocks' bytes in pages that also hold live (or parked) bytes.
    pub large_free_bytes: u64,
    /// Free bytes in pages with live data that belong to another stream than the one asked about
    /// (usable by it only after that stream's work is done). 0 when no stream is given.
    pub other_stream_bytes: u64,
    /// Free memory of private pools (CUDA graphs), whole pages included: only its pool may use
    /// it.
    pub private_pool_bytes: u64,
    /// Freed allocations waiting for streams recorded with `record_stream`.
    pub parked_bytes: u64,
    /// Pages with no live byte: free mapped pages, empty small granules, the page pool, wholly
    /// free legacy segments.
    pub free_page_bytes: u64,
    /// Pages a failed unmap left mapped, quarantined until the next cache release.
    pub stuck_bytes: u64,
}

impl Breakdown {
    /// The sum of every field but `reserved_bytes`: equal to it.
    pub fn total(&self) -> u64 {
        self.requested_bytes + self.overhead()
    }

    /// Every byte above the requested bytes (the sum of the causes).
    pub fn overhead(&self) -> u64 {
        self.rounding_bytes
            + self.class_bytes
            + self.small_free_slot_bytes
            + self.small_run_tail_bytes
            + self.small_idle_run_bytes
            + self.small_free_unit_bytes
            + self.large_free_bytes
            + self.other_stream_bytes
            + self.private_pool_bytes
            + self.parked_bytes
            + self.free_page_bytes
            + self.stuck_bytes
    }

    /// The causes with their names, in the order of the fields (the command line's labels).
    pub fn causes(&self) -> [(&'static str, u64); 12] {
        [
            ("rounding", self.rounding_bytes),
            ("size classes", self.class_bytes),
            ("small free slots", self.small_free_slot_bytes),
            ("small run tails", self.small_run_tail_bytes),
            ("small idle runs", self.small_idle_run_bytes),
            ("small free units", self.small_free_unit_bytes),
            ("large free in used pages", self.large_free_bytes),
            ("other streams", self.other_stream_bytes),
            ("private pools", self.private_pool_bytes),
            ("parked", self.parked_bytes),
            ("free pages", self.free_page_bytes),
            ("stuck", self.stuck_bytes),
        ]
    }
}
