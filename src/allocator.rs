//! The front: [`Tessera`] dispatches by device and finds an allocation by pointer alone.
//!
//! # Data structure
//! - One [`DeviceAllocator`] per device, created on first use (`OnceLock`), each behind its own lock.
//! - [`AddressMap`]: which device owns which virtual range or legacy segment, so that a pointer
//!   alone (`free_any`, `record_stream`, `allocation`) finds its device. It changes only on the slow
//!   path (a new reservation or segment), so the hot path never touches it.
//! - [`Hooks`](crate::hooks): the registered eviction hooks, in registration order.
//!
//! # Locking
//! Lock order: a device lock, then the address map's (written under the device lock, read with no
//! device lock held). Hooks are copied out of their lock before they run, and run with no lock held.

use crate::config::Config;
use crate::device::{CaptureFilter, DeviceAllocator, MempoolId};
use crate::driver::{DevicePtr, Driver, Stream};
use crate::error::{Error, Result};
use crate::hooks::{HookId, Hooks};
use crate::stats::{Breakdown, Snapshot, Stats};
use crate::sync::{Arc, AtomicUsize, Mutex, RwLock};
use crate::trace_log::{TraceLog, TRACE_ENV_VAR};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

/// Which device owns which address range.
#[derive(Debug, Default)]
pub(crate) struct AddressMap {
    map: RwLock<BTreeMap<DevicePtr, (u64, usize)>>,
}

impl AddressMap {
    pub(crate) fn insert(&self, base: DevicePtr, size: u64, device: usize) {
        self.map.write().insert(base, (size, device));
    }

    pub(crate) fn remove(&self, base: DevicePtr) {
        self.map.write().remove(&base);
    }

    pub(crate) fn device_of(&self, ptr: DevicePtr) -> Option<usize> {
        let map = self.map.read();
        let (&base, &(size, dev)) = map.range(..=ptr).next_back()?;
        (ptr < base + size).then_some(dev)
    }
}

/// A live allocation, as found by pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Allocation {
    /// The device that owns it.
    pub device: usize,
    /// Start of the allocation holding the pointer.
    pub base: DevicePtr,
    /// Bytes it holds (rounded).
    pub size: u64,
    /// Bytes asked for.
    pub requested: u64,
    /// The stream it was allocated on.
    pub stream: Stream,
}

/// A caching allocator over one driver, for all of that driver's devices.
pub struct Tessera {
    driver: Arc<dyn Driver>,
    config: Config,
    devices: Vec<OnceLock<Arc<DeviceAllocator>>>,
    /// Serializes device creation (the cold path only). A `crate::sync` lock so that a loom model
    /// sees it: a `std` one would block loom's single OS thread for real when a model thread is
    /// switched out while creating a device (its driver calls are loom sync points).
    init: Mutex<()>,
    address_map: Arc<AddressMap>,
    hooks: Arc<Hooks>,
    /// Routes to private pools open on any device (CUDA graphs): while it is non-zero a capture
    /// may be underway, and no device makes a call that would invalidate it (`device/graphs.rs`).
    captures: Arc<AtomicUsize>,
    /// Where every allocation and free is logged (`TESSERA_TRACE`, [`Tessera::trace_to`]).
    trace: OnceLock<TraceLog>,
}

impl fmt::Debug for Tessera {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tessera")
            .field("driver", &self.driver.name())
            .field("devices", &self.devices.len())
            .field("config", &self.config)
            .finish()
    }
}

impl Tessera {
    /// An allocator over `driver`. Devices are set up on first use.
    ///
    /// When the environment variable `TESSERA_TRACE` names a file (`%p` in it becomes the
    /// process id), every allocation and free is written to it in the trace format that
    /// `tessera replay` reads; a file that cannot be created is an [`Error::Config`]. Tools that
    /// make many allocators of their own use [`Tessera::untraced`] instead.
    pub fn new(driver: Arc<dyn Driver>, config: Config) -> Result<Self> {
        let t = Tessera::untraced(driver, config)?;
        match TraceLog::from_env() {
            Ok(Some(log)) => {
                let _ = t.trace.set(log);
            }
            Ok(None) => {}
            Err(e) => {
                return Err(Error::Config(format!(
                    "{TRACE_ENV_VAR}: cannot create: {e}"
                )))
            }
        }
        Ok(t)
    }

