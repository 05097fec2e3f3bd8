//! Concurrency: threads allocating and freeing on one device and on two, with patterns checked by
//! each thread for its own allocations, and every invariant checked at the end.

mod common;
use common::*;
use std::sync::Arc;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::{Driver, Stream};
use tessera::{Config, Tessera};

/// A deterministic stream of sizes across small classes and whole pages.
fn sizes(seed: u64) -> impl Iterator<Item = u64> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    std::iter::from_fn(move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        Some(match x % 4 {
            0 => 1 + x % 4096,
            1 => 1 + x % (1 << 20),
            2 => (1 << 20) + x % (3 << 20),
            _ => 512 * (1 + x % 64),
        })
    })
}

fn worker(t: &Tessera, device: usize, stream: Stream, seed: u64, ops: usize) {
    let mut live: Vec<(u64, u64, u8)> = Vec::new();
    for (i, size) in sizes(seed).take(ops).enumerate() {
        if live.len() > 24 || (i % 3 == 2 && !live.is_empty()) {
            let (p, n, tag) = live.swap_remove(i % live.len());
            // SAFETY: `p` is a live allocation of `n` bytes on the simulated device (host memory).
            let bytes = unsafe { std::slice::from_raw_parts(p as *const u8, n as usize) };
            assert!(
                bytes.iter().all(|&b| b == tag),
                "allocation {p:#x} corrupted"
            );
            t.free(device, p).unwrap();
        } else {
            let p = t.allocate(device, size, stream).unwrap();
            let tag = (i % 251) as u8 + 1;
            // SAFETY: as above; the allocation is fresh and ours alone.
            unsafe { std::ptr::write_bytes(p as *mut u8, tag, size as usize) };
            live.push((p, size, tag));
        }
    }
    for (p, _, _) in live {
        t.free(device, p).unwrap();
    }
}

#[test]
fn two_threads_on_one_device_and_two_devices() {
    let sim = Arc::new(SimDriver::new(SimConfig {
        devices: 2,
        capacity: 512 * MIB,
        ..SimConfig::default()
    }));
    let t = Arc::new(Tessera::new(sim.clone(), Config::default()).unwrap());
    let plan = [
        (0, Stream(1)),
        (0, Stream(2)),
        (1, Stream(1)),
        (1, Stream::DEFAULT),
    ];
    let handles: Vec<_> = plan
        .iter()
        .enumerate()
        .map(|(k, &(dev, stream))| {
            let t = Arc::clone(&t);
            std::thread::spawn(move || worker(&t, dev, stream, k as u64 + 1, 600))
        })
        .collect();
    // Meanwhile, empty the caches and read stats from this thread.
    for _ in 0..20 {
        t.empty_cache(0).unwrap();
        let _ = t.stats(1).unwrap();
        std::thread::yield_now();
    }
    for h in handles {
        h.join().expect("worker thread");
    }
    for dev in 0..2 {
        t.check_invariants(dev).unwrap();
        let s = t.stats(dev).unwrap();
        assert_eq!((s.allocated_bytes, s.active_blocks), (0, 0));
        t.empty_cache(dev).unwrap();
        assert_eq!(sim.bytes_in_use(dev), 0, "device {dev} fully released");
    }
}

#[test]
fn free_without_device_finds_it_by_address() {
    let sim = Arc::new(SimDriver::new(SimConfig {
        devices: 2,
        capacity: 64 * MIB,
        ..SimConfig::default()
    }));
    let t = Tessera::new(sim, Config::default()).unwrap();
    let a = t.allocate(0, 3 * MIB, Stream::DEFAULT).unwrap();
    let b = t.allocate(1, 4096, Stream::DEFAULT).unwrap();
    assert_eq!(
        t.allocation(b + 100).map(|x| (x.device, x.base)),
        Some((1, b))
    );
    t.free_any(a).unwrap();
    t.free_any(b).unwrap();
    assert_eq!(
        t.stats(0).unwrap().active_blocks + t.stats(1).unwrap().active_blocks,
        0
    );
    assert!(t.free_any(b).is_err(), "second free is an error");
}
