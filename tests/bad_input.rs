//! Bad input is an error, never corruption: unknown, interior and double-freed pointers, sizes
//! of zero or past any device, bad device indices, bad fractions and configuration keys. A
//! rejected free changes nothing but the `invalid_frees` counter.

mod common;
use common::*;
use std::sync::Arc;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::{DevicePtr, Driver, Stream};
use tessera::{Allocation, Backend, Config, Error, Stats, Tessera};

const KIB: u64 = 1 << 10;
const S: Stream = Stream::DEFAULT;

/// Frees `ptr`, expecting the error `check` accepts, and checks that nothing changed but the
/// count of invalid frees.
fn bad_free(
    t: &Tessera,
    tr: &Tracker,
    dev: usize,
    ptr: DevicePtr,
    check: impl Fn(&Error) -> bool,
) -> Error {
    let before = t.stats(dev).unwrap();
    let snap = t.snapshot(dev).unwrap();
    let err = t.free(dev, ptr).expect_err("a bad free is an error");
    assert!(check(&err), "unexpected error for {ptr:#x}: {err:?}");
    let after = t.stats(dev).unwrap();
    assert_eq!(
        after,
        Stats {
            invalid_frees: before.invalid_frees + 1,
            ..before.clone()
        },
        "a rejected free changes nothing but the counter"
    );
    assert_eq!(
        t.snapshot(dev).unwrap().segments,
        snap.segments,
        "no block changed"
    );
    tr.check();
    t.check_invariants(dev).unwrap();
    err
}

fn is_unknown(ptr: DevicePtr, interior: Option<DevicePtr>) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::UnknownPointer { ptr: p, interior_of: i, .. } if *p == ptr && *i == interior)
}

fn is_double(ptr: DevicePtr) -> impl Fn(&Error) -> bool {
    move |e| matches!(e, Error::DoubleFree { ptr: p, device: 0 } if *p == ptr)
}

fn backends() -> [Config; 2] {
    [
        Config::default(),
        Config {
            backend: Backend::Legacy,
            ..Config::default()
        },
    ]
}

#[test]
fn unknown_pointers_are_errors_that_change_nothing() {
    for config in backends() {
        let (_sim, t) = sim_alloc(64 * MIB, config);
        let mut tr = Tracker::default();
        let small = alloc(&t, &mut tr, 4 * KIB, S).unwrap();
        let large = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
        let host = Box::new(0u64);
        for ptr in [
            0,
            8,
            0x1234,
            &*host as *const u64 as u64,
            u64::MAX,
            large + 64 * MIB,
        ] {
            bad_free(&t, &tr, 0, ptr, is_unknown(ptr, None));
        }
        // Interior pointers name the allocation they point into.
        for (base, off) in [
            (large, 512),
            (large, 8),
            (large, 3 * MIB - 1),
            (small, 8),
            (small, 4 * KIB - 512),
        ] {
            let e = bad_free(&t, &tr, 0, base + off, is_unknown(base + off, Some(base)));
            assert!(e.to_string().contains(&format!("{base:#x}")), "{e}");
        }
        assert_eq!(t.stats(0).unwrap().invalid_frees, 11);
        for p in [small, large] {
            free(&t, &mut tr, p);
        }
    }
}

#[test]
fn double_frees_are_errors_that_change_nothing() {
    for config in backends() {
        let (_sim, t) = sim_alloc(64 * MIB, config);
        let mut tr = Tracker::default();
        let keep_small = alloc(&t, &mut tr, 4 * KIB, S).unwrap();
        let keep_large = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
        for size in [512, 4 * KIB, 100 * KIB, MIB, 2 * MIB, 5 * MIB + 512] {
            let p = alloc(&t, &mut tr, size, S).unwrap();
            free(&t, &mut tr, p);
            let e = bad_free(&t, &tr, 0, p, is_double(p));
            assert!(e.to_string().contains("double free"), "{e}");
        }
        for p in [keep_small, keep_large] {
            free(&t, &mut tr, p);
        }
        assert_eq!(t.stats(0).unwrap().invalid_frees, 6);
    }
}

