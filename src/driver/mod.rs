//! The driver layer: the one door through which tessera talks to a GPU.
//!
//! Everything the allocator asks of a device goes through the [`Driver`] trait: device count,
//! allocation granularity, memory info, the legacy `cuMemAlloc`/`cuMemFree` pair, the virtual-memory
//! API (reserve/free a virtual range, create/release physical memory, map/unmap, set access), and
//! events and streams. Two implementations sit side by side:
//! - [`cuda::CudaDriver`]: the CUDA driver API through cudarc, loaded at run time (it builds and
//!   opens cleanly, as an `Err`, on a machine with no CUDA).
//! - [`sim::SimDriver`]: a device emulated in host virtual memory, with a capacity, fault injection,
//!   call counters and test-controlled stream completion. Tests and the replay tool use it.
//!
//! # The contract (stated once, for both drivers)
//! - Devices are numbered `0..device_count()`. Every call names its device; a bad index is
//!   `CUDA_ERROR_INVALID_DEVICE`.
//! - Sizes passed to `reserve`, `create_physical`, `map`, `unmap` and `set_access` are positive
//!   multiples of `granularity(device)`, and addresses passed to `map`/`unmap`/`set_access` are
//!   granularity-aligned; otherwise `CUDA_ERROR_INVALID_VALUE`.
//! - `map(va, size, handle)` maps the whole physical allocation `handle` (of exactly `size` bytes) at
//!   `va`, which must lie inside a live reservation and not overlap a live mapping.
//!   `unmap(va, size)` must cover whole mappings. `set_access(va, size)` grants read/write to the
//!   device over a fully mapped range (which may span several mappings); memory is usable only
//!   after it.
//! - `release_physical` may be called while the handle is still mapped (CUDA frees the memory when
//!   the last mapping goes); tessera never does so, but both drivers accept it.
//! - `copy_to_device`, `copy_from_device` and `memset` need a range of accessible device memory
//!   (mapped with access set, or legacy); the copies return once done, `memset` is ordered on its
//!   stream. A simulated device without host memory behind it (bookkeeping backing) refuses them
//!   with `CUDA_ERROR_NOT_SUPPORTED`.
//! - Events are created per device, recorded on a stream, and complete when all work queued on that
//!   stream before the record has finished. [`Stream`] `0` is the legacy default stream.
//! - All methods may be called from any thread. No method panics: failures are [`DriverError`]s that
//!   name the call and the CUDA error.
//! - Stream capture follows CUDA's rules, stated at [`CaptureMode`]: while a capture is underway
//!   a potentially unsafe call can fail with `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` and break the
//!   capture. The simulated driver enforces the same rules and errors, so the allocator's
//!   capture-safety is tested without a GPU.
//! - Physical memory created and legacy memory allocated through a driver instance is counted in
//!   [`Driver::bytes_in_use`], so the allocator can check that its idea of "reserved" matches the
//!   driver's.

pub mod cuda;
pub mod sim;

use std::fmt;

/// A device virtual address (`CUdeviceptr`). On the simulated device it is a host address.
pub type DevicePtr = u64;

/// A CUDA stream handle (`CUstream` as an integer). `Stream(0)` is the legacy default stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Stream(pub u64);

impl Stream {
    /// The legacy default stream.
    pub const DEFAULT: Stream = Stream(0);
}

/// A handle to physical device memory (`CUmemGenericAllocationHandle`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PhysHandle(pub u64);

/// An event handle (`CUevent` as an integer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Event(pub u64);

/// How a stream capture and a thread interact (`CUstreamCaptureMode`).
///
/// A *potentially unsafe* call (one that allocates, frees, maps, synchronizes, queries an event
/// or copies synchronously) made by a thread whose own mode is:
/// - `Global` fails while that thread has a capture underway that is not `Relaxed`, or while any
///   thread has a `Global` capture underway anywhere in the process (on any device);
/// - `ThreadLocal` fails while that thread has a capture underway that is not `Relaxed`;
/// - `Relaxed` never fails for a capture.
///
/// It fails with `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` and invalidates the captures that forbade
/// it. A thread's own mode is [`Driver::exchange_capture_mode`]'s; a capture's is the mode it began
/// with. Synchronizing a capturing stream, or querying or synchronizing an event recorded inside a
/// capture (`CUDA_ERROR_CAPTURED_EVENT`), fails in every mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CaptureMode {
    /// `CU_STREAM_CAPTURE_MODE_GLOBAL`, every thread's initial mode.
    #[default]
    Global,
    /// `CU_STREAM_CAPTURE_MODE_THREAD_LOCAL`.
    ThreadLocal,
    /// `CU_STREAM_CAPTURE_MODE_RELAXED`.
    Relaxed,
}

