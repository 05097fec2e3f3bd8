//! CUDA graphs on the simulated device: private pools (routing, reuse, sharing, release), and a
//! core that makes no call a capture forbids (the simulated driver invalidates a capture on any
//! such call, as CUDA does, so every test that ends its capture cleanly proves it made none).

mod common;
use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::{Call, CaptureMode, DevicePtr, Driver, Stream};
use tessera::{Backend, BlockStateInfo, Config, Error, MempoolId, Tessera};

const S: Stream = Stream(7);
const OTHER: Stream = Stream(8);
const POOL: MempoolId = MempoolId(1, 0);

/// The calls a capture forbids (besides the allocating ones, which run relaxed).
const FORBIDDEN: [Call; 6] = [
    Call::EventQuery,
    Call::EventSynchronize,
    Call::Unmap,
    Call::ReleasePhysical,
    Call::FreeLegacy,
    Call::StreamSynchronize,
];

fn forbidden_calls(sim: &SimDriver) -> Vec<u64> {
    FORBIDDEN.iter().map(|&c| sim.calls(c)).collect()
}

/// PyTorch's order: route, begin the capture; end the capture (it must be valid), stop routing.
fn begin(sim: &SimDriver, t: &Tessera, id: MempoolId, stream: Stream) {
    t.begin_allocate_to_pool(0, id, Box::new(move |s| s == stream))
        .unwrap();
    sim.stream_begin_capture(0, stream, CaptureMode::Global)
        .unwrap();
}

fn end(sim: &SimDriver, t: &Tessera, id: MempoolId, stream: Stream) {
    sim.stream_end_capture(0, stream)
        .expect("the capture ended valid: tessera made no call it forbids");
    t.end_allocate_to_pool(0, id).unwrap();
}

fn pool_stats(t: &Tessera, id: MempoolId) -> Option<tessera::PrivatePoolStats> {
    t.stats(0)
        .unwrap()
        .private_pools
        .into_iter()
        .find(|p| p.id == id)
}

/// The block at `ptr` in tessera's snapshot.
fn block_at(t: &Tessera, ptr: DevicePtr) -> Option<tessera::BlockInfo> {
    t.snapshot(0)
        .unwrap()
        .segments
        .into_iter()
        .flat_map(|s| s.blocks)
        .find(|b| b.address == ptr)
}

fn pool_of(t: &Tessera, ptr: DevicePtr) -> Option<MempoolId> {
    block_at(t, ptr).and_then(|b| b.pool)
}

#[test]
fn a_capture_allocates_from_its_own_pool_and_ends_valid() {
    let (sim, t) = sim_alloc(256 * MIB, Config::default());
    let mut tr = Tracker::default();
    // Warm-up: the ordinary cache holds free blocks of both sizes on S.
    let warm = [
        alloc(&t, &mut tr, 8 * MIB, S).unwrap(),
        alloc(&t, &mut tr, 4096, S).unwrap(),
    ];
    for p in warm {
        free(&t, &mut tr, p);
    }
    let before = forbidden_calls(&sim);
    begin(&sim, &t, POOL, S);
    let big = alloc(&t, &mut tr, 8 * MIB, S).unwrap();
    let small = alloc(&t, &mut tr, 4096, S).unwrap();
    assert!(
        !warm.contains(&big) && !warm.contains(&small),
        "cached ordinary memory is not the pool's"
    );
    assert_eq!(pool_of(&t, big), Some(POOL));
    assert_eq!(pool_of(&t, small), Some(POOL));
    let st = t.stats(0).unwrap();
    assert!(st.capture_underway);
    assert!(
        sim.calls(Call::ExchangeCaptureMode) >= 2,
        "new memory was mapped in relaxed mode"
    );
    end(&sim, &t, POOL, S);
    assert_eq!(
        forbidden_calls(&sim),
        before,
        "no forbidden call during the capture"
    );
    let p = pool_stats(&t, POOL).unwrap();
    assert_eq!((p.uses, p.routed, p.active_blocks), (1, false, 2));
    assert!(p.allocated_bytes >= 8 * MIB + 4096 && p.held_bytes >= p.allocated_bytes);
    assert!(!t.stats(0).unwrap().capture_underway);
    tr.check();
}

