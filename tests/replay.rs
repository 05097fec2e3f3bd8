//! The replay engine on hand-made traces with known answers: peaks, OOMs, minimum capacities,
//! remaps, `--verify`, and traces written by the library itself (`TESSERA_TRACE`).

mod common;

use common::MIB;
use std::io::Cursor;
use std::sync::Arc;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::Stream;
use tessera::replay::engine::{min_capacity, replay, trace_peak_live};
use tessera::replay::trace::{self, Op, Trace};
use tessera::replay::{self as rp, Policy, ReplayOptions};
use tessera::{Config, Tessera};

const PAGE: u64 = 2 * MIB;

fn parse(csv: &str) -> Trace {
    trace::parse_csv("test.csv", Cursor::new(csv.as_bytes())).expect("a well-formed trace")
}

fn opts(capacity: u64) -> ReplayOptions {
    common::replay_opts(capacity)
}

/// 100 blocks of 2 MiB, then all but every tenth freed (each 20 MiB stretch keeps its first
/// block), then one 180 MiB request. Peak live is 200 MiB twice: before the frees, and after the
/// big request (20 MiB pinned + 180 MiB).
///
/// PyTorch's rules put the 2 MiB blocks ten to a 20 MiB segment, so every segment stays pinned by
/// its first block: the 180 MiB request needs a new segment, 380 MiB reserved in all, 1.9 times the
/// peak. tessera remaps the 90 fully free pages into one range and needs at most one page more
/// than the peak (here: nothing more).
fn pinned_segments() -> String {
    let mut csv = String::from("# {\"case\":\"pinned segments\"}\n");
    for id in 0..100 {
        csv += &format!("a,{id},{},0\n", 2 * MIB);
    }
    for id in (0..100).filter(|id| id % 10 != 0) {
        csv += &format!("f,{id}\n");
    }
    csv += &format!("a,1000,{},0\n", 180 * MIB);
    csv += "f,1000\n";
    csv
}

#[test]
fn pinned_segments_known_answers() {
    let t = parse(&pinned_segments());
    assert_eq!(trace_peak_live(&t), 200 * MIB);
    let o = opts(1 << 30);

    // With room to spare, tessera grows like any cache; at a capacity of exactly the peak it
    // remaps the 90 fully free pages instead, and needs nothing more.
    let roomy = replay(&t, Policy::Tessera, &o, &mut |_| {}).unwrap();
    assert_eq!(roomy.ooms, 0);
    assert_eq!(roomy.peak_live_bytes, 200 * MIB);
    let tight = replay(&t, Policy::Tessera, &opts(200 * MIB), &mut |_| {}).unwrap();
    assert_eq!(tight.ooms, 0);
    assert_eq!(tight.peak_reserved_bytes, 200 * MIB);
    assert!(
        (1..=90).contains(&tight.remaps),
        "free pages are remapped, at most the 90 the request needs: {}",
        tight.remaps
    );

    let native = replay(&t, Policy::Native, &o, &mut |_| {}).unwrap();
    assert_eq!(native.ooms, 0);
    assert_eq!(native.peak_reserved_bytes, 380 * MIB);
    assert_eq!(native.remaps, 0);
    assert!((native.overhead_pct() - 90.0).abs() < 1e-9);

    // Every policy replays every event and none of them leaks bytes into `live`.
    for p in Policy::ALL {
        let r = replay(&t, p, &o, &mut |_| {}).unwrap();
        assert_eq!(r.events, t.events.len() as u64, "{p}");
        assert!(r.peak_reserved_bytes >= r.peak_live_bytes, "{p}");
    }
}

#[test]
fn pinned_segments_min_capacity() {
    let t = parse(&pinned_segments());
    let o = opts(1 << 30);
    let peak = trace_peak_live(&t);
    let tessera = min_capacity(&t, Policy::Tessera, &o, peak, None)
        .unwrap()
        .unwrap();
    assert!(
        tessera <= peak + PAGE,
        "tessera needs {} MiB",
        tessera / MIB
    );
    assert_eq!(tessera, 200 * MIB);
    assert_eq!(
        min_capacity(&t, Policy::Native, &o, peak, None).unwrap(),
        Some(380 * MIB)
    );
    // A known fit (the peak reserved of a replay with no OOM) gives the same answer.
    assert_eq!(
        min_capacity(&t, Policy::Native, &o, peak, Some(380 * MIB)).unwrap(),
        Some(380 * MIB)
    );
    // An empty trace needs nothing.
    assert_eq!(
        min_capacity(&parse("# nothing\n"), Policy::Native, &o, 0, None).unwrap(),
        None
    );
    // Capacity given too small: the search goes up and still finds the answer.
    assert_eq!(
        min_capacity(&t, Policy::Native, &opts(64 * MIB), peak, None).unwrap(),
        Some(380 * MIB)
    );
}

