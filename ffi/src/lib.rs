//! The C ABI of tessera (`libtessera.so`). Filled in by the C ABI issue; for now it only links the core.

pub use tessera_core as core;
