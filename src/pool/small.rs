//! The small pool: size classes carved from granules, kept apart from the large ranges.
//!
//! # Data structure
//! - A *granule* is one page set aside for small requests (a mapped physical page in the VMM
//!   backend, a page-sized `cuMemAlloc` segment in the legacy one). It belongs to one owner (a stream, in a pool) and is
//!   cut into *units* (`unit` bytes, at most 64 a granule, so a `u64` bitmap says which are used).
//! - A *run* is a few contiguous units of one granule given to one size class and carved into equal
//!   slots (mimalloc cuts its segments into pages the same way). Runs are far smaller than a granule
//!   for small classes, so ~40 live classes do not strand ~40 whole granules.
//! - Per owner and class, `partial` lists the runs with a free slot; allocation pops a slot from
//!   the last one: O(1), no driver call.
//! - A run whose last slot is freed goes back to its granule unless it is the only run of its class
//!   for that owner (kept, so that an alloc/free loop does not carve and retire a run each time).
//!   A granule with no run is *empty*: the device layer may reuse it for another owner once the
//!   work on it is done, or unmap its page (the page is fungible again).
//!
//! # Invariants (checked by [`SmallPool::check_invariants`])
//! - Runs of a granule do not overlap and their units are exactly the granule's used bits.
//! - A run is in its owner's partial list for its class iff it has a free slot, and records its
//!   position there.
//! - `live` of a run counts its allocated slots; the free stack holds exactly the others.
//! - Each granule's `live_bytes` is the sum of its allocated slots' sizes.
//!
//! # Locking
//! None of its own; used under the device lock.

use super::{Owner, PoolTag};
use crate::driver::DevicePtr;
use crate::pages::PageId;
use rustc_hash::FxHashMap as HashMap;

const NO_RUN: u32 = u32::MAX;
const NOT_LISTED: u32 = u32::MAX;

/// The size classes: slot sizes, and for each the run length in units.
#[derive(Debug, Clone)]
pub(crate) struct SizeClasses {
    pub(crate) sizes: Vec<u64>,
    /// `ceil(2^64 / size)` per class: the free path divides by multiplying (a 64-bit division
    /// costs tens of cycles; see `divide`).
    recips: Vec<u64>,
    run_units: Vec<u32>,
    /// Class of each size (index: size / 512 - 1).
    by_size: Vec<u16>,
}

impl SizeClasses {
    /// Classes of 512 B steps up to 2 KiB, then `per_doubling` per doubling up to `small_max`.
    pub(crate) fn new(
        small_max: u64,
        per_doubling: u32,
        unit: u64,
        units_per_granule: u32,
    ) -> Self {
        let small_max = small_max.div_ceil(512) * 512;
        let mut sizes: Vec<u64> = (1..=4)
            .map(|i| i * 512)
            .filter(|&s| s <= small_max)
            .collect();
        let mut base = 2048u64;
        while base < small_max {
            let step = base / per_doubling as u64;
            for i in 1..=per_doubling as u64 {
                let s = (base + i * step).div_ceil(512) * 512;
                if s <= small_max && sizes.last() < Some(&s) {
                    sizes.push(s);
                }
            }
            base *= 2;
        }
        if sizes.last() < Some(&small_max) {
            sizes.push(small_max);
        }
        let run_units = sizes
            .iter()
            .map(|&s| Self::pick_run(s, unit, units_per_granule))
            .collect();
        let mut by_size = Vec::with_capacity((small_max / 512) as usize);
        let mut c = 0;
        for k in 1..=small_max / 512 {
            while sizes[c] < k * 512 {
                c += 1;
            }
            by_size.push(c as u16);
        }
        let recips = sizes
            .iter()
            .map(|&s| ((1u128 << 64).div_ceil(u128::from(s))) as u64)
            .collect();
        SizeClasses {
            sizes,
            recips,
            run_units,
            by_size,
        }
    }

    /// `(off / size, off % size == 0)` for class `class`, by one multiplication. Exact when
    /// `off * size < 2^64`: with `m = ceil(2^64 / size)`, `off * m / 2^64` exceeds `off / size`
    /// by less than `off / 2^64 < 1 / size`, too little to reach the next integer. Offsets lie
    /// within a granule and sizes within a granule too, far below 2^32 each.
    #[inline]
    pub(crate) fn divide(&self, class: usize, off: u64) -> (u64, bool) {
        let size = self.sizes[class];
        debug_assert!(u128::from(off) * u128::from(size) < 1u128 << 64);
        let q = ((u128::from(off) * u128::from(self.recips[class])) >> 64) as u64;
        (q, q * size == off)
    }

