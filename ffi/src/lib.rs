//! The C ABI of tessera: `libtessera.so`, declared in `include/tessera.h` (generated from this crate
//! by cbindgen), and loaded by PyTorch's `CUDAPluggableAllocator`.
//!
//! # Shape
//! Every entry point serves the process-wide allocator, [`tessera_core::global()`], made on first
//! use from `TESSERA_DRIVER`, `TESSERA_SIM`, `TESSERA_CONF` (or `tessera_configure`) and
//! `TESSERA_TRACE`. Each one converts its C arguments, calls the core, and maps the `Result` back:
//! a failure value (NULL, 0, -1 or an error code) plus this thread's last error
//! (`tessera_last_error`, `tessera_last_error_code`).
//!
//! # Invariants
//! - No panic crosses the boundary: every body runs inside [`error::guard`].
//! - Bad input changes nothing: unknown, interior and double frees, bad devices, NULL pointers
//!   and absurd sizes are errors, never undefined behaviour on tessera's side.
//! - The one exception that leaves tessera on purpose is `tessera_torch_malloc`'s C++
//!   `std::runtime_error`, thrown by `torch_oom.cpp` after every Rust value is gone.
//!
//! # Locking
//! None here: the core's locks are taken and released inside each call. OOM hooks run with no
//! tessera lock held, so a hook may call back into any entry point.
#![allow(non_camel_case_types)]
#![deny(unsafe_op_in_unsafe_fn)]

// The boundary catches panics, and tessera_torch_malloc's C++ exception unwinds through a Rust
// frame: both need unwinding.
#[cfg(panic = "abort")]
compile_error!("tessera-ffi must be built with panic = \"unwind\"");

mod error;
mod graphs;
mod stats;

use error::{guard, status, FfiError, FfiResult};
pub use error::{
    TESSERA_ERROR_CONFIG, TESSERA_ERROR_DOUBLE_FREE, TESSERA_ERROR_DRIVER, TESSERA_ERROR_INTERNAL,
    TESSERA_ERROR_INVALID_ARGUMENT, TESSERA_ERROR_INVALID_DEVICE, TESSERA_ERROR_INVALID_SIZE,
    TESSERA_ERROR_OUT_OF_MEMORY, TESSERA_ERROR_PRIVATE_POOL, TESSERA_ERROR_UNKNOWN_POINTER,
    TESSERA_ERROR_UNSUPPORTED, TESSERA_OK,
};
pub use graphs::{
    tessera_begin_allocate_to_pool, tessera_end_allocate_to_pool, tessera_filter_drop,
    tessera_release_pool, tessera_stream_filter, tessera_torch_graph_hook,
};
pub use stats::tessera_stats;
use std::ffi::{c_char, c_double, c_int, c_void, CStr};
use std::io::Write as _;
use tessera_core::driver::Stream;
use tessera_core::{Config, Error, HookId, Tessera};

/// CUDA's stream type, opaque here (the header declares it as CUDA does).
#[repr(C)]
pub struct CUstream_st {
    _opaque: [u8; 0],
}

/// A CUDA stream (`cudaStream_t` and `CUstream` are the same pointer type). NULL is the legacy
/// default stream.
pub type cudaStream_t = *mut CUstream_st;

/// An eviction hook: called with the device and the bytes requested when an allocation would
/// fail, before tessera gives up. It runs on the failing thread with no tessera lock held, so it
/// may call `tessera_free` (or any other entry point). It must not throw or unwind. Its return
/// value is the bytes it believes it freed; tessera measures what was freed itself, so the value is
/// informational.
pub type tessera_oom_hook = Option<
    unsafe extern "C-unwind" fn(device: c_int, requested: usize, user: *mut c_void) -> usize,
>;

#[inline]
fn allocator() -> FfiResult<&'static Tessera> {
    Ok(tessera_core::global()?)
}

/// A device index from C: negative or too large is an invalid device.
#[inline]
fn device_index(t: &Tessera, device: c_int) -> FfiResult<usize> {
    usize::try_from(device)
        .ok()
        .filter(|&d| d < t.device_count())
        .ok_or_else(|| {
            Error::InvalidDevice {
                device: device.into(),
                count: t.device_count(),
            }
            .into()
        })
}

