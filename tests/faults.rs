//! Driver faults over a set of scenarios: every kind of driver call a scenario makes fails at
//! every one of its occurrences (once with out of memory, once with another error), and every
//! call also fails at random. Whatever fails, the allocator stays consistent: each operation
//! succeeds or returns an error (an OOM, or the injected driver error: never a panic, never
//! another error), a failure other than "out of memory" is reported by some operation or counted
//! in the stats, one fault fails at most one operation, `check_invariants` holds after each
//! operation on every device, live data is intact (patterns, and buffers' contents), and once
//! the faults stop, freeing everything and emptying the cache gives each device all its memory
//! back, after which the whole device can be allocated again.
//!
//! The scenarios (each on both backends):
//! - `basic`: small and large allocations and frees, a free held back by another stream, a remap
//!   under a tight capacity, requests that fail, `trim` and `empty_cache`;
//! - `oom-hooks`: a full device whose request goes through the OOM sequence, where an eviction
//!   hook frees enough (after two hooks that do not help: one does nothing, one asks for the same
//!   memory again), and a second request that nothing helps;
//! - `two-devices`: allocations on two devices, freed by device and by pointer alone, and typed
//!   buffers ([`DeviceBuffer`]) whose uploads, read-backs, overwrites and zeroing go through the
//!   driver's copy and memset calls.
//!
//! Run with `--nocapture` to see the counts (scenarios, call kinds, cases).

mod common;
use common::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, MutexGuard};
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::{Call, CudaError, DevicePtr, Driver, DriverError, Stream};
use tessera::{Backend, Config, DeviceBuffer, Error, Tessera};

const KIB: u64 = 1 << 10;
const S0: Stream = Stream::DEFAULT;
const S1: Stream = Stream(1);

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Slot, bytes, stream, on device 0.
    Alloc(usize, u64, Stream),
    /// Device, slot, bytes, stream.
    AllocOn(usize, usize, u64, Stream),
    Free(usize),
    /// Frees by pointer alone (`free_any`).
    FreeAny(usize),
    Record(usize, Stream),
    /// Device, stream.
    Hold(usize, Stream),
    Release(usize, Stream),
    /// On device 0.
    EmptyCache,
    Trim,
    EmptyCacheAll,
    /// Device, slot, elements, stream: a buffer of `u64`s made from the slot number, copied in.
    Upload(usize, usize, usize, Stream),
    /// As `Upload`, zeroed by a memset.
    Zeroed(usize, usize, usize, Stream),
    /// Reads a buffer back and compares.
    Download(usize),
    /// Copies new values into a buffer.
    Overwrite(usize),
    /// The eviction hook may free this slot.
    Evictable(usize),
}

use Op::*;

const SLOTS: usize = 16;

/// Small and large allocations and frees, a free held back by another stream, remapping under a
/// tight capacity (24 MiB, 12 pages), two requests that fail, trim and empty_cache.
const BASIC: &[Op] = &[
    Alloc(0, 4 * KIB, S0),
    Alloc(1, 100 * KIB, S0),
    Alloc(2, MIB, S0),
    Alloc(3, 4 * MIB, S0),
    Alloc(4, 4 * MIB, S0),
    Alloc(5, 4 * MIB, S0),
    Alloc(6, 4 * MIB, S0),
    Free(4),
    Free(6),
    // Another stream takes a block freed on S0 once S0's work is done.
    Alloc(7, 3 * MIB, S1),
    Hold(0, S1),
    Record(3, S1),
    Free(3),
    // 8 pages: new pages up to the capacity (2), then pages unmapped from free blocks (slot 6's,
    // and slot 3's once S1 is waited for): 6 in all, so it fails after trying, and the pages
    // gathered go back.
    Alloc(8, 14 * MIB + 512, S0),
    Release(0, S1),
    Free(1),
    // 3 pages: new ones, and slot 3's once S1 let go.
    Alloc(9, 6 * MIB, S1),
    Trim,
    Free(7),
    Free(2),
    // A granule for S1, taken from the pages slot 7 freed.
    Alloc(10, 4 * KIB, S1),
    Alloc(11, 200 * KIB, S1),
    EmptyCache,
    // 6 pages: the device has 5 free, and every cached free byte sits in a page with live data:
    // an OOM.
    Alloc(12, 12 * MIB, S0),
    Free(5),
    Free(10),
    Alloc(13, 5 * MIB, S1),
    Free(8),
    Free(11),
    EmptyCache,
    Alloc(14, 2 * MIB, S0),
    Free(0),
    Free(12),
    Trim,
    Free(13),
    Free(14),
    EmptyCache,
];

