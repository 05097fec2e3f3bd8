//! The `tessera` command end to end: the table, `--json`, `--plot`, `--min-capacity`, bad input
//! and exit codes, `tessera info`.

use std::path::PathBuf;
use std::process::{Command, Output};

const MIB: u64 = 1 << 20;

fn tessera(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tessera"))
        .args(args)
        .output()
        .expect("the tessera binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The `--json` output: one object per line.
fn json_rows(o: &Output) -> Vec<serde_json::Value> {
    stdout(o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A file in a fresh temporary folder of this test.
fn temp(name: &str, test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tessera-cli-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

/// See tests/replay.rs: native needs 380 MiB where the peak is 200 MiB.
fn pinned_segments(test: &str) -> PathBuf {
    let mut csv = String::new();
    for id in 0..100 {
        csv += &format!("a,{id},{},0\n", 2 * MIB);
    }
    for id in (0..100).filter(|id| id % 10 != 0) {
        csv += &format!("f,{id}\n");
    }
    csv += &format!("a,1000,{},0\nf,1000\n", 180 * MIB);
    let p = temp("pinned.csv", test);
    std::fs::write(&p, csv).unwrap();
    p
}

#[test]
fn replay_prints_the_side_by_side_table() {
    let trace = pinned_segments("table");
    let o = tessera(&["replay", trace.to_str().unwrap(), "--capacity", "1GiB"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    for word in [
        "policy",
        "peak live",
        "peak reserved",
        "overhead",
        "tessera",
        "legacy",
        "native",
        "expandable",
        "380.00 MiB",
        "90.0%",
        "cuMemAlloc",
    ] {
        assert!(out.contains(word), "no {word:?} in\n{out}");
    }
}

#[test]
fn json_has_one_object_per_policy_with_every_field() {
    let trace = pinned_segments("json");
    let o = tessera(&[
        "replay",
        trace.to_str().unwrap(),
        "--capacity",
        "1GiB",
        "--json",
        "--min-capacity",
        "--policy",
        "native,tessera",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = json_rows(&o);
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["policy"], "native");
    assert_eq!(rows[1]["policy"], "tessera");
    for r in &rows {
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
        ] {
            assert!(r.get(key).is_some(), "no {key} in {r}");
        }
        assert_eq!(r["events"], 192);
        assert_eq!(r["peak_live_bytes"], 200 * MIB);
    }
    assert_eq!(rows[0]["min_capacity_bytes"], 380 * MIB);
    assert_eq!(rows[0]["min_capacity_ratio"], 1.9);
    assert_eq!(rows[1]["min_capacity_bytes"], 200 * MIB);
    assert_eq!(rows[1]["min_capacity_ratio"], 1.0);
}

#[test]
fn min_capacity_ratio_is_to_the_traces_peak_even_with_ooms() {
    let trace = pinned_segments("ratio");
    let o = tessera(&[
        "replay",
        trace.to_str().unwrap(),
        "--capacity",
        "64MiB",
        "--json",
        "--min-capacity",
        "--policy",
        "native,tessera,native",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = json_rows(&o);
    assert_eq!(rows.len(), 2, "a policy named twice is replayed once");
    assert!(rows[0]["ooms"].as_u64().unwrap() > 0);
    assert_eq!(rows[0]["min_capacity_ratio"], 1.9);
    assert_eq!(rows[1]["min_capacity_ratio"], 1.0);
}

#[test]
fn ooms_at_a_small_capacity_are_counted() {
    let trace = pinned_segments("ooms");
    let o = tessera(&[
        "replay",
        trace.to_str().unwrap(),
        "--capacity",
        "300MiB",
        "--json",
        "--policy",
        "native,tessera",
    ]);
    assert!(o.status.success(), "OOMs are results, not failures");
    let rows = json_rows(&o);
    assert_eq!(rows[0]["ooms"], 1);
    assert_eq!(rows[1]["ooms"], 0);
}

#[test]
fn plot_writes_an_svg_with_every_policy() {
    let trace = pinned_segments("plot");
    let svg = temp("out.svg", "plot");
    let o = tessera(&[
        "replay",
        trace.to_str().unwrap(),
        "--capacity",
        "300MiB",
        "--plot",
        svg.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.starts_with("<svg"), "{}", &text[..100.min(text.len())]);
    for p in ["tessera", "legacy", "native", "expandable", "live"] {
        assert!(text.contains(p), "no {p} in the plot");
    }
}

#[test]
fn malformed_and_missing_traces_fail_with_their_place_and_others_still_run() {
    let bad = temp("bad.csv", "bad");
    std::fs::write(&bad, "a,1,4096,0\nf,1\nx,2\n").unwrap();
    let good = pinned_segments("bad");
    let missing = temp("missing.csv", "bad");
    let o = tessera(&[
        "replay",
        bad.to_str().unwrap(),
        missing.to_str().unwrap(),
        good.to_str().unwrap(),
        "--policy",
        "tessera",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("{}:3: expected", bad.display())),
        "{err}"
    );
    assert!(err.contains(&missing.display().to_string()), "{err}");
    assert!(
        stdout(&o).contains("pinned.csv"),
        "the good trace is reported"
    );
}

#[test]
fn unknown_frees_are_reported_counted_and_the_replay_goes_on() {
    let t = temp("unknown.csv", "unknown");
    std::fs::write(&t, "a,1,4096,0\nf,9\nf,1\n").unwrap();
    let o = tessera(&[
        "replay",
        t.to_str().unwrap(),
        "--json",
        "--policy",
        "native",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains(":2:"), "{}", stderr(&o));
    let row: serde_json::Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    assert_eq!(row["dropped_events"], 1);
    assert_eq!(row["events"], 2);
}

#[test]
fn bad_arguments_are_rejected() {
    let trace = pinned_segments("args");
    let t = trace.to_str().unwrap();
    for args in [
        vec!["replay", t, "--policy", "best"],
        vec!["replay", t, "--capacity", "lots"],
        vec!["replay", t, "--capacity", "0"],
        vec!["replay", t, "--capacity", "9TiB"],
        vec!["replay", t, "--granularity", "3"],
        vec!["replay", t, "--conf", "colour:blue"],
        vec!["replay"],
    ] {
        let o = tessera(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(!stderr(&o).is_empty());
    }
}

#[test]
fn info_describes_a_simulated_device() {
    let o = tessera(&[
        "info",
        "--driver",
        "sim",
        "--sim",
        "devices:2,capacity:8GiB,granularity:4MiB",
    ]);
    assert!(o.status.success());
    let out = stdout(&o);
    assert!(out.contains("2 devices"), "{out}");
    assert!(
        out.contains("device 1: memory 8.00 GiB free of 8.00 GiB"),
        "{out}"
    );
    assert!(out.contains("granularity 4.00 MiB"), "{out}");
}

#[test]
fn info_without_a_gpu_exits_cleanly() {
    let o = tessera(&["info"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("no GPU") || out.contains("device 0:"), "{out}");
}

#[test]
fn a_pytorch_snapshot_gets_a_recorded_row() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/snapshot_small.pickle"
    );
    let o = tessera(&["replay", fixture, "--json", "--policy", "native,tessera"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let rows = json_rows(&o);
    let policies: Vec<&str> = rows.iter().map(|r| r["policy"].as_str().unwrap()).collect();
    assert_eq!(policies, ["native", "tessera", "recorded"]);
    // The fixture's segments (scripts/make_snapshot_fixture.py): 42 MiB reserved at the peak;
    // native needs 24 MiB for the same 18 MiB live (6 MiB of it live before recording began),
    // 42.9 % less.
    assert_eq!(rows[2]["peak_reserved_bytes"], 42 * MIB);
    assert_eq!(rows[2]["peak_live_bytes"], 18 * MIB);
    assert_eq!(rows[0]["peak_reserved_bytes"], 24 * MIB);
    assert_eq!(rows[0]["vs_recorded_pct"], -42.9);
    assert_eq!(rows[0]["reconstructed_blocks"], 1);
    assert_eq!(rows[0]["reconstructed_bytes"], 6 * MIB);
    assert_eq!(rows[0]["models_recorded"], "native");
    assert_eq!(
        rows[2]["recorded_config"],
        "expandable_segments:False (allocator_settings)"
    );
    // The recorded OOM: entry 10, 64 MiB asked for, 123 MiB free.
    assert_eq!(rows[2]["ooms"], 1);
    assert_eq!(rows[2]["first_oom"]["line"], 10);
    assert_eq!(rows[2]["first_oom"]["size_bytes"], 64 * MIB);
    assert_eq!(rows[2]["first_oom"]["device_free_bytes"], 123 * MIB);
    assert_eq!(
        rows[2]["headline"],
        "OOM at entry 10: 64.00 MiB, train.py:42 in step"
    );
    assert_eq!(rows[0]["headline"], "fits");

    let table = stdout(&tessera(&["replay", fixture]));
    assert!(
        table.contains("recorded") && table.contains("vs recorded"),
        "{table}"
    );
    let bad = tessera(&["replay", fixture, "--device", "7"]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(stderr(&bad).contains("device 7"), "{}", stderr(&bad));
}

#[test]
fn exports_of_traces_with_the_same_name_do_not_overwrite_each_other() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/data/snapshot_small.pickle"
    );
    let dir = std::env::temp_dir().join(format!("tessera-cli-export-{}", std::process::id()));
    let export = dir.join("out");
    let (a, b) = (dir.join("rank0"), dir.join("rank1"));
    for d in [&a, &b] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::copy(fixture, d.join("snap.pickle")).unwrap();
    }
    let o = tessera(&[
        "replay",
        a.join("snap.pickle").to_str().unwrap(),
        b.join("snap.pickle").to_str().unwrap(),
        "--policy",
        "native",
        "--export",
        export.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let mut names: Vec<String> = std::fs::read_dir(&export)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["snap.pickle-2.native.pickle", "snap.pickle.native.pickle"]
    );
    let _ = std::fs::remove_dir_all(&dir);
}
