//! Typed device memory for Rust GPU code: [`DeviceBuffer`], and [`CudaBuffer`] for cudarc.
//!
//! # Data structure
//! A [`DeviceBuffer<'a, T>`](DeviceBuffer) is one tessera allocation seen as `len` values of `T`:
//! the allocator it came from (`&'a Tessera`), the device index, the device pointer, the element
//! count and the stream the buffer is used on. Its byte length is `len * size_of::<T>()`. A buffer
//! of zero bytes (zero elements, or a zero-sized `T`) allocates nothing and holds the pointer 0.
//! Host copies ([`copy_from_slice`](DeviceBuffer::copy_from_slice),
//! [`copy_to_slice`](DeviceBuffer::copy_to_slice), [`to_vec`](DeviceBuffer::to_vec)) and the
//! memset of [`zeroed`](DeviceBuffer::zeroed) are queued on that stream through the allocator's
//! driver; the copies return once done. [`Drop`] frees the allocation with [`Tessera::free`].
//!
//! A [`CudaBuffer<'a, T>`](CudaBuffer) is a `DeviceBuffer` plus the cudarc
//! [`CudaStream`] it is used on (tessera's [`Stream`] is that stream's handle). It implements
//! cudarc's [`DeviceSlice`], [`DevicePtr`](cudarc::driver::DevicePtr) and [`DevicePtrMut`], so
//! cudarc's own copies and memsets take it (the list is in [`CudaBuffer`]'s documentation), and
//! both types are kernel arguments for cudarc's launch builder (`builder.arg(&buf)`).
//!
//! # Invariants
//! - `ptr` is 0 exactly when the byte length is 0. Otherwise `ptr` is the start of a live tessera
//!   allocation of `alloc` on `device`, of at least the byte length, that this buffer alone owns
//!   and frees (once, in `Drop`, unless [`into_raw`](DeviceBuffer::into_raw) gave it away).
//! - The byte length fits in `isize`, so a host slice or `Vec` of the buffer's length is valid.
//! - Unless the buffer came from the `unsafe` [`DeviceBuffer::uninit`], every element holds a valid
//!   `T` whenever the host can read it: [`from_slice`](DeviceBuffer::from_slice) and
//!   [`copy_from_slice`](DeviceBuffer::copy_from_slice) copy valid `T`s in, and
//!   [`zeroed`](DeviceBuffer::zeroed) writes zeros, valid for every [`DeviceCopy`]. Reading back
//!   does not rely on this invariant for soundness (see below), only for meaningful values.
//! - Every later operation on a buffer is ordered after the earlier ones: tessera's host copies
//!   and memsets run on the buffer's stream; [`set_stream`](DeviceBuffer::set_stream) makes the new
//!   stream wait for the work queued on the old one before switching; a `CudaBuffer` used by cudarc
//!   on another stream makes that stream wait for its own (`CudaStream::join`).
//! - Memory is not reused while a stream may still use it: tessera frees on the allocation's
//!   stream (stream-ordered reuse), and every other stream the buffer was used on is recorded with
//!   [`Tessera::record_stream`], so a free waits for their work too.
//!
//! # Safety argument
//! - **Use after the allocator is gone** cannot compile: the buffer borrows its allocator, so the
//!   allocator (and with it the driver) outlives every buffer ([`DeviceBuffer`]'s documentation
//!   shows the compile error). [`crate::global()`] gives a `&'static Tessera`, whose buffers may
//!   live anywhere.
//! - **Wrong device, bad sizes, short slices, driver failures** are [`Error`]s: a device index
//!   outside the allocator's devices is [`Error::InvalidDevice`] (checked even for empty
//!   buffers), a byte length that overflows or exceeds `isize::MAX` is [`Error::InvalidSize`], as
//!   is a host slice whose length differs from the buffer's, and a failed copy (for instance on a
//!   simulated device without host memory behind it) is [`Error::Driver`]. A cudarc stream of
//!   another device, or a `CudaBuffer` over the simulated device (whose pointers are host
//!   addresses that no kernel can use), is [`Error::Unsupported`]. Nothing here panics.
//! - **Reading device memory into host values** is sound because of the invariants above: the
//!   bytes copied back form valid `T`s. `T: DeviceCopy` (cudarc's `unsafe` marker for plain data,
//!   which also covers `bool`) is not enough alone, since not every bit pattern is a valid `T`;
//!   that is why [`DeviceBuffer::uninit`] is an `unsafe fn` (its memory holds whatever it held
//!   before, possibly another type's bytes), and [`DeviceBuffer::zeroed`] needs `ValidAsZeroBits`.
//!   [`to_vec`](DeviceBuffer::to_vec) zeroes its new `Vec`'s bytes before the driver writes into
//!   them, so the byte slice it hands the driver never covers uninitialised memory.
//! - **Byte views of host slices**: the driver takes `&[u8]` / `&mut [u8]`, so the copies view a
//!   `[T]` as bytes. For a `T` without padding (every primitive, arrays of them, `#[repr(C)]`
//!   structs without gaps) those bytes are initialised and the view is plainly sound. The padding
//!   bytes of a padded `T` are only moved by the driver as bytes, never read as values by Rust
//!   code; whether a byte reference may cover them at all is still undecided in Rust's memory
//!   model, so prefer types without padding (as cudarc's kernels want anyway).
//! - **Drop** never panics: an error from the free is ignored, since a destructor has nobody to
//!   report it to (the allocator's stats count rejected frees, `invalid_frees`).
//!
//! # Streams and cudarc
//! tessera records events on a freed buffer's streams lazily, so a CUDA stream must not be
//! destroyed while tessera may still record on it ([`CudaBuffer`]'s documentation says what to do).