/// Whether a stream is capturing (`CUstreamCaptureStatus`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CaptureStatus {
    /// `CU_STREAM_CAPTURE_STATUS_NONE`: not capturing.
    None,
    /// `CU_STREAM_CAPTURE_STATUS_ACTIVE`: capturing.
    Active,
    /// `CU_STREAM_CAPTURE_STATUS_INVALIDATED`: capturing, but broken by an unsupported call; it can
    /// only be ended.
    Invalidated,
}

/// What [`Driver::stream_capture_info`] says of a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CaptureInfo {
    /// Whether the stream is capturing.
    pub status: CaptureStatus,
    /// The capture's id, unique in the process while it lasts (0 when not capturing).
    pub id: u64,
}

impl CaptureInfo {
    /// Not capturing.
    pub const NONE: CaptureInfo = CaptureInfo {
        status: CaptureStatus::None,
        id: 0,
    };

    /// Whether a capture (active or invalidated) is underway on the stream.
    pub fn is_capturing(self) -> bool {
        self.status != CaptureStatus::None
    }
}

/// Free and total memory of a device, as `cuMemGetInfo` reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemInfo {
    /// Bytes free on the device, every user counted.
    pub free: u64,
    /// Bytes of memory the device has.
    pub total: u64,
}

/// Every kind of call the trait makes. The simulated driver counts calls and injects faults by kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Call {
    /// [`Driver::device_count`] (`cuDeviceGetCount`).
    DeviceCount,
    /// [`Driver::granularity`] (`cuMemGetAllocationGranularity`).
    Granularity,
    /// [`Driver::mem_info`] (`cuMemGetInfo`).
    MemInfo,
    /// [`Driver::alloc_legacy`] (`cuMemAlloc`).
    AllocLegacy,
    /// [`Driver::free_legacy`] (`cuMemFree`).
    FreeLegacy,
    /// [`Driver::reserve`] (`cuMemAddressReserve`).
    Reserve,
    /// [`Driver::free_reservation`] (`cuMemAddressFree`).
    FreeReservation,
    /// [`Driver::create_physical`] (`cuMemCreate`).
    CreatePhysical,
    /// [`Driver::release_physical`] (`cuMemRelease`).
    ReleasePhysical,
    /// [`Driver::map`] (`cuMemMap`).
    Map,
    /// [`Driver::unmap`] (`cuMemUnmap`).
    Unmap,
    /// [`Driver::set_access`] (`cuMemSetAccess`).
    SetAccess,
    /// [`Driver::event_create`] (`cuEventCreate`).
    EventCreate,
    /// [`Driver::event_record`] (`cuEventRecord`).
    EventRecord,
    /// [`Driver::event_query`] (`cuEventQuery`).
    EventQuery,
    /// [`Driver::event_synchronize`] (`cuEventSynchronize`).
    EventSynchronize,
    /// [`Driver::event_destroy`] (`cuEventDestroy`).
    EventDestroy,
    /// [`Driver::stream_wait_event`] (`cuStreamWaitEvent`).
    StreamWaitEvent,
    /// [`Driver::stream_synchronize`] (`cuStreamSynchronize`).
    StreamSynchronize,
    /// [`Driver::copy_to_device`] (`cuMemcpyHtoDAsync`).
    CopyToDevice,
    /// [`Driver::copy_from_device`] (`cuMemcpyDtoHAsync`).
    CopyFromDevice,
    /// [`Driver::memset`] (`cuMemsetD8Async`).
    Memset,
    /// [`Driver::stream_begin_capture`] (`cuStreamBeginCapture`).
    StreamBeginCapture,
    /// [`Driver::stream_end_capture`] (`cuStreamEndCapture`).
    StreamEndCapture,
    /// [`Driver::stream_capture_info`] (`cuStreamGetCaptureInfo`).
    StreamGetCaptureInfo,
    /// [`Driver::exchange_capture_mode`] (`cuThreadExchangeStreamCaptureMode`).
    ExchangeCaptureMode,
    /// [`Driver::device_synchronize`] (`cuCtxSynchronize`).
    DeviceSynchronize,
}