    /// Run length for slot size `s`: at least one unit and room for 8 slots where the granule
    /// allows, then the length (up to twice that) that wastes the smallest fraction at its tail.
    fn pick_run(s: u64, unit: u64, upg: u32) -> u32 {
        let min = ((8 * s).max(unit).div_ceil(unit) as u32).min(upg).max(1);
        let waste = |r: u32| ((r as u64 * unit) % s) as f64 / (r as u64 * unit) as f64;
        (min..=(2 * min).min(upg))
            .filter(|&r| r as u64 * unit >= s)
            .min_by(|&a, &b| waste(a).total_cmp(&waste(b)).then(a.cmp(&b)))
            .unwrap_or(upg)
    }

    /// Class of a rounded size (a multiple of 512 no larger than the largest class).
    #[inline]
    pub(crate) fn class_of(&self, size: u64) -> usize {
        self.by_size[(size / 512 - 1) as usize] as usize
    }

    pub(crate) fn max_size(&self) -> u64 {
        *self.sizes.last().expect("at least one class")
    }
}

#[derive(Debug)]
struct Run {
    base: DevicePtr,
    granule: u32,
    class: u16,
    first_unit: u16,
    units: u16,
    owner: Owner,
    free: Vec<u32>,
    live: u32,
    /// Requested bytes per slot; 0 = free.
    requested: Vec<u64>,
    partial_pos: u32,
}

#[derive(Debug)]
pub(crate) struct Granule {
    pub(crate) base: DevicePtr,
    /// The mapped page (VMM backend); `None` for a legacy segment.
    pub(crate) page: Option<PageId>,
    pub(crate) owner: Owner,
    used: u64,
    unit_run: Vec<u32>,
    pub(crate) live_bytes: u64,
    /// Free sequence number of the latest free inside it.
    pub(crate) free_seq: u64,
}

impl Granule {
    pub(crate) fn is_empty(&self) -> bool {
        self.used == 0
    }
}

#[derive(Debug, Default)]
struct OwnerLists {
    partial: Vec<Vec<u32>>,
    granules: Vec<u32>,
}

/// What a free found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum SmallFree {
    /// Freed a slot of this size and requested size.
    Freed {
        size: u64,
        requested: u64,
    },
    DoubleFree,
    Interior(DevicePtr),
    /// Inside a granule, but not an allocated slot's start.
    Unknown,
    /// In no granule of this pool: not a small allocation at all.
    NotSmall,
}

/// One allocated slot, for snapshots.
pub(crate) struct SlotInfo {
    pub(crate) addr: DevicePtr,
    pub(crate) size: u64,
    pub(crate) requested: u64,
    pub(crate) owner: Owner,
}

/// Where the bytes of one granule are ([`SmallPool::usage`]); the fields sum to the granule.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct GranuleUsage {
    pub(crate) requested: u64,
    pub(crate) rounding: u64,
    pub(crate) class: u64,
    pub(crate) parked: u64,
    pub(crate) free_slots: u64,
    pub(crate) run_tails: u64,
    pub(crate) idle_runs: u64,
    pub(crate) free_units: u64,
}

/// The small pool of one device.
#[derive(Debug)]
pub(crate) struct SmallPool {
    pub(crate) classes: SizeClasses,
    unit: u64,
    units_per_granule: u32,
    granules: Vec<Option<Granule>>,
    free_granule_ids: Vec<u32>,
    by_addr: GranuleIndex,
    runs: Vec<Option<Run>>,
    free_run_ids: Vec<u32>,
    owners: HashMap<Owner, OwnerLists>,
}

impl SmallPool {
    pub(crate) fn new(granule_size: u64, small_max: u64, per_doubling: u32) -> Self {
        let unit = (64u64 << 10).max(granule_size / 64).min(granule_size);
        let units_per_granule = (granule_size / unit) as u32;
        SmallPool {
            classes: SizeClasses::new(small_max, per_doubling, unit, units_per_granule),
            unit,
            units_per_granule,
            granules: Vec::new(),
            free_granule_ids: Vec::new(),
            by_addr: GranuleIndex::new(granule_size),
            runs: Vec::new(),
            free_run_ids: Vec::new(),
            owners: HashMap::default(),
        }
    }

