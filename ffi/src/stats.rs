//! `tessera_stats`: the C view of [`tessera_core::Stats`], a struct that starts with its own size so
//! that it can grow.
//!
//! # Invariants
//! - Fields are only ever added at the end, never reordered or removed: a caller compiled against
//!   an older header passes a smaller `size` and gets exactly the fields it knows.
//! - The library writes `min(caller's size, its size)` bytes, rounded down to whole fields, and
//!   sets `size` to that count.

use super::error::{FfiError, FfiResult};
use tessera_core::Stats;

/// The statistics of one device (see `tessera_get_stats`). Set `size` to `sizeof(tessera_stats)`
/// before the call; every other field is written by the library. All sizes are in bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct tessera_stats {
    /// In: the size of the caller's struct. Out: the bytes the library wrote.
    pub size: u64,
    /// Bytes in live allocations (rounded sizes), now and at the peak.
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
    /// `reserved_bytes - allocated_bytes`.
    pub cached_free_bytes: u64,
    /// The largest request the cache could serve without new memory (remapping included).
    pub largest_free_bytes: u64,
    /// Free bytes in pages that also hold live data: no remap can gather them.
    pub stranded_bytes: u64,
    /// Contiguous mapped runs (or legacy segments) plus small-pool granules.
    pub segments: u64,
    pub mapped_pages: u64,
    /// Pages created and mapped nowhere.
    pub pool_pages: u64,
    /// Allocations and frees since the start.
    pub allocations: u64,
    pub frees: u64,
    /// Bytes allocated since the start; bytes freed since the start are this minus
    /// `allocated_bytes`.
    pub allocated_bytes_total: u64,
    /// Pages unmapped from one place and mapped at another.
    pub remaps: u64,
    /// Times the cache was released to the driver, and the bytes released since the start
    /// (so bytes reserved since the start are `reserved_bytes + released_bytes`).
    pub cache_releases: u64,
    pub released_bytes: u64,
    pub hook_calls: u64,
    pub ooms: u64,
    /// Frees of unknown pointers and double frees (rejected, nothing changed).
    pub invalid_frees: u64,
    /// Driver errors that did not fail an operation.
    pub driver_errors: u64,
    /// The reserved-bytes limit in force (a byte limit, a memory fraction, or the smaller of the
    /// two); `TESSERA_NO_LIMIT` when there is none. (0 is a real limit: no new memory.)
    pub limit_bytes: u64,
    /// The physical page (allocation granularity) tessera maps.
    pub page_size: u64,
    /// Requests that released the cache to the driver and retried before succeeding or failing
    /// (PyTorch's `num_alloc_retries`).
    pub alloc_retries: u64,
    /// 1 while a CUDA-graph capture may be underway (an allocation is routed to a private pool
    /// on some device): tessera then unmaps, releases and waits for nothing. Else 0.
    pub capture_underway: u64,
    /// Private pools of CUDA graphs with uses left on the device, and the bytes of their blocks
    /// (live or free: memory only they may use) and of their live allocations.
    pub private_pools: u64,
    pub private_pool_held_bytes: u64,
    pub private_pool_allocated_bytes: u64,
    /// Free bytes held in thread caches (part of `cached_free_bytes`): served to their own
    /// thread without the device lock; `tessera_empty_cache`, the OOM sequence and thread exit
    /// return them.
    pub thread_cached_bytes: u64,
}

impl tessera_stats {
    fn from_stats(s: &Stats) -> tessera_stats {
        tessera_stats {
            size: std::mem::size_of::<tessera_stats>() as u64,
            allocated_bytes: s.allocated_bytes,
            peak_allocated_bytes: s.peak_allocated_bytes,
            requested_bytes: s.requested_bytes,
            peak_requested_bytes: s.peak_requested_bytes,
            reserved_bytes: s.reserved_bytes,
            peak_reserved_bytes: s.peak_reserved_bytes,
            active_blocks: s.active_blocks,
            peak_active_blocks: s.peak_active_blocks,
            cached_free_bytes: s.cached_free_bytes,
            largest_free_bytes: s.largest_free_bytes,
            stranded_bytes: s.stranded_bytes,
            segments: s.segments,
            mapped_pages: s.mapped_pages,
            pool_pages: s.pool_pages,
            allocations: s.allocations,
            frees: s.frees,
            allocated_bytes_total: s.allocated_bytes_total,
            remaps: s.remaps,
            cache_releases: s.cache_releases,
            released_bytes: s.released_bytes,
            hook_calls: s.hook_calls,
            ooms: s.ooms,
            invalid_frees: s.invalid_frees,
            driver_errors: s.driver_errors,
            limit_bytes: s.limit_bytes.unwrap_or(super::TESSERA_NO_LIMIT),
            page_size: s.page_size,
            alloc_retries: s.alloc_retries,
            capture_underway: u64::from(s.capture_underway),
            private_pools: s.private_pools.len() as u64,
            private_pool_held_bytes: s.private_pools.iter().map(|p| p.held_bytes).sum(),
            private_pool_allocated_bytes: s.private_pools.iter().map(|p| p.allocated_bytes).sum(),
            thread_cached_bytes: s.thread_cached_bytes,
        }
    }
}

