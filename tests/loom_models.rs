//! loom models of the allocator's concurrency: every interleaving of a few threads' lock and atomic
//! operations (up to a preemption bound) is run, and each must pass its assertions without
//! deadlock. Built only with `--cfg loom` (empty otherwise), where `tessera`'s locks and atomics
//! (`src/sync.rs`), those of the simulated driver included, and its thread-locals are loom's.
//!
//! ```sh
//! RUSTFLAGS="--cfg loom" cargo test --release -p tessera --test loom_models \
//!     --target-dir target/loom -- --nocapture --test-threads 1
//! ```
//!
//! (One model at a time: run beside the others in one process, the thread-cache models fail; see
//! `docs/reliability.md`.)
//!
//! (`-p tessera`: the `tessera` command, `cli/`, uses the replay, which a loom build leaves out.)
//!
//! Each model builds a fresh [`SimDriver`] (real backing: device memory is host memory, so the
//! models write a byte pattern into every allocation and check it before freeing) and a
//! [`Tessera`] with `check_invariants` on (checked under the device lock after every mutation),
//! and ends by joining its threads, checking the invariants, emptying the cache and asserting that
//! the driver holds no memory any more.
//!
//! 1. `alloc_free_with_empty_cache`: two threads allocate, look up and free (one small request,
//!    one large) while a third empties the cache. Patterns intact, allocations never overlap
//!    (the pattern check), the registry finds each allocation, everything is returned.
//! 2. `oom_hook_waits_for_free_on_other_thread`: a device of one page, held by an allocation; a
//!    request fails, its hook asks another thread to free that allocation and waits until it has.
//!    The hooks run with no lock held, so the free proceeds and the request must then succeed
//!    (exactly: `Ok`, `hook_calls == 1`, `ooms == 0`); a lock held around the hooks is a deadlock,
//!    which loom reports. `oom_hook_signals_free_without_waiting`: the same, but the hook only
//!    signals: the request either succeeds or fails cleanly with `OutOfMemory` reporting one hook
//!    call, and both outcomes must occur among the interleavings.
//! 3. `hook_that_allocates`: a device of two pages; a hook allocates (an impossible request, which
//!    must fail with `hooks_called == 0`: an allocation inside a hook skips the hooks; and a small
//!    one, which may fail the same way), then frees the held allocation. Two threads make requests
//!    that can run out. Every top-level `OutOfMemory` reports exactly one hook call (the in-hook
//!    flag is per thread: a thread running a hook does not make another thread skip them), the
//!    `hook_calls` statistic equals the calls the hook counted, no deadlock.
//! 4. `registry_two_devices`: two devices, first used concurrently by two threads (one each), which
//!    publish their allocation in a slot; a third looks each slot's pointer up (`allocation`, at its
//!    start and inside it: must name the right device and base) and frees one through `free_any`
//!    (must succeed, and be counted as a free on the right device only), while each owner empties
//!    its device's cache, which unregisters its ranges (the registry's write path).
//! 5. `stats_read_while_changing`: one thread allocates two blocks and frees them, another reads
//!    `stats(0)` three times: each read is a state that can occur (active blocks and allocated and
//!    requested bytes match a subset of the two blocks, allocated <= reserved, cached free =
//!    reserved - allocated, peaks >= values, allocations - frees = active), and counters never go
//!    back. (`stats` takes the device lock, so this guards that each snapshot is taken whole and
//!    that counters are monotonic across snapshots, not a lock-free read.)
//! 6. `remove_hook_waits_for_running_call`: a request on a full device runs a hook while another
//!    thread removes it: once `remove_oom_hook` returns, the hook is not running and never starts
//!    again (the guarantee that lets a C caller free a hook's data right after removing it).
//!
//! 7. `thread_cache_drain_races_a_hit`, `thread_cache_remote_free`, `thread_cache_exit_during_drain`:
//!    the thread caches (`src/device/tcache.rs`), below. The first six run with the caches off.
//!
//! Bounds: at most four model threads (main included), each making one to four allocator calls
//! (but every driver call is a loom operation too). loom's preemption bound is 3 for every model
//! but `registry_two_devices`, where it is 2 (3 takes 100 s there, mostly creating and tearing
//! down two simulated devices per interleaving); `LOOM_MAX_PREEMPTIONS` overrides it for all.
//! The whole file runs in 25 to 45 s in release mode on two cores (mostly host `mmap` work). Each
//! model prints the number of interleavings it explored (`--nocapture`).

