//! The replay engine: one trace through one policy on a fresh simulated device.
//!
//! # Data structure
//! A replay owns a [`SimDriver`] (one device of the requested capacity, bookkeeping backing unless
//! memory is verified) and one allocator built by [`Policy`] over it. The trace's slots map to
//! the pointers they hold (`0`: the allocation failed with an OOM, so its free is skipped). Live
//! bytes are the requested sizes of the allocations that succeeded.
//!
//! Reserved bytes are what the simulated driver holds (VMM pages and `cuMemAlloc` segments): the
//! same measure for every policy, read from the driver's exact peak
//! ([`SimDriver::peak_bytes_in_use`]), so no allocation is missed between samples. The time series
//! for plots keeps, per window of events, the peak reserved and peak live bytes of the window.
//!
//! # Invariants
//! After a replay the live bytes equal the sum of the sizes of the slots holding pointers, and with
//! `verify` every live allocation still holds the pattern written into it when it was made.
//!
//! # Locking
//! None: a replay is single-threaded and owns its device.

use crate::config::{Backend, Config};
use crate::driver::sim::{Backing, MemoryEvent, SimConfig, SimDriver};
use crate::driver::{Call, DevicePtr, Driver, Stream};
use crate::error::Error;
use crate::replay::pytorch::{PytorchAllocator, Rules};
use crate::replay::trace::{Op, Trace};
use crate::sync::Arc;
use crate::{Breakdown, Tessera};
use std::fmt;
use std::str::FromStr;
use std::time::Instant;

/// The granularity bisection for the smallest capacity works to.
pub const MIN_CAPACITY_STEP: u64 = 2 << 20;

/// How often the progress callback is called, in events.
const PROGRESS_EVERY: usize = 1 << 16;

/// An allocation policy the replay compares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Policy {
    /// tessera with its defaults: VMM pages, size classes, remapping of fully free pages.
    Tessera,
    /// tessera over `cuMemAlloc` segments: the same pools, no remapping.
    Legacy,
    /// PyTorch's CUDACachingAllocator default rules (`expandable_segments:False`).
    Native,
    /// PyTorch's `expandable_segments:True` rules.
    Expandable,
}

impl Policy {
    /// Every policy, in report order.
    pub const ALL: [Policy; 4] = [
        Policy::Tessera,
        Policy::Legacy,
        Policy::Native,
        Policy::Expandable,
    ];

    /// The name the command line and the reports use.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Tessera => "tessera",
            Policy::Legacy => "legacy",
            Policy::Native => "native",
            Policy::Expandable => "expandable",
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Policy {
    type Err = String;

    fn from_str(s: &str) -> Result<Policy, String> {
        Policy::ALL
            .into_iter()
            .find(|p| p.name() == s.trim())
            .ok_or_else(|| {
                format!("unknown policy {s:?}: expected tessera, legacy, native or expandable")
            })
    }
}

/// How to replay.
#[derive(Clone, Debug)]
pub struct ReplayOptions {
    /// Memory of the simulated device (default 80 GiB).
    pub capacity: u64,
    /// Its allocation granularity (default 2 MiB).
    pub granularity: u64,
    /// Back the device with host memory and write and check a pattern in every allocation.
    pub verify: bool,
    /// Points wanted in the time series (0: none).
    pub samples: usize,
    /// The configuration of the `tessera` and `legacy` policies (their backend is set by the
    /// policy).
    pub config: Config,
    /// Stop at the first OOM (used by the capacity bisection).
    pub stop_at_first_oom: bool,
    /// Keep what an export needs: the address of every event, the driver's memory calls, the
    /// segments at the end ([`Outcome::recording`]).
    pub record: bool,
    /// Take a [`Breakdown`] of the device right after this event ([`Outcome::breakdown`]).
    pub explain_at: Option<usize>,
    /// Take a [`Breakdown`] of the device at the first OOM ([`FirstOom::breakdown`]).
    pub explain_oom: bool,
}

impl Default for ReplayOptions {
    fn default() -> Self {
        ReplayOptions {
            capacity: 80 << 30,
            granularity: 2 << 20,
            verify: false,
            samples: 0,
            config: Config {
                check_invariants: false,
                ..Config::default()
            },
            stop_at_first_oom: false,
            record: false,
            explain_at: None,
            explain_oom: false,
        }
    }
}

/// One point of a replay's time series: the peaks over the window of events ending at `event`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sample {
    /// Number of events replayed when the window closed.
    pub event: usize,
    /// Peak bytes the simulated driver held during the window (in a trace's recorded series, the
    /// recording allocator's reserved bytes after `event` events).
    pub reserved: u64,
    /// Peak live bytes (requested sizes) during the window; 0 in a recorded series.
    pub live: u64,
}

