//! The stage-2 fault path, run by whichever thread met the missing page (a
//! vCPU on its own exit, a handler thread, a SIGBUS handler).
//!
//! ```text
//! resolve(gpa)
//!   1. snapshot = memslots.snapshot()           lock-free; note its generation
//!   2. slot = snapshot.lookup(gpa)              none: not RAM
//!   3. prepare the page, no lock held           zero, or read the image into the bounce page
//!   4. slot.map_trylock(generation)             shared install lock + re-checks
//!        ok:  install, complete the access, release        (speculative install)
//!        bail: count a retry, go to 5
//!   5. under the slots lock: redo 1-4 with map_lock (waits), install, complete
//! ```
//! Every exit from `try_install` goes through the guard's drop, so the
//! install lock is released in one place whatever happened.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use thiserror::Error;
use userfaultfd::Uffd;

use super::stats::FaultStats;
use super::uffd::{self, Install};
use crate::exit::VmExit;
use crate::memory::slots::{Bail, InstallGuard, PAGE_SIZE};
use crate::memory::{MemoryManager, PageSource, Slot, SourceError};

#[derive(Debug, Error)]
pub enum FaultError {
    #[error("guest access to GPA {0:#x}, which is not guest RAM")]
    NotRam(u64),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error("installing the page at GPA {gpa:#x} failed: {}", std::io::Error::from_raw_os_error(*.errno))]
    Install { gpa: u64, errno: i32 },
    #[error("installing the page at GPA {0:#x} kept failing with EAGAIN")]
    TooManyRetries(u64),
}

/// How a fault ended (I4: installed or already present, nothing else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Installed,
    AlreadyPresent,
}

