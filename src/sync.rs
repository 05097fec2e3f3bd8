//! Locks, atomics and thread ids for the whole crate, in one place.
//!
//! Under `cfg(loom)` these are loom's model-checked types; otherwise `parking_lot`'s locks and
//! `std`'s atomics and thread ids. Nothing else in the crate names a lock, atomic or thread id type
//! directly, so a loom model sees the allocator's synchronisation (and tells its threads apart) (the pattern of tokio's `src/loom/`). The exceptions:
//! `std::sync::OnceLock` (loom 0.7 has none), which publishes each device's allocator and the trace
//! log once (its initialisation is serialised by a shim lock, and it never blocks afterwards), and
//! the process-wide allocator's `std` locks in `global.rs`, which a loom build leaves out.
//!
//! Locking rule: the crate takes at most one device lock at a time, and never holds it while it calls
//! a user hook or waits on the driver for something that may re-enter the allocator.

#[cfg(not(loom))]
pub(crate) use parking_lot::{Mutex, MutexGuard, RwLock};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::Arc;

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
#[cfg(loom)]
pub(crate) use loom::sync::Arc;

/// A thread's id (the simulated driver keeps stream captures and capture modes per thread). loom
/// runs a model's threads on one OS thread, so `std`'s id would be the same for all of them;
/// loom's `ThreadId` (`Copy`, `Eq`, `Hash`, `Debug`, as `std`'s) names each model thread.
#[cfg(not(loom))]
pub(crate) type ThreadId = std::thread::ThreadId;
#[cfg(loom)]
pub(crate) type ThreadId = loom::thread::ThreadId;

/// The calling thread's [`ThreadId`]. Under loom it must be called inside a model.
#[cfg(not(loom))]
pub(crate) fn current_thread_id() -> ThreadId {
    std::thread::current().id()
}

/// The calling thread's [`ThreadId`]. Under loom it must be called inside a model.
#[cfg(loom)]
pub(crate) fn current_thread_id() -> ThreadId {
    loom::thread::current().id()
}

/// `thread_local!` for the crate's per-thread flags (the running hook, the in-hook flag), used as
/// `crate::sync::thread_local!`. Outside loom it is `std`'s macro, unchanged. loom runs a model's
/// threads as coroutines on one OS thread, so a `std` thread-local would be shared by all of them;
/// loom's gives each model thread its own, as real threads have.
#[cfg(not(loom))]
pub(crate) use std::thread_local;

/// loom's `thread_local!` takes a plain initializer (its `$init:expr` does not match `const { .. }`):
/// this accepts the crate's `const { .. }` form and passes the expression inside on.
/// (Named apart and renamed on export: a `macro_rules! thread_local` clashes with the built-in
/// `#[thread_local]` attribute.)
#[cfg(loom)]
macro_rules! loom_thread_local {
    ($(#[$attr:meta])* static $name:ident: $t:ty = const { $init:expr };) => {
        loom::thread_local!($(#[$attr])* static $name: $t = $init;);
    };
    ($(#[$attr:meta])* static $name:ident: $t:ty = $init:expr;) => {
        loom::thread_local!($(#[$attr])* static $name: $t = $init;);
    };
}
#[cfg(loom)]
pub(crate) use loom_thread_local as thread_local;

/// loom's `Mutex` returns a `LockResult`; this wrapper gives it `parking_lot`'s shape so that the
/// rest of the crate is written once.
#[cfg(loom)]
#[derive(Debug, Default)]
pub(crate) struct Mutex<T>(loom::sync::Mutex<T>);

#[cfg(loom)]
pub(crate) type MutexGuard<'a, T> = loom::sync::MutexGuard<'a, T>;

#[cfg(loom)]
impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Self {
        Mutex(loom::sync::Mutex::new(value))
    }
    pub(crate) fn lock(&self) -> MutexGuard<'_, T> {
        // A poisoned lock means a test thread panicked; the model has already failed.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(loom)]
#[derive(Debug, Default)]
pub(crate) struct RwLock<T>(loom::sync::RwLock<T>);

#[cfg(loom)]
impl<T> RwLock<T> {
    #[allow(dead_code)] // the crate builds its maps with `Default`
    pub(crate) fn new(value: T) -> Self {
        RwLock(loom::sync::RwLock::new(value))
    }
    pub(crate) fn read(&self) -> loom::sync::RwLockReadGuard<'_, T> {
        self.0.read().unwrap_or_else(|e| e.into_inner())
    }
    pub(crate) fn write(&self) -> loom::sync::RwLockWriteGuard<'_, T> {
        self.0.write().unwrap_or_else(|e| e.into_inner())
    }
}
