//! The PyTorch memory snapshot reader: the pickle `torch.cuda.memory._dump_snapshot()` writes.
//!
//! # Data flow
//! The pickle is read by [`crate::pickle`] into shared values (PyTorch shares one `frames` list
//! among the entries with the same traceback; the reader keeps that sharing, so frames cost one
//! copy per distinct traceback). This module then turns the values into typed records
//! ([`RawSnapshot`]: segments with their blocks, each device's entries, the allocator settings),
//! naming the key of anything that is not what PyTorch writes, and `reconstruct` turns one
//! device's records into a [`Trace`]: the memory live before the first entry, the events, the
//! recorded reserved bytes and the recorded OOMs.
//!
//! Keys are read leniently across PyTorch versions: unknown keys are ignored; a key a rule needs
//! and cannot do without (an entry's `action`, an `alloc`'s `addr` and `size`, a segment's
//! `total_size`) is an error naming it; optional ones (`stream`, `frames`, `requested_size`,
//! a block's `address`, which PyTorch 1.13 did not write) have defaults.
//!
//! # Locking
//! None: plain owned data, built on one thread.

use std::collections::HashMap;
use std::rc::Rc;

use super::reconstruct::reconstruct;
use super::{Frame, RecordedSettings, SettingsSource, Trace, TraceError};
use crate::pickle::{self, Value};
pub(super) use crate::torch_snapshot::Action;

/// Which devices of a snapshot to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Devices {
    /// One device, by index.
    One(usize),
    /// Every device that has a trace or segments, each as its own [`Trace`] named
    /// `FILE [device N]`.
    All,
}

/// Reads the trace of device `device` from the bytes of a PyTorch memory snapshot pickle (see the
/// [module documentation](super)); `name` names the trace and its errors.
///
/// A pickle that is not a snapshot, or a `device` the snapshot has no trace for, is a
/// [`TraceError::Snapshot`]; entries that cannot be replayed become [`super::Problem`]s.
pub fn parse_snapshot(name: &str, bytes: &[u8], device: usize) -> Result<Trace, TraceError> {
    let mut traces = parse_snapshot_devices(name, bytes, Devices::One(device))?;
    Ok(traces.pop().expect("one device asked for, one trace"))
}

/// Reads the devices `devices` of a snapshot: one trace per device, in device order.
pub fn parse_snapshot_devices(
    name: &str,
    bytes: &[u8],
    devices: Devices,
) -> Result<Vec<Trace>, TraceError> {
    let error = |message: String| TraceError::Snapshot {
        path: name.to_owned(),
        message,
    };
    let value = pickle::from_slice(bytes).map_err(|e| {
        error(format!(
            "not a PyTorch memory snapshot: cannot unpickle: {e}"
        ))
    })?;
    let mut raw =
        read_snapshot(&value).map_err(|m| error(format!("not a PyTorch memory snapshot: {m}")))?;
    drop(value);
    let count = raw.device_traces.len();
    let tracebacks = crate::sync::Arc::new(std::mem::take(&mut raw.tracebacks));
    let wanted: Vec<usize> = match devices {
        Devices::One(device) => {
            if device >= count {
                return Err(error(no_such_device(count, device)));
            }
            vec![device]
        }
        Devices::All => {
            let with_segments = |d: usize| raw.segments.iter().flatten().any(|s| s.device == d);
            let all: Vec<usize> = (0..count)
                .filter(|&d| !raw.device_traces[d].is_empty() || with_segments(d))
                .collect();
            if all.is_empty() {
                return Err(error(match count {
                    0 => "the snapshot has no device traces (was memory history recorded?)"
                        .to_owned(),
                    _ => "the snapshot's device traces are all empty and it has no segments"
                        .to_owned(),
                }));
            }
            all
        }
    };
    let mut traces = Vec::with_capacity(wanted.len());
    for device in wanted {
        let trace_name = match devices {
            Devices::One(_) => name.to_owned(),
            Devices::All => format!("{name} [device {device}]"),
        };
        let mut trace = reconstruct(&trace_name, &raw, device).map_err(&error)?;
        trace.device = Some(device);
        trace.settings = raw.settings.clone();
        trace.tracebacks = tracebacks.clone();
        traces.push(trace);
    }
    Ok(traces)
}

fn no_such_device(count: usize, device: usize) -> String {
    match count {
        0 => format!(
            "the snapshot has no device traces (was memory history recorded?), so none for \
             device {device}"
        ),
        1 => format!("the snapshot has traces for 1 device (0), not for device {device}"),
        n => format!(
            "the snapshot has traces for {n} devices (0 to {}), not for device {device}",
            n - 1
        ),
    }
}