/// The step of `OOM_HOOKS` that only the eviction hook lets succeed, and the one nothing helps.
const HOOK_HELPS: usize = 8;
const NOTHING_HELPS: usize = 9;

/// A device filled with 4 MiB blocks and a granule; a 4 MiB request on another stream goes
/// through the OOM sequence: two hooks that do not help, then one that frees two blocks, whose
/// memory serves it. Then 10 MiB, which nothing can free. Then a free held back by a held
/// stream, requests served once memory is back (by remapping, or a new segment after the cache
/// is released), trim and empty_cache.
const OOM_HOOKS: &[Op] = &[
    Alloc(0, 4 * MIB, S0),
    Alloc(1, 4 * MIB, S0),
    Alloc(2, 4 * MIB, S0),
    Alloc(3, 4 * MIB, S0),
    Alloc(4, 4 * MIB, S0),
    Alloc(5, 100 * KIB, S0),
    // 22 of 24 MiB in use.
    Evictable(1),
    Evictable(3),
    Alloc(6, 4 * MIB, S1),  // HOOK_HELPS
    Alloc(7, 10 * MIB, S0), // NOTHING_HELPS
    Hold(0, S1),
    Record(0, S1),
    Free(0),
    Alloc(8, 6 * MIB, S0),
    Release(0, S1),
    Alloc(9, 4 * MIB, S1),
    Trim,
    Free(2),
    Free(5),
    Alloc(10, 8 * KIB, S1),
    Free(4),
    Free(6),
    Alloc(11, 12 * MIB, S0),
    EmptyCache,
    Free(8),
    Free(9),
    Free(10),
    Free(11),
    EmptyCache,
];

/// Two devices of 12 MiB (6 pages): raw allocations freed by device and by pointer alone, and
/// typed buffers uploaded, zeroed, read back and overwritten (copy and memset calls); a request
/// on device 1 served by remapping (VMM) or a new segment once the cache is released (legacy),
/// one on device 0 that needs a free held back by a held stream, `empty_cache` on every device.
const TWO_DEVICES: &[Op] = &[
    AllocOn(0, 0, 4 * KIB, S0),
    Upload(1, 1, 64 * 1024, S0),
    Zeroed(0, 2, 3 * 64 * 1024, S0),
    Upload(1, 3, 5 * 64 * 1024, S1),
    AllocOn(1, 4, 3 * MIB, S0),
    AllocOn(1, 5, 2 * MIB, S0),
    // Device 1 is full.
    Download(1),
    Download(3),
    Overwrite(2),
    Free(3),
    Free(5),
    Upload(1, 6, 5 * 128 * 1024, S0),
    FreeAny(4),
    Download(2),
    Hold(0, S1),
    Record(2, S1),
    Free(2),
    // Device 0 has room for all but slot 2's page, which S1 holds back.
    AllocOn(0, 7, 10 * MIB, S0),
    Release(0, S1),
    Zeroed(0, 8, 8 * 1024, S0),
    Overwrite(6),
    Download(6),
    EmptyCacheAll,
    FreeAny(0),
    Free(1),
    Free(6),
    Download(8),
    Free(7),
    Free(8),
    EmptyCacheAll,
];

/// One scenario: its operations, its machine, what it must exercise.
struct Scenario {
    name: &'static str,
    ops: &'static [Op],
    devices: usize,
    /// Bytes per device.
    capacity: u64,
    /// Registers the three eviction hooks.
    hooks: bool,
    /// Call kinds the scenario must make (besides those it happens to make).
    needs: &'static [Call],
    /// Checks of the fault-free run.
    clean: fn(&Outcome),
}