#![cfg(loom)]

use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::{DevicePtr, Driver, Stream};
use tessera::{Config, Error, Tessera};

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
const S: Stream = Stream::DEFAULT;

/// Runs `f` under loom with at most `preemptions` preemptions per interleaving (unless
/// `LOOM_MAX_PREEMPTIONS` is set), and prints how many interleavings it explored.
fn model(name: &str, preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let iterations = std::sync::Arc::new(AtomicUsize::new(0));
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(preemptions);
    }
    // Driver calls are loom operations too: a slow-path allocation makes dozens.
    builder.max_branches = builder.max_branches.max(20_000);
    let count = iterations.clone();
    let start = Instant::now();
    builder.check(move || {
        count.fetch_add(1, Ordering::Relaxed);
        f();
    });
    eprintln!(
        "loom model {name}: {} interleavings, preemption bound {}, {:.2?}",
        iterations.load(Ordering::Relaxed),
        builder.preemption_bound.unwrap_or(0),
        start.elapsed()
    );
}

/// An allocator over a fresh simulated machine, invariants checked after every mutation. Thread
/// caches off: these models are about the device lock, the hooks and the registry (a cache's
/// dozen atomics per hit multiply their interleavings past any time budget); the
/// `thread_cache_*` models below turn them on.
fn allocator(sim: SimConfig) -> Arc<Tessera> {
    allocator_with(sim, 0)
}

fn allocator_with(sim: SimConfig, thread_cache: u64) -> Arc<Tessera> {
    let drv: std::sync::Arc<dyn Driver> = std::sync::Arc::new(SimDriver::new(sim));
    let config = Config {
        check_invariants: true,
        thread_cache,
        ..Config::default()
    };
    // Untraced: a `TESSERA_TRACE` in the environment must not write a file per interleaving.
    Arc::new(Tessera::untraced(Arc::from_std(drv), config).expect("allocator"))
}

/// One device of `capacity` bytes (2 MiB pages).
fn one_device(capacity: u64) -> Arc<Tessera> {
    allocator(SimConfig {
        capacity,
        ..SimConfig::default()
    })
}

/// Offsets of the pattern words: one `u64` every 512 B, and the last word.
fn offsets(size: u64) -> impl Iterator<Item = u64> {
    let last = size.max(8) - 8;
    (0..size.div_ceil(512))
        .map(move |i| (i * 512).min(last) & !7)
        .chain(std::iter::once(last & !7))
}

fn word(seed: u64, off: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ off.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ 0x55
}

/// Writes the pattern of `seed` into `[ptr, ptr + size)`.
fn fill(ptr: DevicePtr, size: u64, seed: u64) {
    for off in offsets(size) {
        // SAFETY: `ptr` is a live allocation of at least `size` bytes on a simulated device with
        // real backing (host memory mapped read/write in this process); `off + 8 <= size` and
        // `ptr + off` is 8-aligned (allocations are 512-aligned).
        unsafe { ((ptr + off) as *mut u64).write_volatile(word(seed, off)) };
    }
}

/// Checks the pattern that `fill` wrote.
fn check(ptr: DevicePtr, size: u64, seed: u64) {
    for off in offsets(size) {
        // SAFETY: as in `fill`; the allocation is still live.
        let got = unsafe { ((ptr + off) as *const u64).read_volatile() };
        assert_eq!(
            got,
            word(seed, off),
            "allocation {ptr:#x} (size {size}) corrupted at offset {off}"
        );
    }
}

/// Allocates, fills, looks up, checks and frees one allocation on device 0.
fn round_trip(t: &Tessera, size: u64, seed: u64) {
    let p = t.allocate(0, size, S).expect("enough memory");
    fill(p, size, seed);
    let a = t.allocation(p).expect("a live allocation is registered");
    assert_eq!((a.device, a.base, a.requested), (0, p, size));
    check(p, size, seed);
    t.free(0, p).expect("free of a live allocation");
}

