//! Fuzzing what people and files hand tessera, with proptest: `TESSERA_CONF` strings
//! ([`Config::parse`]) and allocation traces ([`parse_csv`], [`parse_snapshot`], [`load`], gzip'd
//! or not).
//!
//! # What must hold
//! - Every input gives `Ok` or an error, never a panic (a panic fails the case, and proptest
//!   shrinks it to a minimal input).
//! - A configuration that parses is valid and prints back to itself; one that does not is an
//!   [`Error::Config`] whose message names the offending key or item of the input (and, for a bad
//!   value, the value), in quotes.
//! - A CSV trace that parses keeps every invariant of a [`Trace`] (replaying its events is valid,
//!   slots are dense, lines increase); one that does not is [`TraceError::Malformed`] naming the
//!   file and a line of the input, and in a mutated valid trace that line is one the mutation
//!   touched. Gzip'd, the same text gives the same result through [`load`]; gzip garbage and
//!   truncated gzip are errors, never panics.
//! - A damaged PyTorch snapshot pickle gives a trace that keeps the invariants or a
//!   [`TraceError::Snapshot`] naming the file.
//!
//! # Inputs
//! Arbitrary strings and bytes; structured near-misses (unknown and misspelt keys, bad units,
//! negative, huge and non-numeric numbers, duplicates, empty values, unicode, wrong separators);
//! the first lines of `traces/transformer-varlen.csv.gz` with fields replaced, dropped or added,
//! lines cut, inserted, duplicated, deleted and swapped; `tests/data/snapshot_small.pickle` with
//! bytes flipped, inserted and cut; plus a table of bad configurations, each with the words its
//! message must contain.
//!
//! # Cases
//! Each property runs `PROPTEST_CASES` cases if that is set, else its own default, chosen so that
//! the whole file takes well under 30 s in a debug build; each prints how many cases it ran
//! (`cargo test --test input_fuzz -- --nocapture`). A failure prints the shrunk input.

mod common;
use common::files::{gzip, TempFile};

use std::cell::Cell;
use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestCaseError, TestRunner};
use tessera::config::{Backend, Config, Placement, KEYS};
use tessera::error::Error;
use tessera::replay::engine::replay;
use tessera::replay::export::snapshot_of;
use tessera::replay::trace::{load, parse_csv, parse_snapshot, Op, Trace, TraceError};
use tessera::replay::{Policy, ReplayOptions};

// ------------------------------------------------------------------------------------------------
// Running properties and counting their cases.
// ------------------------------------------------------------------------------------------------

