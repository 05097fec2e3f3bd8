//! Thread caches: free blocks a thread keeps for itself, served without the device lock.
//!
//! # Data structure
//! One [`ThreadCache`] per (thread, device allocator), made at the thread's first call on that
//! device and found through the thread's TLS (a one-entry memo, then a short list). It holds:
//! - **slots**, a fixed array of [`SLOTS`] entries, one per block the cache *holds*: a block the
//!   device's pools count as allocated and that this thread serves. A slot is `CACHED` (free, in a
//!   bin), `LIVE` (handed out to the user by this thread) or `REVOKED` (freed or taken back by
//!   another thread under the device lock; the owner forgets it at its next slow step). Its state
//!   and request are atomics so that another thread, under the device lock, can tell a live block
//!   from a free one without the owner's help.
//! - **bins** (in the owner's [`Local`]): the `CACHED` slots of one (stream, size), where the size is
//!   the size class of a small request or the exact rounded size of a large one. A hit serves a
//!   request only from the bin of its own stream: stream semantics do not change.
//! - **live**: pointer → slot of the `LIVE` blocks, so that a free needs no device lookup to
//!   validate and classify itself, and a double free is caught.
//! - **budget**: what this thread may allocate without the lock and still keep the peaks exact
//!   ([`Peaks`](crate::stats::Peaks)).
//! - **published** figures (cached bytes and blocks, the request adjustment, hit counts), written
//!   by the owner alone and summed by `stats()` under the device lock: no drain on the read path.
//!
//! The device keeps, under its lock, `held`: pointer → (cache, slot) for every held block, so that
//! a free from another thread, a `record_stream` or an `allocation` lookup finds the holder.
//!
//! # Invariants
//! - A held block is in exactly one cache's slots; the device's pools count it as allocated, with
//!   the request recorded in the slot's `recorded` field.
//! - A `CACHED` slot is in exactly one bin, that of its block's stream and size; a `LIVE` slot is in
//!   `live` under its block's pointer; `bytes`/`blocks` are the sums over the bins, at most
//!   `bound` bytes.
//! - `adj` is Σ(request served − request recorded) over `LIVE` slots minus Σ recorded over
//!   `CACHED` ones: the user's requested bytes are the device's plus every cache's `adj` plus the
//!   device's compensation for revoked slots not yet forgotten.
//!
//! # Locking
//! The owner touches [`Local`] (a) in its fast path, inside a `busy` section, with no lock, or (b)
//! under the device lock. Anyone else touches it only under the device lock, after [`seize`]:
//! Dekker's handshake with an asymmetric barrier (`crate::sync::barrier`). The owner stores `busy`,
//! runs the light barrier and loads the signals; a seizer stores `drain`, runs the heavy barrier and
//! waits until `busy` is clear. One of the two sees the other's store: either the owner sees
//! `drain` and leaves for the slow path (which waits for the device lock), or the seizer sees
//! `busy` and waits for the section to end. So a hit takes no lock and makes no atomic
//! read-modify-write: two plain stores and a load on the thread's own line. Other threads write
//! only the signal line (under the device lock) and the slots of blocks they free.
//!
//! [`seize`]: ThreadCache::seize_start

use crate::driver::{DevicePtr, Stream};
use crate::stats::Amount;
use crate::sync::{barrier, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering, RaceCell};
use rustc_hash::FxHashMap as HashMap;

/// Blocks one cache can hold (free or handed out). 16 B of atomics each.
#[cfg(not(loom))]
pub(crate) const SLOTS: usize = 2048;
#[cfg(loom)]
pub(crate) const SLOTS: usize = 4;

/// Free blocks one bin of a large size may hold. One serves a hot pair; more would keep free
/// large blocks from merging with their free neighbours in the pools, which costs placement
/// (measured on the replay's traces: `docs/design-notes.md`, "Thread caches").
pub(crate) const LARGE_PER_BIN: usize = 1;

/// Refill batches of a small class: at most this many slots, and at most [`REFILL_BYTES`].
pub(crate) const REFILL_SLOTS: u64 = 16;
pub(crate) const REFILL_BYTES: u64 = 64 << 10;