const VMM_CALLS: &[Call] = &[
    Call::CreatePhysical,
    Call::Map,
    Call::SetAccess,
    Call::Unmap,
    Call::ReleasePhysical,
    Call::Reserve,
    Call::EventCreate,
    Call::EventRecord,
    Call::EventQuery,
    Call::EventSynchronize,
];
const LEGACY_CALLS: &[Call] = &[
    Call::AllocLegacy,
    Call::FreeLegacy,
    Call::EventCreate,
    Call::EventRecord,
    Call::EventQuery,
    Call::EventSynchronize,
];
const BUFFER_CALLS: &[Call] = &[Call::CopyToDevice, Call::CopyFromDevice, Call::Memset];

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "basic",
            ops: BASIC,
            devices: 1,
            capacity: 24 * MIB,
            hooks: false,
            needs: &[],
            clean: |out| {
                let failed: Vec<usize> = out.errors.iter().map(|e| e.0).collect();
                assert_eq!(failed, [13, 23], "basic: {out:?}");
            },
        },
        Scenario {
            name: "oom-hooks",
            ops: OOM_HOOKS,
            devices: 1,
            capacity: 24 * MIB,
            hooks: true,
            needs: &[],
            clean: |out| {
                let failed: Vec<usize> = out.errors.iter().map(|e| e.0).collect();
                assert_eq!(failed, [NOTHING_HELPS], "oom-hooks: {out:?}");
                assert!(!failed.contains(&HOOK_HELPS));
                let (_, e) = &out.errors[0];
                assert!(
                    e.contains("3 eviction hook(s) called, freeing 0 B"),
                    "oom-hooks: {e}"
                );
                assert_eq!(out.evicted, 2, "the hook freed both evictable blocks");
                // Two requests that went through the OOM sequence, and the request of the hook
                // that asks again, each time.
                assert_eq!(out.hook_calls, 6, "{out:?}");
                assert_eq!(out.useless_calls, 2);
            },
        },
        Scenario {
            name: "two-devices",
            ops: TWO_DEVICES,
            devices: 2,
            capacity: 12 * MIB,
            hooks: false,
            needs: BUFFER_CALLS,
            clean: |out| assert!(out.errors.is_empty(), "two-devices: {out:?}"),
        },
    ]
}

/// A live slot: a raw allocation (patterned by the tracker) or a buffer (`data` is what it
/// holds).
#[derive(Clone, Debug)]
struct Slot {
    dev: usize,
    ptr: DevicePtr,
    stream: Stream,
    data: Option<Vec<u64>>,
}

/// What is live, shared with the eviction hook.
#[derive(Default)]
struct Live {
    tr: Tracker,
    slots: Vec<Option<Slot>>,
    evictable: Vec<usize>,
    evicted: usize,
    useless_calls: u64,
    /// Errors of the request made inside a hook (reported after the step).
    hook_errors: Vec<Error>,
}

impl Live {
    fn new() -> Live {
        Live {
            // One word every 64 KiB: this file runs each scenario hundreds of times.
            tr: Tracker::sparse(),
            slots: vec![None; SLOTS],
            ..Live::default()
        }
    }

    /// Untracks slot `i` (checking its contents) and returns it, if live.
    fn take(&mut self, i: usize) -> Option<Slot> {
        let slot = self.slots[i].take()?;
        match &slot.data {
            None => {
                self.tr.remove(slot.ptr);
            }
            Some(d) => check_buffer(&slot, d),
        }
        Some(slot)
    }

    fn check(&self) {
        self.tr.check();
        for s in self.slots.iter().flatten() {
            if let Some(d) = &s.data {
                check_buffer(s, d);
            }
        }
    }

    fn on(&self, dev: usize) -> u64 {
        self.slots.iter().flatten().filter(|s| s.dev == dev).count() as u64
    }
}

/// Checks one element in 64 (one every 512 B) and the last.
fn check_buffer(s: &Slot, data: &[u64]) {
    let last = data.len().saturating_sub(1);
    for i in (0..data.len()).step_by(64).chain([last]) {
        let want = data[i];
        // SAFETY: `s.ptr` is a live simulated-device allocation of `data.len()` u64s, mapped
        // read/write in this process (real backing), 8-aligned.
        let got = unsafe { (s.ptr as *const u64).add(i).read() };
        assert_eq!(got, want, "buffer {:#x} corrupted at element {i}", s.ptr);
    }
}

fn values(seed: u64, n: usize) -> Vec<u64> {
    (0..n as u64)
        .map(|i| seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ i)
        .collect()
}

fn lock(l: &Mutex<Live>) -> MutexGuard<'_, Live> {
    l.lock().unwrap()
}