#[test]
fn a_block_freed_into_the_pool_is_reused_by_it_at_once() {
    let (sim, t) = sim_alloc(256 * MIB, Config::default());
    let mut tr = Tracker::default();
    begin(&sim, &t, POOL, S);
    for size in [6 * MIB, 2048] {
        let x = alloc(&t, &mut tr, size, S).unwrap();
        free(&t, &mut tr, x);
        let y = alloc(&t, &mut tr, size, S).unwrap();
        assert_eq!(y, x, "capture order is replay order: reuse at once");
        free(&t, &mut tr, y);
    }
    end(&sim, &t, POOL, S);
}

#[test]
fn pool_memory_serves_no_ordinary_allocation_and_is_not_released_while_it_has_uses() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    begin(&sim, &t, POOL, S);
    let x = alloc(&t, &mut tr, 16 * MIB, S).unwrap();
    let y = alloc(&t, &mut tr, 8192, S).unwrap();
    end(&sim, &t, POOL, S);
    free(&t, &mut tr, x);
    free(&t, &mut tr, y);
    let held = pool_stats(&t, POOL).unwrap().held_bytes;
    assert!(held >= 16 * MIB);
    // Ordinary requests of the same sizes get other memory.
    let a = alloc(&t, &mut tr, 16 * MIB, S).unwrap();
    let b = alloc(&t, &mut tr, 8192, S).unwrap();
    assert_ne!(a, x);
    assert_ne!(b, y);
    assert_eq!(pool_of(&t, a), None);
    free(&t, &mut tr, a);
    free(&t, &mut tr, b);
    // empty_cache releases the ordinary cache only; the pool's pages stay mapped.
    t.empty_cache(0).unwrap();
    assert!(sim.is_mapped(0, x) && sim.is_mapped(0, x + 16 * MIB - 1));
    assert!(sim.is_mapped(0, y));
    assert_eq!(sim.bytes_in_use(0), t.stats(0).unwrap().reserved_bytes);
    // Pressure: a request that needs the whole device cannot steal the pool's pages.
    let e = t.allocate(0, 60 * MIB, S).unwrap_err();
    assert!(e.is_out_of_memory(), "{e}");
    assert!(sim.is_mapped(0, x));
    assert_eq!(pool_stats(&t, POOL).unwrap().held_bytes, held);
}

#[test]
fn at_zero_uses_the_pool_joins_the_ordinary_cache() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    begin(&sim, &t, POOL, S);
    let free_later = alloc(&t, &mut tr, 8 * MIB, S).unwrap();
    let live = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    let slot = alloc(&t, &mut tr, 1024, S).unwrap();
    end(&sim, &t, POOL, S);
    free(&t, &mut tr, free_later);
    t.release_pool(0, POOL).unwrap();
    t.check_invariants(0).unwrap();
    // Released, not yet ordinary: the graph's last replay may still run, on any stream.
    let released = pool_stats(&t, POOL).unwrap();
    assert_eq!((released.uses, released.routed), (0, false));
    assert_eq!(pool_of(&t, free_later), Some(POOL));
    assert_eq!(sim.calls(Call::DeviceSynchronize), 0);
    // The next miss synchronizes the device; then the free block serves an ordinary request.
    let again = alloc(&t, &mut tr, 8 * MIB, S).unwrap();
    assert_eq!(again, free_later);
    assert_eq!(sim.calls(Call::DeviceSynchronize), 1);
    assert!(pool_stats(&t, POOL).is_none());
    assert_eq!(
        pool_of(&t, live),
        None,
        "a live block joins the ordinary cache"
    );
    free(&t, &mut tr, again);
    // Its live blocks are freed into the ordinary cache, and empty_cache gives everything back.
    free(&t, &mut tr, live);
    free(&t, &mut tr, slot);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 0);
}

#[test]
fn graphs_share_a_pool_and_it_stays_private_until_its_last_use_goes() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let shared = MempoolId(0, 42); // graph_pool_handle()'s shape
    begin(&sim, &t, shared, S);
    let x = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    free(&t, &mut tr, x);
    end(&sim, &t, shared, S);
    // A second graph captures into the same pool: it reuses the first one's memory.
    begin(&sim, &t, shared, S);
    let y = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    assert_eq!(y, x);
    end(&sim, &t, shared, S);
    assert_eq!(pool_stats(&t, shared).unwrap().uses, 2);
    free(&t, &mut tr, y);
    t.release_pool(0, shared).unwrap();
    assert_eq!(pool_stats(&t, shared).unwrap().uses, 1);
    let z = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    assert_ne!(z, x, "still private with one use left");
    free(&t, &mut tr, z);
    t.release_pool(0, shared).unwrap();
    let w = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    assert!(w == x || w == z, "ordinary now: {w:#x}");
    free(&t, &mut tr, w);
}