fn stream(s: cudaStream_t) -> Stream {
    Stream(s as u64)
}

/// This thread's last error message, or `""` when there is none. The pointer belongs to the
/// calling thread's slot and stays valid until this thread's next failing call or
/// `tessera_clear_last_error` (and while the thread lives). A message longer than 4 KiB is cut
/// and ends in `...`.
#[no_mangle]
pub extern "C" fn tessera_last_error() -> *const c_char {
    error::last_error_ptr()
}

/// This thread's last error code (`TESSERA_OK` when there is none).
#[no_mangle]
pub extern "C" fn tessera_last_error_code() -> c_int {
    error::last_error_code()
}

/// Forgets this thread's last error. (A successful call does not clear it, as with `errno`.)
#[no_mangle]
pub extern "C" fn tessera_clear_last_error() {
    error::clear_last_error()
}

/// The library's version, e.g. `"0.1.0"`.
#[no_mangle]
pub extern "C" fn tessera_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Allocates `size` bytes on `device` for use on `stream`. Size 0 returns NULL and is no error. On
/// failure returns NULL and records the error; out of memory is `TESSERA_ERROR_OUT_OF_MEMORY`
/// with a message that starts with `CUDA out of memory.` and says why. The C API; PyTorch's
/// `alloc_fn` is `tessera_torch_malloc`, since PyTorch does not check for NULL.
#[no_mangle]
pub extern "C" fn tessera_malloc(size: usize, device: c_int, stream: cudaStream_t) -> *mut c_void {
    if size == 0 {
        return std::ptr::null_mut();
    }
    guard(std::ptr::null_mut(), || {
        let t = allocator()?;
        let dev = device_index(t, device)?;
        Ok(t.allocate(dev, size as u64, self::stream(stream))? as *mut c_void)
    })
}

extern "C-unwind" {
    /// Throws a C++ `std::runtime_error` carrying `message` (`torch_oom.cpp`).
    fn tessera_throw_runtime_error(message: *const c_char) -> !;
}

/// As `tessera_malloc`, but a failure (size > 0) throws a C++ `std::runtime_error` whose `what()`
/// is the error message, instead of returning NULL: PyTorch's `alloc_fn`. PyTorch does not check
/// its allocator's result for NULL but calls it through a C++ `std::function`, so the exception
/// reaches Python as a `RuntimeError` that starts with `CUDA out of memory.`. Use it only from
/// C++ callers that catch.
#[no_mangle]
pub extern "C-unwind" fn tessera_torch_malloc(
    size: usize,
    device: c_int,
    stream: cudaStream_t,
) -> *mut c_void {
    let p = tessera_malloc(size, device, stream);
    if p.is_null() && size != 0 {
        // Should no error have been recorded (the slot works even in thread teardown, so this is
        // defensive), say so rather than throw "".
        let message = match error::last_error_code() {
            TESSERA_OK => c"tessera: allocation failed (no error could be recorded)".as_ptr(),
            _ => error::last_error_ptr(),
        };
        // SAFETY: the message is NUL-terminated and alive until this thread's next failing
        // call (or static); the C++ side copies it before throwing. No Rust value with a
        // destructor is alive in this frame, so the exception unwinds through it skipping no drop.
        unsafe { tessera_throw_runtime_error(message) }
    }
    p
}

/// Frees an allocation. NULL does nothing. `size` and `stream` are ignored (tessera knows both);
/// `device` >= 0 names the device, a negative one lets tessera find it by pointer. An unknown,
/// interior or double free changes nothing: it records the error, is counted in the device's
/// `invalid_frees`, and prints one line to stderr. PyTorch's `free_fn`.
#[no_mangle]
pub extern "C" fn tessera_free(ptr: *mut c_void, size: usize, device: c_int, stream: cudaStream_t) {
    let _ = (size, stream);
    if ptr.is_null() {
        return;
    }
    guard((), || {
        let t = allocator()?;
        let r = match device {
            d if d < 0 => t.free_any(ptr as u64),
            d => t.free(device_index(t, d)?, ptr as u64),
        };
        r.map_err(|e| {
            let _ = writeln!(std::io::stderr(), "tessera: tessera_free({ptr:p}): {e}");
            e.into()
        })
    })
}

