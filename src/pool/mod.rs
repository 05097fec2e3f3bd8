//! The block pools of one device: [`small`] size classes for requests up to `small_max`, [`large`]
//! best-fit blocks for the rest. Pure data structures: no driver calls, no locks.

pub(crate) mod large;
pub(crate) mod small;