pub(crate) const UNUSED: u64 = 0;
pub(crate) const CACHED: u64 = 1;
pub(crate) const LIVE: u64 = 2;
pub(crate) const REVOKED: u64 = 3;

/// One held block's shared state: `state | requested << 2` (the request it serves while live),
/// and the request the device's pools recorded for it.
#[derive(Debug, Default)]
pub(crate) struct Slot {
    word: AtomicU64,
    recorded: AtomicU64,
}

impl Slot {
    #[inline]
    pub(crate) fn state(&self) -> u64 {
        self.word.load(Ordering::Relaxed) & 3
    }
    #[inline]
    pub(crate) fn requested(&self) -> u64 {
        self.word.load(Ordering::Relaxed) >> 2
    }
    #[inline]
    pub(crate) fn set(&self, state: u64, requested: u64) {
        self.word.store(state | requested << 2, Ordering::Relaxed);
    }
    #[inline]
    pub(crate) fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }
}

/// A line of its own, so that the owner's stores and other threads' signals do not share one.
#[derive(Debug, Default)]
#[repr(align(128))]
pub(crate) struct Line<T>(pub(crate) T);

/// Set by other threads (under the device lock), read by the owner at every hit.
#[derive(Debug, Default)]
struct Signals {
    /// A seizer wants the cache: leave for the slow path.
    drain: AtomicBool,
    /// Slots were revoked: forget them (slow path) before serving.
    revoked: AtomicBool,
}

/// What the owner publishes for `stats()`.
#[derive(Debug, Default)]
pub(crate) struct Published {
    pub(crate) cached_bytes: AtomicU64,
    pub(crate) cached_blocks: AtomicU64,
    /// `adj` as two's complement.
    pub(crate) requested_adj: AtomicU64,
    pub(crate) hit_allocs: AtomicU64,
    pub(crate) hit_frees: AtomicU64,
    pub(crate) hit_alloc_bytes: AtomicU64,
    pub(crate) hit_free_bytes: AtomicU64,
}

#[derive(Debug)]
struct Bin {
    stream: Stream,
    size: u64,
    slots: Vec<u32>,
}

/// The live map: pointer → slot, open addressing with linear probing over twice [`SLOTS`]
/// entries (a load of at most one half), backward-shift deletion. A general hash map's insert and
/// removal were 42% of a hit pair's time (`perf record` on the hot-pair benchmark).
#[derive(Debug, Default)]
struct LiveTable {
    /// 0 marks an empty entry (no allocation starts at address 0).
    keys: Vec<u64>,
    slots: Vec<u16>,
}

impl LiveTable {
    const LEN: usize = 2 * SLOTS;

    #[inline]
    fn home(p: DevicePtr) -> usize {
        ((p >> 9).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & (Self::LEN - 1)
    }

    #[inline]
    fn find(&self, p: DevicePtr) -> Option<usize> {
        // 0 is the empty mark: a free of NULL (bad input) must find nothing.
        if self.keys.is_empty() || p == 0 {
            return None;
        }
        let mut i = Self::home(p);
        loop {
            match self.keys[i] {
                k if k == p => return Some(i),
                0 => return None,
                _ => i = (i + 1) & (Self::LEN - 1),
            }
        }
    }

    #[inline]
    fn get(&self, p: DevicePtr) -> Option<u32> {
        self.find(p).map(|i| u32::from(self.slots[i]))
    }

    /// Sets `p`'s slot (at most `SLOTS` keys are ever present: one per slot).
    #[inline]
    fn insert(&mut self, p: DevicePtr, s: u32) {
        debug_assert!(p != 0 && (s as usize) < SLOTS);
        if self.keys.is_empty() {
            self.keys = vec![0; Self::LEN];
            self.slots = vec![0; Self::LEN];
        }
        let mut i = Self::home(p);
        while self.keys[i] != 0 && self.keys[i] != p {
            i = (i + 1) & (Self::LEN - 1);
        }
        self.keys[i] = p;
        self.slots[i] = s as u16;
    }

    #[inline]
    fn remove(&mut self, p: DevicePtr) -> Option<u32> {
        let mut hole = self.find(p)?;
        let s = u32::from(self.slots[hole]);
        let mask = Self::LEN - 1;
        let mut j = hole;
        loop {
            j = (j + 1) & mask;
            let k = self.keys[j];
            if k == 0 {
                break;
            }
            // `k` may move back into the hole unless its home lies after the hole (cyclically)
            // and at or before `j`.
            let home = Self::home(k);
            if (j.wrapping_sub(home) & mask) >= (j.wrapping_sub(hole) & mask) {
                self.keys[hole] = k;
                self.slots[hole] = self.slots[j];
                hole = j;
            }
        }
        self.keys[hole] = 0;
        Some(s)
    }

    fn iter(&self) -> impl Iterator<Item = (DevicePtr, u32)> + '_ {
        self.keys
            .iter()
            .zip(&self.slots)
            .filter(|(&k, _)| k != 0)
            .map(|(&k, &s)| (k, u32::from(s)))
    }
}

