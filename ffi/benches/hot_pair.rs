//! The hot pair: malloc + free of one size on one stream, a cache hit, beside its peers in the same
//! run so that ratios hold on a shared machine:
//! - `tessera`: the Rust API over a simulated device (a hit never reaches the driver);
//! - `c_abi`: `tessera_malloc` + `tessera_free`, the pair PyTorch calls (the process-wide allocator,
//!   the panic guard, the device check);
//! - `mimalloc` and `system`: the CPU allocators' pair of the same size, the floor;
//! - `lock_floor`: two uncontended lock/unlock pairs of the `parking_lot` mutex that guards a
//!   device, with nothing inside: what any design with one lock per device pays per pair.
//!
//! It lives in the ffi package because the C ABI is a cdylib that no other crate can link: the
//! entry points are compiled into this benchmark from the same source.
//!
//! `cargo bench -p tessera-ffi --bench hot_pair`; CI runs each case once (`-- --test`).

#[allow(dead_code, unused_imports)]
#[path = "../src/lib.rs"]
mod tessera_ffi;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::Arc;
use tessera_core::driver::sim::{SimConfig, SimDriver};
use tessera_core::driver::Stream;
use tessera_core::{Config, Tessera};

const SIZES: [(u64, &str); 4] = [
    (512, "512B"),
    (64 << 10, "64KiB"),
    (2 << 20, "2MiB"),
    (64 << 20, "64MiB"),
];

fn pair_of(alloc: &impl GlobalAlloc, layout: Layout) {
    // SAFETY: `layout` has a non-zero size; the pointer is freed with the layout it was made with.
    unsafe {
        let p = alloc.alloc(layout);
        assert!(!p.is_null());
        alloc.dealloc(black_box(p), layout);
    }
}

fn bench_hot_pair(c: &mut Criterion) {
    // The C ABI's process-wide allocator reads these at its first use, below.
    std::env::set_var("TESSERA_DRIVER", "sim");
    std::env::set_var("TESSERA_SIM", "capacity:1GiB");
    std::env::set_var("TESSERA_CONF", "check_invariants:false");
    std::env::remove_var("TESSERA_TRACE");

    let sim = SimDriver::new(SimConfig {
        capacity: 1 << 30,
        ..SimConfig::default()
    });
    let config = Config::builder().check_invariants(false).build().unwrap();
    let t = Tessera::untraced(Arc::new(sim), config).unwrap();

    let mut group = c.benchmark_group("hot_pair");
    for (size, name) in SIZES {
        // Warm each cache once, so that every measured pair is a hit.
        t.free(0, t.allocate(0, size, Stream::DEFAULT).unwrap())
            .unwrap();
        let p = tessera_ffi::tessera_malloc(size as usize, 0, std::ptr::null_mut());
        assert!(!p.is_null(), "the C ABI allocates on the simulated device");
        tessera_ffi::tessera_free(p, 0, 0, std::ptr::null_mut());

        group.bench_with_input(BenchmarkId::new("tessera", name), &size, |b, &size| {
            b.iter(|| {
                let p = t.allocate(0, black_box(size), Stream::DEFAULT).unwrap();
                t.free(0, black_box(p)).unwrap();
            })
        });
        group.bench_with_input(BenchmarkId::new("c_abi", name), &size, |b, &size| {
            b.iter(|| {
                let p =
                    tessera_ffi::tessera_malloc(black_box(size) as usize, 0, std::ptr::null_mut());
                tessera_ffi::tessera_free(black_box(p), 0, 0, std::ptr::null_mut());
            })
        });
        let layout = Layout::from_size_align(size as usize, 16).unwrap();
        group.bench_with_input(BenchmarkId::new("mimalloc", name), &layout, |b, &l| {
            b.iter(|| pair_of(&mimalloc::MiMalloc, black_box(l)))
        });
        group.bench_with_input(BenchmarkId::new("system", name), &layout, |b, &l| {
            b.iter(|| pair_of(&System, black_box(l)))
        });
        let lock = parking_lot::Mutex::new(0u64);
        group.bench_with_input(BenchmarkId::new("lock_floor", name), &size, |b, &size| {
            b.iter(|| {
                *lock.lock() += black_box(size);
                *lock.lock() -= black_box(size);
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_hot_pair);
criterion_main!(benches);