#[test]
fn the_first_route_whose_filter_matches_wins_and_other_streams_stay_ordinary() {
    let (sim, t) = sim_alloc(128 * MIB, Config::default());
    let mut tr = Tracker::default();
    let (p1, p2) = (MempoolId(1, 0), MempoolId(2, 0));
    let (s1, s2) = (Stream(11), Stream(12));
    t.begin_allocate_to_pool(0, p1, Box::new(move |s| s == s1))
        .unwrap();
    // A second capture whose filter takes s1 and s2: s1 stays with the first route.
    t.begin_allocate_to_pool(0, p2, Box::new(move |s| s == s1 || s == s2))
        .unwrap();
    sim.stream_begin_capture(0, s1, CaptureMode::Global)
        .unwrap();
    sim.stream_begin_capture(0, s2, CaptureMode::Global)
        .unwrap();
    let a = alloc(&t, &mut tr, 2 * MIB, s1).unwrap();
    let b = alloc(&t, &mut tr, 2 * MIB, s2).unwrap();
    let c = alloc(&t, &mut tr, 2 * MIB, OTHER).unwrap();
    assert_eq!(pool_of(&t, a), Some(p1));
    assert_eq!(pool_of(&t, b), Some(p2));
    assert_eq!(pool_of(&t, c), None);
    sim.stream_end_capture(0, s1).unwrap();
    sim.stream_end_capture(0, s2).unwrap();
    t.end_allocate_to_pool(0, p1).unwrap();
    t.end_allocate_to_pool(0, p2).unwrap();
    // After the routes end, s1 allocates from the ordinary cache again.
    let d = alloc(&t, &mut tr, 2 * MIB, s1).unwrap();
    assert_eq!(pool_of(&t, d), None);
}

#[test]
fn during_a_capture_the_core_waits_for_nothing_unmaps_nothing_and_says_why_it_failed() {
    for backend in [Backend::Vmm, Backend::Legacy] {
        let (sim, t) = sim_alloc(
            64 * MIB,
            Config {
                backend,
                ..Config::default()
            },
        );
        let mut tr = Tracker::default();
        // The ordinary cache holds 48 MiB freed on a stream whose work is not known to be done
        // (so reusing it elsewhere would need an event query) and a parked record_stream free.
        sim.hold_stream(0, OTHER);
        let cached = alloc(&t, &mut tr, 40 * MIB, OTHER).unwrap();
        let parked = alloc(&t, &mut tr, 8 * MIB, OTHER).unwrap();
        t.record_stream(parked, Stream(9)).unwrap();
        free(&t, &mut tr, cached);
        free(&t, &mut tr, parked);
        let before = forbidden_calls(&sim);
        begin(&sim, &t, POOL, S);
        // What is left of the device (16 MiB) is new memory: it serves the capture.
        let a = alloc(&t, &mut tr, 12 * MIB, S).unwrap();
        // The rest would need the cache remapped or released: refused, and the report says why.
        let hook_calls = Arc::new(AtomicU64::new(0));
        let hc = Arc::clone(&hook_calls);
        let hook = t.add_oom_hook(move |_, _| {
            hc.fetch_add(1, Ordering::Relaxed);
        });
        let e = t.allocate(0, 20 * MIB, S).unwrap_err();
        let Error::OutOfMemory(report) = &e else {
            panic!("{e}")
        };
        assert!(report.capture_underway, "{backend:?}");
        assert!(
            e.to_string().contains("CUDA graph capture was underway"),
            "{e}"
        );
        assert!(report.hint().contains("empty_cache()"), "{}", report.hint());
        assert_eq!(hook_calls.load(Ordering::Relaxed), 1, "the hooks still run");
        // empty_cache and trim release nothing during the capture.
        assert_eq!(t.empty_cache(0).unwrap(), 0);
        assert_eq!(t.trim(0).unwrap(), 0);
        end(&sim, &t, POOL, S);
        assert_eq!(forbidden_calls(&sim), before, "{backend:?}");
        // Once the capture is over, the same request succeeds: the cache is released or remapped.
        sim.release_stream(0, OTHER);
        t.remove_oom_hook(hook);
        let b = alloc(&t, &mut tr, 20 * MIB, S).unwrap();
        free(&t, &mut tr, b);
        free(&t, &mut tr, a);
    }
}

