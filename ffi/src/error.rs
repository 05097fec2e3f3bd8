//! Errors at the C boundary: codes, the thread-local last error, and [`run`], which every entry
//! point runs its body through.
//!
//! # Data
//! `LAST`: per thread, the code and message of the last failing call. A success leaves it as it
//! was (errno's rule); `tessera_clear_last_error` clears it. The message lives in a fixed buffer
//! inside the thread-local (a longer one is cut, ending in `...`), so that the slot needs no
//! destructor: see `LAST` for why.
//!
//! # Invariants
//! - No panic leaves an entry point: [`run`] catches it and turns it into
//!   [`TESSERA_ERROR_INTERNAL`]. After the first one, every call fails with that code: the
//!   allocator's state may be half-changed, and handing out memory from it could corrupt data.
//! - The pointer `tessera_last_error` returns stays valid until the same thread's next failing
//!   call (or clear): the message lives in this thread's `LAST`, not on a stack.
//!
//! # Locking
//! None: the state is thread-local.

use std::cell::RefCell;
use std::ffi::{c_char, c_int};
use std::io::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;
use tessera_core::Error;

/// No error.
pub const TESSERA_OK: c_int = 0;
/// The request could not be met even after releasing the cache, calling the hooks and
/// compacting; the message starts with `CUDA out of memory.` and says why.
pub const TESSERA_ERROR_OUT_OF_MEMORY: c_int = 1;
/// A size too large to round or reserve.
pub const TESSERA_ERROR_INVALID_SIZE: c_int = 2;
/// A device index that is negative where a device is needed, or not below the device count.
pub const TESSERA_ERROR_INVALID_DEVICE: c_int = 3;
/// A pointer tessera did not hand out, or one inside an allocation rather than at its start.
pub const TESSERA_ERROR_UNKNOWN_POINTER: c_int = 4;
/// A pointer freed twice.
pub const TESSERA_ERROR_DOUBLE_FREE: c_int = 5;
/// A bad configuration (`TESSERA_CONF`, `tessera_configure`, `TESSERA_DRIVER`, `TESSERA_SIM`),
/// or a configuration given after the allocator was made.
pub const TESSERA_ERROR_CONFIG: c_int = 6;
/// A CUDA driver call failed, or there is no GPU.
pub const TESSERA_ERROR_DRIVER: c_int = 7;
/// An operation the configuration or the device does not support.
pub const TESSERA_ERROR_UNSUPPORTED: c_int = 8;
/// A NULL where a pointer is required, a fraction out of range, an unknown hook id, a stats
/// struct too small.
pub const TESSERA_ERROR_INVALID_ARGUMENT: c_int = 9;
/// A bug in tessera (a Rust panic, caught at the boundary).
pub const TESSERA_ERROR_INTERNAL: c_int = 10;
/// A CUDA-graph pool call out of order: routing to a pool twice, ending a route that is not open,
/// releasing a pool that has no use left.
pub const TESSERA_ERROR_PRIVATE_POOL: c_int = 11;

/// A failure on its way out through the C ABI.
#[derive(Debug)]
pub(crate) struct FfiError {
    pub(crate) code: c_int,
    pub(crate) message: String,
}

impl FfiError {
    pub(crate) fn new(code: c_int, message: impl Into<String>) -> FfiError {
        FfiError {
            code,
            message: message.into(),
        }
    }

    pub(crate) fn invalid_argument(message: impl Into<String>) -> FfiError {
        FfiError::new(TESSERA_ERROR_INVALID_ARGUMENT, message)
    }
}

impl From<Error> for FfiError {
    fn from(e: Error) -> FfiError {
        let code = match &e {
            Error::OutOfMemory(_) => TESSERA_ERROR_OUT_OF_MEMORY,
            Error::InvalidSize { .. } => TESSERA_ERROR_INVALID_SIZE,
            Error::InvalidDevice { .. } => TESSERA_ERROR_INVALID_DEVICE,
            Error::UnknownPointer { .. } => TESSERA_ERROR_UNKNOWN_POINTER,
            Error::DoubleFree { .. } => TESSERA_ERROR_DOUBLE_FREE,
            Error::Config(_) => TESSERA_ERROR_CONFIG,
            Error::Driver(_) => TESSERA_ERROR_DRIVER,
            Error::Unsupported(_) => TESSERA_ERROR_UNSUPPORTED,
            Error::PrivatePool(_) => TESSERA_ERROR_PRIVATE_POOL,
        };
        FfiError::new(code, e.to_string())
    }
}