#[test]
fn an_oom_is_counted_and_its_free_skipped() {
    // Two 100 MiB blocks on a 150 MiB device: the second fails, its free is skipped, and the
    // third allocation, after the first is freed, succeeds.
    let csv = format!(
        "a,1,{m},0\na,2,{m},0\nf,2\nf,1\na,3,{m},0\nf,3\n",
        m = 100 * MIB
    );
    let t = parse(&csv);
    for p in Policy::ALL {
        let r = replay(&t, p, &opts(150 * MIB), &mut |_| {}).unwrap();
        assert_eq!(r.ooms, 1, "{p}");
        assert_eq!(r.oom_events, vec![1], "{p}");
        assert_eq!(r.events, 6, "{p}");
        assert_eq!(r.peak_live_bytes, 100 * MIB, "{p}");
    }
}

#[test]
fn small_requests_share_pages() {
    // 1000 allocations of 1 KiB: live 1000 KiB; every policy needs at most one or two 2 MiB
    // pieces, and tessera exactly one page.
    let mut csv = String::new();
    for id in 0..1000 {
        csv += &format!("a,{id},1024,0\n");
    }
    let t = parse(&csv);
    let r = replay(&t, Policy::Tessera, &opts(1 << 30), &mut |_| {}).unwrap();
    assert_eq!(r.peak_live_bytes, 1000 * 1024);
    assert_eq!(r.peak_reserved_bytes, PAGE);
    let n = replay(&t, Policy::Native, &opts(1 << 30), &mut |_| {}).unwrap();
    assert_eq!(
        n.peak_reserved_bytes, PAGE,
        "native: one 2 MiB small segment"
    );
}

#[test]
fn streams_are_kept_apart_and_counted() {
    // The same sizes on two streams: a block freed on stream 7 is not reused by stream 9 in the
    // PyTorch rules, so native needs two segments.
    let csv = format!("a,1,{m},7\nf,1\na,2,{m},9\nf,2\n", m = 12 * MIB);
    let t = parse(&csv);
    assert_eq!(t.streams, vec![7, 9]);
    let n = replay(&t, Policy::Native, &opts(1 << 30), &mut |_| {}).unwrap();
    assert_eq!(n.peak_reserved_bytes, 24 * MIB);
}

#[test]
fn driver_calls_are_counted_by_kind() {
    let t = parse(&pinned_segments());
    let r = replay(&t, Policy::Native, &opts(1 << 30), &mut |_| {}).unwrap();
    let calls: std::collections::HashMap<_, _> = r
        .driver_calls
        .iter()
        .map(|&(c, n)| (c.cuda_name(), n))
        .collect();
    // Ten 20 MiB segments and one of 180 MiB; nothing freed during the replay.
    assert_eq!(calls.get("cuMemAlloc"), Some(&11));
    assert_eq!(calls.get("cuMemFree"), None);
    let v = replay(&t, Policy::Tessera, &opts(1 << 30), &mut |_| {}).unwrap();
    let maps = v
        .driver_calls
        .iter()
        .find(|(c, _)| c.cuda_name() == "cuMemMap")
        .map(|&(_, n)| n)
        .unwrap_or(0);
    assert!(maps >= 100, "at least one map per page: {maps}");
}

#[test]
fn verify_checks_every_allocation_on_real_memory() {
    let t = parse(&pinned_segments());
    let o = ReplayOptions {
        verify: true,
        ..opts(1 << 30)
    };
    for p in Policy::ALL {
        let r = replay(&t, p, &o, &mut |_| {}).unwrap();
        assert_eq!(r.ooms, 0, "{p}");
    }
}

