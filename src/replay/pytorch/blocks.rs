//! The blocks of every segment, by address, and the two indexes PyTorch keeps over them.
//!
//! # Data structure
//! - `map`: every block by start address: `[addr, addr + size)`, allocated, free (mapped and
//!   cached), or unmapped (reserved virtual space with no physical memory: expandable segments
//!   only). A block records its segment (the segment's base address), stream and pool, which are
//!   the segment's.
//! - `free[pool]`: the free blocks keyed `(stream, size, addr)`, PyTorch's `BlockPool::blocks`
//!   ordered by `BlockComparatorSize`: the best fit for a stream is one ordered lookup.
//! - `unmapped[pool]`: the unmapped blocks keyed `(stream, addr)`, PyTorch's `BlockPool::unmapped`
//!   ordered by `BlockComparatorAddress`.
//!
//! PyTorch links a segment's blocks with `prev`/`next` pointers; here a block's neighbours are the
//! address-adjacent blocks of the same segment (segments never overlap, and a segment's blocks tile
//! it, so the two are the same thing).
//!
//! # Invariants (checked by [`Blocks::check_index`]; tiling is checked per segment by the owner)
//! - `free` holds exactly the `Free` blocks and `unmapped` exactly the `Unmapped` ones, each under
//!   its block's pool, stream, size and address.
//!
//! # Locking
//! None: owned by one [`super::PytorchAllocator`], which is used through `&mut self`.

use crate::driver::{DevicePtr, Stream};
use std::collections::{BTreeMap, BTreeSet};

/// PyTorch's two default pools: `small_blocks` (rounded size at most 1 MiB) and `large_blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Pool {
    Small,
    Large,
}

impl Pool {
    /// Both pools, in the order `release_cached_blocks` visits them (large first).
    pub(super) const RELEASE_ORDER: [Pool; 2] = [Pool::Large, Pool::Small];

    fn index(self) -> usize {
        match self {
            Pool::Small => 0,
            Pool::Large => 1,
        }
    }
}

/// What a block holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Use {
    /// Handed out; `requested` is the size asked for, before rounding.
    Allocated { requested: u64 },
    /// Mapped and cached: reusable by its stream and pool.
    Free,
    /// Reserved virtual space with nothing mapped (expandable segments only).
    Unmapped,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Block {
    pub(super) size: u64,
    pub(super) usage: Use,
    pub(super) stream: Stream,
    pub(super) pool: Pool,
    /// Base address of the segment the block lies in.
    pub(super) seg: DevicePtr,
}

impl Block {
    pub(super) fn is_allocated(&self) -> bool {
        matches!(self.usage, Use::Allocated { .. })
    }
}

/// Every block of one allocator, with its indexes. See the module documentation.
#[derive(Debug, Default)]
pub(super) struct Blocks {
    map: BTreeMap<DevicePtr, Block>,
    free: [BTreeSet<(Stream, u64, DevicePtr)>; 2],
    unmapped: [BTreeSet<(Stream, DevicePtr)>; 2],
}

impl Blocks {
    pub(super) fn get(&self, addr: DevicePtr) -> Option<Block> {
        self.map.get(&addr).copied()
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The block that contains `ptr`, if any: `(start, block)`.
    pub(super) fn containing(&self, ptr: DevicePtr) -> Option<(DevicePtr, Block)> {
        self.map
            .range(..=ptr)
            .next_back()
            .filter(|(&a, b)| ptr - a < b.size)
            .map(|(&a, &b)| (a, b))
    }

    /// The blocks that start in `[from, to)`, by address.
    pub(super) fn range(
        &self,
        from: DevicePtr,
        to: DevicePtr,
    ) -> impl Iterator<Item = (DevicePtr, Block)> + '_ {
        self.map.range(from..to).map(|(&a, &b)| (a, b))
    }

    /// The block just before `addr` in the same segment, if any.
    pub(super) fn prev(&self, addr: DevicePtr) -> Option<(DevicePtr, Block)> {
        let seg = self.map.get(&addr)?.seg;
        self.map
            .range(..addr)
            .next_back()
            .filter(|(&a, b)| b.seg == seg && a + b.size == addr)
            .map(|(&a, &b)| (a, b))
    }

    /// The block just after the one at `addr` in the same segment, if any.
    pub(super) fn next(&self, addr: DevicePtr) -> Option<(DevicePtr, Block)> {
        let b = self.map.get(&addr)?;
        let end = addr + b.size;
        self.map
            .get(&end)
            .filter(|n| n.seg == b.seg)
            .map(|&n| (end, n))
    }