/// `PROPTEST_CASES` if set (to raise the count), else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Runs `test` on `cases(default_cases)` inputs from `strategy`, fails with proptest's shrunk
/// input on the first failure, and prints the number of cases run. Returns that number.
fn fuzz<S: Strategy>(
    name: &str,
    default_cases: u32,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) -> u64 {
    let mut runner = TestRunner::new(RunnerConfig {
        cases: cases(default_cases),
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let ran = Cell::new(0u64);
    let result = runner.run(&strategy, |value| {
        ran.set(ran.get() + 1);
        test(value)
    });
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
    println!("input_fuzz: {name}: {} cases", ran.get());
    ran.get()
}

// ------------------------------------------------------------------------------------------------
// TESSERA_CONF.
// ------------------------------------------------------------------------------------------------

/// The (key, value) pieces of `text` as `Config::parse` sees them, and the items without `:`.
fn conf_pieces(text: &str) -> (Vec<(&str, &str)>, Vec<&str>) {
    let (mut pairs, mut bare) = (Vec::new(), Vec::new());
    for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        match item.split_once(':') {
            Some((k, v)) => pairs.push((k.trim(), v.trim())),
            None => bare.push(item),
        }
    }
    (pairs, bare)
}

/// Whether the error message `m` names what in `text` is wrong: an item without `:` or a key, in
/// quotes (and the value too when it says "bad value"), or, for a check of the whole
/// configuration, starts with a key the text sets.
fn names_the_offender(text: &str, m: &str) -> bool {
    let (pairs, bare) = conf_pieces(text);
    let quoted = |s: &str| m.contains(&format!("'{s}'"));
    if m.contains("bad value") {
        return pairs.iter().any(|(k, v)| quoted(k) && quoted(v));
    }
    bare.iter().any(|i| quoted(i))
        || pairs.iter().any(|(k, _)| quoted(k))
        || KEYS
            .iter()
            .any(|k| m.starts_with(&format!("{k} ")) && pairs.iter().any(|(pk, _)| pk == k))
}

/// The property every configuration string must have; returns whether it parsed.
fn check_conf(text: &str) -> Result<bool, TestCaseError> {
    match Config::parse(text) {
        Ok(c) => {
            prop_assert!(c.validate().is_ok(), "{text:?} parsed to an invalid {c:?}");
            let printed = c.to_string();
            let again = Config::parse(&printed);
            prop_assert!(
                again.as_ref().is_ok_and(|a| *a == c),
                "{text:?} parsed to {c:?}, printed as {printed:?}, which parses to {again:?}"
            );
            Ok(true)
        }
        Err(Error::Config(m)) => {
            prop_assert!(!m.trim().is_empty(), "{text:?}: an empty message");
            prop_assert!(
                names_the_offender(text, &m),
                "{text:?}: the message does not name the offending key, item or value: {m}"
            );
            let shown = Error::Config(m.clone()).to_string();
            prop_assert!(shown.starts_with("configuration error: "), "{shown}");
            Ok(false)
        }
        Err(other) => Err(TestCaseError::fail(format!(
            "{text:?}: not a configuration error: {other:?}"
        ))),
    }
}

#[test]
fn conf_arbitrary_strings_parse_or_fail_cleanly() {
    let strategy = prop_oneof![
        any::<String>(),
        "[a-z_:,. 0-9A-Za-z=;\\-\t]{0,60}",
        // Grammar soup: key-like words, separators, numbers and units in any order.
        "(( )?(backend|page_size|limit|memory_fraction|small_max|size_classes|placement|thread_cache|check_invariants|\
         [a-z_]{1,10})( )?[:=]?( )?(-?[0-9.]{0,8}(B|KiB|MiB|GiB|TiB|kb|m|XB|)|vmm|legacy|true|\
         false|lifetime|best_fit|NaN|inf)( )?,?){0,6}",
    ];
    fuzz("TESSERA_CONF arbitrary strings", 3000, strategy, |text| {
        check_conf(&text).map(|_| ())
    });
}

/// Values a key may be given: valid ones of every key, and near misses.
fn conf_value() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        Just("0"),
        Just("1"),
        Just("3"),
        Just("512"),
        Just("1.5"),
        Just(".5"),
        Just("-1"),
        Just("-0.5"),
        Just("18446744073709551615"),
        Just("18446744073709551616"),
        Just("99999999999999999999999999999"),
        Just("1e3"),
        Just("1.5.5"),
        Just("0x10"),
        Just("1_000"),
        Just("+4"),
        Just("２"),
        Just(""),
    ];
    let unit = prop_oneof![
        Just(""),
        Just("B"),
        Just("KiB"),
        Just("MiB"),
        Just("GiB"),
        Just("TiB"),
        Just("kb"),
        Just("MB"),
        Just("g"),
        Just(" MiB"),
        Just("mib"),
        Just("XiB"),
        Just("PiB"),
        Just("㎆"),
    ];
    prop_oneof![
        4 => (number, unit).prop_map(|(n, u)| format!("{n}{u}")),
        2 => prop_oneof![
            Just("0.5"), Just("1"), Just("0"), Just("1.0000001"), Just("NaN"), Just("inf"),
            Just("-inf"), Just("1e-400"), Just("5e-324"), Just("0.75"),
        ]
        .prop_map(String::from),
        1 => prop_oneof![Just("true"), Just("false"), Just("1"), Just("0"), Just("True"), Just("yes")]
            .prop_map(String::from),
        1 => prop_oneof![Just("vmm"), Just("legacy"), Just("VMM"), Just("cuda"), Just(" legacy ")]
            .prop_map(String::from),
        1 => prop_oneof![Just("lifetime"), Just("best_fit"), Just("Lifetime"), Just("best-fit")]
            .prop_map(String::from),
        1 => "\\PC{0,8}",
    ]
}

/// Keys: the real ones, and misspellings, case changes, lookalikes, unknown words, nothing.
fn conf_key() -> impl Strategy<Value = String> {
    let real = proptest::sample::select(KEYS.to_vec());
    prop_oneof![
        6 => real.clone().prop_map(String::from),
        1 => real.clone().prop_map(|k| k.to_uppercase()),
        1 => real.clone().prop_map(|k| k.replace('_', "-")),
        1 => real.clone().prop_map(|k| k.replace('_', "")),
        1 => real.clone().prop_map(|k| format!("{k}s")),
        1 => real.prop_map(|k| k.replacen('i', "ı", 1)),
        1 => "[a-z_]{0,12}",
        1 => Just(String::new()),
    ]
}

/// A TESSERA_CONF-like string: items of key, separator and value, joined by separators.
fn near_miss_conf() -> impl Strategy<Value = String> {
    let sep = prop_oneof![8 => Just(":"), 1 => Just("="), 1 => Just("::"), 1 => Just(" : "), 1 => Just("")];
    let item = (conf_key(), sep, conf_value()).prop_map(|(k, s, v)| format!("{k}{s}{v}"));
    let joiner = prop_oneof![6 => Just(","), 1 => Just(", "), 1 => Just(",,"), 1 => Just(";"), 1 => Just(" ,\t")];
    (
        proptest::collection::vec((item, joiner), 0..6),
        any::<bool>(),
    )
        .prop_map(|(items, trailing)| {
            let mut s = String::new();
            for (i, (item, joiner)) in items.iter().enumerate() {
                if i > 0 {
                    s.push_str(joiner);
                }
                s.push_str(item);
            }
            if trailing {
                s.push(',');
            }
            s
        })
}

