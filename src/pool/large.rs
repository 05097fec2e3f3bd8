//! The large-block pool: best fit by (owner, size, address), split, coalesce.
//!
//! # Data structure
//! - `blocks`: every large block by start address: `[addr, addr + size)`, allocated, free, or
//!   pending (freed, but waiting for streams recorded with `record_stream`).
//! - `free_index`: the free blocks (not the pending ones) keyed by `(owner, size, addr)`, so the
//!   best fit for an owner (a stream in a pool) is one ordered lookup, O(log n).
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

    pub(crate) fn lookup(&self, ptr: DevicePtr) -> Lookup<'_> {
        match self.blocks.range(..=ptr).next_back() {
            Some((&a, b)) if a == ptr => Lookup::Start(b),
            Some((&a, b)) if ptr < a + b.size => Lookup::Interior(a, b),
            _ => Lookup::Outside,
        }
    }

    /// Hands out the first `size` bytes of the free block at `addr` on `owner`, splitting off the
    /// rest when at least 512 B remain. The block must be in the free index.
    #[inline]
    pub(crate) fn allocate_at(&mut self, addr: DevicePtr, size: u64, requested: u64, owner: Owner) {
        let block = self
            .blocks
            .get_mut(&addr)
            .expect("allocate_at a known block");
        debug_assert_eq!(block.state, BlockState::Free);
        debug_assert!(block.size >= size);
        self.free_index.remove(&(block.owner, block.size, addr));
        let rest = block.size - size;
        let (rest_owner, rest_seq, region) = (block.owner, block.free_seq, block.region);
        block.state = BlockState::Allocated;
        block.requested = requested;
        block.owner = owner;
        if rest >= ROUND {
            block.size = size;
            let rest_addr = addr + size;
            self.blocks.insert(
                rest_addr,
                Block {
                    size: rest,
                    requested: 0,
                    state: BlockState::Free,
                    owner: rest_owner,
                    free_seq: rest_seq,
                    region,
                },
            );
            self.free_index.insert((rest_owner, rest, rest_addr));
        }
    }

    /// Marks the block at `addr` free (or pending) if it is an allocated block starting there, in
    /// one lookup: `(size, requested)`, or `None` (and nothing changed) for any other pointer.
    #[inline]
    pub(crate) fn release(
        &mut self,
        addr: DevicePtr,
        free_seq: u64,
        pending: bool,
    ) -> Option<(u64, u64)> {
        let block = self
            .blocks
            .get_mut(&addr)
            .filter(|b| b.state == BlockState::Allocated)?;
        let requested = block.requested;
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
        Some((size, requested))
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
