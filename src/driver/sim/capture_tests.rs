//! Stream capture on the simulated device: every rule of `CaptureMode` and the errors CUDA gives.

use super::*;
use crate::driver::CaptureStatus;

const G: u64 = 2 << 20;
const S: Stream = Stream(0x51);
const OTHER: Stream = Stream(0x52);

fn sim() -> SimDriver {
    SimDriver::new(SimConfig {
        capacity: 64 * G,
        devices: 2,
        backing: Backing::Real,
        ..SimConfig::default()
    })
}

fn code<T: fmt::Debug>(r: DriverResult<T>) -> CudaError {
    r.expect_err("call should fail").error
}

fn status(d: &SimDriver, stream: Stream) -> CaptureStatus {
    status_on(d, 0, stream)
}

fn status_on(d: &SimDriver, device: usize, stream: Stream) -> CaptureStatus {
    d.stream_capture_info(device, stream).unwrap().status
}

/// What a refused call must leave as it was. Read with no capture underway (it copies).
#[derive(Debug, PartialEq)]
struct Snapshot {
    free: u64,
    in_use: u64,
    /// Reservations, mappings, handles, legacy allocations, events, pending events.
    live: [usize; 6],
    /// Whether `va` is mapped and accessible, and its first bytes.
    mapped: bool,
    accessible: bool,
    data: [u8; 8],
}

fn snapshot(d: &SimDriver, va: u64) -> Snapshot {
    let mut data = [0u8; 8];
    if d.is_accessible(0, va) {
        d.copy_from_device(0, &mut data, va, OTHER).unwrap();
    }
    Snapshot {
        free: d.mem_info(0).unwrap().free,
        in_use: d.bytes_in_use(0),
        live: [
            d.live_reservations(0),
            d.live_mappings(0),
            d.live_handles(0),
            d.live_legacy(0),
            d.live_events(0),
            d.pending_events(0),
        ],
        mapped: d.is_mapped(0, va),
        accessible: d.is_accessible(0, va),
        data,
    }
}

/// A mapped, accessible granule (made outside any capture).
fn granule(d: &SimDriver) -> u64 {
    let va = d.reserve(0, G, 0).unwrap();
    let h = d.create_physical(0, G).unwrap();
    d.map(0, va, G, h).unwrap();
    d.set_access(0, va, G).unwrap();
    va
}

#[test]
fn begin_info_end() {
    let d = sim();
    assert_eq!(d.stream_capture_info(0, S).unwrap(), CaptureInfo::NONE);
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    let info = d.stream_capture_info(0, S).unwrap();
    assert!(info.is_capturing() && info.status == CaptureStatus::Active && info.id != 0);
    assert_eq!(status(&d, OTHER), CaptureStatus::None);
    assert_eq!(
        code(d.stream_begin_capture(0, S, CaptureMode::Global)),
        CudaError::IllegalState
    );
    d.stream_end_capture(0, S).unwrap();
    assert_eq!(status(&d, S), CaptureStatus::None);
    assert_eq!(code(d.stream_end_capture(0, S)), CudaError::IllegalState);
    assert_eq!(
        code(d.stream_begin_capture(0, Stream(0), CaptureMode::Global)),
        CudaError::StreamCaptureUnsupported
    );
    assert_eq!(
        code(d.stream_begin_capture(7, S, CaptureMode::Global)),
        CudaError::InvalidDevice
    );
    d.stream_begin_capture(0, S, CaptureMode::Relaxed).unwrap();
    let second = d.stream_capture_info(0, S).unwrap().id;
    assert!(second > info.id, "capture ids are not reused");
    d.stream_end_capture(0, S).unwrap();
}

