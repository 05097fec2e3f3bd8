//! The trace readers (`tessera::replay::trace`): tessera CSV (plain and gzip'd) and PyTorch
//! memory snapshots. Malformed input is an error naming the file and line; well-formed ops that
//! cannot be replayed are problems, dropped, and never break the invariants of the events that
//! remain.

mod common;
use common::files::{gzip, TempFile};

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tessera::replay::trace::{
    load, parse_csv, parse_snapshot, Event, Op, Problem, RecordedPoint, Trace, TraceError,
};

const MIB: u64 = 1 << 20;

fn csv(text: &str) -> Result<Trace, TraceError> {
    parse_csv("t.csv", text.as_bytes())
}

fn ok(text: &str) -> Trace {
    csv(text).unwrap_or_else(|e| panic!("{e}"))
}

fn alloc(line: u64, slot: u32, size: u64, stream: u32) -> Event {
    Event {
        op: Op::Alloc { slot, size, stream },
        line,
    }
}

fn free(line: u64, slot: u32) -> Event {
    Event {
        op: Op::Free { slot },
        line,
    }
}

fn problem(line: u64, message: &str) -> Problem {
    Problem {
        line,
        message: message.to_owned(),
    }
}

fn point(event: usize, reserved: u64) -> RecordedPoint {
    RecordedPoint { event, reserved }
}

/// The Display of the error reading `text`, which must be malformed.
fn malformed(text: &str) -> String {
    match csv(text) {
        Err(e @ TraceError::Malformed { .. }) => e.to_string(),
        other => panic!("{text:?}: expected a Malformed error, got {other:?}"),
    }
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/snapshot_small.pickle")
}

// ---------------------------------------------------------------------------------------------
// CSV: well-formed input

#[test]
fn csv_good_lines() {
    let t = ok("a,1,4096,0\na,2,512,0\nf,1\na,3,1048576,0\nf,2\nf,3\n");
    assert_eq!(t.name, "t.csv");
    assert_eq!(
        t.events,
        vec![
            alloc(1, 0, 4096, 0),
            alloc(2, 1, 512, 0),
            free(3, 0),
            alloc(4, 0, 1048576, 0),
            free(5, 1),
            free(6, 0),
        ]
    );
    assert_eq!(t.slots, 2, "at most two allocations were live at once");
    assert_eq!(t.streams, vec![0]);
    assert!(t.problems.is_empty());
    assert!(t.recorded.is_empty());
    assert_eq!(t.meta, None);
}

#[test]
fn csv_empty_input_is_an_empty_trace() {
    for text in ["", "\n\n", "# only a comment\n", "   \n\t\n"] {
        let t = ok(text);
        assert!(t.events.is_empty() && t.problems.is_empty(), "{text:?}");
        assert_eq!(t.slots, 0);
        assert!(t.streams.is_empty());
    }
}

#[test]
fn csv_comments_blank_lines_and_whitespace() {
    let text = "# a comment\n\
                \n\
                a,1,100,0\n\
                \x20\x20# an indented comment, a,2,3,4\n\
                \t \n\
                \x20 a , 2 ,\t200\t, 0 \r\n\
                f ,1\r\n\
                \x20\x20f,\t2  \n\
                a,3,300,0";
    let t = ok(text);
    assert_eq!(
        t.events,
        vec![
            alloc(3, 0, 100, 0),
            alloc(6, 1, 200, 0),
            free(7, 0),
            free(8, 1),
            alloc(9, 1, 300, 0),
        ],
        "lines count every physical line; the last line needs no newline"
    );
    assert_eq!(
        t.meta, None,
        "a first-line comment that is not JSON is not metadata"
    );
}

#[test]
fn csv_metadata_on_the_first_line() {
    let t = ok("# {\"model\": \"gpt2\", \"batch\": 8, \"tags\": [\"a\"]}\na,1,64,0\n");
    assert_eq!(
        t.meta,
        Some(serde_json::json!({"model": "gpt2", "batch": 8, "tags": ["a"]}))
    );
    assert_eq!(t.events, vec![alloc(2, 0, 64, 0)]);

    // With a UTF-8 byte order mark, CRLF, no space after '#'.
    let t = ok("\u{feff}#{\"a\":1}\r\na,1,64,0\r\n");
    assert_eq!(t.meta, Some(serde_json::json!({"a": 1})));

    // Only the first line holds metadata: later JSON comments are plain comments.
    let t = ok("a,1,64,0\n# {\"model\": \"gpt2\"}\n");
    assert_eq!(t.meta, None);
    let t = ok("# header\n# {\"model\": \"gpt2\"}\n");
    assert_eq!(t.meta, None);

    // A first line that starts like metadata must be a JSON object.
    let e = malformed("# {\"model\": \n");
    assert!(
        e.starts_with(
            "t.csv:1: expected a JSON object of trace metadata after '# ', found \"{\\\"model\\\":\" ("
        ),
        "{e}"
    );
    let e = malformed("# {} trailing\n");
    assert!(
        e.starts_with("t.csv:1: expected a JSON object of trace metadata after '# '"),
        "{e}"
    );
}

