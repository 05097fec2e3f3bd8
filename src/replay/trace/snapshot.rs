//! The PyTorch memory snapshot reader: the pickle `torch.cuda.memory._dump_snapshot()` writes.
//!
//! Snapshots are read into typed structs first, which skips the (often huge) `frames` lists
//! without building them. That path cannot take a Python int beyond the range of `i64`, so if it
//! fails, the pickle is read again as a generic value, which takes any int and also names the
//! exact place where a pickle that is not a snapshot differs from one.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, Visitor};
use serde_pickle::{DeOptions, HashableValue, Value};

use super::{Builder, RecordedPoint, Trace, TraceError};

/// Reads the trace of device `device` from the bytes of a PyTorch memory snapshot pickle (see the
/// [module documentation](super)); `name` names the trace and its errors.
///
/// A pickle that is not a snapshot, or a `device` the snapshot has no trace for, is a
/// [`TraceError::Snapshot`]; entries that cannot be replayed become [`super::Problem`]s.
pub fn parse_snapshot(name: &str, bytes: &[u8], device: usize) -> Result<Trace, TraceError> {
    let error = |message: String| TraceError::Snapshot {
        path: name.to_owned(),
        message,
    };
    let raw = match serde_pickle::from_slice::<RawSnapshot>(bytes, options()) {
        Ok(raw) => raw,
        Err(_) => {
            let value = serde_pickle::value_from_slice(bytes, options()).map_err(|e| {
                error(format!(
                    "not a PyTorch memory snapshot: cannot unpickle: {e}"
                ))
            })?;
            from_value(value).map_err(|m| error(format!("not a PyTorch memory snapshot: {m}")))?
        }
    };
    build(name, raw, device).map_err(error)
}

/// How snapshots are unpickled.
///
/// PyTorch shares one list among the trace entries with the same traceback, and one frame dict
/// among the tracebacks with the same frame; pickle writes each once and then refers to its memo.
/// serde-pickle 1.2 counts memo references per occurrence in the stream, not per use, so when it
/// reads a shared list several times, the items inside run out of references and it reports a
/// "recursive structure" (birkenfeld/serde-pickle#24). Replacing those items with `None` instead
/// is harmless here: they are frames, which this reader ignores, and nothing outside frames is the
/// same Python object as anything inside them.
fn options() -> DeOptions {
    DeOptions::new().replace_recursive_structures()
}

/// The parts of a snapshot this reader uses.
#[derive(serde::Deserialize)]
struct RawSnapshot {
    #[serde(default)]
    segments: Option<Vec<RawSegment>>,
    device_traces: Vec<Vec<RawEntry>>,
}

#[derive(serde::Deserialize)]
struct RawSegment {
    #[serde(default)]
    device: Option<Int>,
    #[serde(default)]
    total_size: Option<Int>,
}

#[derive(serde::Deserialize)]
struct RawEntry {
    action: Action,
    #[serde(default)]
    addr: Option<Int>,
    #[serde(default)]
    size: Option<Int>,
    #[serde(default)]
    stream: Option<Int>,
}

/// A trace entry's `action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    Alloc,
    FreeRequested,
    FreeCompleted,
    SegmentAlloc,
    SegmentFree,
    SegmentMap,
    SegmentUnmap,
    /// `oom`, `snapshot`, and actions newer than this reader: ignored.
    Other,
}

impl Action {
    fn from_name(name: &str) -> Action {
        match name {
            "alloc" => Action::Alloc,
            "free_requested" => Action::FreeRequested,
            "free_completed" => Action::FreeCompleted,
            "segment_alloc" => Action::SegmentAlloc,
            "segment_free" => Action::SegmentFree,
            "segment_map" => Action::SegmentMap,
            "segment_unmap" => Action::SegmentUnmap,
            _ => Action::Other,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Action::Alloc => "alloc",
            Action::FreeRequested => "free_requested",
            Action::FreeCompleted => "free_completed",
            Action::SegmentAlloc => "segment_alloc",
            Action::SegmentFree => "segment_free",
            Action::SegmentMap => "segment_map",
            Action::SegmentUnmap => "segment_unmap",
            Action::Other => "other",
        }
    }
}