use crate::driver::{DevicePtr, Driver, Stream};
use crate::error::{Error, Result};
use crate::Tessera;
pub use cudarc::driver::DeviceRepr;
use cudarc::driver::{
    CudaStream, DevicePtrMut, DeviceSlice, LaunchArgs, PushKernelArg, SyncOnDrop,
};

/// Plain data that may live in a [`DeviceBuffer`] and be copied back to the host: every bit
/// pattern of `size_of::<T>()` bytes is a valid `T`, and `T` has no padding. Implemented for the
/// integer and float primitives and arrays of them.
///
/// Why more than cudarc's [`DeviceRepr`]: device memory can hold any bytes. A safe raw call
/// ([`Tessera::free`] of a buffer's pointer, a driver copy) can make two buffers share memory, and
/// a kernel may write anything; reading those bytes back as a `bool` or an enum would be undefined
/// behaviour, as a `u32` or an `f32` it is only a wrong value. No padding makes the byte views of
/// host slices that the copies take fully initialised.
///
/// # Safety
/// Implement it only for `#[repr(C)]` (or `#[repr(transparent)]`) types without padding whose
/// fields are all `DeviceCopy`.
///
/// ```
/// #[derive(Clone, Copy)]
/// #[repr(C)]
/// struct Pair {
///     a: f32,
///     b: u32,
/// }
/// // SAFETY: repr(C), two 4-byte fields, no padding, every bit pattern valid.
/// unsafe impl tessera::DeviceRepr for Pair {}
/// // SAFETY: as above.
/// unsafe impl tessera::DeviceCopy for Pair {}
/// ```
///
/// `bool` is not `DeviceCopy`:
///
/// ```compile_fail
/// # use std::sync::Arc;
/// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
/// # use tessera::{Config, DeviceBuffer, Tessera};
/// let alloc = Tessera::new(Arc::new(SimDriver::new(SimConfig::default())), Config::default()).unwrap();
/// let b = DeviceBuffer::from_slice(&alloc, 0, &[true], Stream::DEFAULT);
/// ```
pub unsafe trait DeviceCopy: DeviceRepr + Copy + 'static {}

