//! `tessera replay --export DIR`: each policy's replay as a PyTorch memory snapshot, so that
//! PyTorch's own viewer (the memory_viz page, `python -m torch.cuda._memory_viz`) shows the
//! layout any policy produced, in the tool PyTorch users know.
//!
//! # What is written
//! One pickle per (trace, policy), by [`crate::torch_snapshot`] (the one writer of the format):
//! - `segments`: the policy's segments and blocks at the end of the replay, allocated blocks
//!   carrying the frames of the event that allocated them;
//! - `device_traces`, on the trace's device: every event at the address that policy gave it
//!   (`alloc`; a free as `free_requested` then `free_completed`; a failed allocation as `oom`
//!   with the device's free bytes then), carrying the input's frames, and the policy's driver
//!   calls as `segment_alloc`/`segment_free` (`cuMemAlloc`/`cuMemFree`) and
//!   `segment_map`/`segment_unmap` (`cuMemMap`/`cuMemUnmap`); `time_us` is the event index;
//! - `allocator_settings`: which policy, and `expandable_segments` for the policy that models it.
//!
//! The memory live before the first entry is written as allocations at the start, so the trace
//! alone replays to the same live bytes. Reserved bytes in the export are mapped bytes; tessera
//! alone may also hold created pages that are mapped nowhere (its page pool), which the format
//! cannot express.
//!
//! # Locking
//! None.

use crate::driver::sim::MemoryOp;
use crate::pickle::Value;
use crate::replay::engine::Outcome;
use crate::replay::trace::{Op, Trace};
use crate::replay::Policy;
use crate::torch_snapshot::{Action, BlockState, Entry, TorchSnapshot};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The snapshot of one replay (which must have been made with
/// [`ReplayOptions::record`](crate::replay::ReplayOptions::record)); `None` without a recording.
pub fn snapshot_of(trace: &Trace, outcome: &Outcome, capacity: u64) -> Option<TorchSnapshot> {
    let rec = outcome.recording.as_ref()?;
    let device = trace.device.unwrap_or(0);
    let frames_of = |i: usize| trace.event_frames.get(i).copied().flatten();
    let mut entries = Vec::with_capacity(trace.events.len() * 2 + rec.memory.len());
    let mut memory = rec.memory.iter().peekable();
    // Per live address, the event that allocated it (for the blocks' frames).
    let mut allocated_by: HashMap<u64, usize> = HashMap::new();
    let mut reserved: u64 = 0;
    let segment_entry = |m: &crate::driver::sim::MemoryEvent, i: usize| Entry {
        action: match m.op {
            MemoryOp::Alloc => Action::SegmentAlloc,
            MemoryOp::Free => Action::SegmentFree,
            MemoryOp::Map => Action::SegmentMap,
            MemoryOp::Unmap => Action::SegmentUnmap,
        },
        addr: m.va,
        size: m.size,
        stream: 0,
        time_us: i as u64,
        frames: None,
    };
    for (i, ev) in trace.events.iter().enumerate().take(rec.addrs.len()) {
        let addr = rec.addrs[i];
        // The driver calls an allocation made come before it; those of a free, after it.
        let mut calls = Vec::new();
        while let Some((_, m)) = memory.next_if(|(at, _)| *at == i) {
            match m.op {
                MemoryOp::Alloc | MemoryOp::Map => reserved += m.size,
                MemoryOp::Free | MemoryOp::Unmap => reserved = reserved.saturating_sub(m.size),
            }
            calls.push(segment_entry(m, i));
        }
        match ev.op {
            Op::Alloc { size, stream, .. } => {
                entries.append(&mut calls);
                let stream = trace.streams.get(stream as usize).copied().unwrap_or(0);
                if addr == 0 {
                    entries.push(Entry {
                        action: Action::Oom,
                        addr: capacity.saturating_sub(reserved),
                        size,
                        stream,
                        time_us: i as u64,
                        frames: frames_of(i),
                    });
                } else {
                    allocated_by.insert(addr, i);
                    entries.push(Entry {
                        action: Action::Alloc,
                        addr,
                        size,
                        stream,
                        time_us: i as u64,
                        frames: frames_of(i),
                    });
                }
            }
            Op::Free { .. } => {
                if addr != 0 {
                    let by = allocated_by.remove(&addr);
                    let (size, stream) = by
                        .and_then(|a| match trace.events[a].op {
                            Op::Alloc { size, stream, .. } => Some((size, stream)),
                            Op::Free { .. } => None,
                        })
                        .unwrap_or((0, 0));
                    let stream = trace.streams.get(stream as usize).copied().unwrap_or(0);
                    for action in [Action::FreeRequested, Action::FreeCompleted] {
                        entries.push(Entry {
                            action,
                            addr,
                            size,
                            stream,
                            time_us: i as u64,
                            frames: frames_of(i),
                        });
                    }
                }
                entries.append(&mut calls);
            }
        }
    }
    // Driver calls after the last event (none today, but keep them should there be).
    for (i, m) in memory {
        entries.push(segment_entry(m, *i));
    }
    let mut segments = rec.segments.clone();
    for s in &mut segments {
        s.device = device;
        for b in &mut s.blocks {
            if b.state != BlockState::Inactive {
                b.frames = allocated_by.get(&b.address).and_then(|&i| frames_of(i));
            }
        }
    }
    let mut device_traces = vec![Vec::new(); device + 1];
    device_traces[device] = entries;
    let mut settings = vec![(
        "allocator".to_owned(),
        Value::str(&format!("tessera replay, policy {}", outcome.policy)),
    )];
    settings.push((
        "expandable_segments".to_owned(),
        Value::Bool(outcome.policy == Policy::Expandable),
    ));
    Some(TorchSnapshot {
        segments,
        device_traces,
        tracebacks: trace.tracebacks.as_ref().clone(),
        allocator_settings: settings,
    })
}

/// As [`export_path`], but never a path in `taken` (which it joins): two traces with the same
/// file name in different directories (one snapshot per rank, each named alike) get
/// `run.pickle.native.pickle` and `run.pickle-2.native.pickle`.
pub fn unique_export_path(
    dir: &Path,
    trace: &Trace,
    policy: Policy,
    taken: &mut HashSet<PathBuf>,
) -> PathBuf {
    let first = export_path(dir, trace, policy);
    let mut path = first.clone();
    let mut n = 1;
    while taken.contains(&path) {
        n += 1;
        let name = first
            .file_name()
            .and_then(|f| f.to_str())
            .unwrap_or("trace.pickle")
            .to_owned();
        let suffix = format!(".{policy}.pickle");
        let stem = name.strip_suffix(&suffix).unwrap_or(&name);
        path = dir.join(format!("{stem}-{n}{suffix}"));
    }
    taken.insert(path.clone());
    path
}

/// The file an export of `trace` under `policy` goes to in `dir`: the trace's file name, its
/// device for a multi-device replay, the policy: `run.pickle.native.pickle`.
pub fn export_path(dir: &Path, trace: &Trace, policy: Policy) -> PathBuf {
    let base = trace
        .name
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or("trace")
        .replace(" [device ", ".device")
        .replace(']', "");
    let base: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    dir.join(format!("{base}.{policy}.pickle"))
}
