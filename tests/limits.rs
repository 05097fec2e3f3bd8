//! Limits: a byte limit or a memory fraction caps what tessera reserves; past it a request takes
//! the OOM path even when the device has room, and at it fully free pages are remapped instead
//! of failing. Memory taken by another process (external usage) makes tessera give its cache
//! back, and fail cleanly when even that is not enough.

mod common;
use common::*;
use tessera::driver::{Call, Driver, Stream};
use tessera::{Backend, Config, Error, OomReport};

const KIB: u64 = 1 << 10;
const S: Stream = Stream::DEFAULT;

fn report(e: &Error) -> &OomReport {
    match e {
        Error::OutOfMemory(r) => r,
        other => panic!("expected an OOM, got {other:?}"),
    }
}

fn limited(limit: u64) -> Config {
    Config {
        limit: Some(limit),
        ..Config::default()
    }
}

#[test]
fn a_limit_caps_reserved_memory_though_the_device_has_room() {
    for backend in [Backend::Vmm, Backend::Legacy] {
        let config = Config {
            backend,
            ..limited(16 * MIB)
        };
        let (sim, t) = sim_alloc(64 * MIB, config);
        let mut tr = Tracker::default();
        assert_eq!(t.stats(0).unwrap().limit_bytes, Some(16 * MIB));
        let mut live = Vec::new();
        for _ in 0..8 {
            live.push(alloc(&t, &mut tr, 2 * MIB, S).unwrap());
        }
        assert_eq!(t.stats(0).unwrap().reserved_bytes, 16 * MIB);
        for size in [2 * MIB, 4 * KIB, 10 * MIB] {
            let err = t.allocate(0, size, S).unwrap_err();
            let r = report(&err);
            assert_eq!(r.limit, Some(16 * MIB));
            assert!(
                r.device_free >= Some(48 * MIB),
                "the device had room: {r:?}"
            );
            let msg = err.to_string();
            assert!(msg.contains("tessera limit 16.00 MiB"), "{msg}");
            assert!(msg.contains("limit was reached"), "{backend}: {msg}");
            tr.check();
            t.check_invariants(0).unwrap();
        }
        assert_eq!(sim.bytes_in_use(0), 16 * MIB);
        assert_eq!(t.stats(0).unwrap().ooms, 3);
        // Lifting the limit lets the same requests through.
        t.set_limit(0, None).unwrap();
        assert_eq!(t.stats(0).unwrap().limit_bytes, None);
        for size in [2 * MIB, 4 * KIB, 10 * MIB] {
            live.push(alloc(&t, &mut tr, size, S).unwrap());
        }
        assert!(t.stats(0).unwrap().reserved_bytes > 16 * MIB);
        // A limit below what is held: the cache still serves, but nothing new is reserved.
        t.set_limit(0, Some(8 * MIB)).unwrap();
        let p = live.pop().unwrap();
        free(&t, &mut tr, p);
        live.push(alloc(&t, &mut tr, 10 * MIB, S).expect("served from the cache"));
        assert!(t.allocate(0, 20 * MIB, S).unwrap_err().is_out_of_memory());
        for p in live {
            free(&t, &mut tr, p);
        }
        t.empty_cache(0).unwrap();
        assert_eq!(sim.bytes_in_use(0), 0);
    }
}

#[test]
fn a_request_larger_than_the_limit_fails_at_once() {
    let (sim, t) = sim_alloc(64 * MIB, limited(16 * MIB));
    let creates = sim.calls(Call::CreatePhysical);
    let err = t.allocate(0, 16 * MIB + 1, S).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("tessera limit 16.00 MiB"), "{msg}");
    assert!(msg.contains("larger than the device or the limit"), "{msg}");
    assert_eq!(sim.calls(Call::CreatePhysical), creates);
    // Exactly the limit fits.
    let p = t.allocate(0, 16 * MIB, S).unwrap();
    t.free(0, p).unwrap();
    t.check_invariants(0).unwrap();
}