/// What one replay measured.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The policy replayed.
    pub policy: Policy,
    /// Events replayed (an OOM'd allocation and its skipped free count as replayed).
    pub events: u64,
    /// The most bytes live at once: requested sizes of the allocations that succeeded.
    pub peak_live_bytes: u64,
    /// The most bytes the simulated driver held at once (its exact peak, not sampled).
    pub peak_reserved_bytes: u64,
    /// Allocations that failed with an OOM.
    pub ooms: u64,
    /// Indices of the events whose allocation failed with an OOM.
    pub oom_events: Vec<usize>,
    /// The first allocation that failed: where a real run would have stopped.
    pub first_oom: Option<FirstOom>,
    /// Pages remapped into new places (tessera); 0 for the other policies.
    pub remaps: u64,
    /// Driver calls made during the replay, by kind (kinds never called left out).
    pub driver_calls: Vec<(Call, u64)>,
    /// Wall-clock time of the replay loop, in seconds.
    pub seconds: f64,
    /// The time series, one sample per window of events, the last closing at the last event
    /// replayed: at most [`ReplayOptions::samples`] points, none when that is 0.
    pub samples: Vec<Sample>,
    /// With [`ReplayOptions::record`]: where everything went.
    pub recording: Option<Recording>,
    /// With [`ReplayOptions::explain_at`]: where the device's bytes were right after that event.
    pub breakdown: Option<Breakdown>,
    /// Allocations that succeeded.
    pub allocations: u64,
}

/// Where a replay put everything: what an export writes.
#[derive(Clone, Debug, Default)]
pub struct Recording {
    /// Per event, the address it allocated or freed; 0 for an allocation that failed and its
    /// free.
    pub addrs: Vec<DevicePtr>,
    /// The driver's memory calls, each with the index of the event during which it was made.
    pub memory: Vec<(usize, MemoryEvent)>,
    /// The policy's segments and blocks at the end.
    pub segments: Vec<crate::torch_snapshot::Segment>,
}

/// The first allocation of a replay that failed with an OOM, and the device at that moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirstOom {
    /// Its index in [`Trace::events`].
    pub event: usize,
    /// Its line ([`crate::replay::trace::Event::line`]: the snapshot entry, 0 for memory live
    /// before the first entry).
    pub line: u64,
    /// The bytes asked for.
    pub size: u64,
    /// The stream's index in [`Trace::streams`].
    pub stream: u32,
    /// Bytes live (requested sizes) when it was asked for.
    pub live_bytes: u64,
    /// Bytes the device held when the allocator gave up (after its OOM sequence).
    pub reserved_bytes: u64,
    /// With [`ReplayOptions::explain_oom`]: where the device's bytes were when it gave up (the
    /// stream asked about is the request's).
    pub breakdown: Option<Breakdown>,
}

impl Outcome {
    /// (peak reserved − peak live) / peak live, in percent; 0 for an empty trace.
    pub fn overhead_pct(&self) -> f64 {
        overhead_pct(self.peak_reserved_bytes, self.peak_live_bytes)
    }

    /// Events replayed per second of wall-clock time; 0 when no time was measured.
    pub fn events_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.events as f64 / self.seconds
        } else {
            0.0
        }
    }
}

