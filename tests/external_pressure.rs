//! Another process takes device memory in the middle of a run (the simulated device's
//! `set_external_usage`), on both backends. tessera serves what its cache can, and when a
//! request needs memory the device no longer has it releases its cache, calls the eviction
//! hooks, and fails cleanly: an OOM error whose message says why (what was asked, what the
//! device has free, what tessera holds, what the driver said, and that other processes hold the
//! device), every invariant holding, live data intact, and the cache given back. Requests that fit
//! in what is left still succeed, the failed ones succeed once the other process lets go, and
//! nothing leaks at the end. A hook that frees enough (tessera's own allocations, or the other
//! process's memory) lets the request succeed.
//!
//! The last three tests are regressions of a bug of the OOM sequence that external pressure made
//! visible: its last try, after the hooks and a wait for the streams, came before the cache was
//! released again, so memory that became free during the hooks or the wait, but that the try
//! could not use as it was, still held the room a new page or segment needed; the request failed,
//! and the cache was released only after (the report then showed the room). The sequence now
//! releases the cache and tries once more.

mod common;
use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tessera::driver::sim::SimDriver;
use tessera::driver::{DevicePtr, Driver, Stream};
use tessera::{Backend, Error, OomReport, Tessera};

const KIB: u64 = 1 << 10;
const CAPACITY: u64 = 64 * MIB;
const S0: Stream = Stream::DEFAULT;
const S1: Stream = Stream(1);

fn report(e: &Error) -> &OomReport {
    match e {
        Error::OutOfMemory(r) => r,
        other => panic!("expected an OOM, got {other:?}"),
    }
}

/// An allocator over a 64 MiB device, shared (for hooks).
fn setup(backend: Backend) -> (Arc<SimDriver>, Arc<Tessera>) {
    let (sim, t) = sim_alloc_backend(CAPACITY, backend);
    (sim, Arc::new(t))
}

/// The name of the call that allocates device memory on `backend`.
fn create_call(backend: Backend) -> &'static str {
    match backend {
        Backend::Vmm => "cuMemCreate",
        Backend::Legacy => "cuMemAlloc",
    }
}

/// Frees everything tracked, empties the cache, and checks that the device got everything back.
fn finish(sim: &SimDriver, t: &Tessera, tr: &mut Tracker) {
    sim.set_external_usage(0, 0);
    for p in tr.ptrs() {
        free(t, tr, p);
    }
    t.empty_cache(0).unwrap();
    t.check_invariants(0).unwrap();
    let st = t.stats(0).unwrap();
    assert_eq!((st.allocated_bytes, st.reserved_bytes), (0, 0), "{st:?}");
    assert_eq!(sim.bytes_in_use(0), 0, "leaked device memory");
    assert_eq!(sim.live_mappings(0), 0, "leaked mappings");
    assert_eq!(sim.live_handles(0), 0, "leaked physical handles");
    assert_eq!(sim.live_legacy(0), 0, "leaked segments");
}

