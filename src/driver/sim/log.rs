//! The simulated driver's memory log: every successful `cuMemAlloc`, `cuMemFree`, `cuMemMap` and
//! `cuMemUnmap`, in call order, while logging is on ([`SimDriver::log_memory`]).
//!
//! This is how a replay knows where each policy's segments were and when: PyTorch's snapshot
//! format calls them `segment_alloc`, `segment_free`, `segment_map` and `segment_unmap`, and the
//! replay's export writes them so. The log lives in the driver's state, under its one mutex.
//!
//! [`SimDriver::log_memory`]: super::SimDriver::log_memory

use crate::driver::DevicePtr;

/// What a logged call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryOp {
    /// `cuMemAlloc`: a segment of `size` bytes at `va`.
    Alloc,
    /// `cuMemFree` of the segment at `va`.
    Free,
    /// `cuMemMap` of `size` bytes of physical memory at `va`.
    Map,
    /// `cuMemUnmap` of `[va, va + size)`.
    Unmap,
}

/// One logged call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryEvent {
    /// The device.
    pub device: usize,
    /// What it did.
    pub op: MemoryOp,
    /// Where.
    pub va: DevicePtr,
    /// How many bytes (for `Free`, the segment's size).
    pub size: u64,
}