/// After the threads: invariants hold, nothing is live, and emptying the cache returns every
/// byte to the driver.
fn assert_all_returned(t: &Tessera, devices: usize) {
    for d in 0..devices {
        t.check_invariants(d).expect("invariants");
        let st = t.stats(d).unwrap();
        assert_eq!((st.active_blocks, st.allocated_bytes), (0, 0), "{st:?}");
        t.empty_cache(d).unwrap();
        assert_eq!(t.stats(d).unwrap().reserved_bytes, 0);
        assert_eq!(
            t.driver().bytes_in_use(d),
            0,
            "device {d} still holds memory"
        );
    }
}

fn oom_hooks_called(r: &tessera::Result<DevicePtr>) -> Option<u32> {
    match r {
        Ok(_) => None,
        Err(Error::OutOfMemory(report)) => Some(report.hooks_called),
        Err(e) => panic!("expected success or an OOM, got {e}"),
    }
}

#[test]
fn alloc_free_with_empty_cache() {
    // How often `empty_cache` released nothing and something: both must occur, or the model no
    // longer interleaves it with the frees.
    static RELEASED: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
    model("alloc_free_with_empty_cache", 3, || {
        let t = one_device(16 * MIB);
        t.stats(0).unwrap(); // create the device before the threads
        let small = {
            let t = t.clone();
            thread::spawn(move || round_trip(&t, 4 * KIB, 1))
        };
        let large = {
            let t = t.clone();
            thread::spawn(move || round_trip(&t, 3 * MIB, 2))
        };
        let empty = {
            let t = t.clone();
            thread::spawn(move || {
                let released = t.empty_cache(0).unwrap();
                RELEASED[usize::from(released > 0)].fetch_add(1, Ordering::Relaxed);
            })
        };
        small.join().unwrap();
        large.join().unwrap();
        empty.join().unwrap();
        assert_eq!(t.stats(0).unwrap().frees, 2);
        assert_all_returned(&t, 1);
    });
    assert!(
        RELEASED.iter().all(|n| n.load(Ordering::Relaxed) > 0),
        "empty_cache must run both before and after a free: {RELEASED:?}"
    );
}

/// A one-shot state shared by the hook and the freeing thread: 0 nothing yet, 1 asked, 2 freed.
type Signal = Arc<(Mutex<u8>, Condvar)>;

fn set(signal: &Signal, value: u8) {
    *signal.0.lock().unwrap() = value;
    signal.1.notify_all();
}

fn wait_for(signal: &Signal, value: u8) {
    let mut s = signal.0.lock().unwrap();
    while *s < value {
        s = signal.1.wait(s).unwrap();
    }
}

/// A device of one 2 MiB page, held by a filled allocation; returns it.
fn full_device() -> (Arc<Tessera>, DevicePtr) {
    let t = one_device(2 * MIB);
    let held = t.allocate(0, 2 * MIB, S).unwrap();
    fill(held, 2 * MIB, 7);
    (t, held)
}

/// The thread that frees `held` once asked.
fn freer(t: &Arc<Tessera>, signal: &Signal, held: DevicePtr) -> thread::JoinHandle<()> {
    let (t, signal) = (t.clone(), signal.clone());
    thread::spawn(move || {
        wait_for(&signal, 1);
        check(held, 2 * MIB, 7);
        t.free(0, held).unwrap();
        set(&signal, 2);
    })
}

#[test]
fn oom_hook_waits_for_free_on_other_thread() {
    model("oom_hook_waits_for_free_on_other_thread", 3, || {
        let (t, held) = full_device();
        let signal: Signal = Arc::new((Mutex::new(0), Condvar::new()));
        let s = signal.clone();
        let id = t.add_oom_hook(move |_, _| {
            set(&s, 1);
            // Waits with no allocator lock held: the free on the other thread must go through.
            wait_for(&s, 2);
        });
        let other = freer(&t, &signal, held);
        let p = t
            .allocate(0, 2 * MIB, S)
            .expect("the hook waited for the free");
        fill(p, 2 * MIB, 8);
        other.join().unwrap();
        check(p, 2 * MIB, 8);
        let st = t.stats(0).unwrap();
        assert_eq!((st.hook_calls, st.ooms), (1, 0), "{st:?}");
        t.free(0, p).unwrap();
        assert!(t.remove_oom_hook(id));
        assert_all_returned(&t, 1);
    });
}

