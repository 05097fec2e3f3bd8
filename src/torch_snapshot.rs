//! PyTorch's memory snapshot format, written: the one writer of the pickle that
//! `torch.cuda.memory._dump_snapshot()` writes and that PyTorch's memory viewer
//! (`torch.cuda._memory_viz`, the memory_viz page) reads.
//!
//! Two callers use it: the replay's `--export` (each policy's segments at the end and its
//! allocation history, carrying the input's frames) and the live allocator
//! ([`snapshot_pickle`]: tessera's segments and blocks, which `tessera.torch` hands to
//! `torch.cuda.memory._snapshot()`).
//!
//! # Data structure
//! A [`TorchSnapshot`] holds segments (each with its blocks), one trace per device, the
//! distinct tracebacks that blocks and entries refer to by index, and optional allocator settings.
//! [`TorchSnapshot::to_pickle`] writes it as PyTorch does (protocol 4, one shared list per
//! traceback, so that a long trace with few distinct tracebacks stays small).
//!
//! # Invariants of what is written
//! - The blocks of a segment tile it from its address to its end, in address order: gaps are
//!   written as `inactive` blocks, as PyTorch's own segments always tile (`_memory_viz stats`
//!   checks that allocated, internal and external free bytes add up to each segment's size).
//! - A segment's `allocated_size`, `active_size` and `requested_size` are the sums over its
//!   blocks, as PyTorch computes them.
//! - Every free is written as `free_requested` then `free_completed`, as PyTorch writes a free
//!   with no pending stream use.
//!
//! # Locking
//! None: plain data, written on one thread.

use crate::pickle::Value;
use crate::stats::{BlockStateInfo, Snapshot};
use std::collections::HashMap;

/// One frame of a traceback, as PyTorch records it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Frame {
    /// The source file (a Python file, or a C++ file or `??` for native frames).
    pub filename: String,
    /// The 1-based line, 0 when unknown.
    pub line: u64,
    /// The function.
    pub name: String,
}

impl Frame {
    /// Whether the frame is the user's code: a Python file outside PyTorch and the standard
    /// library.
    pub fn is_user(&self) -> bool {
        let f = self.filename.replace('\\', "/");
        f.ends_with(".py")
            && !f.contains("/torch/")
            && !f.contains("/lib/python")
            && !f.contains("/site-packages/")
            && !f.contains("/dist-packages/")
    }
}

impl std::fmt::Display for Frame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{} in {}", self.filename, self.line, self.name)
    }
}

/// A block's `state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockState {
    /// `active_allocated`: handed out.
    Allocated,
    /// `active_pending_free`: freed, waiting for a stream's work.
    PendingFree,
    /// `inactive`: free (cached).
    Inactive,
}

impl BlockState {
    fn name(self) -> &'static str {
        match self {
            BlockState::Allocated => "active_allocated",
            BlockState::PendingFree => "active_pending_free",
            BlockState::Inactive => "inactive",
        }
    }
}

/// One block of a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    /// Its address.
    pub address: u64,
    /// Its size.
    pub size: u64,
    /// The size asked for (0 for a free block).
    pub requested_size: u64,
    /// Its state.
    pub state: BlockState,
    /// Its traceback, an index into [`TorchSnapshot::tracebacks`].
    pub frames: Option<u32>,
}

/// One segment: a `cudaMalloc`, or a mapped run of an expandable segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Segment {
    /// The device.
    pub device: usize,
    /// Its address.
    pub address: u64,
    /// Its size.
    pub total_size: u64,
    /// Its stream handle.
    pub stream: u64,
    /// `small` or `large` pool.
    pub small: bool,
    /// Part of an expandable segment.
    pub expandable: bool,
    /// The private pool (CUDA graphs) it belongs to, PyTorch's `segment_pool_id`; `(0, 0)`: the
    /// ordinary cache.
    pub pool: (u64, u64),
    /// Its blocks, in address order (gaps are written as inactive blocks).
    pub blocks: Vec<Block>,
}

