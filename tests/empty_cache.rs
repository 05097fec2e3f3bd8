//! `empty_cache` and `trim` give memory back to the device: the bytes they report leave both
//! tessera's `reserved` figure and the simulated device's usage, only fully free pages (or
//! segments) go, and live allocations keep their addresses and data.

mod common;
use common::*;
use tessera::driver::{Driver, Stream};
use tessera::{Backend, Config, Tessera};

const KIB: u64 = 1 << 10;
const S: Stream = Stream::DEFAULT;

/// Releases the cache with `op` and checks that `reserved` and the device's usage both drop by
/// exactly the bytes it reports. Returns them.
fn release(
    sim: &tessera::driver::sim::SimDriver,
    t: &Tessera,
    tr: &Tracker,
    op: impl Fn(&Tessera) -> tessera::Result<u64>,
) -> u64 {
    let before = t.stats(0).unwrap();
    let in_use = sim.bytes_in_use(0);
    assert_eq!(in_use, before.reserved_bytes);
    let released = op(t).expect("releasing the cache");
    let after = t.stats(0).unwrap();
    assert_eq!(after.reserved_bytes, before.reserved_bytes - released);
    assert_eq!(sim.bytes_in_use(0), in_use - released);
    assert_eq!(after.allocated_bytes, before.allocated_bytes);
    assert_eq!(after.active_blocks, before.active_blocks);
    assert_eq!(
        released % after.page_size,
        0,
        "only whole pages are released"
    );
    if released > 0 {
        assert_eq!(after.cache_releases, before.cache_releases + 1);
        assert_eq!(after.released_bytes, before.released_bytes + released);
    } else {
        assert_eq!(after.cache_releases, before.cache_releases);
    }
    tr.check();
    t.check_invariants(0).unwrap();
    // Live data is still mapped where it was.
    for p in tr.ptrs() {
        assert!(sim.is_mapped(0, p), "live allocation {p:#x} was unmapped");
    }
    released
}

fn empty(t: &Tessera) -> tessera::Result<u64> {
    t.empty_cache(0)
}

fn trim(t: &Tessera) -> tessera::Result<u64> {
    t.trim(0)
}

/// Small and large sizes, mixed.
const SIZES: [u64; 9] = [
    4 * KIB,
    100 * KIB,
    MIB,
    3 * MIB,
    512,
    5 * MIB + 512,
    2 * MIB,
    300 * KIB,
    7 * MIB,
];

#[test]
fn empty_cache_after_freeing_everything_returns_all_memory() {
    for backend in [Backend::Vmm, Backend::Legacy] {
        let (sim, t) = sim_alloc_backend(256 * MIB, backend);
        let mut tr = Tracker::default();
        for round in 0..2 {
            let ptrs: Vec<_> = SIZES
                .iter()
                .map(|&s| alloc(&t, &mut tr, s, S).unwrap())
                .collect();
            let reserved = t.stats(0).unwrap().reserved_bytes;
            assert!(reserved > 0);
            for p in ptrs {
                free(&t, &mut tr, p);
            }
            assert_eq!(
                t.stats(0).unwrap().reserved_bytes,
                reserved,
                "frees alone keep the cache"
            );
            let released = release(&sim, &t, &tr, empty);
            assert_eq!(released, reserved, "{backend} round {round}");
            let st = t.stats(0).unwrap();
            assert_eq!(st.reserved_bytes, 0);
            assert_eq!(st.mapped_pages, 0);
            assert_eq!(st.pool_pages, 0);
            assert_eq!(st.segments, 0);
            assert_eq!(sim.bytes_in_use(0), 0);
            assert_eq!(sim.live_mappings(0), 0);
            assert_eq!(sim.live_handles(0), 0);
            assert_eq!(sim.live_legacy(0), 0);
            // Nothing left to release.
            assert_eq!(release(&sim, &t, &tr, empty), 0);
        }
    }
}

#[test]
fn empty_cache_releases_only_fully_free_pages() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    // One small granule, then three large blocks of two pages each, back to back.
    let small = alloc(&t, &mut tr, 4 * KIB, S).unwrap();
    let a = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    let b = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    let c = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    assert_eq!(b, a + 4 * MIB);
    assert_eq!(c, b + 4 * MIB);
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 14 * MIB);

    // The middle block's two pages are fully free: exactly those go.
    free(&t, &mut tr, b);
    assert_eq!(release(&sim, &t, &tr, empty), 4 * MIB);
    assert!(!sim.is_mapped(0, b));
    assert!(!sim.is_mapped(0, b + 4 * MIB - 1));
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 10 * MIB);

    // A granule with a live slot stays; once its last slot is freed it goes.
    let small2 = alloc(&t, &mut tr, 40 * KIB, S).unwrap();
    free(&t, &mut tr, small);
    assert_eq!(release(&sim, &t, &tr, empty), 0);
    free(&t, &mut tr, small2);
    assert_eq!(release(&sim, &t, &tr, empty), 2 * MIB);

    for p in [a, c] {
        free(&t, &mut tr, p);
    }
    assert_eq!(release(&sim, &t, &tr, empty), 8 * MIB);
    assert_eq!(sim.bytes_in_use(0), 0);
    assert_eq!(sim.live_mappings(0), 0);
}

