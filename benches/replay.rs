//! Replay speed: events per second of `tessera replay` over the bundled traces (`traces/`), for
//! every policy. The figure the README quotes is the `tessera` policy's.
//!
//! `cargo bench --bench replay`; CI runs each case once (`cargo bench --bench replay -- --test`).

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;
use std::path::Path;
use tessera::replay::engine::replay;
use tessera::replay::trace;
use tessera::replay::{Policy, ReplayOptions};

fn bundled_traces() -> Vec<trace::Trace> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("traces");
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .expect("the bundled traces in traces/")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.to_string_lossy().ends_with(".csv.gz"))
        .collect();
    paths.sort();
    paths
        .iter()
        .map(|p| trace::load(p, 0).expect("a bundled trace parses"))
        .collect()
}

fn bench_replay(c: &mut Criterion) {
    let opts = ReplayOptions::default();
    for t in bundled_traces() {
        let name = Path::new(&t.name)
            .file_name()
            .map(|n| n.to_string_lossy().trim_end_matches(".csv.gz").to_string())
            .unwrap_or_default();
        let mut group = c.benchmark_group(format!("replay/{name}"));
        group.throughput(Throughput::Elements(t.events.len() as u64));
        group.sample_size(10);
        for policy in Policy::ALL {
            group.bench_function(policy.name(), |b| {
                b.iter(|| black_box(replay(&t, policy, &opts, &mut |_| {}).expect("replays")))
            });
        }
        group.finish();
    }
}

fn bench_parse(c: &mut Criterion) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("traces");
    let mut group = c.benchmark_group("parse");
    group.sample_size(10);
    for t in bundled_traces() {
        let path = dir.join(Path::new(&t.name).file_name().expect("a file name"));
        group.throughput(Throughput::Elements(t.events.len() as u64));
        group.bench_function(
            path.file_name().unwrap().to_string_lossy().to_string(),
            |b| b.iter(|| black_box(trace::load(&path, 0).expect("parses"))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_replay, bench_parse);
criterion_main!(benches);
