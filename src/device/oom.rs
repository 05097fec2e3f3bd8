//! The OOM sequence: what happens when the cache and new memory cannot serve a request.
//!
//! One function, read top to bottom; the lock is released in exactly one place, around the hooks,
//! and every step says so (contrast a chain of `||`-joined retries whose helpers drop the lock).
//! 0. Every thread cache's free blocks return to the pools (`threads.rs`), and the pools are
//!    tried again: memory a thread caches never makes the device take new pages.
//! 1. Reuse or remap cached pages (the slow path of `grow.rs`): first without waiting, then after
//!    waiting for the streams that hold freed memory back.
//! 2. Release the cache to the driver (others on the GPU may need it, and legacy segments can only
//!    be rebuilt larger after a free) and retry.
//! 3. Drop the lock; call the eviction hooks in order with (device, requested bytes). A hook may
//!    free or allocate through the normal path; an allocation inside a hook never calls the hooks
//!    again (a thread-local flag). Take the lock again, and drain the thread caches again (what
//!    the hooks freed may sit in them).
//! 4. Compact (wait for streams, settle parked frees, retire idle small runs) and retry; if that
//!    fails, release the cache once more and retry. What the hooks freed or the wait settled may
//!    sit in pieces this request cannot take as they are (a legacy segment too small, a page
//!    shared by two streams' free blocks, neighbouring free blocks of two finished streams) but
//!    that releasing merges or gives back whole.
//! 5. Fail with a report that names every figure a user needs to act.
//!
//! A request larger than the limit or the device can never succeed: it skips steps 1, 2 and 4
//! (nothing to gain from emptying the cache), still calls each hook once, and fails.
//!
//! While a capture may be underway (CUDA graphs, `graphs.rs`), only what is legal runs: step 1
//! without waiting (the page pool and new memory, no stealing), the hooks, and a retry after
//! them. Waiting, releasing and the compaction that would unmap wait until the capture ends, and
//! the report says that this is why the request failed (`OomReport::capture_underway`). Whether
//! a capture is underway is asked afresh after the hooks: one may have ended meanwhile.

use super::grow::Shortfall;
use super::{DeviceAllocator, DeviceState};
use crate::driver::{DevicePtr, DriverError};
use crate::error::{Error, OomReport, Result};
use crate::pool::Owner;
use crate::sync::MutexGuard;
use std::cell::Cell;

// `crate::sync`'s: per model thread under loom (see there).
crate::sync::thread_local! {
    /// Set while this thread runs OOM hooks: its own failing allocations skip the hooks.
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// Clears the in-hook flag when the hooks return, panicking or not.
struct HookScope(bool);

impl HookScope {
    fn enter() -> Self {
        HookScope(IN_HOOK.with(|f| f.replace(true)))
    }
}

impl Drop for HookScope {
    fn drop(&mut self) {
        let outer = self.0;
        IN_HOOK.with(|f| f.set(outer));
    }
}

impl DeviceAllocator {
    /// Steps 1–5 above. Called with the lock held after the hot path missed.
    #[cold]
    #[inline(never)]
    pub(crate) fn allocate_or_oom<'a>(
        &'a self,
        mut st: MutexGuard<'a, DeviceState>,
        rounded: u64,
        requested: u64,
        mut owner: Owner,
    ) -> Result<(DevicePtr, MutexGuard<'a, DeviceState>)> {
        // Memory already reserved can serve a request even above a lowered limit.
        let possible =
            |st: &DeviceState| rounded <= st.limit_bytes().max(st.reserved()).min(st.capacity);
        let mut refused = None;
        // Whether this request released the cache and retried (counted once per request, as
        // PyTorch's `num_alloc_retries`).
        let mut retried = false;
        let driver_errors_before = st.c.driver_errors;
        // Whether a capture kept a step from running (the report says so).
        let mut held_by_capture = false;
        // 0. New memory is wanted: first every thread cache's free blocks go back to the pools,
        //    where they merge and serve this request (what they hold never costs a new page).
        //    (Not for a request that can never succeed: that one changes nothing.)
        if possible(&st) && st.drain_caches() > 0 {
            if let Some(p) = st.try_cached(rounded, requested, owner) {
                st.checked();
                return Ok((p, st));
            }
        }
        if possible(&st) {
            // 1. Cached and new pages, stealing fully free ones (not during a capture); no
            //    waiting.
            if let Some(p) = attempt(&mut st, rounded, requested, owner, false, &mut refused)? {
                return Ok((p, st));
            }
            if st.capturing() {
                held_by_capture = true;
            } else {
                // ... and again after waiting for the streams that hold freed memory back.
                if let Some(p) = attempt(&mut st, rounded, requested, owner, true, &mut refused)? {
                    return Ok((p, st));
                }
                // 2. Release the cache to the driver, retry.
                st.release_cache()?;
                st.c.alloc_retries += 1;
                retried = true;
                if let Some(p) = attempt(&mut st, rounded, requested, owner, true, &mut refused)? {
                    return Ok((p, st));
                }
            }
        }
        // 3. Hooks, without the lock.
        let (mut hooks_called, mut hooks_freed) = (0u32, 0u64);
        let in_hook = IN_HOOK.with(Cell::get);
        if !in_hook {
            let hooks = self.hooks.snapshot();
            if !hooks.is_empty() {
                let freed_before = st.user_freed_bytes();
                drop(st);
                {
                    let _scope = HookScope::enter();
                    for hook in &hooks {
                        hooks_called += u32::from(hook.call(self.dev, requested));
                    }
                }
                st = self.state.lock();
                // Routes may have opened or closed while the lock was dropped.
                owner = st.owner_for(owner.stream);
                st.c.hook_calls += u64::from(hooks_called);
                hooks_freed = st.user_freed_bytes().saturating_sub(freed_before);
                st.drain_caches();
            }
        }
        // 4. Compact and retry (asking again: a hook may have raised the limit). During a capture
        //    only the retry: what the hooks freed may serve it.
        if possible(&st) && st.capturing() {
            held_by_capture = true;
            if let Some(p) = attempt(&mut st, rounded, requested, owner, false, &mut refused)? {
                return Ok((p, st));
            }
        } else if possible(&st) {
            st.compact()?;
            if let Some(p) = attempt(&mut st, rounded, requested, owner, true, &mut refused)? {
                return Ok((p, st));
            }
            // (Even when it gives nothing back: releasing first merges the free neighbours of
            // finished streams, which may make a block that fits.) A failure to release ends
            // the request as an OOM, not a driver error: it is counted, and the report names it.
            match st.release_cache() {
                Ok(_) => {
                    if !retried {
                        st.c.alloc_retries += 1;
                    }
                    if let Some(p) =
                        attempt(&mut st, rounded, requested, owner, true, &mut refused)?
                    {
                        return Ok((p, st));
                    }
                }
                Err(e) => st.c.note_driver_error(&e),
            }
        }
        // 5. Fail, saying why; first give back what the failed attempts gathered, so that a
        //    failed request leaves the cache released (others on the device may need it).
        let mut driver_error = refused.map(|e| e.to_string());
        if st.c.driver_errors > driver_errors_before {
            // Fences that could not be had kept freed memory back during this request.
            let fences = format!(
                "{} driver error(s) kept freed memory back, the last: {}",
                st.c.driver_errors - driver_errors_before,
                st.c.last_driver_error.as_deref().unwrap_or("?")
            );
            driver_error = Some(match driver_error {
                Some(d) => format!("{d}; {fences}"),
                None => fences,
            });
        }
        if possible(&st) && !st.capturing() {
            if let Err(e) = st.release_cache() {
                driver_error = Some(match driver_error {
                    Some(d) => format!("{d}; then releasing the cache failed: {e}"),
                    None => format!("releasing the cache failed: {e}"),
                });
            }
        }
        st.c.ooms += 1;
        let mut report = st.oom_report(requested, hooks_called, hooks_freed, driver_error);
        report.capture_underway = held_by_capture;
        st.checked();
        Err(Error::OutOfMemory(Box::new(report)))
    }
}

