//! `TESSERA_TRACE`: every allocation and free the allocator serves, appended to a file in the
//! tessera CSV trace format as they happen, so that any run under tessera yields a trace that
//! `tessera replay` can replay.
//!
//! # Data structure
//! A [`TraceLog`] holds a buffered file and the ids of the live allocations, keyed by
//! (device, pointer). Ids are small integers, the lowest free one reused first (unique among live
//! allocations, as the format asks, and compact). Lines: `a,<id>,<size>,<stream>` and `f,<id>`; a
//! new file starts with a `# {json}` metadata line. Events of every device go to the one file.
//!
//! # Invariants
//! `live` and `free_ids` partition `1..next_id`: every id below `next_id` is live or free, never
//! both.
//!
//! # Locking
//! One mutex around the file and the ids. An allocation is logged after the device lock is
//! released. A free holds the log's lock across the device's free (log lock, then device lock), so
//! that the pointer cannot be handed out and logged again before its free is logged. The device
//! lock is never held while the log's lock is taken, so the two cannot deadlock; an OOM hook that
//! frees runs with no log lock held by its thread. Around a `fork` of the process-wide allocator
//! the forking thread holds the log's lock (`before_fork` to `after_fork_in_*`), so that the child
//! neither inherits a lock held by a thread it does not have nor writes the parent's lines again.
//! A write error is reported once on stderr and tracing stops; the allocator goes on.

use crate::driver::{DevicePtr, Stream};
use crate::sync::Mutex;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// The environment variable naming the trace file; `%p` in it becomes the process id.
pub const TRACE_ENV_VAR: &str = "TESSERA_TRACE";

#[derive(Debug)]
struct Inner {
    out: Option<BufWriter<File>>,
    path: PathBuf,
    /// The line being written, reused.
    line: String,
    live: HashMap<(usize, DevicePtr), u64>,
    free_ids: BinaryHeap<Reverse<u64>>,
    next_id: u64,
    /// Set at exit: each line is written at once, since no later flush is coming.
    write_through: bool,
}

/// An open trace file.
#[derive(Debug)]
pub(crate) struct TraceLog {
    inner: Mutex<Inner>,
}

