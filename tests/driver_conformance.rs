//! One conformance suite for every [`Driver`]: the contract in `tessera::driver`, checked the same
//! way on the simulated driver (real and bookkeeping backing) and on the CUDA driver when a device
//! is present. Each `check_*` takes the driver and a device; `host_memory` says whether device
//! pointers are host addresses (the simulated driver with real backing), in which case the data
//! itself is written and read back, not only the calls made.

use tessera::driver::sim::{Backing, SimConfig, SimDriver};
use tessera::driver::{CaptureInfo, CaptureMode, CudaError, Driver, DriverResult, Stream};

fn code<T: std::fmt::Debug>(r: DriverResult<T>) -> CudaError {
    r.expect_err("call should fail").error
}

fn check_device_count(d: &dyn Driver, device: usize) {
    let n = d.device_count().unwrap();
    assert!(n >= 1 && device < n, "device {device} of {n}");
    assert_eq!(code(d.mem_info(n)), CudaError::InvalidDevice);
    assert_eq!(code(d.granularity(n)), CudaError::InvalidDevice);
    assert_eq!(code(d.event_create(n)), CudaError::InvalidDevice);
}

fn check_granularity(d: &dyn Driver, device: usize) {
    let g = d.granularity(device).unwrap();
    assert!(g > 0 && g.is_power_of_two(), "granularity {g}");
}

fn check_mem_info(d: &dyn Driver, device: usize) {
    let m = d.mem_info(device).unwrap();
    assert!(m.total > 0 && m.free <= m.total, "{m:?}");
}

/// Writes a pattern over `len` bytes at `va`.
///
/// # Safety
/// `[va, va + len)` is host memory mapped read/write.
unsafe fn fill(va: u64, len: u64, seed: u8) {
    // SAFETY: the caller vouches for the range (this function's contract).
    let s = unsafe { std::slice::from_raw_parts_mut(va as *mut u8, len as usize) };
    for (i, b) in s.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(31).wrapping_add(seed);
    }
}

/// Whether `len` bytes at `va` hold the pattern of [`fill`].
///
/// # Safety
/// `[va, va + len)` is host memory mapped readable.
unsafe fn holds(va: u64, len: u64, seed: u8) -> bool {
    // SAFETY: the caller vouches for the range (this function's contract).
    let s = unsafe { std::slice::from_raw_parts(va as *const u8, len as usize) };
    s.iter()
        .enumerate()
        .all(|(i, &b)| b == (i as u8).wrapping_mul(31).wrapping_add(seed))
}

fn check_vmm_lifecycle(d: &dyn Driver, device: usize, host_memory: bool) {
    if !d.supports_vmm(device).unwrap() {
        return;
    }
    let g = d.granularity(device).unwrap();
    let va = d.reserve(device, 4 * g, 0).unwrap();
    assert_eq!(va % g, 0);
    let h = d.create_physical(device, 2 * g).unwrap();
    d.map(device, va, 2 * g, h).unwrap();
    d.set_access(device, va, 2 * g).unwrap();
    if host_memory {
        // SAFETY: [va, va + 2g) is mapped and accessible, and device memory is host memory here.
        unsafe { fill(va, 2 * g, 7) };
    }
    // Remap the same physical memory elsewhere: the data comes along.
    d.unmap(device, va, 2 * g).unwrap();
    d.map(device, va + 2 * g, 2 * g, h).unwrap();
    d.set_access(device, va + 2 * g, 2 * g).unwrap();
    if host_memory {
        // SAFETY: as above, for the new range.
        let kept = unsafe { holds(va + 2 * g, 2 * g, 7) };
        assert!(kept, "data lost by remapping");
    }
    d.unmap(device, va + 2 * g, 2 * g).unwrap();
    d.release_physical(device, h).unwrap();
    d.free_reservation(device, va, 4 * g).unwrap();

    // An aligned reservation; access over several mappings at once; release while still mapped.
    let va = d.reserve(device, 2 * g, 4 * g).unwrap();
    assert_eq!(va % (4 * g), 0);
    let (a, b) = (
        d.create_physical(device, g).unwrap(),
        d.create_physical(device, g).unwrap(),
    );
    d.map(device, va, g, a).unwrap();
    d.map(device, va + g, g, b).unwrap();
    d.set_access(device, va, 2 * g).unwrap();
    if host_memory {
        // SAFETY: [va, va + 2g) is mapped and accessible host memory.
        unsafe { fill(va, 2 * g, 1) };
    }
    d.release_physical(device, a).unwrap();
    d.release_physical(device, b).unwrap();
    d.unmap(device, va, g).unwrap();
    d.unmap(device, va + g, g).unwrap();
    d.free_reservation(device, va, 2 * g).unwrap();
}

