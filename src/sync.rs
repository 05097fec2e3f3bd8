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

/// A cell whose accesses a loom model checks for data races (loom's `UnsafeCell`); outside loom,
/// `std`'s. Callers state, at each access, why no other thread accesses it at the same time.
#[derive(Debug, Default)]
pub(crate) struct RaceCell<T>(
    #[cfg(not(loom))] std::cell::UnsafeCell<T>,
    #[cfg(loom)] loom::cell::UnsafeCell<T>,
);

impl<T> RaceCell<T> {
    pub(crate) fn new(value: T) -> Self {
        #[cfg(not(loom))]
        return RaceCell(std::cell::UnsafeCell::new(value));
        #[cfg(loom)]
        return RaceCell(loom::cell::UnsafeCell::new(value));
    }

    /// Runs `f` on the value.
    ///
    /// # Safety
    /// No other access to the value may run at the same time.
    #[inline]
    pub(crate) unsafe fn with_mut<R>(&self, f: impl FnOnce(&mut T) -> R) -> R {
        #[cfg(not(loom))]
        // SAFETY: the caller excludes every other access for the duration of `f`.
        return f(unsafe { &mut *self.0.get() });
        #[cfg(loom)]
        // SAFETY: as above; loom checks it.
        return self.0.with_mut(|p| f(unsafe { &mut *p }));
    }
}

/// The two sides of an asymmetric store–load barrier (Dekker's handshake between a thread cache's
/// owner and a drainer, `device/tcache.rs`). The owner's side, [`light_barrier`], runs on every
/// cache hit; the drainer's, [`heavy_barrier`], only when it takes a cache from its owner. Where
/// Linux's `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)` is available (registered once, at the
/// first thread cache), the light side is a compiler fence and the heavy side the system call,
/// which runs a full barrier on every CPU running a thread of this process; elsewhere both are
/// `fence(SeqCst)`. The mode is chosen once, before any cache exists, and never changes. Under
/// loom both are `fence(SeqCst)`, which loom models.
#[cfg(not(loom))]
pub(crate) mod barrier {
    use std::sync::atomic::{compiler_fence, fence, AtomicBool, Ordering};
    use std::sync::Once;

    static ASYMMETRIC: AtomicBool = AtomicBool::new(false);
    static CHOSEN: Once = Once::new();

    const MEMBARRIER_CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    fn membarrier(cmd: libc::c_long) -> bool {
        // SAFETY: membarrier takes two integer arguments and touches no memory of ours.
        unsafe {
            libc::syscall(
                libc::SYS_membarrier,
                cmd,
                0 as libc::c_long,
                0 as libc::c_long,
            ) == 0
        }
    }

    /// Chooses the mode, once (before the first thread cache is made).
    pub(crate) fn choose() {
        CHOSEN.call_once(|| {
            let off = std::env::var_os("TESSERA_NO_MEMBARRIER").is_some();
            let ok = !off && membarrier(MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED);
            ASYMMETRIC.store(ok, Ordering::SeqCst);
        });
    }

    /// The owner's side: orders its store of "busy" before its load of "drain requested".
    #[inline(always)]
    pub(crate) fn light_barrier() {
        if ASYMMETRIC.load(Ordering::Relaxed) {
            compiler_fence(Ordering::SeqCst);
        } else {
            fence(Ordering::SeqCst);
        }
    }

    /// The drainer's side: orders its store of "drain requested" before its load of "busy", on
    /// every thread's behalf.
    #[cold]
    pub(crate) fn heavy_barrier() {
        fence(Ordering::SeqCst);
        if ASYMMETRIC.load(Ordering::Relaxed) && !membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED) {
            // Registered, so the kernel cannot refuse; if it ever does, no ordering can be
            // promised to the owners' compiler fences: stop rather than hand a block out twice.
            eprintln!("tessera: membarrier failed after registration; aborting");
            std::process::abort();
        }
    }
}

#[cfg(loom)]
pub(crate) mod barrier {
    use loom::sync::atomic::{fence, Ordering};
    pub(crate) fn choose() {}
    pub(crate) fn light_barrier() {
        fence(Ordering::SeqCst);
    }
    pub(crate) fn heavy_barrier() {
        fence(Ordering::SeqCst);
    }
}

/// One step of a spin wait (`spins` counts from 1): a CPU hint at first, then yields, so that a
/// waiter never starves the thread it waits for. Under loom, always a yield (loom needs one).
#[inline]
pub(crate) fn spin_wait(spins: u32) {
    #[cfg(not(loom))]
    {
        if spins < 64 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
    #[cfg(loom)]
    {
        let _ = spins;
        loom::thread::yield_now();
    }
}

/// A number naming the calling model thread within its execution (loom's thread id; `std`'s
/// thread-locals are shared by all model threads).
#[cfg(loom)]
pub(crate) fn current_thread_serial() -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    loom::thread::current().id().hash(&mut h);
    h.finish() | 1
}
