//! `DeviceBuffer` on the simulated device (real host memory behind it): round trips of several
//! element types and lengths, zeroing, data surviving other allocations and a remap, freeing on
//! drop, `record_stream` and `set_stream` holding memory back from reuse, and every misuse an
//! error (lengths, devices, sizes, a device without memory, driver faults). The last test runs
//! cudarc's calls and a kernel over tessera buffers where a GPU is present.

mod common;
use common::*;
use std::sync::Arc;
use tessera::driver::sim::{Backing, SimConfig, SimDriver};
use tessera::driver::{Call, CudaError, Driver, Stream};
use tessera::{Config, DeviceBuffer, DeviceCopy, Error, Tessera};

const S: Stream = Stream::DEFAULT;
const A: Stream = Stream(1);
const B: Stream = Stream(2);

/// A simulated device of `capacity` bytes with invariant checks on, and its allocator.
fn setup(capacity: u64) -> (Arc<SimDriver>, Tessera) {
    sim_alloc(capacity, Config::default())
}

/// Values of `T` made from `f(i)`.
fn values<T>(n: usize, f: impl Fn(u64) -> T) -> Vec<T> {
    (0..n as u64).map(f).collect()
}

/// `from_slice`, `to_vec`, `copy_to_slice`, then `copy_from_slice` of other values and back.
fn round_trip<T: DeviceCopy + PartialEq + std::fmt::Debug>(t: &Tessera, a: &[T], b: &[T]) {
    let mut buf = DeviceBuffer::from_slice(t, 0, a, S).unwrap();
    assert_eq!(buf.len(), a.len());
    assert_eq!(buf.byte_len(), std::mem::size_of_val(a));
    assert_eq!(buf.to_vec().unwrap(), a);
    let mut host = b.to_vec();
    buf.copy_to_slice(&mut host).unwrap();
    assert_eq!(host, a);
    buf.copy_from_slice(b).unwrap();
    assert_eq!(buf.to_vec().unwrap(), b);
    if !a.is_empty() {
        let info = t.allocation(buf.as_raw()).expect("a live allocation");
        assert_eq!(info.base, buf.as_raw());
        assert_eq!(info.requested, buf.byte_len() as u64);
        assert_eq!(info.stream, S);
    }
    t.check_invariants(0).unwrap();
}