/// The owner's side of a cache (see the module's locking rule for who may touch it).
#[derive(Debug, Default)]
pub(crate) struct Local {
    bins: Vec<Bin>,
    bin_index: HashMap<(Stream, u64), u32>,
    /// The bin of the last hit.
    mru: usize,
    live: LiveTable,
    /// Per slot: its block and bin.
    entries: Vec<(DevicePtr, u32)>,
    unused: Vec<u32>,
    pub(crate) budget: Amount,
    bytes: u64,
    blocks: u64,
    adj: i64,
    hits: [u64; 4],
}

/// One thread's cache for one device allocator.
#[derive(Debug)]
pub(crate) struct ThreadCache {
    busy: Line<AtomicBool>,
    signals: Line<Signals>,
    pub(crate) published: Line<Published>,
    pub(crate) slots: Box<[Slot]>,
    local: RaceCell<Local>,
    /// Slots revoked by other threads, for the owner to forget (pushed under the device lock).
    revoked: Mutex<Vec<u32>>,
    /// Its index in the device's registry.
    pub(crate) index: u32,
    /// Free bytes it may hold, and the largest block it caches.
    pub(crate) bound: u64,
    pub(crate) max_block: u64,
    /// Sizes above it are large blocks ([`LARGE_PER_BIN`]).
    pub(crate) small_max: u64,
    /// Large blocks are cached only in whole pages: a cached block that shares a page with
    /// others keeps that page's free space from merging.
    pub(crate) page_size: u64,
    /// Its thread (a serial of ours) and the fork generation it was made in.
    owner: u64,
    fork_gen: u64,
}

// SAFETY: `local` is the only field that is not `Sync`; the module's locking rule (a busy section
// of its owner, or the device lock held by the owner or by a seizer) gives one thread at a time
// access to it. Everything else is atomics, a lock, or immutable.
unsafe impl Sync for ThreadCache {}
// SAFETY: `Local` holds plain data (no thread-bound handles): it may move with the cache.
unsafe impl Send for ThreadCache {}

impl ThreadCache {
    pub(crate) fn new(index: u32, bound: u64, small_max: u64, page_size: u64) -> ThreadCache {
        ThreadCache {
            busy: Line::default(),
            signals: Line::default(),
            published: Line::default(),
            slots: (0..SLOTS).map(|_| Slot::default()).collect(),
            local: RaceCell::new(Local::default()),
            revoked: Mutex::new(Vec::new()),
            index,
            bound,
            max_block: bound / 4,
            small_max,
            page_size,
            owner: fork::thread_serial(),
            fork_gen: fork::generation(),
        }
    }

    /// Whether its thread no longer exists in this process (it was left behind by a `fork`):
    /// nobody will ever run its fast path again, and its state may be mid-operation.
    pub(crate) fn orphaned(&self) -> bool {
        self.fork_gen < fork::generation() && self.owner != fork::survivor()
    }

