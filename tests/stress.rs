//! Stress: two threads × a million operations on one simulated device, under memory pressure.
//!
//! Each worker allocates (sizes across small classes, whole pages and multi-page blocks, on two
//! streams), writes a pattern, and frees in random order after checking it. Some allocations are
//! handed to the other worker, which checks and frees them (cross-thread frees); some get
//! `record_stream` on the other worker's stream first. The device is smaller than the most both
//! workers can hold, so requests remap pages, go through the OOM path and sometimes fail; a failure
//! must be a clean out-of-memory error. A third thread meanwhile empties the cache, reads the
//! stats and checks every invariant of the device.
//!
//! At the end: every pattern was intact at its free, the invariants hold, nothing is allocated,
//! and `empty_cache` gives the device back all its memory.
//!
//! Operation counts: `TESSERA_STRESS_OPS` per worker, else 1 000 000 in release builds and 40 000
//! in debug builds (CI runs `cargo test --release --test stress`). The soak is the same run on
//! both backends and two devices for `TESSERA_SOAK_SECS` seconds:
//! `TESSERA_SOAK_SECS=600 cargo test --release --test stress -- --ignored soak`.

mod common;
use common::MIB;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::{DevicePtr, Driver, Stream};
use tessera::{Backend, Config, Error, Tessera};

/// One live allocation: where, how big, and the seed of its pattern.
#[derive(Clone, Copy, Debug)]
struct Live {
    device: usize,
    ptr: DevicePtr,
    size: u64,
    seed: u64,
}

/// A small, fast generator (xorshift64*), so that each worker's run is reproducible by seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn size(rng: &mut Rng) -> u64 {
    match rng.below(100) {
        0..=59 => 1 + rng.below(64 << 10),
        60..=79 => 1 + rng.below(MIB),
        80..=96 => MIB + rng.below(7 * MIB),
        _ => 8 * MIB + rng.below(24 * MIB),
    }
}

/// One pattern word every 64 KiB (and the last): a check costs little even for large blocks, yet
/// touches every page.
const STRIDE: u64 = 64 << 10;

impl Live {
    fn write_pattern(&self) {
        // SAFETY: a live simulated-device allocation of `size` bytes (host memory), owned by one
        // worker at a time (handed over through a mutex).
        unsafe { common::write_pattern(self.ptr, self.size, self.seed, STRIDE) };
    }

    fn check_pattern(&self) {
        // SAFETY: as in `write_pattern`.
        unsafe { common::check_pattern(self.ptr, self.size, self.seed, STRIDE) };
    }
}

/// What a worker did.
#[derive(Debug, Default)]
struct Counts {
    allocs: u64,
    frees: u64,
    handed: u64,
    records: u64,
    ooms: u64,
}

struct Shared {
    t: Tessera,
    /// Allocations handed from one worker to the other (index: receiver).
    mailbox: [Mutex<Vec<Live>>; 2],
}

/// One worker: `ops` operations on `devices`, streams `Stream(1 + 2k)` and `Stream(2 + 2k)`.
fn worker(shared: &Shared, k: usize, devices: usize, seed: u64, ops: u64) -> Counts {
    let mut rng = Rng(seed | 1);
    let mut live: Vec<Live> = Vec::new();
    let mut c = Counts::default();
    let own = [Stream(1 + 2 * k as u64), Stream(2 + 2 * k as u64)];
    let other = Stream(1 + 2 * (1 - k) as u64);
    let mut next_seed = seed << 32;
    for op in 0..ops {
        if op.is_multiple_of(64) {
            let mut inbox = std::mem::take(&mut *shared.mailbox[k].lock().unwrap());
            for a in inbox.drain(..) {
                a.check_pattern();
                shared
                    .t
                    .free(a.device, a.ptr)
                    .expect("free of a handed-over block");
                c.frees += 1;
            }
        }
        let free = !live.is_empty() && (live.len() >= 24 || rng.below(2) == 0);
        if free {
            let a = live.swap_remove(rng.below(live.len() as u64) as usize);
            a.check_pattern();
            match rng.below(16) {
                0 => {
                    shared.mailbox[1 - k].lock().unwrap().push(a);
                    c.handed += 1;
                }
                1 => {
                    shared.t.record_stream(a.ptr, other).expect("record_stream");
                    shared.t.free(a.device, a.ptr).expect("free after record");
                    c.records += 1;
                    c.frees += 1;
                }
                _ => {
                    shared
                        .t
                        .free(a.device, a.ptr)
                        .expect("free of a live block");
                    c.frees += 1;
                }
            }
        } else {
            let device = rng.below(devices as u64) as usize;
            let size = size(&mut rng);
            let stream = own[rng.below(2) as usize];
            match shared.t.allocate(device, size, stream) {
                Ok(ptr) => {
                    next_seed += 1;
                    let a = Live {
                        device,
                        ptr,
                        size,
                        seed: next_seed,
                    };
                    a.write_pattern();
                    live.push(a);
                    c.allocs += 1;
                }
                Err(Error::OutOfMemory(_)) => c.ooms += 1,
                Err(e) => panic!("worker {k}: allocation of {size} B failed: {e}"),
            }
        }
    }
    for a in live {
        a.check_pattern();
        shared.t.free(a.device, a.ptr).expect("final free");
        c.frees += 1;
    }
    c
}

