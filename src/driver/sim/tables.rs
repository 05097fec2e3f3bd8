//! The small data structures behind the simulated driver: a set of address ranges, an extent
//! allocator (memfd offsets or fake addresses), and the injected faults.

use std::collections::BTreeMap;

use rand::rngs::SmallRng;
use rand::Rng;

use crate::driver::{Call, CudaError};

/// Disjoint, non-adjacent half-open ranges `start -> end`. The simulated driver's accessible
/// ranges, and the replay's segments when recording began.
#[derive(Default, Debug)]
pub(crate) struct RangeSet(pub(super) BTreeMap<u64, u64>);

impl RangeSet {
    pub(crate) fn insert(&mut self, mut start: u64, mut end: u64) {
        if let Some((&s, &e)) = self.0.range(..=start).next_back() {
            if e >= start {
                self.0.remove(&s);
                start = s;
                end = end.max(e);
            }
        }
        while let Some((&s, &e)) = self.0.range(start..=end).next() {
            self.0.remove(&s);
            end = end.max(e);
        }
        self.0.insert(start, end);
    }

    pub(crate) fn remove(&mut self, start: u64, end: u64) {
        if let Some((&s, &e)) = self.0.range(..start).next_back() {
            if e > start {
                self.0.insert(s, start);
                if e > end {
                    self.0.insert(end, e);
                }
            }
        }
        let inside: Vec<(u64, u64)> = self.0.range(start..end).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in inside {
            self.0.remove(&s);
            if e > end {
                self.0.insert(end, e);
            }
        }
    }

    pub(super) fn contains(&self, x: u64) -> bool {
        self.0.range(..=x).next_back().is_some_and(|(_, &e)| e > x)
    }

    /// Whether `[start, end)` (not empty) lies inside one range (the replay's reconstruction).
    #[cfg(feature = "replay")]
    pub(crate) fn contains_range(&self, start: u64, end: u64) -> bool {
        self.0
            .range(..=start)
            .next_back()
            .is_some_and(|(_, &e)| e >= end)
    }

    /// Whether `[start, end)` lies wholly inside the set (ranges are merged on insert).
    pub(super) fn covers(&self, start: u64, end: u64) -> bool {
        self.0
            .range(..=start)
            .next_back()
            .is_some_and(|(_, &e)| e >= end)
    }
}

/// A first-fit allocator of aligned extents in `[base, limit)`: free extents below `end`, and
/// everything from `end` up is free. Freed extents are merged, and a free tail lowers `end`.
pub(super) struct Extents {
    pub(super) limit: u64,
    pub(super) end: u64,
    pub(super) free: BTreeMap<u64, u64>,
}

pub(super) fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}

impl Extents {
    pub(super) fn new(base: u64, limit: u64) -> Extents {
        Extents {
            limit,
            end: base,
            free: BTreeMap::new(),
        }
    }

    /// `align` is a power of two.
    pub(super) fn alloc(&mut self, size: u64, align: u64) -> Option<u64> {
        let fit = self.free.iter().find_map(|(&s, &len)| {
            let a = align_up(s, align)?;
            (a.checked_add(size)? <= s + len).then_some((s, len, a))
        });
        if let Some((s, len, a)) = fit {
            self.free.remove(&s);
            if a > s {
                self.free.insert(s, a - s);
            }
            if s + len > a + size {
                self.free.insert(a + size, s + len - (a + size));
            }
            return Some(a);
        }
        let a = align_up(self.end, align)?;
        let new_end = a.checked_add(size).filter(|&e| e <= self.limit)?;
        if a > self.end {
            self.free.insert(self.end, a - self.end);
        }
        self.end = new_end;
        Some(a)
    }

    pub(super) fn release(&mut self, mut start: u64, mut len: u64) {
        if let Some(next) = self.free.remove(&(start + len)) {
            len += next;
        }
        if let Some((&s, &l)) = self.free.range(..start).next_back() {
            if s + l == start {
                self.free.remove(&s);
                start = s;
                len += l;
            }
        }
        if start + len == self.end {
            self.end = start;
        } else {
            self.free.insert(start, len);
        }
    }
}

#[derive(Default)]
pub(super) struct Faults {
    /// `(call, calls left until it fires, error)`.
    pub(super) nth: Vec<(Call, u64, CudaError)>,
    pub(super) random: Vec<(Option<Call>, f64, SmallRng)>,
}

pub(super) fn default_fault(call: Call) -> CudaError {
    match call {
        Call::CreatePhysical | Call::AllocLegacy | Call::Reserve => CudaError::OutOfMemory,
        _ => CudaError::Unknown,
    }
}

impl Faults {
    pub(super) fn check(&mut self, call: Call) -> Option<CudaError> {
        let mut hit = None;
        for (c, left, error) in self.nth.iter_mut() {
            if *c == call {
                *left -= 1;
                if *left == 0 {
                    hit = hit.or(Some(*error));
                }
            }
        }
        self.nth.retain(|f| f.1 > 0);
        for (c, p, rng) in self.random.iter_mut() {
            if (c.is_none() || *c == Some(call)) && rng.random::<f64>() < *p {
                hit = hit.or(Some(default_fault(call)));
            }
        }
        hit
    }
}
