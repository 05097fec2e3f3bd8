//! Random sequences of operations while CUDA graph captures are underway, on a 64 MiB simulated
//! device, on both backends: allocations on the capturing stream (routed to the capture's private
//! pool) and on another stream (the ordinary cache), frees, `record_stream` and its free,
//! `empty_cache`, `trim`, requests too large for what is left (the OOM sequence), an OOM hook that
//! frees live allocations, another stream held back, captures ending and new ones beginning (into
//! the same pool, shared, or a new one), and pools released.
//!
//! After every step: every live allocation's pattern is intact, every invariant holds, a new
//! allocation belongs to the pool its stream is routed to, and **no memory of a private pool is
//! ever part of a block of another pool or of the ordinary cache until tessera drains it** (the
//! address ranges each pool's blocks ever covered stay its own while it has uses, and after its
//! release until the device was synchronized outside a capture and the pool left the stats). Every capture ends
//! valid: the simulated driver invalidates a capture on any call a global capture forbids, so this
//! says tessera made none. At the end, freeing everything, ending and releasing every pool and
//! emptying the cache gives the device everything back.
//!
//! `PROPTEST_CASES` sets the number of cases per backend (default [`DEFAULT_CASES`]).

mod common;
use common::*;
use proptest::prelude::*;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tessera::driver::sim::SimDriver;
use tessera::driver::{CaptureMode, DevicePtr, Driver, Stream};
use tessera::{Backend, Config, Error, MempoolId, Tessera};

const CAPACITY: u64 = 64 * MIB;
const DEFAULT_CASES: u32 = 96;
const CAPTURING: Stream = Stream(21);
const ORDINARY: Stream = Stream(22);
const SIDE: Stream = Stream(23);

#[derive(Clone, Debug)]
enum Op {
    /// Bytes; on the capturing stream (true) or the ordinary one.
    Alloc(u64, bool),
    /// A live allocation, by a fraction of `u64::MAX`.
    Free(u64),
    /// `record_stream` on the side stream, then the free.
    FreeRecorded(u64),
    EmptyCache,
    Trim,
    /// A request for the whole device, on the capturing stream or not.
    TooBig(bool),
    /// The hook's budget of frees for the next OOM.
    ArmHook(u8),
    HoldSide,
    ReleaseSide,
    /// Ends the capture (it must be valid); the steps until the next `Begin` run with no capture
    /// underway (fences then settle, and the cache may be remapped and released).
    End,
    /// Begins a capture (if none is underway): into the last pool (true: a shared pool, one more
    /// use) or a new one.
    Begin(bool),
    /// Releases a use of a pool that no capture is routed to, picked by a fraction.
    ReleasePool(u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (prop_oneof![512u64..65536, MIB..12 * MIB], any::<bool>()).prop_map(|(s, c)| Op::Alloc(s, c)),
        5 => any::<u64>().prop_map(Op::Free),
        2 => any::<u64>().prop_map(Op::FreeRecorded),
        1 => Just(Op::EmptyCache),
        1 => Just(Op::Trim),
        1 => any::<bool>().prop_map(Op::TooBig),
        1 => (0u8..3).prop_map(Op::ArmHook),
        1 => Just(Op::HoldSide),
        1 => Just(Op::ReleaseSide),
        1 => Just(Op::End),
        1 => any::<bool>().prop_map(Op::Begin),
        1 => any::<u64>().prop_map(Op::ReleasePool),
    ]
}

fn pick(n: usize, f: u64) -> usize {
    ((f as u128 * n as u128) >> 64) as usize
}

/// Live allocations: pointer → (size, the pool it must be in).
type Live = Arc<Mutex<HashMap<DevicePtr, (u64, Option<MempoolId>)>>>;

struct World {
    sim: Arc<SimDriver>,
    t: Arc<Tessera>,
    tr: Arc<Mutex<Tracker>>,
    live: Live,
    /// Address ranges each pool with uses left has covered.
    private: HashMap<MempoolId, Vec<(u64, u64)>>,
    /// Pools with uses left and their uses.
    uses: HashMap<MempoolId, u32>,
    routed: MempoolId,
    capturing: bool,
    next_pool: u64,
    hook_budget: Arc<Mutex<u8>>,
}