    /// The hot path: a free slot of `class` on `owner`, if a run has one.
    #[inline]
    pub(crate) fn alloc(
        &mut self,
        owner: Owner,
        class: usize,
        requested: u64,
    ) -> Option<DevicePtr> {
        let lists = self.owners.get_mut(&owner)?;
        let list = lists.partial.get_mut(class)?;
        let &run_id = list.last()?;
        let run = self.runs[run_id as usize]
            .as_mut()
            .expect("listed run is live");
        let slot = run.free.pop().expect("a listed run has a free slot");
        run.live += 1;
        run.requested[slot as usize] = requested;
        if run.free.is_empty() {
            list.pop();
            run.partial_pos = NOT_LISTED;
        }
        let size = self.classes.sizes[class];
        let g = self.granules[run.granule as usize]
            .as_mut()
            .expect("run's granule is live");
        g.live_bytes += size;
        Some(run.base + slot as u64 * size)
    }

    /// Carves a new run of `class` for `owner` from the owner's granules (reclaiming its idle
    /// empty runs first if none has room). Returns false when a new granule is needed.
    #[cold]
    pub(crate) fn grow(&mut self, owner: Owner, class: usize) -> bool {
        if self.carve_run(owner, class) {
            return true;
        }
        self.reclaim_idle_runs(Some(owner));
        self.carve_run(owner, class)
    }

    fn carve_run(&mut self, owner: Owner, class: usize) -> bool {
        let need = self.classes.run_units[class];
        let Some(lists) = self.owners.get(&owner) else {
            return false;
        };
        let found = lists.granules.iter().find_map(|&gid| {
            let g = self.granules[gid as usize]
                .as_ref()
                .expect("listed granule is live");
            find_free_units(g.used, self.units_per_granule, need).map(|u| (gid, u))
        });
        let Some((gid, first)) = found else {
            return false;
        };
        let size = self.classes.sizes[class];
        let slots = (need as u64 * self.unit / size) as u32;
        let g = self.granules[gid as usize].as_mut().expect("live granule");
        let run = Run {
            base: g.base + first as u64 * self.unit,
            granule: gid,
            class: class as u16,
            first_unit: first as u16,
            units: need as u16,
            owner,
            // Pop order hands out low addresses first.
            free: (0..slots).rev().collect(),
            live: 0,
            requested: vec![0; slots as usize],
            partial_pos: NOT_LISTED,
        };
        let run_id = match self.free_run_ids.pop() {
            Some(id) => id,
            None => {
                self.runs.push(None);
                (self.runs.len() - 1) as u32
            }
        };
        for u in first..first + need {
            g.used |= 1 << u;
            g.unit_run[u as usize] = run_id;
        }
        self.runs[run_id as usize] = Some(run);
        self.list_run(run_id);
        true
    }

    fn list_run(&mut self, run_id: u32) {
        let run = self.runs[run_id as usize].as_mut().expect("live run");
        let ncls = self.classes.sizes.len();
        let lists = self.owners.entry(run.owner).or_default();
        lists.partial.resize_with(ncls, Vec::new);
        let list = &mut lists.partial[run.class as usize];
        run.partial_pos = list.len() as u32;
        list.push(run_id);
    }

    fn unlist_run(&mut self, run_id: u32) {
        let run = self.runs[run_id as usize].as_ref().expect("live run");
        let (pos, class, owner) = (run.partial_pos, run.class as usize, run.owner);
        if pos == NOT_LISTED {
            return;
        }
        let list = &mut self.owners.get_mut(&owner).expect("owner lists").partial[class];
        list.swap_remove(pos as usize);
        if let Some(&moved) = list.get(pos as usize) {
            self.runs[moved as usize]
                .as_mut()
                .expect("live run")
                .partial_pos = pos;
        }
        self.runs[run_id as usize]
            .as_mut()
            .expect("live run")
            .partial_pos = NOT_LISTED;
    }

    /// Gives a run's units back to its granule.
    fn retire_run(&mut self, run_id: u32) {
        self.unlist_run(run_id);
        let run = self.runs[run_id as usize].take().expect("live run");
        debug_assert_eq!(run.live, 0);
        self.free_run_ids.push(run_id);
        let g = self.granules[run.granule as usize]
            .as_mut()
            .expect("live granule");
        for u in run.first_unit..run.first_unit + run.units {
            g.used &= !(1 << u);
            g.unit_run[u as usize] = NO_RUN;
        }
    }

