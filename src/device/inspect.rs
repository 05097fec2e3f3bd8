//! Reading a device: statistics, snapshots, and the invariant check.
//!
//! Everything here runs under the device lock and changes nothing. The figures that need a walk
//! (largest free range, stranded bytes) are computed here rather than kept up to date on the hot
//! path.

use super::DeviceState;
use crate::config::Backend;
use crate::driver::{DevicePtr, Stream};
use crate::pages::{RangeKind, Slot};
use crate::pool::large::BlockState;
use crate::pool::{PoolTag, ORDINARY};
use crate::stats::{
    BlockInfo, BlockStateInfo, PrivatePoolStats, SegmentInfo, SegmentKind, Snapshot, Stats,
};
use rustc_hash::FxHashMap as HashMap;
use std::collections::HashSet;

impl DeviceState {
    /// Maximal runs of mapped slots in large ranges: (start, end).
    fn large_runs(&self) -> Vec<(DevicePtr, DevicePtr)> {
        let ps = self.page_size;
        let mut runs = Vec::new();
        for range in self
            .pages
            .ranges
            .iter()
            .filter(|r| r.kind == RangeKind::Large)
        {
            let mut start = None;
            for (i, slot) in range.slots.iter().enumerate() {
                let va = range.base + i as u64 * ps;
                match (slot, start) {
                    (Slot::Mapped(_), None) => start = Some(va),
                    (Slot::Hole | Slot::Stuck(_), Some(s)) => {
                        runs.push((s, va));
                        start = None;
                    }
                    _ => {}
                }
            }
        }
        runs
    }

    /// Large segments: mapped runs (VMM) or `cuMemAlloc` segments not used as small granules.
    fn large_segments(&self) -> Vec<(DevicePtr, DevicePtr)> {
        match self.backend {
            Backend::Vmm => self.large_runs(),
            Backend::Legacy => self
                .legacy
                .iter()
                .filter(|(&b, _)| !self.small.owns(b))
                .map(|(&b, &s)| (b, b + s))
                .collect(),
        }
    }

    /// (largest free range, stranded bytes). A block free in a thread cache counts as free: the
    /// OOM sequence drains the caches before it gathers pages.
    fn free_space(&self) -> (u64, u64) {
        let ps = self.page_size;
        let cached = self.thread_cached_blocks();
        let mut cached_small: HashMap<DevicePtr, u64> = HashMap::default();
        for &p in &cached {
            if let (Some((_, size, ..)), Some((g, _))) =
                (self.small.slot_of(p), self.small.granule_of(p))
            {
                *cached_small.entry(g).or_default() += size;
            }
        }
        // Pages (VMM) or segments (legacy) touched by a block that is not free.
        let mut live_pages: HashSet<DevicePtr> = HashSet::new();
        let unit = |a: DevicePtr| -> DevicePtr {
            match self.backend {
                Backend::Vmm => a / ps * ps,
                Backend::Legacy => *self
                    .legacy
                    .range(..=a)
                    .next_back()
                    .map(|(b, _)| b)
                    .unwrap_or(&0),
            }
        };
        for (&a, b) in &self.large.blocks {
            if b.state != BlockState::Free && !cached.contains(&a) {
                let mut p = unit(a);
                live_pages.insert(p);
                if self.backend == Backend::Vmm {
                    while p + ps < a + b.size {
                        p += ps;
                        live_pages.insert(p);
                    }
                }
            }
        }
        let mut largest = 0;
        let mut stranded = 0;
        let mut free_pages = self.pages.pool.len() as u64;
        let cached_large = self
            .large
            .blocks
            .iter()
            .filter(|(a, _)| cached.contains(*a));
        for (a, b) in self
            .large
            .free_blocks()
            .chain(cached_large.map(|(&a, b)| (a, b)))
        {
            largest = largest.max(b.size);
            match self.backend {
                Backend::Vmm => {
                    let mut p = a / ps * ps;
                    while p < a + b.size {
                        let overlap = (a + b.size).min(p + ps) - a.max(p);
                        if live_pages.contains(&p) {
                            stranded += overlap;
                        } else if overlap == ps {
                            free_pages += 1;
                        }
                        p += ps;
                    }
                }
                Backend::Legacy => {
                    if live_pages.contains(&unit(a)) {
                        stranded += b.size;
                    }
                }
            }
        }
        for g in self.small.granules() {
            let live = g.live_bytes - cached_small.get(&g.base).copied().unwrap_or(0);
            if live > 0 {
                stranded += ps - live;
            } else if self.backend == Backend::Vmm {
                free_pages += 1;
            }
        }
        if self.backend == Backend::Vmm {
            largest = largest.max(free_pages * ps);
        }
        (largest, stranded)
    }

