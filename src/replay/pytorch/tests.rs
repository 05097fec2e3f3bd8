//! Known-answer tests of the PyTorch rules, on a bookkeeping-only simulated device.
//!
//! Every expected figure is worked out by hand from the rules in `docs/policies.md`; the comment
//! beside each says how. Invariants are checked after every mutation (`set_check(true)`).

use super::{PytorchAllocator, Rules};
use crate::driver::sim::{Backing, SimConfig, SimDriver};
use crate::driver::{Call, CudaError, DevicePtr, Driver, Stream};
use crate::error::Error;
use crate::sync::Arc;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const S0: Stream = Stream::DEFAULT;
const S1: Stream = Stream(1);
const S2: Stream = Stream(2);

fn sim(capacity: u64) -> Arc<SimDriver> {
    Arc::new(SimDriver::new(SimConfig {
        capacity,
        backing: Backing::Bookkeeping,
        ..SimConfig::default()
    }))
}

fn new(rules: Rules, drv: &Arc<SimDriver>) -> PytorchAllocator {
    let mut a = PytorchAllocator::new(drv.clone(), 0, rules).expect("allocator");
    a.set_check(true);
    a
}

fn native(capacity: u64) -> (Arc<SimDriver>, PytorchAllocator) {
    let drv = sim(capacity);
    let a = new(Rules::Native, &drv);
    (drv, a)
}

fn expandable(capacity: u64) -> (Arc<SimDriver>, PytorchAllocator) {
    let drv = sim(capacity);
    let a = new(Rules::Expandable, &drv);
    (drv, a)
}

fn driver_call(e: &Error) -> Option<Call> {
    match e {
        Error::Driver(d) => Some(d.call),
        _ => None,
    }
}

/// Call counts of every kind but `cuMemGetInfo` (which an OOM report reads).
fn memory_calls(drv: &SimDriver) -> Vec<(Call, u64)> {
    let mut counts = drv.call_counts();
    counts.retain(|&(c, _)| c != Call::MemInfo);
    counts
}

/// The whole device is free again once the allocator is gone.
fn assert_all_returned(drv: &SimDriver) {
    assert_eq!(drv.bytes_in_use(0), 0);
    assert_eq!(drv.live_legacy(0), 0);
    assert_eq!(drv.live_handles(0), 0);
    assert_eq!(drv.live_mappings(0), 0);
    assert_eq!(drv.live_reservations(0), 0);
}

// ---- Native ----

#[test]
fn native_segment_sizes_and_block_sizes() {
    // (request, segment reserved, allocated block): round_size to 512 B, get_allocation_size
    // for the segment, should_split for the block (large: split only if more than 1 MiB remains).
    let cases = [
        (100, 2 * MIB, 512),            // small: 2 MiB segment
        (MIB, 2 * MIB, MIB),            // 1 MiB is still small
        (MIB + 1, 20 * MIB, MIB + 512), // large under 10 MiB: 20 MiB
        (2 * MIB, 20 * MIB, 2 * MIB),   //
        (10 * MIB - 512, 20 * MIB, 10 * MIB - 512),
        (10 * MIB - 1, 10 * MIB, 10 * MIB), // rounds to 10 MiB: 10 MiB and up are rounded to 2 MiB
        (10 * MIB, 10 * MIB, 10 * MIB),
        (12 * MIB, 12 * MIB, 12 * MIB),
        (13 * MIB, 14 * MIB, 14 * MIB), // 1 MiB left: not split, the block is 14 MiB
        (13 * MIB + 1, 14 * MIB, 14 * MIB),
        (13 * MIB - 512, 14 * MIB, 13 * MIB - 512), // 1 MiB + 512 left: split
    ];
    for (request, reserved, allocated) in cases {
        let (drv, mut a) = native(GIB);
        a.allocate(request, S0).unwrap();
        assert_eq!(a.reserved_bytes(), reserved, "request {request}");
        assert_eq!(a.allocated_bytes(), allocated, "request {request}");
        assert_eq!(drv.bytes_in_use(0), reserved);
        assert_eq!(drv.calls(Call::AllocLegacy), 1);
    }
}