/// A snapshot as typed records.
pub(super) struct RawSnapshot {
    /// `None` when the snapshot has no `segments` key (then nothing is known of the state at dump
    /// time, and the checks against it are skipped).
    pub(super) segments: Option<Vec<RawSegment>>,
    pub(super) device_traces: Vec<Vec<RawEntry>>,
    pub(super) settings: Option<RecordedSettings>,
    /// Distinct tracebacks, innermost frame first; entries and blocks refer to them by index.
    pub(super) tracebacks: Vec<Vec<Frame>>,
}

pub(super) struct RawSegment {
    /// Index in the snapshot's `segments`, for messages.
    pub(super) index: usize,
    pub(super) device: usize,
    pub(super) address: u64,
    pub(super) total_size: u64,
    pub(super) stream: u64,
    pub(super) expandable: bool,
    pub(super) blocks: Vec<RawBlock>,
}

#[derive(Clone, Copy)]
pub(super) struct RawBlock {
    pub(super) address: u64,
    pub(super) size: u64,
    /// The size asked for (`requested_size`), or the block's size when the snapshot has none.
    pub(super) requested: u64,
    /// `active_allocated` or `active_pending_free`: live at dump time.
    pub(super) live: bool,
    pub(super) frames: Option<u32>,
}

/// One trace entry, its ints as read (`None`: absent or `None`).
pub(super) struct RawEntry {
    pub(super) action: Action,
    pub(super) addr: Option<Int>,
    pub(super) size: Option<Int>,
    pub(super) stream: Option<Int>,
    pub(super) device_free: Option<Int>,
    pub(super) frames: Option<u32>,
}

/// A Python int as read: PyTorch writes addresses and sizes as `size_t` and stream handles as
/// `int64_t`, so `i128` holds every value that can be meant; `None` inside is an int beyond it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Int(pub(super) Option<i128>);

impl Int {
    /// An address or a stream handle: a `u64`, or an `i64` (a pointer cast to `int64_t`) taken
    /// bit for bit.
    pub(super) fn bits(self) -> Option<u64> {
        let v = self.0?;
        u64::try_from(v)
            .ok()
            .or_else(|| i64::try_from(v).ok().map(|v| v as u64))
    }

    /// A size: a `u64`.
    pub(super) fn size(self) -> Option<u64> {
        u64::try_from(self.0?).ok()
    }

    /// The value for messages.
    pub(super) fn shown(self) -> String {
        match self.0 {
            Some(v) => v.to_string(),
            None => "(an int beyond 128 bits)".to_owned(),
        }
    }
}

/// Interns tracebacks by the identity of their pickled list: PyTorch shares one list among the
/// entries with the same traceback, so this is one conversion per distinct traceback.
#[derive(Default)]
struct Tracebacks {
    by_list: HashMap<usize, u32>,
    list: Vec<Vec<Frame>>,
    /// Keeps every interned list alive, so that no address in `by_list` is reused.
    keep: Vec<Value>,
}

impl Tracebacks {
    fn intern(&mut self, frames: Option<Value>) -> Option<u32> {
        let frames = frames?;
        let Value::List(list) = &frames else {
            return None;
        };
        let key = Rc::as_ptr(list) as *const () as usize;
        if let Some(&i) = self.by_list.get(&key) {
            return Some(i);
        }
        let converted: Vec<Frame> = list.borrow().iter().filter_map(frame).collect();
        if converted.is_empty() {
            return None;
        }
        let i = u32::try_from(self.list.len()).ok()?;
        self.list.push(converted);
        self.by_list.insert(key, i);
        self.keep.push(frames.clone());
        Some(i)
    }
}

/// One frame dict, `{'filename', 'line', 'name'}`; anything else is skipped.
fn frame(v: &Value) -> Option<Frame> {
    let filename = v.get("filename")?.as_str()?;
    Some(Frame {
        filename: filename.to_string(),
        line: v
            .get("line")
            .and_then(|l| l.as_int())
            .and_then(|l| u64::try_from(l).ok())
            .unwrap_or(0),
        name: v
            .get("name")
            .and_then(|n| n.as_str())
            .map_or_else(String::new, |n| n.to_string()),
    })
}

