//! Host virtual-memory primitives behind [`Backing::Real`](super::Backing::Real): thin wrappers over
//! `mmap`, `munmap`, `mprotect`, `memfd_create`, `ftruncate` and `fallocate`, each returning the OS
//! error. This file holds the unsafe code of the simulated driver; the functions that take an address
//! are `unsafe fn`s whose contract is "the caller owns that range" (the driver's tables say so).

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr;

/// The host page size.
pub(super) fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as u64
    } else {
        4096
    }
}

fn last_error() -> io::Error {
    io::Error::last_os_error()
}

fn no_mem() -> io::Error {
    io::Error::from_raw_os_error(libc::ENOMEM)
}

fn to_len(size: u64) -> io::Result<usize> {
    usize::try_from(size).map_err(|_| no_mem())
}

fn to_off(offset: u64) -> io::Result<libc::off_t> {
    libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))
}

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(last_error())
    }
}

/// Reserves `size` bytes of address space aligned to `align` (a power of two, at least the page
/// size): mapped `PROT_NONE` with no backing, so touching it faults.
pub(super) fn reserve(size: u64, align: u64) -> io::Result<u64> {
    let total = size.checked_add(align).ok_or_else(no_mem)?;
    let total_len = to_len(total)?;
    // SAFETY: no MAP_FIXED, so the kernel picks an unused range; no existing memory is touched.
    let base = unsafe {
        libc::mmap(
            ptr::null_mut(),
            total_len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        return Err(last_error());
    }
    let base = base as u64;
    // The mapping [base, base + total) exists, so these sums stay inside the address space.
    let start = (base + align - 1) & !(align - 1);
    let head = start - base;
    let tail = total - head - size;
    // SAFETY: [base, start) and [start + size, base + total) are the two ends of the mapping made
    // just above, which nothing else knows about. A failure would leave harmless PROT_NONE space.
    unsafe {
        if head > 0 {
            libc::munmap(base as *mut libc::c_void, head as usize);
        }
        if tail > 0 {
            libc::munmap((start + size) as *mut libc::c_void, tail as usize);
        }
    }
    Ok(start)
}

/// Maps `size` bytes of read/write anonymous memory (a legacy allocation), page-rounded by the
/// caller.
pub(super) fn alloc_rw(size: u64) -> io::Result<u64> {
    let len = to_len(size)?;
    // SAFETY: no MAP_FIXED, so the kernel picks an unused range; no existing memory is touched.
    let p = unsafe {
        libc::mmap(
            ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(last_error())
    } else {
        Ok(p as u64)
    }
}

/// Unmaps `[va, va + size)` entirely (a reservation or a legacy allocation).
///
/// # Safety
/// The caller owns the range: it was mapped by this module and nothing refers to its memory.
pub(super) unsafe fn release(va: u64, size: u64) -> io::Result<()> {
    let len = to_len(size)?;
    // SAFETY: the caller owns the range (this function's contract).
    check(unsafe { libc::munmap(va as *mut libc::c_void, len) })
}

/// Puts `[va, va + size)` back to reserved-but-unmapped: fresh `PROT_NONE` anonymous memory with no
/// backing, replacing whatever was mapped there.
///
/// # Safety
/// The caller owns the range: it lies inside one of its reservations.
pub(super) unsafe fn unmap_to_reserved(va: u64, size: u64) -> io::Result<()> {
    let len = to_len(size)?;
    // SAFETY: MAP_FIXED replaces the range, which the caller owns (this function's contract).
    let p = unsafe {
        libc::mmap(
            va as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(last_error())
    } else {
        Ok(())
    }
}

/// Maps `size` bytes of `fd` at file offset `offset` onto `[va, va + size)`, shared and `PROT_NONE`
/// (access comes with [`protect_rw`]). On failure the range is put back to reserved.
///
/// # Safety
/// The caller owns the range: it lies inside one of its reservations and nothing is mapped there.
pub(super) unsafe fn map_shared(va: u64, size: u64, fd: &OwnedFd, offset: u64) -> io::Result<()> {
    let len = to_len(size)?;
    let off = to_off(offset)?;
    // SAFETY: MAP_FIXED replaces the range, which the caller owns (this function's contract).
    let p = unsafe {
        libc::mmap(
            va as *mut libc::c_void,
            len,
            libc::PROT_NONE,
            libc::MAP_SHARED | libc::MAP_FIXED,
            fd.as_raw_fd(),
            off,
        )
    };
    if p == libc::MAP_FAILED {
        let e = last_error();
        // A failed MAP_FIXED may have dropped the old mapping; put reserved space back.
        // SAFETY: same range, same ownership as above.
        let _ = unsafe { unmap_to_reserved(va, size) };
        return Err(e);
    }
    Ok(())
}

/// Grants read/write over `[va, va + size)`.
///
/// # Safety
/// The caller owns the range and all of it is mapped.
pub(super) unsafe fn protect_rw(va: u64, size: u64) -> io::Result<()> {
    let len = to_len(size)?;
    // SAFETY: the caller owns the range (this function's contract); only its protection changes.
    check(unsafe {
        libc::mprotect(
            va as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
        )
    })
}

/// A new, empty memory file.
pub(super) fn memfd(name: &CStr) -> io::Result<OwnedFd> {
    // SAFETY: `name` is a valid NUL-terminated string; the call has no other preconditions.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(last_error());
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets the memory file's length (growing it allocates nothing).
pub(super) fn set_len(fd: &OwnedFd, len: u64) -> io::Result<()> {
    let len = to_off(len)?;
    // SAFETY: `fd` is a valid open descriptor for the lifetime of the borrow.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })
}

/// Gives the pages of `[offset, offset + len)` of the memory file back to the host.
pub(super) fn punch_hole(fd: &OwnedFd, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = (to_off(offset)?, to_off(len)?);
    // SAFETY: `fd` is a valid open descriptor for the lifetime of the borrow.
    check(unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    })
}