macro_rules! device_copy {
    ($($t:ty),*) => {
        // SAFETY: primitive integers and floats: no padding, every bit pattern valid.
        $(unsafe impl DeviceCopy for $t {})*
    };
}
device_copy!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, f32, f64);
// SAFETY: an array of `DeviceCopy` elements has no padding between them (size is a multiple of
// alignment) and is valid for every bit pattern when each element is.
unsafe impl<T: DeviceCopy, const N: usize> DeviceCopy for [T; N] {}
use std::fmt;
use std::marker::PhantomData;
use std::mem::size_of;
use std::ops::Deref;
use std::sync::Arc;

mod cuda;
pub use cuda::CudaBuffer;

/// `len` elements of `T` in bytes, or [`Error::InvalidSize`] when that overflows or exceeds
/// `isize::MAX` (the most a host slice may hold).
fn byte_len_of<T>(len: usize) -> Result<usize> {
    len.checked_mul(size_of::<T>())
        .filter(|&b| b <= isize::MAX as usize)
        .ok_or(Error::InvalidSize {
            size: (len as u64).saturating_mul(size_of::<T>() as u64),
            reason: "the buffer's byte length (len × size_of::<T>()) exceeds isize::MAX",
        })
}

/// [`Error::InvalidDevice`] unless `device` is one of the allocator's devices.
fn check_device(alloc: &Tessera, device: usize) -> Result<()> {
    let count = alloc.device_count();
    if device < count {
        Ok(())
    } else {
        Err(Error::InvalidDevice {
            device: i64::try_from(device).unwrap_or(i64::MAX),
            count,
        })
    }
}

/// The error for a host slice of the wrong length.
fn length_mismatch(host_bytes: usize) -> Error {
    Error::InvalidSize {
        size: host_bytes as u64,
        reason: "the host slice's length is not the buffer's length",
    }
}

/// The error for a cudarc stream of another device than the buffer's.
fn device_mismatch(buffer: usize, stream: usize) -> Error {
    Error::Unsupported(format!(
        "the buffer is on device {buffer} but the stream belongs to device {stream}"
    ))
}

/// Makes later work on `to` wait for the work queued on `from` so far (`CudaStream::join`).
fn order_after(drv: &dyn Driver, device: usize, from: Stream, to: Stream) -> Result<()> {
    let event = drv.event_create(device)?;
    let ordered = drv
        .event_record(device, event, from)
        .and_then(|()| drv.stream_wait_event(device, to, event));
    // The wait captured the event's state: destroying it now is allowed.
    let destroyed = drv.event_destroy(device, event);
    ordered?;
    destroyed?;
    Ok(())
}