#[test]
fn samples_track_reserved_and_live() {
    let t = parse(&pinned_segments());
    let o = ReplayOptions {
        samples: 10,
        ..opts(1 << 30)
    };
    let r = replay(&t, Policy::Native, &o, &mut |_| {}).unwrap();
    // 192 events in windows of ceil(192 / 10) = 20, and a last one for the rest.
    let ends: Vec<usize> = r.samples.iter().map(|s| s.event).collect();
    assert_eq!(ends, [20, 40, 60, 80, 100, 120, 140, 160, 180, 192]);
    // Native: ten 20 MiB segments by event 100, frees until 190, the 180 MiB segment at 191.
    let reserved: Vec<u64> = r.samples.iter().map(|s| s.reserved / MIB).collect();
    assert_eq!(reserved, [40, 80, 120, 160, 200, 200, 200, 200, 200, 380]);
    // Live: 2 MiB per allocation up to event 100; after that a window's peak is its start (it
    // only frees), except the last, which holds the 180 MiB spike though it is freed before the
    // window closes.
    let live: Vec<u64> = r.samples.iter().map(|s| s.live / MIB).collect();
    assert_eq!(live, [40, 80, 120, 160, 200, 200, 160, 120, 80, 200]);
    assert_eq!(
        r.samples.iter().map(|s| s.reserved).max(),
        Some(r.peak_reserved_bytes)
    );
    assert_eq!(
        r.samples.iter().map(|s| s.live).max(),
        Some(r.peak_live_bytes)
    );
    assert!(r.samples.windows(2).all(|w| w[0].event < w[1].event));
}

#[test]
fn run_gives_one_row_per_policy_with_min_capacity() {
    let t = parse(&pinned_segments());
    let measures = rp::Measures {
        min_capacity: true,
        explain: true,
    };
    let report = rp::run(&t, &Policy::ALL, &opts(1 << 30), measures, &mut |_, _| {});
    assert!(report.errors.is_empty());
    assert_eq!(report.rows.len(), 4);
    let native = &report.rows[2];
    assert_eq!(native.policy, "native");
    assert_eq!(native.min_capacity_bytes, Some(380 * MIB));
    assert_eq!(native.min_capacity_ratio, Some(1.9));
    assert_eq!(native.overhead_pct, 90.0);
    assert!(report.rows.iter().all(|r| r.vs_recorded_pct.is_none()));
    let json: serde_json::Value = serde_json::from_str(&native.to_json()).unwrap();
    for key in [
        "trace",
        "policy",
        "events",
        "peak_live_bytes",
        "peak_reserved_bytes",
        "overhead_pct",
        "ooms",
        "remaps",
        "seconds",
        "events_per_s",
        "min_capacity_bytes",
        "min_capacity_ratio",
        "driver_calls",
    ] {
        assert!(json.get(key).is_some(), "missing {key}");
    }
    assert_eq!(json["peak_reserved_bytes"], 380 * MIB);
    let table = rp::report::render_table(&report.rows);
    for p in Policy::ALL {
        assert!(table.contains(p.name()), "{table}");
    }
    assert!(table.contains("380.00 MiB"), "{table}");

    // --explain: every byte at each moment is counted once, and the table names the causes.
    for row in &report.rows {
        let remapping = row.policy == "tessera" || row.policy == "legacy";
        assert_eq!(
            row.remaps_per_1000_at_min_capacity.is_some(),
            remapping,
            "{}",
            row.policy
        );
        let peak = row
            .explain_at_peak
            .as_ref()
            .expect("a breakdown at the peak");
        assert_eq!(peak.capacity_bytes, None);
        let at_min = row
            .explain_at_min_capacity
            .as_ref()
            .expect("one at min capacity");
        assert_eq!(at_min.capacity_bytes, row.min_capacity_bytes);
        assert_eq!(at_min.event, peak.event, "the same moment");
        assert_eq!(
            at_min.breakdown.requested_bytes, row.peak_live_bytes,
            "{}: the peak of live bytes",
            row.policy
        );
        let below = row.explain_below_min_capacity.as_ref().expect("one below");
        assert!(below.failed_request_bytes.is_some());
        assert_eq!(
            below.capacity_bytes,
            row.min_capacity_bytes.map(|c| c - 2 * MIB)
        );
        for m in [peak, at_min, below] {
            let b = &m.breakdown;
            assert_eq!(b.total(), b.reserved_bytes, "{}: {b:?}", row.policy);
            assert!(m.capacity_bytes.is_none_or(|c| c >= b.reserved_bytes));
        }
    }
    let json: serde_json::Value = serde_json::from_str(&native.to_json()).unwrap();
    let at_min = &json["explain_at_min_capacity"];
    for key in [
        "event",
        "capacity_bytes",
        "requested_bytes",
        "large_free_bytes",
        "free_page_bytes",
    ] {
        assert!(at_min.get(key).is_some(), "missing {key} in {at_min}");
    }
    let explained = rp::report::render_explain(&report.rows);
    for col in [
        "rounding",
        "small free slots",
        "large free in used pages",
        "free pages",
        "unreserved",
    ] {
        assert!(explained.contains(col), "{explained}");
    }
    assert!(explained.contains("below min (OOM)"), "{explained}");
}