#[test]
fn what_an_oom_hook_frees_during_a_capture_serves_the_retry() {
    let (sim, t) = sim_alloc(32 * MIB, Config::default());
    let t = Arc::new(t);
    let mut tr = Tracker::default();
    begin(&sim, &t, POOL, S);
    let victim = alloc(&t, &mut tr, 24 * MIB, S).unwrap();
    tr.remove(victim);
    let weak = Arc::downgrade(&t);
    t.add_oom_hook(move |dev, _| {
        if let Some(t) = weak.upgrade() {
            let _ = t.free(dev, victim);
        }
    });
    let p = alloc(&t, &mut tr, 20 * MIB, S).unwrap();
    assert_eq!(p, victim, "the pool's own freed block, no remap needed");
    end(&sim, &t, POOL, S);
}

#[test]
fn a_record_stream_free_in_the_pool_waits_until_the_capture_ends() {
    let (sim, t) = sim_alloc(128 * MIB, Config::default());
    let mut tr = Tracker::default();
    begin(&sim, &t, POOL, S);
    let x = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    t.record_stream(x, OTHER).unwrap();
    free(&t, &mut tr, x);
    let y = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    assert_ne!(
        y, x,
        "a block with stream uses waits for the capture to end"
    );
    let state = block_at(&t, x).map(|b| b.state);
    assert_eq!(state, Some(BlockStateInfo::PendingFree));
    assert_eq!(
        sim.calls(Call::EventRecord),
        0,
        "no event recorded in the capture"
    );
    end(&sim, &t, POOL, S);
    // After the capture, the next miss (an ordinary one) records and queries the event, and x
    // is free in the pool again: the next capture into it reuses it.
    free(&t, &mut tr, y);
    let o = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    assert_eq!(pool_of(&t, o), None);
    assert!(sim.calls(Call::EventRecord) > 0);
    let xb = block_at(&t, x).unwrap();
    assert_eq!((xb.state, xb.pool), (BlockStateInfo::Free, Some(POOL)));
    begin(&sim, &t, POOL, S);
    let a = alloc(&t, &mut tr, 8 * MIB, S).unwrap();
    assert!(
        a == x || a == y,
        "x and y merged back into one free block of the pool"
    );
    end(&sim, &t, POOL, S);
}

#[test]
fn a_capture_on_one_device_keeps_every_device_from_forbidden_calls() {
    let (sim, t) = sim_alloc_with(
        SimConfig {
            devices: 2,
            capacity: 32 * MIB,
            ..SimConfig::default()
        },
        Config::default(),
    );
    // Device 1's cache holds free pages; its next large request would steal them.
    let d1 = t.allocate(1, 16 * MIB, S).unwrap();
    t.free(1, d1).unwrap();
    t.begin_allocate_to_pool(0, POOL, Box::new(|s| s == S))
        .unwrap();
    sim.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    let before = forbidden_calls(&sim);
    // Device 1, other thread's stream, no route there: its slow path may not unmap or query.
    let e = t.allocate(1, 30 * MIB, OTHER).unwrap_err();
    assert!(e.is_out_of_memory());
    assert_eq!(t.empty_cache(1).unwrap(), 0);
    assert_eq!(forbidden_calls(&sim), before);
    sim.stream_end_capture(0, S)
        .expect("device 0's capture is still valid");
    t.end_allocate_to_pool(0, POOL).unwrap();
    let p = t.allocate(1, 30 * MIB, OTHER).unwrap();
    t.free(1, p).unwrap();
}

#[test]
fn pool_calls_out_of_order_are_errors_that_change_nothing() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let err = |r: tessera::Result<()>| match r {
        Err(Error::PrivatePool(m)) => m,
        other => panic!("expected a private-pool error, got {other:?}"),
    };
    assert!(err(t.end_allocate_to_pool(0, POOL)).contains("not being routed"));
    assert!(err(t.release_pool(0, POOL)).contains("no private pool"));
    assert!(
        err(t.begin_allocate_to_pool(0, MempoolId(0, 0), Box::new(|_| true))).contains("(0, 0)")
    );
    begin(&sim, &t, POOL, S);
    assert!(err(t.begin_allocate_to_pool(0, POOL, Box::new(|_| true))).contains("already routed"));
    assert!(err(t.release_pool(0, POOL)).contains("routed"));
    let p = pool_stats(&t, POOL).unwrap();
    assert_eq!((p.uses, p.routed), (1, true));
    end(&sim, &t, POOL, S);
    t.release_pool(0, POOL).unwrap();
    assert!(err(t.release_pool(0, POOL)).contains("no private pool"));
    assert!(matches!(
        t.begin_allocate_to_pool(5, POOL, Box::new(|_| true)),
        Err(Error::InvalidDevice { .. })
    ));
    assert!(!t.stats(0).unwrap().capture_underway);
}