#[test]
fn native_pools_do_not_share() {
    let (drv, mut a) = native(GIB);
    let s = a.allocate(512, S0).unwrap();
    a.free(s).unwrap(); // a whole free 2 MiB small segment stays cached
    let l = a.allocate(MIB + 512, S0).unwrap(); // large: its own 20 MiB segment
    assert_eq!(a.reserved_bytes(), 22 * MIB);
    a.free(l).unwrap(); // a whole free 20 MiB large segment
    assert_eq!(a.allocate(100, S0).unwrap(), s); // small reuses the small segment
    a.allocate(MIB, S0).unwrap(); // 2 MiB - 512 left there: fits
    assert_eq!(a.reserved_bytes(), 22 * MIB);
    // 1 MiB - 512 left in the small segment: a new 2 MiB one, though 20 MiB of large is free.
    a.allocate(MIB, S0).unwrap();
    assert_eq!(a.reserved_bytes(), 24 * MIB);
    assert_eq!(drv.calls(Call::AllocLegacy), 3);
}

#[test]
fn native_streams_do_not_share() {
    let (drv, mut a) = native(GIB);
    let p = a.allocate(100, S1).unwrap();
    a.free(p).unwrap();
    a.allocate(100, S2).unwrap(); // S1's free segment is not S2's
    assert_eq!(a.reserved_bytes(), 4 * MIB);
    assert_eq!(a.allocate(100, S1).unwrap(), p); // S1 reuses its own
    assert_eq!(a.reserved_bytes(), 4 * MIB);
    assert_eq!(drv.calls(Call::AllocLegacy), 2);
}

#[test]
fn native_large_split_threshold() {
    let (drv, mut a) = native(GIB);
    // 19 MiB: a 20 MiB segment, 1 MiB left: not split (needs more than 1 MiB).
    let p = a.allocate(19 * MIB, S0).unwrap();
    assert_eq!(a.allocated_bytes(), 20 * MIB);
    a.free(p).unwrap();
    // 19 MiB - 512: 1 MiB + 512 left: split, and the rest serves a 1 MiB + 512 request.
    assert_eq!(a.allocate(19 * MIB - 512, S0).unwrap(), p);
    assert_eq!(a.allocated_bytes(), 19 * MIB - 512);
    assert_eq!(a.allocate(MIB + 512, S0).unwrap(), p + 19 * MIB - 512);
    assert_eq!(a.allocated_bytes(), 20 * MIB);
    assert_eq!(a.reserved_bytes(), 20 * MIB);
    assert_eq!(drv.calls(Call::AllocLegacy), 1);
}

#[test]
fn native_small_split_threshold() {
    let (drv, mut a) = native(GIB);
    // One 2 MiB small segment: 1 MiB (1 MiB left), 1 MiB - 512 (512 left: split), 512 (exact).
    let p1 = a.allocate(MIB, S0).unwrap();
    let p2 = a.allocate(MIB - 512, S0).unwrap();
    let p3 = a.allocate(512, S0).unwrap();
    assert_eq!((p2, p3), (p1 + MIB, p1 + 2 * MIB - 512));
    assert_eq!(a.allocated_bytes(), 2 * MIB);
    assert_eq!(a.reserved_bytes(), 2 * MIB);
    assert_eq!(drv.calls(Call::AllocLegacy), 1);
}

#[test]
fn native_merge_on_free() {
    let (drv, mut a) = native(GIB);
    // Three 2 MiB blocks in one 20 MiB segment: [0,2) [2,4) [4,6), 14 MiB free after.
    let x = a.allocate(2 * MIB, S0).unwrap();
    let y = a.allocate(2 * MIB, S0).unwrap();
    let z = a.allocate(2 * MIB, S0).unwrap();
    assert_eq!((y, z), (x + 2 * MIB, x + 4 * MIB));
    a.free(x).unwrap();
    a.free(z).unwrap(); // merges with the 14 MiB after it: 16 MiB at x + 4 MiB
    let w = a.allocate(16 * MIB, S0).unwrap();
    assert_eq!(w, x + 4 * MIB);
    a.free(w).unwrap();
    a.free(y).unwrap(); // [0,2) + [2,4) + [4,20): the whole segment again
    assert_eq!(a.allocate(20 * MIB, S0).unwrap(), x);
    assert_eq!(a.reserved_bytes(), 20 * MIB);
    assert_eq!(drv.calls(Call::AllocLegacy), 1);
}

