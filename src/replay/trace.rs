//! Allocation traces: the data a replay runs, and the readers of every format.
//!
//! A [`Trace`] is a sequence of [`Op::Alloc`] and [`Op::Free`] on numbered *slots*, read from one
//! of two formats. [`load`] tells them apart by content, never by file name:
//!
//! - gzip data (first bytes `1f 8b`) is decompressed (every member of a multi-member file) and
//!   read as tessera CSV (or as a snapshot, if what it holds is a pickle);
//! - a pickle (first byte `0x80`, the `PROTO` opcode) is a PyTorch memory snapshot;
//! - anything else is tessera CSV.
//!
//! # Format 1: tessera CSV ([`parse_csv`])
//!
//! One operation per line:
//!
//! ```text
//! # {"model": "llama-7b", "batch": 8}
//! # lines starting with '#' are comments; the first line may hold metadata (JSON)
//! a,1,4194304,0
//! a,2,512,94251237138432
//! f,1
//! ```
//!
//! - `a,<id>,<size>,<stream>` allocates `size` bytes (an integer of at least 1) on CUDA stream
//!   `stream` (the stream handle as an integer, 0 for the default stream) and names the
//!   allocation `id`;
//! - `f,<id>` frees the live allocation named `id`.
//!
//! `id`, `size` and `stream` are unsigned 64-bit decimal integers (digits only). An id names one
//! live allocation at a time and may be used again once it is freed. Spaces and tabs around a
//! field, blank lines, and `\r\n` line ends are accepted. A line whose first non-blank character
//! is `#` is a comment; if it is the first line of the file and its text after the `#` starts with
//! `{`, it must be a JSON object, which becomes [`Trace::meta`].
//!
//! Validation has two levels:
//!
//! - A malformed line (an unknown operation, a missing or extra field, a field that is not an
//!   unsigned integer, a size of 0, metadata that is not a JSON object) fails the whole trace with
//!   [`TraceError::Malformed`], displayed as `FILE:LINE: expected ...`.
//! - A well-formed line that cannot be replayed (an `a` of an id that is already live, an `f` of
//!   an id that is not live) is dropped and recorded as a [`Problem`] with its line; reading goes
//!   on, and the remaining events still replay.
//!
//! Stream handles become dense indices in order of first use ([`Trace::streams`] maps them back).
//!
//! # Format 2: PyTorch memory snapshot ([`parse_snapshot`], [`parse_snapshot_devices`])
//!
//! The pickle `torch.cuda.memory._dump_snapshot()` writes after
//! `torch.cuda.memory._record_memory_history()`: a dict with
//!
//! - `segments`: a list of dicts, one per segment the allocator holds at dump time, each with
//!   `device`, `address`, `total_size`, `stream`, `segment_type`, `is_expandable`, `blocks`
//!   (`address`, `size`, `requested_size`, `state`, `frames`), ...;
//! - `device_traces`: one list per device of trace entries, dicts with `action`, `addr` (or
//!   `device_free` for an `oom`), `size`, `stream`, `time_us`, `frames`, ...;
//! - `allocator_settings` (PyTorch 2.1 on): the recording allocator's configuration, read into
//!   [`Trace::settings`] (else what the segments show: expandable or not);
//! - other keys, which are ignored, as are unknown keys of segments and entries.
//!
//! Every action PyTorch writes is read:
//!
//! - `alloc` allocates `size` bytes on `stream`, with the entry's address as its id;
//! - `free_completed` frees the allocation at its address (the memory is reusable only once the
//!   free completes; `free_requested` only marks the start of a free, and serves to reconstruct a
//!   block the trace never allocated);
//! - `segment_alloc`, `segment_map` add `size` to the recorded reserved bytes, `segment_free` and
//!   `segment_unmap` take it away ([`Trace::recorded`]);
//! - `oom` (with `device_free`) is a [`RecordedOom`]: where the recorded run failed;
//! - a run of `segment_free` (or `segment_unmap`) entries followed by a `segment_alloc` (or
//!   `segment_map`) is a [`RecordedRetry`]: the recorded run was at its device's limit there;
//! - `snapshot`, and actions newer than this reader, are ignored.
//!
//! The memory live before the first entry is reconstructed with the rules of PyTorch's memory
//! viewer (`reconstruct.rs` says where they differ): blocks the trace frees without allocating, and blocks `segments` lists as
//! allocated that the trace never allocates, are allocated before the first entry, with line 0.
//! [`Trace::reconstructed`] counts them. An event's line is otherwise the 1-based index of its
//! entry in the device's trace. Double frees, overlapping allocations and frees of memory no
//! segment held are [`Problem`]s.
//!
//! The recorded reserved bytes start at the total size of the device's `segments` at dump time
//! minus the net sum of the segment events (the recorded history may start mid-run), clamped at
//! 0. A point is recorded at the start and after every segment event; of several points at the
//! same event index, the last is kept. A snapshot with neither segments nor segment events on the
//! device records nothing.
//!
//! A file that is not such a pickle, or a device the snapshot has no trace for, is a
//! [`TraceError::Snapshot`] naming the key or the device.
//!
//! # The invariants of a [`Trace`]
//!
//! - Replaying [`Trace::events`] in order is always valid: every [`Op::Free`] names a slot that is
//!   live at that point, every [`Op::Alloc`] a slot that is not, and every allocation has a size of
//!   at least 1 byte and a stream index below `streams.len()`.
//! - Slots are dense, `0..slots`: a new slot is opened only when every open slot is live, so
//!   [`Trace::slots`] is the most allocations live at once. A freed slot goes on a free list and
//!   the next allocation takes the most recently freed one.
//! - [`Event::line`] is 0 for the first [`Reconstructed::blocks`] events (the memory live before
//!   the first entry) and increases strictly along the others; [`Trace::problems`] are in line
//!   order, line 0 first.
//! - [`Trace::event_frames`] is empty or has one entry per event, each `None` or an index into
//!   [`Trace::tracebacks`]; so do the `frames` of [`Trace::recorded_ooms`].
//! - [`Trace::recorded`] is sorted by strictly increasing `event`, each at most `events.len()`.
//!
//! The readers keep no shared state and take no locks: a [`Trace`] is plain owned data, and
//! several traces may be read at once on different threads.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::sync::Arc;
pub use crate::torch_snapshot::Frame;

