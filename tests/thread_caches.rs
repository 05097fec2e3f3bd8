//! Thread caches (`src/device/tcache.rs`, `threads.rs`): hits without the driver, exact stats and
//! peaks, stream semantics, double frees, frees from other threads, `record_stream`, the drains
//! (`empty_cache`, the OOM sequence, thread exit, `fork`), the bound, and four threads at once.

mod common;

use common::{check_pattern, sim_alloc, write_pattern};
use std::sync::{Arc, Barrier, Mutex};
use tessera::driver::{DevicePtr, Stream};
use tessera::{Config, Error, Tessera};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const S: Stream = Stream(1);

fn config() -> Config {
    Config::default()
}

#[test]
fn a_hit_reuses_the_block_without_the_driver_and_the_stats_stay_exact() {
    let (sim, t) = sim_alloc(64 * MIB, config());
    for size in [512, 3000, 64 * KIB, 2 * MIB] {
        let p = t.allocate(0, size, S).unwrap();
        t.free(0, p).unwrap();
        let s = t.stats(0).unwrap();
        assert_eq!(
            (s.allocated_bytes, s.active_blocks, s.requested_bytes),
            (0, 0, 0)
        );
        assert!(s.thread_cached_bytes >= size, "{size}: {s:?}");
        let calls = sim.call_counts();
        let q = t.allocate(0, size, S).unwrap();
        assert_eq!(q, p, "{size}: the hit serves the block just freed");
        assert_eq!(sim.call_counts(), calls, "{size}: no driver call on a hit");
        let s = t.stats(0).unwrap();
        assert_eq!(s.requested_bytes, size);
        assert_eq!(s.active_blocks, 1);
        assert!(s.allocated_bytes >= size && s.allocated_bytes < size + 16 * KIB);
        t.free(0, q).unwrap();
    }
    let s = t.stats(0).unwrap();
    assert_eq!((s.allocations, s.frees), (8, 8));
    t.check_invariants(0).unwrap();
    assert_eq!(
        t.stats(0).unwrap().thread_cached_bytes,
        0,
        "the check drains"
    );
}

#[test]
fn peaks_are_exact_through_hits_and_a_reset() {
    let (_sim, t) = sim_alloc(256 * MIB, config());
    let sizes = [MIB, 2 * MIB, 512, 4 * MIB];
    let ps: Vec<_> = sizes
        .iter()
        .map(|&s| t.allocate(0, s, S).unwrap())
        .collect();
    let top = t.stats(0).unwrap();
    for &p in &ps {
        t.free(0, p).unwrap();
    }
    // Hits now, below the peak: it must not move.
    let a = t.allocate(0, 2 * MIB, S).unwrap();
    let b = t.allocate(0, MIB, S).unwrap();
    let s = t.stats(0).unwrap();
    assert_eq!(s.peak_allocated_bytes, top.allocated_bytes);
    assert_eq!(s.peak_active_blocks, 4);
    assert_eq!(s.peak_requested_bytes, top.requested_bytes);
    t.reset_peak_stats(0).unwrap();
    let s = t.stats(0).unwrap();
    assert_eq!(s.peak_allocated_bytes, 3 * MIB);
    assert_eq!(s.peak_active_blocks, 2);
    // A hit above the new peak raises it exactly.
    let c = t.allocate(0, 4 * MIB, S).unwrap();
    let s = t.stats(0).unwrap();
    assert_eq!(s.peak_allocated_bytes, 7 * MIB);
    assert_eq!(s.peak_requested_bytes, 7 * MIB);
    assert_eq!(s.peak_active_blocks, 3);
    for p in [a, b, c] {
        t.free(0, p).unwrap();
    }
    t.check_invariants(0).unwrap();
}

