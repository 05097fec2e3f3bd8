use super::*;
use std::time::{Duration, Instant};

const G: u64 = 2 << 20;

fn sim(backing: Backing) -> SimDriver {
    SimDriver::new(SimConfig {
        capacity: 64 * G,
        backing,
        ..SimConfig::default()
    })
}

fn both() -> [SimDriver; 2] {
    [sim(Backing::Real), sim(Backing::Bookkeeping)]
}

fn code<T: fmt::Debug>(r: DriverResult<T>) -> CudaError {
    r.expect_err("call should fail").error
}

/// The permissions of the host mapping holding `va`, from /proc/self/maps (e.g. `rw-s`).
fn host_perms(va: u64) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut parts = line.split_whitespace();
        let (lo, hi) = parts.next()?.split_once('-')?;
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).ok()?,
            u64::from_str_radix(hi, 16).ok()?,
        );
        (lo <= va && va < hi).then(|| parts.next().unwrap_or("").to_string())
    })
}

/// Reserve `pages` granules, create one handle per granule, map and grant access.
fn mapped(d: &SimDriver, pages: u64) -> (u64, Vec<PhysHandle>) {
    let va = d.reserve(0, pages * G, 0).unwrap();
    let hs: Vec<_> = (0..pages)
        .map(|i| {
            let h = d.create_physical(0, G).unwrap();
            d.map(0, va + i * G, G, h).unwrap();
            h
        })
        .collect();
    d.set_access(0, va, pages * G).unwrap();
    (va, hs)
}

#[test]
fn write_read_through_mapped_memory() {
    let d = sim(Backing::Real);
    let (va, _) = mapped(&d, 2);
    let p = va as *mut u8;
    // SAFETY: [va, va + 2G) is mapped and read/write (set_access succeeded) until `d` is dropped.
    unsafe {
        p.write(7);
        p.add((2 * G - 1) as usize).write(9);
        assert_eq!(p.read(), 7);
        assert_eq!(p.add((2 * G - 1) as usize).read(), 9);
    }
    assert!(d.is_accessible(0, va) && d.is_mapped(0, va + G));
    assert_eq!(host_perms(va).as_deref(), Some("rw-s"));
}

#[test]
fn access_is_granted_only_by_set_access_and_revoked_by_unmap() {
    let d = sim(Backing::Real);
    let va = d.reserve(0, 2 * G, 0).unwrap();
    assert_eq!(host_perms(va).as_deref(), Some("---p"));
    let h = d.create_physical(0, G).unwrap();
    d.map(0, va, G, h).unwrap();
    assert!(d.is_mapped(0, va) && !d.is_accessible(0, va));
    assert_eq!(host_perms(va).as_deref(), Some("---s"));
    d.set_access(0, va, G).unwrap();
    assert_eq!(host_perms(va).as_deref(), Some("rw-s"));
    d.unmap(0, va, G).unwrap();
    assert!(!d.is_mapped(0, va) && !d.is_accessible(0, va));
    assert_eq!(host_perms(va).as_deref(), Some("---p"));
}

#[test]
fn remapping_a_handle_elsewhere_keeps_its_data() {
    let d = sim(Backing::Real);
    let (va, hs) = mapped(&d, 1);
    // SAFETY: [va, va + G) is mapped and accessible.
    unsafe { std::ptr::write_bytes(va as *mut u8, 0xab, G as usize) };
    let other = d.reserve(0, 4 * G, 0).unwrap();
    d.unmap(0, va, G).unwrap();
    d.map(0, other + 3 * G, G, hs[0]).unwrap();
    d.set_access(0, other + 3 * G, G).unwrap();
    // SAFETY: [other + 3G, other + 4G) is mapped and accessible.
    let s = unsafe { std::slice::from_raw_parts((other + 3 * G) as *const u8, G as usize) };
    assert!(s.iter().all(|&b| b == 0xab));
    // Two mappings of one handle share the bytes.
    d.map(0, va, G, hs[0]).unwrap();
    d.set_access(0, va, G).unwrap();
    // SAFETY: both ranges are mapped and accessible.
    unsafe {
        (va as *mut u8).write(1);
        assert_eq!(((other + 3 * G) as *const u8).read(), 1);
    }
}