mod csv;
mod reconstruct;
mod snapshot;

pub use csv::parse_csv;
pub use snapshot::{parse_snapshot, parse_snapshot_devices, Devices};

/// One step of a trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Allocate `size` bytes on stream index `stream` (an index into [`Trace::streams`]) and keep
    /// the pointer in `slot`.
    Alloc {
        /// The slot that keeps the pointer.
        slot: u32,
        /// Bytes to allocate, at least 1.
        size: u64,
        /// The stream's index in [`Trace::streams`].
        stream: u32,
    },
    /// Free the allocation kept in `slot`.
    Free {
        /// The slot that keeps the pointer.
        slot: u32,
    },
}

/// One event and where it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// What the event does.
    pub op: Op,
    /// 1-based line of the CSV file, or 1-based index of the entry in the snapshot's trace.
    pub line: u64,
}

/// A trace event that was well formed but could not be replayed (a free of an unknown id, a
/// second allocation of a live id): reported with its line, counted, and dropped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where it is: as [`Event::line`].
    pub line: u64,
    /// What is wrong with it.
    pub message: String,
}

/// The reserved bytes the recording allocator itself reported (a PyTorch snapshot's segment
/// events), as a step function over the trace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedPoint {
    /// Reserved bytes after `events[..event]` were replayed.
    pub event: usize,
    /// The recording allocator's reserved bytes at that point.
    pub reserved: u64,
}

/// The memory live before the first entry of a snapshot, reconstructed: allocated by the first
/// `blocks` events, with line 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reconstructed {
    /// Blocks allocated before the first entry.
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Of the blocks, those `segments` lists as allocated at dump time.
    pub from_segments: u64,
    /// Of the blocks, those the trace frees without allocating them.
    pub from_frees: u64,
}

/// Where [`RecordedSettings`] came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum SettingsSource {
    /// The snapshot's `allocator_settings`.
    AllocatorSettings,
    /// What the segments and entries show (snapshots before PyTorch 2.1).
    #[default]
    Inferred,
}

/// The configuration of the allocator that recorded a snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RecordedSettings {
    /// Where these came from.
    pub source: SettingsSource,
    /// `expandable_segments`.
    pub expandable_segments: bool,
    /// `max_split_size_mb`, in bytes, when set.
    pub max_split_size: Option<u64>,
    /// `garbage_collection_threshold`, when set.
    pub garbage_collection_threshold: Option<f64>,
    /// Whether `roundup_power2_divisions` is set.
    pub roundup_power2_divisions: bool,
    /// `release_lock_on_cudamalloc`.
    pub release_lock_on_cudamalloc: bool,
    /// `PYTORCH_CUDA_ALLOC_CONF` as the run had it, when not empty.
    pub conf: Option<String>,
}

