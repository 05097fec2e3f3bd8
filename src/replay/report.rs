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
}

impl Row {
    /// The row of one replay.
    pub fn from_outcome(trace: &str, capacity: u64, dropped: u64, o: &Outcome) -> Row {
        Row {
            trace: trace.to_string(),
            policy: o.policy.name().to_string(),
            capacity_bytes: capacity,
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
            min_capacity_bytes: None,
            min_capacity_ratio: None,
            vs_recorded_pct: None,
            dropped_events: dropped,
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
            trace: trace.to_string(),
            policy: RECORDED.to_string(),
            capacity_bytes: capacity,
            events,
            peak_live_bytes: peak_live,
            peak_reserved_bytes: peak_reserved,
            overhead_pct: round2(overhead_pct(peak_reserved, peak_live)),
            ooms: 0,
            remaps: 0,
            driver_calls: BTreeMap::new(),
            seconds: 0.0,
            events_per_s: 0.0,
            min_capacity_bytes: None,
            min_capacity_ratio: None,
            vs_recorded_pct: Some(0.0),
            dropped_events: dropped,
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
        header.extend(["min capacity", "÷ peak live"]);
    }
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
        }
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
