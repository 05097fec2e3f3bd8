//! CUDA graphs at the C boundary: routing allocations to a private pool, and PyTorch's three
//! graph hooks (`torch_graphs.cpp` adapts their C++ signatures to these functions; their
//! addresses come from [`tessera_torch_graph_hook`], since a cdylib exports only Rust's symbols).
//!
//! # Data
//! A route's filter is a C function with a context pointer; tessera owns the context from the
//! call on (success or not) and gives it back through `drop_ctx` exactly once: when the route
//! ends, when the begin call fails, or when the allocator goes away.
//!
//! # Locking
//! The filter and `drop_ctx` run with the device lock held: neither may call tessera.

use super::error::{status, FfiError};
use super::{allocator, cudaStream_t, device_index};
use std::ffi::{c_char, c_int, c_void, CStr};
use tessera_core::driver::Stream;
use tessera_core::MempoolId;

/// Says whether an allocation on `stream` goes to the route's pool. Must not call tessera, throw
/// or unwind.
pub type tessera_stream_filter =
    Option<unsafe extern "C" fn(ctx: *mut c_void, stream: cudaStream_t) -> bool>;

/// Frees a filter's context. Must not call tessera, throw or unwind.
pub type tessera_filter_drop = Option<unsafe extern "C" fn(ctx: *mut c_void)>;

/// A C filter and its context, owned by a route.
struct CFilter {
    call: unsafe extern "C" fn(*mut c_void, cudaStream_t) -> bool,
    ctx: *mut c_void,
    drop_ctx: tessera_filter_drop,
}

// SAFETY: `tessera_begin_allocate_to_pool`'s contract: the filter may be called, and the context
// dropped, from any thread; tessera never dereferences `ctx` itself.
unsafe impl Send for CFilter {}

impl CFilter {
    fn accepts(&self, stream: Stream) -> bool {
        // SAFETY: the begin call's contract: `call` may be called with `ctx` until `drop_ctx`.
        unsafe { (self.call)(self.ctx, stream.0 as cudaStream_t) }
    }
}

impl Drop for CFilter {
    fn drop(&mut self) {
        if let Some(d) = self.drop_ctx {
            // SAFETY: the contract: `drop_ctx(ctx)` is called once, after the last filter call.
            unsafe { d(self.ctx) }
        }
    }
}

/// Starts routing the allocations on `device` whose stream `filter` accepts to the private pool
/// `(id_first, id_second)` (PyTorch's `MempoolId_t`), creating the pool or adding a use to it:
/// PyTorch's `beginAllocateToPool`, called before a CUDA graph capture begins. Until
/// `tessera_end_allocate_to_pool`, no device unmaps, releases or queries events (each would
/// invalidate the capture), and the pool's memory serves only the pool until
/// `tessera_release_pool` drops its last use. If several routes are open, the first whose
/// filter accepts a stream takes it.
///
/// tessera owns `ctx` from this call on: `drop_ctx` (if not NULL) is called with it once, when the
/// route ends, or before this function returns if it fails. Returns 0, or an error code:
/// `TESSERA_ERROR_PRIVATE_POOL` when the pool is already routed to, or the id is (0, 0).
///
/// # Safety
/// `filter` may be called with `ctx` and a stream, and `drop_ctx` with `ctx`, from any thread
/// with tessera's device lock held: neither may call tessera, throw or unwind.
#[no_mangle]
pub unsafe extern "C" fn tessera_begin_allocate_to_pool(
    device: c_int,
    id_first: u64,
    id_second: u64,
    filter: tessera_stream_filter,
    ctx: *mut c_void,
    drop_ctx: tessera_filter_drop,
) -> c_int {
    // Owned first, so that every way out (error or panic) drops the context once.
    let owned = filter.map(|call| CFilter {
        call,
        ctx,
        drop_ctx,
    });
    if owned.is_none() {
        if let Some(d) = drop_ctx {
            // SAFETY: the contract: `drop_ctx(ctx)` once; there is no filter to call.
            unsafe { d(ctx) }
        }
    }
    status(move || {
        let f = owned.ok_or_else(|| {
            FfiError::invalid_argument("tessera_begin_allocate_to_pool: NULL filter")
        })?;
        let t = allocator()?;
        let dev = device_index(t, device)?;
        let id = MempoolId(id_first, id_second);
        Ok(t.begin_allocate_to_pool(dev, id, Box::new(move |s| f.accepts(s)))?)
    })
}

