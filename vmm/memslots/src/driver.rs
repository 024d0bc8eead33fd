//! The fault driver: one implementation of the install protocol, generic
//! over how a page is installed.
//!
//! ```text
//! resolve(gpa)
//!   1. snapshot = memslots.snapshot()         lock-free; note its generation
//!   2. slot = snapshot.lookup(gpa)            none: not RAM
//!   3. installer.prepare(slot, page)          no lock held: zero, or source content
//!   4. slot.map_trylock(generation)           shared install lock + re-checks
//!        ok:   install_locked, release        (speculative install)
//!        bail: go to 5 (a RETRY)
//!   5. under the slots lock: 2, 3, map_lock (waits), install_locked
//!        EAGAIN: release everything, redo 5 (bounded by MAX_AGAIN)
//! install_locked (guard held):
//!   I6 check, I3 re-check, installer.install, installer.complete
//! ```
//! Every exit path releases the install lock by dropping its guard, and the
//! slow path's slots lock by dropping [`crate::SlotsLocked`]: the same order
//! for every outcome.

use std::fmt;

use crate::slot::{Bail, InstallGuard, Memslot};
use crate::table::Memslots;
use crate::PAGE_SIZE;

/// What a fault installs: content prepared from the slot's source (held by
/// the installer, e.g. in a bounce buffer), or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content<P> {
    Zero,
    Source(P),
}

/// What one install attempt did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Install {
    /// The page is in (installed now, with any fault-around pages).
    Done,
    /// Another thread installed the page first (`EEXIST`): fine.
    Exists,
    /// The host's address space is changing (`EAGAIN`, e.g. a discard's
    /// `madvise` in flight): nothing usable was installed; retry.
    Again,
    /// The installer declined the page as it is now (a prefetch meets a
    /// page discarded since it looked): nothing was installed, nothing is
    /// to complete.
    Declined,
}

/// How pages get into guest memory: userfaultfd in the VMM, a model page
/// table under loom. The driver decides *when* (which lock is held, which
/// re-checks passed); the installer decides *how*.
pub trait Installer<B> {
    /// Content prepared from a slot's source (e.g. "the bounce page holds it").
    type Prepared;
    type Error;

    /// Step 3, no lock held: decide the content of the page at `page_gpa`.
    fn prepare(
        &mut self,
        slot: &Memslot<B>,
        page_gpa: u64,
    ) -> Result<Content<Self::Prepared>, Self::Error>;

    /// Step 4, install lock held: put `content` at `page_gpa`. Must not
    /// replace a page that is already present (`Install::Exists`).
    fn install(
        &mut self,
        slot: &Memslot<B>,
        page_gpa: u64,
        content: Content<Self::Prepared>,
        guard: &InstallGuard<'_>,
    ) -> Result<Install, Self::Error>;

    /// The speculative attempt bailed out (the fault goes on, under the
    /// slots lock). For accounting; the default does nothing.
    fn bailed(&mut self, _bail: Bail) {}

    /// Step 6, install lock still held: complete the guest access that
    /// faulted against the page now present (I2), so that no discard can
    /// come between the install and the access.
    fn complete(&mut self, slot: &Memslot<B>, guard: &InstallGuard<'_>);
}

/// How a fault ended (I4: installed or already present, nothing else).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Installed,
    AlreadyPresent,
    /// Only for an installer that declines (a prefetch, never a fault).
    Declined,
}

/// Which path finished the fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// Under `map_trylock`, without the slots lock.
    Speculative,
    /// Under the slots lock, after a bail-out or an `EAGAIN`.
    Slow,
}

/// A fault that ended well.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolution {
    pub outcome: Outcome,
    pub path: Path,
    /// Why the speculative attempt bailed, if it did.
    pub bail: Option<Bail>,
    /// Install attempts made (1 when the first one finished the fault).
    pub attempts: u32,
}

impl Resolution {
    /// Attempts beyond the first: each is a RETRY.
    pub fn retries(&self) -> u32 {
        self.attempts - 1
    }
}

/// A fault that did not end in an install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveError<E> {
    /// No slot holds the address: not RAM (the caller routes it to MMIO).
    NotRam { gpa: u64 },
    /// The address lies in an unplugged block (I6): a guest error.
    NotPlugged { gpa: u64 },
    /// The installer failed (a source read, an install ioctl).
    Installer(E),
    /// Under the slots lock, the install lock of a slot in the current table
    /// could not be taken: an invariant is broken. Never turned into NotRam.
    SlowPathLock { gpa: u64, bail: Bail },
    /// `EAGAIN` on every one of [`MAX_AGAIN`] attempts.
    TooManyRetries { gpa: u64, attempts: u32 },
}