#[test]
fn oom_hook_signals_free_without_waiting() {
    static OUTCOMES: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
    model("oom_hook_signals_free_without_waiting", 3, || {
        let (t, held) = full_device();
        let signal: Signal = Arc::new((Mutex::new(0), Condvar::new()));
        let s = signal.clone();
        let id = t.add_oom_hook(move |_, _| set(&s, 1));
        let other = freer(&t, &signal, held);
        let r = t.allocate(0, 2 * MIB, S);
        // Exactly one hook call either way; an OOM if the free came after the last retry.
        let oom = oom_hooks_called(&r);
        assert!(matches!(oom, None | Some(1)), "{oom:?}");
        other.join().unwrap();
        let st = t.stats(0).unwrap();
        assert_eq!((st.hook_calls, st.ooms), (1, u64::from(oom.is_some())));
        OUTCOMES[usize::from(oom.is_some())].fetch_add(1, Ordering::Relaxed);
        if let Ok(p) = r {
            fill(p, 2 * MIB, 9);
            check(p, 2 * MIB, 9);
            t.free(0, p).unwrap();
        }
        assert!(t.remove_oom_hook(id));
        assert_all_returned(&t, 1);
    });
    let [ok, oom] = &OUTCOMES;
    assert!(
        ok.load(Ordering::Relaxed) > 0 && oom.load(Ordering::Relaxed) > 0,
        "both outcomes must be explored: {OUTCOMES:?}"
    );
}

#[test]
fn hook_that_allocates() {
    // Hooks running now, and how often one started while another was running (on the other
    // thread): that case must be among the interleavings.
    static RUNNING: AtomicUsize = AtomicUsize::new(0);
    static OVERLAPS: AtomicUsize = AtomicUsize::new(0);
    model("hook_that_allocates", 3, || {
        RUNNING.store(0, Ordering::Relaxed);
        let t = one_device(4 * MIB);
        let held = t.allocate(0, 2 * MIB, S).unwrap();
        fill(held, 2 * MIB, 3);
        let slot = Arc::new(Mutex::new(Some(held)));
        let calls = Arc::new(loom::sync::atomic::AtomicUsize::new(0));
        let (t2, slot2, calls2) = (t.clone(), slot.clone(), calls.clone());
        let id = t.add_oom_hook(move |dev, _| {
            calls2.fetch_add(1, Ordering::Relaxed);
            if RUNNING.fetch_add(1, Ordering::Relaxed) > 0 {
                OVERLAPS.fetch_add(1, Ordering::Relaxed);
            }
            // Larger than the device: fails at once, and must not call the hooks again.
            let r = t2.allocate(dev, 6 * MIB, S);
            assert_eq!(
                oom_hooks_called(&r),
                Some(0),
                "inside a hook, hooks are skipped"
            );
            // Possible or not depending on the other thread; never the hooks.
            let r = t2.allocate(dev, 4 * KIB, S);
            match oom_hooks_called(&r) {
                None => {
                    let p = r.unwrap();
                    fill(p, 4 * KIB, 4);
                    check(p, 4 * KIB, 4);
                    t2.free(dev, p).unwrap();
                }
                Some(called) => assert_eq!(called, 0, "inside a hook, hooks are skipped"),
            }
            if let Some(p) = slot2.lock().unwrap().take() {
                check(p, 2 * MIB, 3);
                t2.free(dev, p).unwrap();
            }
            RUNNING.fetch_sub(1, Ordering::Relaxed);
        });
        let request = |size: u64, seed: u64| {
            let t = t.clone();
            thread::spawn(move || {
                let r = t.allocate(0, size, S);
                // Every top-level OOM called the hook exactly once.
                assert!(matches!(oom_hooks_called(&r), None | Some(1)), "{r:?}");
                if let Ok(p) = r {
                    fill(p, size, seed);
                    check(p, size, seed);
                    t.free(0, p).unwrap();
                }
            })
        };
        let a = request(4 * MIB, 5);
        let b = request(2 * MIB, 6);
        a.join().unwrap();
        b.join().unwrap();
        let st = t.stats(0).unwrap();
        assert_eq!(
            st.hook_calls,
            calls.load(Ordering::Relaxed) as u64,
            "{st:?}"
        );
        if let Some(p) = slot.lock().unwrap().take() {
            t.free(0, p).unwrap();
        }
        assert!(t.remove_oom_hook(id));
        assert_all_returned(&t, 1);
    });
    assert!(
        OVERLAPS.load(Ordering::Relaxed) > 0,
        "no interleaving ran the hook on both threads at once"
    );
}