/// (reserved − live) / live, in percent; 0 when nothing was live.
pub fn overhead_pct(reserved: u64, live: u64) -> f64 {
    if live == 0 {
        0.0
    } else {
        (reserved as f64 - live as f64) / live as f64 * 100.0
    }
}

/// Why a replay could not finish. `line` is the trace line of the event, 0 when the failure is
/// not tied to one (setting up the allocator, the checks at the end).
#[derive(Debug)]
pub enum ReplayError {
    /// The allocator failed in a way other than an OOM (bad configuration, a driver error).
    Allocator {
        /// The policy being replayed.
        policy: Policy,
        /// The trace line of the event, or 0.
        line: u64,
        /// The allocator's error.
        error: Error,
    },
    /// An allocation lost its contents (`verify`), or the allocator's accounting disagrees with
    /// the driver's.
    Corrupted {
        /// The policy being replayed.
        policy: Policy,
        /// The trace line of the event, or 0.
        line: u64,
        /// What was found wrong.
        detail: String,
    },
}

impl fmt::Display for ReplayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (policy, line) = match self {
            ReplayError::Allocator { policy, line, .. }
            | ReplayError::Corrupted { policy, line, .. } => (policy, *line),
        };
        write!(f, "policy {policy}")?;
        if line > 0 {
            write!(f, ", event at line {line}")?;
        }
        match self {
            ReplayError::Allocator { error, .. } => write!(f, ": {error}"),
            ReplayError::Corrupted { detail, .. } => write!(f, ": corrupted: {detail}"),
        }
    }
}

impl std::error::Error for ReplayError {}

/// The allocator under test.
enum Runner {
    Tessera(Tessera),
    Pytorch(PytorchAllocator),
}

impl Runner {
    fn new(policy: Policy, drv: Arc<SimDriver>, config: &Config) -> Result<Runner, Error> {
        let tessera = |backend| {
            let config = Config {
                backend,
                ..config.clone()
            };
            Tessera::untraced(drv.clone(), config).map(Runner::Tessera)
        };
        let pytorch = |rules| {
            let mut p = PytorchAllocator::new(drv.clone(), 0, rules)?;
            p.set_check(config.check_invariants);
            Ok(Runner::Pytorch(p))
        };
        match policy {
            Policy::Tessera => tessera(Backend::Vmm),
            Policy::Legacy => tessera(Backend::Legacy),
            Policy::Native => pytorch(Rules::Native),
            Policy::Expandable => pytorch(Rules::Expandable),
        }
    }

    #[inline]
    fn allocate(&mut self, size: u64, stream: Stream) -> Result<DevicePtr, Error> {
        match self {
            Runner::Tessera(t) => t.allocate(0, size, stream),
            Runner::Pytorch(p) => p.allocate(size, stream),
        }
    }

    #[inline]
    fn free(&mut self, ptr: DevicePtr) -> Result<(), Error> {
        match self {
            Runner::Tessera(t) => t.free(0, ptr),
            Runner::Pytorch(p) => p.free(ptr),
        }
    }

    /// Bytes the allocator believes it holds from the driver.
    fn reserved(&self) -> u64 {
        match self {
            Runner::Tessera(t) => t.stats(0).map(|s| s.reserved_bytes).unwrap_or(0),
            Runner::Pytorch(p) => p.reserved_bytes(),
        }
    }

    /// Every segment and block, in PyTorch's snapshot format.
    fn segments(&self) -> Vec<crate::torch_snapshot::Segment> {
        match self {
            Runner::Tessera(t) => t
                .snapshot(0)
                .map(|s| crate::torch_snapshot::segments_of(&s))
                .unwrap_or_default(),
            Runner::Pytorch(p) => p.segments(),
        }
    }

    /// Where the device's bytes are now; `stream`'s free memory is told apart from the others'.
    fn breakdown(&self, drv: &SimDriver, stream: Stream) -> Breakdown {
        match self {
            Runner::Tessera(t) => t.breakdown(0, Some(stream)).unwrap_or_default(),
            Runner::Pytorch(p) => breakdown_of_segments(&p.segments(), drv.bytes_in_use(0)),
        }
    }