impl World {
    fn new(backend: Backend) -> World {
        let sim = Arc::new(SimDriver::with_capacity(CAPACITY));
        let t = Arc::new(
            Tessera::new(
                sim.clone(),
                Config {
                    backend,
                    check_invariants: true,
                    ..Config::default()
                },
            )
            .unwrap(),
        );
        let mut w = World {
            sim,
            t,
            tr: Arc::new(Mutex::new(Tracker::default())),
            live: Arc::default(),
            private: HashMap::new(),
            uses: HashMap::new(),
            routed: MempoolId(1, 0),
            capturing: false,
            next_pool: 2,
            hook_budget: Arc::new(Mutex::new(0)),
        };
        // The hook frees the largest live allocations, up to its budget.
        let (weak, tr, live, budget) = (
            Arc::downgrade(&w.t),
            Arc::clone(&w.tr),
            Arc::clone(&w.live),
            Arc::clone(&w.hook_budget),
        );
        w.t.add_oom_hook(move |dev, _| {
            let Some(t) = weak.upgrade() else { return };
            let mut b = budget.lock().unwrap();
            while *b > 0 {
                let mut l = live.lock().unwrap();
                let Some((&p, _)) = l.iter().max_by_key(|(&p, &(s, _))| (s, p)) else {
                    break;
                };
                l.remove(&p);
                tr.lock().unwrap().remove(p);
                t.free(dev, p).expect("the hook frees a live allocation");
                *b -= 1;
            }
        });
        w.begin(MempoolId(1, 0));
        w
    }

    fn begin(&mut self, id: MempoolId) {
        self.t
            .begin_allocate_to_pool(0, id, Box::new(|s| s == CAPTURING))
            .unwrap();
        *self.uses.entry(id).or_default() += 1;
        self.routed = id;
        self.capturing = true;
        self.sim
            .stream_begin_capture(0, CAPTURING, CaptureMode::Global)
            .unwrap();
    }

    fn end(&mut self) {
        self.sim
            .stream_end_capture(0, CAPTURING)
            .expect("the capture ends valid");
        self.t.end_allocate_to_pool(0, self.routed).unwrap();
        self.capturing = false;
    }

    fn release(&mut self, id: MempoolId) {
        self.t.release_pool(0, id).unwrap();
        // At zero uses the pool is released: private until tessera drains it (`check`).
        *self.uses.get_mut(&id).unwrap() -= 1;
    }

    fn free(&mut self, p: DevicePtr) {
        self.live.lock().unwrap().remove(&p);
        self.tr.lock().unwrap().remove(p);
        self.t.free(0, p).unwrap();
    }

    fn nth_live(&self, f: u64) -> Option<DevicePtr> {
        let l = self.live.lock().unwrap();
        let mut ptrs: Vec<DevicePtr> = l.keys().copied().collect();
        ptrs.sort_unstable();
        (!ptrs.is_empty()).then(|| ptrs[pick(ptrs.len(), f)])
    }

