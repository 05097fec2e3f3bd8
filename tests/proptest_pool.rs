//! Random sequences of operations (allocations across size classes and pages, frees, streams,
//! `record_stream`, held streams, `empty_cache`, `trim`, limits) on a 128 MiB simulated device:
//! after every step every live pattern is intact and every invariant holds; and a large request
//! succeeds whenever, with no stream held, the cache has a free range or free pages for it or
//! the limit leaves room for new pages.

mod common;
use common::*;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use tessera::driver::{Driver, Stream};
use tessera::Backend;

const CAPACITY: u64 = 128 * MIB;

#[derive(Clone, Debug)]
enum Op {
    Alloc(u64, u64),
    /// A live allocation, picked by a fraction of `u64::MAX` (as `proptest::sample::Index`).
    Free(u64),
    Record(u64, u64),
    Hold(u64),
    Release(u64),
    EmptyCache,
    Trim,
    SetLimit(Option<u64>),
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 1u64..=4096,
        3 => 4097u64..=MIB,
        4 => MIB + 1..=3 * MIB,
        1 => 3 * MIB + 1..=20 * MIB,
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => (size(), 0u64..3).prop_map(|(s, st)| Op::Alloc(s, st)),
        9 => any::<u64>().prop_map(Op::Free),
        1 => (any::<u64>(), 0u64..3).prop_map(|(i, s)| Op::Record(i, s)),
        1 => (1u64..3).prop_map(Op::Hold),
        1 => (1u64..3).prop_map(Op::Release),
        1 => Just(Op::EmptyCache),
        1 => Just(Op::Trim),
        1 => prop_oneof![Just(None), (8u64..=128).prop_map(|m| Some(m * MIB))]
            .prop_map(Op::SetLimit),
    ]
}

fn pick(raw: u64, len: usize) -> usize {
    ((len as u128 * raw as u128) >> 64) as usize
}

fn run(backend: Backend, ops: &[Op]) {
    let (sim, t) = sim_alloc_backend(CAPACITY, backend);
    let mut tr = Tracker::default();
    let mut held: Vec<u64> = Vec::new();
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Alloc(size, stream) => {
                let st = t.stats(0).unwrap();
                let ps = st.page_size;
                let rounded = size.div_ceil(512) * 512;
                let pages = rounded.div_ceil(ps) * ps;
                let ceiling = st.limit_bytes.unwrap_or(u64::MAX).min(CAPACITY);
                // (A request over a limit lowered below what is cached is left out: see
                // limits.rs, a_request_over_a_lowered_limit_is_served_from_any_streams_cache.)
                let must = held.is_empty()
                    && rounded > MIB
                    && rounded <= ceiling
                    && (st.largest_free_bytes >= rounded || st.reserved_bytes + pages <= ceiling);
                match alloc(&t, &mut tr, size, Stream(stream)) {
                    Ok(_) => {}
                    Err(e) => {
                        assert!(e.is_out_of_memory(), "step {step}: {e:?}");
                        assert!(
                            !must,
                            "step {step}: {size} B on stream {stream} failed though it fits: \
                             {st:?}\n{e}"
                        );
                    }
                }
            }
            Op::Free(i) => {
                let ptrs = tr.ptrs();
                if !ptrs.is_empty() {
                    free(&t, &mut tr, ptrs[pick(i, ptrs.len())]);
                }
            }
            Op::Record(i, s) => {
                let ptrs = tr.ptrs();
                if !ptrs.is_empty() {
                    t.record_stream(ptrs[pick(i, ptrs.len())], Stream(s))
                        .expect("record_stream of a live pointer");
                }
            }
            Op::Hold(s) => {
                sim.hold_stream(0, Stream(s));
                if !held.contains(&s) {
                    held.push(s);
                }
            }
            Op::Release(s) => {
                sim.release_stream(0, Stream(s));
                held.retain(|&h| h != s);
            }
            Op::EmptyCache => {
                let before = t.stats(0).unwrap().reserved_bytes;
                let released = t.empty_cache(0).unwrap();
                assert_eq!(t.stats(0).unwrap().reserved_bytes, before - released);
            }
            Op::Trim => {
                let before = t.stats(0).unwrap().reserved_bytes;
                let released = t.trim(0).unwrap();
                assert_eq!(t.stats(0).unwrap().reserved_bytes, before - released);
            }
            Op::SetLimit(l) => t.set_limit(0, l).unwrap(),
        }
        tr.check();
        t.check_invariants(0)
            .unwrap_or_else(|e| panic!("step {step} ({op:?}): {e}"));
        let st = t.stats(0).unwrap();
        assert_eq!(st.active_blocks, tr.len() as u64, "step {step}");
        assert_eq!(sim.bytes_in_use(0), st.reserved_bytes, "step {step}");
        assert!(st.reserved_bytes <= CAPACITY);
    }
    // Everything goes back.
    for s in held {
        sim.release_stream(0, Stream(s));
    }
    for p in tr.ptrs() {
        free(&t, &mut tr, p);
    }
    t.empty_cache(0).unwrap();
    t.check_invariants(0).unwrap();
    assert_eq!(t.stats(0).unwrap().reserved_bytes, 0);
    assert_eq!(sim.bytes_in_use(0), 0);
    assert_eq!(sim.live_mappings(0), 0);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 64,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct(
            "tests/proptest-regressions/proptest_pool.txt",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn vmm_random_operations_keep_data_and_invariants(ops in prop::collection::vec(op(), 1..100)) {
        run(Backend::Vmm, &ops);
    }

    #[test]
    fn legacy_random_operations_keep_data_and_invariants(ops in prop::collection::vec(op(), 1..100)) {
        run(Backend::Legacy, &ops);
    }
}

/// Cases proptest found before (shrunk), kept as plain tests on both backends.
#[test]
fn regressions() {
    use Op::*;
    let cases: Vec<Vec<Op>> = vec![
        vec![
            Alloc(2097153, 0),
            Alloc(1, 0),
            Alloc(2685653, 2),
            Alloc(2778141, 1),
            Hold(2),
            Free(13433440295140236488),
            Alloc(2751, 1),
            Alloc(1474685, 2),
            Alloc(1528199, 0),
        ],
        // Extending a free block whose left neighbour (another stream's, settled) merges with it
        // while pages are gathered.
        vec![
            Alloc(1471489, 0),
            Alloc(1, 0),
            Alloc(1303041, 0),
            Alloc(2816001, 0),
            SetLimit(Some(12582912)),
            Alloc(1053925, 1),
            Free(15432478627675266623),
            Free(17594303990399187289),
            Alloc(602369, 2),
            Alloc(2917299, 1),
        ],
        // A legacy segment split between two streams' free blocks.
        vec![
            Alloc(4194305, 0),
            Free(0),
            Alloc(1048577, 0),
            Alloc(1048577, 1),
        ],
        // Sizes under 8 bytes.
        vec![Alloc(1, 0), Alloc(7, 1), Free(0), Alloc(3, 2)],
    ];
    for ops in cases {
        run(Backend::Vmm, &ops);
        run(Backend::Legacy, &ops);
    }
}
