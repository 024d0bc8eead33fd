//! Guest memory at run time: the memslot table ([`super::slots`]) tied to KVM
//! memslots, host mappings and userfaultfd. Every memslot change — hotplug,
//! unplug, balloon discards — goes through [`MemoryManager`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use userfaultfd::Uffd;
use vm_memory::MmapRegion;

use super::slots::{Memslot, Memslots, PAGE_SIZE};
use super::source::PageSource;

/// Host side of a memslot.
pub struct SlotBacking {
    /// Host virtual address of the slot's first byte.
    pub hva: u64,
    pub source: PageSource,
    /// Offset of the slot's first byte within its page source.
    pub source_offset: u64,
    /// The mapping; unmapped when the last snapshot holding the slot drops,
    /// so its address cannot be reused while a stale installer holds it.
    _mapping: Arc<MmapRegion<()>>,
}

pub type Slot = Memslot<SlotBacking>;

#[derive(Debug, Error)]
pub enum MemError {
    #[error("GPA range [{gpa:#x}..{end:#x}) is not page aligned or empty")]
    Unaligned { gpa: u64, end: u64 },
    #[error("GPA range [{gpa:#x}..{end:#x}) overlaps an existing memslot")]
    Overlap { gpa: u64, end: u64 },
    #[error("no memslot starts at GPA {0:#x}")]
    NoSuchSlot(u64),
    #[error("GPA range [{gpa:#x}..{end:#x}) is not inside one memslot")]
    NotInOneSlot { gpa: u64, end: u64 },
    #[error("no free KVM memslot (limit {0})")]
    NoFreeSlot(usize),
    #[error("mmap of {size} bytes failed: {source}")]
    Mmap {
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("KVM_SET_USER_MEMORY_REGION slot {slot} failed: {source}")]
    Kvm {
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("userfaultfd {what} failed: {source}")]
    Uffd {
        what: &'static str,
        source: userfaultfd::Error,
    },
    #[error("madvise({what}) on [{hva:#x}+{len:#x}] failed: {source}")]
    Madvise {
        what: &'static str,
        hva: u64,
        len: u64,
        source: std::io::Error,
    },
}

/// Counters of memslot activity (per VM).
#[derive(Default)]
pub struct MemoryCounters {
    pub changes: AtomicU64,
    pub discarded_pages: AtomicU64,
}

pub struct MemoryManager {
    pub slots: Memslots<SlotBacking>,
    vm: Arc<VmFd>,
    /// Set when faults are served through userfaultfd (vcpu/handler modes):
    /// new slots are registered with it.
    uffd: Option<Arc<Uffd>>,
    free_ids: Mutex<Vec<u32>>,
    max_slots: usize,
    pub counters: MemoryCounters,
}

impl MemoryManager {
    /// Wrap the boot RAM regions (already registered with KVM as slots
    /// `0..n`) as the first memslots.
    pub fn new(
        vm: Arc<VmFd>,
        boot: Vec<(u64, Arc<MmapRegion<()>>, PageSource, u64)>,
        max_slots: usize,
    ) -> Self {
        let n = boot.len() as u32;
        let slots = boot
            .into_iter()
            .enumerate()
            .map(|(i, (gpa, mapping, source, source_offset))| {
                let size = mapping.size() as u64;
                Arc::new(Memslot::new(
                    i as u32,
                    gpa,
                    size,
                    SlotBacking {
                        hva: mapping.as_ptr() as u64,
                        source,
                        source_offset,
                        _mapping: mapping,
                    },
                ))
            })
            .collect();
        let limit = max_slots.min(u16::MAX as usize) as u32;
        Self {
            slots: Memslots::new(slots),
            vm,
            uffd: None,
            free_ids: Mutex::new((n..limit).rev().collect()),
            max_slots,
            counters: MemoryCounters::default(),
        }
    }

    /// Register every current slot with `uffd` (MISSING mode); later slots are
    /// registered when added.
    pub fn attach_uffd(&mut self, uffd: Arc<Uffd>) -> Result<(), MemError> {
        for s in &self.slots.snapshot().slots {
            register(&uffd, s.backing.hva, s.size)?;
        }
        self.uffd = Some(uffd);
        Ok(())
    }

    pub fn uffd(&self) -> Option<&Arc<Uffd>> {
        self.uffd.as_ref()
    }

    /// Populate all RAM now (prefault mode).
    pub fn populate_all(&self) -> Result<(), MemError> {
        for s in &self.slots.snapshot().slots {
            madvise(
                s.backing.hva,
                s.size,
                libc::MADV_POPULATE_WRITE,
                "MADV_POPULATE_WRITE",
            )?;
        }
        Ok(())
    }

    /// Hotplug: map `size` bytes at `gpa`, tell KVM, publish a new generation.
    pub fn add_slot(&self, gpa: u64, size: u64, source: PageSource) -> Result<u32, MemError> {
        let end = page_range(gpa, size)?;
        let locked = self.slots.lock_slots();
        if locked
            .snapshot()
            .slots
            .iter()
            .any(|s| gpa < s.end() && s.gpa < end)
        {
            return Err(MemError::Overlap { gpa, end });
        }
        let id = self
            .free_ids
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop()
            .ok_or(MemError::NoFreeSlot(self.max_slots))?;
        let result = self.map_and_register(id, gpa, size, source);
        match result {
            Ok(slot) => {
                locked.publish_added(slot);
                self.counters.changes.fetch_add(1, Ordering::Relaxed);
                Ok(id)
            }
            Err(e) => {
                self.free_ids
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(id);
                Err(e)
            }
        }
    }