impl<'de> Deserialize<'de> for Action {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ActionVisitor;
        impl Visitor<'_> for ActionVisitor {
            type Value = Action;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an action name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Action, E> {
                Ok(Action::from_name(v))
            }
            fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Action, E> {
                Ok(std::str::from_utf8(v).map_or(Action::Other, Action::from_name))
            }
        }
        deserializer.deserialize_str(ActionVisitor)
    }
}

/// A Python int as read: PyTorch writes addresses and sizes as `size_t` and stream handles as
/// `int64_t`, so `i128` holds every value that can be meant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Int(i128);

impl<'de> Deserialize<'de> for Int {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntVisitor;
        impl Visitor<'_> for IntVisitor {
            type Value = Int;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Int, E> {
                Ok(Int(v.into()))
            }
            fn visit_i128<E: de::Error>(self, v: i128) -> Result<Int, E> {
                Ok(Int(v))
            }
            fn visit_u128<E: de::Error>(self, v: u128) -> Result<Int, E> {
                i128::try_from(v)
                    .map(Int)
                    .map_err(|_| E::custom("integer out of range"))
            }
        }
        deserializer.deserialize_i64(IntVisitor)
    }
}

impl Int {
    /// An address or a stream handle: a `u64`, or an `i64` (a pointer cast to `int64_t`) taken
    /// bit for bit.
    fn bits(self) -> Option<u64> {
        u64::try_from(self.0)
            .ok()
            .or_else(|| i64::try_from(self.0).ok().map(|v| v as u64))
    }

    /// A size: a `u64`.
    fn size(self) -> Option<u64> {
        u64::try_from(self.0).ok()
    }
}

/// Builds the trace of `device` from a snapshot; an error is a message.
fn build(name: &str, raw: RawSnapshot, device: usize) -> Result<Trace, String> {
    let devices = raw.device_traces.len();
    let Some(entries) = raw.device_traces.into_iter().nth(device) else {
        return Err(match devices {
            0 => format!(
                "the snapshot has no device traces (was memory history recorded?), so none for \
                 device {device}"
            ),
            1 => format!("the snapshot has traces for 1 device (0), not for device {device}"),
            n => format!(
                "the snapshot has traces for {n} devices (0 to {}), not for device {device}",
                n - 1
            ),
        });
    };

    // Reserved bytes at dump time: the device's segments. A segment without a device (never
    // written by PyTorch) counts for device 0.
    let mut reserved_at_dump: i128 = 0;
    for (i, segment) in raw.segments.iter().flatten().enumerate() {
        let on_device = match segment.device {
            Some(d) => usize::try_from(d.0).is_ok_and(|d| d == device),
            None => device == 0,
        };
        if on_device {
            let size = segment
                .total_size
                .and_then(Int::size)
                .ok_or_else(|| format!("segments[{i}] has no valid 'total_size'"))?;
            reserved_at_dump += i128::from(size);
        }
    }

    let at = |i: usize| format!("device_traces[{device}][{i}]");
    let field =
        |value: Option<Int>, convert: fn(Int) -> Option<u64>, key: &str, i: usize, e: &RawEntry| {
            match value {
                None => Err(format!("{} ({}) has no '{key}'", at(i), e.action.name())),
                Some(v) => convert(v).ok_or_else(|| {
                    format!(
                        "{} ({}) has '{key}' {}, out of range",
                        at(i),
                        e.action.name(),
                        v.0
                    )
                }),
            }
        };

    // The segment events' sizes first: the trace's starting reserved bytes depend on their sum.
    let mut deltas = Vec::new();
    let mut net: i128 = 0;
    for (i, e) in entries.iter().enumerate() {
        let sign: i128 = match e.action {
            Action::SegmentAlloc | Action::SegmentMap => 1,
            Action::SegmentFree | Action::SegmentUnmap => -1,
            _ => continue,
        };
        let delta = sign * i128::from(field(e.size, Int::size, "size", i, e)?);
        net += delta;
        deltas.push(delta);
    }
    let has_segment_events = !deltas.is_empty();
    let mut reserved = (reserved_at_dump - net).max(0);
    let mut recorded = vec![point(0, reserved)];
    let mut deltas = deltas.into_iter();

    let mut b = Builder::default();
    for (i, e) in entries.iter().enumerate() {
        let line = i as u64 + 1;
        match e.action {
            Action::Alloc => {
                let addr = field(e.addr, Int::bits, "addr", i, e)?;
                let size = field(e.size, Int::size, "size", i, e)?;
                let stream = match e.stream {
                    None => 0,
                    Some(_) => field(e.stream, Int::bits, "stream", i, e)?,
                };
                if size == 0 {
                    b.problem(line, format!("alloc of 0 bytes at address {addr:#x}"));
                } else if let Err(since) = b.alloc(addr, size, stream, line) {
                    b.problem(
                        line,
                        format!(
                            "alloc at address {addr:#x}, which is already live (since entry \
                             {since})"
                        ),
                    );
                }
            }
            Action::FreeCompleted => {
                let addr = field(e.addr, Int::bits, "addr", i, e)?;
                if !b.free(addr, line) {
                    b.problem(
                        line,
                        format!(
                            "free_completed of address {addr:#x}, which is not live (allocated \
                             before recording started?)"
                        ),
                    );
                }
            }
            Action::SegmentAlloc
            | Action::SegmentMap
            | Action::SegmentFree
            | Action::SegmentUnmap => {
                reserved += deltas.next().expect("one delta per segment event");
                let p = point(b.events.len(), reserved);
                match recorded.last_mut() {
                    Some(last) if last.event == p.event => *last = p,
                    _ => recorded.push(p),
                }
            }
            Action::FreeRequested | Action::Other => {}
        }
    }
    let mut trace = b.finish(name);
    if has_segment_events {
        trace.recorded = recorded;
    }
    Ok(trace)
}

