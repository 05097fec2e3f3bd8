//! Replay reports: one [`Row`] per (trace, policy), printed as a table or as JSON lines.
//!
//! # Data structure
//! A [`Row`] is a plain record whose field names are the JSON keys (snake_case). A trace that
//! carries the recording allocator's own reserved bytes (a PyTorch snapshot with segment events)
//! gets one more row, policy `recorded`, and every policy's row says how far its peak is from the
//! recorded one (`vs_recorded_pct`).
//!
//! # Invariants
//! `overhead_pct` = (`peak_reserved_bytes` − `peak_live_bytes`) / `peak_live_bytes` × 100;
//! `min_capacity_ratio` = `min_capacity_bytes` / the trace's peak live bytes with every allocation
//! served (equal to `peak_live_bytes` when the row had no OOM).
//!
//! # Locking
//! None.

use crate::bytes::format_bytes;
use crate::replay::engine::{overhead_pct, Outcome};
use crate::Breakdown;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The policy name of the row made from a snapshot's recorded segment events.
pub const RECORDED: &str = "recorded";

/// One line of the report.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Row {
    /// The trace's name (its file name as given).
    pub trace: String,
    /// The policy's name, or [`RECORDED`].
    pub policy: String,
    /// Memory of the simulated device, in bytes.
    pub capacity_bytes: u64,
    /// Events replayed (the `recorded` row: the trace's events).
    pub events: u64,
    /// The most bytes live at once, as requested sizes (the `recorded` row: the trace's own, with
    /// every allocation served).
    pub peak_live_bytes: u64,
    /// The most bytes reserved at once: the simulated driver's peak, or the recording allocator's
    /// (the `recorded` row).
    pub peak_reserved_bytes: u64,
    /// (peak reserved − peak live) / peak live, in percent, to 2 decimals.
    pub overhead_pct: f64,
    /// Allocations that failed with an OOM.
    pub ooms: u64,
    /// Pages remapped into new places (tessera); 0 for the other policies.
    pub remaps: u64,
    /// Driver calls during the replay, by CUDA function name.
    pub driver_calls: BTreeMap<String, u64>,
    /// Wall-clock time of the replay, in seconds (0 for the `recorded` row).
    pub seconds: f64,
    /// Events replayed per second, rounded (0 for the `recorded` row).
    pub events_per_s: f64,
    /// The smallest capacity with no OOM, a multiple of
    /// [`MIN_CAPACITY_STEP`](crate::replay::engine::MIN_CAPACITY_STEP); `None` when not
    /// searched for or not found.
    pub min_capacity_bytes: Option<u64>,
    /// `min_capacity_bytes` / the trace's peak live bytes with every allocation served, to 3
    /// decimals.
    pub min_capacity_ratio: Option<f64>,
    /// (peak reserved − recorded peak reserved) / recorded peak, in percent, when the trace
    /// recorded its allocator's reserved bytes.
    pub vs_recorded_pct: Option<f64>,
    /// Events of the trace dropped as unreplayable (a free of an unknown id, ...).
    pub dropped_events: u64,
    /// The snapshot's device the trace is of; `None` for a CSV trace.
    pub device: Option<usize>,
    /// Snapshots: blocks live before the first entry, reconstructed (see
    /// [`Reconstructed`](crate::replay::trace::Reconstructed)).
    pub reconstructed_blocks: u64,
    /// Their bytes.
    pub reconstructed_bytes: u64,
    /// `fits`, or where a real run would have stopped: `OOM at entry 11,412: 512.00 MiB,
    /// model.py:42 in forward` (the `recorded` row: whether the recorded run ran out of memory).
    pub headline: String,
    /// The first allocation that failed (the `recorded` row: the first `oom` entry).
    pub first_oom: Option<OomInfo>,
    /// The `recorded` row: the recording allocator's configuration, when known.
    pub recorded_config: Option<String>,
    /// The `recorded` row: how often the recording allocator released its cache to make room for
    /// a new segment ([`RecordedRetry`](crate::replay::trace::RecordedRetry)).
    pub recorded_retries: u64,
    /// The `recorded` row with retries: the fewest bytes reserved plus asked for at a retry, above
    /// which the recorded device could not go (its memory was at most about this).
    pub recorded_limit_bytes: Option<u64>,
    /// The name of the policy that models the recorded configuration, on every row of a trace
    /// whose recording allocator's configuration is known.
    pub models_recorded: Option<String>,
    /// Pages remapped in the replay at the smallest capacity (tessera), when searched for.
    pub remaps_at_min_capacity: Option<u64>,
    /// Those remaps per 1,000 allocations of that replay.
    pub remaps_per_1000_at_min_capacity: Option<f64>,
    /// With `--explain`: where the bytes were at the peak of live bytes, in the replay at
    /// `capacity_bytes`.
    pub explain_at_peak: Option<Moment>,
    /// With `--explain`: the same moment in the replay at the smallest capacity: what the bytes
    /// above live at that capacity are.
    pub explain_at_min_capacity: Option<Moment>,
    /// With `--explain`: where the bytes were when the replay one step below the smallest capacity
    /// ran out of memory: why that capacity is not enough.
    pub explain_below_min_capacity: Option<Moment>,
}

