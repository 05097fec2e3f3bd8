//! Review findings. A test whose comment describes a bug failed before that bug's fix; the others
//! pin down correct behaviour on a subtle path.

mod common;
use common::*;
use std::sync::Arc;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::{DevicePtr, Driver, Stream};
use tessera::{Config, Error, Tessera};

const KIB: u64 = 1 << 10;
const A: Stream = Stream(1);
const B: Stream = Stream(2);
const C: Stream = Stream(3);
const D: Stream = Stream(4);

fn overlaps(p: DevicePtr, len: u64, q: DevicePtr, qlen: u64) -> bool {
    p < q + qlen && q < p + len
}

/// Extending a free block at the limit: gathering pages merges settled neighbours of different
/// streams (`merge_settled_neighbours`), and that merge may join an *unsettled* block of the
/// extended block's stream. `grow_large` then retags the merged block to the requesting stream
/// without checking it again, so memory freed on a busy stream goes to another stream.
#[test]
fn extension_never_hands_out_memory_of_a_busy_stream() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    // Large range: [v: A][w: C][x: A][holes...]
    let v = alloc(&t, &mut tr, 2 * MIB, A).unwrap();
    let w = alloc(&t, &mut tr, 2 * MIB, C).unwrap();
    let x = alloc(&t, &mut tr, 2 * MIB, A).unwrap();
    assert_eq!((w, x), (v + 2 * MIB, v + 4 * MIB), "layout v|w|x");
    // A small slot of D, recorded on A and C: its settlement makes A's and C's fences cover the
    // frees of x and w without releasing anything.
    let r = alloc(&t, &mut tr, 4 * KIB, D).unwrap();
    free(&t, &mut tr, x);
    free(&t, &mut tr, w);
    t.record_stream(r, A).unwrap();
    t.record_stream(r, C).unwrap();
    free(&t, &mut tr, r);
    // A slow-path small request of D settles the parked free (A and C are idle); free it again so
    // that D's granule is empty (a page to gather later).
    let s = alloc(&t, &mut tr, 64 * KIB, D).unwrap();
    free(&t, &mut tr, s);
    // Now A becomes busy and frees v: v must not go to another stream.
    sim.hold_stream(0, A);
    free(&t, &mut tr, v);
    // At the limit, B asks for a bit more than x: grow_large extends x (settled) by one page taken
    // from D's empty granule.
    let reserved = t.stats(0).unwrap().reserved_bytes;
    t.set_limit(0, Some(reserved)).unwrap();
    let y = alloc(&t, &mut tr, 2 * MIB + 512 * KIB, B).unwrap();
    assert!(
        !overlaps(y, 2 * MIB + 512 * KIB, v, 2 * MIB),
        "B got {y:#x}, overlapping v {v:#x} freed on busy stream A"
    );
    sim.release_stream(0, A);
    free(&t, &mut tr, y);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// A parked (record_stream'd) small free that settles late sets its granule's `free_seq` to the
/// *older* sequence number of the parked free, overwriting the newer one of a later free in the
/// same granule; another stream then adopts the granule while that later free's work is pending.
#[test]
fn a_late_settled_small_free_does_not_hide_a_newer_free_of_a_busy_stream() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let x = alloc(&t, &mut tr, 4 * KIB, A).unwrap();
    let y = alloc(&t, &mut tr, 4 * KIB, A).unwrap();
    let z = alloc(&t, &mut tr, 4 * KIB, A).unwrap();
    assert_eq!(x / (2 * MIB), y / (2 * MIB), "one granule");
    sim.hold_stream(0, C);
    t.record_stream(x, C).unwrap();
    free(&t, &mut tr, x); // parked on C, seq 1
    free(&t, &mut tr, z); // seq 2
                          // A's fence covers seq 2 (A idle); nothing is released because y is live.
    assert_eq!(t.trim(0).unwrap(), 0);
    // A becomes busy and frees y: the granule's latest free is now on a busy stream.
    sim.hold_stream(0, A);
    free(&t, &mut tr, y); // seq 3
                          // C finishes; B's small request settles x (granule free_seq := 1!) and looks for a granule.
    sim.release_stream(0, C);
    let b1 = alloc(&t, &mut tr, 4 * KIB, B).unwrap();
    let b2 = alloc(&t, &mut tr, 4 * KIB, B).unwrap();
    assert!(
        ![b1, b2].contains(&y),
        "B got y's slot {y:#x} while A's work on y is pending"
    );
    for b in [b1, b2] {
        assert_ne!(
            b / (2 * MIB),
            y / (2 * MIB),
            "B adopted the granule where y was just freed on busy stream A"
        );
    }
    sim.release_stream(0, A);
    free(&t, &mut tr, b1);
    free(&t, &mut tr, b2);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// A large page size makes the smallest class's slot count overflow `u16` (`slots as u16` in