#[test]
fn a_page_shared_with_a_live_block_stays() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    // 3 MiB + 3 MiB: the second block extends the first one's free tail, so they share page 1.
    let a = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
    let b = alloc(&t, &mut tr, 3 * MIB, S).unwrap();
    assert_eq!(b, a + 3 * MIB);
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 6 * MIB);
    free(&t, &mut tr, a);
    let st = t.stats(0).unwrap();
    assert_eq!(st.stranded_bytes, MIB, "a's last MiB shares a page with b");
    // Page 0 is fully free; page 1 holds b's first MiB.
    assert_eq!(release(&sim, &t, &tr, empty), 2 * MIB);
    assert!(!sim.is_mapped(0, a));
    assert!(sim.is_mapped(0, a + 2 * MIB));
    let st = t.stats(0).unwrap();
    assert_eq!(st.reserved_bytes, 4 * MIB);
    assert_eq!(st.stranded_bytes, MIB);
    free(&t, &mut tr, b);
    assert_eq!(release(&sim, &t, &tr, empty), 4 * MIB);
    assert_eq!(sim.bytes_in_use(0), 0);
}

#[test]
fn live_data_survives_emptying_the_cache_many_times() {
    for backend in [Backend::Vmm, Backend::Legacy] {
        let (sim, t) = sim_alloc_backend(256 * MIB, backend);
        let mut tr = Tracker::default();
        let mut keep = Vec::new();
        for round in 0..4u64 {
            let ptrs: Vec<_> = SIZES
                .iter()
                .map(|&s| alloc(&t, &mut tr, s + round * 512, S).unwrap())
                .collect();
            // Keep every third allocation alive, free the rest, empty the cache.
            for (i, p) in ptrs.into_iter().enumerate() {
                if i % 3 == round as usize % 3 {
                    keep.push(p);
                } else {
                    free(&t, &mut tr, p);
                }
            }
            release(&sim, &t, &tr, empty);
            let st = t.stats(0).unwrap();
            assert!(st.reserved_bytes >= st.allocated_bytes);
        }
        for p in keep {
            free(&t, &mut tr, p);
        }
        release(&sim, &t, &tr, empty);
        assert_eq!(sim.bytes_in_use(0), 0, "{backend}");
        assert_eq!(t.stats(0).unwrap().reserved_bytes, 0, "{backend}");
    }
}

#[test]
fn trim_releases_what_is_free_and_done() {
    for backend in [Backend::Vmm, Backend::Legacy] {
        let (sim, t) = sim_alloc_backend(256 * MIB, backend);
        let mut tr = Tracker::default();
        let ptrs: Vec<_> = SIZES
            .iter()
            .map(|&s| alloc(&t, &mut tr, s, Stream(7)).unwrap())
            .collect();
        let keep = ptrs[5];
        for &p in &ptrs {
            if p != keep {
                free(&t, &mut tr, p);
            }
        }
        let reserved = t.stats(0).unwrap().reserved_bytes;
        let released = release(&sim, &t, &tr, trim);
        assert!(released > 0, "{backend}");
        assert!(reserved - released >= t.stats(0).unwrap().allocated_bytes);
        assert_eq!(release(&sim, &t, &tr, trim), 0, "nothing more to trim");
        free(&t, &mut tr, keep);
        release(&sim, &t, &tr, trim);
        assert_eq!(sim.bytes_in_use(0), 0, "{backend}");
        assert_eq!(sim.live_mappings(0), 0, "{backend}");
    }
}

#[test]
fn empty_cache_of_an_unused_device_releases_nothing() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    assert_eq!(t.empty_cache(0).unwrap(), 0);
    assert_eq!(t.trim(0).unwrap(), 0);
    assert_eq!(t.empty_cache_all().unwrap(), 0);
    assert_eq!(sim.bytes_in_use(0), 0);
    t.check_invariants(0).unwrap();
}

#[test]
fn memory_released_is_reused_by_the_device() {
    // After empty_cache, the released memory is the device's again: a request for the whole
    // device succeeds.
    let (sim, t) = sim_alloc(32 * MIB, Config::default());
    let mut tr = Tracker::default();
    let small = alloc(&t, &mut tr, 4 * KIB, S).unwrap();
    let big = alloc(&t, &mut tr, 20 * MIB, S).unwrap();
    free(&t, &mut tr, big);
    free(&t, &mut tr, small);
    sim.set_external_usage(0, 16 * MIB);
    assert_eq!(release(&sim, &t, &tr, empty), 22 * MIB);
    let p = alloc(&t, &mut tr, 16 * MIB, S).expect("the released memory is free again");
    free(&t, &mut tr, p);
    sim.set_external_usage(0, 0);
    release(&sim, &t, &tr, empty);
    assert_eq!(sim.bytes_in_use(0), 0);
}

/// Free blocks of two streams share a page (VMM) or a segment (legacy): once both streams are
/// done, the page or segment is wholly free and goes back.
fn free_neighbours_of_two_streams_are_released_together(backend: Backend) {
    let (sim, t) = sim_alloc_backend(64 * MIB, backend);
    let mut tr = Tracker::default();
    let seg = alloc(&t, &mut tr, 4 * MIB, S).unwrap();
    free(&t, &mut tr, seg);
    let a = alloc(&t, &mut tr, 3 * MIB / 2, S).unwrap();
    // Stream 1 takes the rest of the block (S's work on it is done) and splits it.
    let b = alloc(&t, &mut tr, 3 * MIB / 2, Stream(1)).unwrap();
    assert_eq!((a, b), (seg, seg + 3 * MIB / 2));
    free(&t, &mut tr, a);
    free(&t, &mut tr, b);
    assert_eq!(release(&sim, &t, &tr, empty), 4 * MIB);
    assert_eq!(sim.bytes_in_use(0), 0);
}

#[test]
fn vmm_free_neighbours_of_two_streams_are_released_together() {
    free_neighbours_of_two_streams_are_released_together(Backend::Vmm);
}

#[test]
fn legacy_free_neighbours_of_two_streams_are_released_together() {
    free_neighbours_of_two_streams_are_released_together(Backend::Legacy);
}