/// A [`Breakdown`] of the device at one moment of a replay.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Moment {
    /// The event after which (or, at an OOM, during which) it was taken.
    pub event: usize,
    /// Memory of the simulated device at the smallest capacity and below it
    /// (`capacity_bytes` − `reserved_bytes` was never reserved); `None` at the peak, where the
    /// capacity is no constraint.
    pub capacity_bytes: Option<u64>,
    /// The request that failed, at an OOM.
    pub failed_request_bytes: Option<u64>,
    /// Where the reserved bytes were; `requested_bytes` is the live bytes at that moment.
    #[serde(flatten)]
    pub breakdown: Breakdown,
}

impl Moment {
    /// Bytes above live: every cause, plus what was never reserved when the capacity is set.
    pub fn above_live(&self) -> u64 {
        self.capacity_bytes
            .unwrap_or(self.breakdown.reserved_bytes)
            .saturating_sub(self.breakdown.requested_bytes)
    }
}

/// Where a run ran out of memory.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct OomInfo {
    /// The trace line of the allocation: the snapshot entry (1-based), 0 for memory live before
    /// the first entry.
    pub line: u64,
    /// Its index in the trace's events (the `recorded` row: the events before the `oom` entry).
    pub event: usize,
    /// The bytes asked for.
    pub size_bytes: u64,
    /// Bytes live at that moment (requested sizes); `None` for the `recorded` row.
    pub live_bytes: Option<u64>,
    /// Bytes the device held at that moment; `None` for the `recorded` row.
    pub reserved_bytes: Option<u64>,
    /// What CUDA reported free (the `recorded` row's `device_free`).
    pub device_free_bytes: Option<u64>,
    /// The allocation's top user frames (`file:line in function`), innermost first.
    pub frames: Vec<String>,
    /// Whether `line` is a snapshot's entry (else a CSV line): how the headline names it.
    #[serde(skip)]
    pub snapshot: bool,
}

/// Where a trace's allocation is, for people: `at entry 11,412` (a snapshot's entry), `at line
/// 11,412` (a CSV trace's line), or `before the first entry` (memory live before recording).
pub fn oom_place(line: u64, snapshot: bool) -> String {
    match (line, snapshot) {
        (0, _) => "before the first entry".to_owned(),
        (line, true) => format!("at entry {}", thousands(line)),
        (line, false) => format!("at line {}", thousands(line)),
    }
}

impl OomInfo {
    /// `OOM at entry 11,412: 512.00 MiB` (the headline without frames).
    pub fn place_and_size(&self) -> String {
        let at = oom_place(self.line, self.snapshot);
        format!("OOM {at}: {}", format_bytes(self.size_bytes))
    }

    /// `OOM at entry 11,412: 512.00 MiB, model.py:42 in forward`.
    pub fn headline(&self) -> String {
        let mut s = self.place_and_size();
        if let Some(f) = self.frames.first() {
            s.push_str(", ");
            s.push_str(f);
        }
        s
    }
}

/// `11412` as `11,412`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