/// `carve_run`): 2 GiB pages cut into 32 MiB units give 65,536 slots of 512 B, stored as 0.
#[test]
fn a_large_page_size_serves_the_smallest_class() {
    let config = Config {
        page_size: Some(2 * GIB),
        ..Config::default()
    };
    let (sim, t) = sim_alloc(8 * GIB, config);
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        t.allocate(0, 512, Stream::DEFAULT)
    }));
    let p = r.expect("allocate(512) panicked").unwrap();
    t.free(0, p).unwrap();
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// A page size that is a multiple of the granularity but not a power of two is accepted by the
/// configuration, but every reservation asks for a non-power-of-two alignment, and the page
/// arithmetic (`a / ps * ps`) assumes ranges aligned to the page size.
#[test]
fn a_page_size_of_three_granules_works_or_is_rejected() {
    let config = Config {
        page_size: Some(6 * MIB),
        ..Config::default()
    };
    let sim = Arc::new(SimDriver::with_capacity(64 * MIB));
    let Ok(t) = Tessera::new(sim.clone(), config) else {
        return; // rejected up front: fine
    };
    match t.allocate(0, 4 * KIB, Stream::DEFAULT) {
        Err(Error::Config(_)) => {} // rejected on first use: fine
        Ok(p) => {
            let q = t.allocate(0, 8 * MIB, Stream::DEFAULT).unwrap();
            t.free(0, p).unwrap();
            t.free(0, q).unwrap();
        }
        Err(e) => panic!("a configuration accepted up front makes allocation fail: {e}"),
    }
}

/// More than 256 size classes (2 GiB pages, `small_max` 1 GiB, 16 classes per doubling) overflow
/// the `u8` class index (`by_size.push(c as u8)` in `SizeClasses::new`): a large small request
/// gets a slot of a much smaller class.
#[test]
fn a_small_request_never_gets_a_smaller_slot() {
    let config = Config {
        page_size: Some(2 * GIB),
        small_max: GIB,
        classes_per_doubling: 16,
        ..Config::default()
    };
    let (_sim, t) = sim_alloc(8 * GIB, config);
    let p = t.allocate(0, GIB, Stream::DEFAULT).unwrap();
    let a = t.allocation(p).unwrap();
    assert!(a.size >= GIB, "1 GiB request got a {} B slot", a.size);
    t.free(0, p).unwrap();
}

/// While a small free is parked on a recorded stream, `allocation()` hides its exact address but
/// not interior pointers (`is_pending` compares the exact pointer): the freed slot is reported
/// live and accepts `record_stream`, whose entry then outlives the allocation.
#[test]
fn a_parked_small_free_is_not_live_through_an_interior_pointer() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    sim.hold_stream(0, B);
    let x = alloc(&t, &mut tr, 4 * KIB, A).unwrap();
    t.record_stream(x, B).unwrap();
    free(&t, &mut tr, x);
    assert_eq!(t.allocation(x), None);
    assert_eq!(t.allocation(x + 8), None, "x is freed");
    assert!(t.record_stream(x + 8, C).is_err(), "x is freed");
    sim.release_stream(0, B);
}

/// The OOM sequence decides once, before the hooks, whether the request can ever succeed
/// (`possible` in `allocate_or_oom`), and reuses that answer after the hooks: a hook that lifts
/// the limit cannot save the request, because step 4 (compact and retry) is skipped.
#[test]
fn a_hook_that_raises_the_limit_lets_the_request_succeed() {
    let config = Config {
        limit: Some(8 * MIB),
        ..Config::default()
    };
    let (_sim, t) = sim_alloc(64 * MIB, config);
    let t = Arc::new(t);
    let weak = Arc::downgrade(&t);
    t.add_oom_hook(move |dev, _| {
        if let Some(t) = weak.upgrade() {
            t.set_limit(dev, None).unwrap();
        }
    });
    let p = t
        .allocate(0, 16 * MIB, A)
        .expect("the hook lifted the limit");
    t.free(0, p).unwrap();
}