#[test]
fn a_memory_fraction_is_a_limit_too() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    t.set_memory_fraction(0, 0.25).unwrap();
    assert_eq!(t.stats(0).unwrap().limit_bytes, Some(16 * MIB));
    let a = alloc(&t, &mut tr, 12 * MIB, S).unwrap();
    let err = t.allocate(0, 6 * MIB, S).unwrap_err();
    assert!(err.to_string().contains("tessera limit 16.00 MiB"), "{err}");
    let b = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    assert_eq!(sim.bytes_in_use(0), 16 * MIB);
    // The smaller of a byte limit and a fraction applies.
    t.set_limit(0, Some(32 * MIB)).unwrap();
    assert_eq!(t.stats(0).unwrap().limit_bytes, Some(16 * MIB));
    t.set_memory_fraction(0, 1.0).unwrap();
    assert_eq!(t.stats(0).unwrap().limit_bytes, Some(32 * MIB));
    let c = alloc(&t, &mut tr, 16 * MIB, S).unwrap();
    assert!(t.allocate(0, 2 * MIB, S).unwrap_err().is_out_of_memory());
    // The fraction from the configuration, too.
    let config = Config {
        memory_fraction: Some(0.5),
        ..Config::default()
    };
    let (_sim2, t2) = sim_alloc(64 * MIB, config);
    assert_eq!(t2.stats(0).unwrap().limit_bytes, Some(32 * MIB));
    assert!(t2.allocate(0, 34 * MIB, S).unwrap_err().is_out_of_memory());
    for p in [a, b, c] {
        free(&t, &mut tr, p);
    }
}

#[test]
fn at_the_limit_fully_free_pages_are_remapped_instead_of_failing() {
    let (sim, t) = sim_alloc(64 * MIB, limited(16 * MIB));
    let mut tr = Tracker::default();
    let blocks: Vec<_> = (0..8)
        .map(|_| alloc(&t, &mut tr, 2 * MIB, S).unwrap())
        .collect();
    for p in blocks.iter().step_by(2) {
        free(&t, &mut tr, *p);
    }
    let before = t.stats(0).unwrap();
    assert_eq!(before.largest_free_bytes, 8 * MIB);
    let creates = sim.calls(Call::CreatePhysical);
    let big = alloc(&t, &mut tr, 8 * MIB, S).expect("four free pages, remapped");
    let after = t.stats(0).unwrap();
    assert_eq!(after.remaps, before.remaps + 4);
    assert_eq!(after.reserved_bytes, 16 * MIB);
    assert_eq!(after.ooms, 0);
    assert_eq!(sim.calls(Call::CreatePhysical), creates, "no new page");
    // Small requests take a freed page too.
    free(&t, &mut tr, blocks[1]);
    let small = alloc(&t, &mut tr, 4 * KIB, S).expect("a freed page becomes a granule");
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 16 * MIB);
    tr.check();
    for p in [big, small, blocks[3], blocks[5], blocks[7]] {
        free(&t, &mut tr, p);
    }
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

#[test]
fn below_the_limit_new_pages_come_before_remapping() {
    // Cache first, remap under pressure: with room under the limit, no free page is stolen.
    let (_sim, t) = sim_alloc(64 * MIB, limited(32 * MIB));
    let mut tr = Tracker::default();
    let blocks: Vec<_> = (0..8)
        .map(|_| alloc(&t, &mut tr, 2 * MIB, S).unwrap())
        .collect();
    for p in blocks.iter().step_by(2) {
        free(&t, &mut tr, *p);
    }
    let big = alloc(&t, &mut tr, 8 * MIB, S).unwrap();
    let st = t.stats(0).unwrap();
    assert_eq!(st.remaps, 0, "{st:?}");
    assert_eq!(st.reserved_bytes, 24 * MIB);
    // Now at 24 of 32 MiB: 12 MiB more needs 4 new pages and 2 stolen ones.
    let more = alloc(&t, &mut tr, 12 * MIB, S).unwrap();
    let st = t.stats(0).unwrap();
    assert_eq!(st.reserved_bytes, 32 * MIB);
    assert_eq!(st.remaps, 2, "{st:?}");
    for p in [big, more, blocks[1], blocks[3], blocks[5], blocks[7]] {
        free(&t, &mut tr, p);
    }
}

