//! The large-block pool: best fit by (owner, size, address), split, coalesce.
//!
//! # Data structure
//! - `blocks`: every large block by start address: `[addr, addr + size)`, allocated, free, or
//!   pending (freed, but waiting for streams recorded with `record_stream`).
//! - `free_index`: the free blocks (not the pending ones) keyed by `(owner, size, addr)`, so the
//!   best fit for an owner (a stream in a pool) is one ordered lookup, O(log n).
//! - Each allocated block carries its lifetime [`Stamp`]: when it was handed out and when it is
//!   predicted to be freed (`lifetimes.rs`).
//!
//! # Placement
//! [`BlockPool::best_fit`] takes the smallest free block that holds the request, at its start.
//! [`BlockPool::fit_near`] does the same when that block is an exact fit (the steady state of a
//! training loop: a freed block is asked for again). Otherwise it weighs the two smallest fits and
//! both ends of each, and puts the block against the live neighbour whose predicted death is
//! closest to its own: blocks that die together end up side by side, so their frees leave one
//! free piece instead of holes between long-lived blocks, which would strand the rest of their
//! pages. With no live neighbour to go by, it is the best fit.
//!
//! Blocks tile mapped memory: in the VMM backend, every run of mapped large slots; in the legacy
//! backend, every `cuMemAlloc` segment. A block's `region` names what it may merge across: the
//! segment base in the legacy backend, 0 in the VMM backend (where mapped neighbours are always
//! contiguous device memory, and unmapped holes already separate blocks by address).
//!
//! # Invariants (checked by [`BlockPool::check_invariants`])
//! - Blocks do not overlap; sizes are positive multiples of 512 B.
//! - `free_index` holds exactly the blocks in state `Free`.
//! - No two address-adjacent `Free` blocks share owner and region: they would have been merged.
//!   Free neighbours of different owners stay apart: each owner reuses its own memory at once,
//!   another stream of its pool only after an event says the work on the first has finished,
//!   and another pool only when the device layer retags it (`retag_pool`).
//!
//! # Locking
//! None of its own; used under the device lock.

use super::lifetimes::Stamp;
use super::{Owner, PoolTag};
use crate::driver::{DevicePtr, Stream};
use std::collections::{BTreeMap, BTreeSet};

/// Minimum block granularity: every size and address is a multiple of it.
pub(crate) const ROUND: u64 = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BlockState {
    Allocated,
    Free,
    /// Freed by its owner, waiting for recorded streams; neither reusable nor mergeable yet.
    Pending,
}

#[derive(Clone, Debug)]
pub(crate) struct Block {
    pub(crate) size: u64,
    /// Bytes the caller asked for (allocated blocks); 0 for free ones.
    pub(crate) requested: u64,
    pub(crate) state: BlockState,
    /// The stream (in its pool) the block was allocated on; free blocks keep the owner that last
    /// used them.
    pub(crate) owner: Owner,
    /// Device free sequence number of the free that made this memory free (0: never used).
    pub(crate) free_seq: u64,
    pub(crate) region: u64,
    /// Allocated blocks: when it was handed out, and its predicted free.
    pub(crate) stamp: Stamp,
}

/// What `coalesce` needs of a free block that is not (yet) in the free index.
#[derive(Clone, Copy)]
struct Unindexed {
    owner: Owner,
    region: u64,
    size: u64,
    free_seq: u64,
}

impl Unindexed {
    fn of(b: &Block) -> Unindexed {
        Unindexed {
            owner: b.owner,
            region: b.region,
            size: b.size,
            free_seq: b.free_seq,
        }
    }
}

/// The large blocks of one device.
#[derive(Debug, Default)]
pub(crate) struct BlockPool {
    pub(crate) blocks: BTreeMap<DevicePtr, Block>,
    free_index: BTreeSet<(Owner, u64, DevicePtr)>,
}