    /// Whether the calling thread owns it.
    pub(crate) fn is_mine(&self) -> bool {
        self.owner == fork::thread_serial()
    }

    /// The fast path's entry: `true` if `local` may be used now, with no lock.
    #[inline(always)]
    fn enter(&self) -> bool {
        self.busy.0.store(true, Ordering::Relaxed);
        barrier::light_barrier();
        let s = &self.signals.0;
        if s.drain.load(Ordering::Acquire) || s.revoked.load(Ordering::Acquire) {
            self.busy.0.store(false, Ordering::Release);
            return false;
        }
        true
    }

    #[inline(always)]
    fn leave(&self) {
        self.busy.0.store(false, Ordering::Release);
    }

    /// A hit: a block of `size` (bin size) for `stream`, serving `requested`. Owner only.
    #[inline]
    pub(crate) fn try_alloc(
        &self,
        stream: Stream,
        size: u64,
        requested: u64,
        captures: &AtomicUsize,
    ) -> Option<DevicePtr> {
        if !self.enter() {
            return None;
        }
        // Read after the barrier, as the signals are: a route opened before a seizure is seen.
        if captures.load(Ordering::Relaxed) != 0 {
            self.leave();
            return None;
        }
        // SAFETY: inside the busy section with no drain signalled (module docs, "Locking"): no
        // seizer touches `local` until `leave`, and the owner's own slow path is not running.
        let r = unsafe {
            self.local
                .with_mut(|l| l.pop(self, stream, size, requested))
        };
        self.leave();
        r
    }

    /// A hit free: the block's size if `ptr` was live from this cache and is now cached. Owner
    /// only.
    #[inline]
    pub(crate) fn try_free(&self, ptr: DevicePtr) -> Option<u64> {
        if !self.enter() {
            return None;
        }
        // SAFETY: as in `try_alloc`.
        let r = unsafe { self.local.with_mut(|l| l.push(self, ptr)) };
        self.leave();
        r
    }

    /// The owner's slow path, or a seizer: runs `f` on `local`.
    ///
    /// # Safety
    /// The caller holds the device lock and is the owner (not inside its fast path), or has
    /// seized the cache ([`ThreadCache::seize_start`]) and not yet released it.
    pub(crate) unsafe fn with_local<R>(&self, f: impl FnOnce(&mut Local, &ThreadCache) -> R) -> R {
        // SAFETY: the caller's contract excludes the fast path and every other slow path.
        unsafe { self.local.with_mut(|l| f(l, self)) }
    }

    /// Signals a seizure (under the device lock); [`heavy_barrier`](barrier::heavy_barrier) and
    /// [`ThreadCache::seize_wait`] complete it.
    pub(crate) fn seize_start(&self) {
        self.signals.0.drain.store(true, Ordering::Relaxed);
    }

    /// Waits until the owner is outside its fast path. After the heavy barrier, it will stay
    /// outside until [`ThreadCache::seize_end`].
    pub(crate) fn seize_wait(&self) {
        let mut spins = 0u32;
        while self.busy.0.load(Ordering::Acquire) {
            spins += 1;
            crate::sync::spin_wait(spins);
        }
    }

    pub(crate) fn seize_end(&self) {
        self.signals.0.drain.store(false, Ordering::Release);
    }

    /// Another thread revoked `slot` (under the device lock): the owner forgets it at its next
    /// slow step.
    pub(crate) fn revoke(&self, slot: u32) {
        let sl = &self.slots[slot as usize];
        sl.set(REVOKED, sl.requested());
        self.revoked.lock().push(slot);
        self.signals.0.revoked.store(true, Ordering::Release);
    }

    /// The revoked slots, taken (under the device lock, by the owner or a seizer).
    pub(crate) fn take_revoked(&self) -> Vec<u32> {
        if !self.signals.0.revoked.load(Ordering::Acquire) {
            return Vec::new();
        }
        self.signals.0.revoked.store(false, Ordering::Relaxed);
        std::mem::take(&mut *self.revoked.lock())
    }