fn read_snapshot(top: &Value) -> Result<RawSnapshot, String> {
    let Value::Dict(pairs) = top else {
        return Err(format!("the pickle holds {}, not a dict", top.kind()));
    };
    let Some(traces) = top.get("device_traces") else {
        let pairs = pairs.borrow();
        let mut keys: Vec<String> = pairs.iter().take(10).map(|(k, _)| key_repr(k)).collect();
        if pairs.len() > keys.len() {
            keys.push("...".to_owned());
        }
        return Err(format!(
            "the dict has no 'device_traces' key (its keys: {})",
            keys.join(", ")
        ));
    };
    let mut tracebacks = Tracebacks::default();
    let mut device_traces = Vec::new();
    for (d, trace) in list(&traces, "device_traces")?.iter().enumerate() {
        let entries = list(trace, &format!("device_traces[{d}]"))?;
        let mut out = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            out.push(read_entry(
                entry,
                &format!("device_traces[{d}][{i}]"),
                &mut tracebacks,
            )?);
        }
        device_traces.push(out);
    }
    let segments = match top.get("segments") {
        None | Some(Value::None) => None,
        Some(segments) => {
            let items = list(&segments, "segments")?;
            let mut out = Vec::with_capacity(items.len());
            for (i, s) in items.iter().enumerate() {
                out.push(read_segment(s, i, &mut tracebacks)?);
            }
            Some(out)
        }
    };
    let settings = read_settings(top, segments.as_deref(), &device_traces)?;
    Ok(RawSnapshot {
        segments,
        device_traces,
        settings,
        tracebacks: tracebacks.list,
    })
}

fn key_repr(k: &Value) -> String {
    match k.as_str() {
        Some(s) => format!("{s:?}"),
        None => k.kind().to_owned(),
    }
}

fn read_entry(entry: &Value, at: &str, tb: &mut Tracebacks) -> Result<RawEntry, String> {
    dict(entry, at)?;
    let action = match entry.get("action").as_ref() {
        Some(Value::Str(s)) => Action::from_name(s),
        Some(Value::Bytes(b)) => std::str::from_utf8(b).map_or(Action::Unknown, Action::from_name),
        Some(other) => return Err(format!("{at}['action'] is {}, not a str", other.kind())),
        None => return Err(format!("{at} has no 'action'")),
    };
    Ok(RawEntry {
        action,
        addr: int(entry, at, "addr")?,
        size: int(entry, at, "size")?,
        stream: int(entry, at, "stream")?,
        device_free: int(entry, at, "device_free")?,
        frames: tb.intern(entry.get("frames")),
    })
}

fn read_segment(s: &Value, index: usize, tb: &mut Tracebacks) -> Result<RawSegment, String> {
    let at = format!("segments[{index}]");
    dict(s, &at)?;
    // A segment without a device (never written by PyTorch) counts for device 0.
    let device = match int(s, &at, "device")? {
        None => 0,
        Some(d) => d
            .size()
            .and_then(|d| usize::try_from(d).ok())
            .ok_or_else(|| format!("{at} has 'device' {}, out of range", d.shown()))?,
    };
    let required = |key: &str| -> Result<u64, String> {
        let v = int(s, &at, key)?.ok_or_else(|| format!("{at} has no '{key}'"))?;
        v.bits()
            .ok_or_else(|| format!("{at} has '{key}' {}, out of range", v.shown()))
    };
    let total_size =
        int(s, &at, "total_size")?.ok_or_else(|| format!("{at} has no 'total_size'"))?;
    let total_size = total_size
        .size()
        .ok_or_else(|| format!("{at} has 'total_size' {}, out of range", total_size.shown()))?;
    let address = required("address")?;
    let stream = int(s, &at, "stream")?.and_then(Int::bits).unwrap_or(0);
    let expandable = matches!(s.get("is_expandable"), Some(Value::Bool(true)));
    let mut blocks = Vec::new();
    if let Some(items) = s.get("blocks") {
        // PyTorch 1.13 wrote no block addresses: blocks tile the segment in order.
        let mut next = address;
        for (j, b) in list(&items, &format!("{at}['blocks']"))?.iter().enumerate() {
            let bat = format!("{at}['blocks'][{j}]");
            dict(b, &bat)?;
            let size = int(b, &bat, "size")?.ok_or_else(|| format!("{bat} has no 'size'"))?;
            let size = size
                .size()
                .ok_or_else(|| format!("{bat} has 'size' {}, out of range", size.shown()))?;
            let address = match int(b, &bat, "address")? {
                None => next,
                Some(a) => a
                    .bits()
                    .ok_or_else(|| format!("{bat} has 'address' {}, out of range", a.shown()))?,
            };
            next = address.saturating_add(size);
            // The size asked for: at least 1 byte and at most the block (a larger one is not
            // what PyTorch writes; the block's size bounds what it can have held).
            let requested = int(b, &bat, "requested_size")?
                .and_then(Int::size)
                .filter(|&r| r > 0)
                .unwrap_or(size)
                .min(size);
            let live = match b.get("state") {
                Some(state) => matches!(
                    state.as_str().as_deref(),
                    Some("active_allocated") | Some("active_pending_free")
                ),
                None => return Err(format!("{bat} has no 'state'")),
            };
            blocks.push(RawBlock {
                address,
                size,
                requested,
                live,
                frames: tb.intern(b.get("frames")),
            });
        }
    }
    Ok(RawSegment {
        index,
        device,
        address,
        total_size,
        stream,
        expandable,
        blocks,
    })
}

