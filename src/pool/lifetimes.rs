//! Lifetime prediction for large blocks: when will the block being placed be freed?
//!
//! Training and inference steps repeat, so a request usually recurs: the same size asked for after
//! the same two requests before it, once per step (or per layer). Its lifetime last time is the
//! best guess for this time. The large pool uses the guess to put a block next to a live block
//! predicted to die at about the same time ([`super::large::BlockPool::fit_near`]): when both are
//! freed, the free space they leave is one piece, not a hole between live blocks that strands part
//! of a page.
//!
//! # Data structure
//! - A *clock*: the number of large blocks handed out so far on this device. Lifetimes are
//!   measured in its ticks (other large allocations in between), which follow the program's
//!   steps whatever their speed.
//! - A *context*: the rounded sizes of the two previous large requests. A request's *key* hashes
//!   its own rounded size with them; it is what "the same request" means from one step to the
//!   next (a position in the repeating sequence of requests, robust to the sequence shifting).
//! - A *table* of the lifetime seen last time per key: direct-mapped, [`TABLE_SIZE`] entries of a
//!   32-bit tag and a 32-bit lifetime. A bounded table keeps the memory fixed (128 KiB per device)
//!   however many shapes a run goes through: a collision forgets one key's lifetime. No
//!   allocation, and one load, on the hot path.
//!
//! A key never seen predicts [`UNKNOWN`]: far in the future, the same for every unknown block, so
//! the first step's blocks (parameters and optimizer state among them, which live for the whole
//! run) keep company with each other.
//!
//! # Invariants
//! Predictions only choose among placements that fit; a wrong one may cost memory, never
//! correctness. The table holds no pointer and no state any other structure depends on.
//!
//! # Locking
//! None of its own; used under the device lock.

/// The predicted death of a block whose request was never seen: later than any real prediction.
pub(crate) const UNKNOWN: u64 = u64::MAX / 4;

/// Entries in the lifetime table (a power of two).
pub(crate) const TABLE_SIZE: usize = 1 << 14;

/// What a large block remembers of its prediction: when it was handed out, under which key, and
/// when it was expected to be freed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stamp {
    /// The clock when it was handed out.
    pub(crate) born: u64,
    /// The predicted clock at its free ([`UNKNOWN`] when never seen).
    pub(crate) death: u64,
    /// Its request's key (0 for blocks not placed by prediction).
    pub(crate) key: u32,
}

/// One device's lifetime predictor.
#[derive(Debug)]
pub(crate) struct Lifetimes {
    clock: u64,
    context: [u64; 2],
    /// Per slot: the key's tag (0: empty) and its last lifetime in ticks, saturated.
    table: Box<[(u32, u32)]>,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Lifetimes {
            clock: 0,
            context: [0; 2],
            table: vec![(0, 0); TABLE_SIZE].into_boxed_slice(),
        }
    }
}

impl Lifetimes {
    /// The stamp a large block of rounded `size` would get if handed out now. Changes nothing: the
    /// clock and context move only when a block is handed out ([`Lifetimes::commit`]), so that a
    /// request retried through the slow path is predicted once.
    #[inline]
    pub(crate) fn predict(&self, size: u64) -> Stamp {
        let key = self.key(size);
        let (tag, life) = self.table[key as usize & (TABLE_SIZE - 1)];
        let born = self.clock + 1;
        let death = if tag == key {
            born + u64::from(life)
        } else {
            UNKNOWN
        };
        Stamp { born, death, key }
    }

    /// A large block of rounded `size` was handed out with `stamp` (from [`Lifetimes::predict`]).
    #[inline]
    pub(crate) fn commit(&mut self, size: u64, stamp: Stamp) {
        debug_assert_eq!(stamp.born, self.clock + 1);
        self.clock = stamp.born;
        self.context = [size, self.context[0]];
    }

    /// A block handed out with `stamp` was freed now: its lifetime is what its key predicts next.
    #[inline]
    pub(crate) fn observe(&mut self, stamp: Stamp) {
        if stamp.key == 0 {
            return;
        }
        let life = self
            .clock
            .saturating_sub(stamp.born)
            .min(u64::from(u32::MAX)) as u32;
        self.table[stamp.key as usize & (TABLE_SIZE - 1)] = (stamp.key, life);
    }

    /// The key of a request of rounded `size` after the current context: never 0 (0 marks an
    /// empty table slot and an unstamped block).
    #[inline]
    fn key(&self, size: u64) -> u32 {
        let h = (size ^ self.context[0].rotate_left(29) ^ self.context[1].rotate_left(13))
            .wrapping_mul(0x9E37_79B9_7F4A_7C15);
        ((h >> 32) as u32).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out a block of `size` and returns its stamp.
    fn hand_out(l: &mut Lifetimes, size: u64) -> Stamp {
        let s = l.predict(size);
        l.commit(size, s);
        s
    }

    #[test]
    fn a_request_seen_in_the_same_context_predicts_its_last_lifetime() {
        let mut l = Lifetimes::default();
        // Step 1: a (lives 2 ticks), b, c.
        let a = hand_out(&mut l, 4 << 20);
        assert_eq!(a.death, UNKNOWN, "never seen");
        hand_out(&mut l, 1 << 20);
        hand_out(&mut l, 2 << 20);
        l.observe(a);
        // Step 2: the same sequence of requests: a comes after the same two sizes.
        hand_out(&mut l, 1 << 20);
        hand_out(&mut l, 2 << 20);
        let a2 = hand_out(&mut l, 4 << 20);
        assert_ne!(a2.key, a.key, "a different context is a different request");
        assert_eq!(a2.death, UNKNOWN);
        hand_out(&mut l, 1 << 20);
        hand_out(&mut l, 2 << 20);
        l.observe(a2);
        hand_out(&mut l, 1 << 20);
        hand_out(&mut l, 2 << 20);
        let a3 = l.predict(4 << 20);
        assert_eq!(a3.key, a2.key);
        assert_eq!(a3.death, a3.born + 2, "a2 lived 2 ticks");
    }

    #[test]
    fn predicting_changes_nothing_until_committed() {
        let mut l = Lifetimes::default();
        let p = l.predict(8 << 20);
        assert_eq!(l.predict(8 << 20), p);
        l.commit(8 << 20, p);
        assert_eq!(l.predict(8 << 20).born, p.born + 1);
    }

    #[test]
    fn unstamped_blocks_teach_nothing() {
        let mut l = Lifetimes::default();
        l.observe(Stamp::default());
        assert!(l.table.iter().all(|&(tag, _)| tag == 0));
    }

    #[test]
    fn long_lifetimes_saturate() {
        let mut l = Lifetimes::default();
        let s = hand_out(&mut l, 3 << 20);
        l.clock += u64::from(u32::MAX) + 10;
        l.observe(s);
        let slot = s.key as usize & (TABLE_SIZE - 1);
        assert_eq!(l.table[slot], (s.key, u32::MAX));
    }
}
