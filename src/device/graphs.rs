//! CUDA graphs: private pools, routing allocations to them, and knowing when a capture is underway.
//!
//! # Data structure
//! [`Graphs`] holds, per device:
//! - `pools`: every private pool with uses left, by [`MempoolId`] (PyTorch's `MempoolId_t`): its
//!   [`PoolTag`] (the `pool` of every block, run and granule it owns, see `pool/mod.rs`) and its
//!   use count. Graphs share a pool through `pool=` / `graph_pool_handle()`: each capture that
//!   begins on it adds a use, each graph that is destroyed drops one;
//! - `routes`: the pools being allocated to now, in the order their routing began, each with the
//!   filter that says which streams' allocations it takes (the first match wins);
//! - `captures`: how many routes are open on every device of the allocator, shared by them all.
//!   CUDA's global capture mode is process-wide: while any capture is underway, an unmap, a free
//!   or an event query on *any* device would invalidate it, so every device asks this count.
//!
//! # The rules (PyTorch's, `c10/cuda/CUDACachingAllocator.cpp`)
//! - `begin(id, filter)` creates the pool or adds a use, and starts routing to it; `end(id)` stops
//!   routing; `release(id)` drops a use. At zero uses the pool is *released*: its memory joins the
//!   ordinary cache once the device is idle, because PyTorch releases a graph's pool without
//!   waiting for its last replay, which may still run on any stream. The next slow path, cache
//!   release or compaction outside a capture synchronizes the device (`cuCtxSynchronize`) and
//!   retags the memory ordinary: free blocks and granules merge into the cache, live blocks are
//!   freed into it later (`drain_released_pools`).
//! - Pool memory never serves another pool or the ordinary cache while the pool has uses, and is
//!   never unmapped or released then (the device layer only steals and releases `ORDINARY`
//!   memory). Within the pool it is reused at once by the same stream: capture order is replay
//!   order.
//! - While `captures` is non-zero the device makes no event record, query or synchronize, no
//!   unmap, release or `cuMemFree`, and its driver allocations run in relaxed capture mode (see
//!   `grow.rs` and `oom.rs`).
//!
//! # Invariants (checked by [`Graphs::check_invariants`])
//! Every route names a pool with at least one use; no pool is routed twice; tags are unique and
//! never `ORDINARY`. A pool with no use left is released: listed until it is drained.
//!
//! # Locking
//! Under the device lock. A filter is called with the lock held (PyTorch does the same): it must
//! not allocate through tessera. `captures` is an atomic, written under the lock of the device
//! whose route changes and read under any device's lock.

use super::DeviceState;
use crate::driver::{DriverError, Stream};
use crate::error::{Error, Result};
use crate::pool::{Owner, PoolTag, ORDINARY};
use crate::sync::{Arc, AtomicUsize, Ordering};
use std::fmt;

/// A private pool's id: PyTorch's `MempoolId_t`, a pair of `u64`. `(0, 0)` is no pool.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct MempoolId(pub u64, pub u64);

impl fmt::Display for MempoolId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "({}, {})", self.0, self.1)
    }
}

/// Which streams' allocations a route takes. Called under the device lock.
pub type CaptureFilter = Box<dyn Fn(Stream) -> bool + Send>;

#[derive(Debug)]
struct PrivatePool {
    id: MempoolId,
    tag: PoolTag,
    uses: u32,
}

struct Route {
    id: MempoolId,
    tag: PoolTag,
    filter: CaptureFilter,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Route({}, tag {})", self.id, self.tag)
    }
}

/// The private pools of one device and the routes open on it.
#[derive(Debug)]
pub(crate) struct Graphs {
    pools: Vec<PrivatePool>,
    routes: Vec<Route>,
    next_tag: PoolTag,
    captures: Arc<AtomicUsize>,
}

/// One private pool, for stats: its id, its uses (0: released, waiting for the device to be idle
/// to join the ordinary cache), and whether allocations are routed to it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PoolInfo {
    pub(crate) id: MempoolId,
    pub(crate) tag: PoolTag,
    pub(crate) uses: u32,
    pub(crate) routed: bool,
}

impl Graphs {
    pub(crate) fn new(captures: Arc<AtomicUsize>) -> Self {
        Graphs {
            pools: Vec::new(),
            routes: Vec::new(),
            next_tag: ORDINARY + 1,
            captures,
        }
    }

    /// Whether any allocation may be routed (one branch on the hot path).
    #[inline]
    pub(crate) fn routing(&self) -> bool {
        !self.routes.is_empty()
    }

    /// The owner of a new allocation on `stream`: the first route whose filter takes it, else the
    /// ordinary cache.
    #[cold]
    pub(crate) fn route(&self, stream: Stream) -> Owner {
        let pool = self
            .routes
            .iter()
            .find(|r| (r.filter)(stream))
            .map_or(ORDINARY, |r| r.tag);
        Owner { pool, stream }
    }

    /// Whether a capture may be underway on any device of the allocator.
    #[inline]
    pub(crate) fn capturing(&self) -> bool {
        self.captures.load(Ordering::Acquire) != 0
    }

    /// The private pools, for stats and snapshots.
    pub(crate) fn pools(&self) -> Vec<PoolInfo> {
        self.pools
            .iter()
            .map(|p| PoolInfo {
                id: p.id,
                tag: p.tag,
                uses: p.uses,
                routed: self.routes.iter().any(|r| r.tag == p.tag),
            })
            .collect()
    }

    /// The id of the private pool tagged `tag`; `None` for the ordinary cache (no pool has its
    /// tag) and for a drained pool.
    pub(crate) fn id_of(&self, tag: PoolTag) -> Option<MempoolId> {
        self.pools.iter().find(|p| p.tag == tag).map(|p| p.id)
    }