impl Row {
    /// A row of `trace` and `policy` with nothing measured yet.
    fn new(trace: &str, policy: &str, capacity: u64, dropped: u64) -> Row {
        Row {
            trace: trace.to_string(),
            policy: policy.to_string(),
            capacity_bytes: capacity,
            events: 0,
            peak_live_bytes: 0,
            peak_reserved_bytes: 0,
            overhead_pct: 0.0,
            ooms: 0,
            remaps: 0,
            driver_calls: BTreeMap::new(),
            seconds: 0.0,
            events_per_s: 0.0,
            min_capacity_bytes: None,
            min_capacity_ratio: None,
            vs_recorded_pct: None,
            dropped_events: dropped,
            device: None,
            reconstructed_blocks: 0,
            reconstructed_bytes: 0,
            headline: "fits".to_owned(),
            first_oom: None,
            recorded_config: None,
            recorded_retries: 0,
            recorded_limit_bytes: None,
            models_recorded: None,
            remaps_at_min_capacity: None,
            remaps_per_1000_at_min_capacity: None,
            explain_at_peak: None,
            explain_at_min_capacity: None,
            explain_below_min_capacity: None,
        }
    }

    /// The row of one replay.
    pub fn from_outcome(trace: &str, capacity: u64, dropped: u64, o: &Outcome) -> Row {
        Row {
            events: o.events,
            peak_live_bytes: o.peak_live_bytes,
            peak_reserved_bytes: o.peak_reserved_bytes,
            overhead_pct: round2(o.overhead_pct()),
            ooms: o.ooms,
            remaps: o.remaps,
            driver_calls: o
                .driver_calls
                .iter()
                .map(|&(c, n)| (c.cuda_name().to_string(), n))
                .collect(),
            seconds: o.seconds,
            events_per_s: o.events_per_s().round(),
            ..Row::new(trace, o.policy.name(), capacity, dropped)
        }
    }

    /// The `recorded` row: the recording allocator's own peak reserved bytes.
    pub fn recorded(
        trace: &str,
        capacity: u64,
        dropped: u64,
        events: u64,
        peak_live: u64,
        peak_reserved: u64,
    ) -> Row {
        Row {
            events,
            peak_live_bytes: peak_live,
            peak_reserved_bytes: peak_reserved,
            overhead_pct: round2(overhead_pct(peak_reserved, peak_live)),
            vs_recorded_pct: Some(0.0),
            ..Row::new(trace, RECORDED, capacity, dropped)
        }
    }

    /// Sets the smallest capacity found and its ratio to `peak_live`, the trace's peak live bytes
    /// when every allocation succeeds (the row's own peak is lower when it had OOMs).
    pub fn set_min_capacity(&mut self, bytes: Option<u64>, peak_live: u64) {
        self.min_capacity_bytes = bytes;
        self.min_capacity_ratio = match bytes {
            Some(b) if peak_live > 0 => Some(round3(b as f64 / peak_live as f64)),
            _ => None,
        };
    }

    /// One JSON object, no newline.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a row is always serialisable")
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Events per second, short: `2.31 M`, `812 k`.
fn rate(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2} M", x / 1e6)
    } else if x >= 1e3 {
        format!("{:.0} k", x / 1e3)
    } else {
        format!("{x:.0}")
    }
}