impl RecordedSettings {
    /// The replay policy that models this configuration.
    pub fn policy(&self) -> crate::replay::Policy {
        if self.expandable_segments {
            crate::replay::Policy::Expandable
        } else {
            crate::replay::Policy::Native
        }
    }

    /// The settings that change placement and that the policy does not model.
    pub fn unmodelled(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(m) = self.max_split_size {
            out.push(format!("max_split_size_mb:{}", m >> 20));
        }
        if let Some(t) = self.garbage_collection_threshold {
            out.push(format!("garbage_collection_threshold:{t}"));
        }
        if self.roundup_power2_divisions {
            out.push("roundup_power2_divisions".to_owned());
        }
        out
    }

    /// One line: `expandable_segments:False (allocator_settings)`, with what is not modelled.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "expandable_segments:{}",
            if self.expandable_segments {
                "True"
            } else {
                "False"
            }
        );
        for u in self.unmodelled() {
            s.push(',');
            s.push_str(&u);
        }
        s.push_str(match self.source {
            SettingsSource::AllocatorSettings => " (allocator_settings)",
            SettingsSource::Inferred => " (inferred from the segments)",
        });
        s
    }
}

/// An `oom` entry: where the recorded run failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordedOom {
    /// The entry's line (1-based index in the device's trace).
    pub line: u64,
    /// Events of the trace before it.
    pub event: usize,
    /// The bytes asked for.
    pub size: u64,
    /// What CUDA reported free on the device then.
    pub device_free: Option<u64>,
    /// The stream handle.
    pub stream: u64,
    /// Its traceback, an index into [`Trace::tracebacks`].
    pub frames: Option<u32>,
}

/// Segments released right before a new one was made: how PyTorch answers a `cudaMalloc` that
/// failed (release the cached segments, retry), so the recorded run was at its device's limit
/// there (or it called `empty_cache` just before growing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordedRetry {
    /// The line of the first release.
    pub line: u64,
    /// Reserved bytes just before the releases.
    pub reserved_before: u64,
    /// The size of the segment made after them.
    pub size: u64,
}

/// A parsed, validated trace: every free names a live slot, every allocation a free slot.
#[derive(Clone, Debug, Default)]
pub struct Trace {
    /// The name reports use: the file name as given.
    pub name: String,
    /// The events, in trace order: replaying them in order is always valid.
    pub events: Vec<Event>,
    /// Number of distinct slots used (slots are dense, reused after a free): the most allocations
    /// live at once.
    pub slots: u32,
    /// The trace's own stream identifiers, in order of first use; `Op::Alloc::stream` indexes it.
    pub streams: Vec<u64>,
    /// Dropped events, in trace order.
    pub problems: Vec<Problem>,
    /// PyTorch snapshots with segment events: the recorded reserved bytes; empty otherwise.
    pub recorded: Vec<RecordedPoint>,
    /// The first `# {json}` comment line of a CSV trace, if any.
    pub meta: Option<serde_json::Value>,
    /// The snapshot's device this trace is of; `None` for a CSV trace.
    pub device: Option<usize>,
    /// Snapshots: the memory live before the first entry, reconstructed.
    pub reconstructed: Reconstructed,
    /// Snapshots: the recording allocator's configuration, when known.
    pub settings: Option<RecordedSettings>,
    /// Snapshots: the `oom` entries.
    pub recorded_ooms: Vec<RecordedOom>,
    /// Snapshots: where the recording allocator released its cache and retried.
    pub recorded_retries: Vec<RecordedRetry>,
    /// Snapshots: the distinct tracebacks, innermost frame first.
    pub tracebacks: Arc<Vec<Vec<Frame>>>,
    /// Snapshots: per event, its traceback; empty for a CSV trace.
    pub event_frames: Vec<Option<u32>>,
}

impl Trace {
    /// The traceback of event `event`, innermost frame first (empty when unknown).
    pub fn frames_of(&self, event: usize) -> &[Frame] {
        self.traceback(self.event_frames.get(event).copied().flatten())
    }

    /// A traceback by index (empty for `None`).
    pub fn traceback(&self, index: Option<u32>) -> &[Frame] {
        index
            .and_then(|i| self.tracebacks.get(i as usize))
            .map_or(&[], Vec::as_slice)
    }

