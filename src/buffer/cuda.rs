//! [`CudaBuffer`]: a [`DeviceBuffer`] on a cudarc stream, implementing cudarc's device-pointer
//! traits so that cudarc's copies, memsets and kernel launches take it. The invariants and the
//! safety argument are the parent module's; this file adds the stream bookkeeping that cudarc's
//! traits need.

use super::*;

/// A [`DeviceBuffer`] used on a cudarc [`CudaStream`]: cudarc's copies, memsets and kernel
/// launches take it like one of its own `CudaSlice`s. It implements cudarc's [`DeviceSlice`],
/// [`DevicePtr`](cudarc::driver::DevicePtr) and [`DevicePtrMut`]; what takes it:
///
/// | cudarc call | a `CudaBuffer` | a `DeviceBuffer` |
/// |---|---|---|
/// | `stream.launch_builder(&f).arg(&buf)` / `.arg(&mut buf)` | yes | yes (also `.arg(buf.kernel_arg())`) |
/// | `stream.memcpy_htod(&host, &mut buf)`, `memcpy_dtoh(&buf, &mut host)` | yes | no: [`DeviceBuffer::copy_from_slice`] / [`copy_to_slice`](DeviceBuffer::copy_to_slice) |
/// | `stream.clone_dtoh(&buf)` (and the deprecated `memcpy_dtov`) | yes | no: [`DeviceBuffer::to_vec`] |
/// | `stream.memset_zeros(&mut buf)` | yes | no: [`DeviceBuffer::zeroed`] |
/// | `stream.memcpy_dtod(&src, &mut dst)` (each side a `CudaSlice` or a `CudaBuffer`) | yes | no |
///
/// cudarc's copies assert (panic) when the destination is shorter than the source; tessera's
/// own return an error. A kernel argument does not record which stream the kernel runs on
/// (cudarc's builder does not say): launch on the buffer's stream, or call
/// [`record_stream`](DeviceBuffer::record_stream) for the launch stream first.
///
/// It dereferences to its [`DeviceBuffer`] (for [`to_vec`](DeviceBuffer::to_vec),
/// [`len`](DeviceBuffer::len), [`kernel_arg`](DeviceBuffer::kernel_arg) and the other `&self`
/// methods); its stream is changed only with [`set_cuda_stream`](Self::set_cuda_stream), so the
/// tessera stream and the cudarc stream never differ. It needs tessera over the CUDA driver
/// ([`crate::driver::cuda::CudaDriver`]): a simulated device's pointers are host addresses that no
/// kernel can use, so a simulated allocator is refused with [`Error::Unsupported`].
///
/// Used by cudarc on another stream than its own, it makes that stream wait for its own
/// (`CudaStream::join`) and records that stream ([`DeviceBuffer::record_stream`]) so that the free
/// waits for it; a stream of another device gets a full synchronisation instead.
///
/// # Destroying streams
/// tessera records events on the streams of freed memory lazily, when that memory is wanted
/// elsewhere, so a stream must not be destroyed while tessera may still record on it. Before the
/// last `Arc` of a stream made with `new_stream` goes away, drop its buffers and call
/// [`Tessera::empty_cache`] (which waits for the streams that used freed memory). The default
/// stream is never destroyed.
///
/// The examples need a GPU; elsewhere they stop at the first line.
///
/// ```
/// use cudarc::driver::CudaContext;
/// use std::sync::Arc;
/// use tessera::driver::cuda::CudaDriver;
/// use tessera::{Config, CudaBuffer, Tessera};
///
/// let Ok(driver) = CudaDriver::open() else { return Ok(()) }; // no GPU here
/// let alloc = Tessera::new(Arc::new(driver), Config::default())?;
/// let stream = CudaContext::new(0)?.default_stream();
/// let mut buf = CudaBuffer::<f32>::zeroed(&alloc, &stream, 1024)?;
/// stream.memcpy_htod(&[1.0f32; 1024], &mut buf)?; // cudarc's own copy
/// assert_eq!(stream.clone_dtoh(&buf)?, vec![1.0f32; 1024]);
/// assert_eq!(buf.to_vec()?, vec![1.0f32; 1024]); // tessera's
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct CudaBuffer<'a, T: DeviceCopy> {
    // Declared first: dropped (freed) before the stream handle goes.
    pub(super) buf: DeviceBuffer<'a, T>,
    pub(super) stream: Arc<CudaStream>,
}