fn mid_run_pressure(backend: Backend) {
    let (sim, t) = setup(backend);
    let hook_calls = Arc::new(AtomicU64::new(0));
    let calls = hook_calls.clone();
    t.add_oom_hook(move |_, _| {
        calls.fetch_add(1, Ordering::Relaxed);
    });
    let mut tr = Tracker::default();
    // Small and large blocks on two streams; every other one freed: a cache with free blocks,
    // fully free pages and an empty granule.
    let mut ptrs = Vec::new();
    for i in 0..6u64 {
        let stream = if i % 3 == 2 { S1 } else { S0 };
        ptrs.push(alloc(&t, &mut tr, 3 * MIB + i * 100 * KIB, stream).unwrap());
        ptrs.push(alloc(&t, &mut tr, 4 * KIB + i * 512, stream).unwrap());
    }
    for &p in ptrs.iter().step_by(2) {
        free(&t, &mut tr, p);
    }
    let before = t.stats(0).unwrap();
    assert!(
        before.cached_free_bytes >= 8 * MIB,
        "a cache to release: {before:?}"
    );

    // Another process takes everything tessera does not hold.
    sim.set_external_usage(0, CAPACITY - before.reserved_bytes);
    // What the cache holds still serves: a freed block's size, on its stream.
    let cached = alloc(&t, &mut tr, 3 * MIB, S0).expect("a cached free block fits");
    assert_eq!(t.stats(0).unwrap().reserved_bytes, before.reserved_bytes);
    assert_eq!(hook_calls.load(Ordering::Relaxed), 0);

    // 24 MiB cannot be had: the cache goes back to the device, the hook is called, and the
    // request fails, saying why.
    let requested = 24 * MIB;
    let mid = t.stats(0).unwrap();
    let err = t.allocate(0, requested, S0).unwrap_err();
    let r = report(&err);
    let after = t.stats(0).unwrap();
    assert_eq!(hook_calls.load(Ordering::Relaxed), 1);
    assert_eq!(
        (after.hook_calls, after.ooms),
        (mid.hook_calls + 1, mid.ooms + 1)
    );
    assert!(after.cache_releases > mid.cache_releases, "{after:?}");
    assert!(after.released_bytes > mid.released_bytes, "{after:?}");
    // Only free bytes in pages (segments) that also hold live data stay cached.
    assert_eq!(after.cached_free_bytes, after.stranded_bytes, "{after:?}");
    assert_eq!(after.reserved_bytes, sim.bytes_in_use(0));
    assert_eq!(
        r.device_free,
        Some(CAPACITY - (CAPACITY - before.reserved_bytes) - after.reserved_bytes),
        "what the cache gave back is free on the device"
    );
    assert_eq!(
        (
            r.requested,
            r.capacity,
            r.reserved,
            r.allocated,
            r.hooks_called
        ),
        (
            requested,
            CAPACITY,
            after.reserved_bytes,
            after.allocated_bytes,
            1
        )
    );
    let text = err.to_string();
    for part in [
        "CUDA out of memory. Tried to allocate 24.00 MiB on device 0.",
        "Device capacity 64.00 MiB (",
        " free on the device), no tessera limit.",
        "1 eviction hook(s) called, freeing 0 B.",
        &format!("The driver said: {} failed", create_call(backend)),
        "CUDA_ERROR_OUT_OF_MEMORY",
        "Hint: other processes or allocators hold most of the device; free memory there.",
    ] {
        assert!(text.contains(part), "{part:?} not in: {text}");
    }
    tr.check();
    t.check_invariants(0).unwrap();

    // What the cache gave back serves smaller requests, small ones too.
    let room = r.device_free.expect("the driver says what is free") / (2 * MIB) * (2 * MIB);
    assert!(room >= 4 * MIB, "{r:?}");
    let fits = alloc(&t, &mut tr, room, S1).expect("the released room fits it");
    let small = alloc(&t, &mut tr, 512, S1).expect("a granule slot, or a page for one");
    let err = t.allocate(0, requested, S0).unwrap_err();
    assert!(err.is_out_of_memory(), "{err:?}");
    assert_eq!(hook_calls.load(Ordering::Relaxed), 2);
    tr.check();

    // The other process leaves: the request succeeds.
    sim.set_external_usage(0, 0);
    let big = alloc(&t, &mut tr, requested, S0).expect("the device has room again");
    assert_eq!(hook_calls.load(Ordering::Relaxed), 2, "no OOM sequence");
    for p in [cached, fits, small, big] {
        free(&t, &mut tr, p);
    }
    finish(&sim, &t, &mut tr);
}

#[test]
fn vmm_external_usage_mid_run_releases_the_cache_calls_the_hooks_and_fails_cleanly() {
    mid_run_pressure(Backend::Vmm);
}

#[test]
fn legacy_external_usage_mid_run_releases_the_cache_calls_the_hooks_and_fails_cleanly() {
    mid_run_pressure(Backend::Legacy);
}