/// A hook may free through another thread and wait for it: no lock is held while it runs.
#[test]
fn a_hook_that_frees_on_another_thread_and_joins_it_does_not_deadlock() {
    let (sim, t) = sim_alloc(16 * MIB, Config::default());
    let t = Arc::new(t);
    let blocks: Vec<DevicePtr> = (0..8).map(|_| t.allocate(0, 2 * MIB, A).unwrap()).collect();
    let victims = Arc::new(std::sync::Mutex::new(blocks[..4].to_vec()));
    let weak = Arc::downgrade(&t);
    let calls = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (v, c) = (Arc::clone(&victims), Arc::clone(&calls));
    t.add_oom_hook(move |dev, _| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let Some(t) = weak.upgrade() else { return };
        let ptrs: Vec<DevicePtr> = v.lock().unwrap().drain(..).collect();
        std::thread::spawn(move || {
            for p in ptrs {
                t.free(dev, p).unwrap();
            }
        })
        .join()
        .unwrap();
    });
    let t2 = Arc::clone(&t);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(t2.allocate(0, 8 * MIB, B).map_err(|e| e.to_string()));
    });
    let p = rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("deadlock")
        .unwrap();
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    t.check_invariants(0).unwrap();
    t.free(0, p).unwrap();
    for &b in &blocks[4..] {
        t.free(0, b).unwrap();
    }
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// Exactly `small_max`, one byte more, exactly one page, with 1 and 16 classes per doubling.
#[test]
fn boundary_sizes_with_one_and_sixteen_classes_per_doubling() {
    for classes in [1, 16] {
        let config = Config {
            classes_per_doubling: classes,
            small_max: MIB,
            ..Config::default()
        };
        let (sim, t) = sim_alloc(64 * MIB, config);
        let mut tr = Tracker::default();
        let mut live = Vec::new();
        for size in [
            1,
            512,
            513,
            2048,
            2049,
            MIB - 1,
            MIB,
            MIB + 1,
            2 * MIB - 1,
            2 * MIB,
            2 * MIB + 1,
        ] {
            let p = alloc(&t, &mut tr, size, A).unwrap();
            let a = t.allocation(p).unwrap();
            assert!(a.size >= size && a.base == p, "{classes}: {size} -> {a:?}");
            let small = t.snapshot(0).unwrap().segments.iter().any(|s| {
                s.kind == tessera::SegmentKind::Small && s.blocks.iter().any(|b| b.address == p)
            });
            assert_eq!(small, size <= MIB, "{classes}: {size} small?");
            live.push(p);
        }
        let s = t.stats(0).unwrap();
        assert_eq!(s.active_blocks, live.len() as u64);
        for p in live {
            free(&t, &mut tr, p);
        }
        let s = t.stats(0).unwrap();
        assert_eq!(
            (s.allocated_bytes, s.requested_bytes, s.active_blocks),
            (0, 0, 0)
        );
        t.empty_cache(0).unwrap();
        assert_eq!(sim.bytes_in_use(0), 0);
    }
}