#[test]
fn round_trips_of_several_types_and_lengths() {
    let (_sim, t) = setup(256 * MIB);
    for n in [1, 2, 3, 7, 100, 4097, 300_000] {
        round_trip(
            &t,
            &values(n, |i| (i * 7 + 1) as u8),
            &values(n, |i| (i ^ 0x5a) as u8),
        );
        round_trip(
            &t,
            &values(n, |i| i as f32 * 0.5 - 3.0),
            &values(n, |i| -(i as f32)),
        );
        round_trip(
            &t,
            &values(n, |i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            &values(n, |i| !i),
        );
        round_trip(
            &t,
            &values(n, |i| [i as f32, 1.0, -2.5, i as f32 * 4.0]),
            &values(n, |i| [0.0, i as f32, 0.0, 1.0]),
        );
    }
    let s = t.stats(0).unwrap();
    assert_eq!((s.allocated_bytes, s.active_blocks), (0, 0));
}

#[test]
fn empty_and_zero_sized_buffers_allocate_nothing() {
    let (sim, t) = setup(64 * MIB);
    let calls = sim.calls(Call::CopyToDevice) + sim.calls(Call::Memset);
    let mut e = DeviceBuffer::<f32>::from_slice(&t, 0, &[], S).unwrap();
    assert!(e.is_empty());
    assert_eq!(
        (e.len(), e.byte_len(), e.as_raw(), *e.kernel_arg()),
        (0, 0, 0, 0)
    );
    assert_eq!(e.to_vec().unwrap(), Vec::<f32>::new());
    e.copy_from_slice(&[]).unwrap();
    e.copy_to_slice(&mut []).unwrap();
    e.record_stream(B).unwrap();
    e.set_stream(B).unwrap();
    assert_eq!(e.stream(), B);
    let z = DeviceBuffer::<u64>::zeroed(&t, 0, 0, S).unwrap();
    assert_eq!(z.as_raw(), 0);
    // A zero-sized element type: any length, no bytes.
    let zst = DeviceBuffer::<[f32; 0]>::zeroed(&t, 0, 5, S).unwrap();
    assert_eq!((zst.len(), zst.byte_len(), zst.as_raw()), (5, 0, 0));
    assert_eq!(zst.to_vec().unwrap(), vec![[0.0f32; 0]; 5]);
    assert_eq!(DeviceBuffer::into_raw(zst), 0);
    drop((e, z));
    assert_eq!(t.stats(0).unwrap().allocations, 0, "nothing allocated");
    assert_eq!(
        sim.calls(Call::CopyToDevice) + sim.calls(Call::Memset),
        calls,
        "no driver copies for empty buffers"
    );
}

#[test]
fn a_large_buffer_spans_pages_and_round_trips() {
    let (_sim, t) = setup(64 * MIB);
    // 3 MiB of f32: two 2 MiB pages.
    let n = 3 * (MIB as usize) / 4;
    let data = values(n, |i| i as f32);
    let mut buf = DeviceBuffer::from_slice(&t, 0, &data, S).unwrap();
    assert_eq!(buf.byte_len() as u64, 3 * MIB);
    assert_eq!(buf.to_vec().unwrap(), data);
    let other = values(n, |i| (n as u64 - i) as f32);
    buf.copy_from_slice(&other).unwrap();
    let mut back = vec![0.0f32; n];
    buf.copy_to_slice(&mut back).unwrap();
    assert_eq!(back, other);
    assert_eq!(t.stats(0).unwrap().allocated_bytes, 3 * MIB);
}

#[test]
fn zeroed_is_zero_even_in_reused_memory() {
    let (_sim, t) = setup(64 * MIB);
    for bytes in [512usize, 4096, 3 * MIB as usize] {
        let dirty = DeviceBuffer::from_slice(&t, 0, &vec![0xABu8; bytes], S).unwrap();
        let old = dirty.as_raw();
        drop(dirty);
        let z = DeviceBuffer::<u8>::zeroed(&t, 0, bytes, S).unwrap();
        assert_eq!(
            z.as_raw(),
            old,
            "the cached block is reused on the same stream"
        );
        assert!(z.to_vec().unwrap().iter().all(|&b| b == 0), "{bytes} B");
        let zf = DeviceBuffer::<[f32; 4]>::zeroed(&t, 0, bytes / 16, S).unwrap();
        assert!(zf.to_vec().unwrap().iter().all(|v| *v == [0.0; 4]));
    }
}

#[test]
fn drop_frees_and_the_cache_goes_back_to_the_device() {
    let (sim, t) = setup(64 * MIB);
    {
        let _a = DeviceBuffer::<u32>::zeroed(&t, 0, 1000, S).unwrap();
        let _b = DeviceBuffer::from_slice(&t, 0, &[1u64; 300_000], A).unwrap();
        let s = t.stats(0).unwrap();
        assert_eq!(s.active_blocks, 2);
        assert!(s.allocated_bytes >= 4000 + 2_400_000);
    }
    let s = t.stats(0).unwrap();
    assert_eq!((s.allocated_bytes, s.active_blocks, s.frees), (0, 0, 2));
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
    // `into_raw` hands the allocation over without freeing it; `from_raw` takes it back.
    let buf = DeviceBuffer::from_slice(&t, 0, &[3i16; 10], S).unwrap();
    let ptr = buf.into_raw();
    assert_eq!(t.stats(0).unwrap().active_blocks, 1);
    // SAFETY: `ptr` came from `into_raw` of a buffer of 10 valid i16 on device 0, stream S.
    let buf = unsafe { DeviceBuffer::<i16>::from_raw(&t, 0, ptr, 10, S) };
    assert_eq!(buf.to_vec().unwrap(), [3; 10]);
    drop(buf);
    assert_eq!(t.stats(0).unwrap().active_blocks, 0);
}

/// A buffer of 2 MiB of u64 with a pattern seeded by `seed`.
fn pattern(seed: u64) -> Vec<u64> {
    values(2 * MIB as usize / 8, |i| {
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03)
    })
}

