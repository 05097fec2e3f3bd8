//! Shared test support: a simulated device and a tracker that writes a pattern into every live
//! allocation and checks all of them after every operation (remaps included).
#![allow(dead_code)]

pub mod files;

use std::collections::HashMap;
use std::sync::Arc;
use tessera::driver::sim::{SimConfig, SimDriver};
use tessera::driver::{DevicePtr, Stream};
use tessera::{Config, Tessera};

pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Replay options for a simulated device of `capacity` bytes, every invariant checked.
pub fn replay_opts(capacity: u64) -> tessera::replay::ReplayOptions {
    tessera::replay::ReplayOptions {
        capacity,
        config: Config {
            check_invariants: true,
            ..Config::default()
        },
        ..tessera::replay::ReplayOptions::default()
    }
}

/// A simulated device of `capacity` bytes and an allocator over it (invariants checked after
/// every mutation).
pub fn sim_alloc(capacity: u64, config: Config) -> (Arc<SimDriver>, Tessera) {
    sim_alloc_with(
        SimConfig {
            capacity,
            ..SimConfig::default()
        },
        config,
    )
}

/// [`sim_alloc`] with the default configuration on `backend`.
pub fn sim_alloc_backend(capacity: u64, backend: tessera::Backend) -> (Arc<SimDriver>, Tessera) {
    sim_alloc(
        capacity,
        Config {
            backend,
            ..Config::default()
        },
    )
}

/// A simulated device as `sim` says and an allocator over it (invariants checked after every
/// mutation).
pub fn sim_alloc_with(sim: SimConfig, config: Config) -> (Arc<SimDriver>, Tessera) {
    let sim = Arc::new(SimDriver::new(sim));
    let config = Config {
        check_invariants: true,
        ..config
    };
    let t = Tessera::new(sim.clone(), config).expect("allocator over the simulated device");
    (sim, t)
}

/// Stride between pattern words: one `u64` every 512 B covers every page and every block.
const STRIDE: u64 = 512;

/// The word at offset `off` of the allocation with `seed` (keyed by offset, so that an offset
/// listed twice gets the same word).
fn word(seed: u64, off: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ off.wrapping_mul(0xD1B5_4A32_D192_ED03)
}

/// Live allocations with their patterns.
pub struct Tracker {
    live: HashMap<DevicePtr, (u64, u64)>,
    next_seed: u64,
    /// Bytes between pattern words (the last word of each allocation is always written too).
    stride: u64,
}

impl Default for Tracker {
    /// One word every 512 B: every block, every page.
    fn default() -> Self {
        Tracker {
            live: HashMap::new(),
            next_seed: 0,
            stride: STRIDE,
        }
    }
}

impl Tracker {
    /// One word every 64 KiB and the last: every page (2 MiB) still holds many, so data lost or
    /// moved by a remap shows, at a fraction of the cost (for tests that run a scenario hundreds
    /// of times).
    pub fn sparse() -> Self {
        Tracker {
            stride: 64 << 10,
            ..Tracker::default()
        }
    }

    /// Records a new allocation and writes its pattern.
    pub fn add(&mut self, ptr: DevicePtr, size: u64) {
        self.next_seed += 1;
        let seed = self.next_seed;
        // SAFETY: `ptr` is a live simulated-device allocation of `size` bytes, fresh and ours.
        unsafe { write_pattern(ptr, size, seed, self.stride) };
        assert!(
            self.live.insert(ptr, (size, seed)).is_none(),
            "pointer {ptr:#x} handed out twice"
        );
    }

    pub fn remove(&mut self, ptr: DevicePtr) -> u64 {
        self.check_one(ptr);
        self.live.remove(&ptr).expect("tracked pointer").0
    }

    fn check_one(&self, ptr: DevicePtr) {
        let (size, seed) = self.live[&ptr];
        // SAFETY: as in `add`; the allocation is still live.
        unsafe { check_pattern(ptr, size, seed, self.stride) };
    }

    /// Checks every live allocation's pattern, and that no two overlap.
    pub fn check(&self) {
        let mut spans: Vec<(u64, u64)> = self.live.iter().map(|(&p, &(s, _))| (p, p + s)).collect();
        spans.sort_unstable();
        for w in spans.windows(2) {
            assert!(
                w[0].1 <= w[1].0,
                "allocations {:#x} and {:#x} overlap",
                w[0].0,
                w[1].0
            );
        }
        for &ptr in self.live.keys() {
            self.check_one(ptr);
        }
    }

    pub fn ptrs(&self) -> Vec<DevicePtr> {
        let mut v: Vec<_> = self.live.keys().copied().collect();
        v.sort_unstable();
        v
    }

    pub fn len(&self) -> usize {
        self.live.len()
    }

    pub fn is_empty(&self) -> bool {
        self.live.is_empty()
    }
}

/// Writes the pattern of `seed` into the allocation: one word every `stride` bytes and the last.
///
/// # Safety
/// `[ptr, ptr + max(size, 8))` is a live simulated-device allocation (host memory mapped
/// read/write in this process), 8-aligned, that no other thread reads or writes meanwhile.
pub unsafe fn write_pattern(ptr: DevicePtr, size: u64, seed: u64, stride: u64) {
    for off in offsets(size, stride) {
        // SAFETY: the caller's contract; `off + 8 <= max(size, 8)`, and `off` is 8-aligned.
        unsafe { ((ptr + off) as *mut u64).write(word(seed, off)) };
    }
}

/// Panics unless the allocation still holds the pattern [`write_pattern`] wrote.
///
/// # Safety
/// As [`write_pattern`] (no other thread writes it meanwhile).
pub unsafe fn check_pattern(ptr: DevicePtr, size: u64, seed: u64, stride: u64) {
    for off in offsets(size, stride) {
        // SAFETY: as in `write_pattern`.
        let got = unsafe { ((ptr + off) as *const u64).read() };
        assert_eq!(
            got,
            word(seed, off),
            "allocation {ptr:#x} (size {size}) corrupted at offset {off}"
        );
    }
}

fn offsets(size: u64, stride: u64) -> impl Iterator<Item = u64> {
    // Every request is rounded up to 512 B, so even a request of under 8 bytes holds one word.
    let size = size.max(8);
    let last = size - 8;
    (0..size.div_ceil(stride))
        .map(move |i| (i * stride).min(last) & !7)
        .chain(std::iter::once(last & !7))
}

/// Allocates, tracks, checks.
pub fn alloc(
    t: &Tessera,
    tr: &mut Tracker,
    size: u64,
    stream: Stream,
) -> tessera::Result<DevicePtr> {
    let p = t.allocate(0, size, stream)?;
    tr.add(p, size);
    tr.check();
    t.check_invariants(0).unwrap();
    Ok(p)
}

/// Frees, untracks, checks.
pub fn free(t: &Tessera, tr: &mut Tracker, ptr: DevicePtr) {
    tr.remove(ptr);
    t.free(0, ptr).expect("free of a live allocation");
    tr.check();
    t.check_invariants(0).unwrap();
}
