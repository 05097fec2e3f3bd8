//! One device of a PyTorch snapshot as a [`Trace`]: the state before the first entry, the events,
//! the recorded reserved bytes, and the recorded OOMs.
//!
//! # The state before the first entry
//! `_record_memory_history()` is usually called after the model and the optimizer are on the GPU,
//! and a ring buffer of `max_entries` drops the oldest entries, so a trace starts mid-run. As in
//! PyTorch's memory viewer, the memory live at its start is reconstructed:
//!
//! - a block the trace frees (`free_requested` or `free_completed`) without allocating it first was
//!   live from the start, at the size and on the stream its free names;
//! - a block `segments` lists as allocated or pending free at dump time that the trace does not
//!   leave live (it never allocates it) was live from the start too, at its `requested_size`.
//!
//! These are the rules of PyTorch's memory viewer, with three differences: blocks pending free at
//! dump time count as live too (the viewer starts from the allocated ones), a lone
//! `free_requested` whose `free_completed` is not in the trace also reconstructs a block, and the
//! peak counts the state at the start (the viewer updates its peak only after an event).
//!
//! These become allocations before the first entry's event, in address order, with line 0 (see
//! [`Event::line`](super::Event::line)). Where the snapshot has `segments`, each must lie inside a
//! segment that existed when recording began: the final segments walked backwards through the
//! segment events (`segment_alloc`/`segment_map` add a range, `segment_free`/`segment_unmap` take
//! one away). The recorded reserved bytes are that same walk, by size.
//!
//! # Bad input (named, counted as [`Problem`](super::Problem)s, skipped; the replay goes on)
//! - an `alloc` of 0 bytes; an `alloc` at a live address or overlapping a live block (and the
//!   frees of an allocation so skipped);
//! - a free of a block the trace already freed and did not allocate again (a double free);
//! - a free of a block that no segment held when recording began (the segments say that memory was
//!   not even reserved), and a block live at dump time that lies outside those segments or that the
//!   trace freed and never allocated again.
//!
//! # Locking
//! None.

use std::collections::BTreeMap;

use super::snapshot::{Action, Int, RawEntry, RawSnapshot};
use super::{Builder, IdMap, Reconstructed, RecordedOom, RecordedPoint, RecordedRetry, Trace};
use crate::driver::sim::RangeSet;

