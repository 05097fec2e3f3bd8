//! The crate's error type. Every failure a caller can cause or meet is a variant here, with a message
//! that says what happened and, where the caller can act, what to do. Nothing in tessera panics on
//! bad input.

use crate::bytes::format_bytes;
use crate::driver::{DevicePtr, DriverError};
use std::fmt;

/// Everything that can go wrong in tessera.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A driver call failed for a reason other than running out of memory.
    #[error(transparent)]
    Driver(#[from] DriverError),
    /// The request could not be satisfied even after releasing the cache, calling the hooks and
    /// compacting. The report says why.
    #[error("{0}")]
    OutOfMemory(Box<OomReport>),
    /// A size of zero, or one too large to round or reserve.
    #[error("invalid size {size}: {reason}")]
    InvalidSize {
        /// The size asked for, in bytes.
        size: u64,
        /// Why it cannot be served.
        reason: &'static str,
    },
    /// A device index outside `0..count`.
    #[error("invalid device {device}: {count} device(s) present")]
    InvalidDevice {
        /// The index given (signed: the C ABI passes an `int`, which may be negative).
        device: i64,
        /// The number of devices the driver has.
        count: usize,
    },
    /// A pointer that tessera did not hand out (or already took back and handed out again elsewhere).
    #[error("unknown pointer {ptr:#x}{}: not allocated by tessera{}", dev_suffix(*.device), interior_suffix(*.interior_of))]
    UnknownPointer {
        /// The pointer given.
        ptr: DevicePtr,
        /// The device it was looked up on; `None` when it was looked up by address alone and no
        /// device owns it.
        device: Option<usize>,
        /// Set when the pointer lies inside a live allocation that starts elsewhere.
        interior_of: Option<DevicePtr>,
    },
    /// A pointer freed twice.
    #[error("double free of {ptr:#x} on device {device}")]
    DoubleFree {
        /// The pointer given.
        ptr: DevicePtr,
        /// The device it was freed on.
        device: usize,
    },
    /// A bad configuration key or value (from the builder or `TESSERA_CONF`).
    #[error("configuration error: {0}")]
    Config(String),
    /// An operation that the configuration or the device does not support.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A CUDA-graph pool call out of order: routing to a pool twice, ending a route that is not
    /// open, releasing a pool that has no use left.
    #[error("private pool: {0}")]
    PrivatePool(String),
}

fn dev_suffix(device: Option<usize>) -> String {
    device
        .map(|d| format!(" on device {d}"))
        .unwrap_or_default()
}

fn interior_suffix(base: Option<DevicePtr>) -> String {
    base.map(|b| format!(" (it points inside the allocation at {b:#x})"))
        .unwrap_or_default()
}

/// The result of tessera's operations: [`Error`] unless said otherwise.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// True for [`Error::OutOfMemory`].
    pub fn is_out_of_memory(&self) -> bool {
        matches!(self, Error::OutOfMemory(_))
    }
}

/// Why a request failed: the figures a user needs to act, taken under the device lock at the moment
/// of failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OomReport {
    /// The device that ran out.
    pub device: usize,
    /// The size asked for, before rounding.
    pub requested: u64,
    /// Total memory of the device.
    pub capacity: u64,
    /// Memory free on the device, all users counted; `None` when the driver could not say
    /// (`cuMemGetInfo` failed: its error is then in `driver_error`).
    pub device_free: Option<u64>,
    /// The configured limit, if any.
    pub limit: Option<u64>,
    /// Bytes in live allocations.
    pub allocated: u64,
    /// Bytes of physical memory tessera holds.
    pub reserved: u64,
    /// `reserved - allocated`: held but not in use.
    pub cached_free: u64,
    /// The largest contiguous free range tessera could hand out without new memory.
    pub largest_free: u64,
    /// Free bytes in pages that also hold live data: no remap can gather them.
    pub stranded: u64,
    /// Bytes freed by the eviction hooks during this request.
    pub hooks_freed: u64,
    /// Hooks called for this request.
    pub hooks_called: u32,
    /// The driver error that ended the attempt, if the device itself refused.
    pub driver_error: Option<String>,
    /// Whether the backend can remap free pages (VMM) or not (legacy segments).
    pub remapping: bool,
    /// Whether a CUDA-graph capture was underway and kept tessera from waiting for streams,
    /// stealing free pages and releasing its cache (each would have invalidated the capture).
    pub capture_underway: bool,
}

impl fmt::Display for OomReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CUDA out of memory. Tried to allocate {} on device {}. Device capacity {} ({})",
            format_bytes(self.requested),
            self.device,
            format_bytes(self.capacity),
            match self.device_free {
                Some(free) => format!("{} free on the device", format_bytes(free)),
                None => "free memory unknown".into(),
            },
        )?;
        match self.limit {
            Some(l) => write!(f, ", tessera limit {}", format_bytes(l))?,
            None => write!(f, ", no tessera limit")?,
        }
        write!(
            f,
            ". tessera holds {} reserved: {} allocated, {} cached free; largest free range {}, {} stranded in partly used {}.",
            format_bytes(self.reserved),
            format_bytes(self.allocated),
            format_bytes(self.cached_free),
            format_bytes(self.largest_free),
            format_bytes(self.stranded),
            if self.remapping { "pages" } else { "segments" },
        )?;
        write!(
            f,
            " {} eviction hook(s) called, freeing {}.",
            self.hooks_called,
            format_bytes(self.hooks_freed)
        )?;
        if let Some(e) = &self.driver_error {
            write!(f, " The driver said: {e}.")?;
        }
        if self.capture_underway {
            write!(
                f,
                " A CUDA graph capture was underway: tessera could not wait for streams, remap \
                 free pages or release its cache without invalidating it, so only new memory and \
                 the capture's own pool could serve the request."
            )?;
        }
        write!(f, " Hint: {}", self.hint())
    }
}

impl OomReport {
    /// What the user can do, chosen from the figures.
    pub fn hint(&self) -> &'static str {
        let ceiling = self.limit.unwrap_or(self.capacity).min(self.capacity);
        if self.capture_underway && self.requested <= ceiling && self.cached_free >= self.requested
        {
            "the cache holds enough free memory, but a capture forbids remapping it; call empty_cache() right before the capture (so that it can map new pages) or capture a smaller graph."
        } else if self.requested > ceiling {
            "the request alone is larger than the device or the limit; split it or use a larger device."
        } else if self.device_free.is_none() {
            "the driver could not say what is free (see its error above); the device may be unusable."
        } else if self
            .limit
            .is_some_and(|l| l < self.capacity && self.reserved + self.requested > l)
        {
            "the tessera limit was reached; raise it (limit / memory fraction) if the device has room."
        } else if self.reserved < ceiling / 2
            && self.device_free.is_some_and(|free| free < self.requested)
        {
            "other processes or allocators hold most of the device; free memory there."
        } else if !self.remapping && self.cached_free >= self.requested {
            "enough memory is cached but split across segments, which the legacy backend cannot remap; use backend:vmm."
        } else if self.stranded >= self.requested {
            "enough memory is free but stranded in partly used pages; free long-lived small tensors or reduce the batch size."
        } else {
            "live tensors fill the device; reduce the batch size or free tensors (e.g. through an eviction hook)."
        }
    }
}