/// Where a pointer falls, for error messages.
pub(crate) enum Lookup<'a> {
    Start(&'a Block),
    /// Inside a block that starts at the given address.
    Interior(DevicePtr, &'a Block),
    Outside,
}

impl BlockPool {
    /// Best fit for `owner`: the smallest free block of that owner holding `size` bytes.
    #[inline]
    pub(crate) fn best_fit(&self, owner: Owner, size: u64) -> Option<DevicePtr> {
        self.free_index
            .range((owner, size, 0)..)
            .next()
            .filter(|(s, _, _)| *s == owner)
            .map(|&(_, _, addr)| addr)
    }

    /// Where to put `size` bytes for `owner`, predicted to be freed at `death`: (free block,
    /// offset in it), or `None` when no free block of the owner holds them (see the module
    /// documentation, "Placement").
    #[inline]
    pub(crate) fn fit_near(&self, owner: Owner, size: u64, death: u64) -> Option<(DevicePtr, u64)> {
        let mut fits = self
            .free_index
            .range((owner, size, 0)..)
            .take_while(|(o, _, _)| *o == owner)
            .map(|&(_, s, a)| (a, s));
        let first = fits.next()?;
        if first.1 == size {
            return Some((first.0, 0));
        }
        self.nearest_death(first, fits.next(), size, death)
    }

    /// Of the two candidates' ends, the one whose allocated neighbour dies closest to `death`;
    /// the first candidate's start when no end has one.
    #[cold]
    fn nearest_death(
        &self,
        first: (DevicePtr, u64),
        second: Option<(DevicePtr, u64)>,
        size: u64,
        death: u64,
    ) -> Option<(DevicePtr, u64)> {
        let distance =
            |b: &Block| (b.state == BlockState::Allocated).then(|| b.stamp.death.abs_diff(death));
        let mut best = (u64::MAX, first.0, 0);
        for (a, bsize) in std::iter::once(first).chain(second) {
            let left = self
                .blocks
                .range(..a)
                .next_back()
                .filter(|(&pa, pb)| pa + pb.size == a)
                .and_then(|(_, pb)| distance(pb));
            let right = self.blocks.get(&(a + bsize)).and_then(distance);
            for (d, offset) in [(left, 0), (right, bsize - size)] {
                if let Some(d) = d.filter(|&d| d < best.0) {
                    best = (d, a, offset);
                }
            }
        }
        Some((best.1, best.2))
    }

    /// Free blocks of the other streams of `owner`'s pool holding `size` bytes, smallest first.
    /// (Memory never passes between pools here: see `retag_pool`.)
    pub(crate) fn other_stream_fits(&self, owner: Owner, size: u64) -> Vec<DevicePtr> {
        let pool = |stream| Owner {
            pool: owner.pool,
            stream,
        };
        let mut fits: Vec<(u64, DevicePtr)> = self
            .free_index
            .range((pool(Stream(0)), 0, 0)..=(pool(Stream(u64::MAX)), u64::MAX, u64::MAX))
            .filter(|(s, sz, _)| *s != owner && *sz >= size)
            .map(|&(_, sz, a)| (sz, a))
            .collect();
        fits.sort_unstable();
        fits.into_iter().map(|(_, a)| a).collect()
    }

    /// Every free block (address, block).
    pub(crate) fn free_blocks(&self) -> impl Iterator<Item = (DevicePtr, &Block)> {
        self.free_index
            .iter()
            .map(|&(_, _, a)| (a, &self.blocks[&a]))
    }

    /// The free block that ends exactly at `end`, if any.
    pub(crate) fn free_block_ending_at(&self, end: DevicePtr) -> Option<DevicePtr> {
        let (&a, b) = self.blocks.range(..end).next_back()?;
        (a + b.size == end && b.state == BlockState::Free).then_some(a)
    }

    pub(crate) fn get(&self, addr: DevicePtr) -> Option<&Block> {
        self.blocks.get(&addr)
    }

    /// Sets the requested size of the allocated block at `addr` (a thread cache handed it out
    /// again for another request). Returns the old one, or `None` (nothing changed) if there is no
    /// allocated block there.
    pub(crate) fn set_requested(&mut self, addr: DevicePtr, requested: u64) -> Option<u64> {
        let b = self.blocks.get_mut(&addr)?;
        (b.state == BlockState::Allocated).then(|| std::mem::replace(&mut b.requested, requested))
    }

    pub(crate) fn lookup(&self, ptr: DevicePtr) -> Lookup<'_> {
        match self.blocks.range(..=ptr).next_back() {
            Some((&a, b)) if a == ptr => Lookup::Start(b),
            Some((&a, b)) if ptr < a + b.size => Lookup::Interior(a, b),
            _ => Lookup::Outside,
        }
    }

    /// Hands out `size` bytes at `offset` into the free block at `addr` on `owner`, stamped with
    /// `stamp`; the free bytes before and after it stay free blocks of the old owner. `offset` and
    /// `size` are multiples of 512 B that fit the block, which must be in the free index. Returns
    /// the allocation's address.
    #[inline]
    pub(crate) fn allocate_at(
        &mut self,
        addr: DevicePtr,
        size: u64,
        requested: u64,
        owner: Owner,
        offset: u64,
        stamp: Stamp,
    ) -> DevicePtr {
        let block = self
            .blocks
            .get_mut(&addr)
            .expect("allocate_at a known block");
        debug_assert_eq!(block.state, BlockState::Free);
        debug_assert!(offset + size <= block.size && offset.is_multiple_of(ROUND));
        self.free_index.remove(&(block.owner, block.size, addr));
        let rest = block.size - offset - size;
        let (old_owner, free_seq, region) = (block.owner, block.free_seq, block.region);
        let allocated = Block {
            size,
            requested,
            state: BlockState::Allocated,
            owner,
            free_seq,
            region,
            stamp,
        };
        let at = addr + offset;
        if offset == 0 {
            *block = allocated;
        } else {
            // The free front keeps the block's start (and its index key, smaller).
            block.size = offset;
            self.free_index.insert((old_owner, offset, addr));
            self.blocks.insert(at, allocated);
        }
        if rest > 0 {
            let rest_addr = at + size;
            self.blocks.insert(
                rest_addr,
                Block {
                    size: rest,
                    requested: 0,
                    state: BlockState::Free,
                    owner: old_owner,
                    free_seq,
                    region,
                    stamp: Stamp::default(),
                },
            );
            self.free_index.insert((old_owner, rest, rest_addr));
        }
        at
    }

    /// Marks the block at `addr` free (or pending) if it is an allocated block starting there, in
    /// one lookup: `(size, requested, stamp)`, or `None` (and nothing changed) for any other
    /// pointer.
    #[inline]
    pub(crate) fn release(
        &mut self,
        addr: DevicePtr,
        free_seq: u64,
        pending: bool,
    ) -> Option<(u64, u64, Stamp)> {
        let block = self
            .blocks
            .get_mut(&addr)
            .filter(|b| b.state == BlockState::Allocated)?;
        let (requested, stamp) = (block.requested, block.stamp);
        block.requested = 0;
        block.free_seq = free_seq;
        let size = block.size;
        if pending {
            block.state = BlockState::Pending;
        } else {
            block.state = BlockState::Free;
            let key = Unindexed::of(block);
            self.coalesce(addr, key);
        }
        Some((size, requested, stamp))
    }

    /// A pending block whose recorded streams have finished becomes free.
    pub(crate) fn settle_pending(&mut self, addr: DevicePtr) {
        let block = self.blocks.get_mut(&addr).expect("settle of a known block");
        debug_assert_eq!(block.state, BlockState::Pending);
        block.state = BlockState::Free;
        let key = Unindexed::of(block);
        self.coalesce(addr, key);
    }

    /// Adds a new free block (fresh memory, or a stolen hole's neighbour) and merges it.
    pub(crate) fn insert_free(
        &mut self,
        addr: DevicePtr,
        size: u64,
        owner: Owner,
        free_seq: u64,
        region: u64,
    ) -> DevicePtr {
        debug_assert!(size > 0 && size.is_multiple_of(ROUND));
        let block = Block {
            size,
            requested: 0,
            state: BlockState::Free,
            owner,
            free_seq,
            region,
            stamp: Stamp::default(),
        };
        let key = Unindexed::of(&block);
        self.blocks.insert(addr, block);
        self.coalesce(addr, key)
    }

    /// Gives a free block to another owner (its old stream's work on it is known to be done).
    pub(crate) fn retag(&mut self, addr: DevicePtr, owner: Owner) -> DevicePtr {
        let block = self.blocks.get_mut(&addr).expect("retag of a known block");
        debug_assert_eq!(block.state, BlockState::Free);
        self.free_index.remove(&(block.owner, block.size, addr));
        block.owner = owner;
        // Nothing of the old owner may be waited for any more; the new owner owns it now.
        block.free_seq = 0;
        let key = Unindexed::of(block);
        self.coalesce(addr, key)
    }

    /// Moves every block of pool `from` to pool `to` (a private pool with no use left joins the
    /// ordinary cache): free ones merge with free neighbours of their new owner, allocated and
    /// pending ones go there when freed. Returns how many blocks moved.
    pub(crate) fn retag_pool(&mut self, from: PoolTag, to: PoolTag) -> usize {
        let addrs: Vec<DevicePtr> = self
            .blocks
            .iter()
            .filter(|(_, b)| b.owner.pool == from)
            .map(|(&a, _)| a)
            .collect();
        for &a in &addrs {
            // A merge below may have absorbed this block into a moved neighbour.
            let Some(b) = self.blocks.get_mut(&a) else {
                continue;
            };
            if b.owner.pool != from {
                continue;
            }
            let old = b.owner;
            b.owner.pool = to;
            if b.state == BlockState::Free {
                self.free_index.remove(&(old, b.size, a));
                let key = Unindexed::of(b);
                self.coalesce(a, key);
            }
        }
        addrs.len()
    }

    /// Merges the free block at `addr` (described by `key`, read by the caller, which already
    /// holds it: no second lookup) with free neighbours of its owner and region, indexes the
    /// result, and returns its address. The block is not in the free index when this is called.
    fn coalesce(&mut self, addr: DevicePtr, key: Unindexed) -> DevicePtr {
        let Unindexed {
            owner,
            region,
            size: own_size,
            free_seq: mut seq,
        } = key;
        debug_assert!(!self.free_index.contains(&(owner, own_size, addr)));
        let mergeable =
            move |b: &Block| b.state == BlockState::Free && b.owner == owner && b.region == region;
        let (mut start, mut size) = (addr, own_size);
        if let Some((&pa, pb)) = self.blocks.range(..addr).next_back() {
            if pa + pb.size == addr && mergeable(pb) {
                let prev_size = pb.size;
                seq = seq.max(pb.free_seq);
                self.free_index.remove(&(owner, prev_size, pa));
                self.blocks.remove(&addr);
                start = pa;
                size += prev_size;
            }
        }
        let end = addr + own_size;
        if let Some(nb) = self.blocks.get(&end) {
            if mergeable(nb) {
                let next_size = nb.size;
                seq = seq.max(nb.free_seq);
                self.free_index.remove(&(owner, next_size, end));
                self.blocks.remove(&end);
                size += next_size;
            }
        }
        let block = self.blocks.get_mut(&start).expect("merged block");
        block.size = size;
        block.free_seq = seq;
        self.free_index.insert((owner, size, start));
        start
    }

    /// Removes `[from, to)` (page-aligned, wholly inside the free block at `addr`) from the pool:
    /// its pages are about to be unmapped. The parts of the block on either side stay free.
    pub(crate) fn carve(&mut self, addr: DevicePtr, from: DevicePtr, to: DevicePtr) {
        let block = self.blocks.remove(&addr).expect("carve of a known block");
        debug_assert_eq!(block.state, BlockState::Free);
        debug_assert!(addr <= from && from < to && to <= addr + block.size);
        self.free_index.remove(&(block.owner, block.size, addr));
        for (a, len) in [(addr, from - addr), (to, addr + block.size - to)] {
            if len > 0 {
                self.blocks.insert(
                    a,
                    Block {
                        size: len,
                        ..block.clone()
                    },
                );
                self.free_index.insert((block.owner, len, a));
            }
        }
    }

    /// Removes the free block at `addr` entirely (its whole segment goes back to the driver).
    pub(crate) fn remove_free(&mut self, addr: DevicePtr) -> Block {
        let block = self.blocks.remove(&addr).expect("remove of a known block");
        debug_assert_eq!(block.state, BlockState::Free);
        self.free_index.remove(&(block.owner, block.size, addr));
        block
    }

    /// Checks the invariants in the module documentation.
    pub(crate) fn check_invariants(&self) -> Result<(), String> {
        let mut prev: Option<(DevicePtr, &Block)> = None;
        let mut free = 0;
        for (&a, b) in &self.blocks {
            if b.size == 0 || b.size % ROUND != 0 || a % ROUND != 0 {
                return Err(format!(
                    "block {a:#x} has size {} or address not a multiple of 512",
                    b.size
                ));
            }
            if b.state == BlockState::Free {
                free += 1;
                if !self.free_index.contains(&(b.owner, b.size, a)) {
                    return Err(format!("free block {a:#x} is not in the free index"));
                }
            }
            if let Some((pa, pb)) = prev {
                if pa + pb.size > a {
                    return Err(format!("blocks {pa:#x} and {a:#x} overlap"));
                }
                if pa + pb.size == a
                    && pb.state == BlockState::Free
                    && b.state == BlockState::Free
                    && pb.owner == b.owner
                    && pb.region == b.region
                {
                    return Err(format!(
                        "free neighbours {pa:#x} and {a:#x} of one owner are not merged"
                    ));
                }
            }
            prev = Some((a, b));
        }
        if free != self.free_index.len() {
            return Err(format!(
                "{} free blocks but {} index entries",
                free,
                self.free_index.len()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::lifetimes::UNKNOWN;

    const MIB: u64 = 1 << 20;
    const O: Owner = Owner::ordinary(Stream(0));

    fn stamp(death: u64) -> Stamp {
        Stamp {
            born: 1,
            death,
            key: 7,
        }
    }

    /// One free range of `size` bytes at `base`, cut into `[(len, Some(death)) allocated,
    /// (len, None) free]` pieces in order.
    fn pool(base: u64, pieces: &[(u64, Option<u64>)]) -> BlockPool {
        let total = pieces.iter().map(|p| p.0).sum();
        let mut p = BlockPool::default();
        p.insert_free(base, total, O, 0, 0);
        let mut at = base;
        for &(len, death) in pieces {
            if let Some(d) = death {
                // The free block holding `at` starts at or before it.
                let (&a, _) = p.blocks.range(..=at).next_back().unwrap();
                p.allocate_at(a, len, len, O, at - a, stamp(d));
            }
            at += len;
        }
        p.check_invariants().unwrap();
        p
    }

    #[test]
    fn an_exact_fit_is_taken_whatever_its_neighbours() {
        let p = pool(
            0,
            &[
                (MIB, Some(100)),
                (2 * MIB, None),
                (MIB, Some(5)),
                (3 * MIB, None),
            ],
        );
        assert_eq!(p.fit_near(O, 2 * MIB, 5), Some((MIB, 0)));
    }

    #[test]
    fn a_block_goes_next_to_the_neighbour_that_dies_closest() {
        // Free 3 MiB after a block dying at 100, free 4 MiB before a block dying at 10.
        let p = pool(
            0,
            &[
                (MIB, Some(100)),
                (3 * MIB, None),
                (MIB, Some(1000)),
                (4 * MIB, None),
                (MIB, Some(10)),
            ],
        );
        // Dying at 12: against the block dying at 10, at the end of the 4 MiB block.
        assert_eq!(p.fit_near(O, 2 * MIB, 12), Some((5 * MIB, 2 * MIB)));
        // Dying at 90: after the block dying at 100, at the start of the smaller block.
        assert_eq!(p.fit_near(O, 2 * MIB, 90), Some((MIB, 0)));
        // Dying at 2000: before the block dying at 1000, at the end of the 3 MiB block.
        assert_eq!(p.fit_near(O, 2 * MIB, 2000), Some((MIB, MIB)));
        // Unknown blocks keep company with the unknown, and the best fit breaks ties.
        let q = pool(0, &[(MIB, Some(UNKNOWN)), (3 * MIB, None), (MIB, Some(1))]);
        assert_eq!(q.fit_near(O, MIB, UNKNOWN), Some((MIB, 0)));
    }

    #[test]
    fn with_no_live_neighbour_it_is_the_best_fit() {
        let p = pool(0, &[(5 * MIB, None)]);
        assert_eq!(p.fit_near(O, MIB, 3), Some((0, 0)));
        assert_eq!(p.fit_near(O, 6 * MIB, 3), None);
        let other = Owner::ordinary(Stream(9));
        assert_eq!(p.fit_near(other, MIB, 3), None, "only the owner's blocks");
    }

    #[test]
    fn allocating_inside_a_free_block_keeps_both_sides_free() {
        let mut p = pool(0, &[(8 * MIB, None)]);
        let at = p.allocate_at(0, 2 * MIB, 2 * MIB - 100, O, 3 * MIB, stamp(4));
        assert_eq!(at, 3 * MIB);
        p.check_invariants().unwrap();
        let free: Vec<(u64, u64)> = p.free_blocks().map(|(a, b)| (a, b.size)).collect();
        assert!(free.contains(&(0, 3 * MIB)) && free.contains(&(5 * MIB, 3 * MIB)));
        assert_eq!(
            p.release(at, 1, false),
            Some((2 * MIB, 2 * MIB - 100, stamp(4)))
        );
        p.check_invariants().unwrap();
        assert_eq!(
            p.free_blocks()
                .map(|(a, b)| (a, b.size))
                .collect::<Vec<_>>(),
            [(0, 8 * MIB)]
        );
    }
}
