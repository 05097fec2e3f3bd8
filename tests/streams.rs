//! Streams: memory freed on a stream is reused at once on that stream, but handed to another
//! stream, or unmapped, only after the work queued on the freeing stream (and on streams added
//! with `record_stream`) has finished. The simulated device keeps events recorded on a held
//! stream pending until the test releases it.

mod common;
use common::*;
use tessera::driver::{Call, Driver, Stream};
use tessera::{BlockStateInfo, Config};

const KIB: u64 = 1 << 10;
const A: Stream = Stream(1);
const B: Stream = Stream(2);

#[test]
fn a_block_freed_on_a_busy_stream_is_not_given_to_another_stream_nor_unmapped() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    sim.hold_stream(0, A);
    let x = alloc(&t, &mut tr, 4 * MIB, A).unwrap();
    free(&t, &mut tr, x);
    // B asks for the same size while the device has room: it gets new memory.
    let y = alloc(&t, &mut tr, 4 * MIB, B).unwrap();
    assert_ne!(y, x);
    assert!(y >= x + 4 * MIB || y + 4 * MIB <= x, "no overlap with x");
    // x's pages stay mapped: the work on A may still use them.
    assert_eq!(t.trim(0).unwrap(), 0);
    assert!(sim.is_mapped(0, x));
    assert!(sim.is_mapped(0, x + 4 * MIB - 1));
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 8 * MIB);
    // Another request on B, also a miss: still not x.
    let z = alloc(&t, &mut tr, 4 * MIB, B).unwrap();
    assert_ne!(z, x);
    assert_eq!(t.trim(0).unwrap(), 0);
    assert!(sim.is_mapped(0, x));
    free(&t, &mut tr, z);

    // A's work is done. B's own cached block z comes first, then x.
    sim.release_stream(0, A);
    let w = alloc(&t, &mut tr, 4 * MIB, B).unwrap();
    assert_eq!(w, z, "B's own cached block first");
    let v = alloc(&t, &mut tr, 4 * MIB, B).unwrap();
    assert_eq!(v, x, "A's block, now that A's work is done");
    for p in [v, w, y] {
        free(&t, &mut tr, p);
    }
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
    assert_eq!(sim.live_mappings(0), 0);
}

#[test]
fn once_the_stream_is_released_trim_and_empty_cache_release_its_pages() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    sim.hold_stream(0, A);
    let keep = alloc(&t, &mut tr, 2 * MIB, B).unwrap();
    let x = alloc(&t, &mut tr, 6 * MIB, A).unwrap();
    free(&t, &mut tr, x);
    assert_eq!(t.trim(0).unwrap(), 0, "A's work is not done");
    assert!(sim.is_mapped(0, x));
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 8 * MIB);
    sim.release_stream(0, A);
    assert_eq!(t.trim(0).unwrap(), 6 * MIB);
    assert!(!sim.is_mapped(0, x));
    assert!(sim.is_mapped(0, keep));
    assert_eq!(sim.bytes_in_use(0), 2 * MIB);

    // empty_cache waits for the stream itself (the simulated event completes when waited on).
    sim.hold_stream(0, A);
    let x = alloc(&t, &mut tr, 6 * MIB, A).unwrap();
    free(&t, &mut tr, x);
    assert_eq!(t.trim(0).unwrap(), 0);
    let syncs = sim.calls(Call::EventSynchronize);
    assert_eq!(t.empty_cache(0).unwrap(), 6 * MIB);
    assert!(
        sim.calls(Call::EventSynchronize) > syncs,
        "empty_cache waited"
    );
    assert!(!sim.is_mapped(0, x));
    tr.check();
    t.check_invariants(0).unwrap();
    sim.release_stream(0, A);
    free(&t, &mut tr, keep);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

#[test]
fn the_same_stream_reuses_at_once_even_while_busy() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    sim.hold_stream(0, A);
    for size in [4 * KIB, 100 * KIB, MIB, 3 * MIB, 20 * MIB] {
        let x = alloc(&t, &mut tr, size, A).unwrap();
        free(&t, &mut tr, x);
        let calls = sim.call_counts();
        let y = alloc(&t, &mut tr, size, A).unwrap();
        assert_eq!(y, x, "size {size}");
        assert_eq!(sim.call_counts(), calls, "a cache hit makes no driver call");
        free(&t, &mut tr, y);
    }
    sim.release_stream(0, A);
}

