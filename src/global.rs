//! The process-wide allocator, [`global()`]: what the C ABI (`libtessera.so`) serves, and what Rust
//! code uses when it wants one allocator per process rather than its own [`Tessera`].
//!
//! # Data
//! - `PENDING`: a [`Config`] given by [`configure_global`] before the allocator exists; `Closed`
//!   from the moment the allocator starts being made.
//! - `GLOBAL`: the allocator, or the error that kept it from being made. It is made once, on first
//!   use, from the pending configuration (else `TESSERA_CONF`) over the driver that
//!   `TESSERA_DRIVER` names: `cuda` (the default) or `sim`, a simulated machine described by
//!   `TESSERA_SIM` in [`SimConfig::parse`]'s syntax. `TESSERA_TRACE` applies as in [`Tessera::new`].
//!
//! # Invariants
//! - `GLOBAL`, once set, never changes. A failure is kept and returned to every later call: the
//!   environment it came from does not change either, and a process whose driver cannot be opened
//!   should get the same clear error each time rather than a retry per allocation.
//! - [`configure_global`] succeeds only while `PENDING` is open, and creation closes it under its
//!   lock: a configuration either reaches the allocator or is refused, never silently dropped.
//! - Nothing is torn down at exit (statics are never dropped, so a free that comes after exit
//!   handlers still finds a live allocator); an exit handler flushes the trace, if one is written.
//!   Fork handlers hold the trace's lock, flushed, across a fork; the child stops tracing (see
//!   `trace_log.rs`).
//!
//! # Locking
//! `PENDING`'s lock is held while `GLOBAL` is made, so a configuration and the creation never race.

use crate::config::Config;
use crate::driver::cuda::CudaDriver;
use crate::driver::sim::{SimConfig, SimDriver};
use crate::driver::Driver;
use crate::error::{Error, Result};
use crate::sync::Arc;
use crate::Tessera;
use std::sync::{Mutex, OnceLock};

/// Names the driver of the process-wide allocator: `cuda` (the default) or `sim`.
pub const DRIVER_ENV_VAR: &str = "TESSERA_DRIVER";
/// Describes the simulated machine when `TESSERA_DRIVER=sim`, e.g. `devices:2,capacity:8GiB`.
pub const SIM_ENV_VAR: &str = "TESSERA_SIM";

/// The configuration waiting for the allocator, until it is made.
enum Pending {
    Open(Option<Config>),
    Closed,
}

static PENDING: Mutex<Pending> = Mutex::new(Pending::Open(None));
static GLOBAL: OnceLock<Result<Tessera>> = OnceLock::new();

/// The process-wide allocator, made on first use (see the [module documentation](self)).
///
/// ```
/// std::env::set_var("TESSERA_DRIVER", "sim");
/// std::env::set_var("TESSERA_SIM", "capacity:1GiB");
/// let t = tessera::global().unwrap();
/// let p = t.allocate(0, 4096, tessera::driver::Stream::DEFAULT).unwrap();
/// t.free(0, p).unwrap();
/// ```
#[inline]
pub fn global() -> Result<&'static Tessera> {
    GLOBAL.get_or_init(create).as_ref().map_err(Clone::clone)
}

/// Whether the process-wide allocator has been made (successfully or not).
pub fn global_is_created() -> bool {
    GLOBAL.get().is_some()
}

/// Sets the configuration the process-wide allocator will be made with, in place of
/// `TESSERA_CONF`. An [`Error::Config`] once the allocator exists: its pools are already shaped.
pub fn configure_global(config: Config) -> Result<()> {
    config.validate()?;
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    match &mut *pending {
        Pending::Open(slot) => {
            *slot = Some(config);
            Ok(())
        }
        Pending::Closed => Err(Error::Config(match GLOBAL.get() {
            Some(Err(e)) => {
                format!("the allocator could not be made ({e}); configuring it now changes nothing")
            }
            _ => "the allocator is already in use; configure it before the first allocation".into(),
        })),
    }
}