#[test]
fn an_unsafe_call_in_global_capture_fails_invalidates_and_changes_nothing() {
    let d = sim();
    let va = granule(&d);
    let before = snapshot(&d, va);
    d.log_memory(true);
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    let err = d.create_physical(0, G).unwrap_err();
    assert_eq!(err.error, CudaError::StreamCaptureUnsupported);
    assert!(err
        .to_string()
        .contains("invalidated the capture on stream 0x51 of device 0"));
    assert_eq!(d.bytes_in_use(0), before.in_use);
    assert_eq!(d.mem_info(0).unwrap().free, before.free);
    assert_eq!(d.live_handles(0), before.live[2]);
    assert_eq!(status(&d, S), CaptureStatus::Invalidated);
    // Work added to the broken capture is refused; the capture can only be ended.
    let e = d.event_create(0).unwrap();
    assert_eq!(
        code(d.event_record(0, e, S)),
        CudaError::StreamCaptureInvalidated
    );
    assert_eq!(
        code(d.memset(0, va, 1, 16, S)),
        CudaError::StreamCaptureInvalidated
    );
    assert!(d.take_memory_log().is_empty());
    // Already broken: a second unsafe call is not refused for it.
    d.unmap(0, va, G).unwrap();
    assert_eq!(
        code(d.stream_end_capture(0, S)),
        CudaError::StreamCaptureInvalidated
    );
    assert_eq!(status(&d, S), CaptureStatus::None);
    d.create_physical(0, G).unwrap();
}

type UnsafeCall = dyn Fn(&SimDriver) -> DriverResult<()>;

#[test]
fn every_unsafe_call_is_refused_in_global_capture() {
    let d = sim();
    let va = granule(&d);
    let spare = d.create_physical(0, G).unwrap();
    let legacy = d.alloc_legacy(0, 4096).unwrap();
    let e = d.event_create(0).unwrap();
    d.event_record(0, e, OTHER).unwrap();
    let mut buf = [0u8; 8];
    let calls: Vec<(Call, Box<UnsafeCall>)> = vec![
        (
            Call::AllocLegacy,
            Box::new(|d| d.alloc_legacy(0, 4096).map(drop)),
        ),
        (
            Call::FreeLegacy,
            Box::new(move |d| d.free_legacy(0, legacy)),
        ),
        (Call::Reserve, Box::new(|d| d.reserve(0, G, 0).map(drop))),
        (
            Call::FreeReservation,
            Box::new(move |d| d.free_reservation(0, va, G)),
        ),
        (
            Call::CreatePhysical,
            Box::new(|d| d.create_physical(0, G).map(drop)),
        ),
        (
            Call::ReleasePhysical,
            Box::new(move |d| d.release_physical(0, spare)),
        ),
        (Call::Map, Box::new(move |d| d.map(0, va, G, spare))),
        (Call::Unmap, Box::new(move |d| d.unmap(0, va, G))),
        (Call::SetAccess, Box::new(move |d| d.set_access(0, va, G))),
        (
            Call::EventQuery,
            Box::new(move |d| d.event_query(0, e).map(drop)),
        ),
        (
            Call::EventSynchronize,
            Box::new(move |d| d.event_synchronize(0, e)),
        ),
        (
            Call::StreamSynchronize,
            Box::new(|d| d.stream_synchronize(0, OTHER)),
        ),
        (
            Call::DeviceSynchronize,
            Box::new(|d| d.device_synchronize(0)),
        ),
        (
            Call::CopyToDevice,
            Box::new(move |d| d.copy_to_device(0, va, &[1; 8], OTHER)),
        ),
        (
            Call::CopyFromDevice,
            Box::new(move |d| d.copy_from_device(0, &mut [0; 8], va, OTHER)),
        ),
    ];
    let before = snapshot(&d, va);
    d.log_memory(true);
    for (call, f) in &calls {
        d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
        let err = f(&d).unwrap_err();
        assert_eq!(
            (err.call, err.error),
            (*call, CudaError::StreamCaptureUnsupported)
        );
        assert_eq!(status(&d, S), CaptureStatus::Invalidated, "{call}");
        let _ = d.stream_end_capture(0, S);
        assert_eq!(snapshot(&d, va), before, "{call} changed something");
        assert!(d.take_memory_log().is_empty(), "{call} logged memory");
    }
    d.log_memory(false);
    // Safe during a capture: creating, recording and waiting for events, asking for memory info.
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    let e2 = d.event_create(0).unwrap();
    d.event_record(0, e2, S).unwrap();
    d.stream_wait_event(0, OTHER, e2).unwrap();
    d.mem_info(0).unwrap();
    d.granularity(0).unwrap();
    d.event_destroy(0, e2).unwrap();
    assert_eq!(status(&d, S), CaptureStatus::Active);
    d.stream_end_capture(0, S).unwrap();
    // And nothing above was changed by the refused calls.
    d.copy_from_device(0, &mut buf, va, OTHER).unwrap();
    d.free_legacy(0, legacy).unwrap();
}