    /// Retires every run with no live slot (of one owner, or of all).
    pub(crate) fn reclaim_idle_runs(&mut self, owner: Option<Owner>) {
        let idle: Vec<u32> = self
            .runs
            .iter()
            .enumerate()
            .filter_map(|(i, r)| r.as_ref().map(|r| (i as u32, r)))
            .filter(|(_, r)| r.live == 0 && owner.is_none_or(|s| s == r.owner))
            .map(|(i, _)| i)
            .collect();
        for id in idle {
            self.retire_run(id);
        }
    }

    /// Adds a fresh granule (page-aligned `base`) for `owner`.
    pub(crate) fn add_granule(&mut self, base: DevicePtr, page: Option<PageId>, owner: Owner) {
        let g = Granule {
            base,
            page,
            owner,
            used: 0,
            unit_run: vec![NO_RUN; self.units_per_granule as usize],
            live_bytes: 0,
            free_seq: 0,
        };
        let gid = match self.free_granule_ids.pop() {
            Some(id) => {
                self.granules[id as usize] = Some(g);
                id
            }
            None => {
                self.granules.push(Some(g));
                (self.granules.len() - 1) as u32
            }
        };
        self.by_addr.insert(base, gid);
        self.owners.entry(owner).or_default().granules.push(gid);
    }

    /// Empty granules (no run), with their owner and latest free sequence number.
    pub(crate) fn empty_granules(&self) -> impl Iterator<Item = &Granule> {
        self.granules.iter().flatten().filter(|g| g.is_empty())
    }

    /// Moves the empty granule at `base` to `owner` (its old owner's work on it is done).
    pub(crate) fn retag_granule(&mut self, base: DevicePtr, owner: Owner) {
        let gid = self.by_addr.at(base);
        let g = self.granules[gid as usize].as_mut().expect("live granule");
        debug_assert!(g.is_empty());
        let old = std::mem::replace(&mut g.owner, owner);
        g.free_seq = 0;
        if let Some(lists) = self.owners.get_mut(&old) {
            lists.granules.retain(|&x| x != gid);
        }
        self.owners.entry(owner).or_default().granules.push(gid);
    }

    /// Moves every granule and run of pool `from` to pool `to` (a private pool with no use left
    /// joins the ordinary cache), each keeping its stream. Live slots stay where they are and are
    /// freed into `to`.
    pub(crate) fn retag_pool(&mut self, from: PoolTag, to: PoolTag) {
        let moved: Vec<Owner> = self
            .owners
            .keys()
            .filter(|o| o.pool == from)
            .copied()
            .collect();
        let ncls = self.classes.sizes.len();
        for old in moved {
            let lists = self.owners.remove(&old).expect("listed owner");
            let new = Owner { pool: to, ..old };
            let target = self.owners.entry(new).or_default();
            target.partial.resize_with(ncls, Vec::new);
            for (class, runs) in lists.partial.into_iter().enumerate() {
                for rid in runs {
                    let run = self.runs[rid as usize].as_mut().expect("listed run");
                    run.partial_pos = target.partial[class].len() as u32;
                    target.partial[class].push(rid);
                }
            }
            target.granules.extend(lists.granules);
        }
        for run in self.runs.iter_mut().flatten() {
            if run.owner.pool == from {
                run.owner.pool = to;
            }
        }
        for g in self.granules.iter_mut().flatten() {
            if g.owner.pool == from {
                g.owner.pool = to;
            }
        }
    }

    /// Removes the empty granule at `base` (its page is about to be unmapped or freed).
    pub(crate) fn remove_granule(&mut self, base: DevicePtr) -> Granule {
        let gid = self.by_addr.remove(base);
        let g = self.granules[gid as usize].take().expect("live granule");
        debug_assert!(g.is_empty());
        if let Some(lists) = self.owners.get_mut(&g.owner) {
            lists.granules.retain(|&x| x != gid);
        }
        self.free_granule_ids.push(gid);
        g
    }

    /// The granule holding `ptr`: (base, id).
    #[inline]
    pub(crate) fn granule_of(&self, ptr: DevicePtr) -> Option<(DevicePtr, u32)> {
        self.by_addr.find(ptr)
    }