#[test]
fn a_full_device_waits_for_the_other_stream_instead_of_failing() {
    let (sim, t) = sim_alloc(16 * MIB, Config::default());
    let mut tr = Tracker::default();
    sim.hold_stream(0, A);
    let x = alloc(&t, &mut tr, 8 * MIB, A).unwrap();
    let keep = alloc(&t, &mut tr, 8 * MIB, B).unwrap();
    free(&t, &mut tr, x);
    // The device is full; the slow path waits for A's work, then hands x to B.
    let syncs = sim.calls(Call::EventSynchronize);
    let y = alloc(&t, &mut tr, 8 * MIB, B).unwrap();
    assert_eq!(y, x);
    assert!(sim.calls(Call::EventSynchronize) > syncs);
    assert_eq!(t.stats(0).unwrap().ooms, 0);
    for p in [y, keep] {
        free(&t, &mut tr, p);
    }
    sim.release_stream(0, A);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

#[test]
fn record_stream_holds_a_block_back_even_from_its_own_stream() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    for size in [4 * KIB, 3 * MIB] {
        let x = alloc(&t, &mut tr, size, A).unwrap();
        t.record_stream(x, B).unwrap();
        t.record_stream(x + 8, B).unwrap(); // an interior pointer names the same allocation
        t.check_invariants(0).unwrap();
        sim.hold_stream(0, B);
        free(&t, &mut tr, x);
        assert_eq!(t.allocation(x), None, "freed, even if not yet reusable");
        let pending = t
            .snapshot(0)
            .unwrap()
            .segments
            .iter()
            .flat_map(|s| s.blocks.iter())
            .any(|b| b.address == x && b.state == BlockStateInfo::PendingFree);
        assert!(pending, "the snapshot shows x waiting for B");
        assert_eq!(t.stats(0).unwrap().active_blocks, 0);
        // Not even A gets it while B's work is pending.
        let y = alloc(&t, &mut tr, size, A).unwrap();
        assert_ne!(y, x, "size {size}");
        assert_eq!(t.trim(0).unwrap(), 0);
        assert!(sim.is_mapped(0, x));
        // B's work is done: A gets it again (the small pool hands out its other free slots
        // first; the first miss settles the parked free).
        sim.release_stream(0, B);
        let mut got = vec![y];
        while !got.contains(&x) {
            assert!(got.len() < 1000, "size {size}: x is never reused");
            got.push(alloc(&t, &mut tr, size, A).unwrap());
        }
        if size > MIB {
            assert_eq!(got.len(), 2, "a large miss settles x and takes it");
        }
        for p in got {
            free(&t, &mut tr, p);
        }
        t.empty_cache(0).unwrap();
        assert_eq!(sim.bytes_in_use(0), 0, "size {size}");
    }
}

#[test]
fn a_recorded_block_freed_while_the_other_stream_is_idle_is_reused_at_once() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let x = alloc(&t, &mut tr, 3 * MIB, A).unwrap();
    t.record_stream(x, B).unwrap();
    t.record_stream(x, A).unwrap(); // its own stream: nothing to add
    free(&t, &mut tr, x);
    // B is not held: its event completes as soon as it is recorded, on the first miss.
    let y = alloc(&t, &mut tr, 3 * MIB, A).unwrap();
    assert_eq!(y, x);
    free(&t, &mut tr, y);
    // record_stream of a freed pointer is an error.
    assert!(t.record_stream(x, B).is_err());
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

#[test]
fn small_allocations_wait_for_the_stream_too() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    sim.hold_stream(0, A);
    let x = alloc(&t, &mut tr, 4 * KIB, A).unwrap();
    free(&t, &mut tr, x);
    // B gets a slot of its own granule, not x's.
    let y = alloc(&t, &mut tr, 4 * KIB, B).unwrap();
    assert_ne!(y, x);
    assert_ne!(y / (2 * MIB), x / (2 * MIB), "another granule");
    // x's granule is empty but A's work may still use it: it stays mapped.
    assert_eq!(t.trim(0).unwrap(), 0);
    assert!(sim.is_mapped(0, x));
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 4 * MIB);
    // A reuses its own slot at once.
    let calls = sim.call_counts();
    let z = alloc(&t, &mut tr, 4 * KIB, A).unwrap();
    assert_eq!(z, x);
    assert_eq!(sim.call_counts(), calls);
    free(&t, &mut tr, z);
    sim.release_stream(0, A);
    assert_eq!(t.trim(0).unwrap(), 2 * MIB, "x's granule goes back");
    assert!(!sim.is_mapped(0, x));
    assert!(sim.is_mapped(0, y));
    free(&t, &mut tr, y);
    assert_eq!(t.trim(0).unwrap(), 2 * MIB);
    assert_eq!(sim.bytes_in_use(0), 0);
}

#[test]
fn an_empty_granule_of_a_finished_stream_is_adopted_by_another() {
    // Device of 2 pages: one granule per stream at most, so B must adopt A's empty granule.
    let (sim, t) = sim_alloc(4 * MIB, Config::default());
    let mut tr = Tracker::default();
    let big = alloc(&t, &mut tr, 2 * MIB, Stream(9)).unwrap();
    sim.hold_stream(0, A);
    let x = alloc(&t, &mut tr, 4 * KIB, A).unwrap();
    free(&t, &mut tr, x);
    // The device is full; the OOM path waits for A, then B takes A's granule.
    let y = alloc(&t, &mut tr, 4 * KIB, B).unwrap();
    assert_eq!(y / (2 * MIB), x / (2 * MIB), "A's granule, adopted");
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 4 * MIB);
    sim.release_stream(0, A);
    for p in [y, big] {
        free(&t, &mut tr, p);
    }
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// A stream that never goes idle still settles: an event that has completed is not thrown away by
/// re-recording it for a newer free (the fence keeps the older event standing).
#[test]
fn memory_whose_work_finished_is_released_while_its_stream_is_busy_again() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let a = Stream(1);
    sim.hold_stream(0, a);
    let x = alloc(&t, &mut tr, 4 * MIB, a).unwrap();
    let spacer = alloc(&t, &mut tr, 4 * MIB, a).unwrap();
    let y = alloc(&t, &mut tr, 4 * MIB, a).unwrap();
    free(&t, &mut tr, x);
    // The work on x is still queued: nothing is released, an event now covers x's free.
    assert_eq!(t.trim(0).unwrap(), 0);
    // The GPU finishes that work, but the stream stays busy with new work; y is freed.
    sim.complete_stream(0, a);
    free(&t, &mut tr, y);
    // x's pages are done and go back; y's wait for the newer event.
    assert_eq!(t.trim(0).unwrap(), 4 * MIB);
    assert!(!sim.is_mapped(0, x));
    assert!(sim.is_mapped(0, y));
    sim.release_stream(0, a);
    free(&t, &mut tr, spacer);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}