#[test]
fn csv_ids_are_reused_after_free() {
    let t = ok("a,7,10,0\nf,7\na,7,20,0\na,8,30,0\nf,7\na,7,40,0\n");
    assert!(t.problems.is_empty());
    assert_eq!(
        t.events,
        vec![
            alloc(1, 0, 10, 0),
            free(2, 0),
            alloc(3, 0, 20, 0),
            alloc(4, 1, 30, 0),
            free(5, 0),
            alloc(6, 0, 40, 0),
        ]
    );
    assert_eq!(t.slots, 2);
}

#[test]
fn csv_slots_are_dense_and_the_most_recently_freed_is_reused_first() {
    let t = ok("a,100,1,0\na,200,1,0\na,300,1,0\nf,100\nf,300\na,400,1,0\na,500,1,0\na,600,1,0\n");
    let slots: Vec<u32> = t
        .events
        .iter()
        .filter_map(|e| match e.op {
            Op::Alloc { slot, .. } => Some(slot),
            Op::Free { .. } => None,
        })
        .collect();
    assert_eq!(slots, vec![0, 1, 2, 2, 0, 3]);
    assert_eq!(t.slots, 4);
}

#[test]
fn csv_streams_are_densified_in_order_of_first_use() {
    let t = ok("a,1,8,94251237138432\na,2,8,0\na,3,8,94251237138432\na,4,8,18446744073709551615\n");
    assert_eq!(t.streams, vec![94251237138432, 0, u64::MAX]);
    let streams: Vec<u32> = t
        .events
        .iter()
        .filter_map(|e| match e.op {
            Op::Alloc { stream, .. } => Some(stream),
            Op::Free { .. } => None,
        })
        .collect();
    assert_eq!(streams, vec![0, 1, 0, 2]);
}

#[test]
fn csv_large_values() {
    let t = ok("a,18446744073709551615,18446744073709551615,0\nf,18446744073709551615\n");
    assert_eq!(t.events, vec![alloc(1, 0, u64::MAX, 0), free(2, 0)]);
    assert_eq!(ok("a,007,0010,000\n").events, vec![alloc(1, 0, 10, 0)]);
}

// ---------------------------------------------------------------------------------------------
// CSV: malformed lines fail the trace, naming the file and line