    /// As [`Tessera::new`], but `TESSERA_TRACE` is ignored: the replay, which makes an allocator
    /// per replay, uses it so that a trace being recorded is not overwritten by replays.
    pub fn untraced(driver: Arc<dyn Driver>, config: Config) -> Result<Self> {
        config.validate()?;
        let count = driver.device_count()?;
        Ok(Tessera {
            devices: (0..count).map(|_| OnceLock::new()).collect(),
            driver,
            config,
            init: Mutex::new(()),
            address_map: Arc::new(AddressMap::default()),
            hooks: Arc::new(Hooks::default()),
            captures: Arc::new(AtomicUsize::new(0)),
            trace: OnceLock::new(),
        })
    }

    /// Writes every later allocation and free to `path` (created, or truncated) in the trace
    /// format `tessera replay` reads: what `TESSERA_TRACE` does from the start. Allocations made
    /// before are not in the trace, and neither are their frees. Every device's events go to the
    /// one file. Fails when the file cannot be created or a trace is already being written.
    pub fn trace_to(&self, path: &std::path::Path) -> Result<()> {
        let log = TraceLog::open(path)
            .map_err(|e| Error::Config(format!("trace {}: cannot create: {e}", path.display())))?;
        self.trace
            .set(log)
            .map_err(|_| Error::Config("a trace is already being written".into()))
    }

    /// Writes the buffered trace lines to the trace file, if tracing.
    pub fn flush_trace(&self) {
        if let Some(t) = self.trace.get() {
            t.flush();
        }
    }

    /// The trace being written, if any.
    #[cfg(not(loom))] // for `global.rs`, which a loom build leaves out
    pub(crate) fn trace_log(&self) -> Option<&TraceLog> {
        self.trace.get()
    }

    /// [`Tessera::flush_trace`], then every later line is written at once (the process is
    /// exiting: events from later exit handlers still reach the file).
    #[cfg(not(loom))]
    pub(crate) fn flush_trace_for_exit(&self) {
        if let Some(t) = self.trace.get() {
            t.flush_and_write_through();
        }
    }

    /// The driver underneath.
    pub fn driver(&self) -> &Arc<dyn Driver> {
        &self.driver
    }

    /// The configuration it was created with (every device uses it).
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The number of devices the driver reported when the allocator was created.
    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    /// The devices whose allocator exists (used at least once), in order: asking for the others
    /// would create them (and, on a GPU, a CUDA context each).
    pub fn used_devices(&self) -> Vec<usize> {
        (0..self.devices.len())
            .filter(|&d| self.devices[d].get().is_some())
            .collect()
    }

    /// The allocator of `device`, created on first use. Inlined: on the hot path the device exists,
    /// and the (large) `Result` never goes through memory.
    #[inline]
    fn device(&self, device: usize) -> Result<&Arc<DeviceAllocator>> {
        match self.devices.get(device).and_then(OnceLock::get) {
            Some(d) => Ok(d),
            None => self.device_slow(device),
        }
    }

    /// A bad index, or a device used for the first time.
    #[cold]
    #[inline(never)]
    fn device_slow(&self, device: usize) -> Result<&Arc<DeviceAllocator>> {
        let cell = self.devices.get(device).ok_or(Error::InvalidDevice {
            device: device as i64,
            count: self.devices.len(),
        })?;
        if let Some(d) = cell.get() {
            return Ok(d);
        }
        // Creation can fail (a driver error): serialize it, and leave the cell empty on failure
        // so that a later call tries again.
        let _guard = self.init.lock();
        if let Some(d) = cell.get() {
            return Ok(d);
        }
        let d = DeviceAllocator::new(
            device,
            Arc::clone(&self.driver),
            &self.config,
            Arc::clone(&self.address_map),
            Arc::clone(&self.hooks),
            Arc::clone(&self.captures),
        )?;
        Ok(cell.get_or_init(|| Arc::new(d)))
    }

    /// Allocates `size` bytes on `device` for use on `stream`.
    #[inline]
    pub fn allocate(&self, device: usize, size: u64, stream: Stream) -> Result<DevicePtr> {
        let ptr = self.device(device)?.allocate(size, stream)?;
        if let Some(t) = self.trace.get() {
            t.alloc(device, ptr, size, stream);
        }
        Ok(ptr)
    }