/// Stops routing allocations to the private pool: PyTorch's `endAllocateToPool`, called after
/// the capture ends. The route's filter context is dropped. Returns 0, or
/// `TESSERA_ERROR_PRIVATE_POOL` when nothing is routed to that pool.
#[no_mangle]
pub extern "C" fn tessera_end_allocate_to_pool(
    device: c_int,
    id_first: u64,
    id_second: u64,
) -> c_int {
    status(|| {
        let t = allocator()?;
        Ok(t.end_allocate_to_pool(device_index(t, device)?, MempoolId(id_first, id_second))?)
    })
}

/// Drops a use of the private pool: PyTorch's `releasePool`, called when a graph is destroyed.
/// At zero uses the pool is released: once the device is idle (the graph's last replay may still
/// run), the next allocation miss, `tessera_empty_cache` or compaction outside a capture
/// synchronizes the device and gives its free memory to the ordinary cache; its live allocations
/// join it when freed.
/// Returns 0, or `TESSERA_ERROR_PRIVATE_POOL` for a pool with no use left (or the last use of a
/// pool still routed to).
#[no_mangle]
pub extern "C" fn tessera_release_pool(device: c_int, id_first: u64, id_second: u64) -> c_int {
    status(|| {
        let t = allocator()?;
        Ok(t.release_pool(device_index(t, device)?, MempoolId(id_first, id_second))?)
    })
}

extern "C" {
    // `torch_graphs.cpp`. Their real parameters are C++ types (a `std::pair` and a
    // `std::function` by value) that Rust cannot name: they are declared without parameters,
    // never called from Rust, and only their addresses are handed out.
    fn tessera_torch_begin_allocate_to_pool();
    fn tessera_torch_end_allocate_to_pool();
    fn tessera_torch_release_pool();
}

/// The address of the C++ function PyTorch's `torch._C._CUDAPluggableAllocator` setter `setter`
/// takes: `"set_begin_allocate_to_pool"` (a `void(int, MempoolId_t,
/// std::function<bool(cudaStream_t)>)`), `"set_end_allocate_to_pool_fn"` or `"set_release_pool"`
/// (each a `void(int, MempoolId_t)`). PyTorch's binding `reinterpret_cast`s the address to that
/// type and calls it; the function forwards to `tessera_begin_allocate_to_pool` (taking the
/// filter over), `tessera_end_allocate_to_pool` or `tessera_release_pool`. A refused begin or end
/// throws a C++ `std::runtime_error` with tessera's message; a refused release (which PyTorch
/// calls from a destructor) prints it to stderr and leaves it as the last error. NULL and
/// `TESSERA_ERROR_INVALID_ARGUMENT` for any other name.
///
/// # Safety
/// `setter` is NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn tessera_torch_graph_hook(setter: *const c_char) -> *const c_void {
    super::error::guard(std::ptr::null(), || {
        if setter.is_null() {
            return Err(FfiError::invalid_argument(
                "tessera_torch_graph_hook: NULL setter",
            ));
        }
        // SAFETY: the contract: a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(setter) }.to_string_lossy();
        let f: unsafe extern "C" fn() = match &*name {
            "set_begin_allocate_to_pool" => tessera_torch_begin_allocate_to_pool,
            "set_end_allocate_to_pool_fn" => tessera_torch_end_allocate_to_pool,
            "set_release_pool" => tessera_torch_release_pool,
            other => {
                return Err(FfiError::invalid_argument(format!(
                    "tessera_torch_graph_hook: no hook for setter {other:?} (set_begin_allocate_to_pool, \
                     set_end_allocate_to_pool_fn, set_release_pool)"
                )))
            }
        };
        Ok(f as *const c_void)
    })
}