#[test]
fn csv_malformed_lines() {
    let cases: &[(&str, &str)] = &[
        // Unknown operations.
        (
            "x,1",
            "t.csv:1: expected 'a,<id>,<size>,<stream>' or 'f,<id>', found \"x,1\"",
        ),
        (
            "A,1,2,0",
            "t.csv:1: expected 'a,<id>,<size>,<stream>' or 'f,<id>', found \"A,1,2,0\"",
        ),
        (
            "alloc,1,2,0",
            "t.csv:1: expected 'a,<id>,<size>,<stream>' or 'f,<id>', found \"alloc,1,2,0\"",
        ),
        (
            "1,2,3",
            "t.csv:1: expected 'a,<id>,<size>,<stream>' or 'f,<id>', found \"1,2,3\"",
        ),
        (
            ",a,1,2,0",
            "t.csv:1: expected 'a,<id>,<size>,<stream>' or 'f,<id>', found \",a,1,2,0\"",
        ),
        (
            "a;1;2;0",
            "t.csv:1: expected 'a,<id>,<size>,<stream>' or 'f,<id>', found \"a;1;2;0\"",
        ),
        // Missing and extra fields.
        (
            "a",
            "t.csv:1: expected 'a,<id>,<size>,<stream>', found \"a\"",
        ),
        (
            "a,1",
            "t.csv:1: expected 'a,<id>,<size>,<stream>', found \"a,1\"",
        ),
        (
            "a,1,2",
            "t.csv:1: expected 'a,<id>,<size>,<stream>', found \"a,1,2\"",
        ),
        (
            "a,1,2,0,9",
            "t.csv:1: expected 'a,<id>,<size>,<stream>', found \"a,1,2,0,9\"",
        ),
        (
            "a,1,2,0,",
            "t.csv:1: expected 'a,<id>,<size>,<stream>', found \"a,1,2,0,\"",
        ),
        ("f", "t.csv:1: expected 'f,<id>', found \"f\""),
        ("f,1,2", "t.csv:1: expected 'f,<id>', found \"f,1,2\""),
        ("f,1,", "t.csv:1: expected 'f,<id>', found \"f,1,\""),
        // Fields that are not unsigned integers.
        (
            "a,abc,2,0",
            "t.csv:1: expected an integer id, found \"abc\"",
        ),
        ("a,,2,0", "t.csv:1: expected an integer id, found \"\""),
        ("f,abc", "t.csv:1: expected an integer id, found \"abc\""),
        ("f,", "t.csv:1: expected an integer id, found \"\""),
        ("f,0x10", "t.csv:1: expected an integer id, found \"0x10\""),
        (
            "a,1,big,0",
            "t.csv:1: expected an integer size, found \"big\"",
        ),
        (
            "a,1,1.5,0",
            "t.csv:1: expected an integer size, found \"1.5\"",
        ),
        (
            "a,1,1e3,0",
            "t.csv:1: expected an integer size, found \"1e3\"",
        ),
        (
            "a,1,2,s",
            "t.csv:1: expected an integer stream, found \"s\"",
        ),
        ("a,1,2,", "t.csv:1: expected an integer stream, found \"\""),
        (
            "a,1 2,3,0",
            "t.csv:1: expected an integer id, found \"1 2\"",
        ),
        // Negative numbers and overflow.
        ("a,-1,2,0", "t.csv:1: expected an integer id, found \"-1\""),
        ("f,-7", "t.csv:1: expected an integer id, found \"-7\""),
        (
            "a,1,-2,0",
            "t.csv:1: expected an integer size, found \"-2\"",
        ),
        (
            "a,1,2,-1",
            "t.csv:1: expected an integer stream, found \"-1\"",
        ),
        (
            "a,1,+2,0",
            "t.csv:1: expected an integer size, found \"+2\"",
        ),
        (
            "a,18446744073709551616,2,0",
            "t.csv:1: expected an integer id, found \"18446744073709551616\"",
        ),
        // A size of 0.
        (
            "a,1,0,0",
            "t.csv:1: expected a size of at least 1 byte, found \"0\"",
        ),
        (
            " a , 1 , 000 , 0 ",
            "t.csv:1: expected a size of at least 1 byte, found \"000\"",
        ),
        // Control characters are escaped.
        (
            "a,\u{1}",
            "t.csv:1: expected 'a,<id>,<size>,<stream>', found \"a,\\u{1}\"",
        ),
    ];
    for (line, expected) in cases {
        assert_eq!(&malformed(line), expected, "line {line:?}");
        // The message starts with "expected" wherever the line is.
        let text = format!("# header\n\na,100,1,0\n{line}\nf,100\n");
        let e = csv(&text).unwrap_err();
        match &e {
            TraceError::Malformed {
                path,
                line: n,
                message,
            } => {
                assert_eq!(path, "t.csv");
                assert_eq!(*n, 4, "{line:?}");
                assert!(message.starts_with("expected "), "{message}");
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().starts_with("t.csv:4: expected "), "{e}");
    }
}

#[test]
fn csv_the_first_malformed_line_is_reported() {
    assert_eq!(
        malformed("a,1,2,0\nf,9\nbad\nalso bad\n"),
        "t.csv:3: expected 'a,<id>,<size>,<stream>' or 'f,<id>', found \"bad\""
    );
}

#[test]
fn csv_long_and_invalid_utf8_lines_are_quoted_readably() {
    let long = format!("x{}", "y".repeat(500));
    assert_eq!(
        malformed(&long),
        format!(
            "t.csv:1: expected 'a,<id>,<size>,<stream>' or 'f,<id>', found \"x{}\"...",
            "y".repeat(79)
        )
    );
    let e = parse_csv("t.csv", &b"a,\xff\xfe,1,0\n"[..]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "t.csv:1: expected an integer id, found \"\u{fffd}\u{fffd}\""
    );
}

// ---------------------------------------------------------------------------------------------
// CSV: ops that cannot be replayed are problems, and the rest still replays

#[test]
fn csv_unknown_frees_and_live_reallocations_are_problems() {
    let text = "a,1,100,0\n\
                f,7\n\
                a,2,200,0\n\
                a,1,300,5\n\
                f,1\n\
                f,1\n\
                a,1,400,0\n\
                f,2\n";
    let t = ok(text);
    assert_eq!(
        t.problems,
        vec![
            problem(2, "free of unknown id 7"),
            problem(
                4,
                "allocation of id 1, which is already live (since line 1)"
            ),
            problem(6, "free of unknown id 1"),
        ]
    );
    assert_eq!(
        t.events,
        vec![
            alloc(1, 0, 100, 0),
            alloc(3, 1, 200, 0),
            free(5, 0),
            alloc(7, 0, 400, 0),
            free(8, 1),
        ],
        "dropped lines leave no event; the first allocation of id 1 is the one freed"
    );
    assert_eq!(t.streams, vec![0], "a dropped allocation uses no stream");
    assert_eq!(t.slots, 2);
}

// ---------------------------------------------------------------------------------------------
// load: files, gzip, errors

#[test]
fn load_reads_plain_csv_and_names_the_trace_after_the_path() {
    let text = "# {\"run\": 1}\na,1,4096,0\nf,1\n";
    let f = TempFile::with("plain.csv", text.as_bytes());
    let t = load(&f.0, 0).unwrap();
    assert_eq!(t.name, f.0.display().to_string());
    assert_eq!(t.events, vec![alloc(2, 0, 4096, 0), free(3, 0)]);
    assert_eq!(t.meta, Some(serde_json::json!({"run": 1})));
    // The device only matters for snapshots.
    assert_eq!(load(&f.0, 3).unwrap().events, t.events);
}

#[test]
fn load_decompresses_gzip_by_content_not_by_name() {
    let mut text = String::from("# {\"gz\": true}\n");
    for i in 0..2000u64 {
        text.push_str(&format!("a,{i},{},{}\n", 512 * (i + 1), i % 3));
        if i % 2 == 1 {
            text.push_str(&format!("f,{}\n", i - 1));
        }
    }
    let plain = ok(&text);
    let f = TempFile::with("trace.csv", &gzip(text.as_bytes()));
    let t = load(&f.0, 0).unwrap();
    assert_eq!(t.events, plain.events);
    assert_eq!(t.slots, plain.slots);
    assert_eq!(t.streams, vec![0, 1, 2]);
    assert_eq!(t.meta, Some(serde_json::json!({"gz": true})));
    assert_eq!(t.events.len(), 3000);

    // Several gzip members (as `cat a.gz b.gz` makes) are read one after the other.
    let (first, second) = text.split_at(text.find("a,1000,").unwrap());
    let mut multi = gzip(first.as_bytes());
    multi.extend(gzip(second.as_bytes()));
    let f = TempFile::with("multi.gz", &multi);
    assert_eq!(load(&f.0, 0).unwrap().events, plain.events);

    // Errors in gzip'd traces name the file and the line of the decompressed text.
    let f = TempFile::with("bad.csv.gz", &gzip(b"a,1,2,0\nf,1\nf,x\n"));
    assert_eq!(
        load(&f.0, 0).unwrap_err().to_string(),
        format!("{}:3: expected an integer id, found \"x\"", f.0.display())
    );
}

#[test]
fn load_of_truncated_or_broken_gzip_is_an_io_error() {
    let text: String = (0..5000).map(|i| format!("a,{i},64,0\n")).collect();
    let whole = gzip(text.as_bytes());
    let truncated = &whole[..whole.len() / 2];
    // Gzip magic, then a compression method that does not exist.
    let broken = [0x1f, 0x8b, 0x63, 0, 0, 0, 0, 0, 0, 0xff, 1, 2, 3];
    for (name, bytes) in [("truncated.gz", truncated), ("broken.gz", &broken[..])] {
        let f = TempFile::with(name, bytes);
        match load(&f.0, 0) {
            Err(e @ TraceError::Io { .. }) => assert!(
                e.to_string()
                    .starts_with(&format!("{}: cannot read: ", f.0.display())),
                "{e}"
            ),
            other => panic!("{name}: {other:?}"),
        }
    }
}

#[test]
fn load_of_a_missing_file_is_an_io_error_naming_it() {
    let f = TempFile::new("does-not-exist.csv");
    let e = load(&f.0, 0).unwrap_err();
    match &e {
        TraceError::Io { path, error } => {
            assert_eq!(path, &f.0.display().to_string());
            assert_eq!(error.kind(), std::io::ErrorKind::NotFound);
        }
        other => panic!("{other:?}"),
    }
    let shown = e.to_string();
    assert!(
        shown.starts_with(&format!("{}: cannot read: ", f.0.display())),
        "{shown}"
    );
    assert!(std::error::Error::source(&e).is_some());
}

#[test]
fn load_of_a_directory_is_an_io_error() {
    let dir = std::env::temp_dir();
    assert!(matches!(load(&dir, 0), Err(TraceError::Io { .. })));
}

// ---------------------------------------------------------------------------------------------
// PyTorch snapshots (tests/data/snapshot_small.pickle; scripts/make_snapshot_fixture.py documents
// the expected results)

const SIDE_STREAM: u64 = 0x55B8_C0E3_A000;

#[test]
fn snapshot_fixture_device_0() {
    let t = load(&fixture(), 0).unwrap();
    assert_eq!(t.name, fixture().display().to_string());
    assert_eq!(
        t.events,
        vec![
            // SEG0's 6 MiB block, freed at entry 6 without an alloc: live before recording.
            alloc(0, 0, 6 * MIB, 0),
            alloc(2, 1, 4 * MIB, 0),
            alloc(3, 2, 8 * MIB, 0),
            free(5, 1),
            free(6, 0),
            alloc(8, 0, 512, 1),
            alloc(9, 1, 1024, 1),
            alloc(12, 3, MIB, 0),
            free(14, 0),
            free(15, 2),
            free(17, 1),
            alloc(19, 1, 2 * MIB, 0),
            free(21, 3),
        ]
    );
    assert_eq!(t.slots, 4);
    assert_eq!(t.streams, vec![0, SIDE_STREAM]);
    assert_eq!(t.problems, vec![]);
    assert_eq!(t.reconstructed.blocks, 1);
    assert_eq!(t.reconstructed.from_frees, 1);
    assert_eq!(t.reconstructed.bytes, 6 * MIB);
    assert_eq!(
        t.recorded,
        vec![
            point(0, 20 * MIB),
            point(1, 40 * MIB),
            point(5, 42 * MIB),
            point(11, 40 * MIB)
        ]
    );
    assert_eq!(t.meta, None);
    assert_eq!(t.device, Some(0));
    // The oom entry: where the recorded run failed, with its frames.
    assert_eq!(t.recorded_ooms.len(), 1);
    let oom = &t.recorded_ooms[0];
    assert_eq!(
        (oom.line, oom.event, oom.size, oom.device_free),
        (10, 7, 64 * MIB, Some(123 * MIB))
    );
    let top: Vec<String> = t
        .top_frames(oom.frames, 3)
        .iter()
        .map(|f| f.to_string())
        .collect();
    assert_eq!(top, ["train.py:42 in step", "train.py:88 in <module>"]);
    // Frames of every event: the loader's for the side stream's allocations.
    assert_eq!(t.event_frames.len(), t.events.len());
    assert_eq!(t.frames_of(5)[0].name, "__next__");
    assert_eq!(t.frames_of(0), &[], "entry 6 has no frames");
    let settings = t.settings.as_ref().unwrap();
    assert!(!settings.expandable_segments);
    assert_eq!(settings.policy(), tessera::replay::Policy::Native);
    assert_eq!(
        settings.describe(),
        "expandable_segments:False (allocator_settings)"
    );
}

#[test]
fn snapshot_fixture_device_1_expandable_segments() {
    let bytes = std::fs::read(fixture()).unwrap();
    let t = parse_snapshot("snap", &bytes, 1).unwrap();
    assert_eq!(t.name, "snap");
    assert_eq!(
        t.events,
        vec![alloc(2, 0, MIB, 0), free(4, 0), alloc(7, 0, 4096, 0)]
    );
    assert_eq!(t.slots, 1);
    assert_eq!(t.streams, vec![0]);
    assert!(t.problems.is_empty());
    assert_eq!(t.recorded, vec![point(0, 2 * MIB), point(2, 2 * MIB)]);
}

#[test]
fn snapshot_device_out_of_range() {
    let e = load(&fixture(), 2).unwrap_err();
    assert!(matches!(e, TraceError::Snapshot { .. }), "{e:?}");
    assert_eq!(
        e.to_string(),
        format!(
            "{}: the snapshot has traces for 2 devices (0 to 1), not for device 2",
            fixture().display()
        )
    );
    let bytes = std::fs::read(fixture()).unwrap();
    assert!(matches!(
        parse_snapshot("s", &bytes, usize::MAX),
        Err(TraceError::Snapshot { .. })
    ));
}

#[test]
fn snapshot_gzipped_is_read_too() {
    let bytes = std::fs::read(fixture()).unwrap();
    let f = TempFile::with("snapshot.pickle.gz", &gzip(&bytes));
    let t = load(&f.0, 0).unwrap();
    assert_eq!(t.events, parse_snapshot("s", &bytes, 0).unwrap().events);
    assert_eq!(t.reconstructed.blocks, 1);
}

fn pickle<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_pickle::to_vec(value, serde_pickle::SerOptions::new()).unwrap()
}