/// The recording allocator's configuration: its `allocator_settings` (PyTorch 2.1 and later), or
/// else what the segments and entries show (expandable segments or not).
fn read_settings(
    top: &Value,
    segments: Option<&[RawSegment]>,
    traces: &[Vec<RawEntry>],
) -> Result<Option<RecordedSettings>, String> {
    if let Some(s) = top.get("allocator_settings") {
        if matches!(s, Value::None) {
            return Ok(None);
        }
        dict(&s, "allocator_settings")?;
        let flag = |key: &str| matches!(s.get(key), Some(Value::Bool(true)));
        let max_split_size = s
            .get("max_split_size")
            .and_then(|v| v.as_int())
            // PyTorch writes -1 (or SIZE_MAX) when the setting is off.
            .filter(|&v| v > 0 && v < i128::from(u64::MAX))
            .map(|v| v as u64);
        let gc = match s.get("garbage_collection_threshold") {
            Some(Value::Float(f)) if f > 0.0 => Some(f),
            _ => None,
        };
        let roundup = match s.get("roundup_power2_divisions").as_ref() {
            Some(Value::Dict(d)) => d.borrow().iter().any(|(_, v)| v.as_int().unwrap_or(0) > 0),
            Some(Value::List(l)) => l.borrow().iter().any(|v| v.as_int().unwrap_or(0) > 0),
            Some(v) => v.as_int().unwrap_or(0) > 0,
            None => false,
        };
        return Ok(Some(RecordedSettings {
            source: SettingsSource::AllocatorSettings,
            expandable_segments: flag("expandable_segments"),
            max_split_size,
            garbage_collection_threshold: gc,
            roundup_power2_divisions: roundup,
            release_lock_on_cudamalloc: flag("release_lock_on_cudamalloc"),
            conf: s
                .get("PYTORCH_CUDA_ALLOC_CONF")
                .and_then(|c| c.as_str())
                .map(|c| c.to_string())
                .filter(|c| !c.is_empty()),
        }));
    }
    let expandable_segment = segments.is_some_and(|s| s.iter().any(|s| s.expandable));
    let mapped = traces
        .iter()
        .flatten()
        .any(|e| matches!(e.action, Action::SegmentMap | Action::SegmentUnmap));
    let known = segments.is_some_and(|s| !s.is_empty())
        || traces
            .iter()
            .flatten()
            .any(|e| matches!(e.action, Action::SegmentAlloc | Action::SegmentFree));
    if !(known || mapped) {
        return Ok(None);
    }
    Ok(Some(RecordedSettings {
        source: SettingsSource::Inferred,
        expandable_segments: expandable_segment || mapped,
        ..RecordedSettings::default()
    }))
}

fn list(value: &Value, at: &str) -> Result<Vec<Value>, String> {
    value
        .as_list()
        .ok_or_else(|| format!("{at} is {}, not a list", value.kind()))
}

fn dict(value: &Value, at: &str) -> Result<(), String> {
    match value {
        Value::Dict(_) => Ok(()),
        other => Err(format!("{at} is {}, not a dict", other.kind())),
    }
}

/// `dict[key]` as an int: `None` when absent or `None`; an error naming the key when it is
/// another type.
fn int(d: &Value, at: &str, key: &str) -> Result<Option<Int>, String> {
    match d.get(key) {
        None | Some(Value::None) => Ok(None),
        Some(Value::Int(v)) => Ok(Some(Int(Some(v)))),
        Some(Value::BigInt) => Ok(Some(Int(None))),
        Some(Value::Bool(b)) => Ok(Some(Int(Some(i128::from(b))))),
        Some(other) => Err(format!("{at}['{key}'] is {}, not an int", other.kind())),
    }
}