/// Runs two workers for `ops` operations each (or until `deadline`, checked between rounds of
/// `ops`), with a checker thread; then checks that everything went back.
fn run(backend: Backend, devices: usize, ops: u64, deadline: Option<Instant>) {
    let sim = Arc::new(SimDriver::new(SimConfig {
        devices,
        capacity: 128 * MIB,
        ..SimConfig::default()
    }));
    let config = Config {
        backend,
        check_invariants: false,
        ..Config::default()
    };
    let shared = Arc::new(Shared {
        // Untraced: a `TESSERA_TRACE` in the environment must not log two million events.
        t: Tessera::untraced(sim.clone(), config).unwrap(),
        mailbox: Default::default(),
    });
    let done = Arc::new(AtomicBool::new(false));
    let checks = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let checker = {
        let (shared, done, checks) = (shared.clone(), done.clone(), checks.clone());
        std::thread::spawn(move || {
            let mut round = 0u64;
            while !done.load(Ordering::Acquire) {
                let device = (round as usize) % devices;
                if let Err(e) = shared.t.check_invariants(device) {
                    panic!("invariant broken during the run: {e}");
                }
                let s = shared.t.stats(device).unwrap();
                assert!(s.allocated_bytes <= s.reserved_bytes, "{s:?}");
                if round.is_multiple_of(8) {
                    shared.t.empty_cache(device).unwrap();
                }
                round += 1;
                checks.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let mut totals = Counts::default();
    let mut rounds = 0u64;
    loop {
        let workers: Vec<_> = (0..2)
            .map(|k| {
                let shared = shared.clone();
                let seed = 0x5EED + 7919 * rounds + k as u64;
                std::thread::spawn(move || worker(&shared, k, devices, seed, ops))
            })
            .collect();
        for w in workers {
            let c = w.join().expect("worker");
            totals.allocs += c.allocs;
            totals.frees += c.frees;
            totals.handed += c.handed;
            totals.records += c.records;
            totals.ooms += c.ooms;
        }
        // Blocks handed over after the receiver's last look at its mailbox.
        for m in &shared.mailbox {
            for a in m.lock().unwrap().drain(..) {
                a.check_pattern();
                shared.t.free(a.device, a.ptr).unwrap();
                totals.frees += 1;
            }
        }
        rounds += 1;
        if deadline.is_none_or(|d| Instant::now() >= d) {
            break;
        }
    }
    done.store(true, Ordering::Release);
    checker.join().expect("checker thread");
    let elapsed = start.elapsed();
    assert_eq!(totals.allocs, totals.frees, "{totals:?}");
    assert!(totals.allocs > 0 && totals.handed > 0 && totals.records > 0);
    let pressure = totals.ooms;
    let mut retries = 0;
    for device in 0..devices {
        shared.t.check_invariants(device).unwrap();
        let s = shared.t.stats(device).unwrap();
        assert_eq!((s.allocated_bytes, s.active_blocks), (0, 0), "{s:?}");
        retries += s.alloc_retries;
        shared.t.empty_cache(device).unwrap();
        assert_eq!(
            sim.bytes_in_use(device),
            0,
            "device {device} fully released"
        );
        assert_eq!(shared.t.stats(device).unwrap().reserved_bytes, 0);
    }
    // The device is small enough that the run went through the OOM path.
    assert!(
        pressure > 0 || retries > 0,
        "no memory pressure: {totals:?}"
    );
    let total_ops = 2 * ops * rounds;
    eprintln!(
        "stress {backend}, {devices} device(s): {total_ops} operations in {elapsed:.2?} \
         ({:.2} M ops/s); {totals:?}; {} invariant checks during the run; {retries} OOM-path \
         retries",
        total_ops as f64 / elapsed.as_secs_f64() / 1e6,
        checks.load(Ordering::Relaxed),
    );
}

fn ops_per_worker() -> u64 {
    match std::env::var("TESSERA_STRESS_OPS") {
        Ok(v) => v.parse().expect("TESSERA_STRESS_OPS is a number"),
        Err(_) if cfg!(debug_assertions) => 40_000,
        Err(_) => 1_000_000,
    }
}

#[test]
fn two_threads_a_million_operations_each_vmm() {
    run(Backend::Vmm, 1, ops_per_worker(), None);
}

#[test]
fn two_threads_a_million_operations_each_legacy() {
    run(Backend::Legacy, 1, ops_per_worker(), None);
}

#[test]
#[ignore = "soak: TESSERA_SOAK_SECS=600 cargo test --release --test stress -- --ignored soak"]
fn soak() {
    let secs: u64 = std::env::var("TESSERA_SOAK_SECS")
        .map(|v| v.parse().expect("TESSERA_SOAK_SECS is a number of seconds"))
        .unwrap_or(60);
    let per = Duration::from_secs(secs) / 2;
    for backend in [Backend::Vmm, Backend::Legacy] {
        run(backend, 2, 100_000, Some(Instant::now() + per));
    }
}