fn check_vmm_rules(d: &dyn Driver, device: usize) {
    if !d.supports_vmm(device).unwrap() {
        return;
    }
    let inval = CudaError::InvalidValue;
    let g = d.granularity(device).unwrap();
    assert_eq!(code(d.reserve(device, 0, 0)), inval);
    assert_eq!(code(d.create_physical(device, 0)), inval);
    if g > 1 {
        assert_eq!(code(d.create_physical(device, g + g / 2)), inval);
    }
    let va = d.reserve(device, 4 * g, 0).unwrap();
    let h = d.create_physical(device, g).unwrap();
    assert_eq!(
        code(d.map(device, va, 2 * g, h)),
        inval,
        "size is not the handle's"
    );
    assert_eq!(code(d.set_access(device, va, g)), inval, "nothing mapped");
    assert_eq!(code(d.unmap(device, va, g)), inval, "nothing mapped");
    d.map(device, va, g, h).unwrap();
    assert_eq!(code(d.map(device, va, g, h)), inval, "overlaps a mapping");
    assert_eq!(
        code(d.set_access(device, va, 2 * g)),
        inval,
        "partly mapped"
    );
    d.unmap(device, va, g).unwrap();
    d.release_physical(device, h).unwrap();
    d.free_reservation(device, va, 4 * g).unwrap();
}

fn check_legacy(d: &dyn Driver, device: usize, host_memory: bool) {
    let before = d.bytes_in_use(device);
    let p = d.alloc_legacy(device, 10_000).unwrap();
    assert_ne!(p, 0);
    assert!(d.bytes_in_use(device) >= before + 10_000);
    if host_memory {
        // SAFETY: alloc_legacy returned 10,000 bytes of read/write memory; here it is host memory.
        let kept = unsafe {
            fill(p, 10_000, 3);
            holds(p, 10_000, 3)
        };
        assert!(kept);
    }
    assert_eq!(code(d.alloc_legacy(device, 0)), CudaError::InvalidValue);
    d.free_legacy(device, p).unwrap();
    assert_eq!(d.bytes_in_use(device), before);
}

fn check_events(d: &dyn Driver, device: usize) {
    let s = Stream::DEFAULT;
    let e = d.event_create(device).unwrap();
    assert!(
        d.event_query(device, e).unwrap(),
        "an unrecorded event is complete"
    );
    d.event_record(device, e, s).unwrap();
    d.event_synchronize(device, e).unwrap();
    assert!(d.event_query(device, e).unwrap());
    d.stream_wait_event(device, s, e).unwrap();
    d.event_record(device, e, s).unwrap();
    d.stream_synchronize(device, s).unwrap();
    assert!(d.event_query(device, e).unwrap());
    d.event_record(device, e, s).unwrap();
    d.device_synchronize(device).unwrap();
    assert!(
        d.event_query(device, e).unwrap(),
        "a device synchronize waits for every stream"
    );
    assert_eq!(
        code(d.device_synchronize(d.device_count().unwrap())),
        CudaError::InvalidDevice
    );
    d.event_destroy(device, e).unwrap();
}

/// Copies and memset: on legacy memory and on a VMM mapping (across two mappings), through the
/// driver only (so the same checks run on a GPU). Without memory behind the device (bookkeeping
/// backing) they must be refused cleanly.
fn check_copies(d: &dyn Driver, device: usize) {
    let s = Stream::DEFAULT;
    let p = d.alloc_legacy(device, 10_000).unwrap();
    match d.memset(device, p, 0xAB, 10_000, s) {
        Err(e) if e.error == CudaError::NotSupported => {
            assert_eq!(
                code(d.copy_to_device(device, p, &[1, 2, 3], s)),
                CudaError::NotSupported
            );
            d.free_legacy(device, p).unwrap();
            return;
        }
        r => r.unwrap(),
    }
    let pattern: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 1) as u8).collect();
    d.copy_to_device(device, p + 100, &pattern, s).unwrap();
    let mut back = vec![0u8; 10_000];
    d.copy_from_device(device, &mut back, p, s).unwrap();
    assert!(back[..100].iter().all(|&b| b == 0xAB));
    assert_eq!(&back[100..1100], &pattern[..]);
    assert!(back[1100..].iter().all(|&b| b == 0xAB));
    // A copy past the end of the allocation is refused, not performed.
    assert!(d.copy_to_device(device, p + 9_999, &[0, 0], s).is_err());
    d.free_legacy(device, p).unwrap();
    assert!(
        d.copy_from_device(device, &mut back, p, s).is_err(),
        "freed memory"
    );

    if !d.supports_vmm(device).unwrap() {
        return;
    }
    let g = d.granularity(device).unwrap();
    let va = d.reserve(device, 2 * g, 0).unwrap();
    let (a, b) = (
        d.create_physical(device, g).unwrap(),
        d.create_physical(device, g).unwrap(),
    );
    d.map(device, va, g, a).unwrap();
    d.map(device, va + g, g, b).unwrap();
    assert!(
        d.memset(device, va, 0, 16, s).is_err(),
        "mapped but not yet accessible"
    );
    d.set_access(device, va, 2 * g).unwrap();
    d.memset(device, va, 0x5A, 2 * g, s).unwrap();
    // Across the boundary between the two mappings.
    d.copy_to_device(device, va + g - 500, &pattern, s).unwrap();
    let mut back = vec![0u8; 2000];
    d.copy_from_device(device, &mut back, va + g - 1000, s)
        .unwrap();
    assert!(back[..500].iter().all(|&x| x == 0x5A));
    assert_eq!(&back[500..1500], &pattern[..]);
    assert!(back[1500..].iter().all(|&x| x == 0x5A));
    d.unmap(device, va, g).unwrap();
    d.unmap(device, va + g, g).unwrap();
    d.release_physical(device, a).unwrap();
    d.release_physical(device, b).unwrap();
    d.free_reservation(device, va, 2 * g).unwrap();
}