/// The side-by-side table of `rows`, then the driver calls by kind.
pub fn render_table(rows: &[Row]) -> String {
    let with_min = rows.iter().any(|r| r.min_capacity_bytes.is_some());
    let with_recorded = rows.iter().any(|r| r.policy == RECORDED);
    let with_start = rows.iter().any(|r| r.reconstructed_blocks > 0);
    let mut header = vec![
        "trace",
        "policy",
        "events",
        "peak live",
        "peak reserved",
        "overhead",
        "OOMs",
        "remaps",
        "driver calls",
        "time",
        "events/s",
    ];
    if with_recorded {
        header.push("vs recorded");
    }
    if with_min {
        header.extend(["min capacity", "÷ peak live", "remaps/1k there"]);
    }
    if with_start {
        // Memory live before a snapshot's first entry, reconstructed: part of every row's live.
        header.push("live at start");
    }
    header.push("result");
    let mut table: Vec<Vec<String>> = vec![header.iter().map(|s| s.to_string()).collect()];
    let dash = || "-".to_string();
    for r in rows {
        let recorded = r.policy == RECORDED;
        let mut line = vec![
            r.trace.clone(),
            r.policy.clone(),
            r.events.to_string(),
            format_bytes(r.peak_live_bytes),
            format_bytes(r.peak_reserved_bytes),
            format!("{:.1}%", r.overhead_pct),
            r.ooms.to_string(),
            r.remaps.to_string(),
            r.driver_calls.values().sum::<u64>().to_string(),
            format!("{:.2} s", r.seconds),
            rate(r.events_per_s),
        ];
        if recorded {
            // Nothing was replayed for the recorded row: no OOMs, remaps, calls or time to show.
            line[6..].fill_with(dash);
        }
        if with_recorded {
            line.push(match r.vs_recorded_pct {
                Some(p) if !recorded => format!("{p:+.1}%"),
                _ if recorded => model_gap(rows, r).unwrap_or_else(dash),
                _ => dash(),
            });
        }
        if with_min {
            line.push(r.min_capacity_bytes.map(format_bytes).unwrap_or_else(dash));
            line.push(
                r.min_capacity_ratio
                    .map(|x| format!("{x:.3}"))
                    .unwrap_or_else(dash),
            );
            line.push(
                r.remaps_per_1000_at_min_capacity
                    .map(|x| format!("{x:.1}"))
                    .unwrap_or_else(dash),
            );
        }
        if with_start {
            line.push(match r.reconstructed_blocks {
                0 => dash(),
                n => format!(
                    "{} ({} block{})",
                    format_bytes(r.reconstructed_bytes),
                    thousands(n),
                    if n == 1 { "" } else { "s" }
                ),
            });
        }
        line.push(
            r.first_oom
                .as_ref()
                .map_or_else(|| "fits".to_owned(), OomInfo::place_and_size),
        );
        table.push(line);
    }
    let mut out = align(&table, 2);

    // Driver calls by kind: one column per kind any replay used.
    let kinds: Vec<&String> = {
        let mut k: Vec<&String> = rows.iter().flat_map(|r| r.driver_calls.keys()).collect();
        k.sort();
        k.dedup();
        k
    };
    if !kinds.is_empty() {
        let mut calls = vec![std::iter::once("driver calls".to_string())
            .chain(std::iter::once("policy".to_string()))
            .chain(kinds.iter().map(|k| k.to_string()))
            .collect::<Vec<_>>()];
        for r in rows.iter().filter(|r| r.policy != RECORDED) {
            calls.push(
                std::iter::once(r.trace.clone())
                    .chain(std::iter::once(r.policy.clone()))
                    .chain(
                        kinds
                            .iter()
                            .map(|k| r.driver_calls.get(*k).copied().unwrap_or(0).to_string()),
                    )
                    .collect(),
            );
        }
        out.push('\n');
        out.push_str(&align(&calls, 2));
    }
    out
}