/// `len` values of `T` in device memory from a tessera allocator, freed when dropped.
///
/// Made from host data ([`from_slice`](Self::from_slice)), zeroed ([`zeroed`](Self::zeroed)) or
/// left as the memory was ([`uninit`](Self::uninit), `unsafe`); copied to and from host slices on
/// its stream; freed when dropped. [`CudaBuffer`] is the same buffer on a cudarc stream, for
/// cudarc's copies; both are cudarc kernel arguments.
///
/// # Soundness
/// - The buffer borrows its allocator, so it cannot outlive it (with [`crate::global()`] the
///   borrow is `'static`):
///
///   ```compile_fail,E0597
///   # use std::sync::Arc;
///   # use tessera::driver::{sim::SimDriver, Stream};
///   # use tessera::{Config, DeviceBuffer, Tessera};
///   let buf = {
///       let alloc = Tessera::new(Arc::new(SimDriver::with_capacity(1 << 30)), Config::default()).unwrap();
///       DeviceBuffer::from_slice(&alloc, 0, &[1u32, 2, 3], Stream::DEFAULT).unwrap()
///   }; // error[E0597]: `alloc` does not live long enough
///   # drop(buf);
///   ```
/// - A device index that is not the allocator's, a byte length beyond `isize::MAX`, a host slice
///   of another length and a failed driver call are [`Error`]s, never panics.
/// - Its elements are valid `T`s whenever the host reads them: only the `unsafe`
///   [`uninit`](Self::uninit) leaves them as the memory was, and kernels (launched with cudarc's
///   `unsafe` `launch`) must write valid `T`s. `T` is plain data (`DeviceRepr`); prefer types
///   without padding bytes, which the copies pass to the driver as bytes.
/// - Its memory is reused only after the work queued on its streams: the allocation's stream, and
///   those given to [`record_stream`](Self::record_stream) or [`set_stream`](Self::set_stream).
///
/// ```
/// use std::sync::Arc;
/// use tessera::driver::sim::{SimConfig, SimDriver};
/// use tessera::driver::Stream;
/// use tessera::{Config, DeviceBuffer, Tessera};
///
/// let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
/// let alloc = Tessera::new(sim, Config::default())?;
/// let mut buf = DeviceBuffer::from_slice(&alloc, 0, &[1.0f32, 2.0, 3.0], Stream::DEFAULT)?;
/// buf.copy_from_slice(&[4.0, 5.0, 6.0])?;
/// assert_eq!(buf.to_vec()?, [4.0, 5.0, 6.0]);
/// drop(buf); // freed
/// assert_eq!(alloc.stats(0)?.active_blocks, 0);
/// # Ok::<(), tessera::Error>(())
/// ```
pub struct DeviceBuffer<'a, T: DeviceCopy> {
    alloc: &'a Tessera,
    device: usize,
    ptr: DevicePtr,
    len: usize,
    stream: Stream,
    /// The buffer owns `len` values of `T` (in device memory).
    _owns: PhantomData<T>,
}

impl<'a, T: DeviceCopy> DeviceBuffer<'a, T> {
    /// Allocates room for `len` elements. The contents are whatever the memory held.
    fn allocate(alloc: &'a Tessera, device: usize, len: usize, stream: Stream) -> Result<Self> {
        check_device(alloc, device)?;
        let bytes = byte_len_of::<T>(len)?;
        let ptr = if bytes == 0 {
            0
        } else {
            alloc.allocate(device, bytes as u64, stream)?
        };
        Ok(DeviceBuffer {
            alloc,
            device,
            ptr,
            len,
            stream,
            _owns: PhantomData,
        })
    }

    /// A buffer of `len` elements on `device`, used on `stream`, whose contents are left as the
    /// memory held them (no memset).
    ///
    /// # Safety
    /// Until every element has been written (by [`copy_from_slice`](Self::copy_from_slice), a
    /// kernel, or a cudarc copy into a [`CudaBuffer`]), the buffer may hold bytes that are not a
    /// valid `T` (freed memory of any type). Reading such an element into host memory
    /// ([`to_vec`](Self::to_vec), [`copy_to_slice`](Self::copy_to_slice), cudarc's `clone_dtoh`)
    /// is undefined behaviour, unless every bit pattern is a valid `T` (integers, floats and
    /// arrays of them, where it only gives arbitrary values). Use [`zeroed`](Self::zeroed) or
    /// [`from_slice`](Self::from_slice) when in doubt.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// // SAFETY: every element is written before anything reads it.
    /// let mut buf = unsafe { DeviceBuffer::<u32>::uninit(&alloc, 0, 4, Stream::DEFAULT)? };
    /// buf.copy_from_slice(&[1, 2, 3, 4])?;
    /// assert_eq!(buf.to_vec()?, [1, 2, 3, 4]);
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub unsafe fn uninit(
        alloc: &'a Tessera,
        device: usize,
        len: usize,
        stream: Stream,
    ) -> Result<Self> {
        Self::allocate(alloc, device, len, stream)
    }