fn create() -> Result<Tessera> {
    let mut pending = PENDING.lock().unwrap_or_else(|e| e.into_inner());
    let config = match std::mem::replace(&mut *pending, Pending::Closed) {
        Pending::Open(Some(c)) => c,
        Pending::Open(None) | Pending::Closed => Config::from_env()?,
    };
    let t = Tessera::new(driver_from_env()?, config)?;
    // SAFETY: both handlers are `extern "C" fn()`s that never unwind (they catch panics), as
    // atexit and pthread_atfork require. A failed registration only loses that flush, so the
    // results are ignored. Around a fork the forking thread holds the trace's lock, flushed: a
    // child that exits (flushing at exit) does not write the parent's lines a second time, nor
    // inherit the lock held by another thread; the child stops tracing.
    unsafe {
        libc::atexit(flush_trace_at_exit);
        libc::pthread_atfork(
            Some(trace_before_fork),
            Some(trace_after_fork_in_parent),
            Some(trace_after_fork_in_child),
        );
    }
    Ok(t)
}

/// The driver that `TESSERA_DRIVER` and `TESSERA_SIM` name.
pub fn driver_from_env() -> Result<Arc<dyn Driver>> {
    let name = std::env::var(DRIVER_ENV_VAR).unwrap_or_default();
    match name.trim() {
        "" | "cuda" => Ok(Arc::new(CudaDriver::open()?)),
        "sim" => {
            let sim = std::env::var(SIM_ENV_VAR).unwrap_or_default();
            let config =
                SimConfig::parse(&sim).map_err(|e| Error::Config(format!("{SIM_ENV_VAR}: {e}")))?;
            Ok(Arc::new(SimDriver::new(config)))
        }
        other => Err(Error::Config(format!(
            "{DRIVER_ENV_VAR}={other:?}: expected cuda or sim"
        ))),
    }
}

/// The exit handler: writes the trace's buffered lines, and every later line at once (frees from
/// other exit handlers and destructors still come).
extern "C" fn flush_trace_at_exit() {
    // A panic must not unwind out of an exit handler; there is nothing left to report it to.
    let _ = std::panic::catch_unwind(|| {
        if let Some(Ok(t)) = GLOBAL.get() {
            t.flush_trace_for_exit();
        }
    });
}

thread_local! {
    /// Set by the before-fork handler on the forking thread when it took the trace's lock: the
    /// after-fork handlers (same thread, in parent and child) let go of it only then. (The
    /// allocator may have been made between the handlers.)
    static HOLDS_TRACE_FOR_FORK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Before a fork: the trace's lock taken and held, its lines flushed.
extern "C" fn trace_before_fork() {
    // Nor out of a fork handler.
    let _ = std::panic::catch_unwind(|| {
        if let Some(Ok(t)) = GLOBAL.get() {
            if let Some(log) = t.trace_log() {
                log.before_fork();
                HOLDS_TRACE_FOR_FORK.with(|h| h.set(true));
            }
        }
    });
}

/// After a fork, in the parent: the trace's lock let go.
extern "C" fn trace_after_fork_in_parent() {
    let _ = std::panic::catch_unwind(|| after_fork(false));
}

/// After a fork, in the child: the trace's lock let go, and tracing stopped.
extern "C" fn trace_after_fork_in_child() {
    let _ = std::panic::catch_unwind(|| after_fork(true));
}

fn after_fork(child: bool) {
    if !HOLDS_TRACE_FOR_FORK.with(|h| h.replace(false)) {
        return;
    }
    if let Some(log) = GLOBAL.get().and_then(|g| g.as_ref().ok()?.trace_log()) {
        // SAFETY: this thread's before-fork handler took the lock and kept it (the flag says so).
        unsafe {
            if child {
                log.after_fork_in_child();
            } else {
                log.after_fork_in_parent();
            }
        }
    }
}