impl<E: fmt::Display> fmt::Display for ResolveError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NotRam { gpa } => write!(f, "GPA {gpa:#x} is not guest RAM"),
            Self::NotPlugged { gpa } => write!(
                f,
                "GPA {gpa:#x} lies in an unplugged memory block (the guest must not access it)"
            ),
            Self::Installer(e) => e.fmt(f),
            Self::SlowPathLock { gpa, bail } => write!(
                f,
                "invariant violated: under the slots lock the install lock of the slot holding \
                 GPA {gpa:#x} could not be taken ({bail:?})"
            ),
            Self::TooManyRetries { gpa, attempts } => write!(
                f,
                "installing the page at GPA {gpa:#x} returned EAGAIN {attempts} times"
            ),
        }
    }
}

impl<E: fmt::Debug + fmt::Display> std::error::Error for ResolveError<E> {}

/// Bound on `EAGAIN` retries: each one means a discard or another change of
/// the host's mm was in flight; those end, so a few attempts suffice (I4).
pub const MAX_AGAIN: u32 = 64;

/// Resolve a fault at `gpa`: install its page (unless present) and complete
/// the access, following the protocol above.
pub fn resolve<B, I: Installer<B>>(
    slots: &Memslots<B>,
    gpa: u64,
    installer: &mut I,
) -> Result<Resolution, ResolveError<I::Error>> {
    let page = gpa & !(PAGE_SIZE - 1);
    let snap = slots.snapshot();
    let slot = snap.lookup(page).ok_or(ResolveError::NotRam { gpa })?;
    let content = installer
        .prepare(slot, page)
        .map_err(ResolveError::Installer)?;
    let bail = match slot.map_trylock(snap.generation, slots.generation()) {
        Ok(guard) => match install_locked(slot, gpa, content, installer, &guard)? {
            Some(outcome) => {
                return Ok(Resolution {
                    outcome,
                    path: Path::Speculative,
                    bail: None,
                    attempts: 1,
                })
            }
            None => None,
        },
        // Each bail-out is a RETRY under the slots lock (see `Bail`).
        Err(bail) => {
            installer.bailed(bail);
            Some(bail)
        }
    };
    drop(snap);
    let mut attempts = 1;
    loop {
        attempts += 1;
        // Under the slots lock no memslot change can race; only discards and
        // unplugs can still hold the install lock, and `map_lock` waits.
        let locked = slots.lock_slots();
        let snap = locked.snapshot();
        let slot = snap.lookup(page).ok_or(ResolveError::NotRam { gpa })?;
        let content = installer
            .prepare(slot, page)
            .map_err(ResolveError::Installer)?;
        let guard = slot
            .map_lock()
            .map_err(|bail| ResolveError::SlowPathLock { gpa, bail })?;
        if let Some(outcome) = install_locked(slot, gpa, content, installer, &guard)? {
            return Ok(Resolution {
                outcome,
                path: Path::Slow,
                bail,
                attempts,
            });
        }
        drop(guard);
        drop(locked);
        if attempts >= MAX_AGAIN {
            return Err(ResolveError::TooManyRetries { gpa, attempts });
        }
        crate::sync::yield_now();
    }
}

