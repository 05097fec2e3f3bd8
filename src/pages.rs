//! Pages and virtual ranges: which physical page backs which virtual page. Remapping lives here.
//!
//! # Data structure
//! - [`PhysicalPage`]: one `cuMemCreate` allocation of exactly one page (`page_size` bytes, a multiple
//!   of the driver's granularity). One handle per page keeps every page movable on its own.
//! - [`VirtualRange`]: one `cuMemAddressReserve` reservation, cut into page-sized slots. A slot is a
//!   `Hole` (reserved, nothing mapped) or holds one page, mapped with read/write access. A range
//!   serves either large blocks or small granules ([`RangeKind`]), never both, so small long-lived
//!   data never sits inside the ranges that large blocks grow into.
//! - The page pool: pages that are created but mapped nowhere. They are fungible: any request can
//!   map them anywhere.
//!
//! # Invariants (checked by [`PageTable::check_invariants`])
//! - Every live page is in exactly one place: the pool (and mapped nowhere), or exactly one slot
//!   (mapped, or stuck: left mapped by a failed unmap) whose address it records.
//! - The last slot of every range is a guard hole that is never mapped, so mapped space in two
//!   ranges that the driver happened to reserve back to back is never contiguous: blocks never grow
//!   across reservations.
//! - `first_hole` of a range is at most the index of its first hole.
//!
//! # Locking
//! None of its own: a `PageTable` belongs to one device's state and is used under that device's lock.
//! Its methods call the driver but never wait on events; waiting is the caller's decision.

use crate::driver::{DevicePtr, Driver, DriverResult, PhysHandle};

/// Index of a page in the table.
pub(crate) type PageId = u32;

/// One physical page.
#[derive(Debug)]
pub(crate) struct PhysicalPage {
    pub(crate) handle: PhysHandle,
    /// Where it is mapped, if anywhere.
    pub(crate) va: Option<DevicePtr>,
    /// It has been mapped before: mapping it again somewhere is a remap.
    pub(crate) was_mapped: bool,
}

/// What a virtual range serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RangeKind {
    Large,
    Small,
}

/// What sits at one page-sized slot of a range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Slot {
    Hole,
    Mapped(PageId),
    /// Mapped, but only because unmapping it failed while undoing a failed map: no block or
    /// granule uses it, and it is unmapped again on the next release of the cache.
    Stuck(PageId),
}

/// One reservation of virtual address space.
#[derive(Debug)]
pub(crate) struct VirtualRange {
    pub(crate) base: DevicePtr,
    pub(crate) kind: RangeKind,
    pub(crate) slots: Vec<Slot>,
    /// No hole lies below this slot index.
    first_hole: usize,
}

impl VirtualRange {
    pub(crate) fn size(&self, page_size: u64) -> u64 {
        self.slots.len() as u64 * page_size
    }
}

/// The device's pages and virtual ranges.
#[derive(Debug)]
pub(crate) struct PageTable {
    pub(crate) page_size: u64,
    /// Size of a new reservation, at least (the device's memory, so one usually suffices).
    reserve_size: u64,
    pages: Vec<Option<PhysicalPage>>,
    free_ids: Vec<PageId>,
    /// Created, unmapped, free pages.
    pub(crate) pool: Vec<PageId>,
    /// Sorted by base address.
    pub(crate) ranges: Vec<VirtualRange>,
    live_pages: u64,
    mapped_pages: u64,
}

impl PageTable {
    pub(crate) fn new(page_size: u64, reserve_size: u64) -> Self {
        PageTable {
            page_size,
            reserve_size: reserve_size.max(page_size).div_ceil(page_size) * page_size,
            pages: Vec::new(),
            free_ids: Vec::new(),
            pool: Vec::new(),
            ranges: Vec::new(),
            live_pages: 0,
            mapped_pages: 0,
        }
    }

    /// Pages created and not yet released (pooled or mapped).
    pub(crate) fn live_pages(&self) -> u64 {
        self.live_pages
    }

