//! The slow path: what a request costs when the cache cannot serve it.
//!
//! `remap_blocks/k` and `remap_granules/k`: one request of k pages (2 MiB granularity) on a
//! simulated device (bookkeeping backing) that is full, where the only way to serve it is to unmap
//! k fully free pages from elsewhere and map them into a contiguous virtual range ("cache first,
//! remap under pressure": tessera steals pages only once the driver refuses new ones).
//! - `remap_blocks/k`, k = 2, 16, 256: 2k+1 one-page blocks side by side, every other one freed, so
//!   k free pages exist but no free range of two pages does; the device is full (another process
//!   holds the rest: `set_external_usage`), and its reservation has room for the request. The free
//!   pages are free large blocks: `unmap_free_pages` lists, sorts and carves them. (k = 1 cannot be
//!   built this way: a free one-page block serves a one-page request from the cache.)
//! - `remap_granules/k`, k = 1, 16, 256: a full device of 2k pages (again with another process
//!   holding as much again) holding k pages of live large data and k empty small granules (small
//!   tensors that were freed): the request of k pages takes the granules' pages.
//!
//! Each measured iteration is one request on a freshly built state (`iter_batched`, one state per
//! iteration; building it is not timed). Before timing, every k is checked once (the request
//! succeeds and `stats().remaps` grows by exactly k) and its driver calls are counted
//! (`SimDriver::call_counts`); the table, with calls per k, goes to stderr and to
//! `<target>/criterion/slow_path_driver_calls.txt`, so that the O(k) claim can be read.
//!
//! `oom/...`: the out-of-memory sequence on a device of 64 pages full of 64 live one-page blocks,
//! for a one-page request:
//! - `hook_frees_one`: one registered eviction hook frees one block, so the retry after the hooks
//!   succeeds (re-armed before each iteration: the block is freed and taken back, untimed);
//! - `no_way_out`: no hook, the request fails; the `Error::OutOfMemory` with its report is built
//!   (and dropped untimed); `no_way_out_message` also formats the error's message, as the C ABI
//!   does for PyTorch; `stats` is the stats snapshot the report takes, for reference.
//!
//! Informs the claims that remapping is O(k) in driver calls and what an OOM costs.
//!
//! `cargo bench --bench slow_path`; CI runs each case once (`cargo bench --bench slow_path -- --test`).

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use std::cell::Cell;
use std::fmt::Write as _;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tessera::driver::sim::{Backing, SimConfig, SimDriver};
use tessera::driver::{Call, DevicePtr, Stream};
use tessera::{Config, Error, Tessera};

const PAGE: u64 = 2 << 20;
const S: Stream = Stream::DEFAULT;
/// The OOM cases' device, in pages.
const OOM_PAGES: u64 = 64;

/// A device ready for one request: the request's size, and what keeps the state alive.
struct Armed {
    sim: Arc<SimDriver>,
    t: Tessera,
    request: u64,
    /// Live blocks, kept so that nothing is freed before the request.
    _live: Vec<DevicePtr>,
}

fn allocator(capacity: u64) -> (Arc<SimDriver>, Tessera) {
    let sim = Arc::new(SimDriver::new(SimConfig {
        capacity,
        granularity: PAGE,
        backing: Backing::Bookkeeping,
        ..SimConfig::default()
    }));
    // 1 MiB requests are small here (two slots a granule), as the granule cases assume.
    let config = Config::builder()
        .check_invariants(false)
        .small_max(1 << 20)
        .build()
        .unwrap();
    let t = Tessera::untraced(sim.clone(), config).unwrap();
    (sim, t)
}

/// 2k+1 one-page blocks, the odd ones freed: k free pages, no two adjacent. The device is full.
fn remap_blocks(k: u64) -> Armed {
    let n = 2 * k + 1;
    // Twice the memory, the other half held by another process: the driver refuses new pages,
    // and the reservation (the device's size) has holes for the request.
    let (sim, t) = allocator(2 * n * PAGE);
    sim.set_external_usage(0, n * PAGE);
    let blocks: Vec<DevicePtr> = (0..n).map(|_| t.allocate(0, PAGE, S).unwrap()).collect();
    let mut live = Vec::new();
    for (i, &p) in blocks.iter().enumerate() {
        if i % 2 == 1 {
            t.free(0, p).unwrap();
        } else {
            live.push(p);
        }
    }
    Armed {
        sim,
        t,
        request: k * PAGE,
        _live: live,
    }
}