    /// A buffer of `len` zero elements on `device`, used on `stream`: an allocation and a memset
    /// queued on `stream` (later work on `stream`, this buffer's copies included, sees zeros).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::<f64>::zeroed(&alloc, 0, 1000, Stream::DEFAULT)?;
    /// assert!(buf.to_vec()?.iter().all(|&x| x == 0.0));
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn zeroed(alloc: &'a Tessera, device: usize, len: usize, stream: Stream) -> Result<Self> {
        let buf = Self::allocate(alloc, device, len, stream)?;
        if buf.ptr != 0 {
            alloc
                .driver()
                .memset(device, buf.ptr, 0, buf.byte_len() as u64, stream)?;
        }
        Ok(buf)
    }

    /// A buffer on `device`, used on `stream`, holding a copy of `data`.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::from_slice(&alloc, 0, &[[1.0f32, 2.0], [3.0, 4.0]], Stream::DEFAULT)?;
    /// assert_eq!(buf.len(), 2);
    /// assert_eq!(buf.to_vec()?, [[1.0, 2.0], [3.0, 4.0]]);
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn from_slice(
        alloc: &'a Tessera,
        device: usize,
        data: &[T],
        stream: Stream,
    ) -> Result<Self> {
        let mut buf = Self::allocate(alloc, device, data.len(), stream)?;
        buf.copy_from_slice(data)?;
        Ok(buf)
    }

    /// Takes ownership of an allocation of `alloc` as a buffer: the inverse of
    /// [`into_raw`](Self::into_raw).
    ///
    /// # Safety
    /// - `ptr` is the start of a live allocation of `alloc` on `device`, of at least
    ///   `len * size_of::<T>()` bytes (or 0 when that is 0), that nothing else frees or uses
    ///   from now on: the buffer frees it when dropped.
    /// - Its memory holds `len` valid values of `T` (or, as after [`uninit`](Self::uninit), the
    ///   caller writes them before reading them to the host).
    /// - Work on other streams than `stream` that uses it has been ordered before `stream`, or
    ///   recorded with [`Tessera::record_stream`].
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::from_slice(&alloc, 0, &[7u16; 8], Stream::DEFAULT)?;
    /// let (ptr, len) = (buf.into_raw(), 8);
    /// // SAFETY: `ptr` came from `into_raw` of a buffer of 8 valid u16 on device 0 and stream 0.
    /// let buf = unsafe { DeviceBuffer::<u16>::from_raw(&alloc, 0, ptr, len, Stream::DEFAULT) };
    /// assert_eq!(buf.to_vec()?, [7; 8]);
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub unsafe fn from_raw(
        alloc: &'a Tessera,
        device: usize,
        ptr: DevicePtr,
        len: usize,
        stream: Stream,
    ) -> Self {
        DeviceBuffer {
            alloc,
            device,
            ptr,
            len,
            stream,
            _owns: PhantomData,
        }
    }

    /// Gives the allocation up without freeing it, and returns its pointer (0 for an empty
    /// buffer): free it with [`Tessera::free`], or take it back with
    /// [`from_raw`](Self::from_raw).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::<u8>::zeroed(&alloc, 0, 4096, Stream::DEFAULT)?;
    /// let ptr = buf.into_raw();
    /// assert_eq!(alloc.stats(0)?.active_blocks, 1, "still allocated");
    /// alloc.free(0, ptr)?;
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn into_raw(self) -> DevicePtr {
        let ptr = self.ptr;
        std::mem::forget(self);
        ptr
    }