    fn step(&mut self, op: &Op) {
        match *op {
            Op::Alloc(size, capturing) => {
                let stream = if capturing { CAPTURING } else { ORDINARY };
                match self.t.allocate(0, size, stream) {
                    Ok(p) => {
                        let pool = (capturing && self.capturing).then_some(self.routed);
                        self.live.lock().unwrap().insert(p, (size, pool));
                        self.tr.lock().unwrap().add(p, size);
                    }
                    Err(Error::OutOfMemory(_)) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            Op::Free(f) => {
                if let Some(p) = self.nth_live(f) {
                    self.free(p);
                }
            }
            Op::FreeRecorded(f) => {
                if let Some(p) = self.nth_live(f) {
                    self.t.record_stream(p, SIDE).unwrap();
                    self.free(p);
                }
            }
            Op::EmptyCache => {
                self.t.empty_cache(0).unwrap();
            }
            Op::Trim => {
                self.t.trim(0).unwrap();
            }
            Op::TooBig(capturing) => {
                // The whole device: an OOM unless nothing else is held (then it is freed again).
                let stream = if capturing { CAPTURING } else { ORDINARY };
                match self.t.allocate(0, CAPACITY, stream) {
                    Ok(p) => self.t.free(0, p).unwrap(),
                    Err(Error::OutOfMemory(r)) => assert_eq!(r.requested, CAPACITY),
                    Err(e) => panic!("{e}"),
                }
            }
            Op::ArmHook(n) => *self.hook_budget.lock().unwrap() = n,
            Op::HoldSide => self.sim.hold_stream(0, SIDE),
            Op::ReleaseSide => self.sim.release_stream(0, SIDE),
            Op::End => {
                if self.capturing {
                    self.end();
                }
            }
            Op::Begin(shared) => {
                if self.capturing {
                    return self.check();
                }
                let id = if shared {
                    self.routed
                } else {
                    self.next_pool += 1;
                    MempoolId(self.next_pool, 0)
                };
                self.begin(id);
            }
            Op::ReleasePool(f) => {
                // Only a pool with a use beyond the capture's own may be released now.
                let mut ids: Vec<MempoolId> = self
                    .uses
                    .iter()
                    .filter(|(&id, &u)| u > 0 && (!self.capturing || id != self.routed || u > 1))
                    .map(|(&id, _)| id)
                    .collect();
                ids.sort_unstable();
                if !ids.is_empty() {
                    let id = ids[pick(ids.len(), f)];
                    self.release(id);
                }
            }
        }
        self.check();
    }

    fn check(&mut self) {
        self.tr.lock().unwrap().check();
        self.t.check_invariants(0).unwrap();
        // Pools tessera no longer lists were drained: they had no use left, and their memory (and
        // live allocations) are ordinary now.
        let stats = self.t.stats(0).unwrap();
        assert_eq!(stats.capture_underway, self.capturing);
        let listed: Vec<MempoolId> = stats.private_pools.iter().map(|p| p.id).collect();
        let drained: Vec<MempoolId> = self
            .uses
            .keys()
            .filter(|id| !listed.contains(id))
            .copied()
            .collect();
        for id in drained {
            assert_eq!(
                self.uses.remove(&id),
                Some(0),
                "pool {id} vanished with uses left"
            );
            self.private.remove(&id);
            for v in self.live.lock().unwrap().values_mut() {
                if v.1 == Some(id) {
                    v.1 = None;
                }
            }
        }
        for p in &stats.private_pools {
            assert_eq!(self.uses.get(&p.id), Some(&p.uses));
        }
        let snap = self.t.snapshot(0).unwrap();
        let live = self.live.lock().unwrap();
        for b in snap.segments.iter().flat_map(|s| &s.blocks) {
            if let Some(&(_, pool)) = live.get(&b.address) {
                if b.state == tessera::BlockStateInfo::Allocated {
                    assert_eq!(
                        b.pool, pool,
                        "allocation {:#x} in the wrong pool",
                        b.address
                    );
                }
            }
            if let Some(p) = b.pool {
                assert!(self.uses.contains_key(&p), "block of a drained pool {p}");
                let r = self.private.entry(p).or_default();
                if !r
                    .iter()
                    .any(|&(s, e)| s <= b.address && b.address + b.size <= e)
                {
                    r.push((b.address, b.address + b.size));
                }
            }
        }
        for b in snap.segments.iter().flat_map(|s| &s.blocks) {
            for (&p, ranges) in &self.private {
                if b.pool != Some(p) {
                    let overlap = ranges
                        .iter()
                        .any(|&(s, e)| b.address < e && s < b.address + b.size);
                    assert!(
                        !overlap,
                        "block {:#x} ({:?}) lies in memory of pool {p}, not yet drained",
                        b.address, b.pool
                    );
                }
            }
        }
    }

    fn finish(mut self) {
        if self.capturing {
            self.end();
        }
        self.sim.release_stream(0, SIDE);
        let ptrs: Vec<DevicePtr> = self.live.lock().unwrap().keys().copied().collect();
        for p in ptrs {
            self.free(p);
        }
        let pools: Vec<(MempoolId, u32)> = self.uses.iter().map(|(&i, &u)| (i, u)).collect();
        for (id, u) in pools {
            for _ in 0..u {
                self.release(id);
            }
        }
        self.t.empty_cache(0).unwrap();
        assert_eq!(self.sim.bytes_in_use(0), 0, "everything comes back");
        assert!(self.t.stats(0).unwrap().private_pools.is_empty());
    }
}

fn cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

fn run(backend: Backend) {
    let config = ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    };
    proptest!(config, |(ops in proptest::collection::vec(op(), 1..60))| {
        let mut w = World::new(backend);
        for op in &ops {
            w.step(op);
        }
        w.finish();
    });
}

#[test]
fn captures_stay_valid_and_pools_stay_private_vmm() {
    run(Backend::Vmm);
}

#[test]
fn captures_stay_valid_and_pools_stay_private_legacy() {
    run(Backend::Legacy);
}