pub(crate) type FfiResult<T> = Result<T, FfiError>;

/// The longest message kept, in bytes with its NUL; a longer one is cut and ends in `...`.
const MESSAGE_CAPACITY: usize = 4096;

/// A thread's last error: its code and its NUL-terminated message (`message[0] == 0`: none).
struct Last {
    code: c_int,
    message: [u8; MESSAGE_CAPACITY],
}

thread_local! {
    /// Plain data with a `const` initializer, so that the slot has no destructor, on purpose. A
    /// thread-local that needs one is registered with the C runtime at its first use, and one first
    /// used after the thread's thread-local destructors have run (from a pthread TLS-key
    /// destructor, or an exit handler) is never destroyed: what it owns leaks. This slot owns no
    /// memory, is never destroyed, and works at every stage of thread and process teardown.
    static LAST: RefCell<Last> = const {
        RefCell::new(Last {
            code: TESSERA_OK,
            message: [0; MESSAGE_CAPACITY],
        })
    };
}

/// Records `code` and `message` as this thread's last error.
pub(crate) fn set_last_error(code: c_int, message: &str) {
    // `try_with`/`try_borrow_mut`: never panics, even should the slot be unreachable.
    let _ = LAST.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            l.code = code;
            let text = message.as_bytes();
            let n = if text.len() < MESSAGE_CAPACITY {
                text.len()
            } else {
                // Cut at a character boundary, leaving room for "..." and the NUL.
                let mut n = MESSAGE_CAPACITY - 4;
                while !message.is_char_boundary(n) {
                    n -= 1;
                }
                n
            };
            l.message[..n].copy_from_slice(&text[..n]);
            let mut end = n;
            if n < text.len() {
                l.message[n..n + 3].copy_from_slice(b"...");
                end = n + 3;
            }
            // An interior NUL would cut the C string short; none of our messages has one, but a
            // driver's text might.
            for b in &mut l.message[..end] {
                if *b == 0 {
                    *b = b' ';
                }
            }
            l.message[end] = 0;
        }
    });
}

/// This thread's last error message, valid until its next failing call (or clear).
pub(crate) fn last_error_ptr() -> *const c_char {
    static EMPTY: &[u8] = b"\0";
    LAST.try_with(|l| {
        // SAFETY: `addr_of!` makes a pointer to the field without a reference, so no borrow is
        // taken or held; the slot lives as long as the thread and never moves, and `message` is
        // always NUL-terminated.
        unsafe { std::ptr::addr_of!((*l.as_ptr()).message) }.cast::<c_char>()
    })
    .unwrap_or(EMPTY.as_ptr().cast())
}

pub(crate) fn last_error_code() -> c_int {
    LAST.try_with(|l| l.try_borrow().map_or(TESSERA_OK, |l| l.code))
        .unwrap_or(TESSERA_OK)
}

pub(crate) fn clear_last_error() {
    let _ = LAST.try_with(|l| {
        if let Ok(mut l) = l.try_borrow_mut() {
            l.code = TESSERA_OK;
            l.message[0] = 0;
        }
    });
}

/// Set by the first panic caught at the boundary: the allocator's state may be half-changed (its
/// locks do not poison), so every later call fails instead of handing out memory from it.
static POISONED: OnceLock<String> = OnceLock::new();

/// Runs an entry point's body. On an error or a panic, records the last error and returns its
/// code (which does not depend on the thread-local still being there).
#[inline]
pub(crate) fn run<T>(body: impl FnOnce() -> FfiResult<T>) -> Result<T, c_int> {
    if let Some(why) = POISONED.get() {
        return Err(poisoned(why));
    }
    match catch_unwind(AssertUnwindSafe(body)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => {
            set_last_error(e.code, &e.message);
            Err(e.code)
        }
        Err(panic) => Err(note_panic(panic)),
    }
}

/// [`run`] for entry points whose C result is a value: `failed` on an error.
#[inline]
pub(crate) fn guard<T>(failed: T, body: impl FnOnce() -> FfiResult<T>) -> T {
    run(body).unwrap_or(failed)
}

/// [`run`] for entry points whose C result is a status: 0, or the error code.
pub(crate) fn status(body: impl FnOnce() -> FfiResult<()>) -> c_int {
    match run(body) {
        Ok(()) => TESSERA_OK,
        Err(code) => code,
    }
}