fn snapshot_error(bytes: &[u8]) -> String {
    let f = TempFile::with("not-a-snapshot.pickle", bytes);
    match load(&f.0, 0) {
        Err(e @ TraceError::Snapshot { .. }) => e
            .to_string()
            .strip_prefix(&format!("{}: ", f.0.display()))
            .unwrap()
            .to_owned(),
        other => panic!("expected a Snapshot error, got {other:?}"),
    }
}

#[test]
fn pickles_that_are_not_snapshots() {
    assert_eq!(
        snapshot_error(&pickle(&vec![1, 2, 3])),
        "not a PyTorch memory snapshot: the pickle holds a list, not a dict"
    );
    let mut d = HashMap::new();
    d.insert("segments", Vec::<u8>::new());
    assert_eq!(
        snapshot_error(&pickle(&d)),
        "not a PyTorch memory snapshot: the dict has no 'device_traces' key (its keys: \
         \"segments\")"
    );
    let mut d = HashMap::new();
    d.insert("device_traces", 5);
    assert_eq!(
        snapshot_error(&pickle(&d)),
        "not a PyTorch memory snapshot: device_traces is an int, not a list"
    );
    let mut d = HashMap::new();
    d.insert("device_traces", vec![vec![HashMap::from([("addr", 1)])]]);
    assert_eq!(
        snapshot_error(&pickle(&d)),
        "not a PyTorch memory snapshot: device_traces[0][0] has no 'action'"
    );
    let mut d = HashMap::new();
    d.insert(
        "device_traces",
        vec![vec![HashMap::from([("action", "alloc"), ("addr", "0x10")])]],
    );
    assert_eq!(
        snapshot_error(&pickle(&d)),
        "not a PyTorch memory snapshot: device_traces[0][0]['addr'] is a str, not an int"
    );
    // A truncated pickle.
    let bytes = std::fs::read(fixture()).unwrap();
    let e = snapshot_error(&bytes[..bytes.len() / 2]);
    assert!(
        e.starts_with("not a PyTorch memory snapshot: cannot unpickle: "),
        "{e}"
    );
}