/// 8 live blocks of 4 MiB (on 32 MiB), the rest of the device taken by another process; a hook
/// frees two of them. VMM: 8 MiB, from the two freed blocks' pages remapped side by side.
/// Legacy (no remapping): 4 MiB on another stream, from a freed segment.
fn hook_frees_enough(backend: Backend) {
    let (sim, t) = setup(backend);
    let tr = Arc::new(Mutex::new(Tracker::default()));
    let blocks: Vec<DevicePtr> = (0..8)
        .map(|_| {
            let p = t.allocate(0, 4 * MIB, S0).unwrap();
            tr.lock().unwrap().add(p, 4 * MIB);
            p
        })
        .collect();
    sim.set_external_usage(0, CAPACITY - 32 * MIB);
    let victims = Arc::new(Mutex::new(vec![blocks[2], blocks[5]]));
    let freed = Arc::new(AtomicU64::new(0));
    let (w, tr2, v2, f2) = (
        Arc::downgrade(&t),
        tr.clone(),
        victims.clone(),
        freed.clone(),
    );
    t.add_oom_hook(move |dev, _| {
        let t = w.upgrade().expect("allocator alive");
        for p in v2.lock().unwrap().drain(..) {
            tr2.lock().unwrap().remove(p);
            t.free(dev, p).unwrap();
            f2.fetch_add(4 * MIB, Ordering::Relaxed);
        }
    });
    let (size, stream) = match backend {
        Backend::Vmm => (8 * MIB, S0),
        Backend::Legacy => (4 * MIB, S1),
    };
    let p = t
        .allocate(0, size, stream)
        .expect("the hook's frees let it succeed");
    assert_eq!(freed.load(Ordering::Relaxed), 8 * MIB, "the hook ran");
    let st = t.stats(0).unwrap();
    assert_eq!((st.hook_calls, st.ooms), (1, 0), "{st:?}");
    assert!(sim.bytes_in_use(0) <= 32 * MIB, "no more than before");
    if backend == Backend::Vmm {
        assert!(st.remaps >= 4, "served by remapping: {st:?}");
    }
    let mut tr = std::mem::take(&mut *tr.lock().unwrap());
    tr.add(p, size);
    tr.check();
    t.check_invariants(0).unwrap();
    finish(&sim, &t, &mut tr);
}

#[test]
fn vmm_a_hook_that_frees_enough_lets_the_request_succeed_under_external_pressure() {
    hook_frees_enough(Backend::Vmm);
}

#[test]
fn legacy_a_hook_that_frees_enough_lets_the_request_succeed_under_external_pressure() {
    hook_frees_enough(Backend::Legacy);
}

/// The hook asks the other process to give memory back (as a job scheduler might): the request
/// succeeds with new memory; a second hook that does nothing is called too.
fn hook_makes_the_other_process_let_go(backend: Backend) {
    let (sim, t) = setup(backend);
    let mut tr = Tracker::default();
    let keep = alloc(&t, &mut tr, 6 * MIB, S0).unwrap();
    // The device is full.
    sim.set_external_usage(0, CAPACITY - 6 * MIB);
    let calls = Arc::new(AtomicU64::new(0));
    let c = calls.clone();
    t.add_oom_hook(move |_, _| {
        c.fetch_add(1, Ordering::Relaxed);
    });
    let sim2 = sim.clone();
    t.add_oom_hook(move |_, requested| sim2.set_external_usage(0, CAPACITY - 6 * MIB - requested));
    let p = alloc(&t, &mut tr, 2 * MIB, S1).expect("fits once the other process gave 2 MiB");
    assert_eq!(calls.load(Ordering::Relaxed), 1);
    let st = t.stats(0).unwrap();
    assert_eq!((st.hook_calls, st.ooms, st.reserved_bytes), (2, 0, 8 * MIB));
    for q in [p, keep] {
        free(&t, &mut tr, q);
    }
    finish(&sim, &t, &mut tr);
}

#[test]
fn vmm_a_hook_that_makes_the_other_process_let_go_lets_the_request_succeed() {
    hook_makes_the_other_process_let_go(Backend::Vmm);
}

#[test]
fn legacy_a_hook_that_makes_the_other_process_let_go_lets_the_request_succeed() {
    hook_makes_the_other_process_let_go(Backend::Legacy);
}