fn point(event: usize, reserved: i128) -> RecordedPoint {
    RecordedPoint {
        event,
        reserved: u64::try_from(reserved.max(0)).unwrap_or(u64::MAX),
    }
}

/// The generic path: a snapshot from a pickle read as a [`Value`]; an error says where the value
/// differs from a snapshot.
fn from_value(value: Value) -> Result<RawSnapshot, String> {
    let mut top = match value {
        Value::Dict(d) => d,
        other => return Err(format!("the pickle holds {}, not a dict", kind(&other))),
    };
    let traces = take(&mut top, "device_traces").ok_or_else(|| {
        let mut keys: Vec<String> = top.keys().take(10).map(|k| format!("{k}")).collect();
        if top.len() > keys.len() {
            keys.push("...".to_owned());
        }
        format!(
            "the dict has no 'device_traces' key (its keys: {})",
            keys.join(", ")
        )
    })?;
    let device_traces = list(traces, "device_traces")?
        .into_iter()
        .enumerate()
        .map(|(d, trace)| {
            list(trace, &format!("device_traces[{d}]"))?
                .into_iter()
                .enumerate()
                .map(|(i, entry)| entry_from_value(entry, &format!("device_traces[{d}][{i}]")))
                .collect()
        })
        .collect::<Result<_, String>>()?;
    let segments = match take(&mut top, "segments") {
        None | Some(Value::None) => None,
        Some(segments) => Some(
            list(segments, "segments")?
                .into_iter()
                .enumerate()
                .map(|(i, segment)| {
                    let at = format!("segments[{i}]");
                    let mut segment = dict(segment, &at)?;
                    Ok(RawSegment {
                        device: int(take(&mut segment, "device"), &at, "device")?,
                        total_size: int(take(&mut segment, "total_size"), &at, "total_size")?,
                    })
                })
                .collect::<Result<_, String>>()?,
        ),
    };
    Ok(RawSnapshot {
        segments,
        device_traces,
    })
}

