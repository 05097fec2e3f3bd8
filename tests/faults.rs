//! Driver faults: every driver call the allocator makes, failing at every point of a fixed
//! scenario (and every call failing at random), leaves the allocator consistent: each operation
//! succeeds or returns an error (never panics), `check_invariants` holds after each one, live
//! data is intact, and once the faults stop, freeing everything and emptying the cache gives the
//! device back all its memory.

mod common;
use common::*;
use std::panic::{catch_unwind, AssertUnwindSafe};
use tessera::driver::sim::SimDriver;
use tessera::driver::{Call, CudaError, DevicePtr, Driver, Stream};
use tessera::{Backend, Error, Tessera};

const KIB: u64 = 1 << 10;
const S0: Stream = Stream::DEFAULT;
const S1: Stream = Stream(1);
const CAPACITY: u64 = 24 * MIB;

#[derive(Clone, Copy, Debug)]
enum Op {
    Alloc(usize, u64, Stream),
    Free(usize),
    Record(usize, Stream),
    Hold(Stream),
    Release(Stream),
    EmptyCache,
    Trim,
}

use Op::*;

/// Small and large allocations and frees, a free held back by another stream, a remap under a
/// tight capacity (24 MiB, 12 pages), requests that fail, trim and empty_cache.
const SCENARIO: &[Op] = &[
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
    Hold(S1),
    Record(3, S1),
    Free(3),
    // 7 pages: new pages up to the capacity, then pages unmapped from free blocks, after
    // waiting for S1 to let go of slot 3's.
    Alloc(8, 14 * MIB + 512, S0),
    Release(S1),
    Free(1),
    // Nothing left to gather: an OOM.
    Alloc(9, 6 * MIB, S1),
    Trim,
    Free(7),
    Free(2),
    // A granule for S1, taken from the pages slot 7 freed.
    Alloc(10, 4 * KIB, S1),
    Alloc(11, 200 * KIB, S1),
    EmptyCache,
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

const SLOTS: usize = 15;

/// The calls each backend makes in the scenario.
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

fn setup(backend: Backend) -> (std::sync::Arc<SimDriver>, Tessera) {
    let (sim, t) = sim_alloc_backend(CAPACITY, backend);
    // Set the device up before any fault is armed.
    t.stats(0).unwrap();
    (sim, t)
}

/// What one run of the scenario saw.
#[derive(Debug, Default)]
struct Outcome {
    /// (step, error) of every operation that failed.
    errors: Vec<(usize, String)>,
    succeeded: usize,
    /// Driver calls made by the operations (the clean-up after them not included).
    calls: Vec<(Call, u64)>,
    /// The last driver error that did not fail an operation (stats), if any.
    counted: Option<String>,
}

/// Runs `ops` with the checks after each; `allowed` says which driver errors may surface.
fn run(
    sim: &SimDriver,
    t: &Tessera,
    ops: &[Op],
    allowed: &dyn Fn(&tessera::driver::DriverError) -> bool,
) -> Outcome {
    let mut tr = Tracker::default();
    let mut slots: [Option<DevicePtr>; SLOTS] = [None; SLOTS];
    let mut held = Vec::new();
    let mut out = Outcome::default();
    for (step, &op) in ops.iter().enumerate() {
        let r: tessera::Result<()> = match op {
            Alloc(i, size, stream) => t.allocate(0, size, stream).map(|p| {
                tr.add(p, size);
                slots[i] = Some(p);
            }),
            Free(i) => {
                if let Some(p) = slots[i].take() {
                    tr.remove(p);
                    t.free(0, p)
                        .unwrap_or_else(|e| panic!("step {step}: free of a live pointer: {e}"));
                }
                Ok(())
            }
            Record(i, stream) => match slots[i] {
                Some(p) => t.record_stream(p, stream),
                None => Ok(()),
            },
            Hold(s) => {
                sim.hold_stream(0, s);
                held.push(s);
                Ok(())
            }
            Release(s) => {
                sim.release_stream(0, s);
                held.retain(|&h| h != s);
                Ok(())
            }
            EmptyCache => t.empty_cache(0).map(|_| ()),
            Trim => t.trim(0).map(|_| ()),
        };
        match r {
            Ok(()) => out.succeeded += 1,
            Err(Error::OutOfMemory(r)) => {
                out.errors.push((step, format!("OOM: {r}")));
            }
            Err(Error::Driver(e)) => {
                assert!(
                    allowed(&e),
                    "step {step} ({op:?}): unexpected driver error {e}"
                );
                out.errors.push((step, e.to_string()));
            }
            Err(e) => panic!("step {step} ({op:?}): unexpected error {e:?}"),
        }
        tr.check();
        if let Err(e) = t.check_invariants(0) {
            panic!("step {step} ({op:?}): invariant broken: {e}");
        }
        let st = t.stats(0).unwrap();
        assert_eq!(st.active_blocks, tr.len() as u64, "step {step}");
    }
    out.calls = sim.call_counts();
    out.counted = t.stats(0).unwrap().last_driver_error;
    // Faults off: everything goes back.
    sim.clear_faults();
    for s in held {
        sim.release_stream(0, s);
    }
    for p in tr.ptrs() {
        tr.remove(p);
        t.free(0, p).unwrap();
    }
    t.empty_cache(0).expect("empty_cache with no faults");
    t.check_invariants(0).unwrap();
    let st = t.stats(0).unwrap();
    assert_eq!(st.allocated_bytes, 0);
    assert_eq!(st.reserved_bytes, 0, "{st:?}");
    assert_eq!(sim.bytes_in_use(0), 0, "leaked device memory");
    assert_eq!(sim.live_mappings(0), 0, "leaked mappings");
    assert_eq!(sim.live_handles(0), 0, "leaked physical handles");
    assert_eq!(sim.live_legacy(0), 0, "leaked legacy segments");
    out
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

/// Every call of `calls` failing at each of its occurrences, with its default error and with
/// the other kind (out of memory for calls that normally fail otherwise, and vice versa).
fn every_fault_at_every_point(backend: Backend, calls: &[Call]) {
    // Count the calls of a fault-free run.
    let (sim, t) = setup(backend);
    sim.reset_counters();
    let clean = run(&sim, &t, SCENARIO, &|_| false);
    let made = |out: &Outcome, c: Call| out.calls.iter().find(|x| x.0 == c).map_or(0, |x| x.1);
    let counts: Vec<(Call, u64)> = calls.iter().map(|&c| (c, made(&clean, c))).collect();
    assert!(
        clean.errors.iter().all(|(_, e)| e.starts_with("OOM")),
        "{clean:?}"
    );
    assert!(
        !clean.errors.is_empty(),
        "the scenario includes a failing request"
    );
    drop(t);
    eprintln!("{backend}: calls in the scenario: {counts:?}");
    for &(call, n) in &counts {
        assert!(n > 0, "{backend}: the scenario never calls {call}");
    }

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
                    let (sim, t) = setup(backend);
                    sim.reset_counters();
                    if (error == CudaError::OutOfMemory) == oom_default {
                        sim.fail_nth(call, n);
                    } else {
                        sim.fail_nth_with(call, n, error);
                    }
                    let out = run(&sim, &t, SCENARIO, &|e| {
                        e.call == call
                            && e.error == error
                            && e.detail.as_deref() == Some("injected fault")
                    });
                    assert!(made(&out, call) >= n, "the fault was reached");
                    out
                }));
                match r {
                    Ok(out) => {
                        // A failure other than "out of memory" is never swallowed: some
                        // operation reports it, naming the call, or (when the operation did not
                        // need what the call was for) the stats count it.
                        let named = out.errors.iter().any(|(_, e)| e.contains(call.cuda_name()))
                            || out
                                .counted
                                .as_ref()
                                .is_some_and(|e| e.contains(call.cuda_name()));
                        if error != CudaError::OutOfMemory && !named {
                            failures.push(format!(
                                "{backend}: {call} failing ({}) at call {n} of {count}: no \
                                 operation reported it: {:?}",
                                error.name(),
                                out.errors
                            ));
                        }
                    }
                    Err(p) => failures.push(format!(
                        "{backend}: {call} failing ({}) at call {n} of {count}: {}",
                        error.name(),
                        panic_text(&*p)
                    )),
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {cases} cases failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn vmm_every_driver_call_failing_at_every_point() {
    every_fault_at_every_point(Backend::Vmm, VMM_CALLS);
}

#[test]
fn legacy_every_driver_call_failing_at_every_point() {
    every_fault_at_every_point(Backend::Legacy, LEGACY_CALLS);
}

/// The scenario three times over with every call of the kinds `calls` failing with probability
/// 5 %, for a few seeds and both backends.
fn random_faults(calls: &[Call]) {
    let mut failures = Vec::new();
    for backend in [Backend::Vmm, Backend::Legacy] {
        for seed in 0..12u64 {
            let r = catch_unwind(AssertUnwindSafe(|| {
                let (sim, t) = setup(backend);
                for (i, &c) in calls.iter().enumerate() {
                    sim.fail_with_probability(Some(c), 0.05, seed * 100 + i as u64);
                }
                let ops: Vec<Op> = SCENARIO
                    .iter()
                    .chain(SCENARIO)
                    .chain(SCENARIO)
                    .copied()
                    .collect();
                run(&sim, &t, &ops, &|e| {
                    e.detail.as_deref() == Some("injected fault")
                })
            }));
            if let Err(p) = r {
                failures.push(format!("{backend}, seed {seed}: {}", panic_text(&*p)));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_driver_call_failing_at_random() {
    random_faults(&Call::ALL);
}

/// Mapping the second page of a two-page block fails, and so does unmapping the first page on the
/// way back. The first page must stay accounted for where it really is (mapped: quarantined),
/// so that the next request does not map over it and `empty_cache` unmaps it before releasing it.
/// (Found by this suite: tessera once recorded a hole there and pooled the page.)
#[test]
fn a_failed_unmap_while_rolling_back_a_failed_map_leaks_nothing() {
    let (sim, t) = setup(Backend::Vmm);
    sim.fail_nth(Call::Map, 2);
    sim.fail_nth(Call::Unmap, 1);
    let err = t.allocate(0, 4 * MIB, S0).unwrap_err();
    assert!(
        matches!(&err, Error::Driver(e) if e.call == Call::Map),
        "{err:?}"
    );
    t.check_invariants(0).unwrap();
    sim.clear_faults();
    let p = t
        .allocate(0, 4 * MIB, S0)
        .expect("no fault is armed any more");
    t.free(0, p).unwrap();
    t.empty_cache(0).unwrap();
    t.check_invariants(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
    assert_eq!(sim.live_mappings(0), 0);
}

#[test]
fn a_failed_request_reports_the_driver_error() {
    // A non-OOM failure of cuMemMap reaches the caller as that error, naming the call.
    let (sim, t) = setup(Backend::Vmm);
    sim.fail_nth(Call::Map, 1);
    let err = t.allocate(0, 4 * MIB, S0).unwrap_err();
    match &err {
        Error::Driver(e) => {
            assert_eq!(e.call, Call::Map);
            assert_eq!(e.error, CudaError::Unknown);
        }
        other => panic!("expected a driver error, got {other:?}"),
    }
    assert!(err.to_string().contains("cuMemMap"), "{err}");
    assert!(err.to_string().contains("CUDA_ERROR_UNKNOWN"), "{err}");
    t.check_invariants(0).unwrap();
    // The next request succeeds, reusing the page that was created.
    let creates = sim.calls(Call::CreatePhysical);
    let p = t.allocate(0, 4 * MIB, S0).unwrap();
    assert!(sim.calls(Call::CreatePhysical) - creates <= 2);
    t.free(0, p).unwrap();
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);

    // An out-of-memory refusal from cuMemCreate with no cache to fall back on: an OOM whose
    // message carries the driver's words.
    sim.fail_with_probability(Some(Call::CreatePhysical), 1.0, 0);
    let err = t.allocate(0, 4 * MIB, S0).unwrap_err();
    assert!(err.is_out_of_memory(), "{err:?}");
    assert!(
        err.to_string()
            .contains("The driver said: cuMemCreate failed"),
        "{err}"
    );
    sim.clear_faults();
    t.check_invariants(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}
