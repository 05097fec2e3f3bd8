//! Random allocations, in the spirit of RMM's `random_allocations` benchmark: 10 k allocations of
//! log-uniform sizes from 512 B to 64 MiB, freed in random order, with at most 4 GiB requested and
//! live at any time (when the next allocation would pass the cap, random live ones are freed
//! first), from a fixed seed. The sequence is drawn once; every peer replays exactly it, so each
//! iteration is 10 k allocations and 10 k frees, and throughput is in ops (allocations + frees).
//!
//! Peers, in one group so that their ratios hold on a shared machine:
//! - `tessera`: the VMM backend on a simulated 8 GiB device (bookkeeping backing: no host memory
//!   behind the device, so no page is ever touched; invariant checks off);
//! - `legacy`: tessera's legacy backend (`cuMemAlloc` segments, no remapping) on the same device;
//! - `mimalloc` and `system`: the same sizes from the CPU allocators, malloc and free only (this
//!   program never touches the memory). Both make system calls for the large sizes (glibc maps and
//!   unmaps every request above its mmap threshold; mimalloc purges freed spans with `madvise`),
//!   and with its defaults mimalloc's time goes mostly to the kernel zeroing the pages of its
//!   eagerly committed arenas: `MIMALLOC_ARENA_EAGER_COMMIT=0` in the environment shows its
//!   allocator-bound figure.
//!
//! Each allocator is made once and replays the sequence again and again (as RMM reuses its memory
//! resource): after the first pass the cache is warm, and what is measured is the steady state.
//! Before timing, one pass per tessera backend prints what it did (remaps, driver calls,
//! failures), and after timing the remaps and driver calls per timed pass (with this sequence the
//! warm cache serves everything: cache hits, splits and merges, no driver call).
//!
//! Informs the target of at least 5 M ops/s for tessera (reported, not asserted).
//!
//! `cargo bench --bench random`; CI runs each case once (`cargo bench --bench random -- --test`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use tessera::driver::sim::{Backing, SimConfig, SimDriver};
use tessera::driver::Stream;
use tessera::{Backend, Config, Tessera};

const ALLOCATIONS: u32 = 10_000;
const MIN_SIZE: u64 = 512;
const MAX_SIZE: u64 = 64 << 20;
const LIVE_CAP: u64 = 4 << 30;
const DEVICE: u64 = 8 << 30;
const SEED: u64 = 0x7e55_e7a0;

#[derive(Clone, Copy, Debug)]
enum Op {
    Alloc { slot: u32, size: u64 },
    Free { slot: u32 },
}

/// The sequence: allocations of log-uniform sizes; random live ones freed first whenever the next
/// would pass the cap; everything left freed in random order at the end.
fn sequence() -> Vec<Op> {
    let mut rng = SmallRng::seed_from_u64(SEED);
    let mut ops = Vec::with_capacity(2 * ALLOCATIONS as usize);
    let mut live: Vec<(u32, u64)> = Vec::new();
    let mut live_bytes = 0u64;
    let ratio = (MAX_SIZE as f64) / (MIN_SIZE as f64);
    for slot in 0..ALLOCATIONS {
        let u: f64 = rng.random();
        let size = ((MIN_SIZE as f64) * ratio.powf(u)).round() as u64;
        let size = size.clamp(MIN_SIZE, MAX_SIZE);
        while live_bytes + size > LIVE_CAP {
            let (s, b) = live.swap_remove(rng.random_range(0..live.len()));
            live_bytes -= b;
            ops.push(Op::Free { slot: s });
        }
        live.push((slot, size));
        live_bytes += size;
        ops.push(Op::Alloc { slot, size });
    }
    while !live.is_empty() {
        let (s, _) = live.swap_remove(rng.random_range(0..live.len()));
        ops.push(Op::Free { slot: s });
    }
    ops
}

/// Replays `ops` through tessera; returns the allocations that failed (their frees are skipped).
fn run_tessera(t: &Tessera, ops: &[Op], ptrs: &mut [u64]) -> u32 {
    let mut failed = 0;
    for op in ops {
        match *op {
            Op::Alloc { slot, size } => {
                ptrs[slot as usize] = match t.allocate(0, black_box(size), Stream::DEFAULT) {
                    Ok(p) => p,
                    Err(_) => {
                        failed += 1;
                        0
                    }
                }
            }
            Op::Free { slot } => {
                let p = ptrs[slot as usize];
                if p != 0 {
                    t.free(0, black_box(p)).expect("a live pointer frees");
                }
            }
        }
    }
    failed
}