    /// Copies `src` into the buffer (host to device, on the buffer's stream; returns once done).
    /// A `src` whose length is not the buffer's is an [`Error::InvalidSize`], and nothing is
    /// copied.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let mut buf = DeviceBuffer::<i32>::zeroed(&alloc, 0, 3, Stream::DEFAULT)?;
    /// buf.copy_from_slice(&[-1, 0, 1])?;
    /// assert_eq!(buf.to_vec()?, [-1, 0, 1]);
    /// assert!(buf.copy_from_slice(&[1, 2]).is_err(), "wrong length");
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn copy_from_slice(&mut self, src: &[T]) -> Result<()> {
        let bytes = self.byte_len();
        if src.len() != self.len {
            return Err(length_mismatch(std::mem::size_of_val(src)));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `src` covers `bytes` bytes (same length as the buffer, whose byte length fits in
        // isize), borrowed for this call; `T: DeviceCopy` has no padding, so they are initialised.
        let src = unsafe { std::slice::from_raw_parts(src.as_ptr().cast::<u8>(), bytes) };
        self.alloc
            .driver()
            .copy_to_device(self.device, self.ptr, src, self.stream)?;
        Ok(())
    }

    /// Copies the buffer into `dst` (device to host, on the buffer's stream; returns once done).
    /// A `dst` whose length is not the buffer's is an [`Error::InvalidSize`], and nothing is
    /// copied.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::from_slice(&alloc, 0, &[1u64, 2, 3], Stream::DEFAULT)?;
    /// let mut host = [0u64; 3];
    /// buf.copy_to_slice(&mut host)?;
    /// assert_eq!(host, [1, 2, 3]);
    /// assert!(buf.copy_to_slice(&mut [0u64; 4]).is_err(), "wrong length");
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn copy_to_slice(&self, dst: &mut [T]) -> Result<()> {
        let bytes = self.byte_len();
        if dst.len() != self.len {
            return Err(length_mismatch(std::mem::size_of_val(dst)));
        }
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: `dst` covers `bytes` bytes of initialised `T`s without padding (`DeviceCopy`),
        // borrowed mutably for this call; whatever bytes the driver writes, every bit pattern is
        // a valid `T` (`DeviceCopy`), so `dst` holds valid `T`s afterwards.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<u8>(), bytes) };
        self.alloc
            .driver()
            .copy_from_device(self.device, dst, self.ptr, self.stream)?;
        Ok(())
    }

    /// The buffer's contents in a new `Vec` (device to host, on the buffer's stream).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::from_slice(&alloc, 0, &[7u16, 9], Stream::DEFAULT)?;
    /// assert_eq!(buf.to_vec()?, [7, 9]);
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn to_vec(&self) -> Result<Vec<T>> {
        // A failed host allocation is an error, not an abort.
        let mut v = Vec::new();
        v.try_reserve_exact(self.len)
            .map_err(|_| Error::InvalidSize {
                size: self.byte_len() as u64,
                reason: "no host memory for a copy of the buffer",
            })?;
        // SAFETY: the capacity holds `len` elements, zeroed here, and the all-zero bit pattern is
        // a valid `T` (`DeviceCopy`: every bit pattern is), so `len` elements are initialised.
        unsafe {
            std::ptr::write_bytes(v.as_mut_ptr(), 0, self.len);
            v.set_len(self.len);
        }
        self.copy_to_slice(&mut v)?;
        Ok(v)
    }

    /// Marks the buffer as used on `stream` too (besides its own): when it is freed, its memory
    /// is not reused until the work queued on `stream` by then has finished
    /// ([`Tessera::record_stream`]). Call it before using the buffer from another stream, e.g. in
    /// a kernel launched there; ordering that work after the buffer's own stream is the
    /// caller's, as in CUDA. An empty buffer has nothing to record.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim.clone(), Config::default())?;
    /// let other = Stream(7);
    /// sim.hold_stream(0, other); // the simulated work on `other` is still running
    /// let buf = DeviceBuffer::<f32>::zeroed(&alloc, 0, 1 << 20, Stream::DEFAULT)?;
    /// buf.record_stream(other)?;
    /// let old = buf.as_raw();
    /// drop(buf);
    /// let next = DeviceBuffer::<f32>::zeroed(&alloc, 0, 1 << 20, Stream::DEFAULT)?;
    /// assert_ne!(next.as_raw(), old, "not reused while `other` may still use it");
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn record_stream(&self, stream: Stream) -> Result<()> {
        if self.ptr == 0 {
            return Ok(());
        }
        self.alloc.record_stream(self.ptr, stream)
    }

    /// Moves the buffer to `stream`: later copies and memsets go there, `stream` first waits for
    /// the work queued on the old stream (an event recorded there), and the buffer is recorded as
    /// used on `stream` ([`record_stream`](Self::record_stream)) so that its free waits for it.
    /// On an error the buffer stays on its old stream.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let mut buf = DeviceBuffer::from_slice(&alloc, 0, &[1u8, 2, 3], Stream::DEFAULT)?;
    /// buf.set_stream(Stream(5))?;
    /// assert_eq!(buf.stream(), Stream(5));
    /// assert_eq!(buf.to_vec()?, [1, 2, 3]);
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn set_stream(&mut self, stream: Stream) -> Result<()> {
        if stream == self.stream {
            return Ok(());
        }
        if self.ptr != 0 {
            self.alloc.record_stream(self.ptr, stream)?;
            order_after(&**self.alloc.driver(), self.device, self.stream, stream)?;
        }
        self.stream = stream;
        Ok(())
    }

    /// The buffer as a [`CudaBuffer`] on the cudarc stream `stream`, which must belong to the
    /// buffer's device ([`Error::Unsupported`] otherwise, and over the simulated device): the
    /// buffer moves to that stream as with [`set_stream`](Self::set_stream). On an error the
    /// buffer is dropped (freed).
    ///
    /// Needs a GPU; elsewhere the example stops at its first line.
    ///
    /// ```
    /// # use cudarc::driver::CudaContext;
    /// # use std::sync::Arc;
    /// # use tessera::driver::{cuda::CudaDriver, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// let Ok(driver) = CudaDriver::open() else { return Ok(()) }; // no GPU here
    /// let alloc = Tessera::new(Arc::new(driver), Config::default())?;
    /// let stream = CudaContext::new(0)?.default_stream();
    /// let buf = DeviceBuffer::from_slice(&alloc, 0, &[1u32, 2], Stream::DEFAULT)?;
    /// let buf = buf.into_cuda(&stream)?;
    /// assert_eq!(stream.clone_dtoh(&buf)?, [1, 2]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn into_cuda(mut self, stream: &Arc<CudaStream>) -> Result<CudaBuffer<'a, T>> {
        let (device, s) = CudaBuffer::<T>::place(self.alloc, stream)?;
        if device != self.device {
            return Err(device_mismatch(self.device, device));
        }
        self.set_stream(s)?;
        Ok(CudaBuffer {
            buf: self,
            stream: Arc::clone(stream),
        })
    }

    /// The number of elements.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::<u32>::zeroed(&alloc, 0, 10, Stream::DEFAULT)?;
    /// assert_eq!(buf.len(), 10);
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer has no elements (it then holds no memory).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::<u32>::zeroed(&alloc, 0, 0, Stream::DEFAULT)?;
    /// assert!(buf.is_empty());
    /// assert_eq!(buf.as_raw(), 0);
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The number of bytes: `len() * size_of::<T>()`.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::<[f32; 4]>::zeroed(&alloc, 0, 10, Stream::DEFAULT)?;
    /// assert_eq!(buf.byte_len(), 160);
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn byte_len(&self) -> usize {
        // Checked when the buffer was made (`byte_len_of`): no overflow.
        self.len * size_of::<T>()
    }

    /// The device the memory is on.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// let sim = Arc::new(SimDriver::new(SimConfig { devices: 2, capacity: 1 << 30, ..SimConfig::default() }));
    /// let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::<u8>::zeroed(&alloc, 1, 16, Stream::DEFAULT)?;
    /// assert_eq!(buf.device(), 1);
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn device(&self) -> usize {
        self.device
    }

    /// The stream the buffer is used on: its copies run there, and it was allocated there (or
    /// moved there with [`set_stream`](Self::set_stream)).
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::<u8>::zeroed(&alloc, 0, 16, Stream(3))?;
    /// assert_eq!(buf.stream(), Stream(3));
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn stream(&self) -> Stream {
        self.stream
    }

    /// The allocator the buffer came from.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::<u8>::zeroed(&alloc, 0, 16, Stream::DEFAULT)?;
    /// assert!(std::ptr::eq(buf.allocator(), &alloc));
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn allocator(&self) -> &'a Tessera {
        self.alloc
    }