/// Another process claims more than the device has: nothing new can be had (the device reports
/// 0 B free, not an underflow), the cache still serves, and everything recovers once it leaves.
fn more_than_the_device(backend: Backend) {
    let (sim, t) = setup(backend);
    let mut tr = Tracker::default();
    let a = alloc(&t, &mut tr, 5 * MIB, S0).unwrap();
    let b = alloc(&t, &mut tr, 100 * KIB, S0).unwrap();
    free(&t, &mut tr, a);
    sim.set_external_usage(0, 2 * CAPACITY);
    let again = alloc(&t, &mut tr, 5 * MIB, S0).expect("the cached block serves it");
    for size in [MIB + 1, 5 * MIB + 512, 40 * MIB] {
        let err = t.allocate(0, size, S0).unwrap_err();
        let r = report(&err);
        assert_eq!(r.device_free, Some(0), "{err}");
        assert!(
            err.to_string().contains("(0 B free on the device)"),
            "{err}"
        );
        tr.check();
        t.check_invariants(0).unwrap();
    }
    sim.set_external_usage(0, 0);
    let big = alloc(&t, &mut tr, 40 * MIB, S0).expect("the device is free again");
    for p in [again, b, big] {
        free(&t, &mut tr, p);
    }
    finish(&sim, &t, &mut tr);
}

#[test]
fn vmm_external_usage_beyond_the_device_fails_cleanly_and_recovers() {
    more_than_the_device(Backend::Vmm);
}

#[test]
fn legacy_external_usage_beyond_the_device_fails_cleanly_and_recovers() {
    more_than_the_device(Backend::Legacy);
}

/// External usage rising and falling between requests of many sizes, on two streams, with a
/// free held back by a held stream now and then: every request either succeeds or fails with an
/// OOM, tessera never holds more than the device had free for it, data and invariants hold
/// throughout, and nothing leaks.
fn fluctuating(backend: Backend) {
    let (sim, t) = setup(backend);
    let mut tr = Tracker::default();
    let mut rng = 0x2545_F491_4F6C_DD1Du64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    let (mut ok, mut oom) = (0, 0);
    for step in 0..300 {
        match next(10) {
            0 => sim.set_external_usage(0, next(65) * MIB),
            1 | 2 if !tr.is_empty() => {
                let ptrs = tr.ptrs();
                let p = ptrs[next(ptrs.len() as u64) as usize];
                if next(4) == 0 {
                    sim.hold_stream(0, S1);
                    t.record_stream(p, S1).unwrap();
                }
                free(&t, &mut tr, p);
            }
            3 => sim.release_stream(0, S1),
            _ => {
                let size = match next(3) {
                    0 => 1 + next(64 * KIB),
                    1 => MIB + next(3 * MIB),
                    _ => 1 + next(16 * MIB),
                };
                let stream = if next(2) == 0 { S0 } else { S1 };
                let external =
                    CAPACITY - t.driver().mem_info(0).unwrap().free - sim.bytes_in_use(0);
                let reserved = t.stats(0).unwrap().reserved_bytes;
                match alloc(&t, &mut tr, size, stream) {
                    Ok(_) => ok += 1,
                    Err(e) => {
                        assert!(e.is_out_of_memory(), "step {step}: {e:?}");
                        oom += 1;
                    }
                }
                let now = t.stats(0).unwrap().reserved_bytes;
                assert!(
                    now <= reserved || now + external <= CAPACITY,
                    "step {step}: new memory beyond what the device had"
                );
            }
        }
        tr.check();
        t.check_invariants(0).unwrap();
        assert_eq!(t.stats(0).unwrap().reserved_bytes, sim.bytes_in_use(0));
    }
    assert!(
        ok > 50 && oom > 10,
        "both outcomes exercised: {ok} ok, {oom} OOM"
    );
    sim.release_stream(0, S1);
    finish(&sim, &t, &mut tr);
}

#[test]
fn vmm_fluctuating_external_usage_keeps_data_and_invariants() {
    fluctuating(Backend::Vmm);
}

#[test]
fn legacy_fluctuating_external_usage_keeps_data_and_invariants() {
    fluctuating(Backend::Legacy);
}

// ---- The OOM sequence's last try once came before the cache was released again ----