#[test]
fn a_trace_written_by_the_library_replays_the_same() {
    let path = std::env::temp_dir().join(format!("tessera-trace-{}.csv", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sim = Arc::new(SimDriver::new(SimConfig {
        capacity: 1 << 30,
        ..SimConfig::default()
    }));
    let t = Tessera::new(sim, Config::default()).unwrap();
    let before = t.allocate(0, 4096, Stream(0)).unwrap(); // not traced
    t.trace_to(&path).unwrap();
    assert!(t.trace_to(&path).is_err(), "one trace at a time");
    let a = t.allocate(0, 3 * MIB, Stream(0)).unwrap();
    let b = t.allocate(0, 100, Stream(5)).unwrap();
    t.free(0, a).unwrap();
    assert!(t.free(0, a).is_err(), "a double free is not traced");
    let c = t.allocate(0, 7 * MIB, Stream(0)).unwrap();
    t.free(0, before).unwrap(); // allocated before tracing: not in the trace
    t.free(0, b).unwrap();
    t.free(0, c).unwrap();
    t.flush_trace();
    drop(t);

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("# {"), "{text}");
    assert_eq!(
        &lines[1..],
        &[
            format!("a,1,{},0", 3 * MIB).as_str(),
            "a,2,100,5",
            "f,1",
            format!("a,1,{},0", 7 * MIB).as_str(),
            "f,2",
            "f,1"
        ]
    );
    let tr = trace::load(&path, 0).unwrap();
    assert!(tr.problems.is_empty());
    assert_eq!(tr.events.len(), 6);
    assert!(matches!(
        tr.events[0].op,
        Op::Alloc { size, .. } if size == 3 * MIB
    ));
    let r = replay(&tr, Policy::Tessera, &opts(1 << 30), &mut |_| {}).unwrap();
    assert_eq!(r.peak_live_bytes, 7 * MIB + 100);
    let _ = std::fs::remove_file(&path);
}

#[test]
fn a_trace_of_two_threads_is_consistent() {
    // Threads allocate and free the same sizes, so pointers move between them: the log must
    // never show an allocation of a pointer before the free that released it.
    let path = std::env::temp_dir().join(format!("tessera-trace-mt-{}.csv", std::process::id()));
    let _ = std::fs::remove_file(&path);
    let sim = Arc::new(SimDriver::new(SimConfig {
        capacity: 1 << 30,
        backing: tessera::driver::sim::Backing::Bookkeeping,
        ..SimConfig::default()
    }));
    let t = Arc::new(Tessera::new(sim, Config::default()).unwrap());
    t.trace_to(&path).unwrap();
    const THREADS: usize = 4;
    const PAIRS: u64 = 30_000;
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let t = Arc::clone(&t);
            std::thread::spawn(move || {
                for i in 0..PAIRS {
                    let size = if i % 3 == 0 { 3 * MIB } else { 4096 };
                    let p = t.allocate(0, size, Stream(0)).unwrap();
                    t.free(0, p).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    drop(t);
    let tr = trace::load(&path, 0).unwrap();
    assert!(
        tr.problems.is_empty(),
        "{:?}",
        &tr.problems[..3.min(tr.problems.len())]
    );
    // Every event is there: a free logged after another thread's allocation of the same pointer
    // would silently lose events.
    assert_eq!(tr.events.len() as u64, THREADS as u64 * PAIRS * 2);
    let _ = std::fs::remove_file(&path);
}