#[test]
fn native_never_merges_across_segments() {
    let (drv, mut a) = native(GIB);
    let p = a.allocate(12 * MIB, S0).unwrap();
    let q = a.allocate(12 * MIB, S0).unwrap();
    // The simulated driver places the two segments back to back: adjacent, yet apart.
    assert_eq!(q, p + 12 * MIB);
    a.free(p).unwrap();
    a.free(q).unwrap();
    let r = a.allocate(24 * MIB, S0).unwrap();
    assert!(r != p && r != q);
    assert_eq!(a.reserved_bytes(), 48 * MIB);
    assert_eq!(drv.calls(Call::AllocLegacy), 3);
}

#[test]
fn native_oom_fallback_releases_whole_segments() {
    let (drv, mut a) = native(64 * MIB);
    let big: Vec<DevicePtr> = (0..4).map(|_| a.allocate(12 * MIB, S0).unwrap()).collect();
    let s = a.allocate(100, S1).unwrap();
    a.free(s).unwrap(); // a cached 2 MiB small segment, on another stream
    for &p in &big[..3] {
        a.free(p).unwrap(); // three cached 12 MiB segments
    }
    assert_eq!(a.reserved_bytes(), 50 * MIB);
    // 40 MiB: no free block fits; cuMemAlloc(40 MiB) fails (50 + 40 > 64); every wholly free
    // segment goes (3 x 12 + 2 = 38 MiB, both pools, every stream); the retry fits (12 + 40).
    let p = a.allocate(40 * MIB, S0).unwrap();
    assert_eq!(a.reserved_bytes(), 52 * MIB);
    assert_eq!(drv.calls(Call::FreeLegacy), 4);
    assert_eq!(drv.calls(Call::AllocLegacy), 5 + 2);
    // 16 MiB more cannot fit (52 + 16 > 64) and nothing is cached: out of memory.
    let e = a.allocate(16 * MIB, S0).unwrap_err();
    let Error::OutOfMemory(r) = &e else {
        panic!("expected OOM, got {e}")
    };
    assert_eq!(
        (r.requested, r.capacity, r.device_free),
        (16 * MIB, 64 * MIB, Some(12 * MIB))
    );
    assert_eq!(
        (r.reserved, r.allocated, r.cached_free),
        (52 * MIB, 52 * MIB, 0)
    );
    assert_eq!((r.largest_free, r.stranded, r.remapping), (0, 0, false));
    assert!(r.driver_error.as_deref().unwrap().contains("cuMemAlloc"));
    assert_eq!(a.reserved_bytes(), 52 * MIB);
    // empty_cache gives back exactly the segment freed since.
    a.free(p).unwrap();
    assert_eq!(a.empty_cache().unwrap(), 40 * MIB);
    assert_eq!(a.reserved_bytes(), 12 * MIB);
}

/// Ten rounds of: a 20 MiB temporary, freed, then a long-lived 10 MiB + 512 B allocation, which
/// the best fit puts in the temporary's memory. Returns (peak live bytes, peak reserved bytes),
/// or the round and error of the first failure.
fn pinning_rounds(a: &mut PytorchAllocator) -> Result<(u64, u64), (usize, Error)> {
    let (mut live, mut peak_live, mut peak_reserved) = (0, 0, 0);
    for round in 0..10 {
        let t = a.allocate(20 * MIB, S0).map_err(|e| (round, e))?;
        peak_live = peak_live.max(live + 20 * MIB);
        peak_reserved = peak_reserved.max(a.reserved_bytes());
        a.free(t).unwrap();
        a.allocate(10 * MIB + 512, S0).map_err(|e| (round, e))?;
        live += 10 * MIB + 512;
        peak_live = peak_live.max(live);
        peak_reserved = peak_reserved.max(a.reserved_bytes());
    }
    Ok((peak_live, peak_reserved))
}