    /// The device's statistics now.
    pub(crate) fn stats(&self) -> Stats {
        let c = &self.c;
        let live = self.user_live();
        let [thread_cached, hit_allocs, hit_frees, hit_alloc_bytes, _] = self.cache_totals();
        let peak = self.peaks.peak;
        let reserved = self.reserved();
        let (largest, stranded) = self.free_space();
        let segments = self.large_segments().len() + self.small.granule_count();
        let limit = self.limit_bytes();
        Stats {
            allocated_bytes: live.bytes,
            peak_allocated_bytes: peak.bytes.max(live.bytes),
            requested_bytes: live.requested,
            peak_requested_bytes: peak.requested.max(live.requested),
            reserved_bytes: reserved,
            peak_reserved_bytes: c.peak_reserved.max(reserved),
            active_blocks: live.blocks,
            peak_active_blocks: peak.blocks.max(live.blocks),
            cached_free_bytes: reserved.saturating_sub(live.bytes),
            thread_cached_bytes: thread_cached,
            largest_free_bytes: largest,
            stranded_bytes: stranded,
            segments: segments as u64,
            mapped_pages: self.pages.mapped_pages(),
            pool_pages: self.pages.pool.len() as u64,
            allocations: c.allocations + hit_allocs,
            frees: c.frees + hit_frees,
            allocated_bytes_total: c.alloc_bytes + hit_alloc_bytes,
            remaps: c.remaps,
            cache_releases: c.cache_releases,
            released_bytes: c.released_bytes,
            hook_calls: c.hook_calls,
            ooms: c.ooms,
            alloc_retries: c.alloc_retries,
            invalid_frees: c.invalid_frees,
            driver_errors: c.driver_errors,
            last_driver_error: c.last_driver_error.clone(),
            limit_bytes: (limit != u64::MAX).then_some(limit),
            page_size: self.page_size,
            capture_underway: self.capturing(),
            private_pools: self.private_pool_stats(),
        }
    }

    /// Each private pool's figures, by a walk over its blocks and granules.
    fn private_pool_stats(&self) -> Vec<PrivatePoolStats> {
        let mut out: Vec<(PoolTag, PrivatePoolStats)> = self
            .graphs
            .pools()
            .into_iter()
            .map(|p| {
                let s = PrivatePoolStats {
                    id: p.id,
                    uses: p.uses,
                    routed: p.routed,
                    ..PrivatePoolStats::default()
                };
                (p.tag, s)
            })
            .collect();
        if out.is_empty() {
            return Vec::new();
        }
        fn of(
            out: &mut [(PoolTag, PrivatePoolStats)],
            tag: PoolTag,
        ) -> Option<&mut PrivatePoolStats> {
            out.iter_mut().find(|(t, _)| *t == tag).map(|(_, s)| s)
        }
        for b in self.large.blocks.values() {
            if let Some(s) = of(&mut out, b.owner.pool) {
                s.held_bytes += b.size;
                if b.state == BlockState::Allocated {
                    s.allocated_bytes += b.size;
                    s.active_blocks += 1;
                }
            }
        }
        for g in self.small.granules() {
            if let Some(s) = of(&mut out, g.owner.pool) {
                s.held_bytes += self.page_size;
                for slot in self.small.slots_in(g.base) {
                    if !self.pending.contains_key(&slot.addr) {
                        s.allocated_bytes += slot.size;
                        s.active_blocks += 1;
                    }
                }
            }
        }
        out.sort_by_key(|(_, s)| s.id);
        out.into_iter().map(|(_, s)| s).collect()
    }