/// `--explain`: per row and moment, the bytes above live by cause, in MiB, and as a share of the
/// trace's peak live bytes.
pub fn render_explain(rows: &[Row]) -> String {
    let mut header: Vec<String> = [
        "trace",
        "policy",
        "moment",
        "event",
        "live",
        "request",
        "above live",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let causes = Breakdown::default().causes();
    header.extend(causes.iter().map(|(name, _)| name.to_string()));
    header.push("unreserved".into());
    let mut table = vec![header];
    let mib = |b: u64| format!("{:.1}", b as f64 / (1u64 << 20) as f64);
    for r in rows {
        let moments = [
            ("peak", &r.explain_at_peak),
            ("min capacity", &r.explain_at_min_capacity),
            ("below min (OOM)", &r.explain_below_min_capacity),
        ];
        for (name, m) in moments {
            let Some(m) = m else { continue };
            let b = &m.breakdown;
            let mut line = vec![
                r.trace.clone(),
                r.policy.clone(),
                name.to_string(),
                m.event.to_string(),
                mib(b.requested_bytes),
                m.failed_request_bytes
                    .map(mib)
                    .unwrap_or_else(|| "-".into()),
                format!(
                    "{} ({:.2}%)",
                    mib(m.above_live()),
                    m.above_live() as f64 / r.peak_live_bytes.max(1) as f64 * 100.0
                ),
            ];
            line.extend(b.causes().iter().map(|&(_, v)| mib(v)));
            line.push(
                m.capacity_bytes
                    .map(|c| mib(c.saturating_sub(b.reserved_bytes)))
                    .unwrap_or_else(|| "-".into()),
            );
            table.push(line);
        }
    }
    if table.len() == 1 {
        return String::new();
    }
    let mut out = String::from(
        "where the bytes above live are, in MiB: at the peak of live bytes (above live = reserved - \
         live), the same event at the smallest capacity and, one step below it, where the replay \
         ran out of memory (above live = capacity - live, the failed request included in no \
         column); shares are of the trace's peak live bytes\n",
    );
    out.push_str(&align(&table, 3));
    out
}

/// The `recorded` row's cell in `vs recorded`: the gap of the policy that models the recorded
/// configuration, `native +0.1%`.
fn model_gap(rows: &[Row], recorded: &Row) -> Option<String> {
    let model = recorded.models_recorded.as_deref()?;
    let row = rows
        .iter()
        .find(|r| r.trace == recorded.trace && r.policy == model)?;
    Some(format!("{model} {:+.1}%", row.vs_recorded_pct?))
}

/// What the table cannot hold, per trace: the memory reconstructed before the first entry, the
/// recorded configuration and OOMs, and where each policy first ran out of memory, with frames.
pub fn render_notes(rows: &[Row]) -> String {
    let mut out = String::new();
    let mut traces: Vec<&str> = rows.iter().map(|r| r.trace.as_str()).collect();
    traces.dedup();
    for trace in traces {
        let of: Vec<&Row> = rows.iter().filter(|r| r.trace == trace).collect();
        let Some(first) = of.first() else { continue };
        if first.reconstructed_blocks > 0 {
            let n = first.reconstructed_blocks;
            let _ = writeln!(
                out,
                "{trace}: {} block{} ({}) {} live before the first entry, reconstructed from the \
                 segments and from frees of blocks the trace never allocates",
                thousands(n),
                if n == 1 { "" } else { "s" },
                format_bytes(first.reconstructed_bytes),
                if n == 1 { "was" } else { "were" }
            );
        }
        for r in &of {
            if r.policy == RECORDED {
                if let Some(config) = &r.recorded_config {
                    let model = match (&r.models_recorded, model_gap(rows, r)) {
                        (Some(_), Some(gap)) => format!("; modelled by {gap}"),
                        (Some(m), None) => format!("; modelled by {m}"),
                        (None, _) => String::new(),
                    };
                    let _ = writeln!(out, "{trace}: recorded with {config}{model}");
                }
                if let Some(limit) = r.recorded_limit_bytes {
                    let _ = writeln!(
                        out,
                        "{trace}: the recorded run was at its device's limit: {} time{} it \
                         released cached segments to make room for a new one, so its device held \
                         between {} and {}; compare with --capacity {}",
                        thousands(r.recorded_retries),
                        if r.recorded_retries == 1 { "" } else { "s" },
                        format_bytes(r.peak_reserved_bytes),
                        format_bytes(limit),
                        capacity_arg(r.peak_reserved_bytes)
                    );
                }
                if let Some(o) = &r.first_oom {
                    let free = o
                        .device_free_bytes
                        .map(|f| format!(", {} free on the device", format_bytes(f)))
                        .unwrap_or_default();
                    let _ = writeln!(
                        out,
                        "{trace}: the recorded run ran out of memory at entry {}: {} asked for{free}{}",
                        thousands(o.line),
                        format_bytes(o.size_bytes),
                        frames_suffix(&o.frames)
                    );
                }
            } else if let Some(o) = &r.first_oom {
                let _ = writeln!(
                    out,
                    "{trace}: {}: {} (live {}, reserved {}){}",
                    r.policy,
                    o.place_and_size(),
                    format_bytes(o.live_bytes.unwrap_or(0)),
                    format_bytes(o.reserved_bytes.unwrap_or(0)),
                    frames_suffix(&o.frames)
                );
            }
        }
    }
    out
}

/// A byte count as a `--capacity` argument, in MiB, rounded up.
fn capacity_arg(bytes: u64) -> String {
    format!("{}MiB", bytes.div_ceil(1 << 20))
}

fn frames_suffix(frames: &[String]) -> String {
    if frames.is_empty() {
        String::new()
    } else {
        format!(", {}", frames.join(" < "))
    }
}

/// Left-aligns the first two columns and right-aligns the others, `gap` spaces apart.
fn align(table: &[Vec<String>], left: usize) -> String {
    let cols = table.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            table
                .iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in table {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str("  ");
            }
            let pad = widths[c] - cell.chars().count();
            if c < left {
                let _ = write!(line, "{cell}{}", " ".repeat(pad));
            } else {
                let _ = write!(line, "{}{cell}", " ".repeat(pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