/// The hooks, in the order they are called: one that does nothing, one that asks for the same
/// memory again (an allocation inside a hook gets no hooks; it fails while the device is full),
/// and one that frees the evictable slots.
fn add_hooks(t: &Arc<Tessera>, live: &Arc<Mutex<Live>>) {
    t.add_oom_hook(|_, _| {});
    let (w, l) = (Arc::downgrade(t), live.clone());
    t.add_oom_hook(move |dev, requested| {
        lock(&l).useless_calls += 1;
        let t = w
            .upgrade()
            .expect("the allocator calls its hooks while alive");
        match t.allocate(dev, requested, S0) {
            Ok(p) => t.free(dev, p).unwrap(),
            Err(e) => lock(&l).hook_errors.push(e),
        }
    });
    let (w, l) = (Arc::downgrade(t), live.clone());
    t.add_oom_hook(move |_, _| {
        let t = w
            .upgrade()
            .expect("the allocator calls its hooks while alive");
        let mut l = lock(&l);
        for i in std::mem::take(&mut l.evictable) {
            if let Some(s) = l.take(i) {
                t.free(s.dev, s.ptr)
                    .expect("the hook frees a live allocation");
                l.evicted += 1;
            }
        }
    });
}

fn setup(backend: Backend, sc: &Scenario) -> (Arc<SimDriver>, Arc<Tessera>, Arc<Mutex<Live>>) {
    let (devices, capacity) = (sc.devices, sc.capacity);
    let (sim, t) = sim_alloc_with(
        SimConfig {
            capacity,
            devices,
            ..SimConfig::default()
        },
        Config {
            backend,
            ..Config::default()
        },
    );
    let t = Arc::new(t);
    // Set the devices up before any fault is armed.
    for d in 0..devices {
        t.stats(d).unwrap();
    }
    let live = Arc::new(Mutex::new(Live::new()));
    if sc.hooks {
        add_hooks(&t, &live);
    }
    (sim, t, live)
}

/// What one run of a scenario saw.
#[derive(Debug, Default)]
struct Outcome {
    /// (step, error) of every operation that failed.
    errors: Vec<(usize, String)>,
    /// Operations that failed with a driver error (not an OOM).
    driver_errors: usize,
    /// Driver calls made by the operations (the clean-up after them not included).
    calls: Vec<(Call, u64)>,
    /// The last driver error that did not fail an operation (stats), if any, per device.
    counted: Vec<String>,
    /// The OOM errors of requests made inside hooks.
    in_hooks: Vec<String>,
    evicted: usize,
    useless_calls: u64,
    hook_calls: u64,
}

/// Runs one operation.
fn apply(
    sim: &SimDriver,
    t: &Tessera,
    live: &Mutex<Live>,
    held: &mut Vec<(usize, Stream)>,
    op: Op,
) -> tessera::Result<()> {
    let put = |i: usize, slot: Slot, size: u64| {
        let mut l = lock(live);
        if slot.data.is_none() {
            l.tr.add(slot.ptr, size);
        }
        l.slots[i] = Some(slot);
    };
    let slot = |i: usize| lock(live).slots[i].clone();
    // A slot still live when the scenario fills it again (a request that failed in the fault-
    // free run succeeded this time, and the scenario is repeated) is freed first.
    if let Alloc(i, ..) | AllocOn(_, i, ..) | Upload(_, i, ..) | Zeroed(_, i, ..) = op {
        let s = lock(live).take(i);
        if let Some(s) = s {
            t.free(s.dev, s.ptr).expect("free of a live pointer");
        }
    }
    // No lock of ours is held while allocating: the hooks take it.
    match op {
        Alloc(i, size, stream) | AllocOn(_, i, size, stream) => {
            let dev = if let AllocOn(d, ..) = op { d } else { 0 };
            let ptr = t.allocate(dev, size, stream)?;
            let slot = Slot {
                dev,
                ptr,
                stream,
                data: None,
            };
            put(i, slot, size);
        }
        Free(i) | FreeAny(i) => {
            let s = lock(live).take(i);
            if let Some(s) = s {
                let r = if let FreeAny(_) = op {
                    t.free_any(s.ptr)
                } else {
                    t.free(s.dev, s.ptr)
                };
                r.unwrap_or_else(|e| panic!("free of a live pointer: {e}"));
            }
        }
        Record(i, stream) => {
            if let Some(s) = slot(i) {
                t.record_stream(s.ptr, stream)?;
            }
        }
        Hold(d, s) => {
            sim.hold_stream(d, s);
            held.push((d, s));
        }
        Release(d, s) => {
            sim.release_stream(d, s);
            held.retain(|&h| h != (d, s));
        }
        EmptyCache => {
            t.empty_cache(0)?;
        }
        Trim => {
            t.trim(0)?;
        }
        EmptyCacheAll => {
            t.empty_cache_all()?;
        }
        Upload(dev, i, n, stream) | Zeroed(dev, i, n, stream) => {
            let (buf, data) = if let Upload(..) = op {
                let data = values(i as u64, n);
                (DeviceBuffer::from_slice(t, dev, &data, stream)?, data)
            } else {
                (DeviceBuffer::<u64>::zeroed(t, dev, n, stream)?, vec![0; n])
            };
            let ptr = buf.into_raw();
            let slot = Slot {
                dev,
                ptr,
                stream,
                data: Some(data),
            };
            put(i, slot, 0);
        }
        Download(i) | Overwrite(i) => {
            let Some(s) = slot(i) else { return Ok(()) };
            let data = s.data.as_ref().expect("a buffer");
            // SAFETY: the slot's allocation holds `data.len()` u64s on `s.dev`, used on
            // `s.stream`; the buffer is given back with `into_raw` below, never freed here.
            let mut buf =
                unsafe { DeviceBuffer::<u64>::from_raw(t, s.dev, s.ptr, data.len(), s.stream) };
            let r = if let Download(_) = op {
                buf.to_vec().map(|v| assert_eq!(&v, data, "read back"))
            } else {
                let new = values(s.ptr ^ data.first().copied().unwrap_or(0), data.len());
                buf.copy_from_slice(&new).map(|()| {
                    lock(live).slots[i].as_mut().expect("live").data = Some(new);
                })
            };
            buf.into_raw();
            r?;
        }
        Evictable(i) => lock(live).evictable.push(i),
    }
    Ok(())
}