/// The access that faulted, completed against the installed page while the
/// install lock is still held (so a discard cannot slip in between).
pub enum Access<'a> {
    /// Nothing to complete (the guest re-executes the access).
    None,
    /// A guest load: fill `data` from the page.
    Read(&'a mut [u8]),
    /// A guest store that KVM considers done: apply `data` to the page.
    Write(&'a [u8]),
}

#[repr(C, align(4096))]
pub struct Page(pub [u8; PAGE_SIZE as usize]);

/// What one fault-serving thread owns: its bounce page and counters.
pub struct FaultCtx {
    bounce: Box<Page>,
    pub stats: Arc<FaultStats>,
    /// Page number of this thread's last fault, for sequential detection.
    last_page: u64,
}

impl FaultCtx {
    pub fn new(stats: Arc<FaultStats>) -> Self {
        Self {
            bounce: Box::new(Page([0; PAGE_SIZE as usize])),
            stats,
            last_page: u64::MAX - 1,
        }
    }
}

/// Bounded EAGAIN retries: each means a discard or other mm change was in
/// flight; it ends, so a few attempts suffice.
const MAX_AGAIN: u32 = 64;

pub struct FaultEngine {
    pub memory: Arc<MemoryManager>,
    uffd: Arc<Uffd>,
    exit: Arc<VmExit>,
    /// Wake threads blocked on the fault (blocking userfaultfd, handler mode).
    wake: bool,
    /// Pages installed per fault on a sequential pattern (1 = off).
    fault_around: u64,
    zeros: Box<[Page]>,
}

impl FaultEngine {
    pub fn new(
        memory: Arc<MemoryManager>,
        uffd: Arc<Uffd>,
        exit: Arc<VmExit>,
        wake: bool,
        fault_around: u64,
    ) -> Self {
        let fault_around = fault_around.max(1);
        Self {
            memory,
            uffd,
            exit,
            wake,
            fault_around,
            zeros: (0..fault_around)
                .map(|_| Page([0; PAGE_SIZE as usize]))
                .collect(),
        }
    }

    pub fn uffd(&self) -> &Arc<Uffd> {
        &self.uffd
    }

    pub fn exit(&self) -> &Arc<VmExit> {
        &self.exit
    }

    /// Whether `gpa` is guest RAM (a lock-free lookup).
    #[inline]
    pub fn is_ram(&self, gpa: u64) -> bool {
        self.memory.slots.snapshot().lookup(gpa).is_some()
    }

    /// The guest-physical address of a host address inside guest RAM.
    pub fn gpa_of_hva(&self, hva: u64) -> Option<u64> {
        let snap = self.memory.slots.snapshot();
        snap.slots
            .iter()
            .find(|s| hva >= s.backing.hva && hva - s.backing.hva < s.size)
            .map(|s| s.gpa + (hva - s.backing.hva))
    }

    /// Last resort after a failed fault: map zeros so the faulting thread can
    /// run on while the VM stops (its error is already reported).
    pub fn install_zero_hva(&self, hva: u64) {
        let page = hva & !(PAGE_SIZE - 1);
        // SAFETY: `page` is inside a registered guest RAM mapping (the caller
        // found it with `gpa_of_hva`).
        let _ = unsafe { uffd::zeropage(self.uffd.as_raw_fd(), page, PAGE_SIZE, true) };
    }

    /// Resolve a fault at `gpa` and complete `access` (which must not cross
    /// a page boundary; see [`Self::resolve_range`]).
    pub fn resolve(
        &self,
        ctx: &mut FaultCtx,
        gpa: u64,
        mut access: Access,
    ) -> Result<Resolved, FaultError> {
        let page = gpa & !(PAGE_SIZE - 1);
        let mut again = 0;
        loop {
            let snap = self.memory.slots.snapshot();
            let slot = snap.lookup(page).ok_or(FaultError::NotRam(gpa))?;
            let prepared = self.prepare(ctx, slot, page, &access)?;
            match slot.map_trylock(snap.generation, self.memory.slots.generation()) {
                Ok(guard) => {
                    match self.install(ctx, slot, page, prepared, gpa, &mut access, &guard)? {
                        Some(r) => {
                            ctx.stats
                                .speculative_installs
                                .add(u64::from(r == Resolved::Installed));
                            return Ok(r);
                        }
                        None => again += 1,
                    }
                }
                // Bail-outs, each a RETRY on the slow path:
                // - GenerationChanged: a memslot change committed since the
                //   snapshot; the slot or its neighbours may be stale.
                // - SlotInvalid: the slot's removal has begun.
                // - Contended: a change or discard holds the install lock.
                Err(Bail::GenerationChanged | Bail::SlotInvalid | Bail::Contended) => {}
            }
            ctx.stats.retries.add(1);
            match self.resolve_locked(ctx, gpa, &mut access)? {
                Some(r) => return Ok(r),
                None => again += 1,
            }
            if again >= MAX_AGAIN {
                return Err(FaultError::TooManyRetries(gpa));
            }
        }
    }

    /// The slow path: under the slots lock no memslot change can race; only
    /// per-page discards can still hold the install lock, and `map_lock` waits
    /// for them. Returns `None` on EAGAIN.
    fn resolve_locked(
        &self,
        ctx: &mut FaultCtx,
        gpa: u64,
        access: &mut Access,
    ) -> Result<Option<Resolved>, FaultError> {
        let page = gpa & !(PAGE_SIZE - 1);
        let locked = self.memory.slots.lock_slots();
        let snap = locked.snapshot();
        let slot = snap.lookup(page).ok_or(FaultError::NotRam(gpa))?;
        let prepared = self.prepare(ctx, slot, page, access)?;
        let guard = slot.map_lock().map_err(|_| FaultError::NotRam(gpa))?;
        let r = self.install(ctx, slot, page, prepared, gpa, access, &guard)?;
        if r == Some(Resolved::Installed) {
            ctx.stats.slow_path_installs.add(1);
        }
        drop(guard);
        drop(locked);
        Ok(r)
    }

    /// Resolve every page that `[gpa, gpa+len)` touches, completing the
    /// access on the last one (unaligned accesses may straddle two pages).
    pub fn resolve_range(
        &self,
        ctx: &mut FaultCtx,
        gpa: u64,
        len: u64,
        access: Access,
    ) -> Result<Resolved, FaultError> {
        let last = (gpa + len.max(1) - 1) & !(PAGE_SIZE - 1);
        if last == gpa & !(PAGE_SIZE - 1) {
            return self.resolve(ctx, gpa, access);
        }
        // Straddling: install the first page, then complete on the second.
        // A discard racing in between makes the completion's own touch of the
        // first page fault again (SIGBUS handler), which installs zero: the
        // access then orders after the discard, as it may.
        self.resolve(ctx, gpa, Access::None)?;
        let r = self.resolve(ctx, last, Access::None)?;
        complete(self.hva(gpa).ok_or(FaultError::NotRam(gpa))?, access);
        Ok(r)
    }

    fn hva(&self, gpa: u64) -> Option<u64> {
        let snap = self.memory.slots.snapshot();
        snap.lookup(gpa).map(|s| s.backing.hva + (gpa - s.gpa))
    }

    /// Step 3: decide the page's content with no lock held.
    fn prepare(
        &self,
        ctx: &mut FaultCtx,
        slot: &Slot,
        page: u64,
        access: &Access,
    ) -> Result<Prepared, FaultError> {
        match &slot.backing.source {
            PageSource::File(img) if !slot.is_discarded(slot.page_index(page)) => {
                let offset = slot.backing.source_offset + (page - slot.gpa);
                img.read_page(offset, &mut ctx.bounce.0)?;
                ctx.stats.source_bytes.add(PAGE_SIZE);
                Ok(Prepared::Image)
            }
            _ if matches!(access, Access::Read(_)) => Ok(Prepared::ZeroRead),
            _ => Ok(Prepared::Zero),
        }
    }

    /// Step 4 (lock held): install and complete. `None` means EAGAIN.
    #[allow(clippy::too_many_arguments)]
    fn install(
        &self,
        ctx: &mut FaultCtx,
        slot: &Slot,
        page: u64,
        mut prepared: Prepared,
        gpa: u64,
        access: &mut Access,
        _held: &InstallGuard,
    ) -> Result<Option<Resolved>, FaultError> {
        // A discard may have happened between prepare and lock: image
        // content is then stale and the page must come back as zero (I3).
        if prepared == Prepared::Image && slot.is_discarded(slot.page_index(page)) {
            prepared = Prepared::Zero;
        }
        let hva = slot.backing.hva + (page - slot.gpa);
        let fd = self.uffd.as_raw_fd();
        let sequential = page / PAGE_SIZE == ctx.last_page.wrapping_add(1);
        ctx.last_page = page / PAGE_SIZE;
        let len = match prepared {
            Prepared::Zero if sequential && self.fault_around > 1 => {
                let left = (slot.end() - page) / PAGE_SIZE;
                self.fault_around.min(left) * PAGE_SIZE
            }
            _ => PAGE_SIZE,
        };
        // SAFETY: `hva..hva+len` lies in the slot's mapping, registered with
        // the uffd; the sources are live buffers of at least `len` bytes.
        let r = unsafe {
            match prepared {
                Prepared::Image => uffd::copy(fd, hva, ctx.bounce.0.as_ptr(), len, self.wake),
                Prepared::Zero => uffd::copy(fd, hva, self.zeros.as_ptr().cast(), len, self.wake),
                Prepared::ZeroRead => uffd::zeropage(fd, hva, len, self.wake),
            }
        };
        let resolved = match r {
            Ok(Install::Done) => {
                ctx.stats.pages_installed.add(len / PAGE_SIZE);
                Resolved::Installed
            }
            Ok(Install::Again(n)) if n >= PAGE_SIZE => {
                // Fault-around stopped at a present page: ours is in.
                ctx.stats.pages_installed.add(n / PAGE_SIZE);
                Resolved::Installed
            }
            Ok(Install::Exists(_)) => {
                ctx.stats.already_present.add(1);
                if self.wake {
                    // A failed copy wakes nobody; the faulting thread may be
                    // blocked on this page (handler mode).
                    let _ = self.uffd.wake(hva as *mut libc::c_void, PAGE_SIZE as usize);
                }
                Resolved::AlreadyPresent
            }
            Ok(Install::Again(_)) => return Ok(None),
            Err(errno) => return Err(FaultError::Install { gpa: page, errno }),
        };
        complete(
            slot.backing.hva + (gpa - slot.gpa),
            std::mem::replace(access, Access::None),
        );
        Ok(Some(resolved))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Prepared {
    /// The bounce page holds image content.
    Image,
    /// Zero content, for a write or an unknown access: copy from zeros so
    /// the store that follows does not take a copy-on-write fault.
    Zero,
    /// Zero content for a read: map the shared zero page.
    ZeroRead,
}

/// Apply a completed guest access to host memory at `hva`.
fn complete(hva: u64, access: Access) {
    match access {
        Access::None => {}
        Access::Read(data) => {
            for (i, b) in data.iter_mut().enumerate() {
                // SAFETY: `hva` points into guest RAM that is installed and
                // mapped for at least the access length (the caller holds the
                // install lock or re-faults through the SIGBUS handler).
                *b = unsafe { std::ptr::read_volatile((hva + i as u64) as *const u8) };
            }
        }
        Access::Write(data) => {
            for (i, b) in data.iter().enumerate() {
                // SAFETY: as above.
                unsafe { std::ptr::write_volatile((hva + i as u64) as *mut u8, *b) };
            }
        }
    }
}
