//! PyTorch snapshots with known answers (`scripts/make_snapshot_fixture.py` writes them and states
//! every figure checked here): the memory live before recording, reconstructed both ways; a ring
//! buffer that wrapped; every action; a recorded OOM; two devices; expandable-segments settings;
//! bad input; an old format. Then the export: each policy's replay written in PyTorch's format
//! and read back to the same peaks.

mod common;

use std::path::PathBuf;
use tessera::replay::engine::{replay, trace_peak_live};
use tessera::replay::export::{export_path, snapshot_of};
use tessera::replay::trace::{
    load_devices, parse_snapshot, Devices, RecordedPoint, SettingsSource, Trace,
};
use tessera::replay::{self as rp, Policy, ReplayOptions};

use common::MIB;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(format!("snapshot_{name}.pickle"))
}

fn device(name: &str, device: usize) -> Trace {
    let bytes = std::fs::read(fixture(name)).unwrap();
    parse_snapshot(name, &bytes, device).unwrap_or_else(|e| panic!("{e}"))
}

fn point(event: usize, reserved: u64) -> RecordedPoint {
    RecordedPoint { event, reserved }
}

fn recorded_peak(t: &Trace) -> u64 {
    t.recorded.iter().map(|p| p.reserved).max().unwrap_or(0)
}

fn problem_lines(t: &Trace) -> Vec<u64> {
    t.problems.iter().map(|p| p.line).collect()
}

/// The figures every fixture states: events, reconstructed (blocks, bytes), peak live, recorded
/// points.
fn check(
    t: &Trace,
    events: usize,
    reconstructed: (u64, u64),
    peak_live: u64,
    recorded: &[RecordedPoint],
) {
    assert_eq!(t.events.len(), events, "{}: events", t.name);
    assert_eq!(
        (t.reconstructed.blocks, t.reconstructed.bytes),
        reconstructed,
        "{}: reconstructed",
        t.name
    );
    assert_eq!(trace_peak_live(t), peak_live, "{}: peak live", t.name);
    assert_eq!(t.recorded, recorded, "{}: recorded", t.name);
    for e in &t.events[..reconstructed.0 as usize] {
        assert_eq!(e.line, 0, "reconstructed events come first, with line 0");
    }
}

#[test]
fn preexisting_blocks_both_ways() {
    let t = device("preexisting", 0);
    check(
        &t,
        7,
        (3, 12 * MIB + 400),
        20 * MIB + 400,
        &[point(0, 22 * MIB), point(3, 42 * MIB)],
    );
    assert_eq!(t.reconstructed.from_segments, 2);
    assert_eq!(t.reconstructed.from_frees, 1);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
}

#[test]
fn a_wrapped_ring_buffer() {
    let t = device("wrapped", 0);
    check(
        &t,
        11,
        (4, 27 * MIB),
        27 * MIB,
        &[point(0, 60 * MIB), point(7, 40 * MIB)],
    );
    assert_eq!(t.reconstructed.from_segments, 1);
    assert_eq!(t.reconstructed.from_frees, 3);
    assert!(t.problems.is_empty(), "{:?}", t.problems);
}

#[test]
fn two_devices_expandable_settings_every_action_and_an_oom() {
    let traces = load_devices(&fixture("expandable"), Devices::All).unwrap();
    assert_eq!(traces.len(), 2);
    let (d0, d1) = (&traces[0], &traces[1]);
    assert!(
        d0.name.ends_with("snapshot_expandable.pickle [device 0]"),
        "{}",
        d0.name
    );
    assert_eq!((d0.device, d1.device), (Some(0), Some(1)));
    // Device 0: maps +2, +2 MiB, an unmap and a map again: 0 at the start, 4 MiB at the peak.
    check(
        d0,
        3,
        (0, 0),
        4 * MIB,
        // The unmap and the map after the third event: the later point at event 3 stays.
        &[point(0, 2 * MIB), point(1, 4 * MIB), point(3, 4 * MIB)],
    );
    assert_eq!(d0.recorded_ooms.len(), 1);
    let oom = &d0.recorded_ooms[0];
    assert_eq!(
        (oom.line, oom.size, oom.device_free),
        (5, 8 * MIB, Some(MIB))
    );
    let s = d0.settings.as_ref().unwrap();
    assert!(s.expandable_segments);
    assert_eq!(s.source, SettingsSource::AllocatorSettings);
    assert_eq!(s.policy(), Policy::Expandable);
    assert_eq!(s.conf.as_deref(), Some("expandable_segments:True"));
    // Device 1: one block live at dump that the trace never allocates.
    check(d1, 3, (1, 512), 1536, &[point(0, 2 * MIB)]);
    // --device 1 reads the same trace under the file's own name.
    let one = load_devices(&fixture("expandable"), Devices::One(1)).unwrap();
    assert_eq!(one[0].events, d1.events);
    assert_eq!(one[0].name, fixture("expandable").display().to_string());
}

