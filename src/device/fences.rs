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
//! - At most one event per stream is outstanding; re-recording it moves its coverage forward.
//!
//! # Locking
//! None of its own; used under the device lock. `sync_all` waits on the driver while the lock is
//! held: that wait never re-enters the allocator.

use crate::driver::{Driver, DriverResult, Event, Stream};
use std::collections::HashMap;

#[derive(Debug, Default)]
struct StreamFence {
    settled: u64,
    /// The outstanding event and the sequence number it covers.
    pending: Option<(Event, u64)>,
    /// An event kept for reuse when none is outstanding.
    idle: Option<Event>,
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

    /// Records (or re-records) the fence of `stream` to cover sequence `upto`, unless it already
    /// does. Non-blocking.
    pub(crate) fn request(
        &mut self,
        drv: &dyn Driver,
        dev: usize,
        stream: Stream,
        upto: u64,
    ) -> DriverResult<()> {
        let f = self.streams.entry(stream).or_default();
        if f.settled >= upto || f.pending.is_some_and(|(_, s)| s >= upto) {
            return Ok(());
        }
        let ev = match f.pending.take().map(|(e, _)| e).or(f.idle.take()) {
            Some(e) => e,
            None => drv.event_create(dev)?,
        };
        if let Err(e) = drv.event_record(dev, ev, stream) {
            f.idle = Some(ev);
            return Err(e);
        }
        f.pending = Some((ev, upto));
        Ok(())
    }

    /// Queries every outstanding event and advances `settled` for those that completed.
    pub(crate) fn poll(&mut self, drv: &dyn Driver, dev: usize) -> DriverResult<()> {
        for f in self.streams.values_mut() {
            if let Some((ev, seq)) = f.pending {
                if drv.event_query(dev, ev)? {
                    f.settled = f.settled.max(seq);
                    f.pending = None;
                    f.idle = Some(ev);
                }
            }
        }
        Ok(())
    }

    /// Waits for every outstanding event (the slow path of the OOM sequence).
    pub(crate) fn wait_all(&mut self, drv: &dyn Driver, dev: usize) -> DriverResult<()> {
        for f in self.streams.values_mut() {
            if let Some((ev, seq)) = f.pending {
                drv.event_synchronize(dev, ev)?;
                f.settled = f.settled.max(seq);
                f.pending = None;
                f.idle = Some(ev);
            }
        }
        Ok(())
    }

    /// Destroys every event (teardown; errors ignored).
    pub(crate) fn teardown(&mut self, drv: &dyn Driver, dev: usize) {
        for f in self.streams.values_mut() {
            for ev in f
                .pending
                .take()
                .map(|(e, _)| e)
                .into_iter()
                .chain(f.idle.take())
            {
                let _ = drv.event_destroy(dev, ev);
            }
        }
    }
}