/// Waits for the streams that used freed memory, then releases every fully free page of `device`
/// (-1: of every device) to the driver. Returns the bytes released; 0 and an error on failure.
#[no_mangle]
pub extern "C" fn tessera_empty_cache(device: c_int) -> usize {
    guard(0, || {
        let t = allocator()?;
        let released = match device {
            -1 => t.empty_cache_all()?,
            d => t.empty_cache(device_index(t, d)?)?,
        };
        Ok(released as usize)
    })
}

/// Empties every device's cache: PyTorch's `reset_fn`, which `torch.cuda.empty_cache()` calls.
#[no_mangle]
pub extern "C" fn tessera_reset() {
    tessera_empty_cache(-1);
}

/// Limits `device` to `fraction` (in [0, 1], as PyTorch allows) of its memory: PyTorch's
/// `memory_fraction_fn`.
#[no_mangle]
pub extern "C" fn tessera_set_memory_fraction(fraction: c_double, device: c_int) {
    guard((), || {
        let t = allocator()?;
        if !(0.0..=1.0).contains(&fraction) {
            return Err(FfiError::invalid_argument(format!(
                "memory fraction {fraction} is not in [0, 1]"
            )));
        }
        Ok(t.set_memory_fraction(device_index(t, device)?, fraction)?)
    })
}

/// `tessera_stats.limit_bytes` when no limit is in force, and the `tessera_set_limit` value that
/// removes the byte limit.
pub const TESSERA_NO_LIMIT: u64 = u64::MAX;

/// Limits the memory `device` may reserve to `bytes` (0: no new memory at all);
/// `TESSERA_NO_LIMIT` removes the byte limit. A memory fraction is a separate cap: the smaller of
/// the two is in force. Returns 0 or an error code.
#[no_mangle]
pub extern "C" fn tessera_set_limit(device: c_int, bytes: u64) -> c_int {
    status(|| {
        let t = allocator()?;
        let limit = (bytes != TESSERA_NO_LIMIT).then_some(bytes);
        Ok(t.set_limit(device_index(t, device)?, limit)?)
    })
}

/// Marks the allocation holding `ptr` as used on `stream` too: its memory is not reused until the
/// work queued on `stream` before its free has finished. PyTorch's `record_stream_fn`.
#[no_mangle]
pub extern "C" fn tessera_record_stream(ptr: *mut c_void, stream: cudaStream_t) {
    guard((), || {
        Ok(allocator()?.record_stream(ptr as u64, self::stream(stream))?)
    })
}

/// The start of the live allocation holding `ptr` (which may point inside it), with its size
/// (rounded up as tessera holds it, e.g. 1000 B gives 1024) in `*size` when `size` is not NULL. NULL and an error for a pointer tessera did not hand out.
/// PyTorch's `base_alloc_fn`.
///
/// # Safety
/// `size` is NULL or points to a writable `size_t`.
#[no_mangle]
pub unsafe extern "C" fn tessera_base_alloc(ptr: *mut c_void, size: *mut usize) -> *mut c_void {
    guard(std::ptr::null_mut(), || {
        let a = allocator()?
            .allocation(ptr as u64)
            .ok_or(Error::UnknownPointer {
                ptr: ptr as u64,
                device: None,
                interior_of: None,
            })?;
        if !size.is_null() {
            // SAFETY: `size` is non-NULL and writable (the caller's contract).
            unsafe { size.write(a.size as usize) };
        }
        Ok(a.base as *mut c_void)
    })
}

/// Makes the allocator now (PyTorch's `init_fn`, called when CUDA is initialised). Records an
/// error if the driver sees fewer than `device_count` devices.
#[no_mangle]
pub extern "C" fn tessera_init(device_count: c_int) {
    guard((), || {
        let t = allocator()?;
        match usize::try_from(device_count) {
            Ok(n) if n <= t.device_count() => Ok(()),
            _ => Err(FfiError::new(
                TESSERA_ERROR_INVALID_DEVICE,
                format!(
                    "tessera_init({device_count}): the driver sees {} device(s)",
                    t.device_count()
                ),
            )),
        }
    })
}

/// The number of devices, or -1 and an error (no GPU, a bad `TESSERA_DRIVER`).
#[no_mangle]
pub extern "C" fn tessera_device_count() -> c_int {
    guard(-1, || {
        Ok(c_int::try_from(allocator()?.device_count()).unwrap_or(c_int::MAX))
    })
}