#[test]
fn data_survives_other_buffers_and_a_remap() {
    let (sim, t) = setup(64 * MIB);
    // 32 buffers of 2 MiB fill the device.
    let mut bufs: Vec<_> = (0..32)
        .map(|i| DeviceBuffer::from_slice(&t, 0, &pattern(i), S).unwrap())
        .collect();
    assert!(DeviceBuffer::<u8>::zeroed(&t, 0, 2 * MIB as usize, S).is_err());
    // Free every other buffer: 32 MiB free, no two free pages adjacent.
    let mut seeds: Vec<u64> = (0..32).collect();
    let mut i = 0;
    bufs.retain(|_| {
        i += 1;
        i % 2 == 0
    });
    seeds.retain(|s| s % 2 == 1);
    let old: Vec<_> = bufs.iter().map(|b| b.as_raw()).collect();
    // 32 MiB in one piece: only a remap of the free pages can give it.
    let n = 32 * MIB as usize / 8;
    let big_data = values(n, |i| i * 3 + 1);
    let big = DeviceBuffer::from_slice(&t, 0, &big_data, S).expect("remapping gathers pages");
    assert!(t.stats(0).unwrap().remaps > 0, "a remap happened");
    assert_eq!(sim.bytes_in_use(0), 64 * MIB, "no new memory was needed");
    assert_eq!(big.to_vec().unwrap(), big_data);
    // Every surviving buffer kept its address and its data.
    for ((b, &seed), &p) in bufs.iter().zip(&seeds).zip(&old) {
        assert_eq!(b.as_raw(), p);
        assert_eq!(b.to_vec().unwrap(), pattern(seed), "buffer {seed}");
    }
    // Churn of small buffers after the remap leaves them alone too.
    drop(big);
    for round in 0..50u64 {
        let small =
            DeviceBuffer::from_slice(&t, 0, &values(100 + round as usize, |i| i ^ round), S)
                .unwrap();
        assert_eq!(small.len(), 100 + round as usize);
    }
    for (b, &seed) in bufs.iter().zip(&seeds) {
        assert_eq!(b.to_vec().unwrap(), pattern(seed), "buffer {seed}");
    }
    t.check_invariants(0).unwrap();
}

#[test]
fn record_stream_keeps_memory_from_reuse_until_the_stream_completes() {
    let (sim, t) = setup(64 * MIB);
    let len = 3 * MIB as usize;
    sim.hold_stream(0, B);
    let buf = DeviceBuffer::<u8>::zeroed(&t, 0, len, A).unwrap();
    buf.record_stream(B).unwrap();
    let x = buf.as_raw();
    drop(buf);
    assert_eq!(t.stats(0).unwrap().active_blocks, 0, "freed");
    // B's work may still use x: not even A gets it.
    let y = DeviceBuffer::<u8>::zeroed(&t, 0, len, A).unwrap();
    assert_ne!(y.as_raw(), x);
    assert!(sim.is_mapped(0, x), "x stays mapped");
    // B's work is done: the next miss settles x and takes it.
    sim.complete_stream(0, B);
    let z = DeviceBuffer::<u8>::zeroed(&t, 0, len, A).unwrap();
    assert_eq!(z.as_raw(), x);
    assert!(z.to_vec().unwrap().iter().all(|&b| b == 0));
}

#[test]
fn set_stream_moves_the_buffer_and_holds_its_memory_for_the_new_stream() {
    let (sim, t) = setup(64 * MIB);
    let len = 3 * MIB as usize / 8;
    let data = values(len, |i| i);
    let mut buf = DeviceBuffer::from_slice(&t, 0, &data, A).unwrap();
    let waits = sim.calls(Call::StreamWaitEvent);
    buf.set_stream(A).unwrap();
    assert_eq!(
        sim.calls(Call::StreamWaitEvent),
        waits,
        "same stream: nothing to do"
    );
    sim.hold_stream(0, B);
    buf.set_stream(B).unwrap();
    assert_eq!(buf.stream(), B);
    assert_eq!(sim.calls(Call::StreamWaitEvent), waits + 1, "B waits for A");
    assert_eq!(sim.live_events(0), 0, "the ordering event is destroyed");
    assert_eq!(buf.to_vec().unwrap(), data);
    assert_eq!(
        t.allocation(buf.as_raw()).unwrap().stream,
        A,
        "allocated on A"
    );
    let x = buf.as_raw();
    drop(buf);
    let y = DeviceBuffer::<u64>::zeroed(&t, 0, len, A).unwrap();
    assert_ne!(y.as_raw(), x, "B may still use x");
    sim.release_stream(0, B);
    let z = DeviceBuffer::<u64>::zeroed(&t, 0, len, A).unwrap();
    assert_eq!(z.as_raw(), x);
}

