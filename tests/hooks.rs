//! Eviction hooks: called with (device, requested bytes) and no lock held when a request would
//! fail, so a hook may free (and a failing request then succeeds) or allocate (without deadlock,
//! and without calling the hooks again); a request larger than the device fails at once, calls
//! each hook once, and says why.

mod common;
use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, Weak};
use std::time::Duration;
use tessera::bytes::format_bytes;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::{Call, DevicePtr, Driver, Stream};
use tessera::{Backend, Config, Error, OomReport, Tessera};

const S: Stream = Stream::DEFAULT;
const KIB: u64 = 1 << 10;

type Shared<T> = Arc<Mutex<T>>;

fn shared<T>(v: T) -> Shared<T> {
    Arc::new(Mutex::new(v))
}

/// A 64 MiB device filled with 32 live blocks of 2 MiB (tracked).
fn full_device(
    config: Config,
) -> (
    Arc<SimDriver>,
    Arc<Tessera>,
    Shared<Tracker>,
    Vec<DevicePtr>,
) {
    let (sim, t) = sim_alloc(64 * MIB, config);
    let t = Arc::new(t);
    let tr = shared(Tracker::default());
    let mut blocks = Vec::new();
    for _ in 0..32 {
        let p = t.allocate(0, 2 * MIB, S).unwrap();
        tr.lock().unwrap().add(p, 2 * MIB);
        blocks.push(p);
    }
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 64 * MIB);
    assert_eq!(sim.bytes_in_use(0), 64 * MIB);
    (sim, t, tr, blocks)
}

/// Frees `p` through `t`, untracking it first (its pattern is checked) and checking afterwards.
fn hook_free(t: &Tessera, tr: &Shared<Tracker>, dev: usize, p: DevicePtr) {
    tr.lock().unwrap().remove(p);
    t.free(dev, p).expect("a hook frees a live allocation");
    t.check_invariants(dev).unwrap();
    tr.lock().unwrap().check();
}

fn oom_report(e: &Error) -> &OomReport {
    match e {
        Error::OutOfMemory(r) => r,
        other => panic!("expected an OOM, got {other:?}"),
    }
}

/// Runs `f` on another thread; a deadlock fails the test instead of hanging it.
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)));
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Err(_) => panic!("no answer within {secs} s: deadlock"),
    }
}

#[test]
fn a_hook_that_frees_lets_a_failing_request_succeed() {
    let (sim, t, tr, blocks) = full_device(Config::default());
    // Every other block: 32 MiB that only remapping can make contiguous.
    let victims = shared(blocks.iter().step_by(2).copied().collect::<Vec<_>>());
    let calls = shared(Vec::new());
    let (weak, tr2, calls2) = (Arc::downgrade(&t), tr.clone(), calls.clone());
    t.add_oom_hook(move |dev, requested| {
        calls2.lock().unwrap().push((dev, requested));
        let t = weak.upgrade().expect("allocator alive");
        for p in victims.lock().unwrap().drain(..) {
            hook_free(&t, &tr2, dev, p);
        }
    });
    let requested = 30 * MIB + 1000;
    let p = t
        .allocate(0, requested, S)
        .expect("the hook's frees let the request succeed");
    assert_eq!(*calls.lock().unwrap(), vec![(0, requested)]);
    let mut tr = tr.lock().unwrap();
    tr.add(p, requested);
    tr.check();
    t.check_invariants(0).unwrap();
    let st = t.stats(0).unwrap();
    assert_eq!(st.hook_calls, 1);
    assert_eq!(st.ooms, 0);
    assert_eq!(
        st.reserved_bytes,
        64 * MIB,
        "served by remapping, not new memory"
    );
    assert!(st.remaps >= 15, "{st:?}");
    assert_eq!(sim.bytes_in_use(0), 64 * MIB);
    // Freeing and asking again is served from the cache: no hook.
    tr.remove(p);
    t.free(0, p).unwrap();
    let q = t.allocate(0, requested, S).unwrap();
    assert_eq!(q, p);
    assert_eq!(t.stats(0).unwrap().hook_calls, 1);
    t.free(0, q).unwrap();
}