#[test]
fn a_double_free_after_the_block_merged_with_its_neighbours() {
    let (_sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let a = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
    let b = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
    let c = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
    let keep = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
    assert_eq!((b, c, keep), (a + 3 * MIB, a + 6 * MIB, a + 9 * MIB));
    // b merges with a, then with c: b and c now lie inside the free block at a.
    free(&t, &mut tr, a);
    free(&t, &mut tr, b);
    free(&t, &mut tr, c);
    for p in [a, b, c] {
        bad_free(&t, &tr, 0, p, is_double(p));
    }
    // So does any pointer inside free memory.
    bad_free(&t, &tr, 0, b + 512, |e| {
        matches!(e, Error::DoubleFree { .. } | Error::UnknownPointer { .. })
    });
    // The merged block is still whole: 9 MiB fits in it without new memory.
    let reserved = t.stats(0).unwrap().reserved_bytes;
    let d = alloc(&t, &mut tr, 9 * MIB, S).unwrap();
    assert_eq!(d, a);
    assert_eq!(t.stats(0).unwrap().reserved_bytes, reserved);
    free(&t, &mut tr, d);
    free(&t, &mut tr, keep);
    // After empty_cache the memory is gone: freeing into it is an unknown pointer, or a double
    // free where a page shared with other free memory stays; never a success.
    t.empty_cache(0).unwrap();
    for p in [a, b, c, keep] {
        let before = t.stats(0).unwrap();
        assert!(t.free(0, p).is_err());
        assert_eq!(t.stats(0).unwrap().invalid_frees, before.invalid_frees + 1);
        t.check_invariants(0).unwrap();
    }
}

#[test]
fn a_double_free_of_a_small_slot_after_its_run_was_retired() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    // Two runs of one class, then free everything: the spare run goes back to its granule.
    let ptrs: Vec<_> = (0..64)
        .map(|_| alloc(&t, &mut tr, 4 * KIB, S).unwrap())
        .collect();
    let keep = alloc(&t, &mut tr, 100 * KIB, S).unwrap();
    for &p in &ptrs {
        free(&t, &mut tr, p);
    }
    for &p in &ptrs {
        let before = t.stats(0).unwrap();
        let e = t.free(0, p).unwrap_err();
        assert!(
            matches!(e, Error::DoubleFree { .. } | Error::UnknownPointer { .. }),
            "{e:?}"
        );
        assert_eq!(t.stats(0).unwrap().invalid_frees, before.invalid_frees + 1);
        tr.check();
        t.check_invariants(0).unwrap();
    }
    free(&t, &mut tr, keep);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

#[test]
fn a_double_free_while_the_first_free_waits_for_a_stream() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    sim.hold_stream(0, Stream(2));
    for size in [4 * KIB, 3 * MIB] {
        let p = alloc(&t, &mut tr, size, Stream(1)).unwrap();
        t.record_stream(p, Stream(2)).unwrap();
        free(&t, &mut tr, p);
        bad_free(&t, &tr, 0, p, is_double(p));
    }
    sim.release_stream(0, Stream(2));
}

#[test]
fn bad_sizes_are_errors() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    for size in [0, u64::MAX, u64::MAX - 511, 1 << 63, (1 << 56) + 1] {
        let e = t.allocate(0, size, S).unwrap_err();
        assert!(
            matches!(e, Error::InvalidSize { size: s, .. } if s == size),
            "{size}: {e:?}"
        );
        assert!(e.to_string().contains("invalid size"), "{e}");
    }
    let st = t.stats(0).unwrap();
    assert_eq!((st.allocations, st.ooms, st.reserved_bytes), (0, 0, 0));
    assert_eq!(sim.bytes_in_use(0), 0);
    // Large but plausible sizes are an OOM, not bad input.
    assert!(t.allocate(0, 1 << 50, S).unwrap_err().is_out_of_memory());
    t.check_invariants(0).unwrap();
}

#[test]
fn bad_device_indices_are_errors() {
    let (_sim, t) = sim_alloc(64 * MIB, Config::default());
    let p = t.allocate(0, 4 * KIB, S).unwrap();
    let invalid = |e: Error| {
        matches!(
            e,
            Error::InvalidDevice {
                device: 1,
                count: 1
            }
        )
    };
    assert!(invalid(t.allocate(1, 4 * KIB, S).unwrap_err()));
    assert!(invalid(t.free(1, p).unwrap_err()));
    assert!(invalid(t.empty_cache(1).unwrap_err()));
    assert!(invalid(t.trim(1).unwrap_err()));
    assert!(invalid(t.stats(1).unwrap_err()));
    assert!(invalid(t.snapshot(1).unwrap_err()));
    assert!(invalid(t.set_limit(1, None).unwrap_err()));
    assert!(invalid(t.set_memory_fraction(1, 0.5).unwrap_err()));
    assert!(invalid(t.reset_peak_stats(1).unwrap_err()));
    assert!(t.check_invariants(1).is_err());
    let e = t.allocate(usize::MAX, 4 * KIB, S).unwrap_err();
    assert!(e.to_string().contains("1 device(s) present"), "{e}");
    // The live allocation was not touched.
    assert_eq!(t.stats(0).unwrap().active_blocks, 1);
    t.free(0, p).unwrap();
    t.check_invariants(0).unwrap();
}

fn two_devices() -> (Arc<SimDriver>, Tessera) {
    let sim = Arc::new(SimDriver::new(SimConfig {
        devices: 2,
        capacity: 64 * MIB,
        ..SimConfig::default()
    }));
    let config = Config {
        check_invariants: true,
        ..Config::default()
    };
    (sim.clone(), Tessera::new(sim, config).unwrap())
}