    /// The request adjustment it publishes.
    pub(crate) fn published_adj(&self) -> i64 {
        self.published.0.requested_adj.load(Ordering::Relaxed) as i64
    }
}

impl Local {
    #[inline]
    fn find_bin(&mut self, stream: Stream, size: u64) -> Option<usize> {
        if let Some(b) = self.bins.get(self.mru) {
            if b.size == size && b.stream == stream {
                return Some(self.mru);
            }
        }
        let i = *self.bin_index.get(&(stream, size))? as usize;
        self.mru = i;
        Some(i)
    }

    /// A hit: a block of the bin, if the budget covers it.
    #[inline]
    fn pop(
        &mut self,
        tc: &ThreadCache,
        stream: Stream,
        size: u64,
        requested: u64,
    ) -> Option<DevicePtr> {
        let need = Amount::block(size, requested);
        if !self.budget.covers(need) {
            return None;
        }
        let ptr = self.take(tc, stream, size, requested)?;
        self.budget.take(need);
        self.hits[0] += 1;
        self.hits[2] += size;
        self.publish(tc);
        Some(ptr)
    }

    /// Hands out a cached block of (stream, size), unpublished.
    #[inline]
    fn take(
        &mut self,
        tc: &ThreadCache,
        stream: Stream,
        size: u64,
        requested: u64,
    ) -> Option<DevicePtr> {
        let b = self.find_bin(stream, size)?;
        let s = self.bins[b].slots.pop()?;
        tc.slots[s as usize].set(LIVE, requested);
        let ptr = self.entries[s as usize].0;
        self.live.insert(ptr, s);
        self.bytes -= size;
        self.blocks -= 1;
        self.adj += requested as i64;
        Some(ptr)
    }

    #[inline]
    fn push(&mut self, tc: &ThreadCache, ptr: DevicePtr) -> Option<u64> {
        let s = self.live.remove(ptr)?;
        let slot = &tc.slots[s as usize];
        let bin = self.entries[s as usize].1 as usize;
        let size = self.bins[bin].size;
        if slot.state() != LIVE
            || (size > tc.small_max
                && (!size.is_multiple_of(tc.page_size)
                    || self.bins[bin].slots.len() >= LARGE_PER_BIN))
            || self.bytes + size > tc.bound
            || self.budget.bytes + size > 2 * tc.bound
        {
            // The slow path says why (a revoked slot) or makes room.
            self.live.insert(ptr, s);
            return None;
        }
        let requested = slot.requested();
        slot.set(CACHED, 0);
        self.bins[bin].slots.push(s);
        self.bytes += size;
        self.blocks += 1;
        self.adj -= requested as i64;
        self.budget.add(Amount::block(size, requested));
        self.hits[1] += 1;
        self.hits[3] += size;
        self.publish(tc);
        Some(size)
    }

    #[inline]
    fn publish(&self, tc: &ThreadCache) {
        let p = &tc.published.0;
        p.cached_bytes.store(self.bytes, Ordering::Relaxed);
        p.cached_blocks.store(self.blocks, Ordering::Relaxed);
        p.requested_adj.store(self.adj as u64, Ordering::Relaxed);
        p.hit_allocs.store(self.hits[0], Ordering::Relaxed);
        p.hit_frees.store(self.hits[1], Ordering::Relaxed);
        p.hit_alloc_bytes.store(self.hits[2], Ordering::Relaxed);
        p.hit_free_bytes.store(self.hits[3], Ordering::Relaxed);
    }

    fn bin_for(&mut self, stream: Stream, size: u64) -> u32 {
        if let Some(&i) = self.bin_index.get(&(stream, size)) {
            return i;
        }
        let i = self.bins.len() as u32;
        self.bins.push(Bin {
            stream,
            size,
            slots: Vec::new(),
        });
        self.bin_index.insert((stream, size), i);
        i
    }

    fn take_slot(&mut self) -> Option<u32> {
        if let Some(s) = self.unused.pop() {
            return Some(s);
        }
        (self.entries.len() < SLOTS).then(|| {
            self.entries.push((0, 0));
            (self.entries.len() - 1) as u32
        })
    }