#[test]
fn a_hook_that_frees_and_allocates_does_not_deadlock() {
    let (_sim, t, tr, blocks) = full_device(Config::default());
    let victims = shared(blocks.iter().step_by(2).copied().collect::<Vec<_>>());
    let inner = shared(Vec::new());
    let (weak, tr2, inner2) = (Arc::downgrade(&t), tr.clone(), inner.clone());
    t.add_oom_hook(move |dev, _| {
        let t = weak.upgrade().expect("allocator alive");
        // Read through the front while the request is in flight: no lock is held.
        t.stats(dev).unwrap();
        t.snapshot(dev).unwrap();
        t.check_invariants(dev).unwrap();
        let mut v = victims.lock().unwrap();
        // Free one block from another thread (a lock held here would block it forever)...
        let p = v.pop().unwrap();
        let (t3, tr3) = (t.clone(), tr2.clone());
        std::thread::spawn(move || hook_free(&t3, &tr3, dev, p))
            .join()
            .unwrap();
        // ... the rest from this one, and allocate in between.
        for p in v.drain(..) {
            hook_free(&t, &tr2, dev, p);
            if inner2.lock().unwrap().len() < 3 {
                for size in [4 * KIB, 100 * KIB] {
                    let q = t.allocate(dev, size, S).expect("allocation inside a hook");
                    tr2.lock().unwrap().add(q, size);
                    inner2.lock().unwrap().push(q);
                }
            }
        }
        let q = t
            .allocate(dev, 2 * MIB, Stream(5))
            .expect("a large allocation inside a hook");
        tr2.lock().unwrap().add(q, 2 * MIB);
        inner2.lock().unwrap().push(q);
        t.check_invariants(dev).unwrap();
    });
    let t2 = t.clone();
    let r = within(60, move || t2.allocate(0, 20 * MIB, S));
    let p = r.expect("the hook freed enough");
    let mut tr = tr.lock().unwrap();
    tr.add(p, 20 * MIB);
    tr.check();
    t.check_invariants(0).unwrap();
    assert_eq!(inner.lock().unwrap().len(), 5);
    let st = t.stats(0).unwrap();
    assert_eq!(st.hook_calls, 1);
    assert_eq!(st.ooms, 0);
    // Everything goes back.
    for p in tr.ptrs() {
        tr.remove(p);
        t.free(0, p).unwrap();
    }
    t.empty_cache(0).unwrap();
    assert_eq!(t.driver().bytes_in_use(0), 0);
}

#[test]
fn a_failing_allocation_inside_a_hook_does_not_call_the_hooks_again() {
    let (_sim, t, tr, _blocks) = full_device(Config::default());
    let counts = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let inner_err = shared(None);
    let (weak, c0, e2) = (Arc::downgrade(&t), counts[0].clone(), inner_err.clone());
    t.add_oom_hook(move |dev, _| {
        c0.fetch_add(1, Ordering::SeqCst);
        let t = weak.upgrade().expect("allocator alive");
        // The device is full and nothing was freed: this fails, without calling any hook.
        let r = t.allocate(dev, 8 * MIB, S);
        *e2.lock().unwrap() = Some(r.map_err(|e| e.to_string()));
    });
    let c1 = counts[1].clone();
    t.add_oom_hook(move |_, _| {
        c1.fetch_add(1, Ordering::SeqCst);
    });
    let t2 = t.clone();
    let err = within(60, move || t2.allocate(0, 4 * MIB, S)).unwrap_err();
    let r = oom_report(&err);
    assert_eq!(r.hooks_called, 2);
    assert_eq!(counts[0].load(Ordering::SeqCst), 1);
    assert_eq!(counts[1].load(Ordering::SeqCst), 1);
    let inner = inner_err.lock().unwrap().take().expect("the hook ran");
    let msg = inner.expect_err("the inner allocation fails");
    assert!(msg.starts_with("CUDA out of memory."), "{msg}");
    assert!(msg.contains("0 eviction hook(s) called"), "{msg}");
    let st = t.stats(0).unwrap();
    assert_eq!(
        st.hook_calls, 2,
        "two hooks, once each, for the outer request"
    );
    assert_eq!(st.ooms, 2, "the inner and the outer request");
    tr.lock().unwrap().check();
    t.check_invariants(0).unwrap();
    // A second failing request calls each hook once more.
    assert!(t.allocate(0, 4 * MIB, S).is_err());
    assert_eq!(counts[0].load(Ordering::SeqCst), 2);
    assert_eq!(counts[1].load(Ordering::SeqCst), 2);
}