#[test]
fn relaxed_thread_mode_may_allocate_during_a_global_capture() {
    let d = sim();
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    assert_eq!(
        d.exchange_capture_mode(CaptureMode::Relaxed).unwrap(),
        CaptureMode::Global
    );
    let va = d.reserve(0, G, 0).unwrap();
    let h = d.create_physical(0, G).unwrap();
    d.map(0, va, G, h).unwrap();
    d.set_access(0, va, G).unwrap();
    d.alloc_legacy(0, 4096).unwrap();
    assert_eq!(
        d.exchange_capture_mode(CaptureMode::Global).unwrap(),
        CaptureMode::Relaxed
    );
    assert_eq!(status(&d, S), CaptureStatus::Active);
    // Synchronizing the capturing stream is refused in every mode.
    d.exchange_capture_mode(CaptureMode::Relaxed).unwrap();
    assert_eq!(
        code(d.stream_synchronize(0, S)),
        CudaError::StreamCaptureUnsupported
    );
    d.exchange_capture_mode(CaptureMode::Global).unwrap();
    assert_eq!(status(&d, S), CaptureStatus::Invalidated);
    assert_eq!(
        code(d.stream_end_capture(0, S)),
        CudaError::StreamCaptureInvalidated
    );
}

#[test]
fn other_threads_follow_the_capture_modes() {
    let d = std::sync::Arc::new(sim());
    let other = |f: fn(&SimDriver) -> DriverResult<PhysHandle>| {
        let d = d.clone();
        std::thread::spawn(move || f(&d)).join().unwrap()
    };
    let create = |d: &SimDriver| d.create_physical(0, G);
    let relaxed_create = |d: &SimDriver| {
        d.exchange_capture_mode(CaptureMode::Relaxed)?;
        d.create_physical(0, G)
    };
    // A global capture forbids every thread in global mode, on every device.
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    assert_eq!(code(other(create)), CudaError::StreamCaptureUnsupported);
    assert_eq!(status(&d, S), CaptureStatus::Invalidated);
    let _ = d.stream_end_capture(0, S);
    d.stream_begin_capture(1, S, CaptureMode::Global).unwrap();
    assert_eq!(
        code(d.create_physical(0, G)),
        CudaError::StreamCaptureUnsupported
    );
    assert_eq!(status_on(&d, 1, S), CaptureStatus::Invalidated);
    assert_eq!(
        code(d.stream_end_capture(1, S)),
        CudaError::StreamCaptureInvalidated
    );
    // A thread in relaxed mode is free.
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    other(relaxed_create).unwrap();
    assert_eq!(status(&d, S), CaptureStatus::Active);
    d.stream_end_capture(0, S).unwrap();
    // A thread-local capture forbids its own thread only.
    d.stream_begin_capture(0, S, CaptureMode::ThreadLocal)
        .unwrap();
    other(create).unwrap();
    assert_eq!(status(&d, S), CaptureStatus::Active);
    assert_eq!(
        code(d.create_physical(0, G)),
        CudaError::StreamCaptureUnsupported
    );
    let _ = d.stream_end_capture(0, S);
    // A thread in thread-local mode ignores other threads' global captures.
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    other(|d| {
        d.exchange_capture_mode(CaptureMode::ThreadLocal)?;
        d.create_physical(0, G)
    })
    .unwrap();
    assert_eq!(status(&d, S), CaptureStatus::Active);
    d.stream_end_capture(0, S).unwrap();
    // A relaxed capture forbids nothing.
    d.stream_begin_capture(0, S, CaptureMode::Relaxed).unwrap();
    d.create_physical(0, G).unwrap();
    other(create).unwrap();
    assert_eq!(status(&d, S), CaptureStatus::Active);
    d.stream_end_capture(0, S).unwrap();
}

