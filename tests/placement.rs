//! Where the bytes are, and where blocks go.
//!
//! `Tessera::breakdown`: every reserved byte counted once, in the field its cause names. Each case
//! builds a small, known layout and checks the figures byte for byte (the invariant check after
//! every operation, on in every test, also holds each breakdown's sum to the driver's bytes).
//! Lifetime placement: a request seen before goes next to the live block predicted to die with
//! it, where the best fit would put it elsewhere.

mod common;

use common::*;
use tessera::driver::Stream;
use tessera::{Backend, Breakdown, Config, MempoolId};

const KIB: u64 = 1 << 10;
const A: Stream = Stream(1);
const B: Stream = Stream(2);

fn at(t: &tessera::Tessera, stream: Option<Stream>) -> Breakdown {
    let b = t.breakdown(0, stream).unwrap();
    assert_eq!(b.total(), b.reserved_bytes, "{b:?}");
    assert_eq!(b.reserved_bytes, t.stats(0).unwrap().reserved_bytes);
    b
}

#[test]
fn small_slots_runs_and_units_of_one_granule() {
    let (_sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    // 1000 B: the 1 KiB class (exact after rounding), in a run of one 64 KiB unit (64 slots).
    // 9000 B: rounded to 9 KiB, the 10 KiB class, in a run of three units: 19 slots and a
    // 2 KiB tail.
    let x = alloc(&t, &mut tr, 1000, A).unwrap();
    let y = alloc(&t, &mut tr, 9000, A).unwrap();
    let b = at(&t, Some(A));
    assert_eq!(b.reserved_bytes, 2 * MIB, "one granule");
    assert_eq!(b.requested_bytes, 10_000);
    assert_eq!(b.rounding_bytes, 24 + 216);
    assert_eq!(b.class_bytes, KIB);
    assert_eq!(b.small_free_slot_bytes, 63 * KIB + 18 * 10 * KIB);
    assert_eq!(b.small_run_tail_bytes, 2 * KIB);
    assert_eq!(b.small_free_unit_bytes, (32 - 4) * 64 * KIB);
    assert_eq!(
        b.other_stream_bytes + b.large_free_bytes + b.free_page_bytes,
        0
    );

    // Seen from another stream, the granule's free space is A's.
    let other = at(&t, Some(B));
    assert_eq!(
        other.other_stream_bytes,
        b.small_free_slot_bytes + b.small_run_tail_bytes + b.small_free_unit_bytes
    );
    assert_eq!(other.small_free_slot_bytes, 0);

    // The 10 KiB run is the class's only one: kept idle when its slot goes.
    free(&t, &mut tr, y);
    let b = at(&t, None);
    assert_eq!(b.small_idle_run_bytes, 3 * 64 * KIB);
    // With nothing live, the whole granule is a free page.
    free(&t, &mut tr, x);
    let b = at(&t, None);
    assert_eq!(b.free_page_bytes, 2 * MIB);
    assert_eq!(b.total(), b.free_page_bytes);
}

#[test]
fn large_free_space_in_a_used_page_and_whole_free_pages() {
    for backend in [Backend::Vmm, Backend::Legacy] {
        let (_sim, t) = sim_alloc_backend(64 * MIB, backend);
        let mut tr = Tracker::default();
        // 3 MiB + 100 B: rounded up 412 B, on two pages; the second page's other 1 MiB - 512 B
        // is free but shares the page (legacy: the segment) with live data.
        let x = alloc(&t, &mut tr, 3 * MIB + 100, A).unwrap();
        let b = at(&t, Some(A));
        assert_eq!(b.reserved_bytes, 4 * MIB, "{backend:?}");
        assert_eq!(b.requested_bytes, 3 * MIB + 100);
        assert_eq!(b.rounding_bytes, 412);
        assert_eq!(b.class_bytes, 0);
        assert_eq!(b.large_free_bytes, MIB - 512, "{backend:?}");
        // For another stream the same bytes are A's to reuse first.
        let other = at(&t, Some(B));
        assert_eq!(
            (other.large_free_bytes, other.other_stream_bytes),
            (0, MIB - 512)
        );
        free(&t, &mut tr, x);
        let b = at(&t, Some(A));
        assert_eq!(b.free_page_bytes, 4 * MIB, "{backend:?}: fungible again");
        assert_eq!(b.requested_bytes + b.large_free_bytes, 0);
    }
}

#[test]
fn parked_frees_and_private_pools_are_counted_apart() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let x = alloc(&t, &mut tr, 3 * MIB, A).unwrap();
    t.record_stream(x, B).unwrap();
    sim.hold_stream(0, B);
    free(&t, &mut tr, x);
    let b = at(&t, Some(A));
    assert_eq!(b.parked_bytes, 3 * MIB);
    assert_eq!(
        b.large_free_bytes, MIB,
        "the rest of a page a parked block holds"
    );
    assert_eq!(b.requested_bytes, 0);
    sim.release_stream(0, B);
    t.empty_cache(0).unwrap();
    assert_eq!(at(&t, None).reserved_bytes, 0);

    // A private pool's free memory serves only it: counted apart, whole pages included.
    let id = MempoolId(1, 0);
    t.begin_allocate_to_pool(0, id, Box::new(|s| s == A))
        .unwrap();
    let y = alloc(&t, &mut tr, 3 * MIB, A).unwrap();
    let b = at(&t, Some(A));
    assert_eq!((b.requested_bytes, b.private_pool_bytes), (3 * MIB, MIB));
    free(&t, &mut tr, y);
    let b = at(&t, Some(A));
    assert_eq!(b.private_pool_bytes, 4 * MIB);
    assert_eq!(b.free_page_bytes, 0, "not fungible while the pool has uses");
    t.end_allocate_to_pool(0, id).unwrap();
    t.release_pool(0, id).unwrap();
    t.empty_cache(0).unwrap();
    assert_eq!(at(&t, None).reserved_bytes, 0);
}