/// Writes `stats` into the caller's struct at `out`, as far as its `size` reaches.
///
/// # Safety
/// - `out` is NULL, or points to at least `(*out).size` writable bytes, the first 8 of them
///   readable as a `u64` (the caller's `size`).
pub(crate) unsafe fn write_stats(out: *mut tessera_stats, stats: &Stats) -> FfiResult<()> {
    if out.is_null() {
        return Err(FfiError::invalid_argument("tessera_get_stats: out is NULL"));
    }
    // SAFETY: `out` is non-NULL and its first 8 bytes are readable (the caller's contract);
    // `read_unaligned` because the caller's struct may be in a byte buffer.
    let theirs = unsafe { std::ptr::read_unaligned(out.cast::<u64>()) };
    if theirs < 8 {
        return Err(FfiError::invalid_argument(format!(
            "tessera_get_stats: out->size is {theirs}; set it to sizeof(tessera_stats)"
        )));
    }
    let ours = std::mem::size_of::<tessera_stats>() as u64;
    // Whole fields only: a size that is not a multiple of 8 gets no torn field.
    let n = theirs.min(ours) & !7;
    let mut full = tessera_stats::from_stats(stats);
    full.size = n;
    // SAFETY: `full` is a live `tessera_stats` of `ours >= n` bytes; `out` has `theirs >= n`
    // writable bytes (the caller's contract); the two do not overlap (`full` is on our stack).
    unsafe {
        std::ptr::copy_nonoverlapping(
            (&full as *const tessera_stats).cast::<u8>(),
            out.cast::<u8>(),
            n as usize,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Stats {
        Stats {
            allocated_bytes: 11,
            peak_allocated_bytes: 22,
            page_size: 2 << 20,
            limit_bytes: Some(5),
            ..Stats::default()
        }
    }

    #[test]
    fn a_full_struct_gets_every_field() {
        let mut out = tessera_stats {
            size: std::mem::size_of::<tessera_stats>() as u64,
            ..Default::default()
        };
        // SAFETY: `out` is a whole, writable tessera_stats whose size says so.
        unsafe { write_stats(&mut out, &sample()).unwrap() };
        assert_eq!(out.size, std::mem::size_of::<tessera_stats>() as u64);
        assert_eq!((out.allocated_bytes, out.peak_allocated_bytes), (11, 22));
        assert_eq!((out.page_size, out.limit_bytes), (2 << 20, 5));
    }

    #[test]
    fn an_older_smaller_struct_gets_only_its_fields() {
        // A caller that knows `size` and `allocated_bytes` only, followed by a canary.
        let mut buf = [0xAAu8; 24];
        buf[..8].copy_from_slice(&16u64.to_ne_bytes());
        // SAFETY: `buf` has 16 writable bytes from its start, the first 8 holding the size 16.
        unsafe { write_stats(buf.as_mut_ptr().cast(), &sample()).unwrap() };
        assert_eq!(u64::from_ne_bytes(buf[..8].try_into().unwrap()), 16);
        assert_eq!(u64::from_ne_bytes(buf[8..16].try_into().unwrap()), 11);
        assert_eq!(buf[16..], [0xAA; 8], "wrote past the caller's size");
    }

    #[test]
    fn null_and_too_small_are_errors() {
        // SAFETY: NULL is allowed by the contract.
        assert!(unsafe { write_stats(std::ptr::null_mut(), &sample()) }.is_err());
        let mut out = tessera_stats {
            size: 4,
            ..Default::default()
        };
        // SAFETY: `out` is a whole tessera_stats.
        assert!(unsafe { write_stats(&mut out, &sample()) }.is_err());
    }
}