#[test]
fn registry_two_devices() {
    // Interleavings in which the lookup thread found device 1's and device 0's pointer: both must
    // occur, or the lookups test nothing.
    static FOUND: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
    model("registry_two_devices", 2, || {
        let t = allocator(SimConfig {
            devices: 2,
            capacity: 8 * MIB,
            ..SimConfig::default()
        });
        // Device 0 gets a large request, device 1 a small one; neither device exists yet.
        let sizes = [3 * MIB, 4 * KIB];
        let slots: [Arc<Mutex<Option<DevicePtr>>>; 2] = Default::default();
        let owners: Vec<_> = (0..2)
            .map(|dev| {
                let (t, slot, size) = (t.clone(), slots[dev].clone(), sizes[dev]);
                thread::spawn(move || {
                    let p = t.allocate(dev, size, S).unwrap();
                    fill(p, size, dev as u64);
                    *slot.lock().unwrap() = Some(p);
                    // Free it unless the lookup thread took it.
                    let mine = slot.lock().unwrap().take();
                    if let Some(p) = mine {
                        check(p, size, dev as u64);
                        t.free(dev, p).unwrap();
                    }
                    // Unmaps and unregisters the owner's range while the other device's
                    // allocation may be looked up (the registry's write path).
                    t.empty_cache(dev).unwrap();
                })
            })
            .collect();
        let lookup = {
            let (t, slots) = (t.clone(), slots.clone());
            thread::spawn(move || {
                // Device 1: look up while the owner cannot free (it needs the slot's lock).
                if let Some(p) = *slots[1].lock().unwrap() {
                    FOUND[1].fetch_add(1, Ordering::Relaxed);
                    for q in [p, p + 8] {
                        let a = t.allocation(q).expect("a live allocation is registered");
                        assert_eq!((a.device, a.base, a.requested), (1, p, sizes[1]));
                    }
                }
                // Device 0: take it over and free it by pointer alone.
                let taken = slots[0].lock().unwrap().take();
                if let Some(p) = taken {
                    FOUND[0].fetch_add(1, Ordering::Relaxed);
                    for q in [p, p + 8] {
                        assert_eq!(t.allocation(q).map(|a| (a.device, a.base)), Some((0, p)));
                    }
                    check(p, sizes[0], 0);
                    t.free_any(p).expect("free_any finds the owning device");
                    assert_eq!(t.allocation(p), None);
                }
            })
        };
        for o in owners {
            o.join().unwrap();
        }
        lookup.join().unwrap();
        for dev in 0..2 {
            let st = t.stats(dev).unwrap();
            assert_eq!(
                (st.allocations, st.frees, st.invalid_frees),
                (1, 1, 0),
                "{st:?}"
            );
        }
        assert_all_returned(&t, 2);
    });
    assert!(
        FOUND.iter().all(|n| n.load(Ordering::Relaxed) > 0),
        "the lookups must find both devices' pointers: {FOUND:?}"
    );
}

