//! The device's side of the thread caches (`tcache.rs`): finding a thread's cache, the slow paths
//! that hold blocks in it or take them back, and everything that needs the whole picture.
//!
//! # Data structure
//! - [`Threads`], in [`DeviceState`] under the device lock: the registry of this device's caches
//!   and `held`, pointer → (cache, slot) for every block a cache holds.
//! - Per thread, in TLS: a list of (allocator uid, cache, device state) and a one-entry memo of the
//!   last one used. The list's destructor, at thread exit, gives every cache back to its device.
//!
//! # What goes where
//! - A free under the lock of a block the caller's cache can take (ordinary pool, its own stream,
//!   no recorded streams, no capture, at most a quarter of the bound) goes into that cache, the
//!   oldest cached blocks going back to the pools if it is full. A small miss takes a batch of
//!   slots of its class from existing runs (a refill).
//! - A free of a block another thread's cache holds (PyTorch's autograd thread freeing what the
//!   forward pass allocated) revokes the holder's slot and frees the block to the pools at once:
//!   the holder forgets the slot at its next slow step. Its cost to the freeing thread is the
//!   ordinary locked free plus one slot store and a push on the holder's revoked list.
//! - `record_stream` on a held block, and a block of a cache whose thread exits, stop being held:
//!   they become ordinary allocations with their current request.
//! - [`DeviceState::drain_caches`] seizes every cache (the handshake of `tcache.rs`) and returns
//!   its free blocks to the pools: `empty_cache`, `trim`, the OOM sequence, `check_invariants`,
//!   snapshots and breakdowns call it first. After a `fork`, the caches of threads that do not
//!   exist in the child are skipped (their owners may have been mid-operation).
//!
//! # Locking
//! Every function here runs under the device lock. The seizer waits (spinning, then yielding) for
//! owners to leave their fast path, which never blocks; owners never wait for a seizer inside it.

use super::tcache::{self, ThreadCache, LIVE};
use super::{DeviceAllocator, DeviceState};
use crate::driver::{DevicePtr, Stream};
use crate::error::{Error, Result};
use crate::pool::ORDINARY;
use crate::stats::Amount;
use crate::sync::{barrier, Arc, Mutex, Ordering};
use rustc_hash::FxHashMap as HashMap;
use std::cell::Cell;

