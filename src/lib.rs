//! tessera: a CUDA caching allocator with a page-remapping defragmentation core.
#![deny(unsafe_op_in_unsafe_fn)]

pub mod bytes;
pub mod driver;
pub(crate) mod sync;
pub mod config;
pub mod error;