#[test]
fn a_block_cached_for_one_stream_serves_only_that_stream() {
    let (sim, t) = sim_alloc(64 * MIB, config());
    // Stream 1's work never finishes here: no fence may pass its memory to stream 2 either.
    sim.hold_stream(0, Stream(1));
    for size in [4 * KIB, 2 * MIB] {
        let p = t.allocate(0, size, Stream(1)).unwrap();
        t.free(0, p).unwrap();
        let q = t.allocate(0, size, Stream(2)).unwrap();
        assert_ne!(q, p, "{size}: stream 2 got stream 1's cached block");
        let r = t.allocate(0, size, Stream(1)).unwrap();
        assert_eq!(r, p);
        t.free(0, q).unwrap();
        t.free(0, r).unwrap();
    }
    sim.release_stream(0, Stream(1));
    t.check_invariants(0).unwrap();
}

#[test]
fn double_frees_are_caught_on_the_same_thread_and_across_threads() {
    let (_sim, t) = sim_alloc(64 * MIB, config());
    let t = Arc::new(t);
    for size in [512, 2 * MIB] {
        let p = t.allocate(0, size, S).unwrap();
        t.free(0, p).unwrap();
        assert!(
            matches!(t.free(0, p), Err(Error::DoubleFree { .. })),
            "{size}"
        );
        let t2 = Arc::clone(&t);
        let r = std::thread::spawn(move || t2.free(0, p)).join().unwrap();
        assert!(matches!(r, Err(Error::DoubleFree { .. })), "{size}: {r:?}");
        // Nothing was lost: the block still serves.
        assert_eq!(t.allocate(0, size, S).unwrap(), p);
        t.free(0, p).unwrap();
    }
    assert_eq!(t.stats(0).unwrap().invalid_frees, 4);
    t.check_invariants(0).unwrap();
}

#[test]
fn a_free_from_another_thread_returns_the_memory_at_once() {
    let (_sim, t) = sim_alloc(64 * MIB, config());
    let t = Arc::new(t);
    for size in [4 * KIB, 4 * MIB] {
        // Held by this thread's cache (a hit), then freed elsewhere, as autograd does.
        let p = t.allocate(0, size, S).unwrap();
        t.free(0, p).unwrap();
        let p = t.allocate(0, size, S).unwrap();
        // SAFETY: a live simulated-device allocation of `size` bytes, ours.
        unsafe { write_pattern(p, size, 7, 512) };
        let t2 = Arc::clone(&t);
        std::thread::spawn(move || {
            // SAFETY: as above; the other thread checks before it frees.
            unsafe { check_pattern(p, size, 7, 512) };
            t2.free(0, p).unwrap();
            let s = t2.stats(0).unwrap();
            assert_eq!(
                (s.allocated_bytes, s.active_blocks, s.requested_bytes),
                (0, 0, 0)
            );
        })
        .join()
        .unwrap();
        assert_eq!(t.allocation(p), None, "{size}: freed for every thread");
        // The owner forgets the slot and goes on.
        let q = t.allocate(0, size, S).unwrap();
        t.free(0, q).unwrap();
        t.check_invariants(0).unwrap();
    }
}

#[test]
fn record_stream_and_parked_frees_bypass_the_cache() {
    let (_sim, t) = sim_alloc(64 * MIB, config());
    for size in [4 * KIB, 2 * MIB] {
        let p = t.allocate(0, size, S).unwrap();
        t.free(0, p).unwrap();
        let p = t.allocate(0, size, S).unwrap(); // held, live
        t.record_stream(p, Stream(9)).unwrap();
        t.free(0, p).unwrap();
        let snap = t.snapshot(0).unwrap();
        let parked = snap
            .segments
            .iter()
            .flat_map(|s| &s.blocks)
            .any(|b| b.address == p && b.state == tessera::stats::BlockStateInfo::PendingFree);
        assert!(parked, "{size}: the free waits for stream 9");
        assert_eq!(t.allocation(p), None);
        t.empty_cache(0).unwrap();
    }
    // A freed block in a cache is not live, and cannot be recorded.
    let p = t.allocate(0, 4 * KIB, S).unwrap();
    t.free(0, p).unwrap();
    assert_eq!(t.allocation(p), None);
    assert!(t.record_stream(p, Stream(9)).is_err());
    t.check_invariants(0).unwrap();
}