#[test]
fn native_pinned_segments_need_about_twice_the_peak_live_bytes() {
    // Native: each round's temporary needs a new 20 MiB segment (the free tails, 10 MiB - 512 B,
    // are too small), and the long-lived block then pins that segment (best fit: the tails are
    // too small for it too). 10 rounds: 200 MiB reserved. Peak live: 9 x (10 MiB + 512 B) held
    // plus the last 20 MiB temporary = 110 MiB + 4608 B. 200 / 110 = 1.82.
    let (_, mut a) = native(GIB);
    let (peak_live, peak_reserved) = pinning_rounds(&mut a).unwrap();
    assert_eq!(peak_live, 110 * MIB + 4608);
    assert_eq!(peak_reserved, 200 * MIB);
    assert_eq!(a.allocated_bytes(), 10 * (10 * MIB + 512));
    // It cannot do with less: with 199 MiB the last temporary fails, and the fallback finds no
    // wholly free segment to release.
    let (drv, mut a) = native(199 * MIB);
    let (round, e) = pinning_rounds(&mut a).unwrap_err();
    assert_eq!(round, 9);
    assert!(e.is_out_of_memory());
    assert_eq!(drv.calls(Call::FreeLegacy), 0);
    assert_eq!(a.reserved_bytes(), 180 * MIB);

    // Expandable: the long-lived blocks pack from the segment's start and the temporary grows the
    // tail; round i needs pages up to 9 x (10 MiB + 512 B) + 20 MiB for i = 9, rounded up to
    // 20 MiB pages: 120 MiB, which is also all it needs.
    let (_, mut a) = expandable(GIB);
    assert_eq!(
        pinning_rounds(&mut a).unwrap(),
        (110 * MIB + 4608, 120 * MIB)
    );
    let (_, mut a) = expandable(120 * MIB);
    assert_eq!(pinning_rounds(&mut a).unwrap().1, 120 * MIB);
}

#[test]
fn native_driver_faults() {
    let (drv, mut a) = native(GIB);
    // A non-OOM cuMemAlloc failure is a driver error, with nothing changed.
    drv.fail_nth_with(Call::AllocLegacy, 1, CudaError::Unknown);
    let e = a.allocate(100, S0).unwrap_err();
    assert_eq!(driver_call(&e), Some(Call::AllocLegacy));
    assert_eq!((a.reserved_bytes(), a.allocated_bytes()), (0, 0));
    a.check_invariants().unwrap();
    // An OOM cuMemAlloc enters the fallback: release (nothing), retry, success.
    drv.reset_counters();
    drv.fail_nth(Call::AllocLegacy, 1);
    let p = a.allocate(100, S0).unwrap();
    assert_eq!(drv.calls(Call::AllocLegacy), 2);
    assert_eq!(a.reserved_bytes(), 2 * MIB);
    // A failed cuMemFree keeps the segment; the next release gives it back.
    a.free(p).unwrap();
    drv.fail_nth(Call::FreeLegacy, 1);
    let e = a.empty_cache().unwrap_err();
    assert_eq!(driver_call(&e), Some(Call::FreeLegacy));
    assert_eq!(a.reserved_bytes(), 2 * MIB);
    assert_eq!(a.empty_cache().unwrap(), 2 * MIB);
    assert_all_returned(&drv);
}

// ---- Both ----

#[test]
fn bad_input_changes_nothing() {
    for rules in [Rules::Native, Rules::Expandable] {
        let drv = sim(GIB);
        let mut a = new(rules, &drv);
        let p = a.allocate(3 * MIB, S0).unwrap();
        let q = a.allocate(3 * MIB, S0).unwrap();
        let before = (a.reserved_bytes(), a.allocated_bytes(), memory_calls(&drv));
        let same = |a: &PytorchAllocator| {
            assert_eq!(
                (a.reserved_bytes(), a.allocated_bytes(), memory_calls(&drv)),
                before
            );
            a.check_invariants().unwrap();
        };
        assert!(matches!(
            a.free(0x1234),
            Err(Error::UnknownPointer {
                ptr: 0x1234,
                device: Some(0),
                interior_of: None
            })
        ));
        same(&a);
        assert!(matches!(
            a.free(p + 512),
            Err(Error::UnknownPointer { interior_of: Some(x), .. }) if x == p
        ));
        same(&a);
        assert!(matches!(
            a.allocate(0, S0),
            Err(Error::InvalidSize { size: 0, .. })
        ));
        same(&a);
        // 1 EiB and more: out of memory at once, without asking the driver.
        assert!(a.allocate(1 << 60, S0).unwrap_err().is_out_of_memory());
        assert!(a.allocate(u64::MAX, S0).unwrap_err().is_out_of_memory());
        same(&a);
        a.free(q).unwrap();
        let before = (a.reserved_bytes(), a.allocated_bytes(), memory_calls(&drv));
        let same = |a: &PytorchAllocator| {
            assert_eq!(
                (a.reserved_bytes(), a.allocated_bytes(), memory_calls(&drv)),
                before
            );
            a.check_invariants().unwrap();
        };
        assert!(matches!(a.free(q), Err(Error::DoubleFree { ptr, device: 0 }) if ptr == q));
        same(&a);
        // Inside cached memory (q merged with the free rest of its segment): a double free too.
        assert!(matches!(a.free(q + MIB), Err(Error::DoubleFree { .. })));
        same(&a);
        a.free(p).unwrap();
        drop(a);
        assert_all_returned(&drv);
    }
}

