//! [`Rules::Native`](super::Rules::Native): `cuMemAlloc` segments, as PyTorch allocates them with
//! `expandable_segments:False` (the default).
//!
//! # Data structure
//! A native segment is one `alloc_legacy` (`cuMemAlloc`) of `get_allocation_size` bytes, recorded
//! in the allocator's `segments` with page size 0; its blocks tile it and never merge with a
//! neighbouring segment's, even when the driver placed the two back to back.
//!
//! # Invariants
//! Those of the parent module; in addition a native segment is given back only when one free
//! block covers all of it (`release_cached_blocks` frees exactly the blocks with no `prev` and no
//! `next`).
//!
//! # Locking
//! None (see the parent module).

use super::blocks::{Block, Pool, Use};
use super::{
    PytorchAllocator, Segment, LARGE_BUFFER, MIN_LARGE_ALLOC, ROUND_LARGE, SMALL_BUFFER, SMALL_SIZE,
};
use crate::driver::{DevicePtr, DriverError, Stream};
use crate::error::Error;
use std::collections::BTreeMap;

/// `get_allocation_size`: the segment a native miss allocates for a rounded request of `size`
/// bytes: 2 MiB for the small pool, 20 MiB for large requests under 10 MiB, else the request
/// rounded up to a multiple of 2 MiB.
pub(super) fn get_allocation_size(size: u64) -> u64 {
    if size <= SMALL_SIZE {
        SMALL_BUFFER
    } else if size < MIN_LARGE_ALLOC {
        LARGE_BUFFER
    } else {
        size.div_ceil(ROUND_LARGE) * ROUND_LARGE
    }
}

impl PytorchAllocator {
    /// `alloc_block`, native: one `cuMemAlloc` of `get_allocation_size(size)` bytes, which
    /// becomes one free block of `pool` and `stream`. `Ok(None)` when the driver is out of memory.
    pub(super) fn native_alloc_block(
        &mut self,
        pool: Pool,
        stream: Stream,
        size: u64,
        refused: &mut Option<DriverError>,
    ) -> Result<Option<DevicePtr>, Error> {
        let seg_size = get_allocation_size(size);
        match self.drv.alloc_legacy(self.dev, seg_size) {
            Ok(base) => {
                self.segments.insert(
                    base,
                    Segment {
                        size: seg_size,
                        stream,
                        pool,
                        page: 0,
                        pages: BTreeMap::new(),
                    },
                );
                self.blocks.insert(
                    base,
                    Block {
                        size: seg_size,
                        usage: Use::Free,
                        stream,
                        pool,
                        seg: base,
                    },
                );
                self.reserved += seg_size;
                Ok(Some(base))
            }
            Err(e) if e.is_out_of_memory() => {
                *refused = Some(e);
                Ok(None)
            }
            Err(e) => Err(Error::Driver(e)),
        }
    }

    /// `release_cached_blocks`, native (`release_blocks` per pool, large first): every free block
    /// that is a whole segment goes back with `cuMemFree`. Segments that still hold a live block
    /// stay, with all their free blocks. A failed `cuMemFree` stops the release; the segment stays.
    pub(super) fn native_release(&mut self) -> Result<(), Error> {
        for pool in Pool::RELEASE_ORDER {
            for addr in self.blocks.free_list(pool) {
                let Some(b) = self.blocks.get(addr) else {
                    continue;
                };
                let whole =
                    addr == b.seg && self.segments.get(&addr).is_some_and(|s| s.size == b.size);
                if !whole {
                    continue;
                }
                self.drv.free_legacy(self.dev, addr)?;
                self.blocks.remove(addr);
                self.segments.remove(&addr);
                self.reserved -= b.size;
            }
        }
        Ok(())
    }
}
