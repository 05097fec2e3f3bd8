//! Trace replay: allocation traces run through tessera and through allocators that follow
//! PyTorch's rules, each on its own simulated device, and compared.
//!
//! # Layers
//! - [`trace`]: the trace formats (tessera CSV, gzip'd or not; PyTorch memory snapshots) read into
//!   one validated [`trace::Trace`].
//! - [`engine`]: one trace through one [`Policy`] on a fresh simulated device: peaks, OOMs,
//!   remaps, driver calls, time, a time series; the smallest capacity with no OOM.
//! - `pytorch`: the `native` and `expandable` policies, PyTorch's allocator rules over the same
//!   driver (see `docs/policies.md`).
//! - [`report`]: rows, the side-by-side table and JSON lines.
//! - [`export`]: a replay as a PyTorch memory snapshot, for PyTorch's viewer.
//!
//! [`run`] ties them together for one trace; the `tessera replay` command calls it per trace.
//!
//! # Locking
//! None: every replay owns its allocator and device.

pub mod engine;
pub mod export;
pub(crate) mod pytorch;
pub mod report;
pub mod trace;

pub use engine::{FirstOom, Outcome, Policy, ReplayError, ReplayOptions, Sample};
pub use report::{Moment, OomInfo, Row};

use engine::{min_capacity, replay, trace_peak, MIN_CAPACITY_STEP};
use trace::Trace;

/// Everything measured on one trace.
#[derive(Debug)]
pub struct TraceReport {
    /// One row per policy, in the order asked, then `recorded` when the trace has it.
    pub rows: Vec<Row>,
    /// The replays behind the policy rows, in the same order (for plots).
    pub outcomes: Vec<Outcome>,
    /// The recorded reserved bytes as a time series, when the trace has them.
    pub recorded: Vec<Sample>,
    /// Policies whose replay failed (a driver error, a corruption): no row for them.
    pub errors: Vec<ReplayError>,
}

/// What [`run`] measures beyond one replay per policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Measures {
    /// Bisect the smallest capacity each policy needs, and count the remaps of a replay there.
    pub min_capacity: bool,
    /// Break the bytes down by cause ([`crate::Breakdown`]) at the peak of live bytes, and, with
    /// `min_capacity`, at the same moment at the smallest capacity and at the OOM one step below
    /// it.
    pub explain: bool,
}

/// Replays `trace` through every policy in `policies`, measuring what `measures` asks for.
/// `progress(policy, events done)` is called now and then. A policy whose replay fails gets no
/// row and its error in [`TraceReport::errors`]; the others go on.
pub fn run(
    trace: &Trace,
    policies: &[Policy],
    opts: &ReplayOptions,
    measures: Measures,
    progress: &mut dyn FnMut(Policy, usize),
) -> TraceReport {
    let dropped = trace.problems.len() as u64;
    let (peak_live, peak_event) = trace_peak(trace);
    let explain_at = peak_event.filter(|_| measures.explain);
    let main_opts = ReplayOptions {
        explain_at,
        ..opts.clone()
    };
    let opts = &main_opts;
    let mut report = TraceReport {
        rows: Vec::new(),
        outcomes: Vec::new(),
        recorded: recorded_series(trace),
        errors: Vec::new(),
    };
    let recorded_peak = report.recorded.iter().map(|s| s.reserved).max();
    for &policy in policies {
        let outcome = match replay(trace, policy, opts, &mut |n| progress(policy, n)) {
            Ok(o) => o,
            Err(e) => {
                report.errors.push(e);
                continue;
            }
        };
        let mut row = Row::from_outcome(&trace.name, opts.capacity, dropped, &outcome);
        describe_trace(&mut row, trace);
        row.explain_at_peak = moment(&outcome, explain_at, None);
        if let Some(o) = &outcome.first_oom {
            row.first_oom = Some(OomInfo {
                line: o.line,
                event: o.event,
                size_bytes: o.size,
                live_bytes: Some(o.live_bytes),
                reserved_bytes: Some(o.reserved_bytes),
                device_free_bytes: None,
                frames: frames(trace, trace.event_frames.get(o.event).copied().flatten()),
                snapshot: trace.device.is_some(),
            });
        }
        if let Some(settings) = &trace.settings {
            row.models_recorded = Some(settings.policy().name().to_owned());
        }
        row.headline = row
            .first_oom
            .as_ref()
            .map_or_else(|| "fits".to_owned(), OomInfo::headline);
        if measures.min_capacity {
            let known_fit = (outcome.ooms == 0).then_some(outcome.peak_reserved_bytes);
            let found = min_capacity(trace, policy, opts, peak_live, known_fit).and_then(|bytes| {
                row.set_min_capacity(bytes, peak_live);
                match bytes {
                    Some(c) => at_min_capacity(trace, policy, opts, c, &mut row),
                    None => Ok(()),
                }
            });
            if let Err(e) = found {
                report.errors.push(e);
                continue;
            }
        }
        if let Some(rec) = recorded_peak.filter(|&r| r > 0) {
            row.vs_recorded_pct = Some(
                ((outcome.peak_reserved_bytes as f64 - rec as f64) / rec as f64 * 1000.0).round()
                    / 10.0,
            );
        }
        report.rows.push(row);
        report.outcomes.push(outcome);
    }
    // A recorded OOM is reported even when the snapshot gives no reserved bytes to compare.
    let recorded_row = recorded_peak.or((!trace.recorded_ooms.is_empty()).then_some(0));
    if let Some(rec) = recorded_row {
        let mut row = Row::recorded(
            &trace.name,
            opts.capacity,
            dropped,
            trace.events.len() as u64,
            peak_live,
            rec,
        );
        describe_trace(&mut row, trace);
        row.ooms = trace.recorded_ooms.len() as u64;
        row.recorded_retries = trace.recorded_retries.len() as u64;
        row.recorded_limit_bytes = trace
            .recorded_retries
            .iter()
            .map(|r| r.reserved_before.saturating_add(r.size))
            .min()
            .map(|limit| limit.max(rec));
        if let Some(settings) = &trace.settings {
            row.recorded_config = Some(settings.describe());
            row.models_recorded = Some(settings.policy().name().to_owned());
        }
        if let Some(o) = trace.recorded_ooms.first() {
            let info = OomInfo {
                line: o.line,
                event: o.event,
                size_bytes: o.size,
                live_bytes: None,
                reserved_bytes: None,
                device_free_bytes: o.device_free,
                frames: frames(trace, o.frames),
                snapshot: true,
            };
            row.headline = info.headline();
            row.first_oom = Some(info);
        }
        report.rows.push(row);
    }
    report
}