    /// The run holding `ptr` in granule `gid` at `base`, if any.
    #[inline]
    fn run_at(&self, base: DevicePtr, gid: u32, ptr: DevicePtr) -> Option<u32> {
        let g = self.granules[gid as usize].as_ref().expect("live granule");
        let run = g.unit_run[((ptr - base) / self.unit) as usize];
        (run != NO_RUN).then_some(run)
    }

    fn locate(&self, ptr: DevicePtr) -> Option<(u32, u32)> {
        let (base, gid) = self.granule_of(ptr)?;
        Some((gid, self.run_at(base, gid, ptr)?))
    }

    /// Whether `ptr` lies in a granule of this pool.
    pub(crate) fn owns(&self, ptr: DevicePtr) -> bool {
        self.granule_of(ptr).is_some()
    }

    /// The allocated slot starting at `ptr`: (size, requested, owner).
    pub(crate) fn slot_of(&self, ptr: DevicePtr) -> Option<(DevicePtr, u64, u64, Owner)> {
        let (_, run_id) = self.locate(ptr)?;
        let run = self.runs[run_id as usize].as_ref().expect("live run");
        let size = self.classes.sizes[run.class as usize];
        let slot = (ptr - run.base) / size;
        let req = *run.requested.get(slot as usize)?;
        (req != 0).then_some((run.base + slot * size, size, req, run.owner))
    }

    /// Sets the requested size of the allocated slot starting at `ptr` (a thread cache handed it
    /// out again for another request). Returns the old one, or `None` (nothing changed) if `ptr`
    /// is not an allocated slot's start.
    pub(crate) fn set_requested(&mut self, ptr: DevicePtr, requested: u64) -> Option<u64> {
        debug_assert!(requested != 0, "0 marks a free slot");
        let (_, run_id) = self.locate(ptr)?;
        let run = self.runs[run_id as usize].as_mut().expect("live run");
        let size = self.classes.sizes[run.class as usize];
        if !(ptr - run.base).is_multiple_of(size) {
            return None;
        }
        let r = run.requested.get_mut(((ptr - run.base) / size) as usize)?;
        (*r != 0).then(|| std::mem::replace(r, requested))
    }

    /// Frees the slot at `ptr`, at device free sequence `seq`.
    #[inline]
    pub(crate) fn free(&mut self, ptr: DevicePtr, seq: u64) -> SmallFree {
        let Some((base, gid)) = self.granule_of(ptr) else {
            return SmallFree::NotSmall;
        };
        let Some(run_id) = self.run_at(base, gid, ptr) else {
            return SmallFree::Unknown;
        };
        let run = self.runs[run_id as usize].as_mut().expect("live run");
        let size = self.classes.sizes[run.class as usize];
        let (slot, exact) = self.classes.divide(run.class as usize, ptr - run.base);
        let slot = slot as usize;
        if slot >= run.requested.len() {
            return SmallFree::Unknown;
        }
        if !exact {
            return if run.requested[slot] != 0 {
                SmallFree::Interior(run.base + slot as u64 * size)
            } else {
                SmallFree::Unknown
            };
        }
        let requested = std::mem::take(&mut run.requested[slot]);
        if requested == 0 {
            return SmallFree::DoubleFree;
        }
        run.free.push(slot as u32);
        run.live -= 1;
        let (was_full, now_idle, class, owner) = (
            run.free.len() == 1,
            run.live == 0,
            run.class as usize,
            run.owner,
        );
        let g = self.granules[gid as usize].as_mut().expect("live granule");
        g.live_bytes -= size;
        // A parked free settling late carries an older number: keep the newest.
        g.free_seq = g.free_seq.max(seq);
        if was_full {
            self.list_run(run_id);
        }
        if now_idle {
            // Keep the owner's last run of this class as a cache; give the others back.
            let others = self.owners[&owner].partial[class].len() > 1;
            if others {
                self.retire_run(run_id);
            }
        }
        SmallFree::Freed { size, requested }
    }

    /// Every granule, for stats and snapshots.
    pub(crate) fn granules(&self) -> impl Iterator<Item = &Granule> {
        self.granules.iter().flatten()
    }

    pub(crate) fn granule_count(&self) -> usize {
        self.by_addr.len()
    }