#[test]
fn a_request_larger_than_the_device_fails_at_once_and_calls_each_hook_once() {
    for backend in [Backend::Vmm, Backend::Legacy] {
        let (sim, t) = sim_alloc_backend(64 * MIB, backend);
        let mut tr = Tracker::default();
        // Some live and some cached memory, which the doomed request must not release.
        let keep = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
        let gone = alloc(&t, &mut tr, 8 * MIB, S).unwrap();
        free(&t, &mut tr, gone);
        let counts = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
        let args = shared(Vec::new());
        for c in &counts {
            let (c, args) = (c.clone(), args.clone());
            t.add_oom_hook(move |dev, req| {
                c.fetch_add(1, Ordering::SeqCst);
                args.lock().unwrap().push((dev, req));
            });
        }
        let before = t.stats(0).unwrap();
        let calls_before = sim.call_counts();
        for (i, (size, text)) in [
            (64 * MIB + 1, "64.00 MiB"),
            (128 * MIB, "128.00 MiB"),
            (100 * GIB + 300 * MIB, "100.29 GiB"),
        ]
        .into_iter()
        .enumerate()
        {
            let err = t.allocate(0, size, S).unwrap_err();
            assert!(err.is_out_of_memory(), "{err:?}");
            let msg = err.to_string();
            assert!(msg.starts_with("CUDA out of memory."), "{msg}");
            assert!(
                msg.contains(&format!("Tried to allocate {text} on device 0")),
                "{msg}"
            );
            assert!(msg.contains("Device capacity 64.00 MiB"), "{msg}");
            assert!(
                msg.contains("2 eviction hook(s) called, freeing 0 B."),
                "{msg}"
            );
            assert!(msg.contains("larger than the device"), "{msg}");
            let r = oom_report(&err);
            assert_eq!(r.requested, size);
            for c in &counts {
                assert_eq!(c.load(Ordering::SeqCst), i as u64 + 1, "{backend}");
            }
            tr.check();
            t.check_invariants(0).unwrap();
        }
        assert_eq!(
            *args.lock().unwrap(),
            vec![
                (0, 64 * MIB + 1),
                (0, 64 * MIB + 1),
                (0, 128 * MIB),
                (0, 128 * MIB),
                (0, 100 * GIB + 300 * MIB),
                (0, 100 * GIB + 300 * MIB),
            ]
        );
        // At once: no memory was asked for or given back.
        let after = t.stats(0).unwrap();
        assert_eq!(after.reserved_bytes, before.reserved_bytes, "{backend}");
        assert_eq!(after.cache_releases, before.cache_releases, "{backend}");
        assert_eq!(after.ooms, before.ooms + 3);
        assert_eq!(after.hook_calls, before.hook_calls + 6);
        let changed: Vec<_> = sim
            .call_counts()
            .into_iter()
            .filter(|c| !calls_before.contains(c) && c.0 != Call::MemInfo)
            .collect();
        assert!(changed.is_empty(), "{backend}: driver calls {changed:?}");
        free(&t, &mut tr, keep);
    }
}

#[test]
fn the_oom_message_names_every_figure() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let t = Arc::new(t);
    let tr = shared(Tracker::default());
    let add = |size| {
        let p = t.allocate(0, size, S).unwrap();
        tr.lock().unwrap().add(p, size);
        p
    };
    // 3 MiB (a 1 MiB free tail shares its second page), a small slot, and 8 MiB more that the
    // hook frees; another process holds 40 MiB: not enough for the request.
    let a = add(3 * MIB);
    let _small = add(4 * KIB);
    let victims = shared(vec![add(4 * MIB), add(4 * MIB)]);
    let (weak, tr2) = (Arc::downgrade(&t), tr.clone());
    t.add_oom_hook(move |dev, _| {
        let t = weak.upgrade().expect("allocator alive");
        for p in victims.lock().unwrap().drain(..) {
            hook_free(&t, &tr2, dev, p);
        }
    });
    sim.set_external_usage(0, 40 * MIB);
    let requested = 20 * MIB + 3;
    let err = t.allocate(0, requested, S).unwrap_err();
    let r = oom_report(&err).clone();
    let msg = err.to_string();
    let st = t.stats(0).unwrap();
    assert_eq!(r.device, 0);
    assert_eq!(r.requested, requested);
    assert_eq!(r.capacity, 64 * MIB);
    assert_eq!(r.limit, None);
    assert_eq!(r.allocated, st.allocated_bytes);
    assert_eq!(r.allocated, 3 * MIB + 4 * KIB);
    assert_eq!(r.reserved, st.reserved_bytes);
    assert_eq!(r.cached_free, r.reserved - r.allocated);
    assert_eq!(r.largest_free, st.largest_free_bytes);
    assert_eq!(r.stranded, st.stranded_bytes);
    assert_eq!(r.stranded, MIB + 2 * MIB - 4 * KIB);
    assert_eq!(r.hooks_called, 1);
    assert_eq!(r.hooks_freed, 8 * MIB);
    assert_eq!(
        r.device_free,
        Some(64 * MIB - 40 * MIB - sim.bytes_in_use(0))
    );
    for want in [
        "CUDA out of memory.".to_string(),
        format!("Tried to allocate {} on device 0", format_bytes(requested)),
        "Tried to allocate 20.00 MiB".to_string(),
        "Device capacity 64.00 MiB".to_string(),
        format!(
            "({} free on the device)",
            format_bytes(r.device_free.unwrap())
        ),
        "no tessera limit".to_string(),
        format!("tessera holds {} reserved", format_bytes(r.reserved)),
        format!("{} allocated", format_bytes(r.allocated)),
        format!("{} cached free", format_bytes(r.cached_free)),
        format!("largest free range {}", format_bytes(r.largest_free)),
        format!("{} stranded in partly used pages", format_bytes(r.stranded)),
        "1 eviction hook(s) called, freeing 8.00 MiB.".to_string(),
        "Hint: ".to_string(),
    ] {
        assert!(msg.contains(&want), "missing {want:?} in: {msg}");
    }
    assert_eq!(st.ooms, 1);
    assert_eq!(st.hook_calls, 1);
    tr.lock().unwrap().check();
    t.check_invariants(0).unwrap();
    let _ = a;
}