/// A fresh allocator uid (never 0, never reused).
pub(crate) fn next_uid() -> u64 {
    // A plain counter, not synchronisation: `std`'s atomic, also under loom.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The device's registry of thread caches and the blocks they hold.
#[derive(Debug, Default)]
pub(crate) struct Threads {
    pub(crate) caches: Vec<Option<Arc<ThreadCache>>>,
    free_ids: Vec<u32>,
    /// Held block → (cache index, slot).
    pub(crate) held: HashMap<DevicePtr, (u32, u32)>,
    /// −Σ(served − recorded) over revoked slots their owners have not forgotten yet.
    pub(crate) revoked_adj: i64,
    /// Set at teardown: the caches' threads give nothing back any more.
    pub(crate) torn_down: bool,
    /// Slow allocations between taking their block from the pools and charging it to the peaks
    /// (the peaks' invariant is checked only when there are none).
    charging: u32,
}

impl Threads {
    fn live(&self) -> impl Iterator<Item = &Arc<ThreadCache>> {
        self.caches.iter().flatten()
    }
}

struct TlsEntry {
    uid: u64,
    cache: Arc<ThreadCache>,
    state: Arc<Mutex<DeviceState>>,
}

struct TlsCaches(Vec<TlsEntry>);

impl TlsEntry {
    /// Gives the cache back to its device (unless the device is gone).
    fn retire(self) {
        let mut st = self.state.lock();
        if !st.threads.torn_down {
            st.retire_cache(&self.cache);
            st.checked();
        }
    }
}

impl Drop for TlsCaches {
    fn drop(&mut self) {
        let _ = MEMO.try_with(|m| m.set((0, std::ptr::null())));
        // loom runs thread-locals' destructors after the model's execution, where no loom lock
        // may be taken: its models give caches back with `flush_thread_cache`, as a thread exit.
        #[cfg(not(loom))]
        for e in self.0.drain(..) {
            e.retire();
        }
    }
}

crate::sync::thread_local! {
    /// The cache this thread used last: (allocator uid, cache). `CACHES` holds it.
    static MEMO: Cell<(u64, *const ThreadCache)> = const { Cell::new((0, std::ptr::null())) };
}

/// This thread's list of caches. Outside loom it is a pointer in a destructor-free thread-local,
/// owned by a pthread key whose destructor retires the caches: a thread that first calls tessera
/// from another key's destructor, or after its thread-locals were destroyed, still gets its list
/// destroyed (pthread runs key destructors again for keys set meanwhile), where a thread-local
/// with a destructor registered that late would leak.
#[cfg(not(loom))]
mod list {
    use super::{TlsCaches, MEMO};
    use std::cell::Cell;
    use std::sync::OnceLock;

    std::thread_local! {
        static LIST: Cell<*mut TlsCaches> = const { Cell::new(std::ptr::null_mut()) };
        static IN_USE: Cell<bool> = const { Cell::new(false) };
    }

    struct Key(libc::pthread_key_t);
    static KEY: OnceLock<Option<Key>> = OnceLock::new();

    unsafe extern "C" fn destroy(p: *mut libc::c_void) {
        let _ = LIST.try_with(|l| l.set(std::ptr::null_mut()));
        let _ = MEMO.try_with(|m| m.set((0, std::ptr::null())));
        // SAFETY: `p` is the `Box` that `with` leaked into the key for this thread, given back
        // once (pthread clears the key's value before calling its destructor).
        drop(unsafe { Box::from_raw(p.cast::<TlsCaches>()) });
    }

    fn key() -> Option<libc::pthread_key_t> {
        KEY.get_or_init(|| {
            let mut k: libc::pthread_key_t = 0;
            // SAFETY: `k` is a valid out-pointer; `destroy` has the signature pthread expects.
            (unsafe { libc::pthread_key_create(&mut k, Some(destroy)) } == 0).then_some(Key(k))
        })
        .as_ref()
        .map(|k| k.0)
    }

    /// Runs `f` on this thread's list; `None` if it cannot be had (re-entered, or no key).
    pub(super) fn with<R>(f: impl FnOnce(&mut TlsCaches) -> R) -> Option<R> {
        let key = key()?;
        if IN_USE.try_with(|u| u.replace(true)).ok()? {
            return None;
        }
        let mut p = LIST.try_with(Cell::get).ok()?;
        if p.is_null() {
            p = Box::into_raw(Box::new(TlsCaches(Vec::new())));
            // SAFETY: `key` is a live key; the value is this thread's own list.
            unsafe { libc::pthread_setspecific(key, p.cast()) };
            let _ = LIST.try_with(|l| l.set(p));
        }
        // SAFETY: `p` is this thread's list, alive until the key's destructor runs on this
        // thread, which cannot happen during `f`; `IN_USE` keeps a second `&mut` from being made.
        let r = f(unsafe { &mut *p });
        let _ = IN_USE.try_with(|u| u.set(false));
        Some(r)
    }
}

#[cfg(loom)]
mod list {
    use super::TlsCaches;
    use std::cell::RefCell;

    loom::thread_local! {
        static LIST: RefCell<TlsCaches> = RefCell::new(TlsCaches(Vec::new()));
    }

    pub(super) fn with<R>(f: impl FnOnce(&mut TlsCaches) -> R) -> Option<R> {
        LIST.try_with(|l| l.try_borrow_mut().ok().map(|mut l| f(&mut l)))
            .ok()
            .flatten()
    }
}

impl DeviceAllocator {
    /// This thread's cache for this device, made on first use; `None` when thread caches are off
    /// or the thread is exiting.
    #[inline]
    pub(crate) fn my_cache(&self) -> Option<&ThreadCache> {
        if self.tc_bound == 0 {
            return None;
        }
        let (uid, p) = MEMO.try_with(Cell::get).unwrap_or((0, std::ptr::null()));
        if uid == self.uid {
            // SAFETY: the memo names a cache that this thread's `CACHES` holds an `Arc` of, and is
            // cleared before `CACHES` lets go of it; the reference lives for this call only.
            return Some(unsafe { &*p });
        }
        self.my_cache_slow()
    }

    #[cold]
    #[inline(never)]
    fn my_cache_slow(&self) -> Option<&ThreadCache> {
        let p = list::with(|c| {
            let p = match c.0.iter().find(|e| e.uid == self.uid) {
                Some(e) => Arc::as_ptr(&e.cache),
                None => {
                    // Entries of allocators that are gone.
                    c.0.retain(|e| !e.state.lock().threads.torn_down);
                    barrier::choose();
                    tcache::fork::watch();
                    let cache = self
                        .state
                        .lock()
                        .register_cache(self.tc_bound, self.small_max);
                    let p = Arc::as_ptr(&cache);
                    c.0.push(TlsEntry {
                        uid: self.uid,
                        cache,
                        state: Arc::clone(&self.state),
                    });
                    p
                }
            };
            let _ = MEMO.try_with(|m| m.set((self.uid, p)));
            p
        })?;
        // SAFETY: as in `my_cache`.
        Some(unsafe { &*p })
    }

    /// Gives this thread's cache of this device back, as the thread's exit does; the next call
    /// makes a new one.
    pub(crate) fn flush_thread_cache(&self) {
        let entry = list::with(|c| {
            let i = c.0.iter().position(|e| e.uid == self.uid)?;
            let _ = MEMO.try_with(|m| {
                if m.get().0 == self.uid {
                    m.set((0, std::ptr::null()));
                }
            });
            Some(c.0.swap_remove(i))
        });
        if let Some(Some(e)) = entry {
            e.retire();
        }
    }

    /// The slow allocation: this thread's cache under the lock, then the pools, then the OOM
    /// sequence; the block is then held by the thread's cache, with a refill of its class.
    #[cold]
    #[inline(never)]
    pub(crate) fn allocate_slow(
        &self,
        tc: Option<&ThreadCache>,
        rounded: u64,
        size: u64,
        stream: Stream,
    ) -> Result<DevicePtr> {
        let mut st = self.state.lock();
        if let Some(tc) = tc {
            st.settle_cache(tc);
        }
        let owner = st.owner_for(stream);
        let bin = self.bin_size(rounded);
        let cacheable = |st: &DeviceState| {
            st.owner_for(stream).pool == ORDINARY && !st.capturing() && bin <= self.tc_max_block
        };
        let tc = tc.filter(|_| cacheable(&st));
        let amount = Amount::block(bin, size);
        if let Some(tc) = tc {
            // SAFETY: the owner, under the device lock.
            let hit = unsafe { tc.with_local(|l, tc| l.take_cached(tc, stream, bin, size)) };
            if let Some(p) = hit {
                st.c.note_user_alloc(bin);
                st.charge(Some(tc), amount);
                st.checked();
                return Ok(p);
            }
        }
        st.threads.charging += 1;
        let r = match st.try_cached(rounded, size, owner) {
            Some(p) => Ok((p, st)),
            None => self.allocate_or_oom(st, rounded, size, owner),
        };
        let (p, mut st) = match r {
            Ok(r) => r,
            Err(e) => {
                self.state.lock().threads.charging -= 1;
                return Err(e);
            }
        };
        st.threads.charging -= 1;
        // Routes may have opened while the OOM sequence ran its hooks.
        let tc = tc.filter(|_| cacheable(&st));
        st.charge(tc, amount);
        if let Some(tc) = tc {
            st.hold_new(tc, p, stream, bin, size);
            if bin <= self.small_max {
                st.refill(tc, owner, bin);
            }
        }
        st.checked();
        Ok(p)
    }

    /// The slow free: under the lock, into this thread's cache when it can take the block.
    #[cold]
    #[inline(never)]
    pub(crate) fn free_slow(&self, tc: Option<&ThreadCache>, ptr: DevicePtr) -> Result<u64> {
        let mut st = self.state.lock();
        if let Some(tc) = tc {
            st.settle_cache(tc);
        }
        let r = st.free_user(tc, ptr);
        st.checked();
        r
    }

    /// After a hit, in check mode: every invariant, this thread's cache included.
    #[cold]
    pub(crate) fn check_after_hit(&self) {
        self.state.lock().checked();
    }
}

impl DeviceState {
    fn register_cache(&mut self, bound: u64, small_max: u64) -> Arc<ThreadCache> {
        let t = &mut self.threads;
        let index = t.free_ids.pop().unwrap_or(t.caches.len() as u32);
        let cache = Arc::new(ThreadCache::new(index, bound, small_max, self.page_size));
        if index as usize == t.caches.len() {
            t.caches.push(Some(Arc::clone(&cache)));
        } else {
            t.caches[index as usize] = Some(Arc::clone(&cache));
        }
        cache
    }

    /// The owner (or a seizer) forgets the slots other threads revoked.
    pub(crate) fn settle_cache(&mut self, tc: &ThreadCache) {
        let revoked = tc.take_revoked();
        if !revoked.is_empty() {
            // SAFETY: the owner or a seizer, under the device lock.
            let d = unsafe { tc.with_local(|l, tc| l.forget(tc, revoked)) };
            self.threads.revoked_adj += d;
        }
    }

    /// The user allocated `a` under the lock: peaks and budget. With a cache, tops its budget up
    /// from the headroom, to at most `thread_cache` bytes.
    fn charge(&mut self, tc: Option<&ThreadCache>, a: Amount) {
        match tc {
            None => self.peaks.charge(None, a),
            Some(tc) => {
                let peaks = &mut self.peaks;
                // SAFETY: the owner, under the device lock.
                unsafe {
                    tc.with_local(|l, tc| {
                        peaks.charge(Some(&mut l.budget), a);
                        let want = Amount {
                            bytes: tc.bound.saturating_sub(l.budget.bytes),
                            requested: tc.bound.saturating_sub(l.budget.requested),
                            blocks: (tc.bound / 512).saturating_sub(l.budget.blocks),
                        };
                        peaks.grant(&mut l.budget, want);
                    })
                }
            }
        }
    }

    /// Holds `p`, just handed to the user, in `tc` (if it has a free slot).
    fn hold_new(&mut self, tc: &ThreadCache, p: DevicePtr, stream: Stream, size: u64, req: u64) {
        // SAFETY: the owner, under the device lock.
        if let Some(s) = unsafe { tc.with_local(|l, tc| l.insert_live(tc, p, stream, size, req)) } {
            self.threads.held.insert(p, (tc.index, s));
        }
    }

    /// Takes a batch of free slots of the class of `size` from existing runs into `tc`.
    fn refill(&mut self, tc: &ThreadCache, owner: crate::pool::Owner, size: u64) {
        let class = self.small.classes.class_of(size);
        let batch = (tcache::REFILL_BYTES / size).clamp(1, tcache::REFILL_SLOTS) - 1;
        for _ in 0..batch {
            // SAFETY: the owner, under the device lock.
            if !unsafe { tc.with_local(|l, tc| l.has_room(tc, size)) } {
                break;
            }
            let Some(p) = self.small.alloc(owner, class, size) else {
                break;
            };
            self.c.note_pool_alloc(size, size);
            // SAFETY: as above.
            let s =
                unsafe { tc.with_local(|l, tc| l.insert_cached(tc, p, owner.stream, size, size)) }
                    .expect("room was checked");
            self.threads.held.insert(p, (tc.index, s));
        }
    }

    /// Tells the pools that the held block at `ptr` now serves `req` (it recorded `rec`).
    fn set_requested(&mut self, ptr: DevicePtr, req: u64, rec: u64) {
        if req == rec {
            return;
        }
        let old = if self.small.owns(ptr) {
            self.small.set_requested(ptr, req)
        } else {
            self.large.set_requested(ptr, req)
        };
        debug_assert_eq!(old, Some(rec), "a held block is allocated in the pools");
        self.c.requested = self.c.requested + req - rec;
    }

    /// Lets go of the held block at `ptr` (slot `s` of cache `idx`) if it is live: it becomes an
    /// ordinary allocation with its current request. `false` if it is cached (already freed).
    fn unhold(&mut self, me: Option<&ThreadCache>, ptr: DevicePtr, idx: u32, s: u32) -> bool {
        let holder = Arc::clone(
            self.threads.caches[idx as usize]
                .as_ref()
                .expect("registered"),
        );
        let slot = &holder.slots[s as usize];
        if slot.state() != LIVE {
            return false;
        }
        let (req, rec) = if me.is_some_and(|m| m.index == idx) {
            // SAFETY: the owner, under the device lock.
            let (_, req, rec) = unsafe { holder.with_local(|l, tc| l.unhold_live(tc, ptr)) };
            (req, rec)
        } else {
            let (req, rec) = (slot.requested(), slot.recorded());
            holder.revoke(s);
            self.threads.revoked_adj -= req as i64 - rec as i64;
            (req, rec)
        };
        self.threads.held.remove(&ptr);
        self.set_requested(ptr, req, rec);
        true
    }

    /// A user's free under the lock (`me`: the caller's cache of this device, if any).
    pub(crate) fn free_user(&mut self, me: Option<&ThreadCache>, ptr: DevicePtr) -> Result<u64> {
        if let Some(&(idx, s)) = self.threads.held.get(&ptr) {
            let mine = me.filter(|m| m.index == idx);
            if let Some(tc) = mine.filter(|_| !self.capturing()) {
                // SAFETY: the owner, under the device lock.
                let live = unsafe {
                    tc.with_local(|l, tc| {
                        l.live_block(ptr)
                            .filter(|&(_, stream, size)| l.bin_has_room(tc, stream, size))
                    })
                };
                if let Some((_, _, size)) = live {
                    self.make_room(tc, size);
                    let peaks = &mut self.peaks;
                    // SAFETY: as above.
                    let a = unsafe {
                        tc.with_local(|l, tc| {
                            peaks.credit(std::mem::take(&mut l.budget));
                            l.recache(tc, ptr)
                        })
                    };
                    self.peaks.credit(a);
                    self.c.note_user_free(size);
                    return Ok(size);
                }
            }
            if !self.unhold(me, ptr, idx, s) {
                return Err(self.bad_free(Error::DoubleFree {
                    ptr,
                    device: self.dev,
                }));
            }
        } else if let Some(tc) = me {
            if let Some(size) = self.cache_freed(tc, ptr) {
                return Ok(size);
            }
        }
        let (size, req) = self.free(ptr)?;
        self.peaks.credit(Amount::block(size, req));
        Ok(size)
    }

    /// An ordinary block freed by `tc`'s owner goes into its cache, if it can: its size.
    fn cache_freed(&mut self, tc: &ThreadCache, ptr: DevicePtr) -> Option<u64> {
        if self.capturing() || self.recorded.contains_key(&ptr) || self.pending.contains_key(&ptr) {
            return None;
        }
        let (base, size, req, owner) = self.allocation(ptr)?;
        if base != ptr || owner.pool != ORDINARY || size > tc.max_block {
            return None;
        }
        // SAFETY: the owner, under the device lock.
        if !unsafe { tc.with_local(|l, tc| l.bin_has_room(tc, owner.stream, size)) } {
            return None;
        }
        self.make_room(tc, size);
        // SAFETY: the owner, under the device lock.
        let s =
            unsafe { tc.with_local(|l, tc| l.insert_cached(tc, ptr, owner.stream, size, req)) }?;
        self.threads.held.insert(ptr, (tc.index, s));
        self.c.note_user_free(size);
        self.peaks.credit(Amount::block(size, req));
        Some(size)
    }

    /// Returns `tc`'s oldest cached blocks to the pools until `size` more bytes fit.
    fn make_room(&mut self, tc: &ThreadCache, size: u64) {
        // SAFETY: the owner or a seizer, under the device lock.
        let out = unsafe {
            tc.with_local(|l, tc| {
                if l.has_room(tc, size) {
                    Vec::new()
                } else {
                    l.evict(tc, tc.bound.saturating_sub(size))
                }
            })
        };
        self.give_back(out);
    }

    fn give_back(&mut self, blocks: Vec<(DevicePtr, u64)>) -> u64 {
        // First every `held` entry, whose slots `evict` has freed already.
        for (p, _) in &blocks {
            self.threads.held.remove(p);
        }
        let mut bytes = 0;
        for (p, _) in blocks {
            let (size, _) = self
                .release(p, false)
                .expect("a cached block is allocated in the pools");
            bytes += size;
        }
        bytes
    }

    /// Takes every cache from its owner (`tcache.rs`, the handshake); `end_seize` gives them
    /// back. With `nonempty_only`, only caches with something to give.
    pub(crate) fn seize(&self, nonempty_only: bool) -> Vec<Arc<ThreadCache>> {
        let caches: Vec<Arc<ThreadCache>> = self
            .threads
            .live()
            .filter(|c| !c.orphaned())
            .filter(|c| !nonempty_only || c.published.0.cached_blocks.load(Ordering::Relaxed) > 0)
            .cloned()
            .collect();
        for c in &caches {
            c.seize_start();
        }
        if caches.iter().any(|c| !c.is_mine()) {
            barrier::heavy_barrier();
            for c in caches.iter().filter(|c| !c.is_mine()) {
                c.seize_wait();
            }
        }
        caches
    }

    pub(crate) fn end_seize(&self, caches: Vec<Arc<ThreadCache>>) {
        for c in caches {
            c.seize_end();
        }
    }

    /// Every thread cache's free blocks back to the pools. Returns the bytes returned.
    pub(crate) fn drain_caches(&mut self) -> u64 {
        if self.threads.held.is_empty() {
            return 0;
        }
        let caches = self.seize(true);
        let mut bytes = 0;
        for tc in &caches {
            self.settle_cache(tc);
            // SAFETY: seized, under the device lock.
            let out = unsafe { tc.with_local(|l, tc| l.evict(tc, 0)) };
            bytes += self.give_back(out);
        }
        self.end_seize(caches);
        bytes
    }

    /// `reset_peak_stats`: every budget back, peaks restart at what is live now.
    pub(crate) fn reset_peaks(&mut self) {
        let caches = self.seize(false);
        for tc in &caches {
            // SAFETY: seized, under the device lock.
            unsafe { tc.with_local(|l, _| l.budget = Amount::default()) };
        }
        let live = self.user_live();
        self.peaks.reset(live);
        self.end_seize(caches);
    }

    /// A thread exits (or its allocator is going): its cache's blocks go back or stop being held.
    pub(crate) fn retire_cache(&mut self, tc: &ThreadCache) {
        self.settle_cache(tc);
        // SAFETY: the owner (exiting), under the device lock.
        let (out, live, budget) = unsafe {
            tc.with_local(|l, tc| {
                (
                    l.evict(tc, 0),
                    l.live_blocks(),
                    std::mem::take(&mut l.budget),
                )
            })
        };
        self.give_back(out);
        for (p, s) in live {
            self.unhold(Some(tc), p, tc.index, s);
        }
        self.peaks.credit(budget);
        // Its hits' counts move to the device's counters.
        let p = &tc.published.0;
        self.c.allocations += p.hit_allocs.load(Ordering::Relaxed);
        self.c.frees += p.hit_frees.load(Ordering::Relaxed);
        self.c.alloc_bytes += p.hit_alloc_bytes.load(Ordering::Relaxed);
        self.c.freed_bytes += p.hit_free_bytes.load(Ordering::Relaxed);
        self.threads.caches[tc.index as usize] = None;
        self.threads.free_ids.push(tc.index);
    }

    /// The user's live memory now: the pools' figures less what caches hold free.
    pub(crate) fn user_live(&self) -> Amount {
        let (mut bytes, mut blocks, mut adj) = (0u64, 0u64, self.threads.revoked_adj);
        for c in self.threads.live() {
            let p = &c.published.0;
            bytes += p.cached_bytes.load(Ordering::Relaxed);
            blocks += p.cached_blocks.load(Ordering::Relaxed);
            adj += c.published_adj();
        }
        Amount {
            bytes: self.c.allocated.saturating_sub(bytes),
            requested: (self.c.requested as i64 + adj).max(0) as u64,
            blocks: self.c.active.saturating_sub(blocks),
        }
    }

    /// Bytes free in thread caches, and the hits' counts: (cached, allocs, frees, alloc bytes,
    /// free bytes).
    pub(crate) fn cache_totals(&self) -> [u64; 5] {
        let mut t = [0u64; 5];
        for c in self.threads.live() {
            let p = &c.published.0;
            for (i, a) in [
                &p.cached_bytes,
                &p.hit_allocs,
                &p.hit_frees,
                &p.hit_alloc_bytes,
                &p.hit_free_bytes,
            ]
            .into_iter()
            .enumerate()
            {
                t[i] += a.load(Ordering::Relaxed);
            }
        }
        t
    }

    /// The blocks free in thread caches now (a snapshot: owners may be changing them).
    pub(crate) fn thread_cached_blocks(&self) -> std::collections::HashSet<DevicePtr> {
        let caches = &self.threads.caches;
        self.threads
            .held
            .iter()
            .filter(|(_, &(i, s))| {
                caches[i as usize]
                    .as_ref()
                    .is_some_and(|c| c.slots[s as usize].state() == tcache::CACHED)
            })
            .map(|(&p, _)| p)
            .collect()
    }

    /// Bytes the user freed, ever, hits included (the OOM sequence measures the hooks with it).
    pub(crate) fn user_freed_bytes(&self) -> u64 {
        self.c.freed_bytes + self.cache_totals()[4]
    }

    /// The live allocation holding `ptr`, as the user sees it: a block free in a thread cache is
    /// not live, and a live held block serves the request its thread recorded in its slot.
    pub(crate) fn user_allocation(
        &self,
        ptr: DevicePtr,
    ) -> Option<(DevicePtr, u64, u64, crate::pool::Owner)> {
        let (base, size, req, owner) = self.allocation(ptr)?;
        match self.threads.held.get(&base) {
            None => Some((base, size, req, owner)),
            Some(&(idx, s)) => {
                let c = self.threads.caches[idx as usize].as_ref()?;
                let slot = &c.slots[s as usize];
                (slot.state() == LIVE).then(|| (base, size, slot.requested(), owner))
            }
        }
    }

    /// `record_stream` on a held block: it stops being held first (a cache never serves a block
    /// with recorded streams), then is recorded as any allocation.
    pub(crate) fn record_stream_user(
        &mut self,
        me: Option<&ThreadCache>,
        ptr: DevicePtr,
        stream: Stream,
    ) -> Result<()> {
        if let Some((base, ..)) = self.user_allocation(ptr) {
            if let Some(&(idx, s)) = self.threads.held.get(&base) {
                self.unhold(me, base, idx, s);
            }
        } else {
            return Err(Error::UnknownPointer {
                ptr,
                device: Some(self.dev),
                interior_of: None,
            });
        }
        self.record_stream(ptr, stream)
    }

    /// Every cache seized and checked in full, with the peaks' invariant over all budgets.
    pub(crate) fn check_all_caches(&mut self) -> std::result::Result<(), String> {
        let caches = self.seize(false);
        for tc in &caches {
            self.settle_cache(tc);
        }
        let mut budgets = Amount::default();
        let mut r = Ok(());
        for tc in &caches {
            // SAFETY: seized, under the device lock.
            let one = unsafe {
                tc.with_local(|l, tc| {
                    budgets.add(l.budget);
                    self.check_cache(l, tc)
                })
            };
            r = r.and(one);
        }
        let orphans = self.threads.live().any(|c| c.orphaned());
        if r.is_ok() && !orphans {
            r = self.check_peaks(budgets);
        }
        self.end_seize(caches);
        r
    }

    /// One cache's own invariants, and every block it holds listed in `held` under it.
    fn check_cache(&self, l: &tcache::Local, tc: &ThreadCache) -> std::result::Result<(), String> {
        for (p, s) in l.held_blocks(tc) {
            if self.threads.held.get(&p) != Some(&(tc.index, s)) {
                return Err(format!("cached/live block {p:#x} is not in `held`"));
            }
        }
        l.check(tc)
    }

    fn check_peaks(&self, budgets: Amount) -> std::result::Result<(), String> {
        let live = self.user_live();
        let mut sum = live;
        sum.add(budgets);
        sum.add(self.peaks.headroom);
        if sum != self.peaks.peak {
            return Err(format!(
                "peaks: live {live:?} + budgets {budgets:?} + headroom {:?} != peak {:?}",
                self.peaks.headroom, self.peaks.peak
            ));
        }
        Ok(())
    }

    /// The thread caches' invariants, as far as they can be seen under the device lock: every
    /// held block is an allocated ordinary block of the pools held by a registered cache in a
    /// used slot; the calling thread's own cache in full; and, when no other thread has a cache,
    /// the peaks' invariant (`stats::Peaks`).
    pub(crate) fn check_threads(&self) -> std::result::Result<(), String> {
        for (&p, &(idx, s)) in &self.threads.held {
            let Some(c) = self
                .threads
                .caches
                .get(idx as usize)
                .and_then(Option::as_ref)
            else {
                return Err(format!(
                    "held block {p:#x} names cache {idx}, not registered"
                ));
            };
            let st = c.slots[s as usize].state();
            if st != LIVE && st != tcache::CACHED {
                return Err(format!(
                    "held block {p:#x} has slot {s} of cache {idx} in state {st}"
                ));
            }
            match self.allocation(p) {
                Some((base, ..)) if base == p => {}
                _ => return Err(format!("held block {p:#x} is not allocated in the pools")),
            }
        }
        let mut budgets = Amount::default();
        let mut all_mine = true;
        for c in self.threads.live() {
            if !c.is_mine() {
                all_mine = false;
                continue;
            }
            // SAFETY: the owner, under the device lock.
            let r = unsafe {
                c.with_local(|l, tc| {
                    budgets.add(l.budget);
                    self.check_cache(l, tc)
                })
            };
            r?;
        }
        if all_mine && self.threads.charging == 0 {
            self.check_peaks(budgets)?;
        }
        Ok(())
    }
}