    fn remaps(&self) -> u64 {
        match self {
            Runner::Tessera(t) => t.stats(0).map(|s| s.remaps).unwrap_or(0),
            Runner::Pytorch(_) => 0,
        }
    }
}

/// Replays `trace` through `policy` on a fresh simulated device. `progress` is called now and then
/// with the number of events done.
pub fn replay(
    trace: &Trace,
    policy: Policy,
    opts: &ReplayOptions,
    progress: &mut dyn FnMut(usize),
) -> Result<Outcome, ReplayError> {
    let drv = Arc::new(SimDriver::new(SimConfig {
        devices: 1,
        capacity: opts.capacity,
        granularity: opts.granularity,
        vmm: true,
        backing: if opts.verify {
            Backing::Real
        } else {
            Backing::Bookkeeping
        },
    }));
    let mut runner =
        Runner::new(policy, drv.clone(), &opts.config).map_err(|error| ReplayError::Allocator {
            policy,
            line: 0,
            error,
        })?;
    let streams: Vec<Stream> = trace.streams.iter().map(|&s| Stream(s)).collect();
    let mut ptrs: Vec<DevicePtr> = vec![0; trace.slots as usize];
    let mut sizes: Vec<u64> = vec![0; trace.slots as usize];
    let stride = match opts.samples {
        0 => usize::MAX,
        n => trace.events.len().div_ceil(n).max(1),
    };
    let mut out = Outcome {
        policy,
        events: 0,
        peak_live_bytes: 0,
        peak_reserved_bytes: 0,
        ooms: 0,
        oom_events: Vec::new(),
        first_oom: None,
        remaps: 0,
        driver_calls: Vec::new(),
        seconds: 0.0,
        samples: Vec::new(),
        recording: None,
        breakdown: None,
        allocations: 0,
    };
    let mut recording = opts.record.then(Recording::default);
    drv.log_memory(opts.record);
    drv.reset_counters();
    drv.reset_peak_bytes_in_use(0);
    let (mut live, mut window_live) = (0u64, 0u64);
    let start = Instant::now();

    for (i, ev) in trace.events.iter().enumerate() {
        // The address the event allocated or freed (0: a failed allocation, its skipped free).
        let mut event_addr: DevicePtr = 0;
        match ev.op {
            Op::Alloc { slot, size, stream } => {
                match runner.allocate(size, streams[stream as usize]) {
                    Ok(ptr) => {
                        out.allocations += 1;
                        ptrs[slot as usize] = ptr;
                        event_addr = ptr;
                        sizes[slot as usize] = size;
                        live += size;
                        window_live = window_live.max(live);
                        if opts.verify {
                            pattern::accessible(&drv, ptr, size).map_err(|detail| {
                                ReplayError::Corrupted {
                                    policy,
                                    line: ev.line,
                                    detail,
                                }
                            })?;
                            // SAFETY: with real backing, `ptr` is host memory the simulated driver
                            // mapped read-write (checked just above), and the allocation holds
                            // `size` bytes.
                            unsafe { pattern::write(ptr, size, slot) };
                        }
                    }
                    // A request larger than any device is bad input to an allocator, but in a
                    // trace it is a request that cannot be served: an OOM, as in PyTorch.
                    Err(Error::OutOfMemory(_) | Error::InvalidSize { .. }) => {
                        ptrs[slot as usize] = 0;
                        out.ooms += 1;
                        out.oom_events.push(i);
                        if out.first_oom.is_none() {
                            out.first_oom = Some(FirstOom {
                                event: i,
                                line: ev.line,
                                size,
                                stream,
                                live_bytes: live,
                                reserved_bytes: drv.bytes_in_use(0),
                                breakdown: opts
                                    .explain_oom
                                    .then(|| runner.breakdown(&drv, streams[stream as usize])),
                            });
                        }
                        if opts.stop_at_first_oom {
                            out.events = i as u64 + 1;
                            break;
                        }
                    }
                    Err(error) => {
                        return Err(ReplayError::Allocator {
                            policy,
                            line: ev.line,
                            error,
                        })
                    }
                }
            }
            Op::Free { slot } => {
                let ptr = std::mem::take(&mut ptrs[slot as usize]);
                event_addr = ptr;
                if ptr != 0 {
                    let size = sizes[slot as usize];
                    if opts.verify {
                        // SAFETY: as at the allocation (checked accessible there); the block is
                        // live until freed below, and live blocks are never unmapped.
                        if let Err(detail) = unsafe { pattern::check(ptr, size, slot) } {
                            return Err(ReplayError::Corrupted {
                                policy,
                                line: ev.line,
                                detail,
                            });
                        }
                    }
                    runner.free(ptr).map_err(|error| ReplayError::Allocator {
                        policy,
                        line: ev.line,
                        error,
                    })?;
                    live -= size;
                }
            }
        }
        if opts.explain_at == Some(i) {
            let stream = match ev.op {
                Op::Alloc { stream, .. } => streams[stream as usize],
                Op::Free { .. } => Stream(0),
            };
            out.breakdown = Some(runner.breakdown(&drv, stream));
        }
        if let Some(r) = &mut recording {
            r.addrs.push(event_addr);
            r.memory
                .extend(drv.take_memory_log().into_iter().map(|m| (i, m)));
        }
        if (i + 1) % stride == 0 {
            sample(&drv, &mut out, i + 1, &mut window_live, live);
        }
        if (i + 1) % PROGRESS_EVERY == 0 {
            progress(i + 1);
        }
    }
    out.seconds = start.elapsed().as_secs_f64();
    if out.events == 0 {
        out.events = trace.events.len() as u64;
    }
    if opts.samples > 0 && out.samples.last().map(|s| s.event) != Some(out.events as usize) {
        let end = out.events as usize;
        sample(&drv, &mut out, end, &mut window_live, live);
    }
    out.peak_reserved_bytes = out.peak_reserved_bytes.max(drv.peak_bytes_in_use(0));
    out.peak_live_bytes = out.peak_live_bytes.max(window_live);
    out.driver_calls = drv
        .call_counts()
        .into_iter()
        .filter(|&(_, n)| n > 0)
        .collect();
    out.remaps = runner.remaps();
    if let Some(mut r) = recording {
        drv.log_memory(false);
        r.segments = runner.segments();
        out.recording = Some(r);
    }
    // The figures come from the driver; the allocator must agree with it.
    let (mine, driver) = (runner.reserved(), drv.bytes_in_use(0));
    if mine != driver {
        return Err(ReplayError::Corrupted {
            policy,
            line: 0,
            detail: format!("the allocator says it reserved {mine} B, the driver holds {driver} B"),
        });
    }
    if opts.verify {
        for (slot, (&ptr, &size)) in ptrs.iter().zip(&sizes).enumerate() {
            if ptr != 0 {
                // SAFETY: every nonzero slot holds a live allocation of `size` bytes.
                unsafe { pattern::check(ptr, size, slot as u32) }.map_err(|detail| {
                    ReplayError::Corrupted {
                        policy,
                        line: 0,
                        detail,
                    }
                })?;
            }
        }
    }
    progress(trace.events.len());
    Ok(out)
}

