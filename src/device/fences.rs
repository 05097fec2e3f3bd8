//! Stream fences: when is the work that last used freed memory finished?
//!
//! # Data structure
//! Every free on a device takes the next *free sequence number*. Per stream, a [`StreamFence`]
//! knows `settled`: every free on that stream numbered at most `settled` is complete on the GPU.
//! To move `settled` forward, an event is recorded on the stream (lazily, only when someone needs
//! freed memory of that stream elsewhere or needs to unmap it) together with the sequence number at
//! that moment; when the event completes, `settled` becomes that number.
//!
//! Recording the event later than the free is conservative, never wrong: the event then also
//! covers work queued after the free, and work queued before the free is all it must cover. This
//! keeps every free and every cache hit free of driver calls; only the slow path records, queries
//! or waits.
//!
//! # Invariants
//! - `settled` only grows, and never passes the device's sequence counter.
//! - At most two events per stream are outstanding, oldest first, covering increasing sequence
//!   numbers. A newer request re-records the newer one and leaves the older one standing, so on a
//!   stream that never goes idle the older event still completes and `settled` still advances
//!   (re-recording a single event could chase the stream forever).
//! - A failed record changes nothing: the events keep the coverage they had.
//!
//! # Locking
//! None of its own; used under the device lock. `sync_all` waits on the driver while the lock is
//! held: that wait never re-enters the allocator.

use crate::driver::{Driver, DriverResult, Event, Stream};
use std::collections::HashMap;

/// Outstanding events per stream, at most.
const MAX_OUTSTANDING: usize = 2;

#[derive(Debug, Default)]
struct StreamFence {
    settled: u64,
    /// Outstanding events and the sequence number each covers, oldest first.
    pending: Vec<(Event, u64)>,
    /// Events kept for reuse.
    idle: Vec<Event>,
}

impl StreamFence {
    fn covers(&self, upto: u64) -> bool {
        self.settled >= upto || self.pending.last().is_some_and(|&(_, s)| s >= upto)
    }
}

#[derive(Debug, Default)]
pub(crate) struct Fences {
    streams: HashMap<Stream, StreamFence>,
}

impl Fences {
    /// Whether every free on `stream` numbered at most `seq` is complete. Sequence 0 means never
    /// used: always settled.
    #[inline]
    pub(crate) fn is_settled(&self, stream: Stream, seq: u64) -> bool {
        seq == 0 || self.streams.get(&stream).is_some_and(|f| f.settled >= seq)
    }

    /// Makes an event on `stream` cover sequence `upto`, unless one already does. Non-blocking.
    pub(crate) fn request(
        &mut self,
        drv: &dyn Driver,
        dev: usize,
        stream: Stream,
        upto: u64,
    ) -> DriverResult<()> {
        let f = self.streams.entry(stream).or_default();
        if f.covers(upto) {
            return Ok(());
        }
        if f.pending.len() == MAX_OUTSTANDING {
            // Re-record the newer event; the older one keeps standing for what it covers.
            let (ev, _) = f.pending[MAX_OUTSTANDING - 1];
            drv.event_record(dev, ev, stream)?;
            f.pending[MAX_OUTSTANDING - 1].1 = upto;
            return Ok(());
        }
        let ev = match f.idle.pop() {
            Some(e) => e,
            None => drv.event_create(dev)?,
        };
        if let Err(e) = drv.event_record(dev, ev, stream) {
            f.idle.push(ev);
            return Err(e);
        }
        f.pending.push((ev, upto));
        Ok(())
    }

    /// Queries the outstanding events, oldest first, and advances `settled` past those that
    /// completed. A query that fails leaves its stream as it was and the others are still
    /// polled; the last error is returned.
    pub(crate) fn poll(&mut self, drv: &dyn Driver, dev: usize) -> DriverResult<()> {
        let mut result = Ok(());
        for f in self.streams.values_mut() {
            while let Some(&(ev, seq)) = f.pending.first() {
                match drv.event_query(dev, ev) {
                    Ok(true) => {
                        f.settled = f.settled.max(seq);
                        f.idle.push(f.pending.remove(0).0);
                    }
                    Ok(false) => break,
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        result
    }

    /// Waits for every outstanding event (the slow path of the OOM sequence). Waiting for the
    /// newest covers the older ones: they were recorded earlier on the same stream.
    pub(crate) fn wait_all(&mut self, drv: &dyn Driver, dev: usize) -> DriverResult<()> {
        for f in self.streams.values_mut() {
            if let Some(&(ev, seq)) = f.pending.last() {
                drv.event_synchronize(dev, ev)?;
                f.settled = f.settled.max(seq);
                f.idle.extend(f.pending.drain(..).map(|(e, _)| e));
            }
        }
        Ok(())
    }

    /// Destroys every event (teardown; errors ignored).
    pub(crate) fn teardown(&mut self, drv: &dyn Driver, dev: usize) {
        for f in self.streams.values_mut() {
            let pending = f.pending.drain(..).map(|(e, _)| e);
            for ev in pending.chain(f.idle.drain(..)) {
                let _ = drv.event_destroy(dev, ev);
            }
        }
    }
}