/// A trace entry's `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// `alloc`.
    Alloc,
    /// `free_requested`.
    FreeRequested,
    /// `free_completed`.
    FreeCompleted,
    /// `segment_alloc` (`cudaMalloc`).
    SegmentAlloc,
    /// `segment_free` (`cudaFree`).
    SegmentFree,
    /// `segment_map` (expandable segments).
    SegmentMap,
    /// `segment_unmap` (expandable segments).
    SegmentUnmap,
    /// `oom`: `size` asked for, `addr` is the device's free bytes (written as `device_free`).
    Oom,
    /// `snapshot`: a snapshot was taken.
    Snapshot,
    /// An action newer than this code (`annotate`, ...): read and ignored, never written.
    Unknown,
}

impl Action {
    /// The name PyTorch writes.
    pub fn name(self) -> &'static str {
        match self {
            Action::Alloc => "alloc",
            Action::FreeRequested => "free_requested",
            Action::FreeCompleted => "free_completed",
            Action::SegmentAlloc => "segment_alloc",
            Action::SegmentFree => "segment_free",
            Action::SegmentMap => "segment_map",
            Action::SegmentUnmap => "segment_unmap",
            Action::Oom => "oom",
            Action::Snapshot => "snapshot",
            Action::Unknown => "unknown",
        }
    }

    /// The action PyTorch names `name`; [`Action::Unknown`] for any other.
    pub fn from_name(name: &str) -> Action {
        const KNOWN: [Action; 9] = [
            Action::Alloc,
            Action::FreeRequested,
            Action::FreeCompleted,
            Action::SegmentAlloc,
            Action::SegmentFree,
            Action::SegmentMap,
            Action::SegmentUnmap,
            Action::Oom,
            Action::Snapshot,
        ];
        KNOWN
            .into_iter()
            .find(|a| a.name() == name)
            .unwrap_or(Action::Unknown)
    }
}

/// One trace entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// What happened.
    pub action: Action,
    /// Where (for [`Action::Oom`], the device's free bytes).
    pub addr: u64,
    /// How many bytes.
    pub size: u64,
    /// The stream handle.
    pub stream: u64,
    /// When, in microseconds (the replay writes the event index: it has no clock).
    pub time_us: u64,
    /// Its traceback, an index into [`TorchSnapshot::tracebacks`].
    pub frames: Option<u32>,
}

/// A whole snapshot. See the module documentation.
#[derive(Clone, Debug, Default)]
pub struct TorchSnapshot {
    /// Every segment, on every device.
    pub segments: Vec<Segment>,
    /// One trace per device.
    pub device_traces: Vec<Vec<Entry>>,
    /// Tracebacks, innermost frame first.
    pub tracebacks: Vec<Vec<Frame>>,
    /// `allocator_settings`: `(key, value)`; not written when empty.
    pub allocator_settings: Vec<(String, Value)>,
}

impl TorchSnapshot {
    /// The pickle, as `_dump_snapshot` writes it.
    pub fn to_pickle(&self) -> Vec<u8> {
        crate::pickle::to_vec(&self.to_value())
    }

    /// The snapshot as a pickled value.
    pub fn to_value(&self) -> Value {
        let mut frame_dicts: HashMap<&Frame, Value> = HashMap::new();
        let tracebacks: Vec<Value> = self
            .tracebacks
            .iter()
            .map(|tb| {
                Value::list(
                    tb.iter()
                        .map(|f| {
                            frame_dicts
                                .entry(f)
                                .or_insert_with(|| {
                                    Value::dict(vec![
                                        ("filename", Value::str(&f.filename)),
                                        ("line", Value::int(f.line)),
                                        ("name", Value::str(&f.name)),
                                    ])
                                })
                                .clone()
                        })
                        .collect(),
                )
            })
            .collect();
        // One empty list shared by everything without a traceback, as PyTorch does.
        let no_frames = Value::list(Vec::new());
        let frames = |i: Option<u32>| {
            i.and_then(|i| tracebacks.get(i as usize))
                .unwrap_or(&no_frames)
                .clone()
        };
        let names: HashMap<&'static str, Value> = [
            "active_allocated",
            "active_pending_free",
            "inactive",
            "alloc",
            "free_requested",
            "free_completed",
            "segment_alloc",
            "segment_free",
            "segment_map",
            "segment_unmap",
            "oom",
            "snapshot",
            "unknown",
            "small",
            "large",
            "N/A",
            "",
        ]
        .into_iter()
        .map(|n| (n, Value::str(n)))
        .collect();
        let name = |n: &'static str| names[n].clone();