/// A full device of 2k pages: k empty small granules and k pages of live large data.
fn remap_granules(k: u64) -> Armed {
    // As above, another process holds the other half: the reservations have room to spare.
    let (sim, t) = allocator(4 * k * PAGE);
    sim.set_external_usage(0, 2 * k * PAGE);
    // 1 MiB is the largest small class: two slots to a granule.
    let small: Vec<DevicePtr> = (0..2 * k)
        .map(|_| t.allocate(0, 1 << 20, S).unwrap())
        .collect();
    let live = vec![t.allocate(0, k * PAGE, S).unwrap()];
    for p in small {
        t.free(0, p).unwrap();
    }
    Armed {
        sim,
        t,
        request: k * PAGE,
        _live: live,
    }
}

/// The request, checked once: it succeeds, remaps exactly k pages; returns its driver calls.
fn check_and_count(name: &str, k: u64, armed: Armed) -> (u64, Vec<(Call, u64)>) {
    let before = armed.t.stats(0).unwrap();
    armed.sim.reset_counters();
    let r = armed.t.allocate(0, armed.request, S);
    let calls = armed.sim.call_counts();
    let after = armed.t.stats(0).unwrap();
    assert!(
        r.is_ok(),
        "{name}/{k}: the request failed, the setup is wrong: {:?}",
        r.err()
    );
    assert_eq!(
        after.remaps - before.remaps,
        k,
        "{name}/{k}: expected {k} pages remapped"
    );
    (after.remaps - before.remaps, calls)
}

fn output_dir() -> PathBuf {
    if let Some(home) = std::env::var_os("CRITERION_HOME") {
        return PathBuf::from(home);
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("criterion");
    }
    // The benchmark runs as <target>/<profile>/deps/slow_path-<hash>.
    std::env::current_exe()
        .ok()
        .and_then(|p| Some(p.parent()?.parent()?.parent()?.join("criterion")))
        .unwrap_or_else(|| PathBuf::from("target/criterion"))
}