#[test]
fn released_memory_goes_back_and_fresh_handles_are_zero() {
    let d = sim(Backing::Real);
    let (va, hs) = mapped(&d, 1);
    // SAFETY: mapped and accessible.
    unsafe { (va as *mut u8).write(5) };
    d.release_physical(0, hs[0]).unwrap();
    // Still mapped: the memory lives on until the last mapping goes.
    assert_eq!(d.live_handles(0), 1);
    assert_eq!(d.bytes_in_use(0), G);
    // SAFETY: still mapped and accessible.
    assert_eq!(unsafe { (va as *const u8).read() }, 5);
    d.unmap(0, va, G).unwrap();
    assert_eq!((d.live_handles(0), d.bytes_in_use(0)), (0, 0));
    let h = d.create_physical(0, G).unwrap();
    d.map(0, va, G, h).unwrap();
    d.set_access(0, va, G).unwrap();
    // SAFETY: mapped and accessible.
    assert_eq!(unsafe { (va as *const u8).read() }, 0);
}

#[test]
fn capacity_and_out_of_memory() {
    for d in both() {
        let hs: Vec<_> = (0..60).map(|_| d.create_physical(0, G).unwrap()).collect();
        let p = d.alloc_legacy(0, 3 * G).unwrap();
        assert_eq!(d.bytes_in_use(0), 63 * G);
        assert_eq!(
            d.mem_info(0).unwrap(),
            MemInfo {
                free: G,
                total: 64 * G
            }
        );
        assert_eq!(code(d.create_physical(0, 2 * G)), CudaError::OutOfMemory);
        assert_eq!(code(d.alloc_legacy(0, G + 1)), CudaError::OutOfMemory);
        d.set_external_usage(0, G);
        assert_eq!(d.mem_info(0).unwrap().free, 0);
        assert_eq!(code(d.create_physical(0, G)), CudaError::OutOfMemory);
        d.set_external_usage(0, 100 * G);
        assert_eq!(d.mem_info(0).unwrap().free, 0);
        assert_eq!(d.bytes_in_use(0), 63 * G, "external usage is not ours");
        d.set_external_usage(0, 0);
        d.free_legacy(0, p).unwrap();
        for h in hs {
            d.release_physical(0, h).unwrap();
        }
        assert_eq!(d.bytes_in_use(0), 0);
        assert_eq!(d.mem_info(0).unwrap().free, 64 * G);
        assert_eq!(d.live_legacy(0) + d.live_handles(0), 0);
    }
}

#[test]
fn every_rule_returns_its_error() {
    use CudaError::*;
    for d in both() {
        let va = d.reserve(0, 4 * G, 0).unwrap();
        let h = d.create_physical(0, G).unwrap();
        let h2 = d.create_physical(0, 2 * G).unwrap();
        // Sizes and addresses.
        assert_eq!(code(d.reserve(0, 0, 0)), InvalidValue);
        assert_eq!(code(d.reserve(0, G + 1, 0)), InvalidValue);
        assert_eq!(code(d.reserve(0, G, 3 * G)), InvalidValue);
        assert_eq!(code(d.create_physical(0, 0)), InvalidValue);
        assert_eq!(code(d.create_physical(0, G / 2)), InvalidValue);
        assert_eq!(code(d.map(0, va + 4096, G, h)), InvalidValue);
        assert_eq!(code(d.alloc_legacy(0, 0)), InvalidValue);
        // Map.
        assert_eq!(
            code(d.map(0, va, 2 * G, h)),
            InvalidValue,
            "size != handle size"
        );
        assert_eq!(
            code(d.map(0, va + 3 * G, 2 * G, h2)),
            InvalidValue,
            "runs off the reservation"
        );
        assert_eq!(
            code(d.map(0, va + 64 * G, G, h)),
            InvalidValue,
            "outside any reservation"
        );
        assert_eq!(code(d.map(0, va, G, PhysHandle(999))), InvalidHandle);
        d.map(0, va + G, 2 * G, h2).unwrap();
        assert_eq!(code(d.map(0, va + 2 * G, G, h)), InvalidValue, "overlap");
        d.map(0, va, G, h).unwrap();
        // Unmap must cover whole mappings.
        assert_eq!(
            code(d.unmap(0, va + G, G)),
            InvalidValue,
            "ends inside a mapping"
        );
        assert_eq!(
            code(d.unmap(0, va + 2 * G, G)),
            InvalidValue,
            "starts inside a mapping"
        );
        assert_eq!(
            code(d.unmap(0, va, 4 * G)),
            InvalidValue,
            "covers unmapped space"
        );
        // Access over a range not fully mapped.
        assert_eq!(code(d.set_access(0, va + 2 * G, 2 * G)), InvalidValue);
        d.set_access(0, va + G, G).unwrap(); // inside one mapping
        d.set_access(0, va, 3 * G).unwrap(); // across two mappings
                                             // Free reservation.
        assert_eq!(
            code(d.free_reservation(0, va, 4 * G)),
            InvalidValue,
            "live mappings"
        );
        d.unmap(0, va, 3 * G).unwrap(); // two whole mappings at once
        assert_eq!(d.live_mappings(0), 0);
        assert_eq!(
            code(d.free_reservation(0, va, 2 * G)),
            InvalidValue,
            "wrong size"
        );
        assert_eq!(
            code(d.free_reservation(0, va + G, 3 * G)),
            InvalidValue,
            "not a start"
        );
        d.free_reservation(0, va, 4 * G).unwrap();
        assert_eq!(
            code(d.free_reservation(0, va, 4 * G)),
            InvalidValue,
            "twice"
        );
        assert_eq!(code(d.free_legacy(0, 12345)), InvalidValue);
        // Handles.
        d.release_physical(0, h).unwrap();
        assert_eq!(code(d.release_physical(0, h)), InvalidHandle);
        assert_eq!(code(d.map(0, va, G, h)), InvalidHandle, "released");
        assert_eq!(code(d.release_physical(0, PhysHandle(777))), InvalidHandle);
        // Devices.
        assert_eq!(code(d.reserve(1, G, 0)), InvalidDevice);
        assert_eq!(code(d.mem_info(5)), InvalidDevice);
        assert_eq!(code(d.event_create(1)), InvalidDevice);
        assert_eq!(code(d.supports_vmm(1)), InvalidDevice);
        assert_eq!(d.bytes_in_use(9), 0);
        // Events.
        assert_eq!(code(d.event_query(0, Event(4242))), InvalidHandle);
        let e = d.event_create(0).unwrap();
        d.event_destroy(0, e).unwrap();
        assert_eq!(code(d.event_record(0, e, Stream(0))), InvalidHandle);
        assert_eq!(code(d.stream_wait_event(0, Stream(1), e)), InvalidHandle);
        let err = d.map(0, va, G, h).unwrap_err();
        assert!(err.to_string().contains("unknown or released"), "{err}");
    }
}