impl<'a, T: DeviceCopy> CudaBuffer<'a, T> {
    /// The device index and tessera stream of `stream`, checked against `alloc`.
    pub(super) fn place(alloc: &Tessera, stream: &CudaStream) -> Result<(usize, Stream)> {
        if alloc.driver().name() == "sim" {
            return Err(Error::Unsupported(
                "a CudaBuffer needs tessera over the CUDA driver; this allocator's device is simulated (its pointers are host addresses)".into(),
            ));
        }
        let device = stream.context().ordinal();
        check_device(alloc, device)?;
        Ok((device, Stream(stream.cu_stream() as u64)))
    }

    /// A buffer of `len` elements on `stream`'s device, used on `stream`, whose contents are left
    /// as the memory held them.
    ///
    /// # Safety
    /// As for [`DeviceBuffer::uninit`]: every element must be written before it is read to the
    /// host, unless every bit pattern is a valid `T`.
    ///
    /// ```
    /// # use cudarc::driver::CudaContext;
    /// # use std::sync::Arc;
    /// # use tessera::driver::cuda::CudaDriver;
    /// # use tessera::{Config, CudaBuffer, Tessera};
    /// # let Ok(driver) = CudaDriver::open() else { return Ok(()) };
    /// # let alloc = Tessera::new(Arc::new(driver), Config::default())?;
    /// let stream = CudaContext::new(0)?.default_stream();
    /// // SAFETY: written in full before it is read.
    /// let mut buf = unsafe { CudaBuffer::<u32>::uninit(&alloc, &stream, 3)? };
    /// stream.memcpy_htod(&[1u32, 2, 3], &mut buf)?;
    /// assert_eq!(buf.to_vec()?, [1, 2, 3]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub unsafe fn uninit(alloc: &'a Tessera, stream: &Arc<CudaStream>, len: usize) -> Result<Self> {
        let (device, s) = Self::place(alloc, stream)?;
        Ok(CudaBuffer {
            buf: DeviceBuffer::allocate(alloc, device, len, s)?,
            stream: Arc::clone(stream),
        })
    }

    /// A buffer of `len` zeros on `stream`'s device, used on `stream` (the memset is queued
    /// there).
    ///
    /// ```
    /// # use cudarc::driver::CudaContext;
    /// # use std::sync::Arc;
    /// # use tessera::driver::cuda::CudaDriver;
    /// # use tessera::{Config, CudaBuffer, Tessera};
    /// # let Ok(driver) = CudaDriver::open() else { return Ok(()) };
    /// # let alloc = Tessera::new(Arc::new(driver), Config::default())?;
    /// let stream = CudaContext::new(0)?.default_stream();
    /// let buf = CudaBuffer::<f64>::zeroed(&alloc, &stream, 100)?;
    /// assert_eq!(stream.clone_dtoh(&buf)?, vec![0.0; 100]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn zeroed(alloc: &'a Tessera, stream: &Arc<CudaStream>, len: usize) -> Result<Self> {
        let (device, s) = Self::place(alloc, stream)?;
        Ok(CudaBuffer {
            buf: DeviceBuffer::zeroed(alloc, device, len, s)?,
            stream: Arc::clone(stream),
        })
    }

    /// A buffer on `stream`'s device, used on `stream`, holding a copy of `data`.
    ///
    /// ```
    /// # use cudarc::driver::CudaContext;
    /// # use std::sync::Arc;
    /// # use tessera::driver::cuda::CudaDriver;
    /// # use tessera::{Config, CudaBuffer, Tessera};
    /// # let Ok(driver) = CudaDriver::open() else { return Ok(()) };
    /// # let alloc = Tessera::new(Arc::new(driver), Config::default())?;
    /// let stream = CudaContext::new(0)?.default_stream();
    /// let buf = CudaBuffer::from_slice(&alloc, &stream, &[1i64, -2, 3])?;
    /// assert_eq!(stream.clone_dtoh(&buf)?, [1, -2, 3]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn from_slice(alloc: &'a Tessera, stream: &Arc<CudaStream>, data: &[T]) -> Result<Self> {
        let (device, s) = Self::place(alloc, stream)?;
        Ok(CudaBuffer {
            buf: DeviceBuffer::from_slice(alloc, device, data, s)?,
            stream: Arc::clone(stream),
        })
    }

    /// Copies `src` into the buffer: [`DeviceBuffer::copy_from_slice`] (a length mismatch is an
    /// error, not a panic as in cudarc's `memcpy_htod`).
    ///
    /// ```
    /// # use cudarc::driver::CudaContext;
    /// # use std::sync::Arc;
    /// # use tessera::driver::cuda::CudaDriver;
    /// # use tessera::{Config, CudaBuffer, Tessera};
    /// # let Ok(driver) = CudaDriver::open() else { return Ok(()) };
    /// # let alloc = Tessera::new(Arc::new(driver), Config::default())?;
    /// let stream = CudaContext::new(0)?.default_stream();
    /// let mut buf = CudaBuffer::<u8>::zeroed(&alloc, &stream, 2)?;
    /// buf.copy_from_slice(&[8, 9])?;
    /// assert_eq!(buf.to_vec()?, [8, 9]);
    /// assert!(buf.copy_from_slice(&[1]).is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn copy_from_slice(&mut self, src: &[T]) -> Result<()> {
        self.buf.copy_from_slice(src)
    }

    /// The cudarc stream the buffer is used on.
    ///
    /// ```
    /// # use cudarc::driver::CudaContext;
    /// # use std::sync::Arc;
    /// # use tessera::driver::cuda::CudaDriver;
    /// # use tessera::{Config, CudaBuffer, Tessera};
    /// # let Ok(driver) = CudaDriver::open() else { return Ok(()) };
    /// # let alloc = Tessera::new(Arc::new(driver), Config::default())?;
    /// let stream = CudaContext::new(0)?.default_stream();
    /// let buf = CudaBuffer::<u8>::zeroed(&alloc, &stream, 2)?;
    /// assert!(Arc::ptr_eq(buf.cuda_stream(), &stream));
    /// assert_eq!(buf.stream().0, stream.cu_stream() as u64);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn cuda_stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Moves the buffer to `stream` ([`DeviceBuffer::set_stream`]), which must belong to the
    /// buffer's device (else [`Error::Unsupported`]). On an error the buffer stays where it was.
    ///
    /// ```
    /// # use cudarc::driver::CudaContext;
    /// # use std::sync::Arc;
    /// # use tessera::driver::cuda::CudaDriver;
    /// # use tessera::{Config, CudaBuffer, Tessera};
    /// # let Ok(driver) = CudaDriver::open() else { return Ok(()) };
    /// # let alloc = Tessera::new(Arc::new(driver), Config::default())?;
    /// let ctx = CudaContext::new(0)?;
    /// let (a, b) = (ctx.default_stream(), ctx.new_stream()?);
    /// let mut buf = CudaBuffer::from_slice(&alloc, &a, &[1u16, 2])?;
    /// buf.set_cuda_stream(&b)?;
    /// assert_eq!(b.clone_dtoh(&buf)?, [1, 2]);
    /// drop(buf);
    /// alloc.empty_cache(0)?; // before `b` is destroyed (see "Destroying streams" on `CudaBuffer`)
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_cuda_stream(&mut self, stream: &Arc<CudaStream>) -> Result<()> {
        let (device, s) = Self::place(self.buf.alloc, stream)?;
        if device != self.buf.device {
            return Err(device_mismatch(self.buf.device, device));
        }
        self.buf.set_stream(s)?;
        self.stream = Arc::clone(stream);
        Ok(())
    }

    /// The [`DeviceBuffer`] inside, which keeps the memory and the tessera stream.
    ///
    /// ```
    /// # use cudarc::driver::CudaContext;
    /// # use std::sync::Arc;
    /// # use tessera::driver::cuda::CudaDriver;
    /// # use tessera::{Config, CudaBuffer, Tessera};
    /// # let Ok(driver) = CudaDriver::open() else { return Ok(()) };
    /// # let alloc = Tessera::new(Arc::new(driver), Config::default())?;
    /// let stream = CudaContext::new(0)?.default_stream();
    /// let buf = CudaBuffer::from_slice(&alloc, &stream, &[5u8])?.into_inner();
    /// assert_eq!(buf.to_vec()?, [5]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn into_inner(self) -> DeviceBuffer<'a, T> {
        self.buf
    }

    /// How cudarc's calls on `stream` may use the buffer: on its own stream, nothing to do. On
    /// any other stream (of this device or another), that stream first waits for the buffer's own
    /// (`CudaStream::join`), and the operation is finished before the returned guard is gone
    /// (`SyncOnDrop::sync_stream`): so the buffer's own stream, and its free, never race with it
    /// in either direction, and no event has to be recorded on a stream the buffer does not keep
    /// alive. Cross-stream use costs a synchronisation; use the buffer on its own stream (or
    /// [`set_cuda_stream`](Self::set_cuda_stream)) on hot paths.
    fn use_on<'s>(&'s self, stream: &'s CudaStream) -> SyncOnDrop<'s> {
        if self.buf.ptr == 0 || stream.cu_stream() == self.stream.cu_stream() {
            return SyncOnDrop::Sync(None);
        }
        stream.context().record_err(stream.join(&self.stream));
        SyncOnDrop::sync_stream(stream)
    }
}