fn format_calls(calls: &[(Call, u64)]) -> String {
    calls
        .iter()
        .map(|(c, n)| format!("{}={n}", c.cuda_name()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A device of `OOM_PAGES` pages full of one-page live blocks.
fn full_device() -> (Arc<SimDriver>, Arc<Tessera>, Vec<DevicePtr>) {
    let (sim, t) = allocator(OOM_PAGES * PAGE);
    let blocks: Vec<DevicePtr> = (0..OOM_PAGES)
        .map(|_| t.allocate(0, PAGE, S).unwrap())
        .collect();
    assert!(t.allocate(0, PAGE, S).is_err(), "the device is full");
    (sim, Arc::new(t), blocks)
}

/// The hook case's device: a hook that frees the block in `victim`, if any.
fn hooked_device() -> (Arc<SimDriver>, Arc<Tessera>, Arc<Mutex<Option<DevicePtr>>>) {
    let (sim, t, blocks) = full_device();
    let victim = Arc::new(Mutex::new(Some(blocks[OOM_PAGES as usize / 2])));
    let (weak, v): (Weak<Tessera>, _) = (Arc::downgrade(&t), Arc::clone(&victim));
    t.add_oom_hook(move |dev, _requested| {
        let taken = v.lock().unwrap().take();
        if let (Some(p), Some(t)) = (taken, weak.upgrade()) {
            t.free(dev, p).unwrap();
        }
    });
    (sim, t, victim)
}

fn bench_remap(c: &mut Criterion) {
    type Build = fn(u64) -> Armed;
    let cases: [(&str, Build, [u64; 3]); 2] = [
        ("remap_blocks", remap_blocks, [2, 16, 256]),
        ("remap_granules", remap_granules, [1, 16, 256]),
    ];

    // The driver calls of one request, per k.
    let mut table = String::new();
    writeln!(
        table,
        "{:<16} {:>4} {:>7} {:>13} {:>8}  calls by kind",
        "case", "k", "remaps", "driver calls", "calls/k"
    )
    .unwrap();
    for &(name, build, ks) in &cases {
        for k in ks {
            let (remaps, calls) = check_and_count(name, k, build(k));
            let total: u64 = calls.iter().map(|&(_, n)| n).sum();
            writeln!(
                table,
                "{name:<16} {k:>4} {remaps:>7} {total:>13} {:>8.2}  {}",
                total as f64 / k as f64,
                format_calls(&calls)
            )
            .unwrap();
        }
    }
    let oom_calls = |label: &str, sim: &SimDriver, t: &Tessera, succeeds: bool| {
        let before = t.stats(0).unwrap().remaps;
        sim.reset_counters();
        let r = t.allocate(0, PAGE, S);
        let calls = sim.call_counts();
        assert_eq!(r.is_ok(), succeeds, "{label}: unexpected outcome");
        let remaps = t.stats(0).unwrap().remaps - before;
        let total: u64 = calls.iter().map(|&(_, n)| n).sum();
        format!(
            "{label:<16} {:>4} {remaps:>7} {total:>13} {:>8}  {}\n",
            1,
            "-",
            format_calls(&calls)
        )
    };
    let (sim, t, _victim) = hooked_device();
    table.push_str(&oom_calls("oom/hook", &sim, &t, true));
    let (sim, t, _blocks) = full_device();
    table.push_str(&oom_calls("oom/no_way_out", &sim, &t, false));
    eprint!("slow_path: driver calls per request\n{table}");
    let path = output_dir().join("slow_path_driver_calls.txt");
    match std::fs::create_dir_all(path.parent().unwrap())
        .and_then(|()| std::fs::write(&path, &table))
    {
        Ok(()) => eprintln!("slow_path: table written to {}", path.display()),
        Err(e) => eprintln!("slow_path: could not write {}: {e}", path.display()),
    }

    for &(name, build, ks) in &cases {
        let mut group = c.benchmark_group(format!("slow_path/{name}"));
        // Building a state costs far more than the request it is built for: fewer, longer samples
        // keep the run short (these override --sample-size and --measurement-time).
        group.sample_size(20);
        group.measurement_time(Duration::from_secs(1));
        group.warm_up_time(Duration::from_millis(300));
        for k in ks {
            group.bench_function(BenchmarkId::from_parameter(k), |b| {
                b.iter_batched(
                    || build(k),
                    |armed| {
                        let p = armed.t.allocate(0, black_box(armed.request), S);
                        (armed, p)
                    },
                    BatchSize::PerIteration,
                )
            });
        }
        group.finish();
    }
}

fn bench_oom(c: &mut Criterion) {
    let mut group = c.benchmark_group("slow_path/oom");

    let (_sim, t, victim) = hooked_device();
    // The block the last request got; freed before the next one, with the victim taken back.
    let last: Cell<Option<DevicePtr>> = Cell::new(None);
    group.bench_function("hook_frees_one", |b| {
        b.iter_batched(
            || {
                if let Some(p) = last.take() {
                    t.free(0, p).unwrap();
                    let v = t.allocate(0, PAGE, S).unwrap();
                    *victim.lock().unwrap() = Some(v);
                }
            },
            |()| {
                let p = t.allocate(0, black_box(PAGE), S).unwrap();
                last.set(Some(p));
            },
            BatchSize::PerIteration,
        )
    });
    drop(t);

    let (_sim, t, _blocks) = full_device();
    group.bench_function("no_way_out", |b| {
        b.iter_with_large_drop(|| {
            let e = t.allocate(0, black_box(PAGE), S).unwrap_err();
            debug_assert!(matches!(e, Error::OutOfMemory(_)));
            e
        })
    });
    group.bench_function("no_way_out_message", |b| {
        b.iter_with_large_drop(|| t.allocate(0, black_box(PAGE), S).unwrap_err().to_string())
    });
    group.bench_function("stats", |b| b.iter(|| black_box(t.stats(0).unwrap())));
    group.finish();
}

criterion_group!(benches, bench_remap, bench_oom);
criterion_main!(benches);