#[test]
fn stats_read_while_changing() {
    model("stats_read_while_changing", 3, || {
        let t = one_device(8 * MIB);
        let requests = [4 * KIB + 100, 3 * MIB + 100];
        // The sizes the allocator gives these requests (their blocks), measured before the threads.
        let sizes = requests.map(|r| {
            let p = t.allocate(0, r, S).unwrap();
            let size = t.allocation(p).unwrap().size;
            t.free(0, p).unwrap();
            size
        });
        let base = t.stats(0).unwrap();
        let writer = {
            let t = t.clone();
            thread::spawn(move || {
                let ptrs = requests.map(|r| t.allocate(0, r, S).unwrap());
                for p in ptrs {
                    t.free(0, p).unwrap();
                }
            })
        };
        let reader = {
            let t = t.clone();
            thread::spawn(move || {
                let mut last = base.clone();
                for _ in 0..3 {
                    let st = t.stats(0).unwrap();
                    // Which blocks are live: a prefix while allocating, a suffix while freeing.
                    let live: &[usize] =
                        match (st.allocations - base.allocations, st.frees - base.frees) {
                            (0, 0) | (2, 2) => &[],
                            (1, 0) => &[0],
                            (2, 0) => &[0, 1],
                            (2, 1) => &[1],
                            other => panic!("impossible (allocations, frees) {other:?}: {st:?}"),
                        };
                    assert_eq!(st.active_blocks, live.len() as u64, "{st:?}");
                    let allocated: u64 = live.iter().map(|&i| sizes[i]).sum();
                    let requested: u64 = live.iter().map(|&i| requests[i]).sum();
                    assert_eq!(
                        (st.allocated_bytes, st.requested_bytes),
                        (allocated, requested)
                    );
                    assert!(st.allocated_bytes <= st.reserved_bytes, "{st:?}");
                    assert_eq!(st.cached_free_bytes, st.reserved_bytes - st.allocated_bytes);
                    assert_eq!(st.reserved_bytes % st.page_size, 0);
                    assert!(st.reserved_bytes <= 8 * MIB);
                    assert!(st.peak_allocated_bytes >= st.allocated_bytes);
                    assert!(st.peak_active_blocks >= st.active_blocks);
                    assert!(st.peak_reserved_bytes >= st.reserved_bytes);
                    assert!(st.allocations >= last.allocations && st.frees >= last.frees);
                    assert!(st.peak_allocated_bytes >= last.peak_allocated_bytes);
                    last = st;
                }
            })
        };
        writer.join().unwrap();
        reader.join().unwrap();
        assert_all_returned(&t, 1);
    });
}

#[test]
fn remove_hook_waits_for_running_call() {
    // Interleavings in which the hook was running when the removal began: some must occur, or
    // the model never tests the wait.
    static RACED: AtomicUsize = AtomicUsize::new(0);
    model("remove_hook_waits_for_running_call", 3, || {
        let (t, held) = full_device();
        // Plain std flags: the assertions read them; loom sees the hook's own synchronisation.
        let running = std::sync::Arc::new(AtomicBool::new(false));
        let removed = std::sync::Arc::new(AtomicBool::new(false));
        let removing = std::sync::Arc::new(AtomicBool::new(false));
        let (r2, rm2, rg2) = (running.clone(), removed.clone(), removing.clone());
        let id = t.add_oom_hook(move |_, _| {
            assert!(
                !rm2.load(Ordering::SeqCst),
                "a hook called after its removal"
            );
            r2.store(true, Ordering::SeqCst);
            thread::yield_now(); // a point where the remover may run
            if rg2.load(Ordering::SeqCst) {
                RACED.fetch_add(1, Ordering::Relaxed);
            }
            r2.store(false, Ordering::SeqCst);
        });
        let requester = {
            let t = t.clone();
            thread::spawn(move || {
                let r = t.allocate(0, 2 * MIB, S);
                assert!(matches!(oom_hooks_called(&r), Some(0 | 1)), "{r:?}");
            })
        };
        removing.store(true, Ordering::SeqCst);
        assert!(t.remove_oom_hook(id));
        assert!(
            !running.load(Ordering::SeqCst),
            "remove_oom_hook returned while the hook was running"
        );
        removed.store(true, Ordering::SeqCst);
        requester.join().unwrap();
        let st = t.stats(0).unwrap();
        assert!(st.hook_calls <= 1 && st.ooms == 1, "{st:?}");
        check(held, 2 * MIB, 7);
        t.free(0, held).unwrap();
        assert_all_returned(&t, 1);
    });
    assert!(
        RACED.load(Ordering::Relaxed) > 0,
        "no interleaving had the hook running when its removal began"
    );
}

/// One device of `capacity` bytes with thread caches (the default bound).
fn one_device_cached(capacity: u64) -> Arc<Tessera> {
    allocator_with(
        SimConfig {
            capacity,
            ..SimConfig::default()
        },
        Config::default().thread_cache,
    )
}