    /// Every allocated slot of the granule at `base`.
    pub(crate) fn slots_in(&self, base: DevicePtr) -> Vec<SlotInfo> {
        let mut out = Vec::new();
        let g = self.granules[self.by_addr.at(base) as usize]
            .as_ref()
            .expect("live granule");
        let mut seen = NO_RUN;
        for &rid in &g.unit_run {
            if rid == NO_RUN || rid == seen {
                continue;
            }
            seen = rid;
            let run = self.runs[rid as usize].as_ref().expect("live run");
            let size = self.classes.sizes[run.class as usize];
            for (i, &req) in run.requested.iter().enumerate() {
                if req != 0 {
                    out.push(SlotInfo {
                        addr: run.base + i as u64 * size,
                        size,
                        requested: req,
                        owner: run.owner,
                    });
                }
            }
        }
        out
    }

    /// Where the bytes of granule `g` are (`parked`: whether an allocated slot is a parked free).
    pub(crate) fn usage(&self, g: &Granule, parked: &dyn Fn(DevicePtr) -> bool) -> GranuleUsage {
        let mut u = GranuleUsage::default();
        let mut seen = NO_RUN;
        for &rid in &g.unit_run {
            if rid == NO_RUN {
                u.free_units += self.unit;
                continue;
            }
            if rid == seen {
                continue;
            }
            seen = rid;
            let run = self.runs[rid as usize].as_ref().expect("live run");
            let size = self.classes.sizes[run.class as usize];
            let span = run.units as u64 * self.unit;
            let slots = run.requested.len() as u64 * size;
            if run.live == 0 {
                u.idle_runs += span;
                continue;
            }
            u.run_tails += span - slots;
            for (s, &req) in run.requested.iter().enumerate() {
                if req == 0 {
                    u.free_slots += size;
                } else if parked(run.base + s as u64 * size) {
                    u.parked += size;
                } else {
                    let rounded = req.div_ceil(512) * 512;
                    u.requested += req;
                    u.rounding += rounded - req;
                    u.class += size - rounded;
                }
            }
        }
        u
    }

    /// (allocated bytes, requested bytes, allocated slots) over the whole pool.
    pub(crate) fn totals(&self) -> (u64, u64, u64) {
        let mut t = (0, 0, 0);
        for run in self.runs.iter().flatten() {
            let size = self.classes.sizes[run.class as usize];
            t.0 += run.live as u64 * size;
            t.1 += run.requested.iter().sum::<u64>();
            t.2 += run.live as u64;
        }
        t
    }

    /// Checks the invariants in the module documentation.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let mut used = vec![0u64; self.granules.len()];
        let mut live_bytes = vec![0u64; self.granules.len()];
        for (rid, run) in self.runs.iter().enumerate() {
            let Some(run) = run else { continue };
            let Some(g) = self
                .granules
                .get(run.granule as usize)
                .and_then(Option::as_ref)
            else {
                return Err(format!("run {rid} points at a dead granule"));
            };
            let size = self.classes.sizes[run.class as usize];
            if run.base != g.base + run.first_unit as u64 * self.unit {
                return Err(format!("run {rid} base does not match its first unit"));
            }
            if run.requested.len() as u64 * size > run.units as u64 * self.unit {
                return Err(format!("run {rid} slots overflow its units"));
            }
            if run.owner != g.owner {
                return Err(format!(
                    "run {rid} and its granule belong to different owners"
                ));
            }
            for u in run.first_unit..run.first_unit + run.units {
                if used[run.granule as usize] & (1 << u) != 0
                    || g.unit_run[u as usize] != rid as u32
                {
                    return Err(format!("run {rid} unit {u} overlaps or is not recorded"));
                }
                used[run.granule as usize] |= 1 << u;
            }
            let live = run.requested.iter().filter(|&&r| r != 0).count();
            if live != run.live as usize || live + run.free.len() != run.requested.len() {
                return Err(format!(
                    "run {rid}: live {} / free {} disagree with slots",
                    run.live,
                    run.free.len()
                ));
            }
            if run.free.iter().any(|&s| run.requested[s as usize] != 0) {
                return Err(format!("run {rid} free stack holds an allocated slot"));
            }
            live_bytes[run.granule as usize] += live as u64 * size;
            let listed = self
                .owners
                .get(&run.owner)
                .and_then(|l| l.partial.get(run.class as usize))
                .and_then(|l| l.get(run.partial_pos as usize))
                == Some(&(rid as u32));
            if listed == run.free.is_empty() {
                return Err(format!(
                    "run {rid}: listed {listed} but {} free slots",
                    run.free.len()
                ));
            }
        }
        for (gid, g) in self.granules.iter().enumerate() {
            let Some(g) = g else { continue };
            if g.used != used[gid] {
                return Err(format!(
                    "granule {:#x} used bits disagree with its runs",
                    g.base
                ));
            }
            if g.live_bytes != live_bytes[gid] {
                return Err(format!(
                    "granule {:#x} live_bytes {} but slots hold {}",
                    g.base, g.live_bytes, live_bytes[gid]
                ));
            }
            if self.by_addr.find(g.base) != Some((g.base, gid as u32)) {
                return Err(format!("granule {:#x} is not indexed by address", g.base));
            }
            if !self
                .owners
                .get(&g.owner)
                .is_some_and(|l| l.granules.contains(&(gid as u32)))
            {
                return Err(format!("granule {:#x} is not in its owner's list", g.base));
            }
        }
        Ok(())
    }
}