    /// The device pointer (`CUdeviceptr`) of the first element; 0 for an empty buffer. On the
    /// simulated device it is a host address.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::<u8>::zeroed(&alloc, 0, 100, Stream::DEFAULT)?;
    /// let a = alloc.allocation(buf.as_raw()).unwrap();
    /// assert_eq!((a.base, a.requested), (buf.as_raw(), 100));
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn as_raw(&self) -> DevicePtr {
        self.ptr
    }

    /// The device pointer by reference, as a kernel argument for cudarc's launch builder:
    /// `builder.arg(buf.kernel_arg())` (`builder.arg(&buf)` does the same). A kernel reads and
    /// writes the memory on the stream it is launched on: launch on the buffer's stream, or call
    /// [`record_stream`](Self::record_stream) for the launch stream first.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use tessera::driver::{sim::{SimConfig, SimDriver}, Stream};
    /// # use tessera::{Config, DeviceBuffer, Tessera};
    /// # let sim = Arc::new(SimDriver::new(SimConfig { capacity: 1 << 30, ..SimConfig::default() }));
    /// # let alloc = Tessera::new(sim, Config::default())?;
    /// let buf = DeviceBuffer::<f32>::zeroed(&alloc, 0, 256, Stream::DEFAULT)?;
    /// let arg: &u64 = buf.kernel_arg(); // a `CUdeviceptr`, as cudarc's `arg` takes it
    /// assert_eq!(*arg, buf.as_raw());
    /// # Ok::<(), tessera::Error>(())
    /// ```
    pub fn kernel_arg(&self) -> &u64 {
        &self.ptr
    }
}