/// Fills `*out` with `device`'s statistics. Set `out->size = sizeof(tessera_stats)` first: the
/// library writes that many bytes at most (an older, smaller struct gets the fields it knows) and
/// sets `out->size` to the bytes written. Returns 0 or an error code.
///
/// # Safety
/// `out` is NULL or points to at least `out->size` writable bytes.
#[no_mangle]
pub unsafe extern "C" fn tessera_get_stats(device: c_int, out: *mut tessera_stats) -> c_int {
    status(|| {
        let t = allocator()?;
        let s = t.stats(device_index(t, device)?)?;
        // SAFETY: forwarded from this function's own contract.
        unsafe { stats::write_stats(out, &s) }
    })
}

/// Restarts `device`'s peak figures from the current ones. Returns 0 or an error code.
#[no_mangle]
pub extern "C" fn tessera_reset_peak_stats(device: c_int) -> c_int {
    status(|| {
        let t = allocator()?;
        Ok(t.reset_peak_stats(device_index(t, device)?)?)
    })
}

/// Checks every invariant of `device`'s pools. Returns 0, or `TESSERA_ERROR_INTERNAL` with the
/// first broken invariant as the message (a bug in tessera).
#[no_mangle]
pub extern "C" fn tessera_check_invariants(device: c_int) -> c_int {
    status(|| {
        let t = allocator()?;
        let dev = device_index(t, device)?;
        t.stats(dev)?; // a device that cannot be set up is its own error, not a broken invariant
        t.check_invariants(dev)
            .map_err(|broken| FfiError::new(TESSERA_ERROR_INTERNAL, broken))
    })
}

/// A C hook with its user pointer, callable from any thread.
struct CHook {
    // "C-unwind": a C++ hook that throws despite the rule is then caught by the calling entry
    // point's guard (and the process aborts, as Rust does for a foreign exception) instead of
    // being undefined behaviour.
    hook: unsafe extern "C-unwind" fn(c_int, usize, *mut c_void) -> usize,
    user: *mut c_void,
}

// SAFETY: `tessera_add_oom_hook`'s contract: the hook may be called from any thread with `user`,
// which tessera never dereferences itself.
unsafe impl Send for CHook {}
// SAFETY: as for Send; tessera only copies the pointer.
unsafe impl Sync for CHook {}

/// Registers an eviction hook (see `tessera_oom_hook`); hooks run in registration order. Returns
/// its id (>= 0), or -1 and an error for a NULL hook.
///
/// # Safety
/// `hook` may be called from any thread, with `user`, until it is removed.
#[no_mangle]
pub unsafe extern "C" fn tessera_add_oom_hook(hook: tessera_oom_hook, user: *mut c_void) -> c_int {
    guard(-1, || {
        let hook =
            hook.ok_or_else(|| FfiError::invalid_argument("tessera_add_oom_hook: NULL hook"))?;
        let t = allocator()?;
        let c = CHook { hook, user };
        let id = t.add_oom_hook(move |device, requested| {
            let c = &c;
            // SAFETY: the registration's contract: callable from any thread with `user`.
            unsafe {
                (c.hook)(
                    c_int::try_from(device).unwrap_or(c_int::MAX),
                    usize::try_from(requested).unwrap_or(usize::MAX),
                    c.user,
                );
            }
        });
        c_int::try_from(id.0).map_err(|_| {
            t.remove_oom_hook(id);
            FfiError::invalid_argument("tessera_add_oom_hook: too many hooks registered")
        })
    })
}

/// Removes a hook. Returns 0, or `TESSERA_ERROR_INVALID_ARGUMENT` for an id that is not registered.
#[no_mangle]
pub extern "C" fn tessera_remove_oom_hook(id: c_int) -> c_int {
    status(|| {
        let t = allocator()?;
        if u64::try_from(id).is_ok_and(|id| t.remove_oom_hook(HookId(id))) {
            Ok(())
        } else {
            Err(FfiError::invalid_argument(format!(
                "tessera_remove_oom_hook({id}): no such hook"
            )))
        }
    })
}