#[test]
fn drop_returns_everything() {
    for rules in [Rules::Native, Rules::Expandable] {
        let drv = sim(GIB);
        let mut a = new(rules, &drv);
        for (i, size) in [100, 3 * MIB, 30 * MIB, 700 * KIB, 12 * MIB]
            .into_iter()
            .enumerate()
        {
            let p = a.allocate(size, Stream(i as u64 % 2)).unwrap();
            if i % 2 == 0 {
                a.free(p).unwrap();
            }
        }
        assert!(drv.bytes_in_use(0) > 0);
        drop(a);
        assert_all_returned(&drv);
    }
}

#[test]
fn randomized_with_ooms_keeps_invariants() {
    // Random sizes over both pools and three streams on a small device, so that the OOM fallback
    // and empty_cache run often; every mutation checks the invariants.
    for rules in [Rules::Native, Rules::Expandable] {
        for seed in 0..4 {
            let drv = sim(160 * MIB);
            let mut a = new(rules, &drv);
            let mut rng = SmallRng::seed_from_u64(seed);
            let mut live: Vec<DevicePtr> = Vec::new();
            let mut ooms = 0;
            for step in 0..3000 {
                if !live.is_empty() && rng.random_bool(0.45) {
                    let i = rng.random_range(0..live.len());
                    a.free(live.swap_remove(i)).unwrap();
                } else {
                    let size = match rng.random_range(0..4) {
                        0 => rng.random_range(1..=MIB),
                        1 => rng.random_range(MIB..10 * MIB),
                        _ => rng.random_range(10 * MIB..40 * MIB),
                    };
                    match a.allocate(size, Stream(rng.random_range(0..3))) {
                        Ok(p) => live.push(p),
                        Err(e) if e.is_out_of_memory() => ooms += 1,
                        Err(e) => panic!("{rules:?} seed {seed} step {step}: {e}"),
                    }
                }
                if step % 500 == 499 {
                    a.empty_cache().unwrap();
                }
            }
            assert!(ooms > 0, "{rules:?} seed {seed}: the device was never full");
            for p in live {
                a.free(p).unwrap();
            }
            a.empty_cache().unwrap();
            assert_eq!((a.reserved_bytes(), a.allocated_bytes()), (0, 0));
            drop(a);
            assert_all_returned(&drv);
        }
    }
}

// ---- Expandable ----

#[test]
fn expandable_grows_by_pages() {
    let (drv, mut a) = expandable(GIB);
    // Small pool: 2 MiB pages in its own reservation.
    a.allocate(100, S0).unwrap();
    assert_eq!(a.reserved_bytes(), 2 * MIB);
    assert_eq!(drv.calls(Call::Reserve), 1);
    // Large pool: 20 MiB pages in another reservation. 12 MiB: one page, 8 MiB free after.
    let l = a.allocate(12 * MIB, S0).unwrap();
    assert_eq!(drv.calls(Call::Reserve), 2);
    assert_eq!(a.reserved_bytes(), 22 * MIB);
    assert_eq!(a.allocate(6 * MIB, S0).unwrap(), l + 12 * MIB); // in the free 8 MiB
    assert_eq!(a.reserved_bytes(), 22 * MIB);
    // 13 MiB: the free tail (2 MiB at 18 MiB) grows by one page: [18, 31), 9 MiB free after.
    assert_eq!(a.allocate(13 * MIB, S0).unwrap(), l + 18 * MIB);
    assert_eq!(a.reserved_bytes(), 42 * MIB);
    assert_eq!(a.allocate(9 * MIB, S0).unwrap(), l + 31 * MIB); // exactly the rest
                                                                // The last block is allocated: new pages at the end, the block at their start.
    assert_eq!(a.allocate(20 * MIB, S0).unwrap(), l + 40 * MIB);
    assert_eq!(a.reserved_bytes(), 62 * MIB);
    // 45 MiB: three pages at once (one cuMemCreate each, one map each, one set_access).
    assert_eq!(a.allocate(45 * MIB, S0).unwrap(), l + 60 * MIB);
    assert_eq!(a.reserved_bytes(), 122 * MIB);
    assert_eq!(a.allocated_bytes(), 512 + (12 + 6 + 13 + 9 + 20 + 45) * MIB);
    assert_eq!(drv.calls(Call::CreatePhysical), 7);
    assert_eq!(drv.calls(Call::Map), 7);
    assert_eq!(drv.calls(Call::SetAccess), 5);
    assert_eq!(drv.calls(Call::AllocLegacy), 0);
}

