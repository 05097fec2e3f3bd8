//! [`CudaDriver`]: the [`Driver`] trait over the real CUDA driver API.
//!
//! # What it wraps
//! The raw driver API of `libcuda` through `cudarc::driver::sys`, loaded at run time
//! (`dynamic-loading`): `cuInit`, device count and attributes, the primary-context calls, the
//! legacy `cuMemAlloc`/`cuMemFree` pair, `cuMemGetInfo`, the virtual-memory API (`cuMemCreate`,
//! `cuMemRelease`, `cuMemAddressReserve`, `cuMemAddressFree`, `cuMemMap`, `cuMemUnmap`,
//! `cuMemSetAccess`, `cuMemGetAllocationGranularity`), events and stream waits. cudarc has no safe
//! (`result`) wrappers for the VMM calls, so this file calls `sys` directly, in three layers:
//! raw `sys` call → `check` turns the `CUresult` into a [`DriverResult`] → the trait methods add
//! validation, context handling and bookkeeping.
//!
//! # Why it probes libcuda first
//! With `dynamic-loading`, the first cudarc call loads `libcuda.so`, and if the library (or one
//! symbol) is missing, cudarc **panics**. The [`Driver`] contract says nothing panics, and tessera
//! must build, open and fail cleanly on a machine with no NVIDIA driver. So [`CudaDriver::open`]
//! first asks `is_culib_present()` (cached in a `OnceLock`), then checks that every symbol this file
//! uses is exported, and only then makes its first CUDA call. No other function can be reached
//! without a `CudaDriver`, and a `CudaDriver` exists only after that probe succeeded (or, in unit
//! tests, with zero devices, where every call stops at the device check).
//!
//! # Contexts
//! Each device's **primary** context (the one the runtime API, and so PyTorch, uses) is retained
//! lazily, the first time a call names that device, and kept per device; [`Drop`] releases every
//! context this instance retained. Before each call the device's primary context is made current on
//! the calling thread: `cuCtxGetCurrent`, and `cuCtxSetCurrent` only when another context is current.
//! When another (non-null) context was current, it is restored after the call, so the caller's
//! current device is left as it was, like a device guard. When none was current, ours stays, so a
//! worker thread does not pay two extra calls on every operation. There is deliberately no
//! thread-local cache of "what is current": code outside tessera (PyTorch, user kernels) can change
//! the current context at any time, and a stale cache would run a call in the wrong context.
//!
//! # Locking rule
//! The bookkeeping maps (live legacy pointers, live physical handles, live events) each have their
//! own lock, held only for one map operation: never across a CUDA call and never two at once. A
//! free or release first removes its entry (so a second, racing free finds nothing and fails cleanly
//! instead of freeing twice), then calls CUDA, and puts the entry back if CUDA refused. The one lock
//! held across a CUDA call is a device's context-retain lock, around `cuDevicePrimaryCtxRetain`
//! only, which does not call back into tessera. Byte counts and cached values are atomics.
//!
//! Streams are handles the caller made (typically PyTorch's); they are passed through unchecked, so
//! a caller must pass only live streams of the named device. Physical handles and events are checked
//! against what this instance created, so a stale or foreign handle is an error, not a crash.

use super::{
    Call, CaptureInfo, CaptureMode, CaptureStatus, CudaError, DevicePtr, Driver, DriverError,
    DriverResult, Event, MemInfo, PhysHandle, Stream,
};
use crate::sync::{AtomicU64, AtomicUsize, Mutex, Ordering};
use cudarc::driver::sys::{self, CUcontext, CUdevice, CUresult};
use std::collections::{HashMap, HashSet};
use std::ffi::{c_int, c_uint};
use std::sync::OnceLock;

/// Every `libcuda` symbol this file calls, as cudarc looks it up. `open` checks them all before the
/// first call, because cudarc panics on a missing symbol (an old driver).
const SYMBOLS: [&str; 35] = [
    "cuInit",
    "cuDeviceGetCount",
    "cuDeviceGet",
    "cuDeviceGetAttribute",
    "cuDevicePrimaryCtxRetain",
    "cuDevicePrimaryCtxRelease_v2",
    "cuCtxGetCurrent",
    "cuCtxSetCurrent",
    "cuMemGetInfo_v2",
    "cuMemAlloc_v2",
    "cuMemFree_v2",
    "cuMemGetAllocationGranularity",
    "cuMemAddressReserve",
    "cuMemAddressFree",
    "cuMemCreate",
    "cuMemRelease",
    "cuMemMap",
    "cuMemUnmap",
    "cuMemSetAccess",
    "cuEventCreate",
    "cuEventRecord",
    "cuEventQuery",
    "cuEventSynchronize",
    "cuEventDestroy_v2",
    "cuStreamWaitEvent",
    "cuStreamSynchronize",
    "cuMemcpyHtoDAsync_v2",
    "cuStreamBeginCapture_v2",
    "cuStreamEndCapture",
    "cuGraphDestroy",
    "cuStreamGetCaptureInfo_v2",
    "cuThreadExchangeStreamCaptureMode",
    "cuMemcpyDtoHAsync_v2",
    "cuMemsetD8Async",
    "cuCtxSynchronize",
];

/// Whether `libcuda` can be loaded on this machine. Asked once per process.
fn libcuda_present() -> bool {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    *PRESENT.get_or_init(|| {
        // SAFETY: `is_culib_present` only tries to dlopen the candidate library names (and closes
        // what it opened); loading libcuda runs its initialisers, which have no Rust-side
        // preconditions.
        unsafe { sys::is_culib_present() }
    })
}