    /// Up to `n` frames of a traceback to show: the user's frames (see [`Frame::is_user`]), or
    /// the innermost frames when it has none.
    pub fn top_frames(&self, index: Option<u32>, n: usize) -> Vec<&Frame> {
        let all = self.traceback(index);
        let user: Vec<&Frame> = all.iter().filter(|f| f.is_user()).take(n).collect();
        if user.is_empty() {
            all.iter().take(n).collect()
        } else {
            user
        }
    }
}

/// A trace that cannot be read at all.
#[derive(Debug)]
pub enum TraceError {
    /// The file is missing or unreadable.
    Io {
        /// The trace's name (for [`load`], the path as given).
        path: String,
        /// The error opening or reading it.
        error: std::io::Error,
    },
    /// A malformed line: `FILE:LINE: expected ...`.
    Malformed {
        /// The trace's name (for [`load`], the path as given).
        path: String,
        /// The 1-based line.
        line: u64,
        /// What was expected there, and what was found.
        message: String,
    },
    /// A snapshot that is not what `torch.cuda.memory._dump_snapshot` writes, or that has no
    /// trace for the device asked for: `FILE: message`.
    Snapshot {
        /// The trace's name (for [`load`], the path as given).
        path: String,
        /// What is wrong with it.
        message: String,
    },
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TraceError::Io { path, error } => write!(f, "{path}: cannot read: {error}"),
            TraceError::Malformed {
                path,
                line,
                message,
            } => write!(f, "{path}:{line}: {message}"),
            TraceError::Snapshot { path, message } => write!(f, "{path}: {message}"),
        }
    }
}

impl std::error::Error for TraceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            TraceError::Io { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Reads a trace file: a PyTorch snapshot pickle (events of device `device`), or the tessera CSV
/// format, gzip'd or not, told apart by content, not by name.
///
/// The trace is named after `path` as given. A file that cannot be opened or read is a
/// [`TraceError::Io`] naming it; see the [module documentation](self) for the formats.
pub fn load(path: &Path, device: usize) -> Result<Trace, TraceError> {
    let mut traces = load_devices(path, Devices::One(device))?;
    Ok(traces.pop().expect("one device asked for, one trace"))
}

/// As [`load`], for the devices `devices` of a snapshot: one trace each (a CSV trace is one trace
/// whatever is asked).
pub fn load_devices(path: &Path, devices: Devices) -> Result<Vec<Trace>, TraceError> {
    let name = path.display().to_string();
    let io = |error| TraceError::Io {
        path: name.clone(),
        error,
    };
    let file = File::open(path).map_err(io)?;
    let mut reader = BufReader::with_capacity(1 << 16, file);
    let head = reader.fill_buf().map_err(io)?;
    if head.starts_with(&[0x1f, 0x8b]) {
        let mut gz =
            BufReader::with_capacity(1 << 16, flate2::bufread::MultiGzDecoder::new(reader));
        if gz.fill_buf().map_err(io)?.first() == Some(&PICKLE_PROTO) {
            return read_snapshot(&name, gz, devices);
        }
        parse_csv(&name, gz).map(|t| vec![t])
    } else if head.first() == Some(&PICKLE_PROTO) {
        read_snapshot(&name, reader, devices)
    } else {
        parse_csv(&name, reader).map(|t| vec![t])
    }
}

/// The pickle `PROTO` opcode, first byte of every pickle of protocol 2 or later.
const PICKLE_PROTO: u8 = 0x80;

fn read_snapshot(
    name: &str,
    mut reader: impl Read,
    devices: Devices,
) -> Result<Vec<Trace>, TraceError> {
    let mut bytes = Vec::new();
    reader
        .read_to_end(&mut bytes)
        .map_err(|error| TraceError::Io {
            path: name.to_owned(),
            error,
        })?;
    parse_snapshot_devices(name, &bytes, devices)
}

/// Hashes the u64 keys of the readers' maps (allocation ids, addresses, stream handles) with the
/// splitmix64 finalizer: much cheaper than SipHash, and it spreads aligned addresses, whose low
/// bits are all zero, over every bit.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;

/// The validation and slot assignment both readers share: ids (CSV ids, snapshot addresses) to
/// dense slots, stream handles to dense indices.
#[derive(Default)]
struct Builder {
    /// The slot of each live id.
    live: IdMap<u32>,
    /// Per slot, the line of the allocation that last took it (for "already live" problems; kept
    /// out of `live` so that its entries stay small).
    slot_line: Vec<u64>,
    free_slots: Vec<u32>,
    stream_index: IdMap<u32>,
    /// The last stream handle looked up and its index: most traces use one stream throughout.
    last_stream: Option<(u64, u32)>,
    streams: Vec<u64>,
    events: Vec<Event>,
    problems: Vec<Problem>,
    /// Snapshots: per event, its traceback (the snapshot reader pushes one per event).
    frames: Vec<Option<u32>>,
}

impl Builder {
    /// Allocates `id`; if it is already live, changes nothing and returns the line that made it
    /// live.
    fn alloc(&mut self, id: u64, size: u64, stream: u64, line: u64) -> Result<(), u64> {
        debug_assert!(size > 0);
        let slot = match self.live.entry(id) {
            std::collections::hash_map::Entry::Occupied(e) => {
                return Err(self.slot_line[*e.get() as usize])
            }
            std::collections::hash_map::Entry::Vacant(e) => {
                let slot = match self.free_slots.pop() {
                    Some(slot) => {
                        self.slot_line[slot as usize] = line;
                        slot
                    }
                    None => {
                        // Below u32::MAX, so that the count of slots fits in a u32 too.
                        let slot = u32::try_from(self.slot_line.len())
                            .ok()
                            .filter(|&slot| slot < u32::MAX)
                            .expect("fewer than 2^32 - 1 live allocations");
                        self.slot_line.push(line);
                        slot
                    }
                };
                *e.insert(slot)
            }
        };
        let stream = self.stream(stream);
        self.events.push(Event {
            op: Op::Alloc { slot, size, stream },
            line,
        });
        Ok(())
    }