impl Call {
    /// Every call kind, in declaration order (new kinds go at the end: saved proptest seeds index
    /// into this list).
    pub const ALL: [Call; 27] = [
        Call::DeviceCount,
        Call::Granularity,
        Call::MemInfo,
        Call::AllocLegacy,
        Call::FreeLegacy,
        Call::Reserve,
        Call::FreeReservation,
        Call::CreatePhysical,
        Call::ReleasePhysical,
        Call::Map,
        Call::Unmap,
        Call::SetAccess,
        Call::EventCreate,
        Call::EventRecord,
        Call::EventQuery,
        Call::EventSynchronize,
        Call::EventDestroy,
        Call::StreamWaitEvent,
        Call::StreamSynchronize,
        Call::CopyToDevice,
        Call::CopyFromDevice,
        Call::Memset,
        Call::StreamBeginCapture,
        Call::StreamEndCapture,
        Call::StreamGetCaptureInfo,
        Call::ExchangeCaptureMode,
        Call::DeviceSynchronize,
    ];

    /// The CUDA driver function behind this call, as error messages name it.
    pub fn cuda_name(self) -> &'static str {
        match self {
            Call::DeviceCount => "cuDeviceGetCount",
            Call::Granularity => "cuMemGetAllocationGranularity",
            Call::MemInfo => "cuMemGetInfo",
            Call::AllocLegacy => "cuMemAlloc",
            Call::FreeLegacy => "cuMemFree",
            Call::Reserve => "cuMemAddressReserve",
            Call::FreeReservation => "cuMemAddressFree",
            Call::CreatePhysical => "cuMemCreate",
            Call::ReleasePhysical => "cuMemRelease",
            Call::Map => "cuMemMap",
            Call::Unmap => "cuMemUnmap",
            Call::SetAccess => "cuMemSetAccess",
            Call::EventCreate => "cuEventCreate",
            Call::EventRecord => "cuEventRecord",
            Call::EventQuery => "cuEventQuery",
            Call::EventSynchronize => "cuEventSynchronize",
            Call::EventDestroy => "cuEventDestroy",
            Call::StreamWaitEvent => "cuStreamWaitEvent",
            Call::StreamSynchronize => "cuStreamSynchronize",
            Call::CopyToDevice => "cuMemcpyHtoDAsync",
            Call::CopyFromDevice => "cuMemcpyDtoHAsync",
            Call::Memset => "cuMemsetD8Async",
            Call::StreamBeginCapture => "cuStreamBeginCapture",
            Call::StreamEndCapture => "cuStreamEndCapture",
            Call::StreamGetCaptureInfo => "cuStreamGetCaptureInfo",
            Call::ExchangeCaptureMode => "cuThreadExchangeStreamCaptureMode",
            Call::DeviceSynchronize => "cuCtxSynchronize",
        }
    }

    /// Index into [`Call::ALL`], for counter arrays.
    pub fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cuda_name())
    }
}

/// A CUDA driver error code (`CUresult`), with the names the driver gives them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CudaError {
    /// `CUDA_ERROR_INVALID_VALUE` (1): an argument out of range (a size, an alignment, an address).
    InvalidValue,
    /// `CUDA_ERROR_OUT_OF_MEMORY` (2): the device has not enough memory left.
    OutOfMemory,
    /// `CUDA_ERROR_NOT_INITIALIZED` (3): the driver is not initialised (the simulated driver: its
    /// configuration is unusable).
    NotInitialized,
    /// `CUDA_ERROR_DEINITIALIZED` (4): the driver is shutting down.
    Deinitialized,
    /// `CUDA_ERROR_NO_DEVICE` (100): no CUDA device is present.
    NoDevice,
    /// `CUDA_ERROR_INVALID_DEVICE` (101): a device index outside `0..device_count()`.
    InvalidDevice,
    /// `CUDA_ERROR_INVALID_CONTEXT` (201): no valid context for the call.
    InvalidContext,
    /// `CUDA_ERROR_SHARED_OBJECT_INIT_FAILED` (303): a library could not be initialised (tessera:
    /// `libcuda` is missing or too old).
    SharedObjectInitFailed,
    /// `CUDA_ERROR_INVALID_HANDLE` (400): a handle (physical memory, event) that is not live.
    InvalidHandle,
    /// `CUDA_ERROR_ILLEGAL_STATE` (401): the object is not in a state for the call (a capture
    /// begun on a stream that is already capturing, or ended on one that is not).
    IllegalState,
    /// `CUDA_ERROR_NOT_FOUND` (500): a named symbol or resource was not found.
    NotFound,
    /// `CUDA_ERROR_NOT_READY` (600): the work an event waits for is not done yet
    /// ([`Driver::event_query`] answers `Ok(false)` instead).
    NotReady,
    /// `CUDA_ERROR_ILLEGAL_ADDRESS` (700): an access to memory that is not accessible.
    IllegalAddress,
    /// `CUDA_ERROR_NOT_PERMITTED` (800): the operation is not permitted.
    NotPermitted,
    /// `CUDA_ERROR_NOT_SUPPORTED` (801): the device or driver does not support the operation.
    NotSupported,
    /// `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` (900): a call that is not permitted while a stream
    /// capture is underway; the capture it broke is invalidated.
    StreamCaptureUnsupported,
    /// `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED` (901): the capture was invalidated by an earlier
    /// unsupported call; it can only be ended.
    StreamCaptureInvalidated,
    /// `CUDA_ERROR_CAPTURED_EVENT` (907): a query or wait on an event recorded inside a capture.
    CapturedEvent,
    /// `CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD` (908): a global or thread-local capture ended from
    /// another thread than the one that began it.
    StreamCaptureWrongThread,
    /// `CUDA_ERROR_UNKNOWN` (999): an error the driver does not say more about.
    Unknown,
    /// Any other code, kept verbatim.
    Other(u32),
}