#[test]
fn expandable_reservation_covers_nine_eighths_of_the_device() {
    let (drv, mut a) = expandable(GIB);
    let l = a.allocate(20 * MIB, S0).unwrap();
    let s = a.allocate(100, S0).unwrap();
    drop(a);
    // 1 GiB + 1/8: 1152 MiB, in 20 MiB pages: 58 pages (1160 MiB); in 2 MiB pages: 1152 MiB.
    // The two reservations are back to back in the simulated address space.
    assert_eq!(s - l, 1160 * MIB);
    assert_all_returned(&drv);
}

#[test]
fn expandable_prefers_blocks_that_cannot_grow() {
    let (_, mut a) = expandable(GIB);
    let x = a.allocate(6 * MIB, S0).unwrap(); // page [0, 20): x [0, 6)
    let y = a.allocate(10 * MIB, S0).unwrap(); // y [6, 16), 4 MiB free before unmapped space
    assert_eq!(y, x + 6 * MIB);
    a.free(x).unwrap(); // [0, 6) free, followed by y
                        // Best fit alone takes the 4 MiB tail; PyTorch measures it as 4 MiB + the unmapped rest and
                        // moves on to the 6 MiB block, which cannot grow.
    assert_eq!(a.allocate(4 * MIB, S0).unwrap(), x);
    // Nothing else fits 4 MiB now but the tail.
    assert_eq!(a.allocate(4 * MIB, S0).unwrap(), x + 16 * MIB);
    assert_eq!(a.reserved_bytes(), 20 * MIB);
}

#[test]
fn expandable_release_leaves_holes_that_are_mapped_again() {
    let (drv, mut a) = expandable(GIB);
    let p: Vec<DevicePtr> = (0..3).map(|_| a.allocate(20 * MIB, S0).unwrap()).collect();
    let l = p[0];
    a.free(p[1]).unwrap();
    // The middle page goes back: a hole at [20, 40).
    assert_eq!(a.empty_cache().unwrap(), 20 * MIB);
    assert_eq!(a.reserved_bytes(), 40 * MIB);
    assert_eq!(drv.calls(Call::Unmap), 1);
    assert_eq!(drv.calls(Call::ReleasePhysical), 1);
    assert_eq!(drv.calls(Call::StreamSynchronize), 1);
    // 30 MiB does not fit the 20 MiB hole (allocated on both sides): two pages at the end.
    assert_eq!(a.allocate(30 * MIB, S0).unwrap(), l + 60 * MIB);
    assert_eq!(a.reserved_bytes(), 80 * MIB);
    // 10 MiB: the free 10 MiB after it. Then 20 MiB: the hole, mapped again (lowest address).
    assert_eq!(a.allocate(10 * MIB, S0).unwrap(), l + 90 * MIB);
    assert_eq!(a.allocate(20 * MIB, S0).unwrap(), l + 20 * MIB);
    assert_eq!(a.reserved_bytes(), 100 * MIB);
    // A hole next to a free block: the re-mapped page merges with it. Free [0, 20) and
    // [20, 40); release unmaps both pages (one unmapped block); 30 MiB maps two pages there.
    a.free(p[0]).unwrap();
    a.free(l + 20 * MIB).unwrap();
    assert_eq!(a.empty_cache().unwrap(), 40 * MIB);
    assert_eq!(a.allocate(30 * MIB, S0).unwrap(), l);
    assert_eq!(a.reserved_bytes(), 100 * MIB);
}