/// The first symbol in [`SYMBOLS`] that the loaded `libcuda` does not export, if any.
/// Must only be called after [`libcuda_present`] returned true.
fn missing_symbol() -> Option<&'static str> {
    // SAFETY: `libcuda_present()` returned true, so `culib()` finds the library and does not panic
    // (it loads the same candidate names). We only look symbols up by name; none is called here, and
    // the requested function-pointer type is never used.
    let lib = unsafe { sys::culib() };
    SYMBOLS.into_iter().find(|name| {
        // SAFETY: see above; looking a symbol up has no preconditions beyond a loaded library.
        unsafe { lib.get::<unsafe extern "C" fn()>(name.as_bytes()) }.is_err()
    })
}

/// The one conversion from a raw `CUresult` to a [`DriverResult`]: `CUDA_SUCCESS` is `Ok`, any other
/// code is a [`DriverError`] naming the call and the device.
fn check(res: CUresult, call: Call, device: usize) -> DriverResult<()> {
    if res == CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(DriverError {
            call,
            error: CudaError::from_code(res as u32),
            device: Some(device),
            detail: None,
        })
    }
}

/// For the process-wide calls made in `open` (`cuInit`, `cuDeviceGetCount`), which name no device.
fn without_device(mut e: DriverError) -> DriverError {
    e.device = None;
    e
}

/// A byte count as the `size_t` CUDA takes; only fails on a 32-bit host.
fn to_size(bytes: u64, call: Call, device: usize) -> DriverResult<usize> {
    usize::try_from(bytes).map_err(|_| {
        DriverError::new(call, CudaError::InvalidValue, Some(device))
            .with_detail(format!("{bytes} bytes does not fit in size_t"))
    })
}

fn event_ptr(event: Event) -> sys::CUevent {
    event.0 as usize as sys::CUevent
}

/// `Stream(0)` becomes the null `CUstream`, which is the legacy default stream (cudarc loads the
/// non-`_ptsz` entry points).
fn stream_ptr(stream: Stream) -> sys::CUstream {
    stream.0 as usize as sys::CUstream
}

fn capture_mode_to_cu(mode: CaptureMode) -> sys::CUstreamCaptureMode {
    match mode {
        CaptureMode::Global => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL,
        CaptureMode::ThreadLocal => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL,
        CaptureMode::Relaxed => sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED,
    }
}

fn capture_mode_from_cu(mode: sys::CUstreamCaptureMode) -> CaptureMode {
    match mode {
        sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_GLOBAL => CaptureMode::Global,
        sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL => CaptureMode::ThreadLocal,
        sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED => CaptureMode::Relaxed,
    }
}

// ---------------------------------------------------------------------------------------------
// Struct layouts. `CUmemLocation` (and so `CUmemAllocationProp` and `CUmemAccessDesc`) changes
// shape from cudarc's `cuda-13020` feature on: `id` moves into an anonymous union. Every value of
// these types is built here and nowhere else, so moving the CUDA version feature in Cargo.toml
// means editing these three functions (and the layout test at the bottom) only; the compiler
// will point at them.
// ---------------------------------------------------------------------------------------------

/// The location "device `cu_device`".
fn device_location(cu_device: CUdevice) -> sys::CUmemLocation {
    sys::CUmemLocation {
        type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE,
        id: cu_device,
    }
}

/// Pinned device memory on `cu_device`, with no exportable handle type: what `cuMemCreate` and
/// `cuMemGetAllocationGranularity` are asked for.
fn allocation_prop(cu_device: CUdevice) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE,
        location: device_location(cu_device),
        win32HandleMetaData: std::ptr::null_mut(),
        allocFlags: sys::CUmemAllocationProp_st__bindgen_ty_1 {
            compressionType: 0,
            gpuDirectRDMACapable: 0,
            usage: 0,
            reserved: [0; 4],
        },
    }
}

/// Read/write access for `cu_device`.
fn access_desc(cu_device: CUdevice) -> sys::CUmemAccessDesc {
    sys::CUmemAccessDesc {
        location: device_location(cu_device),
        flags: sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    }
}

// ---------------------------------------------------------------------------------------------
// Contexts.
// ---------------------------------------------------------------------------------------------

/// Per-device state.
#[derive(Debug)]
struct DeviceState {
    /// The `CUdevice` from `cuDeviceGet(ordinal)`.
    cu_device: CUdevice,
    /// The retained primary context as an integer; 0 until the first call that needs it.
    context: AtomicUsize,
    /// Serialises the first retain, so the context is retained once per instance.
    retain_lock: Mutex<()>,
    /// `cuMemGetAllocationGranularity(MINIMUM)`; 0 until first asked.
    granularity: AtomicU64,
    /// Bytes of physical memory created and legacy memory allocated, minus released/freed.
    in_use: AtomicU64,
}

impl DeviceState {
    fn new(cu_device: CUdevice) -> Self {
        DeviceState {
            cu_device,
            context: AtomicUsize::new(0),
            retain_lock: Mutex::new(()),
            granularity: AtomicU64::new(0),
            in_use: AtomicU64::new(0),
        }
    }
}

/// Makes a context current for one driver call. Restores the previously current context on drop
/// when there was one (see the module documentation).
struct ContextGuard {
    restore: Option<CUcontext>,
}

impl Drop for ContextGuard {
    fn drop(&mut self) {
        if let Some(previous) = self.restore {
            // SAFETY: `previous` was the current context of this thread a moment ago, as returned by
            // `cuCtxGetCurrent`. An error (it was destroyed meanwhile) is ignored: drop cannot fail.
            let _ = unsafe { sys::cuCtxSetCurrent(previous) };
        }
    }
}