#[test]
fn an_unknown_device_is_an_error() {
    let (_sim, t) = sim_alloc(64 * MIB, Config::default());
    assert!(t.breakdown(3, None).is_err());
}

/// One training-like step: two free gaps open up between live blocks, and a short-lived request
/// is placed. Returns (the request's address, the short-lived neighbour's end, the long-lived
/// neighbour's end).
fn step(t: &tessera::Tessera, tr: &mut Tracker) -> (u64, u64, u64) {
    let soon = alloc(t, tr, MIB, A).unwrap(); // freed right after the request
    let gap3 = alloc(t, tr, 3 * MIB, A).unwrap();
    let late = alloc(t, tr, MIB, A).unwrap(); // freed at the end of the step
    let gap2 = alloc(t, tr, 2 * MIB, A).unwrap();
    let fence = alloc(t, tr, MIB, A).unwrap();
    free(t, tr, gap3);
    free(t, tr, gap2);
    // The best fit is the 2 MiB gap, after `late`; the 3 MiB gap follows `soon`.
    let x = alloc(t, tr, 1536 * KIB, A).unwrap();
    free(t, tr, x);
    free(t, tr, soon);
    // Time passes (other requests) before the rest of the step is freed.
    for _ in 0..8 {
        let f = alloc(t, tr, 8 * MIB, A).unwrap();
        free(t, tr, f);
    }
    free(t, tr, late);
    free(t, tr, fence);
    (x, soon + MIB, late + MIB)
}

#[test]
fn lifetime_placement_puts_a_block_next_to_one_that_dies_with_it() {
    for placement in [tessera::Placement::Lifetime, tessera::Placement::BestFit] {
        let config = Config {
            placement,
            ..Config::default()
        };
        let (_sim, t) = sim_alloc(256 * MIB, config);
        let mut tr = Tracker::default();
        let base = alloc(&t, &mut tr, 4 * MIB, A).unwrap();
        // The first step teaches the lifetimes; nothing is known, so it is the best fit. (Its
        // first request follows `base`, the later steps' follow the step before: the second step
        // is the first whose every request was seen after the same two requests before it.)
        let (x, _, after_late) = step(&t, &mut tr);
        assert_eq!(x, after_late, "{placement:?}: step 1 is a best fit");
        step(&t, &mut tr);
        for _ in 0..2 {
            let (x, after_soon, after_late) = step(&t, &mut tr);
            match placement {
                tessera::Placement::Lifetime => assert_eq!(x, after_soon, "next to `soon`"),
                tessera::Placement::BestFit => assert_eq!(x, after_late, "the best fit"),
            }
        }
        free(&t, &mut tr, base);
        tr.check();
    }
}
