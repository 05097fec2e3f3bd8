//! Hot pairs from several threads: malloc + free of one size on one stream, a cache hit, timed in
//! batches of N pairs per thread, both threads running their timed loops together (a barrier
//! releases them; the batch's time is the slower thread's). Two sizes: 4 KiB (the small pool:
//! size-class slots) and 4 MiB (the large pool: best-fit blocks). Peers, in one group per size:
//! - `tessera/1thread_1device`: one thread, one device (the baseline);
//! - `tessera/2threads_1device`: two threads on the same `Tessera` and the same device, each on its
//!   own stream: both contend for the one device lock;
//! - `tessera/2threads_2devices`: two threads on the same `Tessera`, each on its own device of a
//!   two-device simulated machine: two locks, nothing shared on the hot path;
//! - `mimalloc/1thread` and `mimalloc/2threads`: mimalloc's pair of the same size, thread-local in
//!   mimalloc, so its ratio is what this machine's cores give to work that shares nothing.
//!
//! Throughput is in pairs per second over all threads. Informs the target that two threads on two
//! devices reach at least 1.5 times one thread's throughput (reported, not asserted).
//!
//! `cargo bench --bench threads`; CI runs each case once (`cargo bench --bench threads -- --test`).

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::alloc::{GlobalAlloc, Layout};
use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tessera::driver::sim::{Backing, SimConfig, SimDriver};
use tessera::driver::Stream;
use tessera::{Config, Tessera};

const SIZES: [(u64, &str); 2] = [(4 << 10, "4KiB"), (4 << 20, "4MiB")];

/// Where each thread allocates: (device, stream).
type Placement = (usize, Stream);

/// `iters` hot pairs of `size` on every placement at once, one thread each; the slowest thread's
/// time.
fn timed<F>(threads: usize, iters: u64, work: F) -> Duration
where
    F: Fn(usize, u64) + Sync,
{
    let barrier = Barrier::new(threads);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|i| {
                let (barrier, work) = (&barrier, &work);
                s.spawn(move || {
                    barrier.wait();
                    let start = Instant::now();
                    work(i, iters);
                    start.elapsed()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a benchmark thread panicked"))
            .max()
            .expect("at least one thread")
    })
}

fn tessera_pairs(t: &Tessera, (dev, stream): Placement, size: u64, iters: u64) {
    for _ in 0..iters {
        let p = t.allocate(dev, black_box(size), stream).unwrap();
        t.free(dev, black_box(p)).unwrap();
    }
}

fn mimalloc_pairs(layout: Layout, iters: u64) {
    for _ in 0..iters {
        // SAFETY: the layout has a non-zero size; the pointer is freed once, with its layout.
        unsafe {
            let p = mimalloc::MiMalloc.alloc(black_box(layout));
            assert!(!p.is_null());
            mimalloc::MiMalloc.dealloc(black_box(p), layout);
        }
    }
}

fn bench_threads(c: &mut Criterion) {
    let sim = SimDriver::new(SimConfig {
        devices: 2,
        capacity: 1 << 30,
        backing: Backing::Bookkeeping,
        ..SimConfig::default()
    });
    let config = Config::builder().check_invariants(false).build().unwrap();
    let t = Arc::new(Tessera::untraced(Arc::new(sim), config).unwrap());

    let cases: [(&str, Vec<Placement>); 3] = [
        ("1thread_1device", vec![(0, Stream(1))]),
        ("2threads_1device", vec![(0, Stream(1)), (0, Stream(2))]),
        ("2threads_2devices", vec![(0, Stream(1)), (1, Stream(1))]),
    ];
    for (size, size_name) in SIZES {
        let mut group = c.benchmark_group(format!("threads/{size_name}"));
        for (name, placements) in &cases {
            // Warm each thread's cache, so that every timed pair is a hit.
            for &(dev, stream) in placements {
                t.free(dev, t.allocate(dev, size, stream).unwrap()).unwrap();
            }
            group.throughput(Throughput::Elements(placements.len() as u64));
            group.bench_function(BenchmarkId::new("tessera", name), |b| {
                b.iter_custom(|iters| {
                    timed(placements.len(), iters, |i, n| {
                        tessera_pairs(&t, placements[i], size, n)
                    })
                })
            });
        }
        let layout = Layout::from_size_align(size as usize, 256).unwrap();
        for threads in [1usize, 2] {
            group.throughput(Throughput::Elements(threads as u64));
            let name = if threads == 1 { "1thread" } else { "2threads" };
            group.bench_function(BenchmarkId::new("mimalloc", name), |b| {
                b.iter_custom(|iters| timed(threads, iters, |_, n| mimalloc_pairs(layout, n)))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_threads);
criterion_main!(benches);