#[test]
fn conf_near_misses_parse_or_name_the_offender() {
    let parsed = Cell::new(0u32);
    let refused = Cell::new(0u32);
    fuzz("TESSERA_CONF near misses", 3000, near_miss_conf(), |text| {
        if check_conf(&text)? {
            parsed.set(parsed.get() + 1);
        } else {
            refused.set(refused.get() + 1);
        }
        Ok(())
    });
    // The generator must reach both sides, or the property tests little.
    println!(
        "input_fuzz: TESSERA_CONF near misses: {} parsed, {} refused",
        parsed.get(),
        refused.get()
    );
    assert!(parsed.get() > 0 && refused.get() > 0);
}

/// A valid configuration, as the unit tests of `config` make them.
fn valid_config() -> impl Strategy<Value = Config> {
    (
        any::<bool>(),
        proptest::option::of((0u32..42).prop_map(|k| 1u64 << k)),
        proptest::option::of(prop_oneof![0u64..(1 << 50), Just(u64::MAX), Just(0)]),
        proptest::option::of(prop_oneof![
            (1u32..=1_000_000).prop_map(|n| f64::from(n) / 1e6),
            Just(f64::MIN_POSITIVE),
            Just(5e-324),
            Just(1.0),
        ]),
        prop_oneof![512u64..(1 << 30), Just(u64::MAX)],
        1u32..=16,
        any::<bool>(),
    )
        .prop_map(
            |(legacy, page_size, limit, memory_fraction, small_max, classes, check)| Config {
                backend: if legacy {
                    Backend::Legacy
                } else {
                    Backend::Vmm
                },
                page_size,
                limit,
                memory_fraction,
                small_max,
                classes_per_doubling: classes,
                placement: if classes % 2 == 0 {
                    Placement::Lifetime
                } else {
                    Placement::BestFit
                },
                thread_cache: small_max.wrapping_mul(3),
                check_invariants: check,
            },
        )
}

#[test]
fn conf_valid_configs_round_trip_in_any_order_and_spacing() {
    let pads = proptest::sample::select(vec!["", " ", "\t", "  ", " \t "]);
    let strategy = valid_config().prop_flat_map(move |c| {
        let items: Vec<String> = c.to_string().split(',').map(String::from).collect();
        let n = items.len();
        (
            Just(c),
            Just(items).prop_shuffle(),
            proptest::collection::vec(pads.clone(), 4 * n),
            proptest::collection::vec(any::<bool>(), n),
        )
    });
    fuzz(
        "TESSERA_CONF valid configs, shuffled and spaced",
        500,
        strategy,
        |(c, items, pads, empties)| {
            // Each item as " key : value ", in any order, with empty items between some.
            let mut text = String::new();
            for (i, item) in items.iter().enumerate() {
                let (k, v) = item.split_once(':').expect("Display writes key:value");
                let p = &pads[4 * i..4 * i + 4];
                text.push_str(&format!("{}{k}{}:{}{v}{},", p[0], p[1], p[2], p[3]));
                if empties[i] {
                    text.push_str(p[0]);
                    text.push(',');
                }
            }
            let parsed = Config::parse(&text);
            prop_assert!(
                parsed.as_ref().is_ok_and(|p| *p == c),
                "{c:?} written as {text:?} parses to {parsed:?}"
            );
            check_conf(&text).map(|_| ())
        },
    );
}