/// Pages of two granules: fragmentation is cured by remapping, data survives.
#[test]
fn page_size_of_two_granules_remaps_and_keeps_data() {
    let config = Config {
        page_size: Some(4 * MIB),
        ..Config::default()
    };
    let (sim, t) = sim_alloc(64 * MIB, config);
    let mut tr = Tracker::default();
    let blocks: Vec<DevicePtr> = (0..16)
        .map(|_| alloc(&t, &mut tr, 4 * MIB, A).unwrap())
        .collect();
    for &p in blocks.iter().step_by(2) {
        free(&t, &mut tr, p);
    }
    let big = alloc(&t, &mut tr, 32 * MIB, B).unwrap();
    assert!(t.stats(0).unwrap().remaps > 0);
    // Small requests on a page of two granules: a 4 MiB granule.
    free(&t, &mut tr, blocks[1]);
    free(&t, &mut tr, blocks[3]);
    let s = alloc(&t, &mut tr, 2 * MIB, A).unwrap();
    let x = alloc(&t, &mut tr, 100 * KIB, A).unwrap();
    assert_eq!(t.allocation(x).unwrap().size % 512, 0);
    for p in tr.ptrs() {
        free(&t, &mut tr, p);
    }
    let _ = (big, s);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// A request larger than the first range's holes reserves a second range; pages are stolen into
/// it; pointers in it are found without their device.
#[test]
fn a_second_virtual_range_is_reserved_and_fed_by_remapping() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let a = alloc(&t, &mut tr, 30 * MIB, A).unwrap();
    let keep = alloc(&t, &mut tr, 2 * MIB, A).unwrap();
    free(&t, &mut tr, a);
    let reservations = sim.live_reservations(0);
    // 16 holes remain in the first range (31 usable slots, one guard): 40 MiB needs a new one;
    // the device has 32 MiB left, so 4 pages come from `a`.
    let big = alloc(&t, &mut tr, 40 * MIB, A).unwrap();
    assert_eq!(sim.live_reservations(0), reservations + 1);
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 64 * MIB);
    assert!(!(a..a + 30 * MIB).contains(&big));
    t.free_any(big).unwrap();
    tr.remove(big);
    tr.check();
    t.check_invariants(0).unwrap();
    free(&t, &mut tr, keep);
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// The small segment (granule) holding `p`.
fn granule_of(t: &Tessera, p: DevicePtr) -> DevicePtr {
    t.snapshot(0)
        .unwrap()
        .segments
        .iter()
        .find(|s| {
            s.kind == tessera::SegmentKind::Small && (s.address..s.address + s.size).contains(&p)
        })
        .expect("a small segment")
        .address
}

/// A device without the virtual-memory API falls back to the legacy backend; small granules are
/// legacy segments, adopted across streams once their work is done.
#[test]
fn a_device_without_vmm_falls_back_to_legacy() {
    let (sim, t) = sim_alloc_with(
        SimConfig {
            capacity: 16 * MIB,
            vmm: false,
            ..SimConfig::default()
        },
        Config::default(),
    );
    let mut tr = Tracker::default();
    let big = alloc(&t, &mut tr, 12 * MIB, C).unwrap();
    sim.hold_stream(0, A);
    let x = alloc(&t, &mut tr, 4 * KIB, A).unwrap();
    let gx = granule_of(&t, x);
    free(&t, &mut tr, x);
    assert_eq!(sim.live_legacy(0), 2);
    assert_eq!(sim.calls(tessera::driver::Call::Reserve), 0);
    let y = alloc(&t, &mut tr, 4 * KIB, B).unwrap();
    assert_ne!(granule_of(&t, y), gx, "A's granule is busy: B gets its own");
    // Full device: D waits for A and adopts its granule.
    let z = alloc(&t, &mut tr, 40 * KIB, D).unwrap();
    assert_eq!(granule_of(&t, z), gx);
    assert_eq!(sim.live_legacy(0), 3);
    sim.release_stream(0, A);
    for p in [big, y, z] {
        free(&t, &mut tr, p);
    }
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
    assert_eq!(sim.live_legacy(0), 0);
}