    fn release_slot(&mut self, tc: &ThreadCache, s: u32) {
        tc.slots[s as usize].set(UNUSED, 0);
        self.unused.push(s);
    }

    /// Whether the bin of (stream, size) may take one more free block.
    pub(crate) fn bin_has_room(&self, tc: &ThreadCache, stream: Stream, size: u64) -> bool {
        size <= tc.small_max
            || (size.is_multiple_of(tc.page_size)
                && self
                    .bin_index
                    .get(&(stream, size))
                    .is_none_or(|&b| self.bins[b as usize].slots.len() < LARGE_PER_BIN))
    }

    /// Whether a free block of `size` fits without going over the bound.
    pub(crate) fn has_room(&self, tc: &ThreadCache, size: u64) -> bool {
        self.bytes + size <= tc.bound && (self.unused.len() + SLOTS - self.entries.len()) > 0
    }

    /// Holds a free block (the device counts it allocated, with `recorded` requested). Returns
    /// its slot, or `None` (nothing changed) without room.
    pub(crate) fn insert_cached(
        &mut self,
        tc: &ThreadCache,
        ptr: DevicePtr,
        stream: Stream,
        size: u64,
        recorded: u64,
    ) -> Option<u32> {
        if self.bytes + size > tc.bound {
            return None;
        }
        let s = self.take_slot()?;
        let bin = self.bin_for(stream, size);
        self.entries[s as usize] = (ptr, bin);
        let slot = &tc.slots[s as usize];
        slot.recorded.store(recorded, Ordering::Relaxed);
        slot.set(CACHED, 0);
        self.bins[bin as usize].slots.push(s);
        self.bytes += size;
        self.blocks += 1;
        self.adj -= recorded as i64;
        self.publish(tc);
        Some(s)
    }

    /// A cached block of (stream, size) handed out under the lock (not a hit: the caller
    /// counts it).
    pub(crate) fn take_cached(
        &mut self,
        tc: &ThreadCache,
        stream: Stream,
        size: u64,
        requested: u64,
    ) -> Option<DevicePtr> {
        let ptr = self.take(tc, stream, size, requested)?;
        self.publish(tc);
        Some(ptr)
    }

    /// Holds a block just handed out to the user (the device counts it allocated with
    /// `requested`). Returns its slot, or `None` without a free slot.
    pub(crate) fn insert_live(
        &mut self,
        tc: &ThreadCache,
        ptr: DevicePtr,
        stream: Stream,
        size: u64,
        requested: u64,
    ) -> Option<u32> {
        let s = self.take_slot()?;
        let bin = self.bin_for(stream, size);
        self.entries[s as usize] = (ptr, bin);
        let slot = &tc.slots[s as usize];
        slot.recorded.store(requested, Ordering::Relaxed);
        slot.set(LIVE, requested);
        self.live.insert(ptr, s);
        Some(s)
    }

    /// A live block of this cache, by pointer: (slot, stream, size), if `ptr` is one.
    pub(crate) fn live_block(&self, ptr: DevicePtr) -> Option<(u32, Stream, u64)> {
        let s = self.live.get(ptr)?;
        let bin = &self.bins[self.entries[s as usize].1 as usize];
        Some((s, bin.stream, bin.size))
    }

    /// A live block goes back to being cached (its free under the lock). Caller checked room.
    pub(crate) fn recache(&mut self, tc: &ThreadCache, ptr: DevicePtr) -> Amount {
        let s = self.live.remove(ptr).expect("a live block of this cache");
        let slot = &tc.slots[s as usize];
        let requested = slot.requested();
        slot.set(CACHED, 0);
        let bin = self.entries[s as usize].1 as usize;
        let size = self.bins[bin].size;
        self.bins[bin].slots.push(s);
        self.bytes += size;
        self.blocks += 1;
        self.adj -= requested as i64;
        self.publish(tc);
        Amount::block(size, requested)
    }