#[test]
fn conf_bad_examples_name_the_key_and_value() {
    // (input, words the message must contain)
    let table: &[(&str, &[&str])] = &[
        (
            "pagesize:2MiB",
            &["unknown key 'pagesize'", "did you mean 'page_size'"],
        ),
        (
            "Backend:vmm",
            &["unknown key 'Backend'", "did you mean 'backend'"],
        ),
        (
            "page-size:2MiB",
            &["'page-size'", "did you mean 'page_size'"],
        ),
        ("lımit:1GiB", &["unknown key 'lımit'"]),
        (":8GiB", &["unknown key ''"]),
        (
            "expandable_segments:True",
            &["unknown key 'expandable_segments'"],
        ),
        ("limit=8GiB", &["'limit=8GiB'", "no ':'"]),
        ("limit", &["'limit'", "no ':'"]),
        (
            "backend:vmm;limit:1GiB",
            &["bad value 'vmm;limit:1GiB'", "'backend'"],
        ),
        ("limit:1GiB,limit:2GiB", &["'limit'", "twice", "'2GiB'"]),
        ("limit:1GiB, , limit : 1GiB", &["'limit'", "twice"]),
        ("limit:", &["bad value ''", "'limit'"]),
        ("backend:", &["bad value ''", "'backend'"]),
        ("limit:-1", &["bad value '-1'", "'limit'"]),
        ("limit:-1GiB", &["'-1GiB'", "'limit'"]),
        ("limit:8XiB", &["'8XiB'", "'limit'", "unknown unit 'xib'"]),
        (
            "limit:8 parsecs",
            &["'8 parsecs'", "'limit'", "unknown unit 'parsecs'"],
        ),
        (
            "limit:18446744073709551616",
            &["'18446744073709551616'", "'limit'", "too large"],
        ),
        (
            "limit:99999999999999999999999999TiB",
            &["'limit'", "too large"],
        ),
        ("limit:16777216TiB", &["'16777216TiB'", "too large"]),
        ("limit:1e3", &["'1e3'", "'limit'", "unknown unit 'e3'"]),
        (
            "limit:1.5.5GiB",
            &["'1.5.5GiB'", "'limit'", "bad number '1.5.5'"],
        ),
        ("limit:inf", &["'inf'", "'limit'", "not a size"]),
        ("limit:８GiB", &["'８GiB'", "'limit'"]),
        ("limit:0x10", &["'0x10'", "'limit'"]),
        ("page_size:0", &["bad value '0'", "'page_size'"]),
        ("page_size:3MiB", &["page_size 3145728", "power of two"]),
        ("small_max:511B", &["'511B'", "'small_max'", "512"]),
        ("memory_fraction:0", &["'0'", "'memory_fraction'", "(0, 1]"]),
        (
            "memory_fraction:1.0000001",
            &["'1.0000001'", "'memory_fraction'"],
        ),
        ("memory_fraction:-0.5", &["'-0.5'", "'memory_fraction'"]),
        ("memory_fraction:1e-400", &["'1e-400'", "'memory_fraction'"]),
        ("memory_fraction:NaN", &["'NaN'", "'memory_fraction'"]),
        ("memory_fraction:inf", &["'inf'", "'memory_fraction'"]),
        ("memory_fraction:half", &["'half'", "'memory_fraction'"]),
        ("size_classes:0", &["'0'", "'size_classes'", "1..=16"]),
        ("size_classes:17", &["'17'", "'size_classes'"]),
        ("size_classes:4.0", &["'4.0'", "'size_classes'"]),
        (
            "size_classes:99999999999",
            &["'99999999999'", "'size_classes'"],
        ),
        ("check_invariants:True", &["'True'", "'check_invariants'"]),
        ("check_invariants:yes", &["'yes'", "'check_invariants'"]),
        ("backend:cuda", &["'cuda'", "'backend'", "vmm or legacy"]),
        ("backend:VMM", &["'VMM'", "'backend'"]),
        ("backend:vmm,colour:blue", &["unknown key 'colour'"]),
    ];
    for (text, words) in table {
        let m = match Config::parse(text) {
            Err(Error::Config(m)) => m,
            other => panic!("{text:?}: expected a configuration error, got {other:?}"),
        };
        for w in *words {
            assert!(m.contains(w), "{text:?}: the message lacks {w:?}: {m}");
        }
        assert!(
            names_the_offender(text, &m),
            "{text:?}: the fuzz check would not accept the message: {m}"
        );
    }
    println!(
        "input_fuzz: TESSERA_CONF bad examples: {} cases",
        table.len()
    );
}

// ------------------------------------------------------------------------------------------------
// Traces.
// ------------------------------------------------------------------------------------------------

fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// The first lines of a real trace (its metadata line included).
fn sample_lines() -> &'static [String] {
    static LINES: OnceLock<Vec<String>> = OnceLock::new();
    LINES.get_or_init(|| {
        let gz = std::fs::read(repo_path("traces/transformer-varlen.csv.gz")).unwrap();
        let mut text = String::new();
        flate2::read::MultiGzDecoder::new(&gz[..])
            .take(1 << 20)
            .read_to_string(&mut text)
            .unwrap();
        let lines: Vec<String> = text.lines().take(240).map(String::from).collect();
        assert!(lines[0].starts_with("# {") && lines.len() == 240);
        // The sample itself is a valid trace.
        let t = parse_csv("sample", lines.join("\n").as_bytes()).unwrap();
        assert!(t.problems.is_empty() && t.events.len() > 200);
        lines
    })
}

/// The lines of `bytes` as parse_csv counts them (a last line without `\n` counts).
fn line_count(bytes: &[u8]) -> u64 {
    let newlines = bytes.iter().filter(|&&b| b == b'\n').count() as u64;
    newlines + u64::from(!bytes.is_empty() && !bytes.ends_with(b"\n"))
}