#[test]
fn hooks_get_the_device_that_failed() {
    let sim = Arc::new(SimDriver::new(SimConfig {
        devices: 2,
        capacity: 16 * MIB,
        ..SimConfig::default()
    }));
    let t = Tessera::new(
        sim.clone(),
        Config {
            check_invariants: true,
            ..Config::default()
        },
    )
    .unwrap();
    let args = shared(Vec::new());
    let a2 = args.clone();
    t.add_oom_hook(move |dev, req| a2.lock().unwrap().push((dev, req)));
    let p = t.allocate(1, 16 * MIB, S).unwrap();
    let err = t.allocate(1, 3 * MIB, S).unwrap_err();
    assert_eq!(oom_report(&err).device, 1);
    assert!(err.to_string().contains("on device 1"), "{err}");
    assert_eq!(*args.lock().unwrap(), vec![(1, 3 * MIB)]);
    assert_eq!(t.stats(1).unwrap().hook_calls, 1);
    assert_eq!(t.stats(0).unwrap().hook_calls, 0);
    t.free(1, p).unwrap();
    t.check_invariants(1).unwrap();
}

#[test]
fn removed_hooks_are_not_called() {
    let (_sim, t, _tr, _blocks) = full_device(Config::default());
    let counts = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let ids: Vec<_> = counts
        .iter()
        .map(|c| {
            let c = c.clone();
            t.add_oom_hook(move |_, _| {
                c.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    assert_ne!(ids[0], ids[1]);
    assert!(t.allocate(0, 2 * MIB, S).is_err());
    assert!(t.remove_oom_hook(ids[0]));
    assert!(!t.remove_oom_hook(ids[0]), "already removed");
    assert!(t.allocate(0, 2 * MIB, S).is_err());
    assert_eq!(counts[0].load(Ordering::SeqCst), 1);
    assert_eq!(counts[1].load(Ordering::SeqCst), 2);
    assert!(t.remove_oom_hook(ids[1]));
    let err = t.allocate(0, 2 * MIB, S).unwrap_err();
    assert_eq!(oom_report(&err).hooks_called, 0);
    assert_eq!(counts[1].load(Ordering::SeqCst), 2);
    assert_eq!(t.stats(0).unwrap().hook_calls, 3);
    assert_eq!(t.stats(0).unwrap().ooms, 3);
    // Each failed request released the cache and retried before calling the hooks.
    assert_eq!(t.stats(0).unwrap().alloc_retries, 3);
}

#[test]
fn removing_a_hook_waits_for_its_call_in_progress() {
    // A C caller frees a hook's `user` data right after removing it: the removal must not return
    // while the hook still runs.
    let (_sim, t, _tr, _blocks) = full_device(Config::default());
    let (started_tx, started_rx) = mpsc::channel::<()>();
    let started_tx = Mutex::new(started_tx);
    let removing = Arc::new(AtomicU64::new(0));
    let finished = Arc::new(AtomicU64::new(0));
    let (r2, f2) = (removing.clone(), finished.clone());
    let id = t.add_oom_hook(move |_, _| {
        let _ = started_tx.lock().unwrap().send(());
        while r2.load(Ordering::SeqCst) == 0 {
            std::thread::yield_now();
        }
        // Long enough that a removal which does not wait returns first.
        std::thread::sleep(Duration::from_millis(100));
        f2.store(1, Ordering::SeqCst);
    });
    let t2 = t.clone();
    let failing = std::thread::spawn(move || t2.allocate(0, 2 * MIB, S));
    started_rx.recv_timeout(Duration::from_secs(60)).unwrap();
    removing.store(1, Ordering::SeqCst);
    let t3 = t.clone();
    assert!(within(60, move || t3.remove_oom_hook(id)));
    assert_eq!(
        finished.load(Ordering::SeqCst),
        1,
        "remove_oom_hook returned while the hook was still running"
    );
    assert!(failing.join().unwrap().is_err());
    let err = t.allocate(0, 2 * MIB, S).unwrap_err();
    assert_eq!(oom_report(&err).hooks_called, 0, "never called again");
}

#[test]
fn a_hook_may_remove_itself() {
    let (_sim, t, _tr, _blocks) = full_device(Config::default());
    let weak: Arc<Mutex<Weak<Tessera>>> = shared(Weak::new());
    let me = Arc::new(AtomicU64::new(u64::MAX));
    let calls = Arc::new(AtomicU64::new(0));
    let (w2, m2, c2) = (weak.clone(), me.clone(), calls.clone());
    let id = t.add_oom_hook(move |_, _| {
        c2.fetch_add(1, Ordering::SeqCst);
        if let Some(t) = w2.lock().unwrap().upgrade() {
            assert!(t.remove_oom_hook(tessera::HookId(m2.load(Ordering::SeqCst))));
        }
    });
    me.store(id.0, Ordering::SeqCst);
    *weak.lock().unwrap() = Arc::downgrade(&t);
    let t2 = t.clone();
    assert!(within(60, move || t2.allocate(0, 2 * MIB, S)).is_err());
    assert!(t.allocate(0, 2 * MIB, S).is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panicking_hook_leaves_the_allocator_usable() {
    let (_sim, t, tr, blocks) = full_device(Config::default());
    let armed = Arc::new(AtomicU64::new(1));
    let a2 = armed.clone();
    let calls = Arc::new(AtomicU64::new(0));
    let c2 = calls.clone();
    t.add_oom_hook(move |_, _| {
        c2.fetch_add(1, Ordering::SeqCst);
        if a2.swap(0, Ordering::SeqCst) == 1 {
            panic!("hook panics on purpose");
        }
    });
    let t2 = t.clone();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| t2.allocate(0, 2 * MIB, S)));
    assert!(r.is_err(), "the hook's panic reaches the caller");
    // No lock is left held, and this thread is not stuck "inside a hook".
    let t3 = t.clone();
    let err = within(60, move || {
        t3.check_invariants(0).unwrap();
        t3.allocate(0, 2 * MIB, S)
    })
    .unwrap_err();
    assert_eq!(oom_report(&err).hooks_called, 1);
    let err = t.allocate(0, 2 * MIB, S).unwrap_err();
    assert_eq!(oom_report(&err).hooks_called, 1, "same thread as the panic");
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    let mut tr = tr.lock().unwrap();
    tr.remove(blocks[3]);
    t.free(0, blocks[3]).unwrap();
    let p = t.allocate(0, 2 * MIB, S).unwrap();
    tr.add(p, 2 * MIB);
    tr.check();
    t.check_invariants(0).unwrap();
}

#[test]
fn dropping_the_allocator_gives_everything_back() {
    // Hooks that hold a `Weak` do not keep the allocator alive; dropping the last `Arc` gives
    // every page back to the device.
    let (sim, t, tr, _blocks) = full_device(Config::default());
    let weak: Weak<Tessera> = Arc::downgrade(&t);
    let w2 = weak.clone();
    t.add_oom_hook(move |_, _| {
        let _ = w2.upgrade();
    });
    drop(tr);
    drop(t);
    assert!(weak.upgrade().is_none());
    assert_eq!(sim.bytes_in_use(0), 0, "teardown gave everything back");
    assert_eq!(sim.live_mappings(0), 0);
}
