//! The two userfaultfd installs the fault path needs, issued directly.
//!
//! The `userfaultfd` crate creates the descriptor, registers ranges and reads
//! events for us; its `copy`/`zeropage` wrappers, though, drop the number of
//! bytes already installed when the ioctl fails with `EEXIST`, which a
//! multi-page (fault-around) install needs, so these two are done here.

use std::os::unix::io::RawFd;

pub const UFFDIO_COPY: libc::c_ulong = 0xc028_aa03;
pub const UFFDIO_ZEROPAGE: libc::c_ulong = 0xc020_aa04;
const UFFDIO_COPY_MODE_DONTWAKE: u64 = 1;
const UFFDIO_ZEROPAGE_MODE_DONTWAKE: u64 = 1;

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// Result of an install attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// All `len` bytes installed.
    Done,
    /// The first page was already present (another thread won): nothing or
    /// only a prefix was installed. Carries the bytes installed.
    Exists(u64),
    /// `EAGAIN`: the mm is changing (a non-cooperative event is pending);
    /// redo the fault. Carries the bytes installed.
    Again(u64),
}

/// Copy `len` bytes from `src` into the missing range at `dst`.
///
/// # Safety
/// `src` must be readable for `len` bytes; `dst..dst+len` must be registered
/// with `uffd`.
pub unsafe fn copy(
    uffd: RawFd,
    dst: u64,
    src: *const u8,
    len: u64,
    wake: bool,
) -> Result<Install, i32> {
    let mut arg = UffdioCopy {
        dst,
        src: src as u64,
        len,
        mode: if wake { 0 } else { UFFDIO_COPY_MODE_DONTWAKE },
        copy: 0,
    };
    // SAFETY: the argument struct matches the kernel's uffdio_copy; the
    // caller guarantees the addresses.
    let r = unsafe { libc::ioctl(uffd, UFFDIO_COPY, &mut arg) };
    classify(r, arg.copy)
}

/// Map the zero page over the missing range at `dst` (read faults).
///
/// # Safety
/// `dst..dst+len` must be registered with `uffd`.
pub unsafe fn zeropage(uffd: RawFd, dst: u64, len: u64, wake: bool) -> Result<Install, i32> {
    let mut arg = UffdioZeropage {
        start: dst,
        len,
        mode: if wake {
            0
        } else {
            UFFDIO_ZEROPAGE_MODE_DONTWAKE
        },
        zeropage: 0,
    };
    // SAFETY: as for `copy`.
    let r = unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE, &mut arg) };
    classify(r, arg.zeropage)
}

fn classify(r: libc::c_int, done: i64) -> Result<Install, i32> {
    if r == 0 {
        return Ok(Install::Done);
    }
    let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    let installed = done.max(0) as u64;
    match errno {
        libc::EEXIST => Ok(Install::Exists(installed)),
        libc::EAGAIN => Ok(Install::Again(installed)),
        e => Err(e),
    }
}