#[test]
fn vmm_off_is_not_supported() {
    for backing in [Backing::Real, Backing::Bookkeeping] {
        let d = SimDriver::new(SimConfig {
            vmm: false,
            backing,
            ..SimConfig::default()
        });
        assert!(!d.supports_vmm(0).unwrap());
        let n = CudaError::NotSupported;
        assert_eq!(code(d.reserve(0, G, 0)), n);
        assert_eq!(code(d.create_physical(0, G)), n);
        assert_eq!(code(d.map(0, 0, G, PhysHandle(1))), n);
        assert_eq!(code(d.unmap(0, 0, G)), n);
        assert_eq!(code(d.set_access(0, 0, G)), n);
        assert_eq!(code(d.free_reservation(0, 0, G)), n);
        let p = d.alloc_legacy(0, 1000).unwrap();
        assert_eq!(d.bytes_in_use(0), 1000);
        d.free_legacy(0, p).unwrap();
    }
}

#[test]
fn legacy_memory_is_usable() {
    let d = sim(Backing::Real);
    let p = d.alloc_legacy(0, 10_000).unwrap();
    assert!(d.is_accessible(0, p + 9_999) && !d.is_accessible(0, p + 10_000));
    // SAFETY: alloc_legacy returned 10,000 read/write bytes.
    unsafe {
        std::ptr::write_bytes(p as *mut u8, 3, 10_000);
        assert_eq!((p as *const u8).add(9_999).read(), 3);
    }
    d.free_legacy(0, p).unwrap();
    assert_eq!(d.live_legacy(0), 0);
}

#[test]
fn fault_injection_nth_has_no_side_effects() {
    for d in both() {
        d.fail_nth(Call::CreatePhysical, 2);
        d.fail_nth_with(Call::Map, 1, CudaError::IllegalAddress);
        let h = d.create_physical(0, G).unwrap();
        let err = d.create_physical(0, G).unwrap_err();
        assert_eq!(
            (err.error, err.detail.as_deref()),
            (CudaError::OutOfMemory, Some("injected fault"))
        );
        assert_eq!((d.live_handles(0), d.bytes_in_use(0)), (1, G));
        d.create_physical(0, G).unwrap(); // one-shot
        let va = d.reserve(0, G, 0).unwrap();
        assert_eq!(code(d.map(0, va, G, h)), CudaError::IllegalAddress);
        assert_eq!(d.live_mappings(0), 0);
        d.map(0, va, G, h).unwrap();
        d.fail_nth(Call::Unmap, 1);
        assert_eq!(code(d.unmap(0, va, G)), CudaError::Unknown);
        assert!(d.is_mapped(0, va));
        d.fail_nth(Call::Reserve, 1);
        d.clear_faults();
        d.reserve(0, G, 0).unwrap();
        assert_eq!(d.calls(Call::CreatePhysical), 3);
        assert_eq!(d.calls(Call::Map), 2);
        assert_eq!(
            d.call_counts(),
            vec![
                (Call::Reserve, 2),
                (Call::CreatePhysical, 3),
                (Call::Map, 2),
                (Call::Unmap, 1)
            ]
        );
        d.reset_counters();
        assert!(d.call_counts().is_empty());
    }
}