    /// Frees an allocation of `device`. An unknown pointer or a double free is an error and
    /// changes nothing.
    #[inline]
    pub fn free(&self, device: usize, ptr: DevicePtr) -> Result<()> {
        let d = self.device(device)?;
        match self.trace.get() {
            None => d.free(ptr).map(|_| ()),
            Some(t) => t.free(device, ptr, || d.free(ptr).map(|_| ())),
        }
    }

    /// Frees an allocation whose device the caller does not know.
    pub fn free_any(&self, ptr: DevicePtr) -> Result<()> {
        let dev = self.device_of(ptr)?;
        self.free(dev, ptr)
    }

    fn device_of(&self, ptr: DevicePtr) -> Result<usize> {
        self.address_map
            .device_of(ptr)
            .ok_or(Error::UnknownPointer {
                ptr,
                device: None,
                interior_of: None,
            })
    }

    /// The live allocation holding `ptr` (which may point inside it).
    pub fn allocation(&self, ptr: DevicePtr) -> Option<Allocation> {
        let dev = self.address_map.device_of(ptr)?;
        let st = self.device(dev).ok()?.state.lock();
        st.user_allocation(ptr)
            .map(|(base, size, requested, owner)| Allocation {
                device: dev,
                base,
                size,
                requested,
                stream: owner.stream,
            })
    }

    /// Marks the allocation at `ptr` as used on `stream` too: its memory is not reused or
    /// unmapped until the work queued on `stream` before its free has finished.
    pub fn record_stream(&self, ptr: DevicePtr, stream: Stream) -> Result<()> {
        let dev = self.device_of(ptr)?;
        let d = self.device(dev)?;
        let me = d.my_cache();
        let mut st = d.state.lock();
        let r = st.record_stream_user(me, ptr, stream);
        st.checked();
        r
    }

    /// Waits for the streams that used freed memory, then releases every fully free page and
    /// segment to the driver. Returns the bytes released.
    pub fn empty_cache(&self, device: usize) -> Result<u64> {
        let d = self.device(device)?;
        let mut st = d.state.lock();
        st.drain_caches();
        st.compact()?;
        let r = st.release_cache();
        st.checked();
        Ok(r?)
    }