impl<T: DeviceCopy> Drop for DeviceBuffer<'_, T> {
    /// Frees the memory with [`Tessera::free`]: reusable at once on the allocation's stream, and
    /// elsewhere once the work queued on it (and on streams recorded with
    /// [`record_stream`](DeviceBuffer::record_stream)) has finished. An error is ignored: there
    /// is nobody to report it to.
    fn drop(&mut self) {
        if self.ptr != 0 {
            let _ = self.alloc.free(self.device, self.ptr);
        }
    }
}

impl<T: DeviceCopy> fmt::Debug for DeviceBuffer<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("type", &std::any::type_name::<T>())
            .field("device", &self.device)
            .field("ptr", &format_args!("{:#x}", self.ptr))
            .field("len", &self.len)
            .field("stream", &self.stream)
            .finish()
    }
}

// SAFETY: pushes the buffer's `CUdeviceptr` by reference through cudarc's own implementation for
// `&u64`; the reference borrows the buffer for `'b`, which outlives the builder (`'b: 'a`), so the
// pointer stays valid, and the memory stays allocated, until the launch has been queued. (What the
// kernel does with the memory is the `unsafe` launch's contract.)
unsafe impl<'a, 'b: 'a, 'c: 'b, T: DeviceCopy> PushKernelArg<&'b DeviceBuffer<'c, T>>
    for LaunchArgs<'a>
{
    #[inline(always)]
    fn arg(&mut self, arg: &'b DeviceBuffer<'c, T>) -> &mut Self {
        <Self as PushKernelArg<&'b u64>>::arg(self, &arg.ptr)
    }
}

// SAFETY: as for `&DeviceBuffer`; the exclusive borrow says the kernel may write the memory.
unsafe impl<'a, 'b: 'a, 'c: 'b, T: DeviceCopy> PushKernelArg<&'b mut DeviceBuffer<'c, T>>
    for LaunchArgs<'a>
{
    #[inline(always)]
    fn arg(&mut self, arg: &'b mut DeviceBuffer<'c, T>) -> &mut Self {
        <Self as PushKernelArg<&'b u64>>::arg(self, &arg.ptr)
    }
}