/// Every invariant a parsed trace promises (see `tessera::replay::trace`).
fn check_trace(t: &Trace, lines: u64) -> Result<(), TestCaseError> {
    let mut live = vec![false; t.slots as usize];
    let (mut now, mut most) = (0u32, 0u32);
    let mut last_line = 0;
    let reconstructed = t.reconstructed.blocks as usize;
    prop_assert!(reconstructed <= t.events.len());
    prop_assert!(t.event_frames.is_empty() || t.event_frames.len() == t.events.len());
    for f in t
        .event_frames
        .iter()
        .chain(t.recorded_ooms.iter().map(|o| &o.frames))
    {
        prop_assert!(f.is_none_or(|f| (f as usize) < t.tracebacks.len()));
    }
    for (i, e) in t.events.iter().enumerate() {
        if i < reconstructed {
            // The memory live before the first entry: allocations with line 0.
            prop_assert!(e.line == 0 && matches!(e.op, Op::Alloc { .. }), "event {i}");
        } else {
            prop_assert!(
                e.line > last_line && e.line <= lines.max(1),
                "event {i}: line {} after {last_line}, of {lines}",
                e.line
            );
            last_line = e.line;
        }
        match e.op {
            Op::Alloc { slot, size, stream } => {
                prop_assert!(size >= 1, "event {i}: size 0");
                prop_assert!(
                    (stream as usize) < t.streams.len(),
                    "event {i}: stream {stream}"
                );
                prop_assert!(
                    (slot as usize) < live.len(),
                    "event {i}: slot {slot} >= slots"
                );
                prop_assert!(
                    !live[slot as usize],
                    "event {i}: slot {slot} allocated while live"
                );
                live[slot as usize] = true;
                now += 1;
                most = most.max(now);
            }
            Op::Free { slot } => {
                prop_assert!(
                    (slot as usize) < live.len() && live[slot as usize],
                    "event {i}: free of slot {slot}, which is not live"
                );
                live[slot as usize] = false;
                now -= 1;
            }
        }
    }
    prop_assert_eq!(
        most,
        t.slots,
        "slots is not the most allocations live at once"
    );
    let distinct: HashSet<u64> = t.streams.iter().copied().collect();
    prop_assert_eq!(distinct.len(), t.streams.len(), "a stream listed twice");
    let mut last_problem = 0;
    for p in &t.problems {
        // Line 0: a snapshot's state before the first entry.
        let first = if t.device.is_some() { 0 } else { 1 };
        prop_assert!(p.line >= last_problem && p.line >= first && p.line <= lines);
        prop_assert!(!p.message.is_empty());
        last_problem = p.line;
    }
    for r in t.recorded.windows(2) {
        prop_assert!(r[0].event < r[1].event);
    }
    if let Some(r) = t.recorded.last() {
        prop_assert!(r.event <= t.events.len());
    }
    Ok(())
}

/// What parse_csv made of `bytes`: the trace (checked), or the line it named (checked).
fn check_csv(name: &str, bytes: &[u8]) -> Result<Result<Trace, u64>, TestCaseError> {
    let lines = line_count(bytes);
    match parse_csv(name, bytes) {
        Ok(t) => {
            check_trace(&t, lines)?;
            Ok(Ok(t))
        }
        Err(e) => {
            let TraceError::Malformed {
                path,
                line,
                message,
            } = &e
            else {
                return Err(TestCaseError::fail(format!("an in-memory CSV gave {e:?}")));
            };
            prop_assert_eq!(path, name);
            prop_assert!(*line >= 1 && *line <= lines, "line {line} of {lines}: {e}");
            prop_assert!(message.starts_with("expected "), "{e}");
            let shown = e.to_string();
            let prefix = format!("{name}:{line}: ");
            prop_assert!(shown.starts_with(&prefix), "{}", shown);
            Ok(Err(*line))
        }
    }
}

#[test]
fn csv_arbitrary_bytes_parse_or_name_a_line() {
    let strategy = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..400),
        // CSV soup: the format's own characters.
        "([af#, 0-9\\r\\t{}\"\\-]|\n){0,300}".prop_map(String::into_bytes),
        // Lines that look like ops, with any fields.
        proptest::collection::vec(
            "( )*[afAF#]?( )*(,( )*(-?[0-9]{0,21}|[a-z\\PC]{0,3})( )*){0,5}",
            0..20
        )
        .prop_map(|lines| lines.join("\n").into_bytes()),
    ];
    fuzz("CSV arbitrary bytes", 3000, strategy, |bytes| {
        check_csv("fuzz.csv", &bytes).map(|_| ())
    });
}