#[test]
fn fault_injection_probability_is_seeded() {
    let run = |seed| {
        let d = sim(Backing::Bookkeeping);
        d.fail_with_probability(Some(Call::EventCreate), 0.5, seed);
        (0..200)
            .map(|_| d.event_create(0).is_ok())
            .collect::<Vec<_>>()
    };
    let a = run(7);
    assert_eq!(a, run(7));
    assert_ne!(a, run(8));
    let ok = a.iter().filter(|&&x| x).count();
    assert!((60..140).contains(&ok), "{ok} of 200 succeeded");
    let d = sim(Backing::Bookkeeping);
    d.fail_with_probability(None, 1.0, 1);
    assert_eq!(code(d.device_count()), CudaError::Unknown);
    assert_eq!(code(d.reserve(0, G, 0)), CudaError::OutOfMemory);
    d.fail_with_probability(None, 0.0, 1);
    d.reserve(0, G, 0).unwrap();
}

#[test]
fn held_streams_keep_events_pending() {
    let d = sim(Backing::Bookkeeping);
    let s = Stream(5);
    let e0 = d.event_create(0).unwrap();
    d.event_record(0, e0, s).unwrap();
    assert!(
        d.event_query(0, e0).unwrap(),
        "work completes at once by default"
    );
    d.hold_stream(0, s);
    let es: Vec<_> = (0..3).map(|_| d.event_create(0).unwrap()).collect();
    for &e in &es {
        d.event_record(0, e, s).unwrap();
    }
    let other = d.event_create(0).unwrap();
    d.event_record(0, other, Stream(6)).unwrap();
    assert_eq!(d.pending_events(0), 3);
    assert!(!d.event_query(0, es[0]).unwrap());
    d.stream_wait_event(0, Stream(6), es[2]).unwrap();
    d.event_synchronize(0, es[1]).unwrap();
    assert!(d.event_query(0, es[0]).unwrap() && d.event_query(0, es[1]).unwrap());
    assert!(!d.event_query(0, es[2]).unwrap());
    d.complete_stream(0, s);
    assert_eq!(d.pending_events(0), 0);
    d.event_record(0, es[0], s).unwrap();
    assert_eq!(d.pending_events(0), 1, "still held");
    d.stream_synchronize(0, s).unwrap();
    assert_eq!(d.pending_events(0), 0);
    d.event_record(0, es[0], s).unwrap();
    d.release_stream(0, s);
    assert_eq!(d.pending_events(0), 0);
    d.event_record(0, es[0], s).unwrap();
    assert!(d.event_query(0, es[0]).unwrap(), "released");
    assert_eq!(d.live_events(0), 5);
    d.event_destroy(0, es[0]).unwrap();
    assert_eq!(d.live_events(0), 4);
}

#[test]
fn bookkeeping_addresses_are_fake_aligned_and_reused() {
    let d = SimDriver::new(SimConfig::parse("devices:2,backing:bookkeeping").unwrap());
    let a = d.reserve(0, G, 64 * G).unwrap();
    let b = d.reserve(1, 1 << 40, 0).unwrap();
    assert_eq!(a % (64 * G), 0);
    assert!(a >= FAKE_BASE && b >= FAKE_BASE + FAKE_SPAN);
    d.free_reservation(0, a, G).unwrap();
    assert_eq!(d.reserve(0, G, 64 * G).unwrap(), a);
    assert_eq!(code(d.reserve(0, 2 * FAKE_SPAN, 0)), CudaError::OutOfMemory);
}

