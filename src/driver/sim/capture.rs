//! Stream capture on the simulated device: which streams capture, in which mode and from which
//! thread, and which captures forbid a potentially unsafe call (the rules of [`CaptureMode`]).
//!
//! # The data
//! Each simulated device holds a [`Captures`]: `stream -> Capture {mode, thread, id, invalidated}`,
//! and the set of events last recorded inside a capture. The driver's `State` holds each thread's
//! own interaction mode (`cuThreadExchangeStreamCaptureMode`); a thread not in it is `Global`.
//!
//! # Invariants
//! - A stream appears at most once; the legacy default stream (0) never does.
//! - An invalidated capture stays until it is ended; it forbids nothing more (it is already broken)
//!   and every call that would add work to it fails with `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED`.
//!
//! # Order of checks
//! A call checks the captures before its own arguments, as CUDA does: a call that a capture
//! forbids fails with `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` and invalidates that capture even
//! when an argument is bad too (an unmap of an unknown range, a free of an unknown pointer), and
//! work added to an invalidated capture fails with `CUDA_ERROR_STREAM_CAPTURE_INVALIDATED` whatever
//! its arguments. The one exception is a bad device, which fails with `CUDA_ERROR_INVALID_DEVICE`
//! and invalidates nothing. Only then come the argument checks, and the call changes nothing
//! until every check has passed.
//!
//! # What is not modelled
//! Captures joining other streams through `cuStreamWaitEvent` on a captured event, and implicit
//! synchronization with the legacy default stream (`CUDA_ERROR_STREAM_CAPTURE_IMPLICIT`). tessera
//! makes neither.
//!
//! # Locking rule
//! Plain data inside the driver's one mutex; nothing here locks.

use std::collections::{HashMap, HashSet};

use super::super::{
    Call, CaptureInfo, CaptureMode, CaptureStatus, CudaError, DriverResult, Event, Stream,
};
use super::{device_mut, fail, State};
use crate::sync::{current_thread_id, ThreadId};

/// One stream's capture.
#[derive(Clone, Copy, Debug)]
pub(super) struct Capture {
    pub(super) mode: CaptureMode,
    pub(super) thread: ThreadId,
    pub(super) id: u64,
    pub(super) invalidated: bool,
}

/// The captures of one device.
#[derive(Debug, Default)]
pub(super) struct Captures {
    streams: HashMap<u64, Capture>,
    /// Events whose last record was inside a capture: a query or synchronize of them is
    /// `CUDA_ERROR_CAPTURED_EVENT` until they are recorded again outside one.
    captured_events: HashSet<u64>,
}

impl Captures {
    /// Whether no capture is underway (the common case: every check is then one branch).
    pub(super) fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    pub(super) fn get(&self, stream: u64) -> Option<&Capture> {
        self.streams.get(&stream)
    }

    /// Starts a capture on `stream`. Errors as CUDA gives them: the legacy default stream cannot
    /// capture, a capturing stream cannot start another.
    pub(super) fn begin(
        &mut self,
        stream: u64,
        capture: Capture,
    ) -> Result<(), (CudaError, String)> {
        if stream == 0 {
            return Err((
                CudaError::StreamCaptureUnsupported,
                "the legacy default stream cannot be captured".into(),
            ));
        }
        if self.streams.contains_key(&stream) {
            return Err((
                CudaError::IllegalState,
                format!("stream {stream:#x} is already capturing"),
            ));
        }
        self.streams.insert(stream, capture);
        Ok(())
    }

    /// Ends the capture on `stream` when `thread` may end it.
    pub(super) fn end(&mut self, stream: u64, thread: ThreadId) -> Result<(), (CudaError, String)> {
        let Some(c) = self.streams.get(&stream).copied() else {
            return Err((
                CudaError::IllegalState,
                format!("stream {stream:#x} is not capturing"),
            ));
        };
        if c.mode != CaptureMode::Relaxed && c.thread != thread {
            return Err((
                CudaError::StreamCaptureWrongThread,
                format!(
                    "the {:?} capture on stream {stream:#x} was begun by another thread",
                    c.mode
                ),
            ));
        }
        self.streams.remove(&stream);
        if c.invalidated {
            return Err((
                CudaError::StreamCaptureInvalidated,
                format!("the capture on stream {stream:#x} was invalidated by an unsupported call"),
            ));
        }
        Ok(())
    }

    pub(super) fn info(&self, stream: u64) -> CaptureInfo {
        match self.streams.get(&stream) {
            None => CaptureInfo::NONE,
            Some(c) => CaptureInfo {
                status: if c.invalidated {
                    CaptureStatus::Invalidated
                } else {
                    CaptureStatus::Active
                },
                id: c.id,
            },
        }
    }

    /// The streams whose (still valid) captures forbid a potentially unsafe call made by `thread`
    /// in its own `mode`, in stream order.
    pub(super) fn forbidding(&self, thread: ThreadId, mode: CaptureMode) -> Vec<u64> {
        let mut streams: Vec<u64> = self
            .streams
            .iter()
            .filter(|(_, c)| !c.invalidated && c.mode != CaptureMode::Relaxed)
            .filter(|(_, c)| match mode {
                CaptureMode::Relaxed => false,
                CaptureMode::ThreadLocal => c.thread == thread,
                CaptureMode::Global => c.thread == thread || c.mode == CaptureMode::Global,
            })
            .map(|(&s, _)| s)
            .collect();
        streams.sort_unstable();
        streams
    }