    /// Peaks restart from the current values.
    pub(crate) fn reset_peak_stats(&mut self) {
        self.reset_peaks();
        self.c.peak_reserved = self.reserved();
    }

    /// Every segment and block.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let pending: HashSet<DevicePtr> = self.pending.keys().copied().collect();
        let kind = match self.backend {
            Backend::Vmm => SegmentKind::Large,
            Backend::Legacy => SegmentKind::Legacy,
        };
        let mut segments: Vec<SegmentInfo> = self
            .large_segments()
            .into_iter()
            .map(|(start, end)| {
                let blocks: Vec<BlockInfo> = self
                    .large
                    .blocks
                    .range(start..end)
                    .map(|(&a, b)| BlockInfo {
                        address: a,
                        size: b.size,
                        requested_size: b.requested,
                        state: match b.state {
                            BlockState::Allocated => BlockStateInfo::Allocated,
                            BlockState::Free => BlockStateInfo::Free,
                            BlockState::Pending => BlockStateInfo::PendingFree,
                        },
                        stream: b.owner.stream,
                        pool: self.graphs.id_of(b.owner.pool),
                    })
                    .collect();
                let stream = blocks.first().map_or(Stream::DEFAULT, |b| b.stream);
                let pool = blocks.first().and_then(|b| b.pool);
                let pool = pool.filter(|&p| blocks.iter().all(|b| b.pool == Some(p)));
                SegmentInfo {
                    address: start,
                    size: end - start,
                    kind,
                    stream,
                    pool,
                    blocks,
                }
            })
            .collect();
        for g in self.small.granules() {
            let blocks = self
                .small
                .slots_in(g.base)
                .into_iter()
                .map(|s| BlockInfo {
                    address: s.addr,
                    size: s.size,
                    requested_size: s.requested,
                    state: if pending.contains(&s.addr) {
                        BlockStateInfo::PendingFree
                    } else {
                        BlockStateInfo::Allocated
                    },
                    stream: s.owner.stream,
                    pool: self.graphs.id_of(s.owner.pool),
                })
                .collect();
            segments.push(SegmentInfo {
                address: g.base,
                size: self.page_size,
                kind: SegmentKind::Small,
                stream: g.owner.stream,
                pool: self.graphs.id_of(g.owner.pool),
                blocks,
            });
        }
        segments.sort_by_key(|s| s.address);
        Snapshot {
            device: self.dev,
            page_size: self.page_size,
            segments,
            stats: self.stats(),
        }
    }

    /// Checks every invariant of the device: those of each structure, and those between them.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        self.pages.check_invariants()?;
        self.large.check_invariants()?;
        self.small.check_invariants()?;
        self.graphs.check_invariants()?;
        self.check_threads()?;
        let ps = self.page_size;

        // Private memory belongs to a pool with uses (at zero uses it was retagged ordinary).
        let orphan = |tag: PoolTag| tag != ORDINARY && self.graphs.id_of(tag).is_none();
        if let Some((a, _)) = self.large.blocks.iter().find(|(_, b)| orphan(b.owner.pool)) {
            return Err(format!(
                "block {a:#x} belongs to a private pool with no use left"
            ));
        }
        if let Some(g) = self.small.granules().find(|g| orphan(g.owner.pool)) {
            return Err(format!(
                "granule {:#x} belongs to a private pool with no use left",
                g.base
            ));
        }

        // Blocks tile the large segments exactly.
        let mut blocks = self.large.blocks.iter().peekable();
        for (start, end) in self.large_segments() {
            let mut at = start;
            while at < end {
                match blocks.next() {
                    Some((&a, b)) if a == at => {
                        if self.backend == Backend::Legacy && b.region != start {
                            return Err(format!(
                                "block {a:#x} has region {:#x}, not its segment {start:#x}",
                                b.region
                            ));
                        }
                        at += b.size;
                    }
                    Some((&a, _)) => {
                        return Err(format!(
                        "segment [{start:#x}, {end:#x}): expected a block at {at:#x}, found {a:#x}"
                    ))
                    }
                    None => {
                        return Err(format!(
                            "segment [{start:#x}, {end:#x}) is not covered from {at:#x}"
                        ))
                    }
                }
            }
            if at != end {
                return Err(format!(
                    "a block crosses the end of segment [{start:#x}, {end:#x})"
                ));
            }
        }
        if let Some((&a, _)) = blocks.next() {
            return Err(format!("block {a:#x} lies outside every segment"));
        }

        // Small granules: each one is a mapped slot of a small range (VMM) or a page-sized legacy
        // segment, and every such slot or segment is a granule.
        let mut small_slots = 0;
        for g in self.small.granules() {
            match (self.backend, g.page) {
                (Backend::Vmm, Some(id)) => {
                    let r = self.pages.range_of(g.base).map(|r| &self.pages.ranges[r]);
                    if r.map(|r| r.kind) != Some(RangeKind::Small)
                        || self.pages.page_at(g.base) != Some(id)
                    {
                        return Err(format!(
                            "granule {:#x} is not page {id} mapped in a small range",
                            g.base
                        ));
                    }
                }
                (Backend::Legacy, None) if self.legacy.get(&g.base) == Some(&ps) => {}
                _ => return Err(format!("granule {:#x} does not match the backend", g.base)),
            }
        }
        for range in self
            .pages
            .ranges
            .iter()
            .filter(|r| r.kind == RangeKind::Small)
        {
            small_slots += range
                .slots
                .iter()
                .filter(|s| matches!(s, Slot::Mapped(_)))
                .count();
        }
        if self.backend == Backend::Vmm && small_slots != self.small.granule_count() {
            return Err(format!(
                "{small_slots} small slots mapped but {} granules",
                self.small.granule_count()
            ));
        }

        // Parked frees.
        let pending_large = self
            .large
            .blocks
            .values()
            .filter(|b| b.state == BlockState::Pending)
            .count();
        if pending_large != self.pending.values().filter(|p| !p.small).count() {
            return Err("pending large blocks and parked frees disagree".into());
        }

        // Stats equal the sums over blocks and slots.
        let (mut alloc, mut req, mut active) = self.small.totals();
        for p in self.pending.values().filter(|p| p.small) {
            let (_, size, r, _) = self
                .small
                .slot_of(p.ptr)
                .ok_or("a parked small free is not an allocated slot")?;
            alloc -= size;
            req -= r;
            active -= 1;
        }
        for b in self
            .large
            .blocks
            .values()
            .filter(|b| b.state == BlockState::Allocated)
        {
            alloc += b.size;
            req += b.requested;
            active += 1;
        }
        if (alloc, req, active) != (self.c.allocated, self.c.requested, self.c.active) {
            return Err(format!(
                "stats say {} B allocated / {} B requested / {} blocks, the pools hold {alloc} / {req} / {active}",
                self.c.allocated, self.c.requested, self.c.active
            ));
        }
        let legacy_sum: u64 = self.legacy.values().sum();
        if legacy_sum != self.legacy_bytes {
            return Err("legacy_bytes disagrees with the segments".into());
        }
        let in_use = self.drv.bytes_in_use(self.dev);
        if in_use != self.reserved() {
            return Err(format!(
                "the driver holds {in_use} B for us but reserved is {} B",
                self.reserved()
            ));
        }
        // The breakdown counts every reserved byte once, and the live requests as the stats do.
        let b = self.breakdown(Some(Stream(0)));
        if b.total() != b.reserved_bytes || b.requested_bytes != self.c.requested {
            return Err(format!(
                "the breakdown sums to {} B of {} B reserved, with {} B requested of {} B",
                b.total(),
                b.reserved_bytes,
                b.requested_bytes,
                self.c.requested
            ));
        }
        Ok(())
    }
}