impl CudaError {
    /// The numeric `CUresult`.
    pub fn code(self) -> u32 {
        match self {
            CudaError::InvalidValue => 1,
            CudaError::OutOfMemory => 2,
            CudaError::NotInitialized => 3,
            CudaError::Deinitialized => 4,
            CudaError::NoDevice => 100,
            CudaError::InvalidDevice => 101,
            CudaError::InvalidContext => 201,
            CudaError::SharedObjectInitFailed => 303,
            CudaError::InvalidHandle => 400,
            CudaError::IllegalState => 401,
            CudaError::NotFound => 500,
            CudaError::NotReady => 600,
            CudaError::IllegalAddress => 700,
            CudaError::NotPermitted => 800,
            CudaError::NotSupported => 801,
            CudaError::StreamCaptureUnsupported => 900,
            CudaError::StreamCaptureInvalidated => 901,
            CudaError::CapturedEvent => 907,
            CudaError::StreamCaptureWrongThread => 908,
            CudaError::Unknown => 999,
            CudaError::Other(c) => c,
        }
    }

    /// From a numeric `CUresult` (which must not be `CUDA_SUCCESS`).
    pub fn from_code(code: u32) -> CudaError {
        match code {
            1 => CudaError::InvalidValue,
            2 => CudaError::OutOfMemory,
            3 => CudaError::NotInitialized,
            4 => CudaError::Deinitialized,
            100 => CudaError::NoDevice,
            101 => CudaError::InvalidDevice,
            201 => CudaError::InvalidContext,
            303 => CudaError::SharedObjectInitFailed,
            400 => CudaError::InvalidHandle,
            401 => CudaError::IllegalState,
            500 => CudaError::NotFound,
            600 => CudaError::NotReady,
            700 => CudaError::IllegalAddress,
            800 => CudaError::NotPermitted,
            801 => CudaError::NotSupported,
            900 => CudaError::StreamCaptureUnsupported,
            901 => CudaError::StreamCaptureInvalidated,
            907 => CudaError::CapturedEvent,
            908 => CudaError::StreamCaptureWrongThread,
            999 => CudaError::Unknown,
            c => CudaError::Other(c),
        }
    }