#[test]
fn global_and_thread_local_captures_end_on_their_own_thread() {
    let d = std::sync::Arc::new(sim());
    for mode in [
        CaptureMode::Global,
        CaptureMode::ThreadLocal,
        CaptureMode::Relaxed,
    ] {
        d.stream_begin_capture(0, S, mode).unwrap();
        let dd = d.clone();
        let ended = std::thread::spawn(move || dd.stream_end_capture(0, S))
            .join()
            .unwrap();
        if mode == CaptureMode::Relaxed {
            ended.unwrap();
        } else {
            assert_eq!(code(ended), CudaError::StreamCaptureWrongThread);
            assert_eq!(status(&d, S), CaptureStatus::Active, "{mode:?} goes on");
            d.stream_end_capture(0, S).unwrap();
        }
    }
}

#[test]
fn an_event_recorded_inside_a_capture_cannot_be_queried_until_recorded_outside() {
    let d = sim();
    let e = d.event_create(0).unwrap();
    d.stream_begin_capture(0, S, CaptureMode::Relaxed).unwrap();
    d.event_record(0, e, S).unwrap();
    assert_eq!(code(d.event_query(0, e)), CudaError::CapturedEvent);
    assert_eq!(code(d.event_synchronize(0, e)), CudaError::CapturedEvent);
    assert_eq!(status(&d, S), CaptureStatus::Active);
    d.stream_end_capture(0, S).unwrap();
    assert_eq!(code(d.event_query(0, e)), CudaError::CapturedEvent);
    d.event_record(0, e, OTHER).unwrap();
    assert!(d.event_query(0, e).unwrap());
}

#[test]
fn work_on_a_capturing_stream_is_recorded_not_run() {
    let d = sim();
    let va = granule(&d);
    d.memset(0, va, 7, 64, OTHER).unwrap();
    d.stream_begin_capture(0, S, CaptureMode::Relaxed).unwrap();
    d.memset(0, va, 9, 64, S).unwrap();
    d.stream_end_capture(0, S).unwrap();
    let mut buf = [0u8; 64];
    d.copy_from_device(0, &mut buf, va, OTHER).unwrap();
    assert_eq!(buf, [7; 64]);
}

#[test]
fn thread_modes_and_capture_calls_are_counted_and_faultable() {
    let d = sim();
    d.fail_nth(Call::StreamBeginCapture, 1);
    assert_eq!(
        code(d.stream_begin_capture(0, S, CaptureMode::Global)),
        CudaError::Unknown
    );
    assert_eq!(status(&d, S), CaptureStatus::None);
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    d.stream_end_capture(0, S).unwrap();
    assert_eq!(d.calls(Call::StreamBeginCapture), 2);
    assert_eq!(d.calls(Call::StreamEndCapture), 1);
    assert!(d.calls(Call::StreamGetCaptureInfo) >= 1);
    // A thread back in global mode leaves the table.
    d.exchange_capture_mode(CaptureMode::Relaxed).unwrap();
    d.exchange_capture_mode(CaptureMode::Global).unwrap();
    assert!(d.state.lock().thread_modes.is_empty());
}

#[test]
fn a_refused_map_makes_no_mapping_and_a_refused_copy_writes_nothing() {
    let d = sim();
    let va = granule(&d);
    d.copy_to_device(0, va, &[7; 8], OTHER).unwrap();
    let fresh = d.reserve(0, G, 0).unwrap();
    let h = d.create_physical(0, G).unwrap();
    let before = snapshot(&d, fresh);
    d.log_memory(true);
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    assert_eq!(
        code(d.map(0, fresh, G, h)),
        CudaError::StreamCaptureUnsupported
    );
    assert!(!d.is_mapped(0, fresh));
    assert_eq!(
        code(d.stream_end_capture(0, S)),
        CudaError::StreamCaptureInvalidated
    );
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    assert_eq!(
        code(d.copy_to_device(0, va, &[9; 8], OTHER)),
        CudaError::StreamCaptureUnsupported
    );
    let _ = d.stream_end_capture(0, S);
    assert_eq!(snapshot(&d, fresh), before);
    assert!(d.take_memory_log().is_empty());
    let mut buf = [0u8; 8];
    d.copy_from_device(0, &mut buf, va, OTHER).unwrap();
    assert_eq!(buf, [7; 8], "the refused copy wrote nothing");
    // The refused map's arguments were good: outside a capture it is made.
    d.map(0, fresh, G, h).unwrap();
    assert!(d.is_mapped(0, fresh));
    assert_eq!(d.live_mappings(0), before.live[1] + 1);
}