#[test]
fn the_legacy_backend_captures_into_cumemalloc_segments_in_relaxed_mode() {
    let (sim, t) = sim_alloc_backend(64 * MIB, Backend::Legacy);
    let mut tr = Tracker::default();
    begin(&sim, &t, POOL, S);
    let a = alloc(&t, &mut tr, 6 * MIB, S).unwrap();
    let b = alloc(&t, &mut tr, 512, S).unwrap();
    assert_eq!(pool_of(&t, a), Some(POOL));
    assert_eq!(pool_of(&t, b), Some(POOL));
    end(&sim, &t, POOL, S);
    free(&t, &mut tr, a);
    free(&t, &mut tr, b);
    t.release_pool(0, POOL).unwrap();
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

#[test]
fn routes_left_open_do_not_outlive_their_allocator() {
    let sim = Arc::new(SimDriver::with_capacity(64 * MIB));
    let t = Tessera::new(sim.clone(), Config::default()).unwrap();
    t.begin_allocate_to_pool(0, POOL, Box::new(|_| true))
        .unwrap();
    let p = t.allocate(0, MIB, S).unwrap();
    assert_eq!(pool_of(&t, p), Some(POOL));
    drop(t);
    assert_eq!(
        sim.bytes_in_use(0),
        0,
        "teardown gives the pool's memory back too"
    );
}

#[test]
fn pytorch_snapshots_give_each_private_pool_its_own_segments() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let ordinary = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
    begin(&sim, &t, POOL, S);
    let private = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
    let slot = alloc(&t, &mut tr, 4096, S).unwrap();
    end(&sim, &t, POOL, S);
    let snap = t.snapshot(0).unwrap();
    // One mapped run holds both 3 MiB blocks (the pool's pages were mapped right after the
    // ordinary ones): tessera's own snapshot says so, and the PyTorch one splits it.
    let run = snap
        .segments
        .iter()
        .find(|s| s.address <= ordinary && ordinary < s.address + s.size)
        .unwrap();
    assert!(run.address <= private && private < run.address + run.size);
    assert_eq!(run.pool, None, "a run of several pools has no single pool");
    let segments = tessera::torch_snapshot::segments_of(&snap);
    let seg_of = |p: DevicePtr| {
        segments
            .iter()
            .find(|s| s.address <= p && p < s.address + s.total_size)
            .unwrap()
    };
    assert_eq!(seg_of(ordinary).pool, (0, 0));
    assert_eq!(seg_of(private).pool, (POOL.0, POOL.1));
    assert_eq!(seg_of(slot).pool, (POOL.0, POOL.1));
    assert!(seg_of(slot).small);
    // Segments still tile what is mapped, pool by pool, and every block lies in its segment.
    let total: u64 = segments.iter().map(|s| s.total_size).sum();
    assert_eq!(total, t.stats(0).unwrap().reserved_bytes);
    for s in &segments {
        for b in &s.blocks {
            assert!(s.address <= b.address && b.address + b.size <= s.address + s.total_size);
        }
    }
}

#[test]
fn a_released_pool_waits_for_an_idle_device_and_not_during_a_capture() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let (a, b) = (MempoolId(5, 0), MempoolId(6, 0));
    begin(&sim, &t, a, S);
    let x = alloc(&t, &mut tr, 8 * MIB, S).unwrap();
    end(&sim, &t, a, S);
    free(&t, &mut tr, x);
    // A second graph captures while the first one's pool is released.
    begin(&sim, &t, b, OTHER);
    t.release_pool(0, a).unwrap();
    let y = alloc(&t, &mut tr, 8 * MIB, S).unwrap(); // ordinary: S is not routed
    assert_ne!(
        y, x,
        "no synchronize during a capture, so the released pool stays private"
    );
    assert_eq!(t.empty_cache(0).unwrap(), 0);
    assert_eq!(pool_of(&t, x), Some(a));
    end(&sim, &t, b, OTHER);
    assert_eq!(sim.calls(Call::DeviceSynchronize), 0);
    // After the capture, empty_cache drains it (one synchronize) and releases its pages.
    free(&t, &mut tr, y);
    assert!(t.empty_cache(0).unwrap() >= 16 * MIB);
    assert_eq!(sim.calls(Call::DeviceSynchronize), 1);
    assert!(pool_stats(&t, a).is_none());
    t.release_pool(0, b).unwrap();
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}