/// First index of `need` consecutive zero bits among the low `n` bits of `used`.
fn find_free_units(used: u64, n: u32, need: u32) -> Option<u32> {
    let mut run = 0;
    for u in 0..n {
        if used & (1 << u) == 0 {
            run += 1;
            if run == need {
                return Some(u + 1 - need);
            }
        } else {
            run = 0;
        }
    }
    None
}

/// Granules by address, for the free path: which granule holds a pointer, in a few hash probes
/// instead of an ordered-map walk, and with shifts rather than divisions. A granule at `base` is
/// filed under `base >> shift`, where `1 << shift` is the largest power of two no larger than the
/// granule size `size`. Granules never overlap, so their bases are at least `size >= 1 << shift`
/// apart and no two share a key; the granule holding `ptr` starts after `ptr - size > ptr - (2 <<
/// shift)`, so it is filed under one of the three keys up to `ptr >> shift` (two when `size` is a
/// power of two). Bases need not be aligned (legacy segments are not).
#[derive(Debug)]
struct GranuleIndex {
    map: HashMap<u64, (DevicePtr, u32)>,
    size: u64,
    shift: u32,
}

impl GranuleIndex {
    fn new(size: u64) -> Self {
        GranuleIndex {
            map: HashMap::default(),
            size,
            shift: size.ilog2(),
        }
    }

    fn insert(&mut self, base: DevicePtr, gid: u32) {
        let old = self.map.insert(base >> self.shift, (base, gid));
        debug_assert!(old.is_none(), "granules overlap");
    }

    fn remove(&mut self, base: DevicePtr) -> u32 {
        let (b, gid) = self
            .map
            .remove(&(base >> self.shift))
            .expect("known granule");
        debug_assert_eq!(b, base);
        gid
    }

    /// The id of the granule that starts at `base`.
    fn at(&self, base: DevicePtr) -> u32 {
        match self.map.get(&(base >> self.shift)) {
            Some(&(b, gid)) if b == base => gid,
            _ => panic!("no granule at {base:#x}"),
        }
    }