fn entry_from_value(entry: Value, at: &str) -> Result<RawEntry, String> {
    let mut entry = dict(entry, at)?;
    let action = match take(&mut entry, "action") {
        Some(Value::String(s)) => Action::from_name(&s),
        Some(Value::Bytes(b)) => std::str::from_utf8(&b).map_or(Action::Other, Action::from_name),
        Some(other) => return Err(format!("{at}['action'] is {}, not a str", kind(&other))),
        None => return Err(format!("{at} has no 'action'")),
    };
    Ok(RawEntry {
        action,
        addr: int(take(&mut entry, "addr"), at, "addr")?,
        size: int(take(&mut entry, "size"), at, "size")?,
        stream: int(take(&mut entry, "stream"), at, "stream")?,
    })
}

/// Removes `key` (a str, or bytes from a protocol 2 pickle) from a pickled dict.
fn take(dict: &mut BTreeMap<HashableValue, Value>, key: &str) -> Option<Value> {
    dict.remove(&HashableValue::String(key.to_owned()))
        .or_else(|| dict.remove(&HashableValue::Bytes(key.as_bytes().to_vec())))
}

fn list(value: Value, at: &str) -> Result<Vec<Value>, String> {
    match value {
        Value::List(v) | Value::Tuple(v) => Ok(v),
        other => Err(format!("{at} is {}, not a list", kind(&other))),
    }
}

fn dict(value: Value, at: &str) -> Result<BTreeMap<HashableValue, Value>, String> {
    match value {
        Value::Dict(d) => Ok(d),
        other => Err(format!("{at} is {}, not a dict", kind(&other))),
    }
}

fn int(value: Option<Value>, at: &str, key: &str) -> Result<Option<Int>, String> {
    match value {
        None | Some(Value::None) => Ok(None),
        Some(Value::I64(v)) => Ok(Some(Int(v.into()))),
        Some(Value::Int(v)) => {
            let text = v.to_string();
            text.parse::<i128>()
                .map(|v| Some(Int(v)))
                .map_err(|_| format!("{at}['{key}'] is {text}, out of range"))
        }
        Some(other) => Err(format!("{at}['{key}'] is {}, not an int", kind(&other))),
    }
}