impl TraceLog {
    /// The file `TESSERA_TRACE` names, created, or `None` when the variable is unset or empty.
    pub(crate) fn from_env() -> std::io::Result<Option<TraceLog>> {
        match std::env::var_os(TRACE_ENV_VAR) {
            Some(p) if !p.is_empty() => {
                let p = p
                    .to_string_lossy()
                    .replace("%p", &std::process::id().to_string());
                TraceLog::open(Path::new(&p)).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// Creates (or truncates) `path` and writes the metadata line.
    pub(crate) fn open(path: &Path) -> std::io::Result<TraceLog> {
        let file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(path)?;
        let mut out = BufWriter::new(file);
        {
            writeln!(
                out,
                "# {{\"format\":\"tessera-trace\",\"version\":1,\"source\":\"{TRACE_ENV_VAR}\",\"pid\":{},\"tessera\":\"{}\"}}",
                std::process::id(),
                env!("CARGO_PKG_VERSION")
            )?;
            out.flush()?;
        }
        Ok(TraceLog {
            inner: Mutex::new(Inner {
                out: Some(out),
                path: path.to_path_buf(),
                line: String::new(),
                live: HashMap::new(),
                free_ids: BinaryHeap::new(),
                next_id: 1,
                write_through: false,
            }),
        })
    }

    /// A successful allocation.
    pub(crate) fn alloc(&self, device: usize, ptr: DevicePtr, size: u64, stream: Stream) {
        let mut g = self.inner.lock();
        let inner = &mut *g;
        let id = match inner.free_ids.pop() {
            Some(Reverse(id)) => id,
            None => {
                inner.next_id += 1;
                inner.next_id - 1
            }
        };
        inner.live.insert((device, ptr), id);
        inner.write_line(format_args!("a,{id},{size},{}", stream.0));
    }

    /// Runs `free` (the allocator's free of `ptr` on `device`) under the log's lock, and logs it if
    /// it succeeded. Holding the lock across the free keeps the log in the allocator's order: no
    /// other thread can be handed `ptr` again and log that allocation before this free is logged.
    pub(crate) fn free<E>(
        &self,
        device: usize,
        ptr: DevicePtr,
        free: impl FnOnce() -> Result<(), E>,
    ) -> Result<(), E> {
        let mut g = self.inner.lock();
        free()?;
        let inner = &mut *g;
        if let Some(id) = inner.live.remove(&(device, ptr)) {
            inner.free_ids.push(Reverse(id));
            inner.write_line(format_args!("f,{id}"));
        }
        Ok(())
    }

    /// Writes buffered lines to the file, and from then on writes each line at once: for the exit
    /// handler, after which events (frees from other exit handlers or destructors) still come but
    /// no flush will.
    #[cfg(not(loom))] // for `global.rs`, which a loom build leaves out
    pub(crate) fn flush_and_write_through(&self) {
        self.inner.lock().write_through = true;
        self.flush();
    }

    /// Before a `fork`: takes the log's lock, flushes, and keeps the lock across the fork (the
    /// guard is forgotten), so that no other thread logs a line between the flush and the fork,
    /// and the child does not inherit a lock held by a thread it does not have. Exactly one of
    /// [`TraceLog::after_fork_in_parent`] and [`TraceLog::after_fork_in_child`] must follow, on
    /// the same thread.
    #[cfg(not(loom))]
    pub(crate) fn before_fork(&self) {
        let mut g = self.inner.lock();
        if let Some(out) = g.out.as_mut() {
            if let Err(e) = out.flush() {
                g.fail(&e);
            }
        }
        std::mem::forget(g);
    }

    /// After a `fork`, in the parent: lets go of the lock [`TraceLog::before_fork`] kept.
    ///
    /// # Safety
    /// This thread called `before_fork` and has not let go of its lock since.
    #[cfg(not(loom))]
    pub(crate) unsafe fn after_fork_in_parent(&self) {
        // SAFETY: the caller's contract: this thread holds the lock, its guard forgotten.
        unsafe { self.inner.force_unlock() };
    }

    /// After a `fork`, in the child: lets go of the lock and stops tracing. The child's events
    /// would go to the parent's file under ids that clash with the parent's; the buffer is empty
    /// (flushed before the fork), so dropping the writer writes nothing and closes the child's
    /// copy of the file.
    ///
    /// # Safety
    /// As [`TraceLog::after_fork_in_parent`].
    #[cfg(not(loom))]
    pub(crate) unsafe fn after_fork_in_child(&self) {
        // SAFETY: as in `after_fork_in_parent`.
        unsafe { self.inner.force_unlock() };
        self.inner.lock().out = None;
    }

    /// Writes buffered lines to the file.
    pub(crate) fn flush(&self) {
        let mut g = self.inner.lock();
        if let Some(out) = g.out.as_mut() {
            if let Err(e) = out.flush() {
                g.fail(&e);
            }
        }
    }
}

impl Inner {
    /// Formats the line first and hands it to the buffer in one piece, so that a flush never
    /// falls inside a line.
    fn write_line(&mut self, line: std::fmt::Arguments<'_>) {
        use std::fmt::Write as _;
        let Some(out) = self.out.as_mut() else {
            return;
        };
        self.line.clear();
        let _ = self.line.write_fmt(line);
        self.line.push('\n');
        let written = out.write_all(self.line.as_bytes());
        let written = match written {
            Ok(()) if self.write_through => out.flush(),
            other => other,
        };
        if let Err(e) = written {
            self.fail(&e);
        }
    }

    /// Stops tracing after a write error, saying so once (on a stderr that may itself be
    /// closed: never panics).
    fn fail(&mut self, e: &std::io::Error) {
        let _ = writeln!(
            std::io::stderr(),
            "tessera: {TRACE_ENV_VAR}: writing {} failed ({e}); tracing stopped",
            self.path.display()
        );
        self.out = None;
    }
}

impl Drop for TraceLog {
    fn drop(&mut self) {
        // Never panics: a failed flush is reported and dropped.
        self.flush();
    }
}