/// Records the result of step `step`: an OOM or an allowed driver error, or a panic.
fn note(
    out: &mut Outcome,
    step: usize,
    op: Op,
    r: tessera::Result<()>,
    allowed: &dyn Fn(&DriverError) -> bool,
) {
    match r {
        Ok(()) => {}
        Err(Error::OutOfMemory(r)) => out.errors.push((step, format!("OOM: {r}"))),
        Err(Error::Driver(e)) => {
            assert!(
                allowed(&e),
                "step {step} ({op:?}): unexpected driver error {e}"
            );
            out.driver_errors += 1;
            out.errors.push((step, e.to_string()));
        }
        Err(e) => panic!("step {step} ({op:?}): unexpected error {e:?}"),
    }
}

/// Runs `ops` with the checks after each; `allowed` says which driver errors may surface.
fn run(
    sim: &SimDriver,
    t: &Tessera,
    live: &Mutex<Live>,
    sc: &Scenario,
    ops: &[Op],
    allowed: &dyn Fn(&DriverError) -> bool,
) -> Outcome {
    let devices = sc.devices;
    let mut held = Vec::new();
    let mut out = Outcome::default();
    for (step, &op) in ops.iter().enumerate() {
        let r = apply(sim, t, live, &mut held, op);
        note(&mut out, step, op, r, allowed);
        // The hook's own failed request: its OOM (whose report may name a driver error met on
        // the way) is what that hook saw, not a failed operation.
        for e in std::mem::take(&mut lock(live).hook_errors) {
            match e {
                Error::OutOfMemory(r) => out.in_hooks.push(r.to_string()),
                e => note(&mut out, step, op, Err(e), allowed),
            }
        }
        let l = lock(live);
        l.check();
        for d in 0..devices {
            if let Err(e) = t.check_invariants(d) {
                panic!("step {step} ({op:?}): invariant broken on device {d}: {e}");
            }
            let st = t.stats(d).unwrap();
            assert_eq!(st.active_blocks, l.on(d), "step {step}, device {d}");
            assert_eq!(sim.bytes_in_use(d), st.reserved_bytes, "step {step}");
        }
    }
    out.calls = sim.call_counts();
    for d in 0..devices {
        let st = t.stats(d).unwrap();
        out.counted.extend(st.last_driver_error);
        out.hook_calls += st.hook_calls;
    }
    {
        let l = lock(live);
        out.evicted = l.evicted;
        out.useless_calls = l.useless_calls;
    }
    // Faults off: everything goes back, and then each whole device can be had again.
    sim.clear_faults();
    for (d, s) in held {
        sim.release_stream(d, s);
    }
    let slots: Vec<Slot> = {
        let mut l = lock(live);
        (0..SLOTS).filter_map(|i| l.take(i)).collect()
    };
    for s in slots {
        t.free(s.dev, s.ptr).unwrap();
    }
    for d in 0..devices {
        t.empty_cache(d).expect("empty_cache with no faults");
        t.check_invariants(d).unwrap();
        let st = t.stats(d).unwrap();
        assert_eq!(st.allocated_bytes, 0);
        assert_eq!(st.reserved_bytes, 0, "{st:?}");
        assert_eq!(sim.bytes_in_use(d), 0, "leaked device memory on device {d}");
        assert_eq!(sim.live_mappings(d), 0, "leaked mappings");
        assert_eq!(sim.live_handles(d), 0, "leaked physical handles");
        assert_eq!(sim.live_legacy(d), 0, "leaked legacy segments");
        for size in [sc.capacity, 4 * KIB] {
            let p = t
                .allocate(d, size, S0)
                .unwrap_or_else(|e| panic!("device {d} after the faults: {e}"));
            let mut tr = Tracker::sparse();
            tr.add(p, size);
            tr.remove(p);
            t.free(d, p).unwrap();
        }
        t.empty_cache(d).unwrap();
        t.check_invariants(d).unwrap();
        assert_eq!(sim.bytes_in_use(d), 0);
    }
    out
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Scenario rows done: (scenario, backend, call kinds, cases), printed as a table once all are.
static DONE: Mutex<Vec<(String, usize, usize)>> = Mutex::new(Vec::new());

/// Every call kind the scenario makes failing at each of its occurrences, with its default
/// error and with the other kind (out of memory for calls that normally fail otherwise, and vice
/// versa).
fn every_fault_at_every_point(name: &str, backend: Backend) {
    let sc = scenarios().into_iter().find(|s| s.name == name).unwrap();
    // Count the calls of a fault-free run.
    let (sim, t, live) = setup(backend, &sc);
    sim.reset_counters();
    let clean = run(&sim, &t, &live, &sc, sc.ops, &|_| false);
    let made = |out: &Outcome, c: Call| out.calls.iter().find(|x| x.0 == c).map_or(0, |x| x.1);
    let base = if backend == Backend::Vmm {
        VMM_CALLS
    } else {
        LEGACY_CALLS
    };
    for &c in base.iter().chain(sc.needs) {
        assert!(
            made(&clean, c) > 0,
            "{name}, {backend}: the scenario never calls {c}"
        );
    }
    let counts = clean.calls.clone();
    assert!(
        clean.errors.iter().all(|(_, e)| e.starts_with("OOM")),
        "{clean:?}"
    );
    (sc.clean)(&clean);
    drop((t, live));
    let occurrences: u64 = counts.iter().map(|c| c.1).sum();
    eprintln!("{name}, {backend}: calls in the scenario: {counts:?}");

    let mut failures = Vec::new();
    let mut cases = 0;
    for &(call, count) in &counts {
        let oom_default = matches!(
            call,
            Call::CreatePhysical | Call::AllocLegacy | Call::Reserve
        );
        for error in [CudaError::OutOfMemory, CudaError::Unknown] {
            for n in 1..=count {
                cases += 1;
                let r = catch_unwind(AssertUnwindSafe(|| {
                    let (sim, t, live) = setup(backend, &sc);
                    sim.reset_counters();
                    if (error == CudaError::OutOfMemory) == oom_default {
                        sim.fail_nth(call, n);
                    } else {
                        sim.fail_nth_with(call, n, error);
                    }
                    let out = run(&sim, &t, &live, &sc, sc.ops, &|e| {
                        e.call == call
                            && e.error == error
                            && e.detail.as_deref() == Some("injected fault")
                    });
                    assert!(made(&out, call) >= n, "the fault was reached");
                    assert!(out.driver_errors <= 1, "one fault, one failure: {out:?}");
                    out
                }));
                match r {
                    Ok(out) => {
                        // A failure other than "out of memory" is never swallowed: some
                        // operation reports it, naming the call, or (when the operation did not
                        // need what the call was for) the stats count it.
                        let named = out
                            .errors
                            .iter()
                            .map(|e| &e.1)
                            .chain(&out.counted)
                            .chain(&out.in_hooks)
                            .any(|e| e.contains(call.cuda_name()));
                        if error != CudaError::OutOfMemory && !named {
                            failures.push(format!(
                                "{name}, {backend}: {call} failing ({}) at call {n} of {count}: \
                                 no operation reported it: {:?}",
                                error.name(),
                                out.errors
                            ));
                        }
                    }
                    Err(p) => failures.push(format!(
                        "{name}, {backend}: {call} failing ({}) at call {n} of {count}: {}",
                        error.name(),
                        panic_text(&*p)
                    )),
                }
            }
        }
    }
    eprintln!(
        "{name}, {backend}: {} call kinds, {occurrences} occurrences, {cases} cases",
        counts.len()
    );
    let mut done = DONE.lock().unwrap();
    done.push((format!("{name}, {backend}"), counts.len(), cases));
    if done.len() == 2 * scenarios().len() {
        let cases: usize = done.iter().map(|d| d.2).sum();
        eprintln!(
            "fault matrix: {} scenarios on 2 backends ({} runs), {} (scenario, call kind) pairs, \
             {cases} cases",
            scenarios().len(),
            done.len(),
            done.iter().map(|d| d.1).sum::<usize>()
        );
    }
    drop(done);
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn vmm_basic_every_driver_call_failing_at_every_point() {
    every_fault_at_every_point("basic", Backend::Vmm);
}

#[test]
fn legacy_basic_every_driver_call_failing_at_every_point() {
    every_fault_at_every_point("basic", Backend::Legacy);
}

#[test]
fn vmm_oom_hooks_every_driver_call_failing_at_every_point() {
    every_fault_at_every_point("oom-hooks", Backend::Vmm);
}

#[test]
fn legacy_oom_hooks_every_driver_call_failing_at_every_point() {
    every_fault_at_every_point("oom-hooks", Backend::Legacy);
}

#[test]
fn vmm_two_devices_every_driver_call_failing_at_every_point() {
    every_fault_at_every_point("two-devices", Backend::Vmm);
}

#[test]
fn legacy_two_devices_every_driver_call_failing_at_every_point() {
    every_fault_at_every_point("two-devices", Backend::Legacy);
}

/// Each scenario three times over with every call failing with probability 5 %, for a few
/// seeds and both backends.
#[test]
fn every_driver_call_failing_at_random() {
    let mut failures = Vec::new();
    for sc in scenarios() {
        for backend in [Backend::Vmm, Backend::Legacy] {
            for seed in 0..4u64 {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    let (sim, t, live) = setup(backend, &sc);
                    sim.fail_with_probability(None, 0.05, seed);
                    let ops: Vec<Op> = sc.ops.iter().chain(sc.ops).chain(sc.ops).copied().collect();
                    run(&sim, &t, &live, &sc, &ops, &|e| {
                        e.detail.as_deref() == Some("injected fault")
                    })
                }));
                if let Err(p) = r {
                    failures.push(format!(
                        "{}, {backend}, seed {seed}: {}",
                        sc.name,
                        panic_text(&*p)
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The OOM report asks the driver what is free on the device; when that query fails, the report
/// must not state a figure it does not have (it once said "0 B free on the device", and the
/// hint could blame other processes), and the failure is reported and counted.
#[test]
fn a_failed_mem_info_in_an_oom_report_is_reported() {
    let (sim, t) = sim_alloc_backend(8 * MIB, Backend::Vmm);
    t.stats(0).unwrap();
    // Larger than the device: fails at once, building the report (one cuMemGetInfo).
    sim.fail_nth(Call::MemInfo, 1);
    let err = t.allocate(0, 16 * MIB, S0).unwrap_err();
    assert!(err.is_out_of_memory(), "{err:?}");
    let text = err.to_string();
    assert!(!text.contains("(0 B free on the device)"), "{text}");
    assert!(text.contains("(free memory unknown)"), "{text}");
    assert!(text.contains("cuMemGetInfo"), "{text}");
    let Error::OutOfMemory(r) = &err else {
        unreachable!()
    };
    assert_eq!(r.device_free, None);
    let st = t.stats(0).unwrap();
    assert_eq!(st.driver_errors, 1, "{st:?}");
    assert!(
        st.last_driver_error
            .as_deref()
            .is_some_and(|e| e.contains("cuMemGetInfo")),
        "{st:?}"
    );
    t.check_invariants(0).unwrap();
}