/// The other process leaves 6 MiB; a hook frees a 2 MiB segment. Releasing it would leave 8 MiB
/// free, room for a new 8 MiB segment; the last try ran with the segment still cached: the
/// request failed, then the cache was released, and the report showed 8 MiB free.
#[test]
fn legacy_a_hook_freeing_a_segment_too_small_for_the_request_makes_room() {
    let (sim, t) = setup(Backend::Legacy);
    let a = t.allocate(0, 2 * MIB, S0).unwrap();
    sim.set_external_usage(0, CAPACITY - 2 * MIB - 6 * MIB);
    let victim = Arc::new(Mutex::new(Some(a)));
    let w = Arc::downgrade(&t);
    t.add_oom_hook(move |dev, _| {
        if let Some(p) = victim.lock().unwrap().take() {
            w.upgrade().unwrap().free(dev, p).unwrap();
        }
    });
    let r = t.allocate(0, 8 * MIB, S0);
    // Before the fix: "... (8.00 MiB free on the device) ... tessera holds 0 B reserved ... 1 eviction
    // hook(s) called, freeing 2.00 MiB. The driver said: cuMemAlloc failed ... 8.00 MiB
    // requested, 58.00 MiB of 64.00 MiB in use."
    let p = r.unwrap_or_else(|e| panic!("8 MiB fits once the freed segment is released: {e}"));
    t.free(0, p).unwrap();
}

/// VMM: the other process leaves 9 MiB; tessera holds 3 pages: a granule with a live slot, and
/// two pages of large blocks, one shared by a free block of stream 1 and a live block of stream
/// 0. A hook frees the two live blocks: tessera's 4 pages (those 3 and a pool page) are all
/// free, and 8 MiB fits in them, or in the device once the cache is released (9 MiB free). The
/// last try did not gather the page shared by the two streams' free blocks, nor could it create
/// a fifth page (1 MiB short), and the request failed; the report then showed 9 MiB free and
/// nothing reserved.
#[test]
fn vmm_a_hook_freeing_the_last_live_blocks_makes_room() {
    let (sim, t) = setup(Backend::Vmm);
    sim.set_external_usage(0, 55 * MIB);
    let a = t.allocate(0, 1, S0).unwrap();
    let c = t.allocate(0, MIB + 1, S1).unwrap();
    let d = t.allocate(0, MIB + 1, S0).unwrap();
    t.free(0, c).unwrap();
    let victims = Mutex::new(vec![a, d]);
    let w = Arc::downgrade(&t);
    t.add_oom_hook(move |dev, _| {
        let t = w.upgrade().unwrap();
        for p in victims.lock().unwrap().drain(..) {
            t.free(dev, p).unwrap();
        }
    });
    let r = t.allocate(0, 8 * MIB, S0);
    // Before the fix: "... (9.00 MiB free on the device) ... tessera holds 0 B reserved ... The driver
    // said: cuMemCreate failed ... 2.00 MiB requested, 63.00 MiB of 64.00 MiB in use."
    let p = r.unwrap_or_else(|e| panic!("8 MiB fits once the cache is released: {e}"));
    t.free(0, p).unwrap();
}

/// Legacy, no hooks: a block of stream 1 recorded on stream 2 (both held) is freed; the other
/// process leaves 2 MiB. A small request on stream 0 needs a 2 MiB granule segment: the wait
/// settles the parked free only in the last try, which cannot use a free large segment for a
/// granule; the cache (that segment) was released only after the request failed.
#[test]
fn legacy_a_free_settled_by_the_wait_makes_room() {
    let (sim, t) = setup(Backend::Legacy);
    sim.hold_stream(0, S1);
    sim.hold_stream(0, Stream(2));
    let a = t.allocate(0, MIB + 1, S1).unwrap();
    sim.set_external_usage(0, CAPACITY - 2 * MIB);
    t.record_stream(a, Stream(2)).unwrap();
    t.free(0, a).unwrap();
    let r = t.allocate(0, 1, S0);
    // Before the fix: "... (2.00 MiB free on the device) ... tessera holds 0 B reserved ... The driver
    // said: cuMemAlloc failed ... 2.00 MiB requested, 64.00 MiB of 64.00 MiB in use."
    let p =
        r.unwrap_or_else(|e| panic!("a granule fits once the settled segment is released: {e}"));
    t.free(0, p).unwrap();
}