/// Steps 4 and 6 with the install lock held. `None`: `EAGAIN`, retry.
fn install_locked<B, I: Installer<B>>(
    slot: &Memslot<B>,
    gpa: u64,
    content: Content<I::Prepared>,
    installer: &mut I,
    guard: &InstallGuard<'_>,
) -> Result<Option<Outcome>, ResolveError<I::Error>> {
    let page = gpa & !(PAGE_SIZE - 1);
    let index = slot.page_index(page);
    // I6: no page is installed into a block that is not plugged; an unplug
    // clears the bit under the exclusive lock, so the guard makes this stable.
    if !slot.is_plugged(index) {
        return Err(ResolveError::NotPlugged { gpa });
    }
    // I3: a discard between prepare and the lock made source content stale;
    // the page must come back as zero.
    let content = match content {
        Content::Source(_) if slot.is_discarded(index) => Content::Zero,
        c => c,
    };
    let outcome = match installer
        .install(slot, page, content, guard)
        .map_err(ResolveError::Installer)?
    {
        Install::Done => Outcome::Installed,
        Install::Exists => Outcome::AlreadyPresent,
        Install::Again => return Ok(None),
        Install::Declined => return Ok(Some(Outcome::Declined)),
    };
    // I2: the access completes against the page while the guard still holds
    // off discards, unplugs and removals.
    installer.complete(slot, guard);
    Ok(Some(outcome))
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::Arc;
    use std::collections::BTreeMap;

    /// A page table in a map; records what the driver asked for.
    #[derive(Default)]
    struct MapInstaller {
        pages: BTreeMap<u64, &'static str>,
        again: u32,
        completed: u32,
        fail_prepare: bool,
        on_first_prepare: Option<Box<dyn FnOnce()>>,
    }

    impl Installer<bool> for MapInstaller {
        type Prepared = ();
        type Error = &'static str;
        fn prepare(&mut self, slot: &Memslot<bool>, _: u64) -> Result<Content<()>, &'static str> {
            if self.fail_prepare {
                return Err("source unreadable");
            }
            if let Some(f) = self.on_first_prepare.take() {
                f();
            }
            Ok(if slot.backing {
                Content::Source(())
            } else {
                Content::Zero
            })
        }
        fn install(
            &mut self,
            _: &Memslot<bool>,
            page: u64,
            content: Content<()>,
            _: &InstallGuard<'_>,
        ) -> Result<Install, &'static str> {
            if self.again > 0 {
                self.again -= 1;
                return Ok(Install::Again);
            }
            if self.pages.contains_key(&page) {
                return Ok(Install::Exists);
            }
            let what = match content {
                Content::Zero => "zero",
                Content::Source(()) => "image",
            };
            self.pages.insert(page, what);
            Ok(Install::Done)
        }
        fn complete(&mut self, _: &Memslot<bool>, _: &InstallGuard<'_>) {
            self.completed += 1;
        }
    }

    fn table(image: bool) -> Memslots<bool> {
        Memslots::new(vec![Arc::new(Memslot::new(0, 0x10_0000, 0x10_0000, image))])
    }

    #[test]
    fn speculative_install_then_present() {
        let m = table(true);
        let mut i = MapInstaller::default();
        let r = resolve(&m, 0x10_0123, &mut i).unwrap();
        assert_eq!(
            (r.outcome, r.path, r.attempts),
            (Outcome::Installed, Path::Speculative, 1)
        );
        assert_eq!(i.pages[&0x10_0000], "image");
        let r = resolve(&m, 0x10_0ff8, &mut i).unwrap();
        assert_eq!(r.outcome, Outcome::AlreadyPresent);
        assert_eq!(i.completed, 2);
    }

    #[test]
    fn not_ram_and_installer_errors_pass_through() {
        let m = table(false);
        let mut i = MapInstaller::default();
        assert_eq!(
            resolve(&m, 0x5000, &mut i),
            Err(ResolveError::NotRam { gpa: 0x5000 })
        );
        i.fail_prepare = true;
        assert_eq!(
            resolve(&m, 0x10_0000, &mut i),
            Err(ResolveError::Installer("source unreadable"))
        );
    }

    #[test]
    fn discarded_source_page_installs_zero() {
        let m = table(true);
        m.snapshot().slots[0].begin_discard(1, 1);
        let mut i = MapInstaller::default();
        resolve(&m, 0x10_1000, &mut i).unwrap();
        assert_eq!(i.pages[&0x10_1000], "zero");
    }

    #[test]
    fn again_retries_on_the_slow_path_and_is_bounded() {
        let m = table(false);
        let mut i = MapInstaller {
            again: 2,
            ..Default::default()
        };
        let r = resolve(&m, 0x10_0000, &mut i).unwrap();
        assert_eq!(
            (r.path, r.attempts, r.retries(), r.bail),
            (Path::Slow, 3, 2, None)
        );
        let mut i = MapInstaller {
            again: u32::MAX,
            ..Default::default()
        };
        assert_eq!(
            resolve(&m, 0x10_2000, &mut i),
            Err(ResolveError::TooManyRetries {
                gpa: 0x10_2000,
                attempts: MAX_AGAIN
            })
        );
    }

    #[test]
    fn a_change_between_snapshot_and_trylock_retries_under_the_slots_lock() {
        let m = Arc::new(table(false));
        let mut i = MapInstaller::default();
        // The first prepare (no lock held) races a hotplug of another slot.
        let hotplug = m.clone();
        i.on_first_prepare = Some(Box::new(move || {
            let locked = hotplug.lock_slots();
            locked.publish_added(Arc::new(Memslot::new(1, 0x40_0000, 0x1000, false)));
        }));
        let r = resolve(&m, 0x10_0000, &mut i).unwrap();
        assert_eq!(
            (r.outcome, r.path, r.bail, r.retries()),
            (
                Outcome::Installed,
                Path::Slow,
                Some(Bail::GenerationChanged),
                1
            )
        );
    }

    #[test]
    fn unplugged_block_is_refused_and_plugged_one_installs() {
        let s = Arc::new(Memslot::with_blocks(
            0, 0x800_0000, 0x80_0000, 0x20_0000, false,
        ));
        let m = Memslots::new(vec![s.clone()]);
        let mut i = MapInstaller::default();
        assert_eq!(
            resolve(&m, 0x820_0000, &mut i),
            Err(ResolveError::NotPlugged { gpa: 0x820_0000 })
        );
        s.plug(1, 1);
        assert_eq!(
            resolve(&m, 0x820_0000, &mut i).unwrap().outcome,
            Outcome::Installed
        );
        assert!(i.pages.len() == 1 && i.completed == 1);
    }

    #[test]
    fn slow_path_lock_failure_is_an_invariant_error_not_not_ram() {
        let m = table(false);
        // Planted corruption: a slot in the current table marked invalid.
        let s = m.snapshot().slots[0].clone();
        s.begin_invalidate();
        let mut i = MapInstaller::default();
        assert_eq!(
            resolve(&m, 0x10_0000, &mut i),
            Err(ResolveError::SlowPathLock {
                gpa: 0x10_0000,
                bail: Bail::SlotInvalid
            })
        );
    }
}