/// One edit of a trace's lines.
#[derive(Clone, Debug)]
enum Mutation {
    /// Replace field `field` (modulo the field count) of line `line` with `with`.
    Field {
        line: usize,
        field: usize,
        with: String,
    },
    /// Remove a field.
    DropField {
        line: usize,
        field: usize,
    },
    /// Append a field.
    AddField {
        line: usize,
        with: String,
    },
    /// Replace the operation letter.
    Op {
        line: usize,
        with: &'static str,
    },
    /// Cut the line after `at` characters.
    Cut {
        line: usize,
        at: usize,
    },
    /// Insert a line of anything before `line`.
    Insert {
        line: usize,
        text: String,
    },
    /// Duplicate, delete or swap lines (well-formed results: problems at most).
    Duplicate {
        line: usize,
    },
    Delete {
        line: usize,
    },
    Swap {
        line: usize,
        other: usize,
    },
    /// Spaces, tabs and a `\r` around the line (accepted by the format).
    Pad {
        line: usize,
    },
}

impl Mutation {
    /// Whether the edit keeps every line well formed.
    fn keeps_lines_well_formed(&self) -> bool {
        matches!(
            self,
            Mutation::Duplicate { .. }
                | Mutation::Delete { .. }
                | Mutation::Swap { .. }
                | Mutation::Pad { .. }
        )
    }
}