    /// Lets go of a live block, which becomes an ordinary allocation of the device: returns
    /// (slot, request served, request recorded); the caller tells the device the request.
    pub(crate) fn unhold_live(&mut self, tc: &ThreadCache, ptr: DevicePtr) -> (u32, u64, u64) {
        let s = self.live.remove(ptr).expect("a live block of this cache");
        let slot = &tc.slots[s as usize];
        let (req, rec) = (slot.requested(), slot.recorded());
        self.adj -= req as i64 - rec as i64;
        self.release_slot(tc, s);
        self.publish(tc);
        (s, req, rec)
    }

    /// Forgets slots other threads revoked; returns Σ(served − recorded) they had in `adj`.
    pub(crate) fn forget(&mut self, tc: &ThreadCache, revoked: Vec<u32>) -> i64 {
        let mut d = 0;
        for s in revoked {
            let ptr = self.entries[s as usize].0;
            if self.live.get(ptr) == Some(s) {
                self.live.remove(ptr);
            }
            let slot = &tc.slots[s as usize];
            d += slot.requested() as i64 - slot.recorded() as i64;
            self.release_slot(tc, s);
        }
        self.adj -= d;
        self.publish(tc);
        d
    }

    /// Takes cached blocks out, oldest bins' first, until at most `keep` bytes stay: (pointer,
    /// recorded request) of each, for the caller to return to the device.
    pub(crate) fn evict(&mut self, tc: &ThreadCache, keep: u64) -> Vec<(DevicePtr, u64)> {
        let mut out = Vec::new();
        for b in 0..self.bins.len() {
            while self.bytes > keep {
                let Some(s) = self.bins[b].slots.pop() else {
                    break;
                };
                self.bytes -= self.bins[b].size;
                self.blocks -= 1;
                let rec = tc.slots[s as usize].recorded();
                self.adj += rec as i64;
                out.push((self.entries[s as usize].0, rec));
                self.release_slot(tc, s);
            }
        }
        self.publish(tc);
        out
    }

    /// The live blocks: (pointer, slot).
    pub(crate) fn live_blocks(&self) -> Vec<(DevicePtr, u32)> {
        self.live.iter().collect()
    }

    /// Checks the cache's own invariants against its slots.
    pub(crate) fn check(&self, tc: &ThreadCache) -> Result<(), String> {
        let (mut bytes, mut blocks, mut adj) = (0u64, 0u64, 0i64);
        let mut seen = vec![false; self.entries.len()];
        for (i, bin) in self.bins.iter().enumerate() {
            if self.bin_index.get(&(bin.stream, bin.size)) != Some(&(i as u32)) {
                return Err(format!("thread cache bin {i} is not indexed"));
            }
            for &s in &bin.slots {
                let slot = &tc.slots[s as usize];
                if slot.state() != CACHED || self.entries[s as usize].1 != i as u32 {
                    return Err(format!(
                        "thread cache slot {s} in bin {i} is not cached there"
                    ));
                }
                if std::mem::replace(&mut seen[s as usize], true) {
                    return Err(format!("thread cache slot {s} is in two places"));
                }
                bytes += bin.size;
                blocks += 1;
                adj -= slot.recorded() as i64;
            }
        }
        for (p, s) in self.live.iter() {
            let slot = &tc.slots[s as usize];
            if self.entries[s as usize].0 != p {
                return Err(format!(
                    "thread cache live entry {p:#x} names slot {s} of another block"
                ));
            }
            if std::mem::replace(&mut seen[s as usize], true) {
                return Err(format!("thread cache slot {s} is in two places"));
            }
            match slot.state() {
                // Revoked, not forgotten yet: its part of `adj` is still there.
                LIVE | REVOKED => adj += slot.requested() as i64 - slot.recorded() as i64,
                st => return Err(format!("thread cache live slot {s} is in state {st}")),
            }
        }
        if (bytes, blocks) != (self.bytes, self.blocks) || bytes > tc.bound {
            return Err(format!(
                "thread cache holds {bytes} B in {blocks} blocks, counted {} B in {}, bound {}",
                self.bytes, self.blocks, tc.bound
            ));
        }
        if adj != self.adj {
            return Err(format!(
                "thread cache request adjustment {} != {adj}",
                self.adj
            ));
        }
        for &s in &self.unused {
            if tc.slots[s as usize].state() != UNUSED || seen[s as usize] {
                return Err(format!("thread cache unused slot {s} is in use"));
            }
        }
        Ok(())
    }

