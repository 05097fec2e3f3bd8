//! Each slow-path helper, called on its own during a capture, makes no call the capture forbids
//! (the integration tests in `tests/graphs.rs` check the paths that combine them).

use super::*;
use crate::driver::sim::SimDriver;
use crate::driver::{CaptureMode, Driver};
use crate::hooks::Hooks;

const MIB: u64 = 1 << 20;
const S: Stream = Stream(7);

#[test]
fn every_helper_that_could_break_a_capture_does_nothing_during_one() {
    let sim = Arc::new(SimDriver::with_capacity(64 * MIB));
    // The device's own helpers, below the thread caches (which a capture bypasses anyway).
    let config = Config {
        check_invariants: true,
        thread_cache: 0,
        ..Config::default()
    };
    let captures = Arc::new(AtomicUsize::new(0));
    let d = DeviceAllocator::new(
        0,
        sim.clone(),
        &config,
        Arc::new(AddressMap::default()),
        Arc::new(Hooks::default()),
        captures,
    )
    .unwrap();
    let x = d.allocate(16 * MIB, S).unwrap();
    let y = d.allocate(8 * MIB, S).unwrap();
    d.free(x).unwrap();
    d.record_stream(y, Stream(9));
    d.free(y).unwrap();
    let mut st = d.state.lock();
    // Before the capture: S's work is known to be done and one page sits in the page pool, so
    // that every helper below has something it would unmap, release, record or query.
    st.refresh_fences();
    let mut page = Vec::new();
    st.unmap_free_pages(Some(1), None, &mut page).unwrap();
    assert_eq!(page.len(), 1);
    st.pages.pool.extend(page);
    let reserved = st.reserved();
    st.begin_pool(MempoolId(1, 0), Box::new(|s| s == S))
        .unwrap();
    sim.stream_begin_capture(0, S, CaptureMode::Global).unwrap();
    let calls = sim.call_counts();

    assert_eq!(st.release_cache().unwrap(), 0);
    let mut out = Vec::new();
    st.unmap_free_pages(None, None, &mut out).unwrap();
    assert!(out.is_empty());
    st.wait_for_streams().unwrap();
    st.settle_pending(true).unwrap();
    st.refresh_fences();
    st.request_all_fences();
    st.compact().unwrap();
    let seq = st.seq;
    st.park(0x1000, false, vec![Stream(10)], seq);
    st.pending.remove(&0x1000);

    assert_eq!(sim.call_counts(), calls, "no driver call at all");
    assert_eq!(st.reserved(), reserved);
    assert_eq!(st.pending.len(), 1, "the record_stream free still waits");
    sim.stream_end_capture(0, S).unwrap();
    st.end_pool(MempoolId(1, 0)).unwrap();
    // After the capture the same helpers work again.
    st.settle_pending(true).unwrap();
    assert!(st.pending.is_empty());
    assert!(st.release_cache().unwrap() > 0);
    st.checked();
}

impl DeviceAllocator {
    fn record_stream(&self, ptr: DevicePtr, stream: Stream) {
        self.state.lock().record_stream(ptr, stream).unwrap();
    }
}
