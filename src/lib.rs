//! tessera: a CUDA caching allocator with a page-remapping defragmentation core.
//!
//! Layers, each testable alone:
//! 1. [`driver`]: the one trait through which tessera talks to a GPU, with the real CUDA driver
//!    ([`driver::cuda::CudaDriver`]) and a simulated device ([`driver::sim::SimDriver`]).
//! 2. `pages`: virtual ranges and physical pages; remapping lives here.
//! 3. `pool`: size classes for small requests, best-fit blocks for large ones.
//! 4. `device`: one allocator per device: streams and events, limits, the OOM sequence, stats,
//!    invariants.
//! 5. [`Tessera`]: the front, dispatching by device and finding allocations by pointer; [`global()`]
//!    is the process-wide one that the C ABI serves.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

mod allocator;
mod buffer;
pub mod bytes;
pub mod config;
mod device;
pub mod driver;
pub mod error;
// The process-wide allocator holds statics and an exit handler, outside loom's models.
#[cfg(not(loom))]
pub mod global;
mod hooks;
mod pages;
// Pickle reading and writing that keeps the memo's sharing (PyTorch memory snapshots).
pub mod pickle;
mod pool;
// The replay is single-threaded tooling over the simulated device, outside loom's models; it is
// the `replay` feature (its readers need gzip and JSON, which the allocator does not).
#[cfg(all(feature = "replay", not(loom)))]
pub mod replay;
pub mod stats;
pub(crate) mod sync;
pub mod torch_snapshot;
mod trace_log;

pub(crate) use allocator::AddressMap;
pub use allocator::{Allocation, Tessera};
pub use buffer::{CudaBuffer, DeviceBuffer, DeviceCopy, DeviceRepr};
pub use config::{Backend, Config, Placement};
pub use device::{CaptureFilter, MempoolId};
pub use error::{Error, OomReport, Result};
#[cfg(not(loom))]
pub use global::{configure_global, global};
pub(crate) use hooks::Hooks;
pub use hooks::{HookId, OomHook};
pub use stats::{
    BlockInfo, BlockStateInfo, Breakdown, PrivatePoolStats, SegmentInfo, SegmentKind, Snapshot,
    Stats,
};
pub use trace_log::TRACE_ENV_VAR;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