/// The CUDA driver. Open it with [`CudaDriver::open`].
#[derive(Debug)]
pub struct CudaDriver {
    devices: Vec<DeviceState>,
    /// Live legacy allocations: pointer → (device, size).
    legacy: Mutex<HashMap<DevicePtr, (usize, u64)>>,
    /// Live physical allocations: handle → (device, size).
    physical: Mutex<HashMap<u64, (usize, u64)>>,
    /// Live events.
    events: Mutex<HashSet<u64>>,
}

impl CudaDriver {
    /// Loads `libcuda`, initialises CUDA and counts the devices. Fails cleanly, as an `Err`, when
    /// there is no NVIDIA driver, the driver is too old, or there is no device. Contexts are not
    /// created here but on the first call that names a device.
    pub fn open() -> Result<CudaDriver, DriverError> {
        if !libcuda_present() {
            return Err(DriverError::new(
                Call::DeviceCount,
                CudaError::SharedObjectInitFailed,
                None,
            )
            .with_detail("libcuda.so not found: no NVIDIA driver on this machine"));
        }
        if let Some(name) = missing_symbol() {
            return Err(DriverError::new(
                Call::DeviceCount,
                CudaError::SharedObjectInitFailed,
                None,
            )
            .with_detail(format!(
                "libcuda does not export {name}: the NVIDIA driver is too old"
            )));
        }
        // SAFETY: libcuda is loaded and exports every symbol we use (checked above); cuInit takes
        // no pointers and flags must be 0.
        let res = unsafe { sys::cuInit(0) };
        check(res, Call::DeviceCount, 0).map_err(|e| without_device(e).with_detail("cuInit(0)"))?;

        let mut count: c_int = 0;
        // SAFETY: `count` is a valid, writable c_int for the duration of the call.
        let res = unsafe { sys::cuDeviceGetCount(&mut count) };
        check(res, Call::DeviceCount, 0).map_err(without_device)?;
        if count <= 0 {
            return Err(
                DriverError::new(Call::DeviceCount, CudaError::NoDevice, None)
                    .with_detail("the NVIDIA driver reports no CUDA device"),
            );
        }

        let mut devices = Vec::with_capacity(count as usize);
        for ordinal in 0..count {
            let mut cu_device: CUdevice = 0;
            // SAFETY: `cu_device` is a valid, writable CUdevice; `ordinal` is in 0..count.
            let res = unsafe { sys::cuDeviceGet(&mut cu_device, ordinal) };
            check(res, Call::DeviceCount, ordinal as usize)
                .map_err(|e| e.with_detail("cuDeviceGet"))?;
            devices.push(DeviceState::new(cu_device));
        }
        Ok(CudaDriver {
            devices,
            legacy: Mutex::new(HashMap::new()),
            physical: Mutex::new(HashMap::new()),
            events: Mutex::new(HashSet::new()),
        })
    }

    /// Whether `libcuda` can be loaded on this machine (asked once per process). Tests use it to
    /// tell "no driver here" from a real failure.
    pub fn libcuda_present() -> bool {
        libcuda_present()
    }

    fn device(&self, device: usize, call: Call) -> DriverResult<&DeviceState> {
        self.devices.get(device).ok_or_else(|| {
            DriverError::new(call, CudaError::InvalidDevice, Some(device)).with_detail(format!(
                "device {device} out of range: {} device(s)",
                self.devices.len()
            ))
        })
    }

    /// The device's primary context, retained on first use.
    fn primary_context(
        &self,
        state: &DeviceState,
        device: usize,
        call: Call,
    ) -> DriverResult<CUcontext> {
        let ctx = state.context.load(Ordering::Acquire);
        if ctx != 0 {
            return Ok(ctx as CUcontext);
        }
        let _retain = state.retain_lock.lock();
        let ctx = state.context.load(Ordering::Acquire);
        if ctx != 0 {
            return Ok(ctx as CUcontext);
        }
        let mut ctx: CUcontext = std::ptr::null_mut();
        // SAFETY: `ctx` is a valid, writable CUcontext; `cu_device` came from cuDeviceGet.
        let res = unsafe { sys::cuDevicePrimaryCtxRetain(&mut ctx, state.cu_device) };
        check(res, call, device).map_err(|e| e.with_detail("cuDevicePrimaryCtxRetain"))?;
        state.context.store(ctx as usize, Ordering::Release);
        Ok(ctx)
    }

    /// Checks the device index and makes its primary context current on this thread for one call.
    fn enter(&self, device: usize, call: Call) -> DriverResult<(&DeviceState, ContextGuard)> {
        let state = self.device(device, call)?;
        let ctx = self.primary_context(state, device, call)?;
        let mut current: CUcontext = std::ptr::null_mut();
        // SAFETY: `current` is a valid, writable CUcontext.
        let res = unsafe { sys::cuCtxGetCurrent(&mut current) };
        check(res, call, device).map_err(|e| e.with_detail("cuCtxGetCurrent"))?;
        if current == ctx {
            return Ok((state, ContextGuard { restore: None }));
        }
        // SAFETY: `ctx` is a primary context this instance retained and has not released.
        let res = unsafe { sys::cuCtxSetCurrent(ctx) };
        check(res, call, device).map_err(|e| e.with_detail("cuCtxSetCurrent"))?;
        let restore = (!current.is_null()).then_some(current);
        Ok((state, ContextGuard { restore }))
    }

