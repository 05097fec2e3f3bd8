//! The headline behaviour: fully free pages are remapped into a contiguous range, so a request
//! that no free range fits succeeds, and no live allocation moves or changes. The legacy backend,
//! which cannot remap, fails the same request with an OOM that explains itself.

mod common;
use common::*;
use tessera::driver::{Driver, Stream};
use tessera::{Backend, Config};

#[test]
fn remapping_serves_a_request_that_no_free_range_fits() {
    let (sim, t) = sim_alloc(64 * MIB, Config::default());
    let mut tr = Tracker::default();
    let mut blocks = Vec::new();
    // 32 blocks of 2 MiB fill the device exactly: page-granular mapping wastes nothing here.
    for _ in 0..32 {
        blocks.push(alloc(&t, &mut tr, 2 * MIB, Stream::DEFAULT).unwrap());
    }
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 64 * MIB);
    assert!(
        t.allocate(0, 2 * MIB, Stream::DEFAULT).is_err(),
        "the device is full"
    );
    // Free every other block: 32 MiB free, but no two free pages adjacent.
    for p in blocks.iter().step_by(2) {
        free(&t, &mut tr, *p);
    }
    let before = t.stats(0).unwrap();
    assert_eq!(before.allocated_bytes, 32 * MIB);
    assert_eq!(
        before.largest_free_bytes,
        32 * MIB,
        "all free pages can be gathered"
    );
    let big =
        alloc(&t, &mut tr, 32 * MIB, Stream::DEFAULT).expect("remapping gathers the free pages");
    let after = t.stats(0).unwrap();
    assert_eq!(after.reserved_bytes, 64 * MIB, "no new memory was needed");
    assert_eq!(
        after.remaps, 16,
        "each of the 16 free pages was remapped once"
    );
    assert_eq!(sim.bytes_in_use(0), 64 * MIB);
    tr.check();
    // The surviving blocks kept their addresses and data; the new one is usable end to end.
    assert!(!blocks.iter().skip(1).step_by(2).any(|&p| p == big));
    for p in tr.ptrs() {
        free(&t, &mut tr, p);
    }
    t.empty_cache(0).unwrap();
    assert_eq!(sim.bytes_in_use(0), 0, "everything went back to the device");
}

#[test]
fn legacy_backend_fails_the_same_request_and_says_why() {
    let config = Config {
        backend: Backend::Legacy,
        ..Config::default()
    };
    let (_sim, t) = sim_alloc(64 * MIB, config);
    let mut tr = Tracker::default();
    // 16 segments of 4 MiB, each holding two 2 MiB blocks.
    let mut blocks = Vec::new();
    for _ in 0..16 {
        blocks.push(alloc(&t, &mut tr, 4 * MIB, Stream::DEFAULT).unwrap());
    }
    for p in blocks.drain(..) {
        free(&t, &mut tr, p);
    }
    let mut live = Vec::new();
    for _ in 0..32 {
        live.push(alloc(&t, &mut tr, 2 * MIB, Stream::DEFAULT).unwrap());
    }
    // Free one block of each segment: 32 MiB free, a live block left in every segment.
    for p in live.iter().step_by(2) {
        free(&t, &mut tr, *p);
    }
    let err = t.allocate(0, 32 * MIB, Stream::DEFAULT).unwrap_err();
    assert!(err.is_out_of_memory(), "{err}");
    let msg = err.to_string();
    assert!(msg.starts_with("CUDA out of memory."), "{msg}");
    assert!(msg.contains("Tried to allocate 32.00 MiB"), "{msg}");
    assert!(msg.contains("32.00 MiB cached free"), "{msg}");
    assert!(
        msg.contains("largest free range 4.00 MiB") || msg.contains("largest free range 2.00 MiB"),
        "{msg}"
    );
    tr.check();
    t.check_invariants(0).unwrap();
}