    fn map_and_register(
        &self,
        id: u32,
        gpa: u64,
        size: u64,
        source: PageSource,
    ) -> Result<Arc<Slot>, MemError> {
        let mapping = Arc::new(
            MmapRegion::<()>::build(
                None,
                size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
            .map_err(|source| MemError::Mmap { size, source })?,
        );
        let hva = mapping.as_ptr() as u64;
        if let Some(uffd) = &self.uffd {
            register(uffd, hva, size)?;
        }
        set_region(&self.vm, id, gpa, size, hva)?;
        Ok(Arc::new(Memslot::new(
            id,
            gpa,
            size,
            SlotBacking {
                hva,
                source,
                source_offset: 0,
                _mapping: mapping,
            },
        )))
    }

    /// Unplug: unpublish the slot at `gpa`, wait for in-flight installers,
    /// then remove it from KVM. The mapping goes when the last snapshot
    /// holding it drops.
    pub fn remove_slot(&self, gpa: u64) -> Result<(), MemError> {
        let locked = self.slots.lock_slots();
        let slot = locked.unpublish(gpa).ok_or(MemError::NoSuchSlot(gpa))?;
        let exclusive = slot.begin_removal();
        let r = set_region(&self.vm, slot.id, slot.gpa, 0, slot.backing.hva);
        if let Some(uffd) = &self.uffd {
            // Nothing may be installed into the range from now on.
            let _ = uffd.unregister(slot.backing.hva as *mut libc::c_void, slot.size as usize);
        }
        drop(exclusive);
        if r.is_ok() {
            self.free_ids
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(slot.id);
        }
        self.counters.changes.fetch_add(1, Ordering::Relaxed);
        drop(locked);
        r
    }

    /// Balloon-style discard of `[gpa, gpa+len)` (inside one slot): the pages
    /// are zapped and refault as zero, never as their old or image content.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), MemError> {
        let end = page_range(gpa, len)?;
        let snap = self.slots.snapshot();
        let slot = snap
            .lookup(gpa)
            .filter(|s| end <= s.end())
            .ok_or(MemError::NotInOneSlot { gpa, end })?;
        let first = slot.page_index(gpa);
        let exclusive = slot.begin_discard(first, len / PAGE_SIZE);
        let hva = slot.backing.hva + (gpa - slot.gpa);
        let r = madvise(hva, len, libc::MADV_DONTNEED, "MADV_DONTNEED");
        drop(exclusive);
        self.counters
            .discarded_pages
            .fetch_add(len / PAGE_SIZE, Ordering::Relaxed);
        r
    }

    /// Pages of guest RAM currently resident (mincore over every slot).
    pub fn resident_pages(&self) -> u64 {
        self.slots
            .snapshot()
            .slots
            .iter()
            .map(|s| resident_pages(s.backing.hva, s.size))
            .sum()
    }
}

/// Check that `[gpa, gpa+len)` is a non-empty page-aligned range; its end.
fn page_range(gpa: u64, len: u64) -> Result<u64, MemError> {
    let end = gpa.wrapping_add(len);
    if len == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) || end < gpa {
        return Err(MemError::Unaligned { gpa, end });
    }
    Ok(end)
}

fn register(uffd: &Uffd, hva: u64, size: u64) -> Result<(), MemError> {
    uffd.register(hva as *mut libc::c_void, size as usize)
        .map(|_| ())
        .map_err(|source| MemError::Uffd {
            what: "UFFDIO_REGISTER",
            source,
        })
}

fn set_region(vm: &VmFd, slot: u32, gpa: u64, size: u64, hva: u64) -> Result<(), MemError> {
    let r = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva,
    };
    // SAFETY: the mapping at `hva` lives at least as long as the slot: it is
    // owned by the slot's backing, which outlives the KVM registration (a
    // removal deletes the KVM slot before the backing can drop).
    unsafe { vm.set_user_memory_region(r) }.map_err(|source| MemError::Kvm { slot, source })
}

fn madvise(hva: u64, len: u64, advice: libc::c_int, what: &'static str) -> Result<(), MemError> {
    // SAFETY: the range lies inside a mapping owned by a live slot.
    let r = unsafe { libc::madvise(hva as *mut libc::c_void, len as usize, advice) };
    if r == 0 {
        Ok(())
    } else {
        Err(MemError::Madvise {
            what,
            hva,
            len,
            source: std::io::Error::last_os_error(),
        })
    }
}

/// Count resident pages of a mapping with mincore(2).
pub fn resident_pages(hva: u64, size: u64) -> u64 {
    let pages = size.div_ceil(PAGE_SIZE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the range, which is mapped.
    let r = unsafe { libc::mincore(hva as *mut libc::c_void, size as usize, vec.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    vec.iter().filter(|b| *b & 1 != 0).count() as u64
}