#[test]
fn a_failed_set_stream_leaves_the_buffer_where_it_was() {
    let (sim, t) = setup(64 * MIB);
    let mut buf = DeviceBuffer::from_slice(&t, 0, &[1u32, 2, 3], A).unwrap();
    sim.fail_nth(Call::StreamWaitEvent, 1);
    let err = buf.set_stream(B).unwrap_err();
    assert!(
        matches!(err, Error::Driver(ref e) if e.call == Call::StreamWaitEvent),
        "{err}"
    );
    assert_eq!(buf.stream(), A);
    assert_eq!(
        sim.live_events(0),
        0,
        "the event is destroyed on failure too"
    );
    assert_eq!(buf.to_vec().unwrap(), [1, 2, 3]);
}

#[test]
fn length_mismatches_are_errors_and_copy_nothing() {
    let (_sim, t) = setup(64 * MIB);
    let mut buf = DeviceBuffer::from_slice(&t, 0, &[1.0f32, 2.0, 3.0], S).unwrap();
    for bad in [&[9.0f32][..], &[9.0; 4][..], &[][..]] {
        let err = buf.copy_from_slice(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidSize { .. }), "{err}");
    }
    let mut short = [0.0f32; 2];
    assert!(matches!(
        buf.copy_to_slice(&mut short),
        Err(Error::InvalidSize { .. })
    ));
    assert_eq!(short, [0.0; 2]);
    assert_eq!(buf.to_vec().unwrap(), [1.0, 2.0, 3.0], "unchanged");
    let msg = buf.copy_from_slice(&[1.0]).unwrap_err().to_string();
    assert!(msg.contains("length"), "{msg}");
}

#[test]
fn a_bad_device_or_size_is_an_error() {
    let sim = SimConfig {
        devices: 2,
        capacity: 64 * MIB,
        ..SimConfig::default()
    };
    let (_sim, t) = sim_alloc_with(sim, Config::default());
    for len in [0, 10] {
        let err = DeviceBuffer::<u8>::zeroed(&t, 2, len, S).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidDevice {
                    device: 2,
                    count: 2
                }
            ),
            "{err}"
        );
        assert!(DeviceBuffer::from_slice(&t, usize::MAX, &vec![1u8; len], S).is_err());
    }
    // Device 1 is fine, and separate from device 0.
    let one = DeviceBuffer::from_slice(&t, 1, &[5u8; 64], S).unwrap();
    assert_eq!(one.device(), 1);
    assert_eq!(t.stats(1).unwrap().active_blocks, 1);
    assert_eq!(t.stats(0).unwrap().active_blocks, 0);
    // A byte length that overflows, or exceeds isize::MAX, or the device.
    // SAFETY: these fail before any memory exists; nothing is read.
    unsafe {
        let err = DeviceBuffer::<u64>::uninit(&t, 0, usize::MAX / 4, S).unwrap_err();
        assert!(matches!(err, Error::InvalidSize { .. }), "{err}");
        let err = DeviceBuffer::<u8>::uninit(&t, 0, usize::MAX, S).unwrap_err();
        assert!(matches!(err, Error::InvalidSize { .. }), "{err}");
        let err = DeviceBuffer::<[u8; 1 << 20]>::uninit(&t, 0, 1 << 40, S).unwrap_err();
        assert!(matches!(err, Error::InvalidSize { .. }), "{err}");
    }
    let err = DeviceBuffer::<u64>::zeroed(&t, 0, 1 << 30, S).unwrap_err();
    assert!(err.is_out_of_memory(), "8 GiB on a 64 MiB device: {err}");
}