#[test]
fn expandable_empty_segment_gives_back_its_reservation() {
    let (drv, mut a) = expandable(GIB);
    let p = a.allocate(5 * MIB, S0).unwrap();
    let q = a.allocate(100, S1).unwrap();
    assert_eq!(drv.live_reservations(0), 2);
    a.free(p).unwrap();
    a.free(q).unwrap();
    assert_eq!(a.empty_cache().unwrap(), 22 * MIB);
    assert_eq!(drv.calls(Call::FreeReservation), 2);
    assert_all_returned(&drv);
}

#[test]
fn expandable_streams_have_their_own_segments() {
    let (drv, mut a) = expandable(GIB);
    let p = a.allocate(100, S1).unwrap();
    a.free(p).unwrap();
    a.allocate(100, S2).unwrap();
    assert_eq!(drv.calls(Call::Reserve), 2);
    assert_eq!(a.reserved_bytes(), 4 * MIB);
    assert_eq!(a.allocate(100, S1).unwrap(), p);
}

#[test]
fn expandable_oom_fallback_unmaps_free_pages_then_succeeds() {
    // 70 MiB device: the large reservation is 78.75 MiB rounded up to 20 MiB pages: 80 MiB.
    let (drv, mut a) = expandable(70 * MIB);
    let p: Vec<DevicePtr> = (0..3).map(|_| a.allocate(20 * MIB, S0).unwrap()).collect();
    let l = p[0];
    a.free(p[0]).unwrap();
    a.free(p[2]).unwrap();
    // 40 MiB: the free [40, 60) plus one page at [60, 80); that page does not fit (60 + 20 > 70).
    // The fallback unmaps [0, 20) and [40, 60) (20 MiB left); the retry skips the 20 MiB hole
    // at the start and maps two pages at [40, 80).
    assert_eq!(a.allocate(40 * MIB, S0).unwrap(), l + 40 * MIB);
    assert_eq!(a.reserved_bytes(), 60 * MIB);
    assert_eq!(drv.calls(Call::Unmap), 2);
    assert_eq!(drv.calls(Call::ReleasePhysical), 2);
    assert_eq!(drv.calls(Call::CreatePhysical), 3 + 1 + 2);
    // 20 MiB more: only the hole at [0, 20) has room, and the device does not (60 + 20 > 70).
    let e = a.allocate(20 * MIB, S0).unwrap_err();
    let Error::OutOfMemory(r) = &e else {
        panic!("expected OOM, got {e}")
    };
    assert_eq!(
        (r.requested, r.reserved, r.allocated),
        (20 * MIB, 60 * MIB, 60 * MIB)
    );
    assert!(r.remapping);
    assert!(r.driver_error.as_deref().unwrap().contains("cuMemCreate"));
    assert_eq!(a.reserved_bytes(), 60 * MIB);
}

#[test]
fn expandable_map_faults_leave_nothing_behind() {
    // A failed cuMemMap (first or second page of two), cuMemSetAccess, or non-OOM cuMemCreate:
    // a driver error, every page of the call given back, the blocks as they were.
    let faults = [
        (Call::Map, 1, CudaError::Unknown),
        (Call::Map, 2, CudaError::Unknown),
        (Call::SetAccess, 1, CudaError::Unknown),
        (Call::CreatePhysical, 2, CudaError::InvalidValue),
    ];
    for (call, n, error) in faults {
        let (drv, mut a) = expandable(GIB);
        drv.fail_nth_with(call, n, error);
        let e = a.allocate(30 * MIB, S0).unwrap_err();
        assert_eq!(driver_call(&e), Some(call));
        assert_eq!(a.reserved_bytes(), 0);
        assert_eq!((drv.live_handles(0), drv.live_mappings(0)), (0, 0));
        a.check_invariants().unwrap();
        // The segment reserved on the way stays (PyTorch keeps it too) and serves the retry.
        let p = a.allocate(30 * MIB, S0).unwrap();
        assert_eq!(a.reserved_bytes(), 40 * MIB);
        a.free(p).unwrap();
        drop(a);
        assert_all_returned(&drv);
    }
    // An OOM cuMemCreate enters the fallback instead: release (nothing), retry, success.
    let (drv, mut a) = expandable(GIB);
    drv.fail_nth(Call::CreatePhysical, 1);
    a.allocate(30 * MIB, S0).unwrap();
    assert_eq!(drv.calls(Call::CreatePhysical), 1 + 2);
    assert_eq!(a.reserved_bytes(), 40 * MIB);
}