#[test]
fn bad_input_is_named_counted_and_skipped() {
    let t = device("bad", 0);
    check(
        &t,
        3,
        (1, 4 * MIB),
        6 * MIB,
        &[point(0, 20 * MIB), point(1, 22 * MIB)],
    );
    assert_eq!(problem_lines(&t), [0, 3, 4, 7, 8, 9]);
    let m: Vec<&str> = t.problems.iter().map(|p| p.message.as_str()).collect();
    assert!(
        m[0].contains("no segment held it when recording began"),
        "{}",
        m[0]
    );
    assert!(
        m[1].contains("overlaps the live block at 0x7f9000400000"),
        "{}",
        m[1]
    );
    assert!(
        m[2].contains("whose alloc (entry 3) was dropped"),
        "{}",
        m[2]
    );
    assert!(
        m[3].contains("already freed at entry 6 (a double free)"),
        "{}",
        m[3]
    );
    assert!(m[4].contains("no segment held it"), "{}", m[4]);
    assert_eq!(m[5], "alloc of 0 bytes at address 0x7f9000800000");
}

#[test]
fn a_run_at_its_devices_limit_released_and_retried() {
    let t = device("retry", 0);
    check(
        &t,
        4,
        (0, 0),
        45 * MIB,
        &[point(0, 20 * MIB), point(2, 40 * MIB), point(3, 50 * MIB)],
    );
    assert_eq!(t.recorded_retries.len(), 1);
    let r = t.recorded_retries[0];
    assert_eq!((r.line, r.reserved_before, r.size), (7, 40 * MIB, 30 * MIB));
    let report = rp::run(
        &t,
        &[Policy::Native],
        &opts(1 << 30),
        rp::Measures::default(),
        &mut |_, _| {},
    );
    let recorded = report.rows.last().unwrap();
    assert_eq!(recorded.recorded_retries, 1);
    assert_eq!(recorded.recorded_limit_bytes, Some(70 * MIB));
    let notes = rp::report::render_notes(&report.rows);
    assert!(
        notes.contains("between 50.00 MiB and 70.00 MiB; compare with --capacity 50MiB"),
        "{notes}"
    );
}

#[test]
fn an_old_format() {
    let t = device("oldformat", 0);
    check(&t, 3, (1, 1024), 1536, &[point(0, 2 * MIB)]);
    assert_eq!(t.event_frames, vec![None; 3], "no frames anywhere");
    let s = t.settings.as_ref().unwrap();
    assert_eq!(s.source, SettingsSource::Inferred);
    assert!(!s.expandable_segments);
}

fn opts(capacity: u64) -> ReplayOptions {
    common::replay_opts(capacity)
}

#[test]
fn the_replay_reports_peaks_reconstruction_and_the_first_oom() {
    for (name, live, recorded) in [
        ("preexisting", 20 * MIB + 400, 42 * MIB),
        ("wrapped", 27 * MIB, 60 * MIB),
        ("bad", 6 * MIB, 22 * MIB),
        ("small", 18 * MIB, 42 * MIB),
    ] {
        let t = device(name, 0);
        let r = rp::run(
            &t,
            &Policy::ALL,
            &opts(1 << 30),
            rp::Measures::default(),
            &mut |_, _| {},
        );
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        for row in &r.rows {
            assert_eq!(row.peak_live_bytes, live, "{name} {}", row.policy);
            assert_eq!(row.reconstructed_bytes, t.reconstructed.bytes);
            assert_eq!(row.models_recorded.as_deref(), Some("native"));
        }
        let rec = r.rows.last().unwrap();
        assert_eq!(
            (rec.policy.as_str(), rec.peak_reserved_bytes),
            ("recorded", recorded)
        );
    }
    // At a capacity below the wrapped trace's live start, every policy fails on the memory live
    // before the first entry, and says so.
    let t = device("wrapped", 0);
    let r = rp::run(
        &t,
        &Policy::ALL,
        &opts(20 * MIB),
        rp::Measures::default(),
        &mut |_, _| {},
    );
    for row in r.rows.iter().filter(|r| r.policy != "recorded") {
        let oom = row.first_oom.as_ref().expect("an OOM");
        assert_eq!(oom.line, 0, "{}", row.policy);
        assert!(
            row.headline.starts_with("OOM before the first entry: "),
            "{}",
            row.headline
        );
        assert!(oom.live_bytes.unwrap() <= 20 * MIB);
        assert!(row.ooms >= 1);
    }
}