/// Bad frees change nothing: interior pointers of split large blocks, pointers inside free
/// memory, pointers inside an idle cached run, parked (record_stream'd) pointers.
#[test]
fn bad_frees_change_nothing() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let a = alloc(&t, &mut tr, 3 * MIB, A).unwrap();
    let b = alloc(&t, &mut tr, MIB + 512, A).unwrap(); // the split rest of a's pages
    let s = alloc(&t, &mut tr, 4 * KIB, A).unwrap();
    let s2 = alloc(&t, &mut tr, 4 * KIB, A).unwrap();
    free(&t, &mut tr, s2); // s's run keeps a free slot at s2
    free(&t, &mut tr, b); // b's memory is free (merged with the tail)
    sim.hold_stream(0, B);
    let r = alloc(&t, &mut tr, 2 * MIB + 512, A).unwrap();
    t.record_stream(r, B).unwrap();
    free(&t, &mut tr, r);
    let before = t.stats(0).unwrap();
    let snap = t.snapshot(0).unwrap().segments;
    for (p, what) in [
        (a + 512, "interior of a large block"),
        (a + 3 * MIB - 512, "last 512 B of a large block"),
        (b, "freed large block"),
        (b + 4096, "inside free large memory"),
        (s + 512, "interior of a small slot"),
        (s2, "freed small slot"),
        (s2 + 8, "interior of a freed small slot"),
        (s + 64 * KIB, "past the run"),
        (r, "parked large free"),
        (r + 512, "interior of a parked large free"),
        (0x10, "unknown"),
    ] {
        let e = t.free(0, p).expect_err(what);
        assert!(
            matches!(e, Error::DoubleFree { .. } | Error::UnknownPointer { .. }),
            "{what}: {e}"
        );
        t.check_invariants(0).unwrap();
    }
    let after = t.stats(0).unwrap();
    assert_eq!(after.invalid_frees, before.invalid_frees + 11);
    assert_eq!(
        (after.allocated_bytes, after.active_blocks, after.frees),
        (before.allocated_bytes, before.active_blocks, before.frees)
    );
    assert_eq!(t.snapshot(0).unwrap().segments, snap);
    tr.check();
    sim.release_stream(0, B);
    for p in tr.ptrs() {
        free(&t, &mut tr, p);
    }
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// A parked free whose recorded stream cannot take an event (on CUDA: a stream destroyed after
/// `record_stream`, since the event is recorded lazily) makes `settle_pending`, the first step of
/// every slow path, fail, so every cache miss on the device fails, even one the device has free
/// memory for and that needs no fence at all.
#[test]
fn a_parked_free_that_cannot_settle_does_not_block_fresh_allocations() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let x = alloc(&t, &mut tr, 4 * MIB, A).unwrap();
    t.record_stream(x, B).unwrap();
    free(&t, &mut tr, x);
    sim.fail_with_probability(Some(tessera::driver::Call::EventRecord), 1.0, 1);
    let r = t.allocate(0, 4 * MIB, A);
    sim.clear_faults();
    let y = r.expect("the device has 60 MiB free");
    t.free(0, y).unwrap();
}

/// The extension path skips a free block of a busy stream that ends where unmapped space begins,
/// and the stealing path leaves its pages mapped; once the stream is idle, both may use it.
#[test]
fn a_busy_streams_block_is_neither_extended_nor_stolen() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let keep = alloc(&t, &mut tr, 2 * MIB, B).unwrap();
    sim.hold_stream(0, A);
    let x = alloc(&t, &mut tr, 6 * MIB, A).unwrap();
    free(&t, &mut tr, x);
    // Room on the device: B's larger request gets fresh pages, not x extended.
    let y = alloc(&t, &mut tr, 8 * MIB, B).unwrap();
    assert!(!overlaps(y, 8 * MIB, x, 6 * MIB));
    free(&t, &mut tr, y);
    // At the limit: the non-waiting attempt must not steal x's pages; the waiting one may.
    t.set_limit(0, Some(t.stats(0).unwrap().reserved_bytes))
        .unwrap();
    let z = alloc(&t, &mut tr, 12 * MIB, B).unwrap();
    assert!(
        sim.calls(tessera::driver::Call::EventSynchronize) > 0,
        "x was used only after waiting for A"
    );
    sim.release_stream(0, A);
    for p in [z, keep] {
        free(&t, &mut tr, p);
    }
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// Slots record their requested size as `u32` (`run.requested[slot] = requested as u32` in
/// `SmallPool::alloc`), and 0 means free: with `small_max` of 4 GiB or more (8 GiB pages), a small
/// request of exactly 4 GiB is recorded as 0, so the live slot looks free (invariants break; with
/// checks off, its free is refused as a double free and the stats drift).
#[test]
fn a_four_gib_small_request_is_live() {
    let config = Config {
        page_size: Some(8 * GIB),
        small_max: 4 * GIB,
        ..Config::default()
    };
    let (_sim, t) = sim_alloc(16 * GIB, config);
    let p = t.allocate(0, 4 * GIB, Stream::DEFAULT).unwrap();
    assert!(t.allocation(p).is_some_and(|a| a.size >= 4 * GIB));
    t.free(0, p).unwrap();
    assert_eq!(t.stats(0).unwrap().active_blocks, 0);
}