#[test]
fn snapshot_entries_missing_what_their_action_needs() {
    let trace = |entries: serde_pickle::Value| {
        let mut top = std::collections::BTreeMap::new();
        top.insert(
            serde_pickle::HashableValue::String("device_traces".into()),
            serde_pickle::Value::List(vec![entries]),
        );
        serde_pickle::value_to_vec(
            &serde_pickle::Value::Dict(top),
            serde_pickle::SerOptions::new(),
        )
        .unwrap()
    };
    let entry = |pairs: &[(&str, i64)], action: &str| {
        let mut m = std::collections::BTreeMap::new();
        m.insert(
            serde_pickle::HashableValue::String("action".into()),
            serde_pickle::Value::String(action.into()),
        );
        for (k, v) in pairs {
            m.insert(
                serde_pickle::HashableValue::String((*k).into()),
                serde_pickle::Value::I64(*v),
            );
        }
        serde_pickle::Value::Dict(m)
    };
    let bytes = trace(serde_pickle::Value::List(vec![entry(
        &[("size", 8)],
        "alloc",
    )]));
    assert_eq!(
        parse_snapshot("s", &bytes, 0).unwrap_err().to_string(),
        "s: device_traces[0][0] (alloc) has no 'addr'"
    );
    let bytes = trace(serde_pickle::Value::List(vec![entry(
        &[("addr", 16), ("size", -8)],
        "alloc",
    )]));
    assert_eq!(
        parse_snapshot("s", &bytes, 0).unwrap_err().to_string(),
        "s: device_traces[0][0] (alloc) has 'size' -8, out of range"
    );
    let bytes = trace(serde_pickle::Value::List(vec![entry(
        &[("addr", 16)],
        "segment_alloc",
    )]));
    assert_eq!(
        parse_snapshot("s", &bytes, 0).unwrap_err().to_string(),
        "s: device_traces[0][0] (segment_alloc) has no 'size'"
    );

    // Without 'stream', an allocation is on the default stream; an allocation of 0 bytes, a
    // second allocation at a live address and unknown actions are no events.
    let bytes = trace(serde_pickle::Value::List(vec![
        entry(&[("addr", 16), ("size", 8)], "alloc"),
        entry(&[("addr", 32), ("size", 0)], "alloc"),
        entry(&[("addr", 16), ("size", 8)], "alloc"),
        entry(&[("addr", 16)], "some_future_action"),
        entry(&[("device_free", 16), ("size", 1)], "oom"),
        entry(&[("addr", 16), ("size", 8)], "free_requested"),
        entry(&[("addr", 16), ("size", 8)], "free_completed"),
    ]));
    let t = parse_snapshot("s", &bytes, 0).unwrap();
    assert_eq!(t.events, vec![alloc(1, 0, 8, 0), free(7, 0)]);
    assert_eq!(t.streams, vec![0]);
    assert_eq!(
        t.problems,
        vec![
            problem(2, "alloc of 0 bytes at address 0x20"),
            problem(
                3,
                "alloc at address 0x10, which is already live (since entry 1)"
            ),
        ]
    );
    assert!(t.recorded.is_empty(), "no segment events: nothing recorded");
}