/// A thread cache's hit races its seizure: one thread warms its cache (a free into it) and then
/// serves from it without the lock, while another empties the cache, which seizes every thread
/// cache (the handshake of `src/device/tcache.rs`) and returns its free blocks. loom checks the
/// cache's owner-side state as a cell: a hit and a seizure touching it at once is reported as a
/// data race. The hit must hand out a block nobody else has (the pattern holds), and both orders
/// must occur: the seizure taking the cached block, and the hit taking it first.
#[test]
fn thread_cache_drain_races_a_hit() {
    static TOOK: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
    model("thread_cache_drain_races_a_hit", 3, || {
        let t = one_device_cached(8 * MIB);
        t.stats(0).unwrap();
        let owner = {
            let t = t.clone();
            thread::spawn(move || {
                let p = t.allocate(0, 4 * KIB, S).unwrap();
                t.free(0, p).unwrap(); // cached
                let q = t.allocate(0, 4 * KIB, S).unwrap(); // a hit, or the slow path
                fill(q, 4 * KIB, 3);
                check(q, 4 * KIB, 3);
                t.free(0, q).unwrap();
            })
        };
        let drainer = {
            let t = t.clone();
            thread::spawn(move || {
                let released = t.empty_cache(0).unwrap();
                TOOK[usize::from(released > 0)].fetch_add(1, Ordering::Relaxed);
            })
        };
        owner.join().unwrap();
        drainer.join().unwrap();
        assert_eq!(t.stats(0).unwrap().allocations, 2);
        assert_all_returned(&t, 1);
    });
    assert!(
        TOOK.iter().all(|n| n.load(Ordering::Relaxed) > 0),
        "the seizure must run both with and without a block to take: {TOOK:?}"
    );
}

/// A block handed out from one thread's cache is freed by another thread (PyTorch's autograd
/// thread freeing what the forward pass allocated) while its owner keeps serving hits: the free
/// revokes the owner's slot and returns the block to the pools at once; the owner forgets the
/// slot at its next slow step. Patterns hold, the stats balance, nothing leaks.
#[test]
fn thread_cache_remote_free() {
    model("thread_cache_remote_free", 3, || {
        let t = one_device_cached(8 * MIB);
        let p = t.allocate(0, 4 * KIB, S).unwrap();
        t.free(0, p).unwrap();
        let p = t.allocate(0, 4 * KIB, S).unwrap(); // held by this thread's cache, live
        fill(p, 4 * KIB, 5);
        let remote = {
            let t = t.clone();
            thread::spawn(move || {
                check(p, 4 * KIB, 5);
                t.free(0, p).unwrap();
            })
        };
        round_trip(&t, 4 * KIB, 6);
        remote.join().unwrap();
        round_trip(&t, 4 * KIB, 7);
        let st = t.stats(0).unwrap();
        assert_eq!((st.allocations, st.frees), (4, 4), "{st:?}");
        assert_all_returned(&t, 1);
    });
}

/// A thread exits (its TLS destructor gives its cache back under the device lock; here, the same
/// code through `flush_thread_cache`, as loom runs TLS destructors outside the model) while another
/// thread empties the cache (seizing every cache): neither waits for the other forever, the
/// exiting thread's cached block goes back exactly once, and the block it leaves live stays live
/// until freed here.
#[test]
fn thread_cache_exit_during_drain() {
    model("thread_cache_exit_during_drain", 3, || {
        let t = one_device_cached(8 * MIB);
        t.stats(0).unwrap();
        let exiting = {
            let t = t.clone();
            thread::spawn(move || {
                let p = t.allocate(0, 4 * KIB, S).unwrap();
                t.free(0, p).unwrap(); // cached
                let live = t.allocate(0, 4 * KIB, S).unwrap();
                fill(live, 4 * KIB, 9);
                // What the thread's exit does (loom runs TLS destructors outside the model).
                t.flush_thread_cache();
                live
            })
        };
        let drainer = {
            let t = t.clone();
            thread::spawn(move || {
                t.empty_cache(0).unwrap();
            })
        };
        let live = exiting.join().unwrap();
        drainer.join().unwrap();
        let st = t.stats(0).unwrap();
        assert_eq!((st.active_blocks, st.thread_cached_bytes), (1, 0), "{st:?}");
        check(live, 4 * KIB, 9);
        t.free(0, live).unwrap();
        assert_all_returned(&t, 1);
    });
}