/// The breakdown `outcome` took after event `at`, as a [`Moment`].
fn moment(outcome: &Outcome, at: Option<usize>, capacity: Option<u64>) -> Option<Moment> {
    Some(Moment {
        event: at?,
        capacity_bytes: capacity,
        failed_request_bytes: None,
        breakdown: outcome.breakdown?,
    })
}

/// Replays at the smallest capacity `capacity` (remaps there; with `explain_at`, the breakdown at
/// that moment), and with `explain_at`, one step below it up to its first OOM (the breakdown
/// there).
fn at_min_capacity(
    trace: &Trace,
    policy: Policy,
    opts: &ReplayOptions,
    capacity: u64,
    row: &mut Row,
) -> Result<(), ReplayError> {
    let at = ReplayOptions {
        capacity,
        verify: false,
        samples: 0,
        record: false,
        ..opts.clone()
    };
    let o = replay(trace, policy, &at, &mut |_| {})?;
    // Only tessera's policies remap; PyTorch's rules count nothing here ("-", not 0).
    if matches!(policy, Policy::Tessera | Policy::Legacy) {
        row.remaps_at_min_capacity = Some(o.remaps);
        row.remaps_per_1000_at_min_capacity =
            Some((o.remaps as f64 * 1000.0 / o.allocations.max(1) as f64 * 10.0).round() / 10.0);
    }
    row.explain_at_min_capacity = moment(&o, opts.explain_at, Some(capacity));
    if opts.explain_at.is_some() && capacity > MIN_CAPACITY_STEP {
        let below = ReplayOptions {
            capacity: capacity - MIN_CAPACITY_STEP,
            stop_at_first_oom: true,
            explain_at: None,
            explain_oom: true,
            ..at
        };
        let o = replay(trace, policy, &below, &mut |_| {})?;
        row.explain_below_min_capacity = o.first_oom.and_then(|f| {
            Some(Moment {
                event: f.event,
                capacity_bytes: Some(below.capacity),
                failed_request_bytes: Some(f.size),
                breakdown: f.breakdown?,
            })
        });
    }
    Ok(())
}

/// What every row of a trace says about it.
fn describe_trace(row: &mut Row, trace: &Trace) {
    row.device = trace.device;
    row.reconstructed_blocks = trace.reconstructed.blocks;
    row.reconstructed_bytes = trace.reconstructed.bytes;
}

/// How many frames an OOM report shows.
const OOM_FRAMES: usize = 3;

/// The top frames of a traceback, as text.
fn frames(trace: &Trace, index: Option<u32>) -> Vec<String> {
    trace
        .top_frames(index, OOM_FRAMES)
        .into_iter()
        .map(|f| f.to_string())
        .collect()
}

/// The trace's recorded reserved bytes as samples (live bytes left 0: the row carries them).
fn recorded_series(trace: &Trace) -> Vec<Sample> {
    trace
        .recorded
        .iter()
        .map(|p| Sample {
            event: p.event,
            reserved: p.reserved,
            live: 0,
        })
        .collect()
}