    /// `empty_cache` on every device that has been used. A device that fails does not keep the
    /// others from being emptied; the first error is returned after all were tried.
    pub fn empty_cache_all(&self) -> Result<u64> {
        let mut total = 0;
        let mut first_error = None;
        for (i, cell) in self.devices.iter().enumerate() {
            if cell.get().is_some() {
                match self.empty_cache(i) {
                    Ok(n) => total += n,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        first_error.map_or(Ok(total), Err)
    }

    /// Releases what is free and already known to be done on the GPU, without waiting.
    pub fn trim(&self, device: usize) -> Result<u64> {
        let d = self.device(device)?;
        let mut st = d.state.lock();
        st.drain_caches();
        if let Err(e) = st.settle_pending(false) {
            st.c.note_driver_error(&e);
        }
        let r = st.release_cache();
        st.checked();
        Ok(r?)
    }

    /// Gives the calling thread's caches of every used device back (their free blocks to the
    /// pools; their live blocks become ordinary allocations), as the thread's exit does. For a
    /// thread that is done allocating but lives on (a pool's worker, say).
    pub fn flush_thread_cache(&self) {
        for cell in &self.devices {
            if let Some(d) = cell.get() {
                d.flush_thread_cache();
            }
        }
    }

    /// Sets (or clears) a byte limit on the memory `device` may reserve.
    pub fn set_limit(&self, device: usize, limit: Option<u64>) -> Result<()> {
        self.device(device)?.state.lock().limit = limit;
        Ok(())
    }

    /// Limits `device` to a fraction in [0, 1] of its total memory (PyTorch's
    /// `set_per_process_memory_fraction`, which also allows 0: no new memory).
    pub fn set_memory_fraction(&self, device: usize, fraction: f64) -> Result<()> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(Error::Config(format!(
                "memory fraction {fraction} is not in [0, 1]"
            )));
        }
        self.device(device)?.state.lock().fraction = Some(fraction);
        Ok(())
    }

    /// Registers an eviction hook, called (with no lock held) when an allocation would fail.
    pub fn add_oom_hook(&self, hook: impl Fn(usize, u64) + Send + Sync + 'static) -> HookId {
        self.hooks.add(std::sync::Arc::new(hook))
    }

    /// Removes a hook; false if it was not registered. Once this returns, the hook is not running
    /// and is never called again (a hook may remove itself), so whatever it uses may be dropped.
    pub fn remove_oom_hook(&self, id: HookId) -> bool {
        self.hooks.remove(id)
    }

    /// The statistics of `device` now.
    pub fn stats(&self, device: usize) -> Result<Stats> {
        Ok(self.device(device)?.state.lock().stats())
    }

    /// Restarts the peaks of `device` (`peak_*` in [`Stats`]) from the current values.
    pub fn reset_peak_stats(&self, device: usize) -> Result<()> {
        self.device(device)?.state.lock().reset_peak_stats();
        Ok(())
    }

    /// Where every byte `device` reserves is now, by cause ([`Breakdown`]), after the thread
    /// caches' free blocks went back to the pools. Free bytes that share a page with live data and
    /// belong to a stream other than `stream` (when given) are counted apart: a request on
    /// `stream` cannot use them at once.
    pub fn breakdown(&self, device: usize, stream: Option<Stream>) -> Result<Breakdown> {
        let d = self.device(device)?;
        let mut st = d.state.lock();
        st.drain_caches();
        Ok(st.breakdown(stream))
    }

    /// Every segment and block of `device` now, with its statistics, after the thread caches'
    /// free blocks went back to the pools (a block free in a cache would look allocated).
    pub fn snapshot(&self, device: usize) -> Result<Snapshot> {
        let d = self.device(device)?;
        let mut st = d.state.lock();
        st.drain_caches();
        Ok(st.snapshot())
    }

    /// Starts routing allocations on `device` whose stream `filter` accepts to the private pool
    /// `id` (CUDA graphs: PyTorch's `beginAllocateToPool`, called before a capture begins),
    /// creating the pool or adding a use to it (graphs share a pool through `pool=`).
    ///
    /// Until [`Tessera::end_allocate_to_pool`], a capture may be underway: no device of this
    /// allocator records, queries or waits for an event, unmaps or frees, and its driver
    /// allocations run in relaxed capture mode, so that the capture stays valid. The pool's memory
    /// serves only the pool until [`Tessera::release_pool`] drops its last use. `filter` runs
    /// under the device lock: it must not call tessera.
    pub fn begin_allocate_to_pool(
        &self,
        device: usize,
        id: MempoolId,
        filter: CaptureFilter,
    ) -> Result<()> {
        let d = self.device(device)?;
        let mut st = d.state.lock();
        let r = st.begin_pool(id, filter);
        // Seizing every cache makes every later hit see the route (`tcache.rs`): none serves a
        // request the route should take. Their free blocks go back to the pools too.
        st.drain_caches();
        let caches = st.seize(false);
        st.end_seize(caches);
        st.checked();
        r
    }

    /// Stops routing allocations to the private pool `id` (PyTorch's `endAllocateToPool`, called
    /// after the capture ends). The pool keeps its memory and uses.
    pub fn end_allocate_to_pool(&self, device: usize, id: MempoolId) -> Result<()> {
        let d = self.device(device)?;
        let mut st = d.state.lock();
        let r = st.end_pool(id);
        st.checked();
        r
    }

    /// Drops a use of the private pool `id` (PyTorch's `releasePool`, called when a graph is
    /// destroyed). At zero uses its free memory joins the ordinary cache at once, and its live
    /// allocations join it when freed.
    pub fn release_pool(&self, device: usize, id: MempoolId) -> Result<()> {
        let d = self.device(device)?;
        let mut st = d.state.lock();
        let r = st.release_pool(id);
        st.checked();
        r
    }

    /// Checks every invariant of `device`; the message names the first broken one. Every thread
    /// cache is checked in full and its free blocks go back to the pools first.
    pub fn check_invariants(&self, device: usize) -> std::result::Result<(), String> {
        let d = self.device(device).map_err(|e| e.to_string())?;
        let mut st = d.state.lock();
        st.check_all_caches()?;
        st.drain_caches();
        st.check_invariants()
    }
}