/// Builds the trace of `device` from a snapshot's records; an error is a message.
pub(super) fn reconstruct(name: &str, raw: &RawSnapshot, device: usize) -> Result<Trace, String> {
    let entries = &raw.device_traces[device];
    let at = |i: usize| format!("device_traces[{device}][{i}]");
    let field = |value: Option<Int>, convert: fn(Int) -> Option<u64>, key: &str, i: usize| {
        let e: &RawEntry = &entries[i];
        match value {
            None => Err(format!("{} ({}) has no '{key}'", at(i), e.action.name())),
            Some(v) => convert(v).ok_or_else(|| {
                format!(
                    "{} ({}) has '{key}' {}, out of range",
                    at(i),
                    e.action.name(),
                    v.shown()
                )
            }),
        }
    };
    let stream_of = |i: usize| -> Result<u64, String> {
        match entries[i].stream {
            None => Ok(0),
            Some(_) => field(entries[i].stream, Int::bits, "stream", i),
        }
    };

    // Every entry's fields, checked once: (addr, size) for the actions that have them.
    let mut fields: Vec<(u64, u64)> = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        fields.push(match e.action {
            Action::Alloc | Action::FreeRequested | Action::FreeCompleted => {
                let addr = field(e.addr, Int::bits, "addr", i)?;
                let size = match (e.action, e.size) {
                    (Action::Alloc, _) | (_, Some(_)) => field(e.size, Int::size, "size", i)?,
                    // A free without a size can still free; it cannot reconstruct a block.
                    _ => 0,
                };
                (addr, size)
            }
            Action::SegmentAlloc
            | Action::SegmentFree
            | Action::SegmentMap
            | Action::SegmentUnmap => (
                e.addr.and_then(Int::bits).unwrap_or(0),
                field(e.size, Int::size, "size", i)?,
            ),
            Action::Oom => (0, e.size.and_then(Int::size).unwrap_or(0)),
            Action::Snapshot | Action::Unknown => (0, 0),
        });
    }

    // The segments on this device at dump time, and when recording began.
    let segments: Vec<_> = raw
        .segments
        .iter()
        .flatten()
        .filter(|s| s.device == device)
        .collect();
    let reserved_at_dump: i128 = segments.iter().map(|s| i128::from(s.total_size)).sum();
    let start_ranges = raw.segments.as_ref().map(|_| {
        let mut r = RangeSet::default();
        for s in segments.iter().filter(|s| s.total_size > 0) {
            r.insert(s.address, s.address.saturating_add(s.total_size));
        }
        for (e, &(addr, size)) in entries.iter().zip(&fields).rev() {
            if size == 0 {
                continue;
            }
            let end = addr.saturating_add(size);
            match e.action {
                Action::SegmentAlloc | Action::SegmentMap => r.remove(addr, end),
                Action::SegmentFree | Action::SegmentUnmap => r.insert(addr, end),
                _ => {}
            }
        }
        r
    });
    let held_at_start = |addr: u64, size: u64| {
        start_ranges
            .as_ref()
            .is_none_or(|r| r.contains_range(addr, addr.saturating_add(size.max(1))))
    };

    // Pass 1: which blocks were live before the first entry.
    #[derive(Clone, Copy)]
    enum Was {
        Live,
        /// Freed at this line and not allocated since.
        Freed(u64),
    }
    let mut state: IdMap<Was> = IdMap::default();
    let mut from_frees: Vec<Initial> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let (addr, size) = fields[i];
        let line = i as u64 + 1;
        match e.action {
            Action::Alloc if size > 0 => {
                state.insert(addr, Was::Live);
            }
            Action::FreeRequested | Action::FreeCompleted => {
                if !state.contains_key(&addr) && size > 0 && held_at_start(addr, size) {
                    from_frees.push(Initial {
                        addr,
                        size,
                        stream: stream_of(i)?,
                        // The entry's frames are the free's, not the allocation's: none known.
                        frames: None,
                    });
                    state.insert(addr, Was::Live);
                }
                if e.action == Action::FreeCompleted {
                    if let Some(w @ Was::Live) = state.get_mut(&addr) {
                        *w = Was::Freed(line);
                    }
                }
            }
            _ => {}
        }
    }
    let mut b = Builder::default();
    let mut from_segments: Vec<Initial> = Vec::new();
    for s in &segments {
        for blk in s.blocks.iter().filter(|blk| blk.live) {
            let what = format!(
                "segments[{}] says the block at {:#x} ({} B) is allocated at dump time",
                s.index, blk.address, blk.size
            );
            if blk.size == 0 {
                b.problem(0, format!("{what}: a block of 0 bytes"));
                continue;
            }
            match state.get(&blk.address) {
                Some(Was::Live) => {} // the trace leaves it live: allocated by the trace, or freed pending
                Some(Was::Freed(line)) => b.problem(
                    0,
                    format!("{what}, but the trace freed it at entry {line} and never allocated it again"),
                ),
                None if !held_at_start(blk.address, blk.size) => b.problem(
                    0,
                    format!("{what}, but no segment held it when recording began, and the trace never allocates it"),
                ),
                None => from_segments.push(Initial {
                    addr: blk.address,
                    size: blk.requested,
                    stream: s.stream,
                    frames: blk.frames,
                }),
            }
        }
    }

    // Pass 2: the events. The reconstructed blocks first, in address order.
    let mut live = LiveRanges::default();
    let mut initial: Vec<(Initial, bool)> = from_frees
        .iter()
        .map(|i| (*i, false))
        .chain(from_segments.iter().map(|i| (*i, true)))
        .collect();
    initial.sort_by_key(|(i, _)| i.addr);
    let mut reconstructed = Reconstructed::default();
    for (blk, from_segment) in initial {
        if let Some((other, _)) = live.overlap(blk.addr, blk.size) {
            b.problem(
                0,
                format!(
                    "the block live before recording at {:#x} ({} B) overlaps the one at {other:#x}",
                    blk.addr, blk.size
                ),
            );
            continue;
        }
        b.alloc(blk.addr, blk.size, blk.stream, 0)
            .expect("addresses of reconstructed blocks are distinct");
        b.frames.push(blk.frames);
        live.insert(blk.addr, blk.size, 0);
        reconstructed.blocks += 1;
        reconstructed.bytes += blk.size;
        if from_segment {
            reconstructed.from_segments += 1;
        } else {
            reconstructed.from_frees += 1;
        }
    }

    let deltas = || {
        entries
            .iter()
            .zip(&fields)
            .filter_map(|(e, &(_, size))| reserved_delta(e.action, size))
    };
    let has_segment_events = deltas().next().is_some();
    let net: i128 = deltas().sum();
    let mut reserved = (reserved_at_dump - net).max(0);
    let mut recorded = vec![point(0, reserved)];
    let mut recorded_ooms = Vec::new();
    let mut retries: Vec<RecordedRetry> = Vec::new();
    let mut release_start: Option<(u64, i128)> = None;
    // Allocations dropped as bad input, by address: their frees are dropped with them.
    let mut dropped: IdMap<u64> = IdMap::default();
    // The line of the last free of each address, for double frees.
    let mut freed_at: IdMap<u64> = IdMap::default();

    for (i, e) in entries.iter().enumerate() {
        let line = i as u64 + 1;
        let (addr, size) = fields[i];
        match e.action {
            Action::Alloc => {
                let stream = stream_of(i)?;
                if size == 0 {
                    b.problem(line, format!("alloc of 0 bytes at address {addr:#x}"));
                } else if let Some((other, since)) = live.overlap(addr, size) {
                    let since = since_text(since);
                    b.problem(
                        line,
                        if other == addr {
                            format!("alloc at address {addr:#x}, which is already live ({since})")
                        } else {
                            format!(
                                "alloc of {size} B at {addr:#x} overlaps the live block at \
                                 {other:#x} ({since})"
                            )
                        },
                    );
                    if other != addr {
                        dropped.insert(addr, line);
                    }
                } else {
                    b.alloc(addr, size, stream, line)
                        .expect("not live: checked by the overlap test");
                    b.frames.push(e.frames);
                    live.insert(addr, size, line);
                    freed_at.remove(&addr);
                    // A dropped allocation at this address has been freed or lost: this one
                    // takes the address's next free.
                    dropped.remove(&addr);
                }
            }
            Action::FreeCompleted => {
                if b.free(addr, line) {
                    b.frames.push(e.frames);
                    live.remove(addr);
                    freed_at.insert(addr, line);
                } else if let Some(alloc_line) = dropped.remove(&addr) {
                    b.problem(
                        line,
                        format!(
                            "free_completed of address {addr:#x}, whose alloc (entry \
                             {alloc_line}) was dropped"
                        ),
                    );
                } else if let Some(&was) = freed_at.get(&addr) {
                    b.problem(
                        line,
                        format!(
                            "free_completed of address {addr:#x}, which was already freed at \
                             entry {was} (a double free)"
                        ),
                    );
                } else {
                    let why = if size == 0 {
                        "and the entry has no size to reconstruct the block from"
                    } else {
                        "and no segment held it when recording began"
                    };
                    b.problem(
                        line,
                        format!("free_completed of address {addr:#x}, which is not live, {why}"),
                    );
                }
            }
            Action::SegmentAlloc
            | Action::SegmentMap
            | Action::SegmentFree
            | Action::SegmentUnmap => {
                // A run of releases right before a new segment: PyTorch's answer to a failed
                // cudaMalloc (release the cache, retry), unless the run was an empty_cache call.
                let releasing = matches!(e.action, Action::SegmentFree | Action::SegmentUnmap);
                let after_release = i > 0
                    && matches!(
                        entries[i - 1].action,
                        Action::SegmentFree | Action::SegmentUnmap
                    );
                match (releasing, after_release) {
                    (true, false) => release_start = Some((line, reserved)),
                    (false, true) => {
                        if let Some((first, before)) = release_start.take() {
                            retries.push(RecordedRetry {
                                line: first,
                                reserved_before: u64::try_from(before.max(0)).unwrap_or(0),
                                size,
                            });
                        }
                    }
                    _ => {}
                }
                reserved += reserved_delta(e.action, size).expect("a segment event");
                let p = point(b.events.len(), reserved);
                match recorded.last_mut() {
                    Some(last) if last.event == p.event => *last = p,
                    _ => recorded.push(p),
                }
            }
            Action::Oom => recorded_ooms.push(RecordedOom {
                line,
                event: b.events.len(),
                size,
                device_free: e.device_free.and_then(Int::size),
                stream: e.stream.and_then(Int::bits).unwrap_or(0),
                frames: e.frames,
            }),
            Action::FreeRequested | Action::Snapshot | Action::Unknown => {}
        }
    }
    let mut trace = b.finish(name);
    if has_segment_events || raw.segments.is_some() && !segments.is_empty() {
        trace.recorded = recorded;
    }
    trace.reconstructed = reconstructed;
    trace.recorded_ooms = recorded_ooms;
    trace.recorded_retries = retries;
    Ok(trace)
}