/// The Python type name of a pickled value, for messages.
fn kind(value: &Value) -> &'static str {
    match value {
        Value::None => "None",
        Value::Bool(_) => "a bool",
        Value::I64(_) | Value::Int(_) => "an int",
        Value::F64(_) => "a float",
        Value::Bytes(_) => "bytes",
        Value::String(_) => "a str",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Set(_) => "a set",
        Value::FrozenSet(_) => "a frozenset",
        Value::Dict(_) => "a dict",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(action: &str, addr: Value, size: i64) -> Value {
        let mut d = BTreeMap::new();
        d.insert(
            HashableValue::String("action".into()),
            Value::String(action.into()),
        );
        d.insert(HashableValue::String("addr".into()), addr);
        d.insert(HashableValue::String("size".into()), Value::I64(size));
        d.insert(HashableValue::String("stream".into()), Value::I64(-1));
        d.insert(
            HashableValue::String("frames".into()),
            Value::List(vec![Value::String("f".into())]),
        );
        Value::Dict(d)
    }

    fn snapshot(entries: Vec<Value>) -> Vec<u8> {
        let mut top = BTreeMap::new();
        top.insert(
            HashableValue::String("device_traces".into()),
            Value::List(vec![Value::List(entries)]),
        );
        serde_pickle::value_to_vec(&Value::Dict(top), serde_pickle::SerOptions::new()).unwrap()
    }

    /// An int beyond i64 (made by unpickling a LONG1 opcode, since serde_pickle's BigInt type
    /// is not nameable here).
    fn big(value: u128) -> Value {
        let bytes = value.to_le_bytes();
        let mut len = 16;
        while len > 1 && bytes[len - 1] == 0 && bytes[len - 2] < 0x80 {
            len -= 1;
        }
        let mut pickle = vec![0x80, 2, 0x8a, len as u8];
        pickle.extend_from_slice(&bytes[..len]);
        pickle.push(b'.');
        serde_pickle::value_from_slice(&pickle, DeOptions::new()).unwrap()
    }

    #[test]
    fn typed_and_generic_paths_agree() {
        let bytes = snapshot(vec![
            entry("alloc", Value::I64(0x7f00_0000_0000), 512),
            entry("segment_alloc", Value::I64(0x7f00_0000_0000), 2 << 20),
            entry("free_completed", Value::I64(0x7f00_0000_0000), 512),
            entry("free_completed", Value::I64(0x10), 512),
        ]);
        let typed = serde_pickle::from_slice::<RawSnapshot>(&bytes, options()).unwrap();
        let value = serde_pickle::value_from_slice(&bytes, options()).unwrap();
        let generic = from_value(value).unwrap();
        let a = build("t", typed, 0).unwrap();
        let b = build("t", generic, 0).unwrap();
        assert_eq!(a.events, b.events);
        assert_eq!(a.problems, b.problems);
        assert_eq!(
            a.streams,
            vec![u64::MAX],
            "stream -1 is an int64 handle, taken bit for bit"
        );
        assert_eq!(a.streams, b.streams);
        assert_eq!(a.recorded, b.recorded);
        // Starts at 0 (no segments at dump time, but the trace adds 2 MiB: clamped), then +2 MiB
        // after the first event.
        assert_eq!(a.recorded, vec![point(0, 0), point(1, 2 << 20)]);
        assert_eq!(a.problems.len(), 1);
    }

    #[test]
    fn the_fixture_takes_the_typed_path_and_both_paths_agree_on_it() {
        let bytes = include_bytes!("../../../tests/data/snapshot_small.pickle");
        let typed = serde_pickle::from_slice::<RawSnapshot>(bytes, options())
            .unwrap_or_else(|e| panic!("{e}"));
        let generic = from_value(serde_pickle::value_from_slice(bytes, options()).unwrap())
            .unwrap_or_else(|e| panic!("{e}"));
        let a = build("t", typed, 0).unwrap();
        let b = build("t", generic, 0).unwrap();
        assert_eq!(a.events.len(), 11);
        assert_eq!(a.events, b.events);
        assert_eq!(a.problems, b.problems);
        assert_eq!(a.streams, b.streams);
        assert_eq!(a.recorded, b.recorded);
    }

    #[test]
    fn addresses_beyond_i64_take_the_generic_path() {
        let high = (1u128 << 63) + 4096;
        assert!(matches!(big(high), Value::Int(_)));
        let bytes = snapshot(vec![
            entry("alloc", big(high), 512),
            entry("free_completed", big(high), 512),
        ]);
        assert!(serde_pickle::from_slice::<RawSnapshot>(&bytes, options()).is_err());
        let t = parse_snapshot("t", &bytes, 0).unwrap();
        assert_eq!(t.events.len(), 2, "{:?}", t.problems);
        assert!(t.problems.is_empty());

        let bytes = snapshot(vec![entry("alloc", big(1 << 64), 512)]);
        let err = parse_snapshot("t", &bytes, 0).unwrap_err().to_string();
        assert_eq!(
            err,
            "t: device_traces[0][0] (alloc) has 'addr' 18446744073709551616, out of range"
        );
    }

    #[test]
    fn ints_convert_as_addresses_and_sizes() {
        assert_eq!(Int(-1).bits(), Some(u64::MAX));
        assert_eq!(Int(i128::from(u64::MAX)).bits(), Some(u64::MAX));
        assert_eq!(Int(1 << 64).bits(), None);
        assert_eq!(Int(i128::from(i64::MIN) - 1).bits(), None);
        assert_eq!(Int(-1).size(), None);
        assert_eq!(Int(5).size(), Some(5));
    }
}