#[test]
fn external_usage_is_served_from_the_cache_by_remapping() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let blocks: Vec<_> = (0..16)
        .map(|_| alloc(&t, &mut tr, 2 * MIB, S).unwrap())
        .collect();
    for p in blocks.iter().step_by(2) {
        free(&t, &mut tr, *p);
    }
    // Another process takes everything tessera does not hold.
    sim.set_external_usage(0, 32 * MIB);
    let big = alloc(&t, &mut tr, 16 * MIB, S).expect("the cached pages suffice");
    assert_eq!(
        sim.live_handles(0),
        16,
        "no new page (the device refused one)"
    );
    assert_eq!(t.stats(0).unwrap().remaps, 8);
    assert_eq!(sim.bytes_in_use(0), 32 * MIB);
    let err = t.allocate(0, 2 * MIB, S).unwrap_err();
    let r = report(&err);
    assert_eq!(r.device_free, Some(0));
    assert!(
        err.to_string().contains("(0 B free on the device)"),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("The driver said: cuMemCreate failed"),
        "{err}"
    );
    tr.check();
    free(&t, &mut tr, big);
    for p in blocks.iter().skip(1).step_by(2) {
        free(&t, &mut tr, *p);
    }
    sim.set_external_usage(0, 0);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

#[test]
fn legacy_releases_its_cache_when_another_process_takes_the_device() {
    let config = Config {
        backend: Backend::Legacy,
        ..Config::default()
    };
    let (sim, t) = sim_alloc(64 * MIB, config);
    let mut tr = Tracker::default();
    let keep = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    let segs: Vec<_> = (0..8)
        .map(|_| alloc(&t, &mut tr, 4 * MIB, S).unwrap())
        .collect();
    for p in segs {
        free(&t, &mut tr, p);
    }
    // 32 MiB cached in 4 MiB segments, none of which fits 12 MiB; the device has 4 MiB left.
    sim.set_external_usage(0, 24 * MIB);
    let before = t.stats(0).unwrap();
    assert_eq!(before.reserved_bytes, 36 * MIB);
    let p = alloc(&t, &mut tr, 12 * MIB, S).expect("releasing the cache is enough");
    let after = t.stats(0).unwrap();
    assert_eq!(after.cache_releases, before.cache_releases + 1);
    assert_eq!(after.released_bytes, before.released_bytes + 32 * MIB);
    assert_eq!(after.reserved_bytes, 16 * MIB);
    assert_eq!(sim.bytes_in_use(0), 16 * MIB);
    assert_eq!(after.ooms, 0);
    // More than the device has left even without a cache: a clean failure.
    let err = t.allocate(0, 32 * MIB, S).unwrap_err();
    assert!(err.is_out_of_memory(), "{err:?}");
    tr.check();
    t.check_invariants(0).unwrap();
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 16 * MIB);
    for q in [p, keep] {
        free(&t, &mut tr, q);
    }
}

/// External usage leaves too little even with the cache: the request fails, and tessera is
/// left holding no more than its live allocations need (its cache went back to the device).
#[test]
fn a_request_that_fails_under_external_pressure_leaves_the_cache_released() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let a = alloc(&t, &mut tr, 16 * MIB, S).unwrap();
    let b = alloc(&t, &mut tr, 16 * MIB, S).unwrap();
    free(&t, &mut tr, b);
    // 16 MiB cached, 2 MiB free on the device: 24 MiB cannot be had.
    sim.set_external_usage(0, 30 * MIB);
    let err = t.allocate(0, 24 * MIB, S).unwrap_err();
    assert!(err.is_out_of_memory(), "{err:?}");
    tr.check();
    t.check_invariants(0).unwrap();
    let st = t.stats(0).unwrap();
    assert!(st.cache_releases >= 1);
    // Today: reserved is 34 MiB (9 pages sit in the pool) and the device shows 0 B free.
    assert_eq!(st.reserved_bytes, 16 * MIB, "{st:?}");
    assert_eq!(sim.bytes_in_use(0), 16 * MIB);
    free(&t, &mut tr, a);
}