#[test]
fn exports_read_back_to_the_same_peaks() {
    let dir = std::env::temp_dir().join(format!("tessera-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for name in [
        "preexisting",
        "wrapped",
        "expandable",
        "bad",
        "small",
        "oldformat",
    ] {
        for t in load_devices(&fixture(name), Devices::All).unwrap() {
            for policy in Policy::ALL {
                for capacity in [1u64 << 30, 26 * MIB] {
                    let o = replay(
                        &t,
                        policy,
                        &ReplayOptions {
                            record: true,
                            ..opts(capacity)
                        },
                        &mut |_| {},
                    )
                    .unwrap();
                    let snap = snapshot_of(&t, &o, capacity).unwrap();
                    let path = export_path(&dir, &t, policy);
                    std::fs::write(&path, snap.to_pickle()).unwrap();
                    let back = load_devices(&path, Devices::One(t.device.unwrap()))
                        .unwrap_or_else(|e| panic!("{e}"))
                        .pop()
                        .unwrap();
                    let what = format!("{} {policy} at {capacity}", t.name);
                    assert!(back.problems.is_empty(), "{what}: {:?}", back.problems);
                    assert_eq!(back.reconstructed.blocks, 0, "{what}: all in the trace");
                    assert_eq!(trace_peak_live(&back), o.peak_live_bytes, "{what}");
                    assert_eq!(back.recorded_ooms.len() as u64, o.ooms, "{what}");
                    let peak = recorded_peak(&back);
                    if policy == Policy::Tessera {
                        // Mapped bytes: tessera may also hold created pages mapped nowhere.
                        assert!(peak <= o.peak_reserved_bytes, "{what}");
                    } else {
                        assert_eq!(peak, o.peak_reserved_bytes, "{what}");
                    }
                    // Frames travel: every event with frames in the input has them in the export.
                    let with = |t: &Trace| t.event_frames.iter().filter(|f| f.is_some()).count();
                    if o.ooms == 0 && t.problems.is_empty() {
                        assert_eq!(with(&back), with(&t), "{what}");
                    }
                    let s = back.settings.as_ref().unwrap();
                    assert_eq!(s.expandable_segments, policy == Policy::Expandable);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A snapshot made here, with tessera's own pickle writer: one segment of `blocks` (address,
/// size, requested, state) on device 0, and `entries` (action, addr, size).
fn made(blocks: &[(u64, u64, u64, &str)], entries: &[(&str, u64, u64)]) -> Trace {
    use tessera::pickle::Value;
    let total: u64 = blocks.iter().map(|b| b.1).sum();
    let blocks = blocks
        .iter()
        .map(|&(address, size, requested, state)| {
            Value::dict(vec![
                ("address", Value::int(address)),
                ("size", Value::int(size)),
                ("requested_size", Value::int(requested)),
                ("state", Value::str(state)),
            ])
        })
        .collect();
    let segment = Value::dict(vec![
        ("device", Value::int(0)),
        ("address", Value::int(0x1000u64)),
        ("total_size", Value::int(total.max(1 << 20))),
        ("stream", Value::int(0)),
        ("blocks", Value::list(blocks)),
    ]);
    let trace = entries
        .iter()
        .map(|&(action, addr, size)| {
            Value::dict(vec![
                ("action", Value::str(action)),
                ("addr", Value::int(addr)),
                ("size", Value::int(size)),
            ])
        })
        .collect();
    let top = Value::dict(vec![
        ("segments", Value::list(vec![segment])),
        ("device_traces", Value::list(vec![Value::list(trace)])),
    ]);
    parse_snapshot("made", &tessera::pickle::to_vec(&top), 0).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn blocks_of_zero_bytes_or_asking_for_more_than_their_size() {
    // A live block of 0 bytes is named and skipped; one whose requested_size exceeds its size is
    // taken at its size.
    let t = made(
        &[
            (0x1000, 0, 0, "active_allocated"),
            (0x1000, 4096, 1 << 62, "active_allocated"),
        ],
        &[("alloc", 0x2000, 512)],
    );
    assert_eq!((t.reconstructed.blocks, t.reconstructed.bytes), (1, 4096));
    assert_eq!(problem_lines(&t), [0]);
    assert!(
        t.problems[0].message.ends_with("a block of 0 bytes"),
        "{:?}",
        t.problems
    );
    assert_eq!(trace_peak_live(&t), 4096 + 512);
}

#[test]
fn a_dropped_overlapping_alloc_does_not_shift_later_pairs() {
    let mut entries = vec![
        ("alloc", 0x1000, 4096),
        ("alloc", 0x1800, 256), // overlaps the block at 0x1000: dropped
        ("free_completed", 0x1000, 4096),
    ];
    for _ in 0..3 {
        entries.extend([
            ("alloc", 0x1800, 256),
            ("free_requested", 0x1800, 256),
            ("free_completed", 0x1800, 256),
        ]);
    }
    let t = made(&[], &entries);
    assert_eq!(problem_lines(&t), [2], "{:?}", t.problems);
    assert_eq!(t.events.len(), 8);
    assert_eq!(trace_peak_live(&t), 4096);
}

#[test]
fn a_block_reconstructed_from_its_free_has_no_allocation_frames() {
    // The free's frames are where it was freed, not where it was allocated.
    let t = device("preexisting", 0);
    let from_free = t.events[..3]
        .iter()
        .position(
            |e| matches!(e.op, tessera::replay::trace::Op::Alloc { size, .. } if size == 4 * MIB),
        )
        .unwrap();
    assert_eq!(t.frames_of(from_free), &[]);
    assert!(
        !t.frames_of(0).is_empty(),
        "blocks from segments keep theirs"
    );
}
