//! The block pools of one device: [`small`] size classes for requests up to `small_max`, [`large`]
//! best-fit blocks for the rest. Pure data structures: no driver calls, no locks.
//!
//! Every block, run and granule has an [`Owner`]: the stream that last used it, inside the pool
//! it belongs to. Reuse without a fence is only ever within one owner; the device layer decides
//! when memory may pass to another stream (a fence says its work is done) and never passes it to
//! another pool while that pool is in use (CUDA graphs, `device/graphs.rs`).

pub(crate) mod large;
pub(crate) mod lifetimes;
pub(crate) mod small;

use crate::driver::Stream;

/// The pool a piece of memory belongs to: [`ORDINARY`], or a private pool (CUDA graphs).
pub(crate) type PoolTag = u32;

/// The ordinary cache, which serves every allocation not routed to a private pool.
pub(crate) const ORDINARY: PoolTag = 0;

/// Who may reuse free memory at once: the stream that last used it, in its pool. Ordered by pool
/// first, so a pool's memory is one range of any index keyed by owner.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Owner {
    pub(crate) pool: PoolTag,
    pub(crate) stream: Stream,
}

impl Owner {
    /// `stream` in the ordinary cache.
    #[inline]
    pub(crate) const fn ordinary(stream: Stream) -> Owner {
        Owner {
            pool: ORDINARY,
            stream,
        }
    }
}