        let segments = self
            .segments
            .iter()
            .map(|s| {
                let blocks = tile(s);
                let sum = |f: fn(&Block) -> u64| -> u64 { blocks.iter().map(f).sum() };
                let allocated = sum(|b| match b.state {
                    BlockState::Allocated => b.size,
                    _ => 0,
                });
                let active = sum(|b| match b.state {
                    BlockState::Inactive => 0,
                    _ => b.size,
                });
                let requested = sum(|b| match b.state {
                    BlockState::Inactive => 0,
                    _ => b.requested_size,
                });
                let blocks = blocks
                    .iter()
                    .map(|b| {
                        Value::dict(vec![
                            ("address", Value::int(b.address)),
                            ("size", Value::int(b.size)),
                            ("requested_size", Value::int(b.requested_size)),
                            ("state", name(b.state.name())),
                            ("frames", frames(b.frames)),
                        ])
                    })
                    .collect();
                Value::dict(vec![
                    ("device", Value::int(s.device as u64)),
                    ("address", Value::int(s.address)),
                    ("total_size", Value::int(s.total_size)),
                    ("allocated_size", Value::int(allocated)),
                    ("active_size", Value::int(active)),
                    ("requested_size", Value::int(requested)),
                    ("stream", Value::int(s.stream as i64)),
                    (
                        "segment_type",
                        name(if s.small { "small" } else { "large" }),
                    ),
                    (
                        "segment_pool_id",
                        Value::tuple(vec![Value::int(s.pool.0), Value::int(s.pool.1)]),
                    ),
                    ("is_expandable", Value::Bool(s.expandable)),
                    ("frames", no_frames.clone()),
                    ("blocks", Value::list(blocks)),
                ])
            })
            .collect();
        let device_traces = self
            .device_traces
            .iter()
            .map(|trace| {
                Value::list(
                    trace
                        .iter()
                        .filter(|e| e.action != Action::Unknown)
                        .map(|e| {
                            let addr_key = if e.action == Action::Oom {
                                "device_free"
                            } else {
                                "addr"
                            };
                            Value::dict(vec![
                                ("action", name(e.action.name())),
                                (addr_key, Value::int(e.addr)),
                                ("size", Value::int(e.size)),
                                ("stream", Value::int(e.stream as i64)),
                                ("time_us", Value::int(e.time_us)),
                                ("frames", frames(e.frames)),
                                ("compile_context", name("N/A")),
                                ("user_metadata", name("")),
                            ])
                        })
                        .collect(),
                )
            })
            .collect();
        let mut top = vec![
            ("segments", Value::list(segments)),
            ("device_traces", Value::list(device_traces)),
        ];
        let settings;
        if !self.allocator_settings.is_empty() {
            settings = Value::dict(
                self.allocator_settings
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.clone()))
                    .collect(),
            );
            top.push(("allocator_settings", settings));
        }
        top.push(("external_annotations", Value::list(Vec::new())));
        Value::dict(top)
    }
}

/// A segment's blocks, sorted, clipped to the segment, with every gap an inactive block.
fn tile(s: &Segment) -> Vec<Block> {
    let end = s.address.saturating_add(s.total_size);
    let mut blocks: Vec<&Block> = s
        .blocks
        .iter()
        .filter(|b| b.address >= s.address && b.address < end && b.size > 0)
        .collect();
    blocks.sort_by_key(|b| b.address);
    let mut out = Vec::with_capacity(blocks.len() + 1);
    let mut at = s.address;
    let gap = |from: u64, to: u64| Block {
        address: from,
        size: to - from,
        requested_size: 0,
        state: BlockState::Inactive,
        frames: None,
    };
    for b in blocks {
        if b.address < at {
            continue; // overlaps the previous block: never written by a sound allocator
        }
        if b.address > at {
            out.push(gap(at, b.address));
        }
        let size = b.size.min(end - b.address);
        out.push(Block { size, ..b.clone() });
        at = b.address + size;
    }
    if at < end {
        out.push(gap(at, end));
    }
    out
}

