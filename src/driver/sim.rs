//! [`SimDriver`]: a GPU emulated in host virtual memory, for tests and trace replay.
//!
//! # The data
//! One [`Mutex`] guards a `State`: call counters (one per [`Call`]), injected faults, the counter
//! that names handles and events, and one `Device` per simulated device. A `Device` holds:
//! - `reservations` (`va -> size`) and `mappings` (`va -> {size, handle}`), both sorted by address;
//! - `accessible`: the set of address ranges granted access by `set_access`;
//! - `handles` (`id -> {size, offset, released, maps}`): physical allocations, and `legacy`
//!   (`ptr -> {size, len}`): `alloc_legacy` allocations;
//! - `events` (`id -> pending (stream, sequence) or complete`) and the set of `held` streams;
//! - `captures`: the streams capturing and the events recorded inside a capture (`capture.rs`,
//!   which also holds the capture calls and the rules for potentially unsafe calls);
//! - byte counters (`physical`, `legacy_bytes`, `external`) for capacity accounting;
//! - the backing: with [`Backing::Real`], one memfd per device (created on first use) whose offsets
//!   are handed out by an extent allocator; with [`Backing::Bookkeeping`], a range of fake addresses
//!   handed out by the same kind of allocator.
//!
//! With real backing, device addresses are host addresses: a reservation is a `PROT_NONE` anonymous
//! mapping, a mapping replaces part of it with the handle's slice of the memfd (still `PROT_NONE`),
//! `set_access` makes it read/write, and unmapping puts fresh `PROT_NONE` space back. Two mappings
//! of one handle share its pages, so data survives a remap. Pages are allocated when first touched
//! and are punched out of the memfd when the handle is freed.
//!
//! # Invariants (between calls)
//! - Reservations are disjoint. Every mapping lies inside one reservation, mappings are disjoint,
//!   and every mapping names a handle in `handles` whose size equals the mapping's size.
//! - `handles[h].maps` is the number of mappings naming `h`; a handle is in `handles` until it is
//!   released *and* unmapped, and `physical` is the sum of the sizes of the handles in `handles`.
//! - `accessible` lies inside the union of mappings; with real backing exactly those pages are
//!   read/write and every other page of a reservation is `PROT_NONE`.
//! - `legacy_bytes` is the sum of the requested sizes in `legacy`.
//! - A pending event's stream is or was held; a stream that is not held has no pending events.
//! - The host memory named by the tables belongs to this driver alone; `Drop` unmaps all of it.
//!
//! A call checks every rule (the capture rules first: `capture.rs`) before it changes anything, so
//! a failed call (a broken rule, an injected fault, a failed host syscall) leaves the state as it
//! was, except that a call refused for a capture invalidates that capture.
//!
//! # Locking rule
//! Every method takes the one mutex once, for its whole duration, and calls nothing outside this
//! module while holding it (host syscalls only). There is no other lock, so no lock order.

mod capture;
#[cfg(test)]
mod capture_tests;
mod config;
mod host;
mod log;
mod tables;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::os::fd::OwnedFd;

use rand::rngs::SmallRng;
use rand::SeedableRng;

use super::{
    Call, CaptureInfo, CaptureMode, CudaError, DevicePtr, Driver, DriverError, DriverResult, Event,
    MemInfo, PhysHandle, Stream,
};
use crate::bytes::format_bytes;
use crate::sync::{current_thread_id, Mutex, MutexGuard, ThreadId};
use tables::{align_up, default_fault, Extents, Faults};

pub use config::{Backing, SimConfig, MAX_DEVICES};
pub use log::{MemoryEvent, MemoryOp};
pub(crate) use tables::RangeSet;

/// The simulated driver. See the module documentation.
pub struct SimDriver {
    config: SimConfig,
    /// Set when the configuration is unusable: every driver call then fails with
    /// `CUDA_ERROR_NOT_INITIALIZED` and this detail.
    problem: Option<String>,
    state: Mutex<State>,
}

struct State {
    devices: Vec<Device>,
    counters: [u64; Call::ALL.len()],
    faults: Faults,
    /// The last handle, event or capture id given out (ids start at 1).
    last_id: u64,
    /// Each thread's capture interaction mode (`exchange_capture_mode`); absent: `Global`.
    thread_modes: HashMap<ThreadId, CaptureMode>,
    /// The memory log, while it is on (`log_memory`).
    memory_log: Option<Vec<MemoryEvent>>,
}

#[derive(Clone, Copy)]
struct Mapping {
    size: u64,
    handle: u64,
}

#[derive(Clone, Copy)]
struct Handle {
    size: u64,
    /// Offset in the device's memfd (real backing; 0 otherwise).
    offset: u64,
    released: bool,
    maps: u32,
}

#[derive(Clone, Copy)]
struct Legacy {
    size: u64,
    /// Bytes actually mapped (or taken from the fake range): `size` rounded up to the page.
    len: u64,
}