    /// Every block the device counts as held by this cache: (pointer, slot), live or cached
    /// (not the revoked ones it has yet to forget).
    pub(crate) fn held_blocks(&self, tc: &ThreadCache) -> Vec<(DevicePtr, u32)> {
        let mut v = self.live_blocks();
        v.retain(|&(_, s)| tc.slots[s as usize].state() != REVOKED);
        for bin in &self.bins {
            v.extend(bin.slots.iter().map(|&s| (self.entries[s as usize].0, s)));
        }
        v
    }
}

/// The thread serial and the fork generation (a `fork` leaves every other thread's cache behind
/// in the child: [`ThreadCache::orphaned`]).
#[cfg(not(loom))]
pub(crate) mod fork {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Once;

    static NEXT_SERIAL: AtomicU64 = AtomicU64::new(1);
    static GENERATION: AtomicU64 = AtomicU64::new(0);
    static SURVIVOR: AtomicU64 = AtomicU64::new(0);
    static HANDLER: Once = Once::new();

    std::thread_local! {
        static SERIAL: Cell<u64> = const { Cell::new(0) };
    }

    /// The calling thread's serial (never 0; a thread keeps it across a fork into the child).
    pub(crate) fn thread_serial() -> u64 {
        SERIAL
            .try_with(|s| {
                if s.get() == 0 {
                    s.set(NEXT_SERIAL.fetch_add(1, Ordering::Relaxed));
                }
                s.get()
            })
            .unwrap_or(u64::MAX)
    }

    pub(crate) fn generation() -> u64 {
        GENERATION.load(Ordering::Acquire)
    }

    pub(crate) fn survivor() -> u64 {
        SURVIVOR.load(Ordering::Acquire)
    }

    extern "C" fn in_child() {
        // Async-signal-safe: two atomic stores and a thread-local read of an initialised cell.
        SURVIVOR.store(SERIAL.try_with(Cell::get).unwrap_or(0), Ordering::Release);
        GENERATION.fetch_add(1, Ordering::AcqRel);
    }

    /// Registers the fork handler, once (before the first cache is made).
    pub(crate) fn watch() {
        HANDLER.call_once(|| {
            thread_serial();
            // SAFETY: `in_child` is an `extern "C" fn()` that lives as long as the process.
            unsafe {
                libc::pthread_atfork(None, None, Some(in_child));
            }
        });
    }
}

#[cfg(loom)]
pub(crate) mod fork {
    pub(crate) fn thread_serial() -> u64 {
        crate::sync::current_thread_serial()
    }
    pub(crate) fn generation() -> u64 {
        0
    }
    pub(crate) fn survivor() -> u64 {
        0
    }
    pub(crate) fn watch() {}
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::{LiveTable, SLOTS};
    use std::collections::HashMap;

    #[test]
    fn the_live_table_agrees_with_a_hash_map_through_collisions_and_removals() {
        let mut t = LiveTable::default();
        let mut m: HashMap<u64, u32> = HashMap::new();
        let mut rng = 0x2545_F491_4F6C_DD1Du64;
        for step in 0..200_000u64 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            // Few distinct pointers, many sharing a home, so probes wrap and shift.
            let p = 512 * (1 + rng % 3_000);
            assert_eq!(t.get(0), None, "0 is never a key");
            if rng >> 40 & 1 == 0 && m.len() < SLOTS {
                let s = (step % SLOTS as u64) as u32;
                t.insert(p, s);
                m.insert(p, s);
            } else {
                assert_eq!(t.remove(p), m.remove(&p), "step {step}");
            }
            if step % 1_000 == 0 {
                for (&k, &v) in &m {
                    assert_eq!(t.get(k), Some(v), "step {step}");
                }
                assert_eq!(t.iter().count(), m.len());
            }
        }
    }
}