#[test]
fn without_host_memory_copies_fail_cleanly() {
    let sim = SimConfig {
        capacity: 64 * MIB,
        backing: Backing::Bookkeeping,
        ..SimConfig::default()
    };
    let (_sim, t) = sim_alloc_with(sim, Config::default());
    let err = DeviceBuffer::from_slice(&t, 0, &[1u32; 100], S).unwrap_err();
    assert!(
        matches!(err, Error::Driver(ref e) if e.error == CudaError::NotSupported),
        "{err}"
    );
    let err = DeviceBuffer::<u32>::zeroed(&t, 0, 100, S).unwrap_err();
    assert!(matches!(err, Error::Driver(_)), "{err}");
    // SAFETY: nothing is read: the copies fail.
    let mut buf = unsafe { DeviceBuffer::<u32>::uninit(&t, 0, 100, S) }.unwrap();
    assert!(matches!(buf.to_vec(), Err(Error::Driver(_))));
    assert!(matches!(
        buf.copy_to_slice(&mut [0; 100]),
        Err(Error::Driver(_))
    ));
    assert!(matches!(
        buf.copy_from_slice(&[0; 100]),
        Err(Error::Driver(_))
    ));
    drop(buf);
    let s = t.stats(0).unwrap();
    assert_eq!(
        (s.active_blocks, s.allocated_bytes),
        (0, 0),
        "the failures leaked nothing"
    );
}

#[test]
fn injected_driver_faults_are_errors_and_leak_nothing() {
    let (sim, t) = setup(64 * MIB);
    // The device refuses memory: an out-of-memory error.
    sim.fail_with_probability(Some(Call::CreatePhysical), 1.0, 1);
    let err = DeviceBuffer::from_slice(&t, 0, &[1u16; 5000], S).unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    sim.clear_faults();
    // A copy or a memset fails: the error is the driver's, and the memory is freed again.
    for call in [Call::CopyToDevice, Call::Memset] {
        sim.fail_nth(call, 1);
        let r = if call == Call::Memset {
            DeviceBuffer::<u16>::zeroed(&t, 0, 5000, S).map(drop)
        } else {
            DeviceBuffer::from_slice(&t, 0, &[1u16; 5000], S).map(drop)
        };
        let err = r.unwrap_err();
        assert!(
            matches!(err, Error::Driver(ref e) if e.call == call),
            "{err}"
        );
        assert_eq!(t.stats(0).unwrap().active_blocks, 0, "{call}: leaked");
        sim.clear_faults();
    }
    let buf = DeviceBuffer::from_slice(&t, 0, &[4u16; 5000], S).unwrap();
    sim.fail_nth(Call::CopyFromDevice, 1);
    assert!(buf.to_vec().is_err());
    assert_eq!(buf.to_vec().unwrap(), vec![4; 5000], "the next copy works");
    // A free that fails in drop (here: the pointer was freed by hand already) is ignored, not
    // a panic.
    t.free(0, buf.as_raw()).unwrap();
    drop(buf);
    let s = t.stats(0).unwrap();
    assert_eq!((s.invalid_frees, s.active_blocks), (1, 0));
}

#[test]
fn buffers_are_send_and_sync_and_global_buffers_are_static() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<DeviceBuffer<'static, f32>>();
    send_sync::<tessera::CudaBuffer<'static, f32>>();

    // Buffers of an owned allocator move between scoped threads.
    let (_sim, t) = setup(64 * MIB);
    let buf = DeviceBuffer::from_slice(&t, 0, &[1u8, 2, 3], S).unwrap();
    let back = std::thread::scope(|s| s.spawn(|| buf.to_vec().unwrap()).join().unwrap());
    assert_eq!(back, [1, 2, 3]);

    // The process-wide allocator's buffers are 'static: they go to any thread.
    std::env::set_var("TESSERA_DRIVER", "sim");
    std::env::set_var("TESSERA_SIM", "capacity:256MiB");
    let g = tessera::global().unwrap();
    let buf: DeviceBuffer<'static, u32> = DeviceBuffer::from_slice(g, 0, &[7; 1000], S).unwrap();
    let v = std::thread::spawn(move || buf.to_vec().unwrap())
        .join()
        .unwrap();
    assert_eq!(v, [7; 1000]);
    assert_eq!(
        g.stats(0).unwrap().active_blocks,
        0,
        "dropped in the thread"
    );
    assert!(
        format!("{:?}", DeviceBuffer::<u8>::zeroed(g, 0, 1, S).unwrap())
            .starts_with("DeviceBuffer")
    );
}