fn junk_field() -> impl Strategy<Value = String> {
    prop_oneof![
        prop_oneof![
            Just(""),
            Just("-1"),
            Just("0"),
            Just("18446744073709551615"),
            Just("18446744073709551616"),
            Just("99999999999999999999999999"),
            Just("1.5"),
            Just("1e3"),
            Just(" 7 "),
            Just("+1"),
            Just("0x10"),
            Just("x"),
            Just("é"),
            Just("\0"),
            Just("a"),
            Just("f"),
            Just("#"),
        ]
        .prop_map(String::from),
        "[0-9]{1,25}",
        "\\PC{0,6}",
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let line = 0usize..240;
    prop_oneof![
        4 => (line.clone(), 0usize..5, junk_field())
            .prop_map(|(line, field, with)| Mutation::Field { line, field, with }),
        1 => (line.clone(), 0usize..5).prop_map(|(line, field)| Mutation::DropField { line, field }),
        1 => (line.clone(), junk_field()).prop_map(|(line, with)| Mutation::AddField { line, with }),
        1 => (line.clone(), proptest::sample::select(vec!["a", "f", "b", "A", "", "#", "  a", "aa"]))
            .prop_map(|(line, with)| Mutation::Op { line, with }),
        1 => (line.clone(), 0usize..30).prop_map(|(line, at)| Mutation::Cut { line, at }),
        1 => (line.clone(), prop_oneof!["\\PC{0,30}", "# \\{\\PC{0,10}", "[af],[0-9,]{0,12}"])
            .prop_map(|(line, text)| Mutation::Insert { line, text }),
        1 => line.clone().prop_map(|line| Mutation::Duplicate { line }),
        1 => line.clone().prop_map(|line| Mutation::Delete { line }),
        1 => (line.clone(), line.clone()).prop_map(|(line, other)| Mutation::Swap { line, other }),
        1 => line.prop_map(|line| Mutation::Pad { line }),
    ]
}

/// Applies `edits` to the sample lines; each line carries whether an edit touched it.
fn mutate(edits: &[Mutation]) -> Vec<(String, bool)> {
    let mut lines: Vec<(String, bool)> =
        sample_lines().iter().map(|l| (l.clone(), false)).collect();
    for edit in edits {
        if lines.is_empty() {
            lines.push((String::new(), true));
        }
        let n = lines.len();
        let fields = |l: &str| -> Vec<String> { l.split(',').map(String::from).collect() };
        match edit {
            Mutation::Field { line, field, with } => {
                let l = &mut lines[line % n];
                let mut f = fields(&l.0);
                let i = field % f.len();
                f[i].clone_from(with);
                *l = (f.join(","), true);
            }
            Mutation::DropField { line, field } => {
                let l = &mut lines[line % n];
                let mut f = fields(&l.0);
                f.remove(field % f.len());
                *l = (f.join(","), true);
            }
            Mutation::AddField { line, with } => {
                let l = &mut lines[line % n];
                *l = (format!("{},{with}", l.0), true);
            }
            Mutation::Op { line, with } => {
                let l = &mut lines[line % n];
                let mut f = fields(&l.0);
                f[0] = (*with).to_string();
                *l = (f.join(","), true);
            }
            Mutation::Cut { line, at } => {
                let l = &mut lines[line % n];
                let cut: String = l.0.chars().take(*at).collect();
                *l = (cut, true);
            }
            Mutation::Insert { line, text } => {
                // No line breaks inside: one inserted line.
                lines.insert(line % (n + 1), (text.replace(['\n', '\r'], " "), true));
            }
            Mutation::Duplicate { line } => {
                let copy = lines[line % n].clone();
                lines.insert(line % n + 1, copy);
            }
            Mutation::Delete { line } => {
                lines.remove(line % n);
            }
            Mutation::Swap { line, other } => lines.swap(line % n, other % n),
            Mutation::Pad { line } => {
                let l = &mut lines[line % n];
                l.0 = format!(" \t{} \r", l.0);
            }
        }
    }
    lines
}

/// `load` of `bytes` in a file: no panic; a malformed line is one of `lines`.
fn check_load(bytes: &[u8], lines: u64) -> Result<Result<Trace, TraceError>, TestCaseError> {
    let f = TempFile::with("input", bytes);
    let name = f.0.display().to_string();
    let r = load(&f.0, 0);
    match &r {
        Ok(t) => check_trace(t, lines.max(1 << 20))?,
        Err(TraceError::Malformed { path, line, .. }) => {
            prop_assert_eq!(path, &name);
            prop_assert!(
                *line >= 1 && *line <= lines.max(1),
                "line {line} of {lines}"
            );
        }
        Err(TraceError::Io { path, .. } | TraceError::Snapshot { path, .. }) => {
            prop_assert_eq!(path, &name);
        }
    }
    Ok(r)
}

#[test]
fn csv_mutated_traces_parse_or_name_a_mutated_line_plain_and_gzipped() {
    sample_lines();
    let strategy = (
        proptest::collection::vec(mutation(), 1..5),
        any::<bool>(),
        any::<u16>(),
    );
    let errors = Cell::new(0u32);
    let n = fuzz(
        "CSV mutated traces (plain, gzip, truncated gzip)",
        600,
        strategy,
        |(edits, trailing_newline, cut)| {
            let lines = mutate(&edits);
            let mut text = lines
                .iter()
                .map(|l| l.0.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            if trailing_newline {
                text.push('\n');
            }
            let plain = check_csv("mutated.csv", text.as_bytes())?;
            match &plain {
                Ok(_) => {}
                Err(line) => {
                    errors.set(errors.get() + 1);
                    prop_assert!(
                        lines[(*line - 1) as usize].1,
                        "line {line} was not touched by {edits:?} but is named as malformed: {:?}",
                        lines[(*line - 1) as usize].0
                    );
                }
            }
            if edits.iter().all(Mutation::keeps_lines_well_formed) {
                prop_assert!(
                    plain.is_ok(),
                    "{edits:?} keeps every line well formed: {plain:?}"
                );
            }

            // The same text gzip'd, through load: the same result.
            let gz = gzip(text.as_bytes());
            let total = line_count(text.as_bytes());
            let loaded = check_load(&gz, total)?;
            match (&plain, &loaded) {
                (Ok(a), Ok(b)) => {
                    prop_assert_eq!(&a.events, &b.events);
                    prop_assert_eq!(&a.problems, &b.problems);
                    prop_assert_eq!(&a.streams, &b.streams);
                    prop_assert_eq!(a.slots, b.slots);
                }
                (Err(a), Err(TraceError::Malformed { line, .. })) => prop_assert_eq!(a, line),
                _ => prop_assert!(false, "plain {plain:?} but gzip'd {loaded:?}"),
            }
            // Cut short: an error or a trace, never a panic.
            let at = usize::from(cut) % gz.len();
            let _cut_short = check_load(&gz[..at], total)?;
            Ok(())
        },
    );
    println!(
        "input_fuzz: CSV mutated traces: {} of {n} named a malformed line",
        errors.get()
    );
    assert!(errors.get() > 0 && u64::from(errors.get()) < n);
}

#[test]
fn gzip_garbage_and_multi_member_gzip() {
    let garbage = prop_oneof![
        // A gzip header, then anything.
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(|mut b| {
            b.splice(0..0, [0x1f, 0x8b]);
            b
        }),
        // A valid member with bytes flipped.
        (
            proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
            0usize..240
        )
            .prop_map(|(flips, take)| {
                let text = sample_lines()[..take.max(1)].join("\n");
                let mut gz = gzip(text.as_bytes());
                for (at, x) in flips {
                    let i = 2 + at % (gz.len() - 2); // keep the magic: it is read as gzip
                    gz[i] ^= x | 1;
                }
                gz
            }),
    ];
    fuzz("gzip garbage", 500, garbage, |bytes| {
        check_load(&bytes, u64::MAX).map(|_| ())
    });
    // Several members: read as their concatenation.
    let members = (1usize..120, 1usize..120);
    fuzz("gzip multi-member", 100, members, |(a, b)| {
        let lines = sample_lines();
        let first = lines[..a].join("\n") + "\n";
        let second = lines[a..a + b].join("\n");
        let mut gz = gzip(first.as_bytes());
        gz.extend(gzip(second.as_bytes()));
        let whole = format!("{first}{second}");
        let loaded = check_load(&gz, line_count(whole.as_bytes()))?;
        let plain = parse_csv("whole", whole.as_bytes()).unwrap();
        let loaded = loaded.map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(plain.events, loaded.events);
        Ok(())
    });
}

/// Every snapshot fixture (`scripts/make_snapshot_fixture.py`: every action, memory live before
/// recording, a wrapped ring buffer, two devices, bad input, an old format), then exports of two
/// of them (`tessera replay --export`: what the export reader reads back).
fn snapshot_corpus() -> &'static [Vec<u8>] {
    static CORPUS: OnceLock<Vec<Vec<u8>>> = OnceLock::new();
    CORPUS.get_or_init(|| {
        let mut corpus = Vec::new();
        for name in [
            "small",
            "preexisting",
            "wrapped",
            "expandable",
            "bad",
            "retry",
            "oldformat",
        ] {
            let path = format!("tests/data/snapshot_{name}.pickle");
            let b = std::fs::read(repo_path(&path)).unwrap();
            assert!(parse_snapshot("snap", &b, 0).is_ok(), "{path}");
            corpus.push(b);
        }
        for (i, policy) in [(3, Policy::Expandable), (2, Policy::Tessera)] {
            let t = parse_snapshot("snap", &corpus[i], 0).unwrap();
            let opts = ReplayOptions {
                record: true,
                capacity: 24 << 20,
                ..ReplayOptions::default()
            };
            let o = replay(&t, policy, &opts, &mut |_| {}).unwrap();
            corpus.push(snapshot_of(&t, &o, opts.capacity).unwrap().to_pickle());
        }
        corpus
    })
}

#[derive(Clone, Debug)]
enum ByteEdit {
    Flip { at: usize, x: u8 },
    Insert { at: usize, bytes: Vec<u8> },
    Cut { at: usize },
    Remove { at: usize, n: usize },
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        4 => (any::<usize>(), 1u8..).prop_map(|(at, x)| ByteEdit::Flip { at, x }),
        1 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| ByteEdit::Insert { at, bytes }),
        1 => any::<usize>().prop_map(|at| ByteEdit::Cut { at }),
        1 => (any::<usize>(), 1usize..16).prop_map(|(at, n)| ByteEdit::Remove { at, n }),
    ]
}