fn check_bytes_in_use(d: &dyn Driver, device: usize) {
    if !d.supports_vmm(device).unwrap() {
        return;
    }
    let g = d.granularity(device).unwrap();
    let before = d.bytes_in_use(device);
    let a = d.create_physical(device, g).unwrap();
    let b = d.create_physical(device, 2 * g).unwrap();
    assert_eq!(d.bytes_in_use(device), before + 3 * g);
    d.release_physical(device, a).unwrap();
    assert_eq!(d.bytes_in_use(device), before + 2 * g);
    d.release_physical(device, b).unwrap();
    assert_eq!(d.bytes_in_use(device), before);
}

/// Stream capture, as far as the trait reaches without a stream of its own: the legacy default
/// stream never captures and refuses to begin, and the thread's interaction mode swaps and comes
/// back. (The full rules run on the simulated driver's own tests, with streams it invents.)
fn check_capture(d: &dyn Driver, device: usize) {
    let s = Stream::DEFAULT;
    assert_eq!(d.stream_capture_info(device, s).unwrap(), CaptureInfo::NONE);
    assert_eq!(
        code(d.stream_begin_capture(device, s, CaptureMode::Global)),
        CudaError::StreamCaptureUnsupported
    );
    assert!(!d.stream_capture_info(device, s).unwrap().is_capturing());
    let old = d.exchange_capture_mode(CaptureMode::Relaxed).unwrap();
    assert_eq!(
        old,
        CaptureMode::Global,
        "every thread starts in global mode"
    );
    assert_eq!(d.exchange_capture_mode(old).unwrap(), CaptureMode::Relaxed);
    // With no capture underway, unsafe calls are allowed in every mode.
    let e = d.event_create(device).unwrap();
    assert!(d.event_query(device, e).unwrap());
    d.event_destroy(device, e).unwrap();
}

fn run_device(d: &dyn Driver, device: usize, host_memory: bool) {
    check_device_count(d, device);
    check_granularity(d, device);
    check_mem_info(d, device);
    check_vmm_lifecycle(d, device, host_memory);
    check_vmm_rules(d, device);
    check_legacy(d, device, host_memory);
    check_events(d, device);
    check_capture(d, device);
    check_copies(d, device);
    check_bytes_in_use(d, device);
}

fn run_suite(d: &dyn Driver, host_memory: bool) {
    for device in 0..d.device_count().unwrap() {
        run_device(d, device, host_memory);
    }
}

fn sim(config: &str) -> SimDriver {
    SimDriver::new(SimConfig::parse(config).unwrap())
}

#[test]
fn sim_real_backing_conforms() {
    let d = SimDriver::new(SimConfig::default());
    assert_eq!(d.config().backing, Backing::Real);
    run_suite(&d, true);
    assert_eq!(
        (
            d.live_reservations(0),
            d.live_mappings(0),
            d.live_handles(0)
        ),
        (0, 0, 0)
    );
    assert_eq!(
        (d.live_legacy(0), d.live_events(0), d.bytes_in_use(0)),
        (0, 0, 0)
    );
}

#[test]
fn sim_bookkeeping_backing_conforms() {
    let d = sim("backing:bookkeeping");
    run_suite(&d, false);
    assert_eq!(
        (
            d.live_reservations(0),
            d.live_mappings(0),
            d.live_handles(0)
        ),
        (0, 0, 0)
    );
}

#[test]
fn sim_variants_conform() {
    run_suite(&sim("devices:2,capacity:1GiB,granularity:64KiB"), true);
    run_suite(
        &sim("devices:3,backing:bookkeeping,granularity:4KiB"),
        false,
    );
    run_suite(&sim("vmm:false"), true);
}

#[test]
fn sim_as_a_shared_trait_object_across_threads() {
    // One device per thread: the byte counts the suite checks are per device.
    let d: std::sync::Arc<dyn Driver> = std::sync::Arc::new(sim("devices:4,capacity:1GiB"));
    let threads: Vec<_> = (0..4)
        .map(|device| {
            let d = d.clone();
            std::thread::spawn(move || {
                for _ in 0..5 {
                    run_device(&*d, device, true);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert!((0..4).all(|device| d.bytes_in_use(device) == 0));
}

#[test]
fn cuda_conforms_when_a_device_is_present() {
    match tessera::driver::cuda::CudaDriver::open() {
        Err(e) => println!("skipping: no CUDA device ({e})"),
        Ok(d) => run_suite(&d, false),
    }
}