/// cudarc's calls and a kernel launch over tessera buffers. Needs a GPU and NVRTC; elsewhere it
/// returns at once (it still checks, by compiling, that cudarc takes the buffers).
#[test]
fn cudarc_takes_tessera_buffers_on_a_gpu() {
    use cudarc::driver::{CudaContext, LaunchConfig, PushKernelArg};
    use tessera::driver::cuda::CudaDriver;
    use tessera::CudaBuffer;

    let Ok(driver) = CudaDriver::open() else {
        return;
    };
    // SAFETY: only tries to load the NVRTC library.
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        return;
    }
    let t = Tessera::new(Arc::new(driver), Config::default()).unwrap();
    let ctx = CudaContext::new(0).unwrap();
    let stream = ctx.default_stream();
    let ptx = cudarc::nvrtc::compile_ptx(
        r#"extern "C" __global__ void add(const float *a, const float *b, float *c, unsigned int n) {
            unsigned int i = blockIdx.x * blockDim.x + threadIdx.x;
            if (i < n) c[i] = a[i] + b[i];
        }"#,
    )
    .unwrap();
    let add = ctx.load_module(ptx).unwrap().load_function("add").unwrap();
    let n = 10_000usize;
    let a_host = values(n, |i| i as f32);
    let a = CudaBuffer::from_slice(&t, &stream, &a_host).unwrap();
    let mut b = CudaBuffer::<f32>::zeroed(&t, &stream, n).unwrap();
    stream.memcpy_htod(&vec![2.0f32; n], &mut b).unwrap();
    let mut c = CudaBuffer::<f32>::zeroed(&t, &stream, n).unwrap();
    let n32 = n as u32;
    let mut launch = stream.launch_builder(&add);
    launch.arg(&a).arg(b.kernel_arg()).arg(&mut c).arg(&n32);
    // SAFETY: the arguments match the kernel's parameters; every buffer holds n floats.
    unsafe { launch.launch(LaunchConfig::for_num_elems(n32)) }.unwrap();
    let want = values(n, |i| i as f32 + 2.0);
    assert_eq!(stream.clone_dtoh(&c).unwrap(), want);
    assert_eq!(c.to_vec().unwrap(), want);
    // A plain DeviceBuffer is a kernel argument too.
    let mut d = DeviceBuffer::<f32>::zeroed(&t, 0, n, Stream(stream.cu_stream() as u64)).unwrap();
    let mut launch = stream.launch_builder(&add);
    launch.arg(&*a).arg(&*c).arg(&mut d).arg(&n32);
    // SAFETY: as above.
    unsafe { launch.launch(LaunchConfig::for_num_elems(n32)) }.unwrap();
    assert_eq!(d.to_vec().unwrap(), values(n, |i| 2.0 * i as f32 + 2.0));
    // cudarc's memset and device-to-device copy, and a second stream.
    stream.memset_zeros(&mut c).unwrap();
    assert!(c.to_vec().unwrap().iter().all(|&x| x == 0.0));
    stream.memcpy_dtod(&a, &mut c).unwrap();
    let mut host = vec![0.0f32; n];
    stream.memcpy_dtoh(&c, &mut host).unwrap();
    assert_eq!(host, a_host);
    // Copies between cudarc's own slices and tessera buffers, both ways.
    let mut slice = stream.clone_htod(&vec![5.0f32; n]).unwrap();
    stream.memcpy_dtod(&slice, &mut c).unwrap();
    assert_eq!(c.to_vec().unwrap(), vec![5.0; n]);
    stream.memcpy_dtod(&a, &mut slice).unwrap();
    assert_eq!(stream.clone_dtoh(&slice).unwrap(), a_host);
    stream.memcpy_dtod(&a, &mut c).unwrap();
    let other = ctx.new_stream().unwrap();
    assert_eq!(
        other.clone_dtoh(&c).unwrap(),
        a_host,
        "other waits for c's stream"
    );
    let mut e = d.into_cuda(&other).unwrap();
    other.memset_zeros(&mut e).unwrap();
    assert!(e.to_vec().unwrap().iter().all(|&x| x == 0.0));
    drop((a, b, c, e));
    other.synchronize().unwrap();
    t.empty_cache(0).unwrap();
    assert_eq!(t.stats(0).unwrap().active_blocks, 0);
}
