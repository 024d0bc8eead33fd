//! One memslot and its install lock.

use crate::bitmap::PageBitmap;
use crate::sync::{AtomicBool, AtomicU64, Ordering, RwLock, RwLockReadGuard, RwLockWriteGuard};
use crate::PAGE_SIZE;

/// Why a speculative install did not get its lock. Each one is a RETRY on
/// the slow path; none is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bail {
    /// A memslot change committed after the fault took its snapshot: the
    /// slot or its neighbours may be stale.
    GenerationChanged,
    /// The slot's removal has begun.
    SlotInvalid,
    /// A memslot change, a discard or an unplug holds the slot's install
    /// lock exclusively.
    Contended,
}

/// Plugged state of a slot carved into blocks (a virtio-mem slice).
struct Blocks {
    /// Pages per block (a power of two).
    block_pages: u64,
    plugged: PageBitmap,
}

/// One memslot: a guest-physical range backed by one host mapping.
///
/// `B` is the backing (host mapping and page source); the protocol does not
/// look inside it.
pub struct Memslot<B> {
    /// KVM slot number.
    pub id: u32,
    pub gpa: u64,
    pub size: u64,
    pub backing: B,
    valid: AtomicBool,
    install_lock: RwLock<()>,
    /// Pages discarded since the slot was added: they refault as zero.
    discarded: PageBitmap,
    /// `Some` for slots whose blocks are plugged and unplugged one by one.
    blocks: Option<Blocks>,
}

/// Held while installing a page and completing the access that faulted.
/// While any guard exists the slot cannot be removed nor its pages discarded
/// or unplugged.
pub struct InstallGuard<'a> {
    _shared: RwLockReadGuard<'a, ()>,
}

/// Held by a memslot change, a discard or an unplug: no installer is inside
/// the slot.
pub struct ExclusiveGuard<'a> {
    _exclusive: RwLockWriteGuard<'a, ()>,
}

impl<B> Memslot<B> {
    /// A slot whose every page is RAM.
    pub fn new(id: u32, gpa: u64, size: u64, backing: B) -> Self {
        Self {
            id,
            gpa,
            size,
            backing,
            valid: AtomicBool::new(true),
            install_lock: RwLock::new(()),
            discarded: PageBitmap::new(size / PAGE_SIZE),
            blocks: None,
        }
    }