#[test]
fn free_any_finds_the_device_by_pointer() {
    let (sim, t) = two_devices();
    let on0 = t.allocate(0, 3 * MIB, S).unwrap();
    let on1 = [
        t.allocate(1, 3 * MIB, S).unwrap(),
        t.allocate(1, 4 * KIB, S).unwrap(),
    ];
    // Freeing on the wrong device is an unknown pointer there and changes nothing.
    let e = t.free(0, on1[0]).unwrap_err();
    assert!(
        matches!(
            e,
            Error::UnknownPointer {
                device: Some(0),
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(t.stats(1).unwrap().active_blocks, 2);
    for p in on1 {
        assert_eq!(t.allocation(p).unwrap().device, 1);
        t.free_any(p).unwrap();
        assert!(matches!(
            t.free_any(p).unwrap_err(),
            Error::DoubleFree { device: 1, .. }
        ));
    }
    assert_eq!(t.stats(1).unwrap().active_blocks, 0);
    assert_eq!(t.stats(1).unwrap().invalid_frees, 2);
    assert_eq!(t.stats(0).unwrap().active_blocks, 1);
    assert!(matches!(
        t.free_any(0x1000).unwrap_err(),
        Error::UnknownPointer { device: None, .. }
    ));
    t.free_any(on0).unwrap();
    for d in 0..2 {
        t.check_invariants(d).unwrap();
        t.empty_cache(d).unwrap();
        assert_eq!(sim.bytes_in_use(d), 0);
    }
}

#[test]
fn allocation_finds_base_and_size_from_any_interior_pointer() {
    for config in backends() {
        let (_sim, t) = sim_alloc(64 * MIB, config);
        let mut tr = Tracker::default();
        let large = alloc(&t, &mut tr, 3 * MIB + 100, Stream(3)).unwrap();
        let small = alloc(&t, &mut tr, 4000, S).unwrap();
        let want_large = Allocation {
            device: 0,
            base: large,
            size: 3 * MIB + 512,
            requested: 3 * MIB + 100,
            stream: Stream(3),
        };
        for off in [0, 1, 512, 3 * MIB, 3 * MIB + 511] {
            assert_eq!(t.allocation(large + off), Some(want_large), "offset {off}");
        }
        let a = t.allocation(small + 100).unwrap();
        assert_eq!((a.base, a.requested, a.stream), (small, 4000, S));
        assert!(a.size >= 4000 && a.size % 512 == 0, "{a:?}");
        assert_eq!(t.allocation(small), Some(a));
        // Past the end, in nothing, or freed: none.
        assert_eq!(t.allocation(0x1000), None);
        free(&t, &mut tr, large);
        assert_eq!(t.allocation(large), None);
        assert_eq!(t.allocation(large + 512), None);
        free(&t, &mut tr, small);
        assert_eq!(t.allocation(small), None);
    }
}

#[test]
fn bad_fractions_and_limits_are_errors() {
    let (_sim, t) = sim_alloc(64 * MIB, Config::default());
    for f in [1.5, -0.25, f64::NAN, f64::INFINITY] {
        let e = t.set_memory_fraction(0, f).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{f}: {e:?}");
        assert!(e.to_string().contains("fraction"), "{e}");
    }
    assert_eq!(t.stats(0).unwrap().limit_bytes, None, "nothing was set");
    t.set_memory_fraction(0, 1.0).unwrap();
    assert_eq!(t.stats(0).unwrap().limit_bytes, Some(64 * MIB));
    // PyTorch allows 0: no new memory at all.
    t.set_memory_fraction(0, 0.0).unwrap();
    assert_eq!(t.stats(0).unwrap().limit_bytes, Some(0));
    assert!(t
        .allocate(0, MIB, Stream::DEFAULT)
        .unwrap_err()
        .is_out_of_memory());
    t.set_memory_fraction(0, 1.0).unwrap();
    // A fraction in a Config is checked when the allocator is made.
    let sim = Arc::new(SimDriver::with_capacity(64 * MIB));
    let bad = Config {
        memory_fraction: Some(2.0),
        ..Config::default()
    };
    assert!(matches!(
        Tessera::new(sim, bad).unwrap_err(),
        Error::Config(_)
    ));
}

#[test]
fn config_parse_names_the_bad_key_or_value() {
    for (text, names) in [
        ("backend:vmm,bogus_key:1", "bogus_key"),
        ("pagesize:2MiB", "pagesize"),
        ("limit:lots", "lots"),
        ("backend:cuda", "cuda"),
        ("small_max:1MiB,small_max:2MiB", "small_max"),
        ("limit", "limit"),
        ("memory_fraction:1.5", "memory_fraction"),
    ] {
        let e = Config::parse(text).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{text}: {e:?}");
        assert!(e.to_string().contains(names), "{text}: {e}");
    }
    let c = Config::parse(" backend:legacy , limit:8GiB, ").unwrap();
    assert_eq!((c.backend, c.limit), (Backend::Legacy, Some(8 * GIB)));
}

#[test]
fn record_stream_of_a_bad_pointer_is_an_error() {
    let (_sim, t) = sim_alloc(64 * MIB, Config::default());
    assert!(matches!(
        t.record_stream(0x1000, Stream(1)).unwrap_err(),
        Error::UnknownPointer { .. }
    ));
    let p = t.allocate(0, 3 * MIB, S).unwrap();
    t.free(0, p).unwrap();
    assert!(t.record_stream(p, Stream(1)).is_err());
    t.check_invariants(0).unwrap();
    let _ = t.driver().bytes_in_use(0);
}