struct Device {
    physical: u64,
    legacy_bytes: u64,
    /// The most `in_use()` has been since the last `reset_peak_bytes_in_use`.
    peak: u64,
    external: u64,
    reservations: BTreeMap<u64, u64>,
    mappings: BTreeMap<u64, Mapping>,
    accessible: RangeSet,
    handles: HashMap<u64, Handle>,
    legacy: HashMap<u64, Legacy>,
    /// `None` when complete; `Some((stream, sequence))` while pending.
    events: HashMap<u64, Option<(u64, u64)>>,
    held: HashSet<u64>,
    seq: u64,
    captures: capture::Captures,
    /// Real backing: the memfd (created on first `create_physical`) and its length.
    memfd: Option<(OwnedFd, u64)>,
    /// Real backing: memfd offsets. Bookkeeping: fake addresses.
    extents: Extents,
}

const FAKE_BASE: u64 = 0x7e00_0000_0000;
const FAKE_SPAN: u64 = 1 << 44;
const FAKE_PAGE: u64 = 4096;

impl Device {
    fn new(index: usize, backing: Backing) -> Device {
        let extents = match backing {
            Backing::Real => Extents::new(0, i64::MAX as u64),
            Backing::Bookkeeping => {
                let base = FAKE_BASE.saturating_add((index as u64).saturating_mul(FAKE_SPAN));
                Extents::new(base, base.saturating_add(FAKE_SPAN))
            }
        };
        Device {
            physical: 0,
            legacy_bytes: 0,
            peak: 0,
            external: 0,
            reservations: BTreeMap::new(),
            mappings: BTreeMap::new(),
            accessible: RangeSet::default(),
            handles: HashMap::new(),
            legacy: HashMap::new(),
            events: HashMap::new(),
            held: HashSet::new(),
            seq: 0,
            captures: capture::Captures::default(),
            memfd: None,
            extents,
        }
    }

    fn in_use(&self) -> u64 {
        self.physical.saturating_add(self.legacy_bytes)
    }

    /// Called after every increase of `in_use()`.
    fn note_peak(&mut self) {
        self.peak = self.peak.max(self.in_use());
    }

    /// `Err(detail)` when `size` more bytes would exceed the capacity.
    fn check_fits(&self, size: u64, capacity: u64) -> Result<(), String> {
        let used = self.in_use().saturating_add(self.external);
        if used.checked_add(size).is_some_and(|t| t <= capacity) {
            return Ok(());
        }
        Err(format!(
            "{} requested, {} of {} in use",
            format_bytes(size),
            format_bytes(used),
            format_bytes(capacity)
        ))
    }

    fn inside_reservation(&self, va: u64, end: u64) -> bool {
        self.reservations
            .range(..=va)
            .next_back()
            .is_some_and(|(&r, &size)| end <= r + size)
    }

    fn overlaps_mapping(&self, va: u64, end: u64) -> bool {
        self.mappings
            .range(..end)
            .next_back()
            .is_some_and(|(&m, map)| m + map.size > va)
    }

    /// The starts of the mappings that exactly tile `[va, end)`, or `None`.
    fn whole_mappings(&self, va: u64, end: u64) -> Option<Vec<u64>> {
        let mut cursor = va;
        let mut starts = Vec::new();
        for (&m, map) in self.mappings.range(va..end) {
            if m != cursor {
                return None;
            }
            cursor = m + map.size;
            starts.push(m);
        }
        (cursor == end).then_some(starts)
    }

    /// Whether every byte of `[va, end)` is mapped.
    fn fully_mapped(&self, va: u64, end: u64) -> bool {
        let mut cursor = match self.mappings.range(..=va).next_back() {
            Some((&m, map)) if m + map.size > va => m + map.size,
            _ => return false,
        };
        while cursor < end {
            match self.mappings.get(&cursor) {
                Some(map) => cursor += map.size,
                None => return false,
            }
        }
        true
    }

    /// Frees the handle's memory if it is released and no longer mapped.
    fn collect(&mut self, id: u64) {
        let Some(h) = self.handles.get(&id).copied() else {
            return;
        };
        if !h.released || h.maps > 0 {
            return;
        }
        self.handles.remove(&id);
        self.physical = self.physical.saturating_sub(h.size);
        if let Some((fd, len)) = &mut self.memfd {
            // Host memory only; a failure leaves pages allocated, which no rule can observe.
            let _ = host::punch_hole(fd, h.offset, h.size);
            self.extents.release(h.offset, h.size);
            if self.extents.end < *len && host::set_len(fd, self.extents.end).is_ok() {
                *len = self.extents.end;
            }
        }
    }

    fn complete(&mut self, stream: u64, up_to: u64) {
        for e in self.events.values_mut() {
            if matches!(*e, Some((s, q)) if s == stream && q <= up_to) {
                *e = None;
            }
        }
    }
}

fn fail(call: Call, error: CudaError, device: usize, detail: impl Into<String>) -> DriverError {
    DriverError::new(call, error, Some(device)).with_detail(detail)
}

/// Appends to the memory log, when it is on.
fn log(st: &mut State, device: usize, op: MemoryOp, va: DevicePtr, size: u64) {
    if let Some(log) = &mut st.memory_log {
        log.push(MemoryEvent {
            device,
            op,
            va,
            size,
        });
    }
}

fn device_mut(st: &mut State, call: Call, device: usize) -> DriverResult<&mut Device> {
    let count = st.devices.len();
    st.devices.get_mut(device).ok_or_else(|| {
        fail(
            call,
            CudaError::InvalidDevice,
            device,
            format!("{count} device(s) present"),
        )
    })
}