    pub(super) fn invalidate(&mut self, streams: &[u64]) {
        for s in streams {
            if let Some(c) = self.streams.get_mut(s) {
                c.invalidated = true;
            }
        }
    }

    /// Notes that `event` was recorded on `stream`: inside a capture it becomes a captured event
    /// (an invalidated capture refuses the record), outside one it stops being one.
    pub(super) fn record(&mut self, event: u64, stream: u64) -> Result<bool, (CudaError, String)> {
        match self.streams.get(&stream) {
            Some(c) if c.invalidated => Err(invalidated(stream)),
            Some(_) => {
                self.captured_events.insert(event);
                Ok(true)
            }
            None => {
                self.captured_events.remove(&event);
                Ok(false)
            }
        }
    }

    pub(super) fn is_captured_event(&self, event: u64) -> bool {
        self.captured_events.contains(&event)
    }

    pub(super) fn forget_event(&mut self, event: u64) {
        self.captured_events.remove(&event);
    }
}

/// The error for work added to an invalidated capture.
pub(super) fn invalidated(stream: u64) -> (CudaError, String) {
    (
        CudaError::StreamCaptureInvalidated,
        format!("the capture on stream {stream:#x} was invalidated by an unsupported call"),
    )
}

// ---- The driver calls (SimDriver's trait methods call these with the state locked) ----

pub(super) fn begin(
    st: &mut State,
    device: usize,
    stream: Stream,
    mode: CaptureMode,
) -> DriverResult<()> {
    const C: Call = Call::StreamBeginCapture;
    let id = st.last_id + 1;
    let capture = Capture {
        mode,
        thread: current_thread_id(),
        id,
        invalidated: false,
    };
    device_mut(st, C, device)?
        .captures
        .begin(stream.0, capture)
        .map_err(|(e, why)| fail(C, e, device, why))?;
    st.last_id = id;
    Ok(())
}

pub(super) fn end(st: &mut State, device: usize, stream: Stream) -> DriverResult<()> {
    const C: Call = Call::StreamEndCapture;
    device_mut(st, C, device)?
        .captures
        .end(stream.0, current_thread_id())
        .map_err(|(e, why)| fail(C, e, device, why))
}

/// The rule for a potentially unsafe call (see [`CaptureMode`]): while a capture forbids it, the
/// call fails with `CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED` and every capture that forbade it is
/// invalidated. Captures on every device count, as CUDA's global mode is process-wide. A bad
/// device passes here and fails in the call's own check.
pub(super) fn check_unsafe_call(st: &mut State, call: Call, device: usize) -> DriverResult<()> {
    if device >= st.devices.len() || st.devices.iter().all(|d| d.captures.is_empty()) {
        return Ok(());
    }
    let thread = current_thread_id();
    let mode = st.thread_modes.get(&thread).copied().unwrap_or_default();
    let mut broken = Vec::new();
    for (index, d) in st.devices.iter_mut().enumerate() {
        let streams = d.captures.forbidding(thread, mode);
        d.captures.invalidate(&streams);
        broken.extend(
            streams
                .into_iter()
                .map(|s| format!("stream {s:#x} of device {index}")),
        );
    }
    if broken.is_empty() {
        return Ok(());
    }
    Err(fail(
        call,
        CudaError::StreamCaptureUnsupported,
        device,
        format!(
            "not permitted during stream capture (this thread's mode: {mode:?}); invalidated the \
             capture on {}",
            broken.join(", ")
        ),
    ))
}

/// An event query or synchronize: of an event recorded inside a capture it is
/// `CUDA_ERROR_CAPTURED_EVENT`; of any other it is a potentially unsafe call.
pub(super) fn check_event_use(
    st: &mut State,
    call: Call,
    device: usize,
    event: Event,
) -> DriverResult<()> {
    if let Some(d) = st.devices.get(device) {
        if d.captures.is_captured_event(event.0) {
            return Err(fail(
                call,
                CudaError::CapturedEvent,
                device,
                format!("event {} was recorded inside a stream capture", event.0),
            ));
        }
    }
    check_unsafe_call(st, call, device)
}

/// A stream synchronize, or a synchronous copy (which waits for its stream): on a capturing stream
/// it breaks the capture in every mode (an invalidated one refuses it); on any other stream it is a
/// potentially unsafe call.
pub(super) fn check_stream_synchronize(
    st: &mut State,
    call: Call,
    device: usize,
    stream: Stream,
) -> DriverResult<()> {
    if let Some(d) = st.devices.get_mut(device) {
        if let Some(c) = d.captures.get(stream.0) {
            if c.invalidated {
                let (e, why) = invalidated(stream.0);
                return Err(fail(call, e, device, why));
            }
            d.captures.invalidate(&[stream.0]);
            return Err(fail(
                call,
                CudaError::StreamCaptureUnsupported,
                device,
                format!(
                    "stream {:#x} is capturing; invalidated its capture",
                    stream.0
                ),
            ));
        }
    }
    check_unsafe_call(st, call, device)
}

/// Whether work queued on `stream` is captured rather than run (an invalidated capture refuses
/// it).
pub(super) fn captured_work(
    st: &State,
    call: Call,
    device: usize,
    stream: Stream,
) -> DriverResult<bool> {
    match st
        .devices
        .get(device)
        .and_then(|d| d.captures.get(stream.0))
    {
        None => Ok(false),
        Some(c) if c.invalidated => {
            let (e, why) = invalidated(stream.0);
            Err(fail(call, e, device, why))
        }
        Some(_) => Ok(true),
    }
}