    /// The driver's name for the code, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
    pub fn name(self) -> &'static str {
        match self {
            CudaError::InvalidValue => "CUDA_ERROR_INVALID_VALUE",
            CudaError::OutOfMemory => "CUDA_ERROR_OUT_OF_MEMORY",
            CudaError::NotInitialized => "CUDA_ERROR_NOT_INITIALIZED",
            CudaError::Deinitialized => "CUDA_ERROR_DEINITIALIZED",
            CudaError::NoDevice => "CUDA_ERROR_NO_DEVICE",
            CudaError::InvalidDevice => "CUDA_ERROR_INVALID_DEVICE",
            CudaError::InvalidContext => "CUDA_ERROR_INVALID_CONTEXT",
            CudaError::SharedObjectInitFailed => "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED",
            CudaError::InvalidHandle => "CUDA_ERROR_INVALID_HANDLE",
            CudaError::IllegalState => "CUDA_ERROR_ILLEGAL_STATE",
            CudaError::NotFound => "CUDA_ERROR_NOT_FOUND",
            CudaError::NotReady => "CUDA_ERROR_NOT_READY",
            CudaError::IllegalAddress => "CUDA_ERROR_ILLEGAL_ADDRESS",
            CudaError::NotPermitted => "CUDA_ERROR_NOT_PERMITTED",
            CudaError::NotSupported => "CUDA_ERROR_NOT_SUPPORTED",
            CudaError::StreamCaptureUnsupported => "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED",
            CudaError::StreamCaptureInvalidated => "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED",
            CudaError::CapturedEvent => "CUDA_ERROR_CAPTURED_EVENT",
            CudaError::StreamCaptureWrongThread => "CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD",
            CudaError::Unknown => "CUDA_ERROR_UNKNOWN",
            CudaError::Other(_) => "CUDA_ERROR_(unnamed)",
        }
    }
}

/// A failed driver call: which call, on which device, and the CUDA error it returned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{call} failed with {} ({}){}{}", .error.name(), .error.code(), device_suffix(*.device), detail_suffix(.detail))]
pub struct DriverError {
    /// The call that failed.
    pub call: Call,
    /// The CUDA error it returned.
    pub error: CudaError,
    /// The device the call was for, when it names one.
    pub device: Option<usize>,
    /// Why, where the driver knows more than the code says (the simulated driver names the broken rule).
    pub detail: Option<String>,
}

fn device_suffix(device: Option<usize>) -> String {
    device
        .map(|d| format!(" on device {d}"))
        .unwrap_or_default()
}

fn detail_suffix(detail: &Option<String>) -> String {
    detail
        .as_ref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default()
}

impl DriverError {
    /// The error `error` of `call` on `device`, with no detail.
    pub fn new(call: Call, error: CudaError, device: Option<usize>) -> Self {
        DriverError {
            call,
            error,
            device,
            detail: None,
        }
    }

    /// The same error, with `detail` saying why (replacing any earlier detail).
    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// True when the device is out of memory: the allocator answers this with its OOM path rather
    /// than passing the error on.
    pub fn is_out_of_memory(&self) -> bool {
        self.error == CudaError::OutOfMemory
    }
}

/// The result of a [`Driver`] call.
pub type DriverResult<T> = Result<T, DriverError>;

