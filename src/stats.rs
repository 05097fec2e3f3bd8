//! Statistics and snapshots: what a device holds, copied out under its lock.
//!
//! `Counters` are plain fields updated under the device lock (no atomics on the hot path);
//! [`Stats`] is the copy a caller gets, with the figures that need a walk over the pools
//! (cached free, largest free range, stranded) computed at read time. [`Snapshot`] lists every
//! segment and block, for debugging and for PyTorch's `memory_snapshot()`.

use crate::driver::{DevicePtr, Stream};
use serde::Serialize;

/// Running counters of one device (kept under its lock).
#[derive(Clone, Debug, Default)]
pub(crate) struct Counters {
    pub(crate) allocated: u64,
    pub(crate) peak_allocated: u64,
    pub(crate) requested: u64,
    pub(crate) peak_requested: u64,
    pub(crate) active: u64,
    pub(crate) peak_active: u64,
    pub(crate) peak_reserved: u64,
    pub(crate) allocations: u64,
    pub(crate) frees: u64,
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
    #[inline]
    pub(crate) fn note_alloc(&mut self, size: u64, requested: u64) {
        self.allocated += size;
        self.requested += requested;
        self.active += 1;
        self.allocations += 1;
        self.peak_allocated = self.peak_allocated.max(self.allocated);
        self.peak_requested = self.peak_requested.max(self.requested);
        self.peak_active = self.peak_active.max(self.active);
    }

    #[inline]
    pub(crate) fn note_free(&mut self, size: u64, requested: u64) {
        self.allocated -= size;
        self.requested -= requested;
        self.active -= 1;
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

/// The statistics of one device at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    /// Bytes in live allocations (rounded sizes: 512 B steps, or the size class).
    pub allocated_bytes: u64,
    pub peak_allocated_bytes: u64,
    /// Bytes the callers asked for, in live allocations.
    pub requested_bytes: u64,
    pub peak_requested_bytes: u64,
    /// Physical memory held from the driver.
    pub reserved_bytes: u64,
    pub peak_reserved_bytes: u64,
    /// Live allocations.
    pub active_blocks: u64,
    pub peak_active_blocks: u64,
    /// `reserved - allocated`.
    pub cached_free_bytes: u64,
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
    pub allocations: u64,
    pub frees: u64,
    /// Bytes allocated since the start (rounded sizes); bytes freed since the start are
    /// `allocated_bytes_total - allocated_bytes`.
    pub allocated_bytes_total: u64,
    /// Pages unmapped from one place and mapped at another.
    pub remaps: u64,
    /// Times the cache was released to the driver, and the bytes released.
    pub cache_releases: u64,
    pub released_bytes: u64,
    pub hook_calls: u64,
    pub ooms: u64,
    /// Requests that released the cache to the driver and retried (PyTorch's `num_alloc_retries`).
    pub alloc_retries: u64,
    /// Frees of unknown pointers and double frees (rejected, nothing changed).
    pub invalid_frees: u64,
    /// Driver errors that did not fail an operation (a fence for memory the request did not
    /// need), and the last one's message.
    pub driver_errors: u64,
    pub last_driver_error: Option<String>,
    /// The reserved-bytes limit in force, if any.
    pub limit_bytes: Option<u64>,
    pub page_size: u64,
}

/// What a block in a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockStateInfo {
    Allocated,
    Free,
    /// Freed, waiting for streams recorded with `record_stream`.
    PendingFree,
}

/// One block in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BlockInfo {
    pub address: DevicePtr,
    pub size: u64,
    pub requested_size: u64,
    pub state: BlockStateInfo,
    pub stream: Stream,
}

/// What a segment in a snapshot is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SegmentKind {
    /// A contiguous run of mapped pages holding large blocks (VMM backend).
    Large,
    /// A granule of the small pool (one page); its blocks are the allocated slots.
    Small,
    /// A `cuMemAlloc` segment holding large blocks (legacy backend).
    Legacy,
}

/// One segment in a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SegmentInfo {
    pub address: DevicePtr,
    pub size: u64,
    pub kind: SegmentKind,
    pub stream: Stream,
    pub blocks: Vec<BlockInfo>,
}

/// Every segment and block of one device.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Snapshot {
    pub device: usize,
    pub page_size: u64,
    pub segments: Vec<SegmentInfo>,
    pub stats: Stats,
}