#[test]
fn expandable_double_fault_quarantines_then_recovers() {
    let (drv, mut a) = expandable(GIB);
    // The second map fails, and so does the unmap that undoes the first: that page stays
    // mapped, counted as reserved, until the next growth retries it.
    drv.fail_nth(Call::Map, 2);
    drv.fail_nth(Call::Unmap, 1);
    let e = a.allocate(30 * MIB, S0).unwrap_err();
    assert_eq!(driver_call(&e), Some(Call::Map));
    assert_eq!(a.reserved_bytes(), 20 * MIB);
    assert_eq!(drv.bytes_in_use(0), 20 * MIB);
    a.check_invariants().unwrap();
    let p = a.allocate(10 * MIB, S0).unwrap();
    assert_eq!(a.reserved_bytes(), 20 * MIB);
    assert_eq!(drv.live_handles(0), 1);
    a.free(p).unwrap();
    assert_eq!(a.empty_cache().unwrap(), 20 * MIB);
    assert_all_returned(&drv);
}

#[test]
fn expandable_unmap_fault_during_release() {
    let (drv, mut a) = expandable(GIB);
    let p = a.allocate(20 * MIB, S0).unwrap();
    let q = a.allocate(20 * MIB, S0).unwrap();
    a.free(p).unwrap();
    a.free(q).unwrap(); // one free block [0, 40)
    drv.fail_nth(Call::Unmap, 2);
    // The first page goes, the second stays: [0, 20) unmapped, [20, 40) free.
    let e = a.empty_cache().unwrap_err();
    assert_eq!(driver_call(&e), Some(Call::Unmap));
    assert_eq!(a.reserved_bytes(), 20 * MIB);
    a.check_invariants().unwrap();
    // The next release finishes: the segment is all unmapped and its reservation goes too.
    assert_eq!(a.empty_cache().unwrap(), 20 * MIB);
    assert_all_returned(&drv);
}

#[test]
fn expandable_pages_follow_a_coarser_granularity() {
    // With a 4 MiB granularity, small pages are 4 MiB (2 MiB rounded up); large stay 20 MiB.
    let drv = Arc::new(SimDriver::new(SimConfig {
        capacity: GIB,
        granularity: 4 * MIB,
        backing: Backing::Bookkeeping,
        ..SimConfig::default()
    }));
    let mut a = new(Rules::Expandable, &drv);
    a.allocate(100, S0).unwrap();
    assert_eq!(a.reserved_bytes(), 4 * MIB);
    a.allocate(2 * MIB, S0).unwrap();
    assert_eq!(a.reserved_bytes(), 24 * MIB);
}

#[test]
fn expandable_needs_the_virtual_memory_api() {
    let drv = Arc::new(SimDriver::new(SimConfig {
        vmm: false,
        backing: Backing::Bookkeeping,
        ..SimConfig::default()
    }));
    let e = PytorchAllocator::new(drv.clone(), 0, Rules::Expandable).unwrap_err();
    assert!(matches!(e, Error::Unsupported(_)));
    assert!(PytorchAllocator::new(drv, 0, Rules::Native).is_ok());
}

#[test]
fn real_backing_memory_is_usable() {
    // With host memory behind the simulated device, every byte handed out can be written.
    for rules in [Rules::Native, Rules::Expandable] {
        let drv = Arc::new(SimDriver::new(SimConfig {
            capacity: 256 * MIB,
            ..SimConfig::default()
        }));
        let mut a = new(rules, &drv);
        let sizes = [100, 700 * KIB, 3 * MIB, 25 * MIB];
        let ptrs: Vec<DevicePtr> = sizes.iter().map(|&s| a.allocate(s, S0).unwrap()).collect();
        for (&p, &s) in ptrs.iter().zip(&sizes) {
            assert!(drv.is_accessible(0, p) && drv.is_accessible(0, p + s - 1));
            // SAFETY: with real backing the pointer is host memory mapped read-write by the
            // simulated driver, and the allocation holds `s` bytes.
            unsafe {
                std::ptr::write_bytes(p as *mut u8, 0xa5, s as usize);
            }
        }
        for p in ptrs {
            a.free(p).unwrap();
        }
        drop(a);
        assert_all_returned(&drv);
    }
}