    /// Removes a tracked allocation for a free/release, checking that it belongs to `device`.
    fn take_tracked(
        map: &Mutex<HashMap<u64, (usize, u64)>>,
        key: u64,
        device: usize,
        call: Call,
        error: CudaError,
        what: &str,
    ) -> DriverResult<u64> {
        let mut map = map.lock();
        match map.get(&key) {
            None => Err(
                DriverError::new(call, error, Some(device)).with_detail(format!(
                "{what} {key:#x} is not live in this driver (never made here, or already freed)"
            )),
            ),
            Some(&(owner, _)) if owner != device => {
                Err(DriverError::new(call, error, Some(device))
                    .with_detail(format!("{what} {key:#x} belongs to device {owner}")))
            }
            Some(&(_, size)) => {
                map.remove(&key);
                Ok(size)
            }
        }
    }

    /// Fails unless `event` is a live event of this instance.
    fn check_event(&self, event: Event, call: Call, device: usize) -> DriverResult<()> {
        if self.events.lock().contains(&event.0) {
            Ok(())
        } else {
            Err(
                DriverError::new(call, CudaError::InvalidHandle, Some(device))
                    .with_detail(format!("event {:#x} is not live in this driver", event.0)),
            )
        }
    }
}

impl Drop for CudaDriver {
    fn drop(&mut self) {
        for state in &self.devices {
            if state.context.load(Ordering::Acquire) != 0 {
                // SAFETY: this instance retained the device's primary context exactly once and
                // releases it exactly once here. Errors (e.g. CUDA already deinitialised at exit)
                // are ignored: drop cannot fail.
                let _ = unsafe { sys::cuDevicePrimaryCtxRelease_v2(state.cu_device) };
            }
        }
    }
}

impl Driver for CudaDriver {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn device_count(&self) -> DriverResult<usize> {
        // Counted once in `open`: the set of visible devices cannot change after cuInit.
        Ok(self.devices.len())
    }

    fn supports_vmm(&self, device: usize) -> DriverResult<bool> {
        // An attribute query needs no context. There is no `Call` for cuDeviceGetAttribute; errors
        // are reported as `DeviceCount` with the real function in the detail.
        let state = self.device(device, Call::DeviceCount)?;
        let mut value: c_int = 0;
        // SAFETY: `value` is a valid, writable c_int; `cu_device` came from cuDeviceGet.
        let res = unsafe {
            sys::cuDeviceGetAttribute(
                &mut value,
                sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED,
                state.cu_device,
            )
        };
        check(res, Call::DeviceCount, device).map_err(|e| {
            e.with_detail("cuDeviceGetAttribute(VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)")
        })?;
        Ok(value != 0)
    }

    fn granularity(&self, device: usize) -> DriverResult<u64> {
        let state = self.device(device, Call::Granularity)?;
        let cached = state.granularity.load(Ordering::Relaxed);
        if cached != 0 {
            return Ok(cached);
        }
        let (state, _ctx) = self.enter(device, Call::Granularity)?;
        let prop = allocation_prop(state.cu_device);
        let mut granularity: usize = 0;
        // SAFETY: `granularity` is a valid, writable size_t and `prop` a fully initialised
        // allocation property that outlives the call.
        let res = unsafe {
            sys::cuMemGetAllocationGranularity(
                &mut granularity,
                &prop,
                sys::CUmemAllocationGranularity_flags::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
            )
        };
        check(res, Call::Granularity, device)?;
        let granularity = granularity as u64;
        if granularity == 0 {
            return Err(
                DriverError::new(Call::Granularity, CudaError::Unknown, Some(device))
                    .with_detail("the driver reported a granularity of 0"),
            );
        }
        // Racing threads store the same value.
        state.granularity.store(granularity, Ordering::Relaxed);
        Ok(granularity)
    }

    fn mem_info(&self, device: usize) -> DriverResult<MemInfo> {
        let (_, _ctx) = self.enter(device, Call::MemInfo)?;
        let (mut free, mut total) = (0usize, 0usize);
        // SAFETY: both out-pointers are valid, writable size_t values; the device's context is
        // current (cuMemGetInfo reports on the current context's device).
        let res = unsafe { sys::cuMemGetInfo_v2(&mut free, &mut total) };
        check(res, Call::MemInfo, device)?;
        Ok(MemInfo {
            free: free as u64,
            total: total as u64,
        })
    }

    fn bytes_in_use(&self, device: usize) -> u64 {
        self.devices
            .get(device)
            .map_or(0, |s| s.in_use.load(Ordering::Relaxed))
    }

    fn alloc_legacy(&self, device: usize, size: u64) -> DriverResult<DevicePtr> {
        let (state, _ctx) = self.enter(device, Call::AllocLegacy)?;
        let bytes = to_size(size, Call::AllocLegacy, device)?;
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: `ptr` is a valid, writable CUdeviceptr; the device's context is current.
        let res = unsafe { sys::cuMemAlloc_v2(&mut ptr, bytes) };
        check(res, Call::AllocLegacy, device)?;
        self.legacy.lock().insert(ptr, (device, size));
        state.in_use.fetch_add(size, Ordering::Relaxed);
        Ok(ptr)
    }

    fn free_legacy(&self, device: usize, ptr: DevicePtr) -> DriverResult<()> {
        let (state, _ctx) = self.enter(device, Call::FreeLegacy)?;
        let size = Self::take_tracked(
            &self.legacy,
            ptr,
            device,
            Call::FreeLegacy,
            CudaError::InvalidValue,
            "pointer",
        )?;
        // SAFETY: `ptr` was returned by cuMemAlloc on this device and, having just been removed from
        // the live map, is freed by this thread only.
        let res = unsafe { sys::cuMemFree_v2(ptr) };
        if let Err(e) = check(res, Call::FreeLegacy, device) {
            self.legacy.lock().insert(ptr, (device, size));
            return Err(e);
        }
        state.in_use.fetch_sub(size, Ordering::Relaxed);
        Ok(())
    }

