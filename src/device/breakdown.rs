//! Where the reserved bytes are: [`Breakdown`], one walk over the pools.
//!
//! Every byte the driver holds for the device lands in exactly one field (the unit test and
//! `check` below hold it to the driver's figure). Pages are the unit of fungibility: a page with no
//! live byte can be remapped anywhere, so its free bytes are `free_page_bytes`; free bytes that
//! share a page with live data are split by what holds them (small runs, large blocks, another
//! stream, a private pool).
//!
//! Runs under the device lock and changes nothing; it is a walk over every block and granule, for
//! reports and replays, never for the hot path.

use super::DeviceState;
use crate::config::Backend;
use crate::driver::{DevicePtr, Stream};
use crate::pages::Slot;
use crate::pool::large::{BlockState, ROUND};
use crate::pool::{Owner, ORDINARY};
use crate::stats::Breakdown;
use std::collections::HashSet;

impl DeviceState {
    /// Where every reserved byte is now. Free bytes in pages with live data that belong to a
    /// stream other than `stream` (when given) are counted as `other_stream_bytes`.
    pub(crate) fn breakdown(&self, stream: Option<Stream>) -> Breakdown {
        let ps = self.page_size;
        let mut b = Breakdown {
            reserved_bytes: self.reserved(),
            ..Breakdown::default()
        };
        let foreign = |o: Owner| stream.is_some_and(|s| s != o.stream);
        // The page (VMM) or segment (legacy) of a large block's address, and its size.
        let unit_of = |addr: DevicePtr, region: u64| -> (DevicePtr, u64) {
            match self.backend {
                Backend::Vmm => (addr / ps * ps, ps),
                Backend::Legacy => (region, self.legacy.get(&region).copied().unwrap_or(0)),
            }
        };
        // Pages holding an allocated or parked byte of a large block.
        let mut used: HashSet<DevicePtr> = HashSet::new();
        for (&a, blk) in &self.large.blocks {
            if blk.state == BlockState::Free {
                continue;
            }
            let (mut p, size) = unit_of(a, blk.region);
            used.insert(p);
            while self.backend == Backend::Vmm && p + size < a + blk.size {
                p += size;
                used.insert(p);
            }
        }
        for (&a, blk) in &self.large.blocks {
            match blk.state {
                BlockState::Allocated => {
                    let rounded = blk.requested.div_ceil(ROUND) * ROUND;
                    b.requested_bytes += blk.requested;
                    b.rounding_bytes += rounded - blk.requested;
                    b.class_bytes += blk.size - rounded;
                }
                BlockState::Pending => b.parked_bytes += blk.size,
                BlockState::Free => {
                    // Split the block at page boundaries: each piece is classified by its page.
                    let end = a + blk.size;
                    let mut at = a;
                    while at < end {
                        let (p, size) = unit_of(at, blk.region);
                        let piece = match self.backend {
                            Backend::Vmm => end.min(p + size) - at,
                            Backend::Legacy => end - at,
                        };
                        let slot = if blk.owner.pool != ORDINARY {
                            &mut b.private_pool_bytes
                        } else if !used.contains(&p) {
                            &mut b.free_page_bytes
                        } else if foreign(blk.owner) {
                            &mut b.other_stream_bytes
                        } else {
                            &mut b.large_free_bytes
                        };
                        *slot += piece;
                        at += piece;
                    }
                }
            }
        }
        let parked = |p: DevicePtr| self.pending.contains_key(&p);
        for g in self.small.granules() {
            let u = self.small.usage(g, &parked);
            b.requested_bytes += u.requested;
            b.rounding_bytes += u.rounding;
            b.class_bytes += u.class;
            b.parked_bytes += u.parked;
            let free = u.free_slots + u.run_tails + u.idle_runs + u.free_units;
            if g.owner.pool != ORDINARY {
                b.private_pool_bytes += free;
            } else if g.live_bytes == 0 {
                b.free_page_bytes += free;
            } else if foreign(g.owner) {
                b.other_stream_bytes += free;
            } else {
                b.small_free_slot_bytes += u.free_slots;
                b.small_run_tail_bytes += u.run_tails;
                b.small_idle_run_bytes += u.idle_runs;
                b.small_free_unit_bytes += u.free_units;
            }
        }
        // Pages mapped nowhere (the page pool) and quarantined ones.
        b.free_page_bytes += self.pages.pool.len() as u64 * ps;
        for range in &self.pages.ranges {
            let stuck = range
                .slots
                .iter()
                .filter(|s| matches!(s, Slot::Stuck(_)))
                .count() as u64;
            b.stuck_bytes += stuck * ps;
        }
        b
    }
}