    pub(crate) fn check_invariants(&self) -> std::result::Result<(), String> {
        for (i, r) in self.routes.iter().enumerate() {
            if !self.pools.iter().any(|p| p.tag == r.tag && p.uses > 0) {
                return Err(format!("route to pool {} has no pool with uses", r.id));
            }
            if self.routes[..i].iter().any(|o| o.id == r.id) {
                return Err(format!("pool {} is routed twice", r.id));
            }
        }
        for (i, p) in self.pools.iter().enumerate() {
            if p.tag == ORDINARY {
                return Err(format!("pool {} has the ordinary tag", p.id));
            }
            if self.pools[..i]
                .iter()
                .any(|o| o.tag == p.tag || o.id == p.id)
            {
                return Err(format!("pool {} shares its id or tag", p.id));
            }
        }
        Ok(())
    }
}

impl Drop for Graphs {
    fn drop(&mut self) {
        // Routes left open (a capture never ended) must not keep other devices from compacting.
        if !self.routes.is_empty() {
            self.captures.fetch_sub(self.routes.len(), Ordering::AcqRel);
        }
    }
}

fn no_pool(id: MempoolId) -> Error {
    Error::PrivatePool(format!("no private pool {id} is in use on this device"))
}

impl DeviceState {
    /// The owner of a new allocation on `stream` (the hot path asks only `routing()`).
    #[inline]
    pub(crate) fn owner_for(&self, stream: Stream) -> Owner {
        if self.graphs.routing() {
            self.graphs.route(stream)
        } else {
            Owner::ordinary(stream)
        }
    }

    /// Whether a capture may be underway: no event, unmap or free call may be made.
    #[inline]
    pub(crate) fn capturing(&self) -> bool {
        self.graphs.capturing()
    }

    /// PyTorch's `beginAllocateToPool`: creates the private pool `id` or adds a use to it, and
    /// routes the allocations `filter` accepts to it until [`DeviceState::end_pool`].
    pub(crate) fn begin_pool(&mut self, id: MempoolId, filter: CaptureFilter) -> Result<()> {
        if id == MempoolId(0, 0) {
            return Err(Error::PrivatePool(
                "pool id (0, 0) is the ordinary cache, not a private pool".into(),
            ));
        }
        let g = &mut self.graphs;
        if g.routes.iter().any(|r| r.id == id) {
            return Err(Error::PrivatePool(format!(
                "allocations are already routed to pool {id} (a capture into it is underway)"
            )));
        }
        let tag = match g.pools.iter_mut().find(|p| p.id == id) {
            Some(p) => {
                p.uses += 1;
                p.tag
            }
            None => {
                let tag = g.next_tag;
                g.next_tag = g
                    .next_tag
                    .checked_add(1)
                    .ok_or_else(|| Error::PrivatePool("out of pool tags".into()))?;
                g.pools.push(PrivatePool { id, tag, uses: 1 });
                tag
            }
        };
        g.routes.push(Route { id, tag, filter });
        g.captures.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// PyTorch's `endAllocateToPool`: stops routing to `id`. The pool keeps its uses and memory.
    pub(crate) fn end_pool(&mut self, id: MempoolId) -> Result<()> {
        let g = &mut self.graphs;
        let Some(i) = g.routes.iter().position(|r| r.id == id) else {
            return Err(Error::PrivatePool(format!(
                "allocations are not being routed to pool {id}"
            )));
        };
        g.routes.remove(i);
        g.captures.fetch_sub(1, Ordering::AcqRel);
        Ok(())
    }

    /// PyTorch's `releasePool`: drops a use of `id`. At zero uses the pool is released: its memory
    /// joins the ordinary cache at the next `drain_released_pools` (free memory then, live blocks
    /// when freed). Refused while allocations are routed to it: the capture still holds its use.
    pub(crate) fn release_pool(&mut self, id: MempoolId) -> Result<()> {
        let g = &mut self.graphs;
        let Some(i) = g.pools.iter().position(|p| p.id == id) else {
            return Err(no_pool(id));
        };
        let tag = g.pools[i].tag;
        if g.pools[i].uses == 1 && g.routes.iter().any(|r| r.tag == tag) {
            return Err(Error::PrivatePool(format!(
                "pool {id} cannot lose its last use while allocations are routed to it"
            )));
        }
        if g.pools[i].uses == 0 {
            return Err(no_pool(id));
        }
        g.pools[i].uses -= 1;
        // At zero uses the pool waits for `drain_released_pools`: a replay may still be running.
        Ok(())
    }

    /// Gives the memory of released pools (no use left) to the ordinary cache, once every stream's
    /// work on the device is done: a destroyed graph's last replay may still be running, on any
    /// stream. Nothing during a capture (the synchronize would invalidate it). On a failed
    /// synchronize the pools stay released, their memory private, and the error is returned.
    pub(crate) fn drain_released_pools(&mut self) -> std::result::Result<(), DriverError> {
        if !self.graphs.pools.iter().any(|p| p.uses == 0) || self.capturing() {
            return Ok(());
        }
        self.drv.device_synchronize(self.dev)?;
        let (released, kept): (Vec<PrivatePool>, _) = std::mem::take(&mut self.graphs.pools)
            .into_iter()
            .partition(|p| p.uses == 0);
        self.graphs.pools = kept;
        for p in released {
            self.large.retag_pool(p.tag, ORDINARY);
            self.small.retag_pool(p.tag, ORDINARY);
        }
        Ok(())
    }
}