/// Writes `device`'s snapshot (every segment and block, and the stats) as JSON, as `snprintf`
/// does: returns the JSON's length (without the NUL) and writes at most `len - 1` bytes and a NUL
/// when `len > 0`; `buf` may be NULL when `len` is 0. Returns 0 and an error on failure.
///
/// # Safety
/// `buf` points to `len` writable bytes, or `len` is 0.
#[no_mangle]
pub unsafe extern "C" fn tessera_snapshot_json(
    device: c_int,
    buf: *mut c_char,
    len: usize,
) -> usize {
    guard(0, || {
        let t = allocator()?;
        // Bad arguments change nothing: checked before the snapshot (which drains the thread
        // caches).
        if len > 0 && buf.is_null() {
            return Err(FfiError::invalid_argument(
                "tessera_snapshot_json: buf is NULL but len is not 0",
            ));
        }
        let snap = t.snapshot(device_index(t, device)?)?;
        let json = serde_json::to_string(&snap)
            .map_err(|e| FfiError::new(TESSERA_ERROR_INTERNAL, e.to_string()))?;
        if len > 0 {
            let n = json.len().min(len - 1);
            // SAFETY: `buf` has `len > n` writable bytes (the caller's contract); `json` has at
            // least `n` readable bytes; they do not overlap (`json` is ours).
            unsafe {
                std::ptr::copy_nonoverlapping(json.as_ptr(), buf.cast::<u8>(), n);
                buf.add(n).write(0);
            }
        }
        Ok(json.len())
    })
}

/// Writes the allocator's segments and blocks as a PyTorch memory snapshot: the pickle that
/// `torch.cuda.memory._snapshot()` returns and `_dump_snapshot()` writes, which PyTorch's memory
/// viewer opens (`device_traces` are empty: tessera records no history). `device` is a device
/// index, or -1 for every device the allocator has used.
///
/// Returns the pickle's length in bytes; writes it to `buf` only when it fits (`len` at least that
/// length), so that a caller asks with `len` 0 (and `buf` NULL), then again with a buffer of the
/// length returned (and again should the allocator have changed in between). Returns 0 and an
/// error on failure.
///
/// # Safety
/// `buf` points to `len` writable bytes, or `len` is 0.
#[no_mangle]
pub unsafe extern "C" fn tessera_memory_snapshot_pickle(
    device: c_int,
    buf: *mut u8,
    len: usize,
) -> usize {
    guard(0, || {
        let t = allocator()?;
        if len > 0 && buf.is_null() {
            return Err(FfiError::invalid_argument(
                "tessera_memory_snapshot_pickle: buf is NULL but len is not 0",
            ));
        }
        let devices: Vec<usize> = if device == -1 {
            t.used_devices()
        } else {
            vec![device_index(t, device)?]
        };
        let mut snapshots = Vec::with_capacity(devices.len());
        for d in devices {
            snapshots.push(t.snapshot(d)?);
        }
        let pickle = tessera_core::torch_snapshot::snapshot_pickle(&snapshots, t.device_count());
        if len > 0 && pickle.len() <= len {
            // SAFETY: `buf` has `len >= pickle.len()` writable bytes (the caller's contract);
            // `pickle` is ours, so they do not overlap.
            unsafe { std::ptr::copy_nonoverlapping(pickle.as_ptr(), buf, pickle.len()) };
        }
        Ok(pickle.len())
    })
}

/// Configures the allocator in the `TESSERA_CONF` syntax (e.g. `"backend:vmm,limit:8GiB"`),
/// overriding `TESSERA_CONF`. Returns 0, or `TESSERA_ERROR_CONFIG` for a bad string or when the
/// allocator was already made (configure before the first allocation).
///
/// # Safety
/// `conf` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tessera_configure(conf: *const c_char) -> c_int {
    status(|| {
        if conf.is_null() {
            return Err(FfiError::invalid_argument(
                "tessera_configure: conf is NULL",
            ));
        }
        // SAFETY: non-NULL and NUL-terminated (the caller's contract).
        let text = unsafe { CStr::from_ptr(conf) }
            .to_str()
            .map_err(|_| Error::Config("tessera_configure: the string is not UTF-8".into()))?;
        Ok(tessera_core::configure_global(Config::parse(text)?)?)
    })
}