/// A thread that frees into its cache and then waits, holding the cache, until released.
fn holder(t: &Arc<Tessera>, sizes: &'static [u64]) -> (Arc<Barrier>, std::thread::JoinHandle<()>) {
    let ready = Arc::new(Barrier::new(2));
    let (t, r) = (Arc::clone(t), Arc::clone(&ready));
    let h = std::thread::spawn(move || {
        let ps: Vec<_> = sizes
            .iter()
            .map(|&s| t.allocate(0, s, S).unwrap())
            .collect();
        for p in ps {
            t.free(0, p).unwrap();
        }
        r.wait(); // cached
        r.wait(); // released
    });
    ready.wait();
    (ready, h)
}

#[test]
fn empty_cache_and_the_oom_sequence_drain_other_threads_caches() {
    let (_sim, t) = sim_alloc(8 * MIB, config());
    let t = Arc::new(t);
    let (go, h) = holder(&t, &[2 * MIB, 4 * KIB]);
    let s = t.stats(0).unwrap();
    assert!(s.thread_cached_bytes >= 2 * MIB + 4 * KIB);
    assert_eq!(t.empty_cache(0).unwrap(), 4 * MIB);
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 0);
    go.wait();
    h.join().unwrap();

    let (go, h) = holder(&t, &[2 * MIB, 2 * MIB, 2 * MIB, 4 * KIB]);
    // The device is full of cached blocks of the other thread: 8 MiB needs them all.
    let p = t.allocate(0, 8 * MIB, S).unwrap();
    assert_eq!(t.stats(0).unwrap().ooms, 0);
    t.free(0, p).unwrap();
    go.wait();
    h.join().unwrap();
    t.check_invariants(0).unwrap();
}

#[test]
fn a_thread_that_exits_gives_its_cache_back() {
    let (_sim, t) = sim_alloc(64 * MIB, config());
    let t = Arc::new(t);
    let t2 = Arc::clone(&t);
    let live = std::thread::spawn(move || {
        for size in [512, 64 * KIB, 2 * MIB] {
            let p = t2.allocate(0, size, S).unwrap();
            t2.free(0, p).unwrap();
        }
        // Live when the thread exits: it stays live, an ordinary allocation.
        t2.allocate(0, 512, S).unwrap()
    })
    .join()
    .unwrap();
    let s = t.stats(0).unwrap();
    assert_eq!(s.thread_cached_bytes, 0);
    assert_eq!((s.active_blocks, s.requested_bytes), (1, 512));
    assert_eq!((s.allocations, s.frees), (4, 3));
    t.free(0, live).unwrap();
    t.check_invariants(0).unwrap();
    assert_eq!(
        t.empty_cache(0).unwrap(),
        t.stats(0).unwrap().peak_reserved_bytes
    );
}

#[test]
fn the_bound_holds_and_zero_turns_the_caches_off() {
    let (_sim, t) = sim_alloc(
        256 * MIB,
        Config::builder().thread_cache(MIB).build().unwrap(),
    );
    let ps: Vec<DevicePtr> = (0..64)
        .map(|_| t.allocate(0, 64 * KIB, S).unwrap())
        .collect();
    for p in ps {
        t.free(0, p).unwrap();
        assert!(t.stats(0).unwrap().thread_cached_bytes <= MIB);
    }
    assert!(t.stats(0).unwrap().thread_cached_bytes > 0);
    // Blocks above a quarter of the bound are never cached.
    let p = t.allocate(0, MIB / 2, S).unwrap();
    t.free(0, p).unwrap();
    assert!(t.stats(0).unwrap().thread_cached_bytes <= MIB);
    t.check_invariants(0).unwrap();

    let (_sim, t) = sim_alloc(64 * MIB, Config::builder().thread_cache(0).build().unwrap());
    let p = t.allocate(0, 4 * KIB, S).unwrap();
    t.free(0, p).unwrap();
    assert_eq!(t.stats(0).unwrap().thread_cached_bytes, 0);
}

