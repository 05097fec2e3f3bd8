//! The registered eviction hooks: what the OOM sequence calls, with no lock held, before it gives up.
//!
//! # Data structure
//! [`Hooks`] keeps a list of [`HookEntry`]s in registration order. Each entry carries its closure,
//! a `live` flag and a `running` lock that every call holds for reading while the closure runs.
//!
//! # Invariants
//! - Once [`Hooks::remove`] returns, the hook is never called again, and no call of it is still in
//!   progress (unless the remover is that very call: a hook may remove itself). This is what lets
//!   a C caller free a hook's `user` data right after removing it.
//! - A call starts only while `live` is true; removal clears `live` first, then takes `running`
//!   for writing, which waits for the calls in progress.
//!
//! # Locking
//! The list's lock is held only to copy or edit the list, never while a hook runs. `running` is
//! read-held by calls (each on its own entry, never two at once on one thread: an allocation inside
//! a hook skips the hooks) and write-taken by removal with no other lock held.

use crate::sync::{AtomicBool, AtomicU64, Mutex, Ordering, RwLock};
use std::cell::Cell;
use std::fmt;

/// An eviction hook: called with (device, requested bytes) when an allocation would fail.
/// (A `std` `Arc`: hooks are user closures, not synchronisation that loom models.)
pub type OomHook = std::sync::Arc<dyn Fn(usize, u64) + Send + Sync>;

/// Identifies a registered hook, to remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HookId(pub u64);

// `crate::sync`'s: per model thread under loom (see there).
crate::sync::thread_local! {
    /// The id of the hook this thread is running, if any.
    static RUNNING: Cell<Option<u64>> = const { Cell::new(None) };
}

/// One registered hook.
pub(crate) struct HookEntry {
    id: u64,
    live: AtomicBool,
    running: RwLock<()>,
    hook: OomHook,
}

impl HookEntry {
    /// Runs the hook unless it has been removed; true if it ran. A removal waits for this call.
    pub(crate) fn call(&self, device: usize, requested: u64) -> bool {
        let _running = self.running.read();
        if !self.live.load(Ordering::Acquire) {
            return false;
        }
        let outer = RUNNING.with(|r| r.replace(Some(self.id)));
        // Restores the outer value even if the hook panics.
        struct Restore(Option<u64>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let outer = self.0;
                let _ = RUNNING.try_with(|r| r.set(outer));
            }
        }
        let _restore = Restore(outer);
        (self.hook)(device, requested);
        true
    }
}

/// The registered hooks.
#[derive(Default)]
pub(crate) struct Hooks {
    next: AtomicU64,
    list: Mutex<Vec<std::sync::Arc<HookEntry>>>,
}

impl fmt::Debug for Hooks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Hooks({})", self.list.lock().len())
    }
}

impl Hooks {
    pub(crate) fn add(&self, hook: OomHook) -> HookId {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.list.lock().push(std::sync::Arc::new(HookEntry {
            id,
            live: AtomicBool::new(true),
            running: RwLock::new(()),
            hook,
        }));
        HookId(id)
    }

    /// Removes a hook and waits for its calls in progress (see the invariants); false if it was
    /// not registered.
    pub(crate) fn remove(&self, id: HookId) -> bool {
        let entry = {
            let mut list = self.list.lock();
            match list.iter().position(|e| e.id == id.0) {
                Some(i) => list.remove(i),
                None => return false,
            }
        };
        entry.live.store(false, Ordering::Release);
        if RUNNING.with(Cell::get) != Some(id.0) {
            drop(entry.running.write());
        }
        true
    }

    /// The hooks now, in order, copied out so that none runs under this lock.
    pub(crate) fn snapshot(&self) -> Vec<std::sync::Arc<HookEntry>> {
        self.list.lock().clone()
    }
}