    /// The granule holding `ptr`: (base, id).
    #[inline]
    fn find(&self, ptr: DevicePtr) -> Option<(DevicePtr, u32)> {
        let key = ptr >> self.shift;
        for k in (key.saturating_sub(2)..=key).rev() {
            match self.map.get(&k) {
                // The nearest granule starting at or below `ptr`: it holds `ptr` or none does
                // (granules further down end before it starts).
                Some(&(base, gid)) if base <= ptr => {
                    return (ptr < base + self.size).then_some((base, gid));
                }
                _ => {}
            }
        }
        None
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_cover_every_size_with_bounded_waste() {
        let c = SizeClasses::new(1 << 20, 4, 64 << 10, 32);
        assert_eq!(&c.sizes[..4], &[512, 1024, 1536, 2048]);
        assert_eq!(c.max_size(), 1 << 20);
        assert!(c.sizes.len() <= 48, "{} classes", c.sizes.len());
        for k in 1..=(1u64 << 20) / 512 {
            let s = k * 512;
            let cls = c.sizes[c.class_of(s)];
            assert!(cls >= s);
            // Four classes per doubling: at most 25% (plus 512 B rounding) above the request.
            assert!(cls <= s + s / 4 + 512, "{s} -> {cls}");
        }
    }

    #[test]
    fn divide_by_multiplying_is_exact() {
        // Every class of the widest configuration, every offset in a 1 GiB granule that matters:
        // slot starts, one past, one before, and the granule's end.
        let c = SizeClasses::new(64 << 20, 16, 64 << 10, 16384);
        for (class, &size) in c.sizes.iter().enumerate() {
            for slot in (0..(1u64 << 30) / size)
                .step_by(97)
                .chain([(1 << 30) / size])
            {
                for off in [
                    slot * size,
                    slot * size + 1,
                    (slot * size).saturating_sub(1),
                ] {
                    assert_eq!(
                        c.divide(class, off),
                        (off / size, off % size == 0),
                        "{off} / {size}"
                    );
                }
            }
        }
    }

    #[test]
    fn granule_index_finds_aligned_and_unaligned_granules() {
        for size in [2u64 << 20, 3 << 20] {
            let mut idx = GranuleIndex::new(size);
            // Aligned, unaligned, and back to back.
            let bases = [
                0x4000_0000,
                0x4000_0000 + size,
                0x5000_0000 + 4096,
                0x6000_0000 + size / 2 + 512,
            ];
            for (i, &b) in bases.iter().enumerate() {
                idx.insert(b, i as u32);
            }
            for (i, &b) in bases.iter().enumerate() {
                assert_eq!(idx.at(b), i as u32);
                for ptr in [b, b + 1, b + size / 2, b + size - 1] {
                    assert_eq!(idx.find(ptr), Some((b, i as u32)), "{ptr:#x} in {b:#x}");
                }
            }
            for ptr in [
                0x4000_0000 - 1,
                0x4000_0000 + 2 * size,
                0x5000_0000 + 4095,
                0x6000_0000 + size / 2 + 511,
                0,
            ] {
                assert_eq!(idx.find(ptr), None, "{ptr:#x}");
            }
            assert_eq!(idx.remove(bases[1]), 1);
            assert_eq!(idx.find(bases[1]), None);
            assert_eq!(idx.len(), 3);
        }
    }

    #[test]
    fn runs_fit_in_a_granule() {
        let c = SizeClasses::new(1 << 20, 4, 64 << 10, 32);
        for (i, &s) in c.sizes.iter().enumerate() {
            let bytes = c.run_units[i] as u64 * (64 << 10);
            assert!(bytes <= 2 << 20 && bytes >= s, "class {s}: run {bytes}");
        }
    }

    #[test]
    fn alloc_free_reuses_slots_and_detects_double_free() {
        let mut p = SmallPool::new(2 << 20, 1 << 20, 4);
        let s = Owner::ordinary(crate::driver::Stream(7));
        let cls = p.classes.class_of(4096);
        assert_eq!(p.alloc(s, cls, 4000), None);
        assert!(!p.grow(s, cls), "no granule yet");
        p.add_granule(0x1000_0000, None, s);
        assert!(p.grow(s, cls));
        let a = p.alloc(s, cls, 4000).unwrap();
        let b = p.alloc(s, cls, 4096).unwrap();
        assert_eq!(b, a + 4096);
        p.check_invariants().unwrap();
        assert_eq!(p.free(a + 8, 1), SmallFree::Interior(a));
        assert_eq!(
            p.free(a, 1),
            SmallFree::Freed {
                size: 4096,
                requested: 4000
            }
        );
        assert_eq!(p.free(a, 2), SmallFree::DoubleFree);
        assert_eq!(p.free(0x2000_0000, 2), SmallFree::NotSmall);
        assert_eq!(p.alloc(s, cls, 512), Some(a), "freed slot reused first");
        p.free(a, 3);
        p.free(b, 4);
        p.check_invariants().unwrap();
        // The only run of its class stays cached; reclaiming empties the granule.
        assert_eq!(p.empty_granules().count(), 0);
        p.reclaim_idle_runs(None);
        assert_eq!(p.empty_granules().count(), 1);
        p.check_invariants().unwrap();
    }

    #[test]
    fn free_units_search() {
        assert_eq!(find_free_units(0, 32, 32), Some(0));
        assert_eq!(find_free_units(0b1011, 32, 2), Some(4));
        assert_eq!(find_free_units(u32::MAX as u64, 32, 1), None);
    }
}