    /// Free blocks of `pool` and `stream` holding at least `size` bytes, smallest first (ties by
    /// address): `(size, addr)`.
    pub(super) fn fits(
        &self,
        pool: Pool,
        stream: Stream,
        size: u64,
    ) -> impl Iterator<Item = (u64, DevicePtr)> + '_ {
        self.free[pool.index()]
            .range((stream, size, 0)..)
            .take_while(move |(s, _, _)| *s == stream)
            .map(|&(_, sz, a)| (sz, a))
    }

    /// Every free block of `pool`, all streams, in index order.
    pub(super) fn free_list(&self, pool: Pool) -> Vec<DevicePtr> {
        self.free[pool.index()].iter().map(|&(_, _, a)| a).collect()
    }

    /// Every free block of both pools: `(addr, block)`.
    pub(super) fn free_blocks(&self) -> impl Iterator<Item = (DevicePtr, Block)> + '_ {
        self.free
            .iter()
            .flatten()
            .map(|&(_, _, a)| (a, self.map[&a]))
    }

    /// Unmapped blocks of `pool` and `stream`, by address.
    pub(super) fn unmapped_of(
        &self,
        pool: Pool,
        stream: Stream,
    ) -> impl Iterator<Item = DevicePtr> + '_ {
        self.unmapped[pool.index()]
            .range((stream, 0)..)
            .take_while(move |(s, _)| *s == stream)
            .map(|&(_, a)| a)
    }

    /// Adds a block and indexes it. Nothing may start at `addr`.
    pub(super) fn insert(&mut self, addr: DevicePtr, block: Block) {
        debug_assert!(!self.map.contains_key(&addr));
        self.index(addr, &block, true);
        self.map.insert(addr, block);
    }

    /// Removes the block at `addr` and its index entry.
    pub(super) fn remove(&mut self, addr: DevicePtr) -> Option<Block> {
        let b = self.map.remove(&addr)?;
        self.index(addr, &b, false);
        Some(b)
    }

    /// Changes what the block at `addr` holds, keeping the indexes right.
    pub(super) fn set_use(&mut self, addr: DevicePtr, usage: Use) {
        if let Some(mut b) = self.remove(addr) {
            b.usage = usage;
            self.insert(addr, b);
        }
    }

    /// Cuts the block at `addr` in two: the first `size` bytes keep the address, the rest becomes
    /// a block of the same use, segment, stream and pool. `0 < size < block size`.
    pub(super) fn split(&mut self, addr: DevicePtr, size: u64) {
        let Some(b) = self.remove(addr) else { return };
        debug_assert!(size > 0 && size < b.size);
        self.insert(addr, Block { size, ..b });
        self.insert(
            addr + size,
            Block {
                size: b.size - size,
                ..b
            },
        );
    }

    /// PyTorch's `try_merge_blocks` on both sides: merges the block at `addr` with its previous
    /// and next neighbours in the segment when they have the same use (both free, or both
    /// unmapped). Returns the merged block's address. Allocated blocks never merge.
    pub(super) fn merge(&mut self, addr: DevicePtr) -> DevicePtr {
        let Some(b) = self.get(addr) else { return addr };
        if b.is_allocated() {
            return addr;
        }
        let (mut start, mut size) = (addr, b.size);
        if let Some((pa, pb)) = self.prev(addr).filter(|(_, p)| p.usage == b.usage) {
            self.remove(pa);
            start = pa;
            size += pb.size;
        }
        if let Some((na, nb)) = self.next(addr).filter(|(_, n)| n.usage == b.usage) {
            self.remove(na);
            size += nb.size;
        }
        if start != addr || size != b.size {
            self.remove(addr);
            self.insert(start, Block { size, ..b });
        }
        start
    }

    fn index(&mut self, addr: DevicePtr, b: &Block, add: bool) {
        let p = b.pool.index();
        match b.usage {
            Use::Free => {
                let key = (b.stream, b.size, addr);
                if add {
                    self.free[p].insert(key);
                } else {
                    self.free[p].remove(&key);
                }
            }
            Use::Unmapped => {
                let key = (b.stream, addr);
                if add {
                    self.unmapped[p].insert(key);
                } else {
                    self.unmapped[p].remove(&key);
                }
            }
            Use::Allocated { .. } => {}
        }
    }

    /// The indexes hold exactly the free and unmapped blocks, under the right keys.
    pub(super) fn check_index(&self) -> Result<(), String> {
        let (mut free, mut unmapped) = (0, 0);
        for (&a, b) in &self.map {
            let p = b.pool.index();
            match b.usage {
                Use::Free => {
                    free += 1;
                    if !self.free[p].contains(&(b.stream, b.size, a)) {
                        return Err(format!("free block {a:#x} is not in the free index"));
                    }
                }
                Use::Unmapped => {
                    unmapped += 1;
                    if !self.unmapped[p].contains(&(b.stream, a)) {
                        return Err(format!(
                            "unmapped block {a:#x} is not in the unmapped index"
                        ));
                    }
                }
                Use::Allocated { .. } => {}
            }
        }
        let indexed_free: usize = self.free.iter().map(BTreeSet::len).sum();
        let indexed_unmapped: usize = self.unmapped.iter().map(BTreeSet::len).sum();
        if indexed_free != free || indexed_unmapped != unmapped {
            return Err(format!(
                "{free} free and {unmapped} unmapped blocks, but {indexed_free} and \
                 {indexed_unmapped} index entries"
            ));
        }
        Ok(())
    }
}