#[cold]
fn note_panic(panic: Box<dyn std::any::Any + Send>) -> c_int {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic".into());
    let message = format!("internal error in tessera (please report it): {what}");
    let _ = POISONED.set(message.clone());
    let _ = writeln!(
        std::io::stderr(),
        "tessera: {message}; every later call fails"
    );
    set_last_error(TESSERA_ERROR_INTERNAL, &message);
    TESSERA_ERROR_INTERNAL
}

#[cold]
fn poisoned(why: &str) -> c_int {
    set_last_error(
        TESSERA_ERROR_INTERNAL,
        &format!("tessera is disabled after an earlier {why}"),
    );
    TESSERA_ERROR_INTERNAL
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CStr;

    fn last() -> (c_int, String) {
        // SAFETY: the pointer is this thread's NUL-terminated message, alive until the next
        // failing call, which does not happen while it is read.
        let msg = unsafe { CStr::from_ptr(last_error_ptr()) };
        (last_error_code(), msg.to_string_lossy().into_owned())
    }

    #[test]
    fn errors_and_panics_become_codes_and_a_panic_disables_every_later_call() {
        // The only test that runs bodies: a panic poisons the whole process, so it comes last.
        // A success keeps the last error (errno's rule).
        assert_eq!(
            status(|| Err(FfiError::invalid_argument("first"))),
            TESSERA_ERROR_INVALID_ARGUMENT
        );
        assert_eq!(guard(1, || Ok(2)), 2);
        assert_eq!(last(), (TESSERA_ERROR_INVALID_ARGUMENT, "first".into()));

        clear_last_error();
        let r = guard(7u32, || -> FfiResult<u32> { panic!("boom {}", 42) });
        assert_eq!(r, 7);
        let (code, msg) = last();
        assert_eq!(code, TESSERA_ERROR_INTERNAL);
        assert!(msg.contains("boom 42"), "{msg}");
        assert_eq!(status(|| Ok(())), TESSERA_ERROR_INTERNAL, "poisoned");
        assert!(
            last().1.contains("disabled after an earlier"),
            "{}",
            last().1
        );
    }

    #[test]
    fn clear_removes_the_last_error() {
        set_last_error(TESSERA_ERROR_INVALID_ARGUMENT, "first");
        clear_last_error();
        set_last_error(TESSERA_ERROR_INVALID_ARGUMENT, "second");
        assert_eq!(last(), (TESSERA_ERROR_INVALID_ARGUMENT, "second".into()));
        clear_last_error();
        assert_eq!(last(), (TESSERA_OK, String::new()));
    }

    #[test]
    fn core_errors_map_to_their_codes() {
        let e: FfiError = Error::InvalidDevice {
            device: 99,
            count: 1,
        }
        .into();
        assert_eq!(e.code, TESSERA_ERROR_INVALID_DEVICE);
        assert!(e.message.contains("99"));
        let e: FfiError = Error::DoubleFree { ptr: 16, device: 0 }.into();
        assert_eq!(e.code, TESSERA_ERROR_DOUBLE_FREE);
    }

    #[test]
    fn the_slot_needs_no_destructor() {
        // What keeps it usable, and leak-free, in TLS-key destructors and exit handlers.
        assert!(!std::mem::needs_drop::<RefCell<Last>>());
    }

    #[test]
    fn a_long_message_is_cut_at_a_character_boundary() {
        let long = "é".repeat(MESSAGE_CAPACITY);
        set_last_error(TESSERA_ERROR_CONFIG, &long);
        let (code, msg) = last();
        assert_eq!(code, TESSERA_ERROR_CONFIG);
        assert!(msg.len() < MESSAGE_CAPACITY && msg.len() > MESSAGE_CAPACITY - 8);
        assert!(msg.ends_with("é...") && !msg.contains('\u{fffd}'), "{msg}");
        let exact = "x".repeat(MESSAGE_CAPACITY - 1);
        set_last_error(TESSERA_ERROR_CONFIG, &exact);
        assert_eq!(last().1, exact);
        set_last_error(TESSERA_ERROR_CONFIG, "short");
        assert_eq!(last().1, "short");
    }

    #[test]
    fn an_interior_nul_does_not_lose_the_message() {
        set_last_error(TESSERA_ERROR_DRIVER, "a\0b");
        assert_eq!(last(), (TESSERA_ERROR_DRIVER, "a b".into()));
    }
}