#[test]
fn external_usage_mid_run_keeps_live_data_and_recovers() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    for i in 0..12u64 {
        alloc(&t, &mut tr, MIB + 512 + i * 100 * KIB, S).unwrap();
        alloc(&t, &mut tr, 4 * KIB + i * 512, S).unwrap();
    }
    let held = tr.ptrs();
    for p in held.iter().step_by(2) {
        free(&t, &mut tr, *p);
    }
    sim.set_external_usage(0, 60 * MIB);
    // Whatever fits in the cache succeeds; the rest fails cleanly.
    let mut got = Vec::new();
    for size in [3 * MIB, 4 * KIB, 20 * MIB, 2 * MIB, 100 * KIB] {
        match alloc(&t, &mut tr, size, S) {
            Ok(p) => got.push(p),
            Err(e) => assert!(e.is_out_of_memory(), "{e:?}"),
        }
        tr.check();
        t.check_invariants(0).unwrap();
        assert!(sim.bytes_in_use(0) <= 64 * MIB);
    }
    // The other process leaves: everything works again.
    sim.set_external_usage(0, 0);
    got.push(alloc(&t, &mut tr, 20 * MIB, S).unwrap());
    for p in tr.ptrs() {
        free(&t, &mut tr, p);
    }
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// Extending a free block at the limit, when its left neighbour is a free block of another
/// stream: gathering pages merges the two (both streams are done), and the block being extended
/// must neither lose its own pages nor be looked up by a stale address.
#[test]
fn extending_a_block_whose_neighbour_of_another_stream_is_free_at_the_limit() {
    let (sim, t) = sim_alloc(128 * MIB, Config::default());
    let mut tr = Tracker::default();
    let a = alloc(&t, &mut tr, 5 * MIB / 2, S).unwrap();
    let b = alloc(&t, &mut tr, 3 * MIB / 2, S).unwrap();
    let c = alloc(&t, &mut tr, 3 * MIB, Stream(1)).unwrap();
    assert_eq!((b, c), (a + 5 * MIB / 2, a + 4 * MIB));
    t.set_limit(0, Some(8 * MIB)).unwrap();
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 8 * MIB);
    // [a + 2.5 MiB, a + 4 MiB) free on S, [a + 4 MiB, a + 8 MiB) free on stream 1.
    free(&t, &mut tr, b);
    free(&t, &mut tr, c);
    // 5 MiB on stream 1, at the limit: the merged free space (5.5 MiB) serves it.
    let p = alloc(&t, &mut tr, 5 * MIB, Stream(1)).expect("the merged free space fits");
    assert!(t.stats(0).unwrap().reserved_bytes <= 8 * MIB);
    free(&t, &mut tr, p);
    tr.check();
    t.check_invariants(0).unwrap();
    free(&t, &mut tr, a);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// A limit lowered below what is already cached: a request larger than the new limit that a
/// cached block serves needs no new memory, so it succeeds, whichever stream freed the block.
#[test]
fn a_request_over_a_lowered_limit_is_served_from_any_streams_cache() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let p = alloc(&t, &mut tr, 12 * MIB, Stream(1)).unwrap();
    free(&t, &mut tr, p);
    t.set_limit(0, Some(8 * MIB)).unwrap();
    // On the stream that freed it: a cache hit.
    let q = alloc(&t, &mut tr, 12 * MIB, Stream(1)).unwrap();
    assert_eq!(q, p);
    free(&t, &mut tr, q);
    // On another stream, whose work on it is done: the cached block serves it too (tessera once
    // called this "larger than the limit" and failed at once).
    assert_eq!(t.stats(0).unwrap().largest_free_bytes, 12 * MIB);
    let r = alloc(&t, &mut tr, 12 * MIB, S).expect("the cached block serves it");
    assert_eq!(r, p);
    assert_eq!(sim.bytes_in_use(0), 12 * MIB);
    free(&t, &mut tr, r);
}