/// Everything tessera asks of a GPU. See the module documentation for the contract.
pub trait Driver: Send + Sync + fmt::Debug + 'static {
    /// A short name for reports: `"cuda"` or `"sim"`.
    fn name(&self) -> &'static str;

    /// Number of devices.
    fn device_count(&self) -> DriverResult<usize>;

    /// Whether the device supports the virtual-memory API (`cuMemCreate` and friends).
    fn supports_vmm(&self, device: usize) -> DriverResult<bool>;

    /// The minimum granularity of physical allocations and mappings (2 MiB on current NVIDIA GPUs).
    fn granularity(&self, device: usize) -> DriverResult<u64>;

    /// Free and total memory of the device (`cuMemGetInfo`); free counts every user of the device.
    fn mem_info(&self, device: usize) -> DriverResult<MemInfo>;

    /// Bytes of physical and legacy memory currently held through this driver instance.
    fn bytes_in_use(&self, device: usize) -> u64;

    /// `cuMemAlloc`: `size` bytes of mapped, accessible device memory.
    fn alloc_legacy(&self, device: usize, size: u64) -> DriverResult<DevicePtr>;

    /// `cuMemFree` of a pointer returned by `alloc_legacy`.
    fn free_legacy(&self, device: usize, ptr: DevicePtr) -> DriverResult<()>;

    /// `cuMemAddressReserve`: `size` bytes of virtual address space aligned to `align` (0 = granularity).
    fn reserve(&self, device: usize, size: u64, align: u64) -> DriverResult<DevicePtr>;

    /// `cuMemAddressFree` of a whole reservation. Nothing may be mapped in it.
    fn free_reservation(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()>;

    /// `cuMemCreate`: `size` bytes of pinned physical device memory.
    fn create_physical(&self, device: usize, size: u64) -> DriverResult<PhysHandle>;

    /// `cuMemRelease` of a handle from `create_physical`.
    fn release_physical(&self, device: usize, handle: PhysHandle) -> DriverResult<()>;

    /// `cuMemMap`: map all of `handle` (exactly `size` bytes) at `va`.
    fn map(&self, device: usize, va: DevicePtr, size: u64, handle: PhysHandle) -> DriverResult<()>;

    /// `cuMemUnmap` of `[va, va + size)`, which must cover whole mappings.
    fn unmap(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()>;

    /// `cuMemSetAccess`: read/write access for the device over a fully mapped range.
    fn set_access(&self, device: usize, va: DevicePtr, size: u64) -> DriverResult<()>;

    /// `cuEventCreate` (timing disabled).
    fn event_create(&self, device: usize) -> DriverResult<Event>;

    /// `cuEventRecord` on `stream`.
    fn event_record(&self, device: usize, event: Event, stream: Stream) -> DriverResult<()>;

    /// `cuEventQuery`: `Ok(true)` when complete, `Ok(false)` while not ready.
    fn event_query(&self, device: usize, event: Event) -> DriverResult<bool>;

    /// `cuEventSynchronize`: block until the event completes.
    fn event_synchronize(&self, device: usize, event: Event) -> DriverResult<()>;

    /// `cuEventDestroy`.
    fn event_destroy(&self, device: usize, event: Event) -> DriverResult<()>;

    /// `cuStreamWaitEvent`: later work on `stream` waits for `event`.
    fn stream_wait_event(&self, device: usize, stream: Stream, event: Event) -> DriverResult<()>;

    /// `cuStreamSynchronize`.
    fn stream_synchronize(&self, device: usize, stream: Stream) -> DriverResult<()>;

    /// `cuCtxSynchronize` in the device's context: waits for all work queued on the device, every
    /// stream's. A potentially unsafe call during a capture.
    fn device_synchronize(&self, device: usize) -> DriverResult<()>;

    /// `cuMemcpyHtoDAsync` of `src` to `dst` on `stream`, then waits for the stream: `src` may be
    /// reused when it returns. `[dst, dst + src.len())` must be accessible device memory.
    fn copy_to_device(
        &self,
        device: usize,
        dst: DevicePtr,
        src: &[u8],
        stream: Stream,
    ) -> DriverResult<()>;

    /// `cuMemcpyDtoHAsync` of `dst.len()` bytes at `src` on `stream`, then waits for the stream.
    fn copy_from_device(
        &self,
        device: usize,
        dst: &mut [u8],
        src: DevicePtr,
        stream: Stream,
    ) -> DriverResult<()>;

    /// `cuMemsetD8Async`: `bytes` bytes at `dst` set to `value`, queued on `stream` (ordered
    /// before later work on it).
    fn memset(
        &self,
        device: usize,
        dst: DevicePtr,
        value: u8,
        bytes: u64,
        stream: Stream,
    ) -> DriverResult<()>;

    /// `cuStreamBeginCapture`: work queued on `stream` from now on is recorded into a graph
    /// instead of run, until [`Driver::stream_end_capture`]. `mode` says which calls the capture
    /// forbids (see [`CaptureMode`]). The legacy default stream cannot capture
    /// (`CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED`); a stream already capturing is
    /// `CUDA_ERROR_ILLEGAL_STATE`.
    fn stream_begin_capture(
        &self,
        device: usize,
        stream: Stream,
        mode: CaptureMode,
    ) -> DriverResult<()>;

    /// `cuStreamEndCapture`, then destroys the captured graph (tessera never launches one; PyTorch
    /// captures through the runtime itself). An invalidated capture ends with
    /// `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`; a global or thread-local capture ended from another
    /// thread is `CUDA_ERROR_STREAM_CAPTURE_WRONG_THREAD` and goes on.
    fn stream_end_capture(&self, device: usize, stream: Stream) -> DriverResult<()>;

    /// `cuStreamGetCaptureInfo` (and so `cuStreamIsCapturing`): whether `stream` is capturing,
    /// and the capture's id.
    fn stream_capture_info(&self, device: usize, stream: Stream) -> DriverResult<CaptureInfo>;

    /// `cuThreadExchangeStreamCaptureMode`: sets the calling thread's capture interaction mode and
    /// returns the one it had (every thread starts in [`CaptureMode::Global`]). tessera sets
    /// [`CaptureMode::Relaxed`] around its driver allocation calls and puts the old mode back, as
    /// PyTorch does around `cudaMalloc`.
    fn exchange_capture_mode(&self, mode: CaptureMode) -> DriverResult<CaptureMode>;
}