    /// A slot carved into blocks of `block_size` bytes (a power-of-two
    /// multiple of the page size dividing `size`), all unplugged: a page of
    /// an unplugged block is never installed (I6).
    pub fn with_blocks(id: u32, gpa: u64, size: u64, block_size: u64, backing: B) -> Self {
        assert!(
            block_size >= PAGE_SIZE
                && block_size.is_power_of_two()
                && size.is_multiple_of(block_size),
            "block size {block_size:#x} does not divide slot size {size:#x}"
        );
        Self {
            blocks: Some(Blocks {
                block_pages: block_size / PAGE_SIZE,
                plugged: PageBitmap::new(size / block_size),
            }),
            ..Self::new(id, gpa, size, backing)
        }
    }

    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size
    }

    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    /// Page index of `gpa` within the slot.
    pub fn page_index(&self, gpa: u64) -> u64 {
        (gpa - self.gpa) / PAGE_SIZE
    }

    /// Whether the page was discarded (and must refault as zero).
    pub fn is_discarded(&self, page: u64) -> bool {
        self.discarded.get(page)
    }

    /// How many of the pages `first..first + max` come before the first
    /// discarded one (or before the slot's end).
    pub fn undiscarded_run(&self, first: u64, max: u64) -> u64 {
        self.discarded.clear_run(first, max)
    }

    pub fn discarded_pages(&self) -> u64 {
        self.discarded.count()
    }

    /// Whether the page may hold RAM: always, unless the slot has blocks and
    /// the page's block is unplugged.
    pub fn is_plugged(&self, page: u64) -> bool {
        self.blocks
            .as_ref()
            .is_none_or(|b| b.plugged.get(page / b.block_pages))
    }

    /// Block size in bytes, for a slot carved into blocks.
    pub fn block_size(&self) -> Option<u64> {
        self.blocks.as_ref().map(|b| b.block_pages * PAGE_SIZE)
    }

    /// Plugged blocks (0 for a slot without blocks).
    pub fn plugged_blocks(&self) -> u64 {
        self.blocks.as_ref().map_or(0, |b| b.plugged.count())
    }

    /// Speculative path: take the install lock shared, without waiting, and
    /// check that nothing changed since the fault's snapshot. The checks come
    /// after the lock so that a writer that has already taken the lock
    /// exclusively, or marked the slot invalid, is always seen.
    pub fn map_trylock<'a>(
        &'a self,
        generation: u64,
        current: &AtomicU64,
    ) -> Result<InstallGuard<'a>, Bail> {
        let shared = self.install_lock.try_read().map_err(|_| Bail::Contended)?;
        // I1: a slot whose removal has begun takes no more installs.
        if !self.valid.load(Ordering::Acquire) {
            return Err(Bail::SlotInvalid);
        }
        // I1: a table changed since the snapshot may no longer hold the slot.
        if current.load(Ordering::Acquire) != generation {
            return Err(Bail::GenerationChanged);
        }
        Ok(InstallGuard { _shared: shared })
    }

    /// Slow path (the caller holds the slots lock): wait for the install
    /// lock. Fails only if the slot is being removed, which the slots lock
    /// rules out for a slot found in the current table.
    pub fn map_lock(&self) -> Result<InstallGuard<'_>, Bail> {
        let shared = self.install_lock.read().unwrap_or_else(|e| e.into_inner());
        // I1, as in `map_trylock`.
        if !self.valid.load(Ordering::Acquire) {
            return Err(Bail::SlotInvalid);
        }
        Ok(InstallGuard { _shared: shared })
    }

    fn exclusive(&self) -> ExclusiveGuard<'_> {
        ExclusiveGuard {
            _exclusive: self.install_lock.write().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Mark the slot invalid: speculative installers bail from now on.
    pub(crate) fn begin_invalidate(&self) {
        self.valid.store(false, Ordering::Release);
    }

    /// Writer side of a removal: invalidate, then wait for in-flight
    /// installers. After this returns nothing is installed into the slot (I1).
    pub fn begin_removal(&self) -> ExclusiveGuard<'_> {
        self.valid.store(false, Ordering::Release);
        self.exclusive()
    }

    /// Writer side of a per-page discard: exclude installers, mark pages
    /// `first..first+count` discarded. The caller zaps the pages while the
    /// guard is held; they refault as zero (I3).
    pub fn begin_discard(&self, first: u64, count: u64) -> ExclusiveGuard<'_> {
        let g = self.exclusive();
        self.discarded.set_range(first, count);
        g
    }

    /// Plug blocks `first..first+count`: from now on their pages may be
    /// installed. Panics on a slot without blocks.
    pub fn plug(&self, first: u64, count: u64) {
        let b = self.blocks.as_ref().expect("plug on a slot without blocks");
        let _g = self.exclusive();
        for i in first..first + count {
            b.plugged.set(i);
        }
    }

    /// Writer side of an unplug: exclude installers, then mark blocks
    /// `first..first+count` unplugged. The caller zaps their pages while the
    /// guard is held; nothing is installed into them afterwards (I6).
    pub fn begin_unplug(&self, first: u64, count: u64) -> ExclusiveGuard<'_> {
        let b = self
            .blocks
            .as_ref()
            .expect("unplug on a slot without blocks");
        let g = self.exclusive();
        for i in first..first + count {
            b.plugged.clear(i);
        }
        g
    }

    /// A model test's planted defect: unplug *without* excluding installers.
    #[cfg(all(test, loom))]
    pub(crate) fn unplug_unguarded(&self, first: u64, count: u64) {
        let b = self.blocks.as_ref().unwrap();
        for i in first..first + count {
            b.plugged.clear(i);
        }
    }
}