impl SimDriver {
    /// A simulated machine. Never fails: a bad configuration makes every call fail instead.
    pub fn new(config: SimConfig) -> SimDriver {
        let problem = config.problem().map(|p| format!("invalid SimConfig: {p}"));
        let count = if problem.is_some() { 0 } else { config.devices };
        let devices = (0..count).map(|i| Device::new(i, config.backing)).collect();
        SimDriver {
            problem,
            state: Mutex::new(State {
                devices,
                counters: [0; Call::ALL.len()],
                faults: Faults::default(),
                last_id: 0,
                thread_modes: HashMap::new(),
                memory_log: None,
            }),
            config,
        }
    }

    /// One device of `capacity` bytes, other settings default.
    pub fn with_capacity(capacity: u64) -> SimDriver {
        SimDriver::new(SimConfig {
            capacity,
            ..SimConfig::default()
        })
    }

    /// The configuration it was created with (as given, even when unusable).
    pub fn config(&self) -> &SimConfig {
        &self.config
    }

    /// Locks the state, counts the call, and fails it if a fault fires or the config is bad.
    fn enter(&self, call: Call, device: Option<usize>) -> DriverResult<MutexGuard<'_, State>> {
        let mut st = self.state.lock();
        st.counters[call.index()] += 1;
        if let Some(error) = st.faults.check(call) {
            return Err(DriverError::new(call, error, device).with_detail("injected fault"));
        }
        if let Some(p) = &self.problem {
            return Err(
                DriverError::new(call, CudaError::NotInitialized, device).with_detail(p.clone())
            );
        }
        Ok(st)
    }

    /// That `[va, va + len)` is accessible device memory with host memory behind it, so that a
    /// copy or memset may touch it.
    fn check_host_range(
        &self,
        st: &State,
        call: Call,
        device: usize,
        va: DevicePtr,
        len: u64,
    ) -> DriverResult<()> {
        let d = st.devices.get(device).ok_or_else(|| {
            fail(
                call,
                CudaError::InvalidDevice,
                device,
                "no such device".to_string(),
            )
        })?;
        if self.config.backing != Backing::Real {
            return Err(fail(
                call,
                CudaError::NotSupported,
                device,
                "the simulated device has no memory behind it (bookkeeping backing)".to_string(),
            ));
        }
        let end = va.checked_add(len).ok_or_else(|| {
            fail(
                call,
                CudaError::InvalidValue,
                device,
                "the range wraps around".to_string(),
            )
        })?;
        let in_legacy_block = d.legacy.iter().any(|(&p, l)| va >= p && end <= p + l.size);
        if len > 0 && !(d.accessible.covers(va, end) || in_legacy_block) {
            return Err(fail(
                call,
                CudaError::IllegalAddress,
                device,
                format!("[{va:#x}, {end:#x}) is not accessible device memory"),
            ));
        }
        Ok(())
    }

    fn check_vmm(&self, call: Call, device: usize) -> DriverResult<()> {
        if self.config.vmm {
            Ok(())
        } else {
            Err(fail(
                call,
                CudaError::NotSupported,
                device,
                "virtual memory management is off (vmm:false)",
            ))
        }
    }

    /// `size` positive and a multiple of the granularity, `va` aligned, no overflow: the range's end.
    fn check_range(&self, call: Call, device: usize, va: u64, size: u64) -> DriverResult<u64> {
        let g = self.config.granularity;
        if size == 0 || size & (g - 1) != 0 {
            return Err(fail(
                call,
                CudaError::InvalidValue,
                device,
                format!("size {size} is not a positive multiple of the granularity {g}"),
            ));
        }
        if va & (g - 1) != 0 {
            return Err(fail(
                call,
                CudaError::InvalidValue,
                device,
                format!("address {va:#x} is not aligned to the granularity {g}"),
            ));
        }
        va.checked_add(size).ok_or_else(|| {
            fail(
                call,
                CudaError::InvalidValue,
                device,
                "range wraps around the address space",
            )
        })
    }

    fn with_device<T>(&self, device: usize, f: impl FnOnce(&mut Device) -> T) -> Option<T> {
        self.state.lock().devices.get_mut(device).map(f)
    }

    // ---- Knobs ----

    /// Another process takes `bytes` of the device (replacing the previous amount). Ignored for a
    /// bad device.
    pub fn set_external_usage(&self, device: usize, bytes: u64) {
        self.with_device(device, |d| d.external = bytes);
    }

    /// The most physical memory (VMM and legacy, not external usage) the device has held since it
    /// was created or since the last [`SimDriver::reset_peak_bytes_in_use`]; 0 for a bad device.
    /// The replay reads its peaks here, exact without a query after every allocation.
    pub fn peak_bytes_in_use(&self, device: usize) -> u64 {
        self.with_device(device, |d| d.peak).unwrap_or(0)
    }

    /// Starts a new peak window: the peak becomes the bytes in use now. Ignored for a bad device.
    pub fn reset_peak_bytes_in_use(&self, device: usize) {
        self.with_device(device, |d| d.peak = d.in_use());
    }

    /// The `n`-th call of kind `call` from now on (1-based; 0 is taken as 1) fails, once, with the
    /// default error for the call (`OUT_OF_MEMORY` for allocating calls, else `UNKNOWN`).
    pub fn fail_nth(&self, call: Call, n: u64) {
        self.fail_nth_with(call, n, default_fault(call));
    }

    /// As [`fail_nth`](Self::fail_nth), with the given error.
    pub fn fail_nth_with(&self, call: Call, n: u64, error: CudaError) {
        self.state.lock().faults.nth.push((call, n.max(1), error));
    }

    /// Every call of kind `call` (every call when `None`) fails with probability `p`, drawn from a
    /// generator seeded with `seed`. Replaces an earlier setting for the same `call`.
    pub fn fail_with_probability(&self, call: Option<Call>, p: f64, seed: u64) {
        let mut st = self.state.lock();
        st.faults.random.retain(|f| f.0 != call);
        st.faults
            .random
            .push((call, p, SmallRng::seed_from_u64(seed)));
    }

    /// Removes every injected fault.
    pub fn clear_faults(&self) {
        self.state.lock().faults = Faults::default();
    }

    /// How many calls of this kind were made (failed ones included) since the last reset.
    pub fn calls(&self, call: Call) -> u64 {
        self.state.lock().counters[call.index()]
    }

    /// Non-zero call counts, in [`Call::ALL`] order.
    pub fn call_counts(&self) -> Vec<(Call, u64)> {
        let st = self.state.lock();
        Call::ALL
            .iter()
            .map(|&c| (c, st.counters[c.index()]))
            .filter(|&(_, n)| n > 0)
            .collect()
    }

    /// Turns the memory log (see `log.rs`) on, emptied, or off.
    pub fn log_memory(&self, on: bool) {
        self.state.lock().memory_log = on.then(Vec::new);
    }

    /// The memory logged since the last call (empty when logging is off).
    pub fn take_memory_log(&self) -> Vec<MemoryEvent> {
        self.state
            .lock()
            .memory_log
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Sets every call counter back to 0.
    pub fn reset_counters(&self) {
        self.state.lock().counters = [0; Call::ALL.len()];
    }

    // ---- Streams ----

    /// From now on events recorded on `stream` stay pending until released, completed or synchronized.
    pub fn hold_stream(&self, device: usize, stream: Stream) {
        self.with_device(device, |d| d.held.insert(stream.0));
    }

    /// Completes the stream's pending events and stops holding it.
    pub fn release_stream(&self, device: usize, stream: Stream) {
        self.with_device(device, |d| {
            d.complete(stream.0, u64::MAX);
            d.held.remove(&stream.0);
        });
    }

    /// Completes the stream's pending events; the stream stays held.
    pub fn complete_stream(&self, device: usize, stream: Stream) {
        self.with_device(device, |d| d.complete(stream.0, u64::MAX));
    }

    /// Events recorded and not yet complete (0 for a bad device).
    pub fn pending_events(&self, device: usize) -> usize {
        self.with_device(device, |d| {
            d.events.values().filter(|e| e.is_some()).count()
        })
        .unwrap_or(0)
    }

    // ---- Inspection (0 or false for a bad device) ----

    /// Virtual ranges reserved and not yet freed.
    pub fn live_reservations(&self, device: usize) -> usize {
        self.with_device(device, |d| d.reservations.len())
            .unwrap_or(0)
    }

    /// Mappings in place (one per `map` not yet unmapped).
    pub fn live_mappings(&self, device: usize) -> usize {
        self.with_device(device, |d| d.mappings.len()).unwrap_or(0)
    }

    /// Physical handles not yet freed (a released handle counts while still mapped).
    pub fn live_handles(&self, device: usize) -> usize {
        self.with_device(device, |d| d.handles.len()).unwrap_or(0)
    }

    /// `alloc_legacy` allocations not yet freed.
    pub fn live_legacy(&self, device: usize) -> usize {
        self.with_device(device, |d| d.legacy.len()).unwrap_or(0)
    }

    /// Events created and not yet destroyed, pending or complete.
    pub fn live_events(&self, device: usize) -> usize {
        self.with_device(device, |d| d.events.len()).unwrap_or(0)
    }

    /// Whether `va` lies in a mapping or a legacy allocation.
    pub fn is_mapped(&self, device: usize, va: DevicePtr) -> bool {
        self.with_device(device, |d| {
            d.overlaps_mapping(va, va.saturating_add(1)) || in_legacy(d, va)
        })
        .unwrap_or(false)
    }

    /// Whether `va` may be read and written: granted by `set_access`, or in a legacy allocation.
    pub fn is_accessible(&self, device: usize, va: DevicePtr) -> bool {
        self.with_device(device, |d| d.accessible.contains(va) || in_legacy(d, va))
            .unwrap_or(false)
    }
}