#[test]
fn snapshot_with_no_device_traces() {
    let mut d = HashMap::new();
    d.insert("device_traces", Vec::<Vec<u8>>::new());
    assert_eq!(
        snapshot_error(&pickle(&d)),
        "the snapshot has no device traces (was memory history recorded?), so none for device 0"
    );
    let mut d = HashMap::new();
    d.insert("device_traces", vec![Vec::<u8>::new()]);
    let t = parse_snapshot("s", &pickle(&d), 0).unwrap();
    assert!(t.events.is_empty() && t.problems.is_empty() && t.recorded.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Properties

/// One generated op: allocate a fresh id (never live) or free the `n`th live id.
#[derive(Clone, Debug)]
enum GenOp {
    Alloc { size: u64, stream: u64 },
    Free { pick: usize },
}

fn gen_op() -> impl Strategy<Value = GenOp> {
    prop_oneof![
        3 => (1u64..=u64::MAX, prop::sample::select(vec![0u64, 7, 94251237138432, u64::MAX]))
            .prop_map(|(size, stream)| GenOp::Alloc { size, stream }),
        2 => any::<usize>().prop_map(|pick| GenOp::Free { pick }),
    ]
}

/// A rendered op: its line, its id, and `Some((size, stream))` for an allocation.
type Expected = (u64, u64, Option<(u64, u64)>);

/// How a line is dressed: a comment or a blank line before it, spaces around its fields.
fn gen_dress() -> impl Strategy<Value = (u8, bool)> {
    (0u8..4, any::<bool>())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn random_text_never_panics(text in ".{0,200}") {
        match parse_csv("r.csv", text.as_bytes()) {
            Ok(_) => {}
            Err(TraceError::Malformed { path, line, message }) => {
                prop_assert_eq!(path, "r.csv");
                prop_assert!(line >= 1);
                prop_assert!(message.starts_with("expected "), "{}", message);
            }
            Err(e) => prop_assert!(false, "unexpected error {:?}", e),
        }
    }

    #[test]
    fn random_csvish_lines_never_panic(
        lines in prop::collection::vec(
            prop::collection::vec(
                prop::sample::select(vec!["a", "f", "1", "0", "-1", "", " ", "x", "18446744073709551616", "#", "{"]),
                0..6,
            ),
            0..20,
        ),
    ) {
        let text: String = lines.iter().map(|fields| fields.join(",") + "\n").collect();
        match parse_csv("r.csv", text.as_bytes()) {
            Ok(t) => check_invariants(&t),
            Err(TraceError::Malformed { message, .. }) => {
                prop_assert!(message.starts_with("expected "), "{}", message)
            }
            Err(e) => prop_assert!(false, "unexpected error {:?}", e),
        }
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        match parse_csv("r.csv", &bytes[..]) {
            Ok(t) => check_invariants(&t),
            Err(TraceError::Malformed { message, .. }) => {
                prop_assert!(message.starts_with("expected "), "{}", message)
            }
            Err(e) => prop_assert!(false, "unexpected error {:?}", e),
        }
    }

    #[test]
    fn valid_ops_round_trip(
        ops in prop::collection::vec(gen_op(), 0..200),
        dress in prop::collection::vec(gen_dress(), 200),
        id_base in any::<u64>(),
    ) {
        // Render: ids drawn from a small pool so that they are reused after frees.
        let mut live: Vec<u64> = Vec::new();
        let mut pool: Vec<u64> = (0..8).map(|i| id_base.wrapping_add(i * 0x1000)).collect();
        let mut next_id = 8u64;
        let mut text = String::new();
        let mut line = 0u64;
        // (line, id, Some((size, stream)) for an allocation)
        let mut expected: Vec<Expected> = Vec::new();
        for (op, &(extra, spaced)) in ops.iter().zip(&dress) {
            match extra {
                0 => { text.push_str("# comment\n"); line += 1; }
                1 => { text.push_str(" \n"); line += 1; }
                _ => {}
            }
            let sep = if spaced { " , " } else { "," };
            match *op {
                GenOp::Alloc { size, stream } => {
                    let id = pool.pop().unwrap_or_else(|| {
                        next_id += 1;
                        id_base.wrapping_add(next_id * 0x1000)
                    });
                    live.push(id);
                    text.push_str(&format!("a{sep}{id}{sep}{size}{sep}{stream}\n"));
                    line += 1;
                    expected.push((line, id, Some((size, stream))));
                }
                GenOp::Free { pick } => {
                    if live.is_empty() { continue; }
                    let id = live.swap_remove(pick % live.len());
                    pool.insert(0, id);
                    text.push_str(&format!("f{sep}{id}\n"));
                    line += 1;
                    expected.push((line, id, None));
                }
            }
        }

        let t = parse_csv("p.csv", text.as_bytes()).unwrap();
        prop_assert!(t.problems.is_empty(), "{:?}", t.problems);
        prop_assert_eq!(t.events.len(), expected.len());
        check_invariants(&t);

        // The events are the ops, with ids mapped to slots consistently.
        let mut slot_of: HashMap<u64, u32> = HashMap::new();
        let mut most_live = 0;
        for (event, &(line, id, alloc)) in t.events.iter().zip(&expected) {
            prop_assert_eq!(event.line, line);
            match (event.op, alloc) {
                (Op::Alloc { slot, size, stream }, Some((want_size, want_stream))) => {
                    prop_assert_eq!(size, want_size);
                    prop_assert_eq!(t.streams[stream as usize], want_stream);
                    prop_assert!(!slot_of.values().any(|&s| s == slot), "slot {} is live", slot);
                    prop_assert!(slot_of.insert(id, slot).is_none());
                    most_live = most_live.max(slot_of.len());
                }
                (Op::Free { slot }, None) => {
                    prop_assert_eq!(slot_of.remove(&id), Some(slot));
                }
                (op, want) => prop_assert!(false, "event {:?}, expected {:?}", op, want),
            }
        }
        prop_assert_eq!(t.slots as usize, most_live);
    }

    #[test]
    fn unreplayable_ops_are_problems_exactly_where_a_model_says(
        ops in prop::collection::vec((any::<bool>(), 0u64..6), 0..100),
    ) {
        let mut text = String::new();
        let mut live: HashMap<u64, u64> = HashMap::new(); // id -> line
        let mut want_problems = Vec::new();
        let mut want_events = 0;
        for (i, &(is_alloc, id)) in ops.iter().enumerate() {
            let line = i as u64 + 1;
            if is_alloc {
                text.push_str(&format!("a,{id},{},0\n", id + 1));
                match live.get(&id) {
                    Some(&since) => want_problems.push(problem(
                        line,
                        &format!("allocation of id {id}, which is already live (since line {since})"),
                    )),
                    None => { live.insert(id, line); want_events += 1; }
                }
            } else {
                text.push_str(&format!("f,{id}\n"));
                if live.remove(&id).is_some() {
                    want_events += 1;
                } else {
                    want_problems.push(problem(line, &format!("free of unknown id {id}")));
                }
            }
        }
        let t = parse_csv("m.csv", text.as_bytes()).unwrap();
        prop_assert_eq!(&t.problems, &want_problems);
        prop_assert_eq!(t.events.len(), want_events);
        check_invariants(&t);
    }
}

/// The invariants every trace keeps: frees of live slots, allocations of free slots, dense slots,
/// sizes of at least 1, stream indices in range, lines increasing.
fn check_invariants(t: &Trace) {
    let mut live: HashSet<u32> = HashSet::new();
    let mut last_line = 0;
    let mut most = 0;
    for e in &t.events {
        assert!(e.line > last_line, "lines increase: {e:?}");
        last_line = e.line;
        match e.op {
            Op::Alloc { slot, size, stream } => {
                assert!(slot < t.slots, "{e:?}");
                assert!(size >= 1);
                assert!((stream as usize) < t.streams.len());
                assert!(live.insert(slot), "allocation of live slot: {e:?}");
                most = most.max(live.len());
            }
            Op::Free { slot } => assert!(live.remove(&slot), "free of a free slot: {e:?}"),
        }
    }
    assert_eq!(t.slots as usize, most, "slots is the most live at once");
    assert!(t.problems.windows(2).all(|w| w[0].line < w[1].line));
}