#[test]
fn the_capture_is_checked_before_the_arguments() {
    let d = sim();
    const NOWHERE: u64 = 0x7000_0000_0000;
    // A forbidden call with a bad argument is refused for the capture, and breaks it.
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    assert_eq!(
        code(d.unmap(0, NOWHERE, G)),
        CudaError::StreamCaptureUnsupported
    );
    assert_eq!(status(&d, S), CaptureStatus::Invalidated);
    let _ = d.stream_end_capture(0, S);
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    assert_eq!(
        code(d.free_legacy(0, NOWHERE)),
        CudaError::StreamCaptureUnsupported
    );
    assert_eq!(status(&d, S), CaptureStatus::Invalidated);
    // Work added to the broken capture is refused for it, whatever its arguments.
    let unknown = Event(999_999);
    assert_eq!(
        code(d.event_record(0, unknown, S)),
        CudaError::StreamCaptureInvalidated
    );
    assert_eq!(
        code(d.stream_wait_event(0, S, unknown)),
        CudaError::StreamCaptureInvalidated
    );
    assert_eq!(
        code(d.memset(0, NOWHERE, 0, 64, S)),
        CudaError::StreamCaptureInvalidated
    );
    assert_eq!(
        code(d.copy_to_device(0, NOWHERE, &[0; 8], S)),
        CudaError::StreamCaptureInvalidated
    );
    let _ = d.stream_end_capture(0, S);
    // Outside a capture the same calls fail on their arguments.
    assert_eq!(code(d.unmap(0, NOWHERE, G)), CudaError::InvalidValue);
    assert_eq!(code(d.free_legacy(0, NOWHERE)), CudaError::InvalidValue);
    assert_eq!(
        code(d.event_record(0, unknown, S)),
        CudaError::InvalidHandle
    );
    assert_eq!(
        code(d.memset(0, NOWHERE, 0, 64, S)),
        CudaError::IllegalAddress
    );
    // The exception: a bad device fails as such and breaks nothing.
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    assert_eq!(code(d.create_physical(7, G)), CudaError::InvalidDevice);
    assert_eq!(status(&d, S), CaptureStatus::Active);
    d.stream_end_capture(0, S).unwrap();
}

#[test]
fn one_unsafe_call_breaks_every_capture_that_forbids_it() {
    let d = sim();
    let relaxed = Stream(0x53);
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    d.stream_begin_capture(0, OTHER, CaptureMode::Global)
        .unwrap();
    d.stream_begin_capture(1, S, CaptureMode::Global).unwrap();
    d.stream_begin_capture(0, relaxed, CaptureMode::Relaxed)
        .unwrap();
    let err = d.create_physical(0, G).unwrap_err();
    assert_eq!(err.error, CudaError::StreamCaptureUnsupported);
    assert!(
        err.to_string().contains(
            "invalidated the capture on stream 0x51 of device 0, stream 0x52 of device 0, \
             stream 0x51 of device 1"
        ),
        "{err}"
    );
    for (device, stream) in [(0, S), (0, OTHER), (1, S)] {
        assert_eq!(status_on(&d, device, stream), CaptureStatus::Invalidated);
        assert_eq!(
            code(d.stream_end_capture(device, stream)),
            CudaError::StreamCaptureInvalidated
        );
    }
    assert_eq!(status(&d, relaxed), CaptureStatus::Active);
    d.stream_end_capture(0, relaxed).unwrap();
}