#[test]
fn a_full_size_device_costs_nothing_until_touched() {
    let d = SimDriver::new(SimConfig::default());
    let start = Instant::now();
    let size = 80 << 30;
    let va = d.reserve(0, size, 0).unwrap();
    let h = d.create_physical(0, size).unwrap();
    d.map(0, va, size, h).unwrap();
    d.set_access(0, va, size).unwrap();
    // SAFETY: the whole range is mapped and accessible; only two pages get touched.
    unsafe {
        (va as *mut u8).write(1);
        ((va + size - 1) as *mut u8).write(2);
    }
    assert_eq!(d.mem_info(0).unwrap().free, 0);
    d.unmap(0, va, size).unwrap();
    d.release_physical(0, h).unwrap();
    d.free_reservation(0, va, size).unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn drop_releases_everything_still_alive() {
    let d = sim(Backing::Real);
    let (va, _) = mapped(&d, 2);
    let p = d.alloc_legacy(0, 100).unwrap();
    assert_eq!(host_perms(p).as_deref(), Some("rw-p"));
    drop(d);
    // Another test may map something new there at once, but not this driver's memfd with access.
    assert_ne!(host_perms(va).as_deref(), Some("rw-s"));
}

#[test]
fn config_parse_and_display() {
    let c = SimConfig::parse(
        " devices:2, capacity:8GiB,granularity:2MiB,vmm:false,backing:bookkeeping,",
    )
    .unwrap();
    assert_eq!(
        c,
        SimConfig {
            devices: 2,
            capacity: 8 << 30,
            granularity: 2 << 20,
            vmm: false,
            backing: Backing::Bookkeeping
        }
    );
    assert_eq!(SimConfig::parse(&c.to_string()).unwrap(), c);
    assert_eq!(SimConfig::parse("").unwrap(), SimConfig::default());
    for (bad, names) in [
        ("colour:red", "colour"),
        ("devices:two", "devices"),
        ("capacity:lots", "capacity"),
        ("vmm:maybe", "vmm"),
        ("backing:disk", "backing"),
        ("granularity:3MiB", "granularity"),
        ("devices", "devices"),
        ("devices:1,devices:2", "devices"),
    ] {
        let e = SimConfig::parse(bad).unwrap_err();
        assert!(e.contains(names), "{bad}: {e}");
    }
}

#[test]
fn a_bad_config_fails_calls_instead_of_panicking() {
    let d = SimDriver::new(SimConfig {
        granularity: 3,
        ..SimConfig::default()
    });
    let e = d.granularity(0).unwrap_err();
    assert_eq!(e.error, CudaError::NotInitialized);
    assert!(e.to_string().contains("power of two"), "{e}");
    let d = SimDriver::new(SimConfig {
        devices: 0,
        ..SimConfig::default()
    });
    assert_eq!(d.device_count().unwrap(), 0);
    assert_eq!(code(d.reserve(0, G, 0)), CudaError::InvalidDevice);
}

#[test]
fn hostile_inputs_do_not_panic() {
    for d in both() {
        let big = [0, 1, G, u64::MAX, u64::MAX - G + 1, 1 << 63];
        for &a in &big {
            for &b in &big {
                let _ = d.reserve(0, a, b);
                let _ = d.map(0, a, b, PhysHandle(a));
                let _ = d.unmap(0, a, b);
                let _ = d.set_access(0, a, b);
                let _ = d.free_reservation(0, a, b);
                let _ = d.create_physical(0, a);
                let _ = d.alloc_legacy(0, a);
                let _ = d.free_legacy(0, a);
            }
        }
        let _ = d.is_mapped(0, u64::MAX);
        let _ = d.is_accessible(usize::MAX, u64::MAX);
    }
}

#[test]
fn range_set_and_extents() {
    let mut r = RangeSet::default();
    r.insert(10, 20);
    r.insert(30, 40);
    r.insert(20, 30);
    assert_eq!(r.0.len(), 1);
    r.remove(15, 35);
    assert!(r.contains(14) && !r.contains(15) && !r.contains(34) && r.contains(35));
    r.remove(0, 100);
    assert!(r.0.is_empty());
    let mut x = Extents::new(0, 100);
    let a = x.alloc(10, 1).unwrap();
    let b = x.alloc(10, 1).unwrap();
    let c = x.alloc(10, 16).unwrap();
    assert_eq!((a, b, c), (0, 10, 32));
    x.release(a, 10);
    assert_eq!(x.alloc(4, 4).unwrap(), 0);
    x.release(c, 10);
    assert_eq!(x.end, 20);
    assert!(x.alloc(200, 1).is_none());
}

#[test]
fn a_device_synchronize_completes_held_streams_work() {
    let d = SimDriver::with_capacity(64 << 20);
    let s = Stream(5);
    d.hold_stream(0, s);
    let e = d.event_create(0).unwrap();
    d.event_record(0, e, s).unwrap();
    assert!(
        !d.event_query(0, e).unwrap(),
        "the held stream's event is pending"
    );
    d.device_synchronize(0).unwrap();
    assert!(
        d.event_query(0, e).unwrap(),
        "the device synchronize waited for it"
    );
    d.release_stream(0, s);
}