    pub(crate) fn mapped_pages(&self) -> u64 {
        self.mapped_pages
    }

    pub(crate) fn page(&self, id: PageId) -> &PhysicalPage {
        self.pages[id as usize]
            .as_ref()
            .expect("page id refers to a live page")
    }

    /// `cuMemCreate` one page. The page is returned, not pooled.
    pub(crate) fn create_page(&mut self, drv: &dyn Driver, dev: usize) -> DriverResult<PageId> {
        let handle = drv.create_physical(dev, self.page_size)?;
        let page = PhysicalPage {
            handle,
            va: None,
            was_mapped: false,
        };
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.pages[id as usize] = Some(page);
                id
            }
            None => {
                self.pages.push(Some(page));
                (self.pages.len() - 1) as PageId
            }
        };
        self.live_pages += 1;
        Ok(id)
    }

    /// `cuMemRelease` an unmapped page that is in no pool. On error the page stays live (the
    /// caller puts it back in the pool).
    pub(crate) fn release_page(
        &mut self,
        drv: &dyn Driver,
        dev: usize,
        id: PageId,
    ) -> DriverResult<()> {
        let handle = self.page(id).handle;
        debug_assert!(self.page(id).va.is_none());
        drv.release_physical(dev, handle)?;
        self.pages[id as usize] = None;
        self.free_ids.push(id);
        self.live_pages -= 1;
        Ok(())
    }

    /// Index of the range holding `va`, if any.
    pub(crate) fn range_of(&self, va: DevicePtr) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.base <= va);
        if i == 0 {
            return None;
        }
        let r = &self.ranges[i - 1];
        (va < r.base + r.size(self.page_size)).then_some(i - 1)
    }

    fn slot_index(&self, range: usize, va: DevicePtr) -> usize {
        ((va - self.ranges[range].base) / self.page_size) as usize
    }

    /// The page mapped at the page-aligned address `va`, if any.
    pub(crate) fn page_at(&self, va: DevicePtr) -> Option<PageId> {
        let r = self.range_of(va)?;
        match self.ranges[r].slots[self.slot_index(r, va)] {
            Slot::Mapped(id) => Some(id),
            Slot::Hole | Slot::Stuck(_) => None,
        }
    }

    /// Number of consecutive holes starting at page-aligned `va`, up to `max` (0 if `va` lies in no
    /// range of `kind`).
    pub(crate) fn holes_at(&self, va: DevicePtr, kind: RangeKind, max: usize) -> usize {
        let Some(r) = self.range_of(va) else { return 0 };
        let range = &self.ranges[r];
        if range.kind != kind {
            return 0;
        }
        let start = self.slot_index(r, va);
        // The guard slot is never counted.
        let usable = range.slots.len() - 1;
        range.slots[start.min(usable)..usable]
            .iter()
            .take(max)
            .take_while(|s| **s == Slot::Hole)
            .count()
    }

    /// Address of `count` consecutive holes in a range of `kind`, first fit; reserves a new range
    /// when none has room.
    pub(crate) fn find_holes(
        &mut self,
        drv: &dyn Driver,
        dev: usize,
        kind: RangeKind,
        count: usize,
    ) -> DriverResult<DevicePtr> {
        for range in self.ranges.iter_mut().filter(|r| r.kind == kind) {
            let usable = range.slots.len() - 1;
            let mut run = 0;
            let mut i = range.first_hole;
            while i < usable {
                if range.slots[i] == Slot::Hole {
                    run += 1;
                    if run == count {
                        return Ok(range.base + (i + 1 - count) as u64 * self.page_size);
                    }
                } else {
                    run = 0;
                }
                i += 1;
            }
        }
        let r = self.reserve_range(drv, dev, kind, count)?;
        Ok(self.ranges[r].base)
    }

    fn reserve_range(
        &mut self,
        drv: &dyn Driver,
        dev: usize,
        kind: RangeKind,
        min_slots: usize,
    ) -> DriverResult<usize> {
        // One guard slot at the end keeps ranges that the driver placed back to back apart.
        let size = self
            .reserve_size
            .max((min_slots as u64 + 1) * self.page_size);
        let base = drv.reserve(dev, size, self.page_size)?;
        let range = VirtualRange {
            base,
            kind,
            slots: vec![Slot::Hole; (size / self.page_size) as usize],
            first_hole: 0,
        };
        let i = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(i, range);
        Ok(i)
    }

    /// Maps `pages` at consecutive slots from `va` (all holes of one range) and grants access over
    /// the whole run. Returns the number of pages that were remaps. All or nothing: on error the
    /// pages mapped so far are unmapped again and every page goes back to the pool; a page whose
    /// unmap fails too stays where it is, quarantined in a `Stuck` slot, until
    /// [`PageTable::retry_stuck`] unmaps it.
    pub(crate) fn map_run(
        &mut self,
        drv: &dyn Driver,
        dev: usize,
        va: DevicePtr,
        pages: &[PageId],
    ) -> DriverResult<u64> {
        let ps = self.page_size;
        let mut done = 0usize;
        let mut result = Ok(());
        for (i, &id) in pages.iter().enumerate() {
            let at = va + i as u64 * ps;
            if let Err(e) = drv.map(dev, at, ps, self.page(id).handle) {
                result = Err(e);
                break;
            }
            done += 1;
        }
        if result.is_ok() {
            result = drv.set_access(dev, va, pages.len() as u64 * ps);
        }
        if let Err(e) = result {
            let r = self.range_of(va).expect("map_run inside a range");
            let first = self.slot_index(r, va);
            for (i, &id) in pages.iter().enumerate() {
                let at = va + i as u64 * ps;
                if i < done && drv.unmap(dev, at, ps).is_err() {
                    self.ranges[r].slots[first + i] = Slot::Stuck(id);
                    self.pages[id as usize].as_mut().expect("live page").va = Some(at);
                    self.mapped_pages += 1;
                } else {
                    self.pool.push(id);
                }
            }
            self.advance_first_hole(r);
            return Err(e);
        }
        let r = self.range_of(va).expect("map_run inside a range");
        let first = self.slot_index(r, va);
        let mut remaps = 0;
        for (i, &id) in pages.iter().enumerate() {
            self.ranges[r].slots[first + i] = Slot::Mapped(id);
            let page = self.pages[id as usize].as_mut().expect("live page");
            remaps += u64::from(page.was_mapped);
            page.was_mapped = true;
            page.va = Some(va + i as u64 * ps);
        }
        self.mapped_pages += pages.len() as u64;
        self.advance_first_hole(r);
        Ok(remaps)
    }

    fn advance_first_hole(&mut self, r: usize) {
        let range = &mut self.ranges[r];
        while range.first_hole < range.slots.len() && range.slots[range.first_hole] != Slot::Hole {
            range.first_hole += 1;
        }
    }

    /// Tries again to unmap quarantined pages; those that unmap go back to the pool.
    pub(crate) fn retry_stuck(&mut self, drv: &dyn Driver, dev: usize) -> DriverResult<()> {
        let ps = self.page_size;
        for r in 0..self.ranges.len() {
            for s in 0..self.ranges[r].slots.len() {
                if let Slot::Stuck(id) = self.ranges[r].slots[s] {
                    let va = self.ranges[r].base + s as u64 * ps;
                    drv.unmap(dev, va, ps)?;
                    self.ranges[r].slots[s] = Slot::Hole;
                    self.ranges[r].first_hole = self.ranges[r].first_hole.min(s);
                    self.pages[id as usize].as_mut().expect("live page").va = None;
                    self.mapped_pages -= 1;
                    self.pool.push(id);
                }
            }
        }
        Ok(())
    }

    /// Unmaps the page at page-aligned `va`. The slot becomes a hole and the page is returned,
    /// unplaced (the caller pools or releases it). On error nothing changes.
    pub(crate) fn unmap_page(
        &mut self,
        drv: &dyn Driver,
        dev: usize,
        va: DevicePtr,
    ) -> DriverResult<PageId> {
        let r = self.range_of(va).expect("unmap inside a range");
        let s = self.slot_index(r, va);
        let Slot::Mapped(id) = self.ranges[r].slots[s] else {
            unreachable!("unmap_page of a hole at {va:#x}")
        };
        drv.unmap(dev, va, self.page_size)?;
        self.ranges[r].slots[s] = Slot::Hole;
        self.ranges[r].first_hole = self.ranges[r].first_hole.min(s);
        self.pages[id as usize].as_mut().expect("live page").va = None;
        self.mapped_pages -= 1;
        Ok(id)
    }

    /// Releases everything: unmaps every page, releases every page, frees every range. Errors are
    /// ignored (teardown, possibly at process exit after the driver is gone).
    pub(crate) fn teardown(&mut self, drv: &dyn Driver, dev: usize) {
        let ps = self.page_size;
        for range in &mut self.ranges {
            for (i, slot) in range.slots.iter_mut().enumerate() {
                if let Slot::Mapped(id) | Slot::Stuck(id) = *slot {
                    let _ = drv.unmap(dev, range.base + i as u64 * ps, ps);
                    if let Some(p) = self.pages[id as usize].as_mut() {
                        p.va = None;
                    }
                    *slot = Slot::Hole;
                }
            }
            let _ = drv.free_reservation(dev, range.base, range.slots.len() as u64 * ps);
        }
        self.ranges.clear();
        for page in self.pages.iter_mut().filter_map(Option::take) {
            let _ = drv.release_physical(dev, page.handle);
        }
        self.pool.clear();
        self.live_pages = 0;
        self.mapped_pages = 0;
    }

    /// Checks the invariants in the module documentation.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let mut seen = vec![0u8; self.pages.len()];
        let mut mapped = 0;
        for (ri, range) in self.ranges.iter().enumerate() {
            if ri > 0 && self.ranges[ri - 1].base >= range.base {
                return Err("ranges not sorted by base".into());
            }
            if range.slots.last() != Some(&Slot::Hole) {
                return Err(format!("range {:#x} has its guard slot mapped", range.base));
            }
            if range.slots[..range.first_hole].contains(&Slot::Hole) {
                return Err(format!(
                    "range {:#x}: first_hole is past a hole",
                    range.base
                ));
            }
            for (i, slot) in range.slots.iter().enumerate() {
                if let Slot::Mapped(id) | Slot::Stuck(id) = *slot {
                    let va = range.base + i as u64 * self.page_size;
                    let page = self.pages.get(id as usize).and_then(Option::as_ref);
                    let Some(page) = page else {
                        return Err(format!("slot {va:#x} maps dead page {id}"));
                    };
                    if page.va != Some(va) {
                        return Err(format!("page {id} mapped at {va:#x} records {:?}", page.va));
                    }
                    seen[id as usize] += 1;
                    mapped += 1;
                }
            }
        }
        for &id in &self.pool {
            let page = self.pages.get(id as usize).and_then(Option::as_ref);
            match page {
                Some(p) if p.va.is_none() => seen[id as usize] += 1,
                _ => return Err(format!("pool holds page {id} that is dead or mapped")),
            }
        }
        if mapped != self.mapped_pages {
            return Err(format!(
                "mapped_pages {} but {} slots mapped",
                self.mapped_pages, mapped
            ));
        }
        let live = self.pages.iter().filter(|p| p.is_some()).count() as u64;
        if live != self.live_pages {
            return Err(format!(
                "live_pages {} but {} pages live",
                self.live_pages, live
            ));
        }
        for (id, page) in self.pages.iter().enumerate() {
            match (page.is_some(), seen[id]) {
                (true, 1) | (false, 0) => {}
                (true, n) => {
                    return Err(format!("live page {id} is in {n} places (want exactly 1)"))
                }
                (false, _) => return Err(format!("dead page {id} is still placed")),
            }
        }
        Ok(())
    }
}