/// One try of the slow path, with the invariant check after it. "No memory" is `Ok(None)`, the
/// driver's refusal (if it was the driver that refused) kept in `refused` for the report; any
/// other failure ends the sequence.
fn attempt(
    st: &mut DeviceState,
    rounded: u64,
    requested: u64,
    owner: Owner,
    wait: bool,
    refused: &mut Option<DriverError>,
) -> Result<Option<DevicePtr>> {
    let r = st.allocate_slow(rounded, requested, owner, wait);
    st.checked();
    match r {
        Ok(p) => Ok(Some(p)),
        Err(Shortfall::NoMemory(e)) => {
            *refused = e.or(refused.take());
            Ok(None)
        }
        Err(Shortfall::Fatal(e)) => Err(e),
    }
}

impl DeviceState {
    /// Waits for streams, settles parked frees, retires idle small runs. (During a capture only
    /// the last: the waits do nothing then.)
    pub(crate) fn compact(&mut self) -> Result<()> {
        self.drain_released_pools()?;
        self.wait_for_streams()?;
        self.small.reclaim_idle_runs(None);
        self.checked();
        Ok(())
    }

    /// The figures of an OOM error, taken now.
    ///
    /// A failing `cuMemGetInfo` leaves the free figure unknown (never a made-up 0, which would
    /// blame other processes), joins the report's driver error, and is counted in the stats.
    pub(crate) fn oom_report(
        &mut self,
        requested: u64,
        hooks_called: u32,
        hooks_freed: u64,
        mut driver_error: Option<String>,
    ) -> OomReport {
        let device_free = match self.drv.mem_info(self.dev) {
            Ok(m) => Some(m.free),
            Err(e) => {
                self.c.note_driver_error(&e);
                driver_error = Some(match driver_error {
                    Some(d) => format!("{d}; then {e}"),
                    None => e.to_string(),
                });
                None
            }
        };
        let stats = self.stats();
        let limit = self.limit_bytes();
        OomReport {
            device: self.dev,
            requested,
            capacity: self.capacity,
            device_free,
            limit: (limit != u64::MAX).then_some(limit),
            allocated: stats.allocated_bytes,
            reserved: stats.reserved_bytes,
            cached_free: stats.cached_free_bytes,
            largest_free: stats.largest_free_bytes,
            stranded: stats.stranded_bytes,
            hooks_freed,
            hooks_called,
            driver_error,
            remapping: self.backend == crate::config::Backend::Vmm,
            capture_underway: false,
        }
    }
}