/// The segments of a live allocator's [`Snapshot`], in PyTorch's format (no history). A run of
/// mapped pages whose blocks belong to several pools (the ordinary cache and CUDA graphs'
/// private pools) becomes one segment per pool-consecutive stretch of blocks, since a PyTorch
/// segment belongs to one pool (`segment_pool_id`).
pub fn segments_of(snapshot: &Snapshot) -> Vec<Segment> {
    let mut out = Vec::new();
    for s in &snapshot.segments {
        let pool_of = |b: &crate::stats::BlockInfo| {
            let p = b.pool.or(s.pool).unwrap_or_default();
            (p.0, p.1)
        };
        if s.blocks.is_empty() {
            let pool = s.pool.map_or((0, 0), |p| (p.0, p.1));
            out.push(segment_of(snapshot, s, s.address, s.size, pool, &[]));
            continue;
        }
        let mut start = 0;
        while start < s.blocks.len() {
            let pool = pool_of(&s.blocks[start]);
            let mut end = start + 1;
            while end < s.blocks.len() && pool_of(&s.blocks[end]) == pool {
                end += 1;
            }
            // A stretch spans from its first block (the segment's start for the first) to the
            // next stretch (or the segment's end): large blocks tile their segment.
            let address = if start == 0 {
                s.address
            } else {
                s.blocks[start].address
            };
            let stop = s.blocks.get(end).map_or(s.address + s.size, |b| b.address);
            let blocks = &s.blocks[start..end];
            out.push(segment_of(
                snapshot,
                s,
                address,
                stop - address,
                pool,
                blocks,
            ));
            start = end;
        }
    }
    out
}

fn segment_of(
    snapshot: &Snapshot,
    s: &crate::stats::SegmentInfo,
    address: u64,
    total_size: u64,
    pool: (u64, u64),
    blocks: &[crate::stats::BlockInfo],
) -> Segment {
    Segment {
        device: snapshot.device,
        address,
        total_size,
        stream: blocks.first().map_or(s.stream.0, |b| b.stream.0),
        small: s.kind == crate::stats::SegmentKind::Small,
        expandable: false,
        pool,
        blocks: blocks
            .iter()
            .map(|b| Block {
                address: b.address,
                size: b.size,
                requested_size: match b.state {
                    BlockStateInfo::Free => 0,
                    _ => b.requested_size,
                },
                state: match b.state {
                    BlockStateInfo::Allocated => BlockState::Allocated,
                    BlockStateInfo::PendingFree => BlockState::PendingFree,
                    BlockStateInfo::Free => BlockState::Inactive,
                },
                frames: None,
            })
            .collect(),
    }
}

/// A live allocator's snapshot of every device in `snapshots`, as `_dump_snapshot` writes it:
/// segments and blocks, and an empty trace for each of the `device_count` devices (tessera
/// records no history; the viewer indexes `device_traces` by device).
pub fn snapshot_pickle(snapshots: &[Snapshot], device_count: usize) -> Vec<u8> {
    let devices = snapshots
        .iter()
        .map(|s| s.device + 1)
        .max()
        .unwrap_or(0)
        .max(device_count);
    TorchSnapshot {
        segments: snapshots.iter().flat_map(segments_of).collect(),
        device_traces: vec![Vec::new(); devices],
        tracebacks: Vec::new(),
        allocator_settings: vec![(
            "allocator".to_owned(),
            Value::str(concat!("tessera ", env!("CARGO_PKG_VERSION"))),
        )],
    }
    .to_pickle()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_tile_their_segment() {
        let s = Segment {
            device: 0,
            address: 1000,
            total_size: 1000,
            stream: 0,
            small: false,
            expandable: false,
            pool: (0, 0),
            blocks: vec![
                Block {
                    address: 1500,
                    size: 100,
                    requested_size: 90,
                    state: BlockState::Allocated,
                    frames: None,
                },
                Block {
                    address: 1000,
                    size: 200,
                    requested_size: 200,
                    state: BlockState::PendingFree,
                    frames: None,
                },
            ],
        };
        let t = tile(&s);
        let spans: Vec<(u64, u64, BlockState)> =
            t.iter().map(|b| (b.address, b.size, b.state)).collect();
        assert_eq!(
            spans,
            vec![
                (1000, 200, BlockState::PendingFree),
                (1200, 300, BlockState::Inactive),
                (1500, 100, BlockState::Allocated),
                (1600, 400, BlockState::Inactive),
            ]
        );
        assert_eq!(t.iter().map(|b| b.size).sum::<u64>(), 1000);
    }
}