impl<'a, T: DeviceCopy> Deref for CudaBuffer<'a, T> {
    type Target = DeviceBuffer<'a, T>;

    fn deref(&self) -> &DeviceBuffer<'a, T> {
        &self.buf
    }
}

impl<T: DeviceCopy> fmt::Debug for CudaBuffer<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CudaBuffer")
            .field("buffer", &self.buf)
            .field(
                "cuda_stream",
                &format_args!("{:p}", self.stream.cu_stream()),
            )
            .finish()
    }
}

impl<T: DeviceCopy> DeviceSlice<T> for CudaBuffer<'_, T> {
    fn len(&self) -> usize {
        self.buf.len
    }

    fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }
}

impl<T: DeviceCopy> cudarc::driver::DevicePtr<T> for CudaBuffer<'_, T> {
    fn device_ptr<'s>(&'s self, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
        (self.buf.ptr, self.use_on(stream))
    }
}

impl<T: DeviceCopy> DevicePtrMut<T> for CudaBuffer<'_, T> {
    fn device_ptr_mut<'s>(&'s mut self, stream: &'s CudaStream) -> (u64, SyncOnDrop<'s>) {
        (self.buf.ptr, self.use_on(stream))
    }
}

// SAFETY: as for `&DeviceBuffer`: the pointer is pushed by reference through cudarc's `&u64`
// implementation, borrowed for `'b`, which outlives the builder.
unsafe impl<'a, 'b: 'a, 'c: 'b, T: DeviceCopy> PushKernelArg<&'b CudaBuffer<'c, T>>
    for LaunchArgs<'a>
{
    #[inline(always)]
    fn arg(&mut self, arg: &'b CudaBuffer<'c, T>) -> &mut Self {
        <Self as PushKernelArg<&'b u64>>::arg(self, &arg.buf.ptr)
    }
}

// SAFETY: as for `&CudaBuffer`; the exclusive borrow says the kernel may write the memory.
unsafe impl<'a, 'b: 'a, 'c: 'b, T: DeviceCopy> PushKernelArg<&'b mut CudaBuffer<'c, T>>
    for LaunchArgs<'a>
{
    #[inline(always)]
    fn arg(&mut self, arg: &'b mut CudaBuffer<'c, T>) -> &mut Self {
        <Self as PushKernelArg<&'b u64>>::arg(self, &arg.buf.ptr)
    }
}