#[test]
fn a_thread_local_thread_is_still_bound_by_its_own_captures() {
    let d = sim();
    d.exchange_capture_mode(CaptureMode::ThreadLocal).unwrap();
    for (device, mode) in [
        (0, CaptureMode::Global),
        (1, CaptureMode::Global),
        (0, CaptureMode::ThreadLocal),
    ] {
        d.stream_begin_capture(device, S, mode).unwrap();
        assert_eq!(
            code(d.create_physical(0, G)),
            CudaError::StreamCaptureUnsupported,
            "{mode:?} capture on device {device}"
        );
        assert_eq!(status_on(&d, device, S), CaptureStatus::Invalidated);
        assert_eq!(
            code(d.stream_end_capture(device, S)),
            CudaError::StreamCaptureInvalidated
        );
    }
    // Its own relaxed capture forbids nothing.
    d.stream_begin_capture(0, S, CaptureMode::Relaxed).unwrap();
    d.create_physical(0, G).unwrap();
    d.stream_end_capture(0, S).unwrap();
    d.exchange_capture_mode(CaptureMode::Global).unwrap();
}

#[test]
fn a_synchronous_copy_on_a_capturing_stream_breaks_it_in_every_mode() {
    let d = sim();
    let va = granule(&d);
    d.copy_to_device(0, va, &[7; 8], OTHER).unwrap();
    let modes = [
        CaptureMode::Global,
        CaptureMode::ThreadLocal,
        CaptureMode::Relaxed,
    ];
    let mut buf = [0u8; 8];
    for (i, (capture_mode, thread_mode)) in modes
        .iter()
        .flat_map(|&c| modes.iter().map(move |&t| (c, t)))
        .enumerate()
    {
        let what = format!("{capture_mode:?} capture, {thread_mode:?} thread");
        d.stream_begin_capture(0, S, capture_mode).unwrap();
        d.exchange_capture_mode(thread_mode).unwrap();
        // The first copy breaks the capture, the second is refused by the broken one.
        let to = |d: &SimDriver| d.copy_to_device(0, va, &[9; 8], S);
        let mut from = |d: &SimDriver| d.copy_from_device(0, &mut buf, va, S);
        let (first, second) = if i % 2 == 0 {
            (to(&d), from(&d))
        } else {
            (from(&d), to(&d))
        };
        assert_eq!(code(first), CudaError::StreamCaptureUnsupported, "{what}");
        assert_eq!(code(second), CudaError::StreamCaptureInvalidated, "{what}");
        d.exchange_capture_mode(CaptureMode::Global).unwrap();
        assert_eq!(status(&d, S), CaptureStatus::Invalidated, "{what}");
        assert_eq!(
            code(d.stream_end_capture(0, S)),
            CudaError::StreamCaptureInvalidated
        );
    }
    d.copy_from_device(0, &mut buf, va, S).unwrap();
    assert_eq!(buf, [7; 8], "no refused copy wrote anything");
    // On another stream a copy is a potentially unsafe call: a relaxed capture allows it.
    d.stream_begin_capture(0, S, CaptureMode::Relaxed).unwrap();
    d.copy_to_device(0, va, &[5; 8], OTHER).unwrap();
    d.copy_from_device(0, &mut buf, va, OTHER).unwrap();
    assert_eq!(buf, [5; 8]);
    assert_eq!(status(&d, S), CaptureStatus::Active);
    d.stream_end_capture(0, S).unwrap();
}

#[test]
fn a_wait_on_a_capturing_stream_is_captured_and_an_invalidated_one_refuses_it() {
    let d = sim();
    let e = d.event_create(0).unwrap();
    d.event_record(0, e, OTHER).unwrap();
    d.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    d.stream_wait_event(0, S, e).unwrap();
    assert_eq!(status(&d, S), CaptureStatus::Active);
    assert_eq!(
        code(d.create_physical(0, G)),
        CudaError::StreamCaptureUnsupported
    );
    assert_eq!(
        code(d.stream_wait_event(0, S, e)),
        CudaError::StreamCaptureInvalidated
    );
    // A wait on a stream that is not capturing is unaffected.
    d.stream_wait_event(0, OTHER, e).unwrap();
    assert_eq!(
        code(d.stream_end_capture(0, S)),
        CudaError::StreamCaptureInvalidated
    );
    d.stream_wait_event(0, S, e).unwrap();
}