fn in_legacy(d: &Device, va: u64) -> bool {
    d.legacy.iter().any(|(&p, l)| va >= p && va - p < l.size)
}

impl fmt::Debug for SimDriver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimDriver")
            .field("config", &self.config.to_string())
            .field("problem", &self.problem)
            .finish_non_exhaustive()
    }
}

impl Driver for SimDriver {
    fn name(&self) -> &'static str {
        "sim"
    }

    fn device_count(&self) -> DriverResult<usize> {
        Ok(self.enter(Call::DeviceCount, None)?.devices.len())
    }

    fn supports_vmm(&self, device: usize) -> DriverResult<bool> {
        let count = self.state.lock().devices.len();
        if device >= count {
            return Err(fail(
                Call::Granularity,
                CudaError::InvalidDevice,
                device,
                format!("supports_vmm: {count} device(s) present"),
            ));
        }
        Ok(self.config.vmm)
    }

    fn granularity(&self, device: usize) -> DriverResult<u64> {
        let mut st = self.enter(Call::Granularity, Some(device))?;
        device_mut(&mut st, Call::Granularity, device)?;
        Ok(self.config.granularity)
    }

    fn mem_info(&self, device: usize) -> DriverResult<MemInfo> {
        let mut st = self.enter(Call::MemInfo, Some(device))?;
        let d = device_mut(&mut st, Call::MemInfo, device)?;
        let total = self.config.capacity;
        let free = total.saturating_sub(d.in_use().saturating_add(d.external));
        Ok(MemInfo { free, total })
    }

    fn bytes_in_use(&self, device: usize) -> u64 {
        self.with_device(device, |d| d.in_use()).unwrap_or(0)
    }

    fn alloc_legacy(&self, device: usize, size: u64) -> DriverResult<DevicePtr> {
        const C: Call = Call::AllocLegacy;
        let mut st = self.enter(C, Some(device))?;
        capture::check_unsafe_call(&mut st, C, device)?;
        let d = device_mut(&mut st, C, device)?;
        if size == 0 {
            return Err(fail(C, CudaError::InvalidValue, device, "size 0"));
        }
        let oom = |why: String| fail(C, CudaError::OutOfMemory, device, why);
        d.check_fits(size, self.config.capacity).map_err(oom)?;
        let ptr = match self.config.backing {
            Backing::Real => {
                let len = align_up(size, host::page_size())
                    .ok_or_else(|| oom("size too large".into()))?;
                (
                    host::alloc_rw(len).map_err(|e| oom(format!("host mmap: {e}")))?,
                    len,
                )
            }
            Backing::Bookkeeping => {
                let len = align_up(size, FAKE_PAGE).ok_or_else(|| oom("size too large".into()))?;
                (
                    d.extents
                        .alloc(len, FAKE_PAGE)
                        .ok_or_else(|| oom("fake address space exhausted".into()))?,
                    len,
                )
            }
        };
        d.legacy.insert(ptr.0, Legacy { size, len: ptr.1 });
        d.legacy_bytes += size;
        d.note_peak();
        log(&mut st, device, MemoryOp::Alloc, ptr.0, size);
        Ok(ptr.0)
    }

    fn free_legacy(&self, device: usize, ptr: DevicePtr) -> DriverResult<()> {
        const C: Call = Call::FreeLegacy;
        let mut st = self.enter(C, Some(device))?;
        capture::check_unsafe_call(&mut st, C, device)?;
        let d = device_mut(&mut st, C, device)?;
        let Some(l) = d.legacy.get(&ptr).copied() else {
            return Err(fail(
                C,
                CudaError::InvalidValue,
                device,
                format!("{ptr:#x} is not a live alloc_legacy pointer"),
            ));
        };
        match self.config.backing {
            // SAFETY: the legacy table says [ptr, ptr + len) is a mapping this driver made and owns.
            Backing::Real => unsafe { host::release(ptr, l.len) }
                .map_err(|e| fail(C, CudaError::Unknown, device, format!("host munmap: {e}")))?,
            Backing::Bookkeeping => d.extents.release(ptr, l.len),
        }
        d.legacy.remove(&ptr);
        d.legacy_bytes = d.legacy_bytes.saturating_sub(l.size);
        log(&mut st, device, MemoryOp::Free, ptr, l.size);
        Ok(())
    }

    fn reserve(&self, device: usize, size: u64, align: u64) -> DriverResult<DevicePtr> {
        const C: Call = Call::Reserve;
        let mut st = self.enter(C, Some(device))?;
        capture::check_unsafe_call(&mut st, C, device)?;
        let d = device_mut(&mut st, C, device)?;
        self.check_vmm(C, device)?;
        self.check_range(C, device, 0, size)?;
        if align != 0 && !align.is_power_of_two() {
            return Err(fail(
                C,
                CudaError::InvalidValue,
                device,
                format!("alignment {align} is not a power of two"),
            ));
        }
        let align = align.max(self.config.granularity);
        let oom = |why: String| fail(C, CudaError::OutOfMemory, device, why);
        let va = match self.config.backing {
            Backing::Real => {
                host::reserve(size, align).map_err(|e| oom(format!("host mmap: {e}")))?
            }
            Backing::Bookkeeping => d
                .extents
                .alloc(size, align)
                .ok_or_else(|| oom("fake address space exhausted".into()))?,
        };
        d.reservations.insert(va, size);
        Ok(va)
    }

    fn free_reservation(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()> {
        const C: Call = Call::FreeReservation;
        let mut st = self.enter(C, Some(device))?;
        capture::check_unsafe_call(&mut st, C, device)?;
        let d = device_mut(&mut st, C, device)?;
        self.check_vmm(C, device)?;
        let inval = |why: String| fail(C, CudaError::InvalidValue, device, why);
        match d.reservations.get(&va) {
            None => {
                return Err(inval(format!(
                    "{va:#x} is not the start of a live reservation"
                )))
            }
            Some(&s) if s != size => {
                return Err(inval(format!(
                    "size {size} is not the reservation's size {s}"
                )))
            }
            Some(_) => {}
        }
        if d.overlaps_mapping(va, va + size) {
            return Err(inval("the reservation still has mappings".into()));
        }
        match self.config.backing {
            // SAFETY: the reservation table says [va, va + size) is address space this driver reserved,
            // and nothing is mapped in it any more.
            Backing::Real => unsafe { host::release(va, size) }
                .map_err(|e| fail(C, CudaError::Unknown, device, format!("host munmap: {e}")))?,
            Backing::Bookkeeping => d.extents.release(va, size),
        }
        d.reservations.remove(&va);
        Ok(())
    }

    fn create_physical(&self, device: usize, size: u64) -> DriverResult<PhysHandle> {
        const C: Call = Call::CreatePhysical;
        let mut st = self.enter(C, Some(device))?;
        capture::check_unsafe_call(&mut st, C, device)?;
        let id = st.last_id + 1;
        let d = device_mut(&mut st, C, device)?;
        self.check_vmm(C, device)?;
        self.check_range(C, device, 0, size)?;
        let oom = |why: String| fail(C, CudaError::OutOfMemory, device, why);
        d.check_fits(size, self.config.capacity).map_err(oom)?;
        let mut offset = 0;
        if self.config.backing == Backing::Real {
            if d.memfd.is_none() {
                let fd = host::memfd(c"tessera-sim")
                    .map_err(|e| oom(format!("host memfd_create: {e}")))?;
                d.memfd = Some((fd, 0));
            }
            offset = d
                .extents
                .alloc(size, self.config.granularity)
                .ok_or_else(|| oom("memfd offsets exhausted".into()))?;
            if let Some((fd, len)) = &mut d.memfd {
                if d.extents.end > *len {
                    if let Err(e) = host::set_len(fd, d.extents.end) {
                        d.extents.release(offset, size);
                        return Err(oom(format!("host ftruncate: {e}")));
                    }
                    *len = d.extents.end;
                }
            }
        }
        d.handles.insert(
            id,
            Handle {
                size,
                offset,
                released: false,
                maps: 0,
            },
        );
        d.physical += size;
        d.note_peak();
        st.last_id = id;
        Ok(PhysHandle(id))
    }

    fn release_physical(&self, device: usize, handle: PhysHandle) -> DriverResult<()> {
        const C: Call = Call::ReleasePhysical;
        let mut st = self.enter(C, Some(device))?;
        capture::check_unsafe_call(&mut st, C, device)?;
        let d = device_mut(&mut st, C, device)?;
        self.check_vmm(C, device)?;
        match d.handles.get_mut(&handle.0) {
            Some(h) if !h.released => h.released = true,
            _ => {
                return Err(fail(
                    C,
                    CudaError::InvalidHandle,
                    device,
                    format!("handle {} is unknown or released", handle.0),
                ))
            }
        }
        d.collect(handle.0);
        Ok(())
    }

    fn map(&self, device: usize, va: DevicePtr, size: u64, handle: PhysHandle) -> DriverResult<()> {
        const C: Call = Call::Map;
        let mut st = self.enter(C, Some(device))?;
        capture::check_unsafe_call(&mut st, C, device)?;
        let d = device_mut(&mut st, C, device)?;
        self.check_vmm(C, device)?;
        let end = self.check_range(C, device, va, size)?;
        let h = match d.handles.get(&handle.0) {
            Some(h) if !h.released => *h,
            _ => {
                return Err(fail(
                    C,
                    CudaError::InvalidHandle,
                    device,
                    format!("handle {} is unknown or released", handle.0),
                ))
            }
        };
        let inval = |why: String| fail(C, CudaError::InvalidValue, device, why);
        if h.size != size {
            return Err(inval(format!(
                "size {size} is not the handle's size {}",
                h.size
            )));
        }
        if !d.inside_reservation(va, end) {
            return Err(inval(format!(
                "[{va:#x}, {end:#x}) is not inside a live reservation"
            )));
        }
        if d.overlaps_mapping(va, end) {
            return Err(inval(format!(
                "[{va:#x}, {end:#x}) overlaps a live mapping"
            )));
        }
        if let Some((fd, _)) = &d.memfd {
            // SAFETY: [va, end) lies inside a reservation this driver owns and overlaps no mapping
            // (both checked just above); the file range is the handle's own slice of the memfd.
            unsafe { host::map_shared(va, size, fd, h.offset) }
                .map_err(|e| fail(C, CudaError::OutOfMemory, device, format!("host mmap: {e}")))?;
        }
        d.mappings.insert(
            va,
            Mapping {
                size,
                handle: handle.0,
            },
        );
        if let Some(h) = d.handles.get_mut(&handle.0) {
            h.maps = h.maps.saturating_add(1);
        }
        log(&mut st, device, MemoryOp::Map, va, size);
        Ok(())
    }

    fn unmap(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()> {
        const C: Call = Call::Unmap;
        let mut st = self.enter(C, Some(device))?;
        capture::check_unsafe_call(&mut st, C, device)?;
        let d = device_mut(&mut st, C, device)?;
        self.check_vmm(C, device)?;
        let end = self.check_range(C, device, va, size)?;
        let Some(starts) = d.whole_mappings(va, end) else {
            return Err(fail(
                C,
                CudaError::InvalidValue,
                device,
                format!("[{va:#x}, {end:#x}) does not cover whole mappings"),
            ));
        };
        if self.config.backing == Backing::Real {
            // SAFETY: [va, end) is exactly a run of this driver's mappings, inside its reservations.
            unsafe { host::unmap_to_reserved(va, size) }
                .map_err(|e| fail(C, CudaError::Unknown, device, format!("host mmap: {e}")))?;
        }
        d.accessible.remove(va, end);
        for m in starts {
            if let Some(map) = d.mappings.remove(&m) {
                if let Some(h) = d.handles.get_mut(&map.handle) {
                    h.maps = h.maps.saturating_sub(1);
                }
                d.collect(map.handle);
            }
        }
        log(&mut st, device, MemoryOp::Unmap, va, size);
        Ok(())
    }

    fn set_access(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()> {
        const C: Call = Call::SetAccess;
        let mut st = self.enter(C, Some(device))?;
        capture::check_unsafe_call(&mut st, C, device)?;
        let d = device_mut(&mut st, C, device)?;
        self.check_vmm(C, device)?;
        let end = self.check_range(C, device, va, size)?;
        if !d.fully_mapped(va, end) {
            return Err(fail(
                C,
                CudaError::InvalidValue,
                device,
                format!("[{va:#x}, {end:#x}) is not fully mapped"),
            ));
        }
        if self.config.backing == Backing::Real {
            // SAFETY: [va, end) is fully covered by this driver's mappings (checked just above).
            unsafe { host::protect_rw(va, size) }
                .map_err(|e| fail(C, CudaError::Unknown, device, format!("host mprotect: {e}")))?;
        }
        d.accessible.insert(va, end);
        Ok(())
    }

    fn event_create(&self, device: usize) -> DriverResult<Event> {
        const C: Call = Call::EventCreate;
        let mut st = self.enter(C, Some(device))?;
        let id = st.last_id + 1;
        device_mut(&mut st, C, device)?.events.insert(id, None);
        st.last_id = id;
        Ok(Event(id))
    }

    fn event_record(&self, device: usize, event: Event, stream: Stream) -> DriverResult<()> {
        const C: Call = Call::EventRecord;
        let mut st = self.enter(C, Some(device))?;
        capture::captured_work(&st, C, device, stream)?;
        let d = device_mut(&mut st, C, device)?;
        check_event(d, C, device, event)?;
        if d.captures
            .record(event.0, stream.0)
            .map_err(|(e, why)| fail(C, e, device, why))?
        {
            // Recorded into the graph, not run: it has nothing to wait for now.
            d.events.insert(event.0, None);
            return Ok(());
        }
        let pending = d.held.contains(&stream.0).then(|| {
            d.seq += 1;
            (stream.0, d.seq)
        });
        d.events.insert(event.0, pending);
        Ok(())
    }

    fn event_query(&self, device: usize, event: Event) -> DriverResult<bool> {
        const C: Call = Call::EventQuery;
        let mut st = self.enter(C, Some(device))?;
        capture::check_event_use(&mut st, C, device, event)?;
        let d = device_mut(&mut st, C, device)?;
        Ok(check_event(d, C, device, event)?.is_none())
    }

    fn event_synchronize(&self, device: usize, event: Event) -> DriverResult<()> {
        const C: Call = Call::EventSynchronize;
        let mut st = self.enter(C, Some(device))?;
        capture::check_event_use(&mut st, C, device, event)?;
        let d = device_mut(&mut st, C, device)?;
        if let Some((stream, seq)) = check_event(d, C, device, event)? {
            d.complete(stream, seq);
        }
        Ok(())
    }

    fn event_destroy(&self, device: usize, event: Event) -> DriverResult<()> {
        const C: Call = Call::EventDestroy;
        let mut st = self.enter(C, Some(device))?;
        let d = device_mut(&mut st, C, device)?;
        check_event(d, C, device, event)?;
        d.events.remove(&event.0);
        d.captures.forget_event(event.0);
        Ok(())
    }

    fn stream_wait_event(&self, device: usize, stream: Stream, event: Event) -> DriverResult<()> {
        const C: Call = Call::StreamWaitEvent;
        let mut st = self.enter(C, Some(device))?;
        // On a capturing stream the wait is captured, not run; an invalidated capture refuses it.
        capture::captured_work(&st, C, device, stream)?;
        check_event(device_mut(&mut st, C, device)?, C, device, event)?;
        Ok(())
    }

    fn stream_synchronize(&self, device: usize, stream: Stream) -> DriverResult<()> {
        const C: Call = Call::StreamSynchronize;
        let mut st = self.enter(C, Some(device))?;
        capture::check_stream_synchronize(&mut st, C, device, stream)?;
        device_mut(&mut st, C, device)?.complete(stream.0, u64::MAX);
        Ok(())
    }

    fn device_synchronize(&self, device: usize) -> DriverResult<()> {
        const C: Call = Call::DeviceSynchronize;
        let mut st = self.enter(C, Some(device))?;
        capture::check_unsafe_call(&mut st, C, device)?;
        let d = device_mut(&mut st, C, device)?;
        // Waiting ends with every event recorded so far complete, held streams' included.
        for e in d.events.values_mut() {
            *e = None;
        }
        Ok(())
    }

    fn copy_to_device(
        &self,
        device: usize,
        dst: DevicePtr,
        src: &[u8],
        stream: Stream,
    ) -> DriverResult<()> {
        const C: Call = Call::CopyToDevice;
        let mut st = self.enter(C, Some(device))?;
        capture::check_stream_synchronize(&mut st, C, device, stream)?;
        self.check_host_range(&st, C, device, dst, src.len() as u64)?;
        // Copies happen at once on the simulated device.
        // SAFETY: `[dst, dst + len)` is accessible memory of this device (checked above), which
        // with real backing is read/write host memory mapped at that address; `src` is a live
        // slice that cannot overlap it (device memory is never handed out as a Rust slice).
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst as *mut u8, src.len()) };
        Ok(())
    }

    fn copy_from_device(
        &self,
        device: usize,
        dst: &mut [u8],
        src: DevicePtr,
        stream: Stream,
    ) -> DriverResult<()> {
        const C: Call = Call::CopyFromDevice;
        let mut st = self.enter(C, Some(device))?;
        capture::check_stream_synchronize(&mut st, C, device, stream)?;
        self.check_host_range(&st, C, device, src, dst.len() as u64)?;
        // SAFETY: as in `copy_to_device`, with the roles swapped.
        unsafe { std::ptr::copy_nonoverlapping(src as *const u8, dst.as_mut_ptr(), dst.len()) };
        Ok(())
    }

    fn memset(
        &self,
        device: usize,
        dst: DevicePtr,
        value: u8,
        bytes: u64,
        stream: Stream,
    ) -> DriverResult<()> {
        let st = self.enter(Call::Memset, Some(device))?;
        let captured = capture::captured_work(&st, Call::Memset, device, stream)?;
        self.check_host_range(&st, Call::Memset, device, dst, bytes)?;
        if captured {
            return Ok(()); // recorded into the graph, not run
        }
        // SAFETY: `[dst, dst + bytes)` is accessible host-backed memory (checked above).
        unsafe { std::ptr::write_bytes(dst as *mut u8, value, bytes as usize) };
        Ok(())
    }
    fn stream_begin_capture(
        &self,
        device: usize,
        stream: Stream,
        mode: CaptureMode,
    ) -> DriverResult<()> {
        let mut st = self.enter(Call::StreamBeginCapture, Some(device))?;
        capture::begin(&mut st, device, stream, mode)
    }

    fn stream_end_capture(&self, device: usize, stream: Stream) -> DriverResult<()> {
        let mut st = self.enter(Call::StreamEndCapture, Some(device))?;
        capture::end(&mut st, device, stream)
    }

    fn stream_capture_info(&self, device: usize, stream: Stream) -> DriverResult<CaptureInfo> {
        const C: Call = Call::StreamGetCaptureInfo;
        let mut st = self.enter(C, Some(device))?;
        Ok(device_mut(&mut st, C, device)?.captures.info(stream.0))
    }

    fn exchange_capture_mode(&self, mode: CaptureMode) -> DriverResult<CaptureMode> {
        let mut st = self.enter(Call::ExchangeCaptureMode, None)?;
        let thread = current_thread_id();
        // A thread back in the initial mode leaves the table, so it never outgrows the live threads.
        let old = match mode {
            CaptureMode::Global => st.thread_modes.remove(&thread),
            _ => st.thread_modes.insert(thread, mode),
        };
        Ok(old.unwrap_or_default())
    }
}

/// The event's state, or `INVALID_HANDLE` when it is unknown on this device.
fn check_event(
    d: &Device,
    call: Call,
    device: usize,
    event: Event,
) -> DriverResult<Option<(u64, u64)>> {
    d.events.get(&event.0).copied().ok_or_else(|| {
        fail(
            call,
            CudaError::InvalidHandle,
            device,
            format!("event {} is unknown or destroyed", event.0),
        )
    })
}

impl Drop for SimDriver {
    fn drop(&mut self) {
        if self.config.backing != Backing::Real {
            return;
        }
        let mut st = self.state.lock();
        for d in st.devices.iter_mut() {
            for (&va, &size) in &d.reservations {
                // SAFETY: a live reservation this driver made; the driver is going away, and with
                // it every pointer it handed out. Mappings inside go with it.
                let _ = unsafe { host::release(va, size) };
            }
            for (&ptr, l) in &d.legacy {
                // SAFETY: a live legacy mapping this driver made, as above.
                let _ = unsafe { host::release(ptr, l.len) };
            }
            d.reservations.clear();
            d.legacy.clear();
            d.memfd = None; // closes the memfd
        }
    }
}