fn check_snapshot(bytes: &[u8], device: usize) -> Result<(), TestCaseError> {
    match parse_snapshot("snap.pickle", bytes, device) {
        Ok(t) => {
            check_trace(&t, u64::MAX)?;
            // What was read replays, exports, and the export reads back to the same live bytes.
            let opts = ReplayOptions {
                record: true,
                capacity: 64 << 20,
                ..ReplayOptions::default()
            };
            let o = replay(&t, Policy::Native, &opts, &mut |_| {})
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let export = snapshot_of(&t, &o, opts.capacity).unwrap().to_pickle();
            let back = parse_snapshot("export", &export, t.device.unwrap())
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            prop_assert_eq!(
                tessera::replay::engine::trace_peak_live(&back),
                o.peak_live_bytes
            );
            Ok(())
        }
        Err(TraceError::Snapshot { path, message }) => {
            prop_assert_eq!(path, "snap.pickle");
            prop_assert!(!message.is_empty());
            Ok(())
        }
        Err(other) => Err(TestCaseError::fail(format!("{other:?}"))),
    }
}

#[test]
fn snapshot_damaged_pickles_parse_or_fail_cleanly() {
    let corpus = snapshot_corpus();
    let strategy = (
        proptest::collection::vec(byte_edit(), 1..6),
        0usize..3,
        0..corpus.len(),
    );
    fuzz(
        "snapshot damaged pickles",
        600,
        strategy,
        |(edits, device, which)| {
            let mut b = corpus[which].clone();
            for e in &edits {
                if b.is_empty() {
                    break;
                }
                match e {
                    ByteEdit::Flip { at, x } => {
                        let i = at % b.len();
                        b[i] ^= x;
                    }
                    ByteEdit::Insert { at, bytes } => {
                        let i = at % (b.len() + 1);
                        b.splice(i..i, bytes.iter().copied());
                    }
                    ByteEdit::Cut { at } => b.truncate(at % b.len()),
                    ByteEdit::Remove { at, n } => {
                        let i = at % b.len();
                        b.drain(i..(i + n).min(b.len()));
                    }
                }
            }
            check_snapshot(&b, device)?;
            // Through load, as a file (pickle or gzip'd pickle): never a panic.
            if b.first() == Some(&0x80) {
                let direct = parse_snapshot("snap.pickle", &b, 0).is_ok();
                let loaded = check_load(&b, u64::MAX)?;
                prop_assert_eq!(direct, loaded.is_ok(), "load and parse_snapshot disagree");
            }
            let _gzipped = check_load(&gzip(&b), u64::MAX)?;
            Ok(())
        },
    );
    fuzz(
        "snapshot arbitrary bytes",
        300,
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(|mut b| {
            b.insert(0, 0x80);
            b
        }),
        |b| check_snapshot(&b, 0),
    );
}