/// What a segment event changes the recorded reserved bytes by; `None` for other actions.
fn reserved_delta(action: Action, size: u64) -> Option<i128> {
    match action {
        Action::SegmentAlloc | Action::SegmentMap => Some(i128::from(size)),
        Action::SegmentFree | Action::SegmentUnmap => Some(-i128::from(size)),
        _ => None,
    }
}

fn since_text(line: u64) -> String {
    if line == 0 {
        "live since before recording".to_owned()
    } else {
        format!("since entry {line}")
    }
}

/// A block live before the first entry.
#[derive(Clone, Copy)]
struct Initial {
    addr: u64,
    size: u64,
    stream: u64,
    frames: Option<u32>,
}

fn point(event: usize, reserved: i128) -> RecordedPoint {
    RecordedPoint {
        event,
        reserved: u64::try_from(reserved.max(0)).unwrap_or(u64::MAX),
    }
}

/// The live blocks by address, `addr -> (end, line of the allocation)`, for overlap checks.
#[derive(Default)]
struct LiveRanges(BTreeMap<u64, (u64, u64)>);

impl LiveRanges {
    /// A live block overlapping `[addr, addr + size)`: its address and allocation line.
    fn overlap(&self, addr: u64, size: u64) -> Option<(u64, u64)> {
        let end = addr.saturating_add(size);
        if let Some((&a, &(e, line))) = self.0.range(..=addr).next_back() {
            if e > addr || a == addr {
                return Some((a, line));
            }
        }
        self.0
            .range(addr..end)
            .next()
            .map(|(&a, &(_, line))| (a, line))
    }

    fn insert(&mut self, addr: u64, size: u64, line: u64) {
        self.0.insert(addr, (addr.saturating_add(size), line));
    }

    fn remove(&mut self, addr: u64) {
        self.0.remove(&addr);
    }
}