/// Replays `ops` through a CPU allocator (alignment 256, as `cudaMalloc` guarantees at least).
fn run_cpu(alloc: &impl GlobalAlloc, ops: &[Op], ptrs: &mut [(*mut u8, usize)]) {
    for op in ops {
        match *op {
            Op::Alloc { slot, size } => {
                let layout = Layout::from_size_align(size as usize, 256).expect("a valid layout");
                // SAFETY: the layout has a non-zero size.
                let p = unsafe { alloc.alloc(layout) };
                assert!(!p.is_null(), "the CPU allocator returned null");
                ptrs[slot as usize] = (p, size as usize);
            }
            Op::Free { slot } => {
                let (p, size) = ptrs[slot as usize];
                // SAFETY: `p` came from `alloc` with this layout and is freed once.
                unsafe { alloc.dealloc(black_box(p), Layout::from_size_align_unchecked(size, 256)) }
            }
        }
    }
}

fn device(backend: Backend) -> (Arc<SimDriver>, Tessera) {
    let sim = Arc::new(SimDriver::new(SimConfig {
        capacity: DEVICE,
        backing: Backing::Bookkeeping,
        ..SimConfig::default()
    }));
    let config = Config::builder()
        .backend(backend)
        .check_invariants(false)
        .build()
        .expect("a valid config");
    let t = Tessera::untraced(sim.clone(), config).expect("an allocator");
    (sim, t)
}

fn bench_random(c: &mut Criterion) {
    let ops = sequence();
    let allocs = ops.iter().filter(|o| matches!(o, Op::Alloc { .. })).count();
    let requested: u64 = ops
        .iter()
        .map(|o| match o {
            Op::Alloc { size, .. } => *size,
            Op::Free { .. } => 0,
        })
        .sum();
    eprintln!(
        "random: {} ops ({allocs} allocations, {:.2} GiB requested in all, at most {} GiB live) on a simulated {} GiB device",
        ops.len(),
        requested as f64 / (1u64 << 30) as f64,
        LIVE_CAP >> 30,
        DEVICE >> 30
    );

    let mut group = c.benchmark_group("random");
    group.throughput(Throughput::Elements(ops.len() as u64));
    group.sample_size(20);
    let mut ptrs = vec![0u64; ALLOCATIONS as usize];
    for (name, backend) in [("tessera", Backend::Vmm), ("legacy", Backend::Legacy)] {
        let (sim, t) = device(backend);
        // One pass before timing: it warms the cache, and says what a pass does.
        let cold = run_tessera(&t, &ops, &mut ptrs);
        let s0 = t.stats(0).expect("stats");
        sim.reset_counters();
        let failed = run_tessera(&t, &ops, &mut ptrs);
        let s1 = t.stats(0).expect("stats");
        let calls: u64 = sim.call_counts().iter().map(|&(_, n)| n).sum();
        eprintln!(
            "random/{name}: first pass {cold} failed allocation(s); a warm pass: {failed} failed, {} remaps, {} driver calls {:?}, peak reserved {:.2} GiB",
            s1.remaps - s0.remaps,
            calls,
            sim.call_counts(),
            s1.peak_reserved_bytes as f64 / (1u64 << 30) as f64,
        );
        sim.reset_counters();
        let mut passes = 0u64;
        group.bench_function(BenchmarkId::new(name, "10k"), |b| {
            b.iter(|| {
                passes += 1;
                run_tessera(&t, &ops, &mut ptrs)
            })
        });
        let s2 = t.stats(0).expect("stats");
        let calls: u64 = sim.call_counts().iter().map(|&(_, n)| n).sum();
        eprintln!(
            "random/{name}: while timed, {passes} passes: {:.1} remaps and {:.1} driver calls per pass, {} OOMs; reserved {:.2} GiB at the end",
            (s2.remaps - s1.remaps) as f64 / passes as f64,
            calls as f64 / passes as f64,
            s2.ooms - s1.ooms,
            s2.reserved_bytes as f64 / (1u64 << 30) as f64,
        );
    }
    let mut cpu_ptrs = vec![(std::ptr::null_mut::<u8>(), 0usize); ALLOCATIONS as usize];
    group.bench_function(BenchmarkId::new("mimalloc", "10k"), |b| {
        b.iter(|| run_cpu(&mimalloc::MiMalloc, &ops, &mut cpu_ptrs))
    });
    group.bench_function(BenchmarkId::new("system", "10k"), |b| {
        b.iter(|| run_cpu(&System, &ops, &mut cpu_ptrs))
    });
    group.finish();
}

criterion_group!(benches, bench_random);
criterion_main!(benches);