#[test]
fn four_threads_on_one_device_with_frees_from_other_threads() {
    let (_sim, t) = sim_alloc(
        512 * MIB,
        Config {
            check_invariants: false,
            ..config()
        },
    );
    let t = Arc::new(t);
    // Blocks handed from one thread to another to free: (pointer, size, seed).
    let handoff = Arc::new(Mutex::new(Vec::<(DevicePtr, u64, u64)>::new()));
    let threads: Vec<_> = (0..4u64)
        .map(|k| {
            let (t, handoff) = (Arc::clone(&t), Arc::clone(&handoff));
            std::thread::spawn(move || {
                let mut rng = 0x9E37_79B9u64.wrapping_mul(k + 1);
                let mut mine: Vec<(DevicePtr, u64, u64)> = Vec::new();
                for i in 0..6_000u64 {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let stream = Stream(1 + rng % 2);
                    match rng % 8 {
                        0..=3 if mine.len() < 64 => {
                            let size = match rng >> 8 & 3 {
                                0 => 1 + (rng >> 16) % (8 * KIB),
                                1 => 1 + (rng >> 16) % (64 * KIB),
                                2 => 1 + (rng >> 16) % (4 * MIB),
                                _ => 512,
                            };
                            let p = t.allocate(0, size, stream).unwrap();
                            // SAFETY: a fresh simulated-device allocation of `size` bytes.
                            unsafe { write_pattern(p, size, rng | 1, 4096) };
                            mine.push((p, size, rng | 1));
                        }
                        4 if !mine.is_empty() => {
                            let b = mine.swap_remove((rng >> 4) as usize % mine.len());
                            handoff.lock().unwrap().push(b);
                        }
                        5 | 6 => {
                            let b = handoff.lock().unwrap().pop();
                            if let Some((p, size, seed)) = b {
                                // SAFETY: live until this free; its owner handed it over.
                                unsafe { check_pattern(p, size, seed, 4096) };
                                t.free(0, p).unwrap();
                            }
                        }
                        _ if !mine.is_empty() => {
                            let (p, size, seed) = mine.pop().unwrap();
                            // SAFETY: live until this free, ours.
                            unsafe { check_pattern(p, size, seed, 4096) };
                            t.free(0, p).unwrap();
                        }
                        _ => {}
                    }
                    if k == 0 && i % 1_000 == 0 {
                        t.empty_cache(0).unwrap();
                        let _ = t.stats(0).unwrap();
                    }
                    if k == 1 && i % 2_000 == 0 {
                        t.check_invariants(0).unwrap();
                    }
                }
                for (p, size, seed) in mine {
                    // SAFETY: live until this free, ours.
                    unsafe { check_pattern(p, size, seed, 4096) };
                    t.free(0, p).unwrap();
                }
            })
        })
        .collect();
    for h in threads {
        h.join().unwrap();
    }
    for (p, size, seed) in handoff.lock().unwrap().drain(..) {
        // SAFETY: live until this free.
        unsafe { check_pattern(p, size, seed, 4096) };
        t.free(0, p).unwrap();
    }
    let s = t.stats(0).unwrap();
    assert_eq!(
        (s.allocated_bytes, s.active_blocks, s.requested_bytes),
        (0, 0, 0)
    );
    assert_eq!(s.allocations, s.frees);
    t.check_invariants(0).unwrap();
    t.empty_cache(0).unwrap();
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 0);
}

#[test]
fn a_forked_child_drains_without_waiting_for_threads_it_does_not_have() {
    let (_sim, t) = sim_alloc(64 * MIB, config());
    let t = Arc::new(t);
    let (go, h) = holder(&t, &[2 * MIB, 4 * KIB]);
    let p = t.allocate(0, 4 * KIB, S).unwrap();
    t.free(0, p).unwrap();
    // SAFETY: the child only calls tessera (no lock is held by the other thread, which waits on
    // a barrier) and exits with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        // SAFETY: plain libc calls in the child.
        unsafe { libc::alarm(20) };
        let ok = t.empty_cache(0).is_ok()
            && t.stats(0).is_ok_and(|s| s.allocated_bytes == 0)
            && t.allocate(0, 4 * KIB, S).is_ok();
        // SAFETY: ends the child without running the parent's exit handlers.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child: {status}"
    );
    go.wait();
    h.join().unwrap();
    t.check_invariants(0).unwrap();
}