/// Closes a window of the time series.
fn sample(drv: &SimDriver, out: &mut Outcome, event: usize, window_live: &mut u64, live: u64) {
    let reserved = drv.peak_bytes_in_use(0);
    drv.reset_peak_bytes_in_use(0);
    out.peak_reserved_bytes = out.peak_reserved_bytes.max(reserved);
    out.peak_live_bytes = out.peak_live_bytes.max(*window_live);
    out.samples.push(Sample {
        event,
        reserved,
        live: *window_live,
    });
    *window_live = live;
}

/// The largest capacity a replay accepts: the simulated device's fake address space is 16 TiB, and
/// allocators reserve more virtual space than they map.
pub const MAX_CAPACITY: u64 = 8 << 40;

/// The smallest capacity, a multiple of [`MIN_CAPACITY_STEP`], at which `trace` replays through
/// `policy` with no OOM, by bisection (which assumes that more memory never adds an OOM), or
/// `None` when the trace allocates nothing or even [`MAX_CAPACITY`] is not enough.
///
/// `peak_live` (the trace's peak live bytes) bounds the search from below: less than that always
/// fails. `known_fit`, the peak reserved bytes of a replay with no OOM, bounds it from above: a
/// replay on a device of exactly that size makes the same requests and never needs more.
pub fn min_capacity(
    trace: &Trace,
    policy: Policy,
    opts: &ReplayOptions,
    peak_live: u64,
    known_fit: Option<u64>,
) -> Result<Option<u64>, ReplayError> {
    if peak_live == 0 {
        return Ok(None);
    }
    let fits = |capacity: u64| -> Result<bool, ReplayError> {
        let opts = ReplayOptions {
            capacity,
            verify: false,
            samples: 0,
            stop_at_first_oom: true,
            record: false,
            explain_at: None,
            explain_oom: false,
            ..opts.clone()
        };
        Ok(replay(trace, policy, &opts, &mut |_| {})?.ooms == 0)
    };
    // Counted in steps: `lo` is known to fail (less than peak live), `hi` to fit once checked.
    let step = MIN_CAPACITY_STEP;
    let max = MAX_CAPACITY / step;
    let mut lo = (peak_live - 1) / step;
    let mut hi = known_fit
        .unwrap_or(opts.capacity)
        .div_ceil(step)
        .clamp(lo + 1, max);
    while !fits(hi * step)? {
        if hi >= max {
            return Ok(None);
        }
        lo = hi;
        hi = hi.saturating_mul(2).min(max);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid * step)? {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(Some(hi * step))
}

/// A coarse [`Breakdown`] from a policy's segments (PyTorch's rules): live requests, rounding (the
/// block beyond the 512 B-rounded request, PyTorch's unsplit remainders, in `class_bytes`), free
/// blocks in segments with live data (`small_free_slot_bytes` in the small pool,
/// `large_free_bytes` in the large one), and wholly free segments (`free_page_bytes`). What the
/// driver holds beyond the segments is counted as free pages too.
pub fn breakdown_of_segments(
    segments: &[crate::torch_snapshot::Segment],
    reserved: u64,
) -> Breakdown {
    use crate::torch_snapshot::BlockState as S;
    let mut b = Breakdown {
        reserved_bytes: reserved,
        ..Breakdown::default()
    };
    let mut held = 0;
    for seg in segments {
        held += seg.total_size;
        let used = seg.blocks.iter().any(|blk| blk.state != S::Inactive);
        for blk in &seg.blocks {
            match blk.state {
                S::Inactive if !used => b.free_page_bytes += blk.size,
                S::Inactive if seg.small => b.small_free_slot_bytes += blk.size,
                S::Inactive => b.large_free_bytes += blk.size,
                S::Allocated => {
                    let rounded = blk.requested_size.div_ceil(512) * 512;
                    b.requested_bytes += blk.requested_size;
                    b.rounding_bytes += rounded.min(blk.size) - blk.requested_size.min(blk.size);
                    b.class_bytes += blk.size.saturating_sub(rounded);
                }
                _ => b.parked_bytes += blk.size,
            }
        }
    }
    b.free_page_bytes += reserved.saturating_sub(held);
    b
}

/// The most bytes live at once when every allocation of `trace` succeeds, and the index of the
/// (first) event after which they are live; `(0, None)` for a trace that allocates nothing.
pub fn trace_peak(trace: &Trace) -> (u64, Option<usize>) {
    let mut sizes = vec![0u64; trace.slots as usize];
    let (mut live, mut peak, mut at) = (0u64, 0u64, None);
    for (i, ev) in trace.events.iter().enumerate() {
        match ev.op {
            Op::Alloc { slot, size, .. } => {
                sizes[slot as usize] = size;
                live = live.saturating_add(size);
                if live > peak {
                    (peak, at) = (live, Some(i));
                }
            }
            Op::Free { slot } => live -= sizes[slot as usize],
        }
    }
    (peak, at)
}

/// The largest number of bytes live at once when every allocation of `trace` succeeds.
pub fn trace_peak_live(trace: &Trace) -> u64 {
    trace_peak(trace).0
}

/// `--verify`: a pattern in the first and last bytes of every allocation (up to 4 KiB each way:
/// enough to catch a block handed out twice or a page mapped in the wrong place, without writing
/// gigabytes).
mod pattern {
    use crate::driver::sim::SimDriver;
    use crate::driver::DevicePtr;

    const SPAN: u64 = 4096;

    /// Whether the bytes [`write`] and [`check`] touch are mapped and accessible, so that an
    /// allocator bug is reported instead of faulting.
    pub(super) fn accessible(drv: &SimDriver, ptr: DevicePtr, size: u64) -> Result<(), String> {
        let head = size.min(SPAN);
        let tail = size.saturating_sub(SPAN).max(head);
        for at in [ptr, ptr + head - 1, ptr + tail, ptr + size - 1] {
            if at < ptr + size && !drv.is_accessible(0, at) {
                return Err(format!(
                    "allocation at {ptr:#x} ({size} B): byte {} is not mapped",
                    at - ptr
                ));
            }
        }
        Ok(())
    }

    fn byte(slot: u32, i: u64) -> u8 {
        (u64::from(slot)
            .wrapping_mul(0x9E37_79B9)
            .wrapping_add(i.wrapping_mul(31))
            >> 3) as u8
    }

    /// The offsets patterned in an allocation of `size` bytes.
    fn offsets(size: u64) -> impl Iterator<Item = u64> {
        let head = size.min(SPAN);
        let tail_start = size.saturating_sub(SPAN).max(head);
        (0..head).chain(tail_start..size)
    }

    /// # Safety
    /// `[ptr, ptr + size)` must be host memory that is mapped read-write and not used by anything
    /// else.
    pub(super) unsafe fn write(ptr: DevicePtr, size: u64, slot: u32) {
        for i in offsets(size) {
            // SAFETY: `i < size`, inside the region the caller vouches for.
            unsafe { *((ptr + i) as *mut u8) = byte(slot, i) };
        }
    }

    /// # Safety
    /// As [`write`].
    pub(super) unsafe fn check(ptr: DevicePtr, size: u64, slot: u32) -> Result<(), String> {
        for i in offsets(size) {
            // SAFETY: `i < size`, inside the region the caller vouches for.
            let got = unsafe { *((ptr + i) as *const u8) };
            if got != byte(slot, i) {
                return Err(format!(
                    "allocation at {ptr:#x} ({size} B): byte {i} is {got:#04x}, expected {:#04x}",
                    byte(slot, i)
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::pattern;

    #[test]
    fn the_pattern_catches_one_changed_byte_at_either_end() {
        for size in [1u64, 100, 4096, 5000, 20_000] {
            let mut buf = vec![0u8; size as usize];
            let ptr = buf.as_mut_ptr() as u64;
            // SAFETY: `buf` is `size` bytes of host memory owned here.
            unsafe { pattern::write(ptr, size, 7) };
            // SAFETY: as above.
            assert!(unsafe { pattern::check(ptr, size, 7) }.is_ok());
            // SAFETY: as above.
            assert!(
                unsafe { pattern::check(ptr, size, 8) }.is_err(),
                "another slot's pattern"
            );
            for at in [0, size - 1] {
                buf[at as usize] ^= 0xff;
                // SAFETY: as above.
                let e = unsafe { pattern::check(ptr, size, 7) }.unwrap_err();
                assert!(e.contains(&format!("byte {at} ")), "{e}");
                buf[at as usize] ^= 0xff;
            }
        }
    }
}