    /// Frees `id`; returns false, changing nothing, if it is not live.
    fn free(&mut self, id: u64, line: u64) -> bool {
        match self.live.remove(&id) {
            Some(slot) => {
                self.free_slots.push(slot);
                self.events.push(Event {
                    op: Op::Free { slot },
                    line,
                });
                true
            }
            None => false,
        }
    }

    fn stream(&mut self, handle: u64) -> u32 {
        if let Some((last, index)) = self.last_stream {
            if last == handle {
                return index;
            }
        }
        let next = self.streams.len();
        let index = *self
            .stream_index
            .entry(handle)
            .or_insert_with(|| u32::try_from(next).expect("fewer than 2^32 streams"));
        if index as usize == next {
            self.streams.push(handle);
        }
        self.last_stream = Some((handle, index));
        index
    }

    fn problem(&mut self, line: u64, message: String) {
        self.problems.push(Problem { line, message });
    }

    fn finish(self, name: &str) -> Trace {
        Trace {
            name: name.to_owned(),
            events: self.events,
            slots: u32::try_from(self.slot_line.len()).expect("checked in alloc"),
            streams: self.streams,
            problems: self.problems,
            recorded: Vec::new(),
            meta: None,
            device: None,
            reconstructed: Reconstructed::default(),
            settings: None,
            recorded_ooms: Vec::new(),
            recorded_retries: Vec::new(),
            tracebacks: Arc::default(),
            event_frames: self.frames,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builder_reuses_the_most_recently_freed_slot_and_densifies_streams() {
        let mut b = Builder::default();
        assert_eq!(b.alloc(10, 1, 7, 1), Ok(()));
        assert_eq!(b.alloc(20, 2, 0, 2), Ok(()));
        assert_eq!(b.alloc(30, 3, 7, 3), Ok(()));
        assert_eq!(b.alloc(20, 9, 7, 4), Err(2));
        assert!(b.free(10, 5));
        assert!(b.free(30, 6));
        assert!(!b.free(30, 7));
        assert_eq!(b.alloc(40, 4, 5, 8), Ok(()));
        let t = b.finish("t");
        assert_eq!(t.slots, 3);
        assert_eq!(t.streams, vec![7, 0, 5]);
        assert_eq!(
            t.events.last(),
            Some(&Event {
                op: Op::Alloc {
                    slot: 2,
                    size: 4,
                    stream: 2
                },
                line: 8
            })
        );
    }

    #[test]
    fn id_hasher_spreads_aligned_keys() {
        use std::hash::BuildHasher;
        let build = BuildHasherDefault::<IdHasher>::default();
        let mut low_bits = std::collections::HashSet::new();
        for i in 0..1024u64 {
            low_bits.insert(build.hash_one(0x7f00_0000_0000 + (i << 21)) & 0x3ff);
        }
        assert!(
            low_bits.len() > 500,
            "{} distinct low bit patterns",
            low_bits.len()
        );
    }
}