    fn reserve(&self, device: usize, size: u64, align: u64) -> DriverResult<DevicePtr> {
        let (_, _ctx) = self.enter(device, Call::Reserve)?;
        let bytes = to_size(size, Call::Reserve, device)?;
        let align = to_size(align, Call::Reserve, device)?;
        let mut va: sys::CUdeviceptr = 0;
        // SAFETY: `va` is a valid, writable CUdeviceptr. Alignment 0 means the granularity; address
        // hint 0 means anywhere; flags must be 0.
        let res = unsafe { sys::cuMemAddressReserve(&mut va, bytes, align, 0, 0) };
        check(res, Call::Reserve, device)?;
        Ok(va)
    }

    fn free_reservation(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()> {
        let (_, _ctx) = self.enter(device, Call::FreeReservation)?;
        let bytes = to_size(size, Call::FreeReservation, device)?;
        // SAFETY: plain values; CUDA validates that [va, va + size) is a whole reservation.
        let res = unsafe { sys::cuMemAddressFree(va, bytes) };
        check(res, Call::FreeReservation, device)
    }

    fn create_physical(&self, device: usize, size: u64) -> DriverResult<PhysHandle> {
        let (state, _ctx) = self.enter(device, Call::CreatePhysical)?;
        let bytes = to_size(size, Call::CreatePhysical, device)?;
        let prop = allocation_prop(state.cu_device);
        let mut handle: sys::CUmemGenericAllocationHandle = 0;
        // SAFETY: `handle` is a valid, writable handle and `prop` a fully initialised allocation
        // property that outlives the call; flags must be 0.
        let res = unsafe { sys::cuMemCreate(&mut handle, bytes, &prop, 0) };
        check(res, Call::CreatePhysical, device)?;
        self.physical.lock().insert(handle, (device, size));
        state.in_use.fetch_add(size, Ordering::Relaxed);
        Ok(PhysHandle(handle))
    }

    fn release_physical(&self, device: usize, handle: PhysHandle) -> DriverResult<()> {
        let (state, _ctx) = self.enter(device, Call::ReleasePhysical)?;
        let size = Self::take_tracked(
            &self.physical,
            handle.0,
            device,
            Call::ReleasePhysical,
            CudaError::InvalidHandle,
            "physical handle",
        )?;
        // SAFETY: `handle` came from cuMemCreate on this device and, having just been removed from
        // the live map, is released by this thread only. Live mappings keep the memory alive.
        let res = unsafe { sys::cuMemRelease(handle.0) };
        if let Err(e) = check(res, Call::ReleasePhysical, device) {
            self.physical.lock().insert(handle.0, (device, size));
            return Err(e);
        }
        state.in_use.fetch_sub(size, Ordering::Relaxed);
        Ok(())
    }

    fn map(&self, device: usize, va: DevicePtr, size: u64, handle: PhysHandle) -> DriverResult<()> {
        let (_, _ctx) = self.enter(device, Call::Map)?;
        let bytes = to_size(size, Call::Map, device)?;
        match self.physical.lock().get(&handle.0) {
            Some(&(owner, len)) if owner == device && len == size => {}
            Some(&(owner, len)) => {
                return Err(
                    DriverError::new(Call::Map, CudaError::InvalidValue, Some(device)).with_detail(
                        format!(
                            "physical handle {:#x} is {len} bytes on device {owner}, mapped as {size} bytes on device {device}",
                            handle.0
                        ),
                    ),
                )
            }
            None => {
                return Err(
                    DriverError::new(Call::Map, CudaError::InvalidHandle, Some(device))
                        .with_detail(format!(
                            "physical handle {:#x} is not live in this driver",
                            handle.0
                        )),
                )
            }
        }
        // SAFETY: `handle` is a live allocation of exactly `size` bytes made by this instance;
        // CUDA validates the range against live reservations and mappings. Offset and flags are 0.
        let res = unsafe { sys::cuMemMap(va, bytes, 0, handle.0, 0) };
        check(res, Call::Map, device)
    }

    fn unmap(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()> {
        let (_, _ctx) = self.enter(device, Call::Unmap)?;
        let bytes = to_size(size, Call::Unmap, device)?;
        // SAFETY: plain values; CUDA validates that the range covers whole mappings.
        let res = unsafe { sys::cuMemUnmap(va, bytes) };
        check(res, Call::Unmap, device)
    }

    fn set_access(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()> {
        let (state, _ctx) = self.enter(device, Call::SetAccess)?;
        let bytes = to_size(size, Call::SetAccess, device)?;
        let desc = access_desc(state.cu_device);
        // SAFETY: `desc` is one fully initialised access descriptor that outlives the call, and the
        // count is 1; CUDA validates that the range is mapped.
        let res = unsafe { sys::cuMemSetAccess(va, bytes, &desc, 1) };
        check(res, Call::SetAccess, device)
    }

    fn event_create(&self, device: usize) -> DriverResult<Event> {
        let (_, _ctx) = self.enter(device, Call::EventCreate)?;
        let mut event: sys::CUevent = std::ptr::null_mut();
        // SAFETY: `event` is a valid, writable CUevent; the device's context is current, so the
        // event belongs to it.
        let res = unsafe {
            sys::cuEventCreate(
                &mut event,
                sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as c_uint,
            )
        };
        check(res, Call::EventCreate, device)?;
        let id = event as usize as u64;
        self.events.lock().insert(id);
        Ok(Event(id))
    }

    fn event_record(&self, device: usize, event: Event, stream: Stream) -> DriverResult<()> {
        let (_, _ctx) = self.enter(device, Call::EventRecord)?;
        self.check_event(event, Call::EventRecord, device)?;
        // SAFETY: the event is live in this instance; the stream is the caller's live stream of this
        // device, or null (the legacy default stream of the current context).
        let res = unsafe { sys::cuEventRecord(event_ptr(event), stream_ptr(stream)) };
        check(res, Call::EventRecord, device)
    }

    fn event_query(&self, device: usize, event: Event) -> DriverResult<bool> {
        let (_, _ctx) = self.enter(device, Call::EventQuery)?;
        self.check_event(event, Call::EventQuery, device)?;
        // SAFETY: the event is live in this instance.
        let res = unsafe { sys::cuEventQuery(event_ptr(event)) };
        if res == CUresult::CUDA_ERROR_NOT_READY {
            return Ok(false);
        }
        check(res, Call::EventQuery, device)?;
        Ok(true)
    }

    fn event_synchronize(&self, device: usize, event: Event) -> DriverResult<()> {
        let (_, _ctx) = self.enter(device, Call::EventSynchronize)?;
        self.check_event(event, Call::EventSynchronize, device)?;
        // SAFETY: the event is live in this instance.
        let res = unsafe { sys::cuEventSynchronize(event_ptr(event)) };
        check(res, Call::EventSynchronize, device)
    }

    fn device_synchronize(&self, device: usize) -> DriverResult<()> {
        let (_, _ctx) = self.enter(device, Call::DeviceSynchronize)?;
        // SAFETY: `enter` made the device's primary context current on this thread; the call takes
        // no pointer.
        let res = unsafe { sys::cuCtxSynchronize() };
        check(res, Call::DeviceSynchronize, device)
    }

    fn event_destroy(&self, device: usize, event: Event) -> DriverResult<()> {
        let (_, _ctx) = self.enter(device, Call::EventDestroy)?;
        if !self.events.lock().remove(&event.0) {
            return Err(DriverError::new(
                Call::EventDestroy,
                CudaError::InvalidHandle,
                Some(device),
            )
            .with_detail(format!(
                "event {:#x} is not live in this driver (never made here, or already destroyed)",
                event.0
            )));
        }
        // SAFETY: the event was live and, having just been removed from the live set, is destroyed
        // by this thread only.
        let res = unsafe { sys::cuEventDestroy_v2(event_ptr(event)) };
        if let Err(e) = check(res, Call::EventDestroy, device) {
            self.events.lock().insert(event.0);
            return Err(e);
        }
        Ok(())
    }

    fn stream_wait_event(&self, device: usize, stream: Stream, event: Event) -> DriverResult<()> {
        let (_, _ctx) = self.enter(device, Call::StreamWaitEvent)?;
        // The event may belong to another device (cross-device ordering), so only liveness is
        // checked.
        self.check_event(event, Call::StreamWaitEvent, device)?;
        // SAFETY: the event is live in this instance; the stream is the caller's live stream of this
        // device, or null (the legacy default stream). Flags must be 0.
        let res = unsafe { sys::cuStreamWaitEvent(stream_ptr(stream), event_ptr(event), 0) };
        check(res, Call::StreamWaitEvent, device)
    }

    fn stream_synchronize(&self, device: usize, stream: Stream) -> DriverResult<()> {
        let (_, _ctx) = self.enter(device, Call::StreamSynchronize)?;
        // SAFETY: the stream is the caller's live stream of this device, or null (the legacy default
        // stream of the current context).
        let res = unsafe { sys::cuStreamSynchronize(stream_ptr(stream)) };
        check(res, Call::StreamSynchronize, device)
    }

    fn stream_begin_capture(
        &self,
        device: usize,
        stream: Stream,
        mode: CaptureMode,
    ) -> DriverResult<()> {
        const C: Call = Call::StreamBeginCapture;
        let (_, _ctx) = self.enter(device, C)?;
        // SAFETY: the stream is the caller's live stream of this device, or null (which CUDA
        // refuses with an error).
        let res =
            unsafe { sys::cuStreamBeginCapture_v2(stream_ptr(stream), capture_mode_to_cu(mode)) };
        check(res, C, device)
    }

    fn stream_end_capture(&self, device: usize, stream: Stream) -> DriverResult<()> {
        const C: Call = Call::StreamEndCapture;
        let (_, _ctx) = self.enter(device, C)?;
        let mut graph: sys::CUgraph = std::ptr::null_mut();
        // SAFETY: `graph` is a valid, writable CUgraph; the stream is the caller's live stream.
        let res = unsafe { sys::cuStreamEndCapture(stream_ptr(stream), &mut graph) };
        if !graph.is_null() {
            // SAFETY: the graph was made by the capture just ended and is owned by nobody else.
            let _ = unsafe { sys::cuGraphDestroy(graph) };
        }
        check(res, C, device)
    }

    fn stream_capture_info(&self, device: usize, stream: Stream) -> DriverResult<CaptureInfo> {
        const C: Call = Call::StreamGetCaptureInfo;
        let (_, _ctx) = self.enter(device, C)?;
        let mut status = sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE;
        let mut id: sys::cuuint64_t = 0;
        // SAFETY: `status` and `id` are valid and writable; the graph and dependency outputs are
        // optional and passed as null; the stream is the caller's live stream, or null.
        let res = unsafe {
            sys::cuStreamGetCaptureInfo_v2(
                stream_ptr(stream),
                &mut status,
                &mut id,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        check(res, C, device)?;
        Ok(match status {
            sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE => CaptureInfo::NONE,
            sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_ACTIVE => CaptureInfo {
                status: CaptureStatus::Active,
                id,
            },
            sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_INVALIDATED => CaptureInfo {
                status: CaptureStatus::Invalidated,
                id,
            },
        })
    }

    fn exchange_capture_mode(&self, mode: CaptureMode) -> DriverResult<CaptureMode> {
        const C: Call = Call::ExchangeCaptureMode;
        let mut inout = capture_mode_to_cu(mode);
        // SAFETY: `inout` is a valid, writable CUstreamCaptureMode; the call needs no context.
        let res = unsafe { sys::cuThreadExchangeStreamCaptureMode(&mut inout) };
        check(res, C, 0).map_err(without_device)?;
        Ok(capture_mode_from_cu(inout))
    }

    fn copy_to_device(
        &self,
        device: usize,
        dst: DevicePtr,
        src: &[u8],
        stream: Stream,
    ) -> DriverResult<()> {
        const C: Call = Call::CopyToDevice;
        let (_, _ctx) = self.enter(device, C)?;
        // SAFETY: `src` is a live slice of `src.len()` readable bytes, kept alive until the stream
        // is synchronised below; `dst` is the caller's device memory of this device (CUDA reports
        // a bad address as an error, not undefined behaviour on the host); the stream is the
        // caller's live stream, or null.
        let res = unsafe {
            sys::cuMemcpyHtoDAsync_v2(dst, src.as_ptr().cast(), src.len(), stream_ptr(stream))
        };
        check(res, C, device)?;
        // SAFETY: as in `stream_synchronize`.
        let res = unsafe { sys::cuStreamSynchronize(stream_ptr(stream)) };
        check(res, C, device).map_err(|e| e.with_detail("cuStreamSynchronize after the copy"))
    }

    fn copy_from_device(
        &self,
        device: usize,
        dst: &mut [u8],
        src: DevicePtr,
        stream: Stream,
    ) -> DriverResult<()> {
        const C: Call = Call::CopyFromDevice;
        let (_, _ctx) = self.enter(device, C)?;
        // SAFETY: `dst` is a live, exclusively borrowed slice of `dst.len()` writable bytes, kept
        // until the stream is synchronised below (pageable memory: the driver stages the copy);
        // `src` as in `copy_to_device`.
        let res = unsafe {
            sys::cuMemcpyDtoHAsync_v2(dst.as_mut_ptr().cast(), src, dst.len(), stream_ptr(stream))
        };
        check(res, C, device)?;
        // SAFETY: as in `stream_synchronize`.
        let res = unsafe { sys::cuStreamSynchronize(stream_ptr(stream)) };
        check(res, C, device).map_err(|e| e.with_detail("cuStreamSynchronize after the copy"))
    }

    fn memset(
        &self,
        device: usize,
        dst: DevicePtr,
        value: u8,
        bytes: u64,
        stream: Stream,
    ) -> DriverResult<()> {
        const C: Call = Call::Memset;
        let (_, _ctx) = self.enter(device, C)?;
        // SAFETY: no host memory is involved; `dst` is the caller's device memory (a bad address
        // is a CUDA error); the stream is the caller's live stream, or null.
        let res = unsafe { sys::cuMemsetD8Async(dst, value, bytes as usize, stream_ptr(stream)) };
        check(res, C, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver with no devices: every call stops at the device check, so no CUDA call is made and
    /// this works without libcuda.
    fn no_devices() -> CudaDriver {
        CudaDriver {
            devices: Vec::new(),
            legacy: Mutex::new(HashMap::new()),
            physical: Mutex::new(HashMap::new()),
            events: Mutex::new(HashSet::new()),
        }
    }

    #[test]
    fn open_fails_cleanly_without_cuda_or_finds_a_device() {
        match CudaDriver::open() {
            Err(e) => {
                let msg = e.to_string();
                assert_eq!(e.call, Call::DeviceCount, "{msg}");
                assert!(
                    msg.starts_with("cuDeviceGetCount failed with CUDA_ERROR_"),
                    "{msg}"
                );
                if !CudaDriver::libcuda_present() {
                    assert_eq!(e.error, CudaError::SharedObjectInitFailed);
                    assert!(msg.contains("libcuda"), "{msg}");
                    assert_eq!(
                        msg,
                        "cuDeviceGetCount failed with CUDA_ERROR_SHARED_OBJECT_INIT_FAILED (303): \
                         libcuda.so not found: no NVIDIA driver on this machine"
                    );
                }
            }
            Ok(d) => {
                assert!(d.device_count().unwrap() >= 1);
                assert_eq!(d.name(), "cuda");
            }
        }
    }

    #[test]
    fn open_twice_gives_the_same_answer() {
        // The libcuda probe is cached; a second open must neither panic nor change its mind.
        let a = CudaDriver::open().map(|d| d.device_count().unwrap());
        let b = CudaDriver::open().map(|d| d.device_count().unwrap());
        assert_eq!(a.is_ok(), b.is_ok());
    }

    #[test]
    fn check_converts_cuda_results() {
        assert_eq!(check(CUresult::CUDA_SUCCESS, Call::Map, 0), Ok(()));

        let e = check(CUresult::CUDA_ERROR_OUT_OF_MEMORY, Call::CreatePhysical, 1).unwrap_err();
        assert_eq!(e.call, Call::CreatePhysical);
        assert_eq!(e.error, CudaError::OutOfMemory);
        assert_eq!(e.device, Some(1));
        assert_eq!(e.detail, None);
        assert!(e.is_out_of_memory());
        assert_eq!(
            e.to_string(),
            "cuMemCreate failed with CUDA_ERROR_OUT_OF_MEMORY (2) on device 1"
        );

        let e = check(CUresult::CUDA_ERROR_NOT_READY, Call::EventQuery, 0).unwrap_err();
        assert_eq!(e.error, CudaError::NotReady);

        // A code CudaError has no name for is kept verbatim.
        let e = check(
            CUresult::CUDA_ERROR_ILLEGAL_INSTRUCTION,
            Call::EventSynchronize,
            3,
        )
        .unwrap_err();
        assert_eq!(e.error, CudaError::Other(715));
        assert_eq!(e.error.code(), 715);
    }

    #[test]
    fn bad_device_is_invalid_device_without_calling_cuda() {
        let d = no_devices();
        assert_eq!(d.device_count(), Ok(0));
        assert_eq!(d.bytes_in_use(0), 0);
        let results: Vec<(Call, DriverResult<()>)> = vec![
            (Call::DeviceCount, d.supports_vmm(0).map(drop)),
            (Call::Granularity, d.granularity(0).map(drop)),
            (Call::MemInfo, d.mem_info(0).map(drop)),
            (Call::AllocLegacy, d.alloc_legacy(0, 1 << 21).map(drop)),
            (Call::FreeLegacy, d.free_legacy(0, 0x1000)),
            (Call::Reserve, d.reserve(0, 1 << 21, 0).map(drop)),
            (
                Call::FreeReservation,
                d.free_reservation(0, 0x1000, 1 << 21),
            ),
            (
                Call::CreatePhysical,
                d.create_physical(0, 1 << 21).map(drop),
            ),
            (Call::ReleasePhysical, d.release_physical(0, PhysHandle(1))),
            (Call::Map, d.map(0, 0x1000, 1 << 21, PhysHandle(1))),
            (Call::Unmap, d.unmap(0, 0x1000, 1 << 21)),
            (Call::SetAccess, d.set_access(0, 0x1000, 1 << 21)),
            (Call::EventCreate, d.event_create(0).map(drop)),
            (
                Call::EventRecord,
                d.event_record(0, Event(1), Stream::DEFAULT),
            ),
            (Call::EventQuery, d.event_query(0, Event(1)).map(drop)),
            (Call::EventSynchronize, d.event_synchronize(0, Event(1))),
            (Call::EventDestroy, d.event_destroy(0, Event(1))),
            (
                Call::StreamWaitEvent,
                d.stream_wait_event(0, Stream::DEFAULT, Event(1)),
            ),
            (
                Call::StreamSynchronize,
                d.stream_synchronize(0, Stream::DEFAULT),
            ),
        ];
        for (call, result) in results {
            let e = result.unwrap_err();
            assert_eq!(
                (e.call, e.error, e.device),
                (call, CudaError::InvalidDevice, Some(0))
            );
        }
        drop(d); // Drop makes no CUDA call for devices it never entered.
    }

    #[test]
    fn allocation_prop_is_pinned_device_memory() {
        let prop = allocation_prop(3);
        assert_eq!(
            prop.type_,
            sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED
        );
        assert_eq!(
            prop.requestedHandleTypes,
            sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE
        );
        assert_eq!(prop.location, device_location(3));
        let desc = access_desc(3);
        assert_eq!(desc.location, device_location(3));
        assert_eq!(
            desc.flags,
            sys::CUmemAccess_flags::CU_MEM_ACCESS_FLAGS_PROT_READWRITE
        );
    }

    /// Runs only where a GPU is present: one full VMM and event round trip on device 0, with the
    /// byte bookkeeping.
    #[test]
    fn round_trip_on_a_real_device() {
        let Ok(d) = CudaDriver::open() else { return };
        if !d.supports_vmm(0).unwrap() {
            return;
        }
        let g = d.granularity(0).unwrap();
        assert!(g > 0 && g.is_power_of_two());
        assert_eq!(d.granularity(0).unwrap(), g);
        let info = d.mem_info(0).unwrap();
        assert!(info.free <= info.total && info.total > 0);

        let before = d.bytes_in_use(0);
        let va = d.reserve(0, 2 * g, 0).unwrap();
        assert_eq!(va % g, 0);
        let h = d.create_physical(0, g).unwrap();
        assert_eq!(d.bytes_in_use(0), before + g);
        d.map(0, va, g, h).unwrap();
        d.set_access(0, va, g).unwrap();
        // Mapping a handle with the wrong size is refused before CUDA sees it.
        assert_eq!(
            d.map(0, va + g, 2 * g, h).unwrap_err().error,
            CudaError::InvalidValue
        );
        d.unmap(0, va, g).unwrap();
        d.release_physical(0, h).unwrap();
        assert_eq!(
            d.release_physical(0, h).unwrap_err().error,
            CudaError::InvalidHandle
        );
        d.free_reservation(0, va, 2 * g).unwrap();
        assert_eq!(d.bytes_in_use(0), before);

        let p = d.alloc_legacy(0, 4096).unwrap();
        assert_eq!(d.bytes_in_use(0), before + 4096);
        d.free_legacy(0, p).unwrap();
        assert_eq!(
            d.free_legacy(0, p).unwrap_err().error,
            CudaError::InvalidValue
        );
        assert_eq!(d.bytes_in_use(0), before);

        let e = d.event_create(0).unwrap();
        d.event_record(0, e, Stream::DEFAULT).unwrap();
        d.stream_wait_event(0, Stream::DEFAULT, e).unwrap();
        d.event_synchronize(0, e).unwrap();
        assert!(d.event_query(0, e).unwrap());
        d.stream_synchronize(0, Stream::DEFAULT).unwrap();
        d.event_destroy(0, e).unwrap();
        assert_eq!(
            d.event_destroy(0, e).unwrap_err().error,
            CudaError::InvalidHandle
        );

        // Any thread may call.
        std::thread::scope(|s| {
            s.spawn(|| d.mem_info(0).unwrap());
        });
    }
}
