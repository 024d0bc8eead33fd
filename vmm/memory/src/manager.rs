//! [`MemoryManager`]: the one owner of guest RAM. It maps every range,
//! registers it with KVM and (in the userfaultfd fault modes) with
//! userfaultfd, keeps the memslot table the fault engine resolves against,
//! and publishes the guest-memory view (`vm-memory`'s `GuestMemoryAtomic`)
//! that loaders and devices read and write through. Every memslot change —
//! hotplug, unplug, discards — goes through it, in the order
//! docs/FAULT-PATH.md gives.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};

use arc_swap::ArcSwap;
use memslots::{Memslot, MemslotTable, Memslots};
use userfaultfd::Uffd;
use vm_memory::{
    GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryLoadGuard, GuestRegionMmap,
    MmapRegion,
};
use vmm_counters::{metrics, Metric};

use super::{
    partial::PartialHugePages, resident_pages, AtomicBitmap, GuestMemory, ImageFile, KvmSlots,
    MemError, PageSource, RamRange, PAGE_SIZE,
};

/// Host side of a memslot: its mapping (shared with the guest-memory view)
/// and where its pages' first content comes from.
pub struct SlotBacking {
    region: Arc<GuestRegionMmap<AtomicBitmap>>,
    source: PageSource,
    /// Offset of the slot's first byte within its page source.
    source_offset: u64,
    /// 2 MiB hugetlb pages: installs are whole huge pages.
    huge: bool,
    /// Huge pages the balloon has inflated part of (hugetlb only).
    partial: PartialHugePages,
}

impl SlotBacking {
    /// Host virtual address of the slot's first byte. The mapping lives as
    /// long as this backing (and any view snapshot holding the region).
    pub fn hva(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    pub fn source(&self) -> &PageSource {
        &self.source
    }

    pub fn source_offset(&self) -> u64 {
        self.source_offset
    }

    /// Record that the VMM changed `[offset, offset+len)` of the slot
    /// without the guest (a discard, an unplug): the next diff snapshot
    /// takes those pages (KVM's dirty log sees only guest writes).
    pub fn mark_changed(&self, offset: u64, len: u64) {
        self.region
            .bitmap()
            .set_addr_range(offset as usize, len as usize);
    }

    /// The mapping's huge page size, if it is hugetlb.
    pub fn huge_page(&self) -> Option<u64> {
        self.huge.then_some(super::hugetlb::HUGE_PAGE)
    }
}

/// How a slot's host memory is mapped.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mapping {
    Anonymous,
    /// `MAP_PRIVATE` of the source file.
    PrivateFile,
    /// Anonymous 2 MiB hugetlb pages.
    HugeTlb,
}

pub type Slot = Memslot<SlotBacking>;

/// A memslot to add at run time.
#[derive(Clone)]
pub struct NewSlot {
    pub gpa: u64,
    pub size: u64,
    pub source: PageSource,
    /// Where the slot's first byte is in its source (a file).
    pub source_offset: u64,
    /// `Some(block size)`: the slot's pages are installable only in plugged
    /// blocks (virtio-mem); all blocks start unplugged.
    pub block_size: Option<u64>,
}

metrics! {
    /// What the memory manager reports for the VM.
    pub enum MemStat in MEMORY_METRICS {
        Generation = Metric::gauge(
            "vmm_memslot_generation",
            "memslot_generation",
            "Generation of the memslot table (bumped by every committed change)",
        ),
        Changes = Metric::counter(
            "vmm_memslot_changes",
            "memslot_changes",
            "Memslot changes (hotplug, unplug)",
        ),
        ResidentPages = Metric::gauge(
            "vmm_resident_pages",
            "resident_pages",
            "Guest RAM pages resident on the host",
        ),
        DiscardedPages = Metric::counter(
            "vmm_discarded_pages",
            "discarded_pages",
            "Guest RAM pages discarded (balloon, free page reporting, stress)",
        ),
        Memslots = Metric::gauge(
            "vmm_memslots",
            "memslots",
            "Memslots: boot RAM ranges, plugged hotplug slices, extra slots",
        ),
    }
}

/// The values of [`MEMORY_METRICS`] at one moment; index it with a
/// [`MemStat`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub values: [u64; MemStat::COUNT],
}

impl std::ops::Index<MemStat> for MemoryStats {
    type Output = u64;
    fn index(&self, s: MemStat) -> &u64 {
        &self.values[s as usize]
    }
}

#[derive(Default)]
struct Counters {
    changes: AtomicU64,
    discarded_pages: AtomicU64,
    /// Nanoseconds in `KvmSlots::dirty_log`.
    dirty_log_ns: AtomicU64,
}

pub struct MemoryManager {
    slots: Memslots<SlotBacking>,
    view: GuestMemoryAtomic<GuestMemory>,
    kvm: Arc<dyn KvmSlots>,
    /// Set when faults are served through userfaultfd (vcpu/handler modes):
    /// new slots are registered with it.
    uffd: OnceLock<Arc<Uffd>>,
    /// Slots unpublished by a removal whose mapping may still exist: a
    /// SIGBUS on one of them is a stale access, retried, never fatal.
    retired: ArcSwap<Vec<Weak<Slot>>>,
    free_ids: Mutex<Vec<u32>>,
    max_slots: usize,
    boot: Vec<RamRange>,
    /// How hotplugged slots are mapped (like boot RAM).
    mapping: Mapping,
    counters: Counters,
    /// KVM logs guest writes on every slot (since [`MemoryManager::track_dirty`]).
    log_dirty: AtomicBool,
}

impl MemoryManager {
    /// Map boot RAM (`ranges`, not populated: `MAP_NORESERVE`), register it
    /// with KVM as slots `0..n`, with `source` giving each page's first
    /// content (the ranges are consecutive in the source).
    pub fn new(
        kvm: Arc<dyn KvmSlots>,
        ranges: &[RamRange],
        source: PageSource,
        max_slots: usize,
    ) -> Result<Self, MemError> {
        Self::build(kvm, ranges, source, max_slots, Mapping::Anonymous)
    }

    /// Boot RAM on 2 MiB hugetlb pages (zero-filled; `--mem-hugepages`):
    /// the host's pool is raised if it is short, and the mapping reserves
    /// its pages at once, so a host without them fails here, clearly.
    /// `hotplug` more bytes are made free in the pool for slots added later
    /// (they are hugetlb too, and reserve their pages when they are mapped).
    pub fn new_hugetlb(
        kvm: Arc<dyn KvmSlots>,
        ranges: &[RamRange],
        hotplug: u64,
        max_slots: usize,
    ) -> Result<Self, MemError> {
        let huge = super::hugetlb::HUGE_PAGE;
        if let Some(r) = ranges
            .iter()
            .find(|r| r.gpa % huge != 0 || r.size % huge != 0)
        {
            return Err(MemError::HugePages(format!(
                "RAM range {:#x}+{:#x} is not whole 2 MiB pages",
                r.gpa, r.size
            )));
        }
        super::hugetlb::reserve(
            ranges.iter().map(|r| r.size).sum::<u64>().div_ceil(huge) + hotplug.div_ceil(huge),
        )?;
        Self::build(kvm, ranges, PageSource::Zero, max_slots, Mapping::HugeTlb)
    }

    /// Boot RAM as a `MAP_PRIVATE` mapping of the image file itself: the
    /// host kernel serves first touches from its page cache and copies on
    /// write (Firecracker's default snapshot restore; the `kernel` fault
    /// mode with `--mem-source`). A discarded page shows the file's content
    /// again, not zeros.
    pub fn new_file_mapped(
        kvm: Arc<dyn KvmSlots>,
        ranges: &[RamRange],
        image: Arc<ImageFile>,
        max_slots: usize,
    ) -> Result<Self, MemError> {
        Self::build(
            kvm,
            ranges,
            PageSource::File(image),
            max_slots,
            Mapping::PrivateFile,
        )
    }

    pub(crate) fn build(
        kvm: Arc<dyn KvmSlots>,
        ranges: &[RamRange],
        source: PageSource,
        max_slots: usize,
        mapping: Mapping,
    ) -> Result<Self, MemError> {
        let mut slots = Vec::with_capacity(ranges.len());
        let mut offset = 0;
        for (id, r) in ranges.iter().enumerate() {
            let id = id as u32;
            let backing = map(r.gpa, r.size, source.clone(), offset, mapping, true)?;
            set_region(&*kvm, id, r.gpa, r.size, backing.hva(), false)?;
            offset += r.size;
            slots.push(Arc::new(Memslot::new(id, r.gpa, r.size, backing)));
        }
        let view = GuestMemoryAtomic::new(view_of(&slots)?);
        let limit = max_slots.min(u16::MAX as usize) as u32;
        Ok(Self {
            slots: Memslots::new(slots),
            view,
            kvm,
            uffd: OnceLock::new(),
            retired: ArcSwap::from_pointee(Vec::new()),
            free_ids: Mutex::new((ranges.len() as u32..limit).rev().collect()),
            max_slots,
            boot: ranges.to_vec(),
            mapping,
            counters: Counters::default(),
            log_dirty: AtomicBool::new(false),
        })
    }

    /// The memslot table the fault engine resolves against.
    pub fn slots(&self) -> &Memslots<SlotBacking> {
        &self.slots
    }

    /// A lock-free snapshot of the table.
    pub fn snapshot(&self) -> Arc<MemslotTable<SlotBacking>> {
        self.slots.snapshot()
    }

    /// The current guest-memory view. Hold it for one operation only: a
    /// memslot change publishes a new view, and a held snapshot keeps an
    /// unplugged region's mapping alive.
    pub fn memory(&self) -> GuestMemoryLoadGuard<GuestMemory> {
        self.view.memory()
    }

    /// The view itself, for devices that load it per request.
    pub fn view(&self) -> GuestMemoryAtomic<GuestMemory> {
        self.view.clone()
    }

    /// Boot RAM ranges.
    pub fn boot_ranges(&self) -> &[RamRange] {
        &self.boot
    }

    /// Boot RAM in bytes.
    pub fn boot_size(&self) -> u64 {
        self.boot.iter().map(|r| r.size).sum()
    }

    /// Register every current slot with `uffd` (MISSING mode); later slots are
    /// registered when added.
    pub fn attach_uffd(&self, uffd: Arc<Uffd>) -> Result<(), MemError> {
        let locked = self.slots.lock_slots();
        for s in &locked.snapshot().slots {
            register(&uffd, s.backing.hva(), s.size)?;
        }
        self.uffd.set(uffd).map_err(|_| MemError::UffdAttached)
    }

    pub fn uffd(&self) -> Option<&Arc<Uffd>> {
        self.uffd.get()
    }

    /// Whether guest RAM (and every slot added to it) is on hugetlb pages.
    pub fn has_hugetlb(&self) -> bool {
        self.mapping == Mapping::HugeTlb
    }

    /// Populate all RAM now (prefault mode).
    pub fn populate_all(&self) -> Result<(), MemError> {
        for s in &self.snapshot().slots {
            madvise(
                s.backing.hva(),
                s.size,
                libc::MADV_POPULATE_WRITE,
                "MADV_POPULATE_WRITE",
            )?;
        }
        Ok(())
    }

    /// Hotplug: map, register with userfaultfd and KVM, publish a new
    /// generation and a view that includes the slot. Returns the KVM slot id.
    pub fn add_slot(&self, new: NewSlot) -> Result<u32, MemError> {
        let end = page_range(new.gpa, new.size)?;
        let unit = match self.mapping {
            Mapping::HugeTlb => super::hugetlb::HUGE_PAGE,
            _ => PAGE_SIZE,
        };
        if new
            .block_size
            .is_some_and(|b| b < unit || !b.is_power_of_two() || !new.size.is_multiple_of(b))
        {
            return Err(MemError::NotBlocks { gpa: new.gpa, end });
        }
        if !new.gpa.is_multiple_of(unit) || !new.size.is_multiple_of(unit) {
            return Err(MemError::Unaligned { gpa: new.gpa, end });
        }
        if unit > PAGE_SIZE && !matches!(new.source, PageSource::Zero) {
            return Err(MemError::HugePages(
                "a hugetlb slot is zero-filled: it cannot have an image".into(),
            ));
        }
        let locked = self.slots.lock_slots();
        if locked
            .snapshot()
            .slots
            .iter()
            .any(|s| new.gpa < s.end() && s.gpa < end)
        {
            return Err(MemError::Overlap { gpa: new.gpa, end });
        }
        let id = self
            .lock_ids()
            .pop()
            .ok_or(MemError::NoFreeSlot(self.max_slots))?;
        let slot = match self.map_and_register(id, &new) {
            Ok(slot) => slot,
            Err(e) => {
                self.lock_ids().push(id);
                return Err(e);
            }
        };
        locked.publish_added(slot);
        self.publish_view(&locked.snapshot().slots);
        self.counters.changes.fetch_add(1, Ordering::Relaxed);
        Ok(id)
    }

    fn map_and_register(&self, id: u32, new: &NewSlot) -> Result<Arc<Slot>, MemError> {
        let mapping = match self.mapping {
            Mapping::HugeTlb => Mapping::HugeTlb,
            _ => Mapping::Anonymous,
        };
        let backing = map(
            new.gpa,
            new.size,
            new.source.clone(),
            new.source_offset,
            mapping,
            false,
        )?;
        let hva = backing.hva();
        let log = self.tracks_dirty();
        if log {
            // All new since any snapshot: a diff takes every page.
            backing.mark_changed(0, new.size);
        }
        if let Some(uffd) = self.uffd() {
            register(uffd, hva, new.size)?;
        }
        if let Err(e) = set_region(&*self.kvm, id, new.gpa, new.size, hva, log) {
            if let Some(uffd) = self.uffd() {
                let _ = uffd.unregister(hva as *mut libc::c_void, new.size as usize);
            }
            return Err(e);
        }
        Ok(Arc::new(match new.block_size {
            Some(b) => Memslot::with_blocks(id, new.gpa, new.size, b, backing),
            None => Memslot::new(id, new.gpa, new.size, backing),
        }))
    }

    /// Unplug the slot at `gpa`: unpublish it (generation + 1) and the view
    /// without it, wait for in-flight installers (I1), delete the KVM slot,
    /// unregister and drop its pages. The mapping goes when the last snapshot
    /// holding it drops.
    pub fn remove_slot(&self, gpa: u64) -> Result<(), MemError> {
        let locked = self.slots.lock_slots();
        let slot = locked.unpublish(gpa).ok_or(MemError::NoSuchSlot(gpa))?;
        self.retire(&slot);
        self.publish_view(&locked.snapshot().slots);
        let exclusive = slot.begin_removal();
        // I1: from here no installer is inside the slot and none can enter.
        let hva = slot.backing.hva();
        let r = set_region(&*self.kvm, slot.id, slot.gpa, 0, hva, false);
        if let Some(uffd) = self.uffd() {
            let _ = uffd.unregister(hva as *mut libc::c_void, slot.size as usize);
        }
        let zapped = madvise(hva, slot.size, libc::MADV_DONTNEED, "MADV_DONTNEED");
        drop(exclusive);
        if r.is_ok() {
            self.lock_ids().push(slot.id);
        }
        self.counters.changes.fetch_add(1, Ordering::Relaxed);
        drop(locked);
        r.and(zapped)
    }

    /// Discard the guest RAM in `[gpa, gpa+len)` (page aligned; it may
    /// span memslots and holes, which are skipped): the pages are zapped
    /// and refault as zero, never as their old or image content (I3). The
    /// guest may use them again at any time (free page reporting, the
    /// stress command). On hugetlb, whole huge pages are dropped and the
    /// pieces of partly covered ones are zeroed in place (they stay
    /// resident). Returns the bytes of RAM the range covered.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<u64, MemError> {
        self.each_piece(gpa, len, |slot, at, stop| {
            self.drop_pages(slot, at, stop, false)
        })
    }

    /// A balloon inflate of `[gpa, gpa+len)` (as [`discard`](Self::discard)
    /// takes it): a discard whose pages stay the host's until
    /// [`deflate`](Self::deflate). On hugetlb a partly inflated huge page is
    /// zeroed piecewise and recorded, and dropped when its last 4 KiB frame
    /// comes in.
    pub fn inflate(&self, gpa: u64, len: u64) -> Result<u64, MemError> {
        self.each_piece(gpa, len, |slot, at, stop| {
            self.drop_pages(slot, at, stop, true)
        })
    }

    /// A balloon deflate: the guest has `[gpa, gpa+len)` back (the pages
    /// refault on touch). On hugetlb the frames leave the partial records,
    /// so they are never dropped with their neighbours later. Returns the
    /// bytes of RAM the range covered.
    pub fn deflate(&self, gpa: u64, len: u64) -> Result<u64, MemError> {
        self.each_piece(gpa, len, |slot, at, stop| {
            for (huge, a, b) in huge_pieces(slot, at, stop) {
                let first = (a - huge_base(slot, huge)) / PAGE_SIZE;
                slot.backing
                    .partial
                    .deflate(huge, first, (b - a) / PAGE_SIZE);
            }
            Ok(())
        })
    }

    /// Run `f` on the part of `[gpa, gpa+len)` in each memslot (the range
    /// page aligned; holes skipped); returns the bytes of RAM covered. An
    /// error stops at that piece (the pieces before it are done).
    fn each_piece(
        &self,
        gpa: u64,
        len: u64,
        mut f: impl FnMut(&Slot, u64, u64) -> Result<(), MemError>,
    ) -> Result<u64, MemError> {
        page_range(gpa, len)?;
        let mut covered = 0;
        for (slot, at, stop) in self.pieces(gpa, len) {
            f(&slot, at, stop)?;
            covered += stop - at;
        }
        Ok(covered)
    }

    /// 4 KiB frames of partly inflated huge pages still resident.
    pub fn partial_huge_frames(&self) -> u64 {
        self.snapshot()
            .slots
            .iter()
            .map(|s| s.backing.partial.frames())
            .sum()
    }

    /// Drop the pages of `[gpa, end)`, inside `slot`.
    fn drop_pages(&self, slot: &Slot, gpa: u64, end: u64, inflate: bool) -> Result<(), MemError> {
        let (len, count) = (end - gpa, (end - gpa) / PAGE_SIZE);
        let r = match slot.backing.huge_page() {
            None => zap(slot, gpa, len),
            Some(size) => huge_pieces(slot, gpa, end).try_for_each(|(huge, at, stop)| {
                let base = huge_base(slot, huge);
                let frames = (stop - at) / PAGE_SIZE;
                let whole = if inflate {
                    let first = (at - base) / PAGE_SIZE;
                    slot.backing.partial.inflate(huge, first, frames)
                } else {
                    frames * PAGE_SIZE == size
                };
                if whole {
                    if !inflate {
                        // The guest may reuse it: no record may drop it later.
                        slot.backing.partial.forget(huge);
                    }
                    return zap(slot, base, size);
                }
                let exclusive = slot.begin_discard(slot.page_index(at), frames);
                zero_if_resident(slot.backing.hva() + (at - slot.gpa), stop - at);
                slot.backing.mark_changed(at - slot.gpa, stop - at);
                drop(exclusive);
                Ok(())
            }),
        };
        self.counters
            .discarded_pages
            .fetch_add(count, Ordering::Relaxed);
        r
    }

    /// Plug the blocks covering `[gpa, gpa+len)` of a block slot: their
    /// pages become installable.
    pub fn plug(&self, gpa: u64, len: u64) -> Result<(), MemError> {
        let (slot, first, count) = self.blocks_in_slot(gpa, len)?;
        slot.plug(first, count);
        Ok(())
    }

    /// Unplug the blocks covering `[gpa, gpa+len)` of a block slot: exclude
    /// installers, mark them unplugged and zap their pages (I6); a block
    /// plugged again reads zero.
    pub fn unplug(&self, gpa: u64, len: u64) -> Result<(), MemError> {
        let (slot, first, count) = self.blocks_in_slot(gpa, len)?;
        let exclusive = slot.begin_unplug(first, count);
        // Blocks are whole huge pages on hugetlb: no partial record outlives
        // its page (a stale one could drop a re-plugged page in use).
        for (huge, _, _) in huge_pieces(&slot, gpa, gpa + len) {
            slot.backing.partial.forget(huge);
        }
        let hva = slot.backing.hva() + (gpa - slot.gpa);
        let r = madvise(hva, len, libc::MADV_DONTNEED, "MADV_DONTNEED");
        slot.backing.mark_changed(gpa - slot.gpa, len);
        drop(exclusive);
        r
    }

    fn range_in_slot(&self, gpa: u64, len: u64) -> Result<(Arc<Slot>, u64, u64), MemError> {
        let end = page_range(gpa, len)?;
        let snap = self.snapshot();
        let slot = snap
            .lookup(gpa)
            .filter(|s| end <= s.end())
            .ok_or(MemError::NotInOneSlot { gpa, end })?;
        Ok((slot.clone(), slot.page_index(gpa), len / PAGE_SIZE))
    }

    fn blocks_in_slot(&self, gpa: u64, len: u64) -> Result<(Arc<Slot>, u64, u64), MemError> {
        let (slot, _, _) = self.range_in_slot(gpa, len)?;
        let end = gpa + len;
        let block = slot.block_size().ok_or(MemError::NotBlocks { gpa, end })?;
        let offset = gpa - slot.gpa;
        if !offset.is_multiple_of(block) || !len.is_multiple_of(block) {
            return Err(MemError::NotBlocks { gpa, end });
        }
        Ok((slot, offset / block, len / block))
    }

    /// Pages of guest RAM currently resident (mincore over every slot).
    pub fn resident_pages(&self) -> u64 {
        self.snapshot()
            .slots
            .iter()
            .map(|s| resident_pages(s.backing.hva(), s.size))
            .sum()
    }

    /// Pages resident in `[gpa, gpa+len)` (mincore; ranges outside RAM count
    /// nothing).
    pub fn resident_pages_in(&self, gpa: u64, len: u64) -> u64 {
        self.pieces(gpa, len)
            .iter()
            .map(|(s, a, b)| resident_pages(s.backing.hva() + (a - s.gpa), b - a))
            .sum()
    }

    /// Like [`resident_pages_in`](Self::resident_pages_in), less the
    /// inflated frames a partly inflated huge page keeps resident: for a
    /// range in the balloon, the pages the guest touched again.
    pub fn resident_touched_in(&self, gpa: u64, len: u64) -> u64 {
        self.pieces(gpa, len)
            .iter()
            .map(|(s, a, b)| {
                let hva = |g: u64| s.backing.hva() + (g - s.gpa);
                let held: u64 = huge_pieces(s, *a, *b)
                    .filter(|(_, at, stop)| resident_pages(hva(*at), stop - at) > 0)
                    .map(|(h, at, stop)| {
                        let first = (at - huge_base(s, h)) / PAGE_SIZE;
                        s.backing.partial.held(h, first, (stop - at) / PAGE_SIZE)
                    })
                    .sum();
                resident_pages(hva(*a), b - a) - held
            })
            .sum()
    }

    /// The parts of `[gpa, gpa+len)` in each slot it overlaps.
    fn pieces(&self, gpa: u64, len: u64) -> Vec<(Arc<Slot>, u64, u64)> {
        let end = gpa.saturating_add(len);
        self.snapshot()
            .slots
            .iter()
            .filter(|s| s.gpa < end && gpa < s.end())
            .map(|s| (s.clone(), gpa.max(s.gpa), end.min(s.end())))
            .collect()
    }

    /// Whether `gpa` is guest RAM now (a lock-free lookup).
    pub fn is_ram(&self, gpa: u64) -> bool {
        self.snapshot().lookup(gpa).is_some()
    }

    /// The guest-physical address of a host address inside guest RAM.
    pub fn gpa_of_hva(&self, hva: u64) -> Option<u64> {
        let snap = self.snapshot();
        let s = snap
            .slots
            .iter()
            .find(|s| hva >= s.backing.hva() && hva - s.backing.hva() < s.size)?;
        Some(s.gpa + (hva - s.backing.hva()))
    }

    /// Whether `hva` lies in a removed slot whose mapping may still exist
    /// (a stale access after a removal, never a genuine bus error).
    pub fn is_retired_hva(&self, hva: u64) -> bool {
        self.retired
            .load()
            .iter()
            .filter_map(Weak::upgrade)
            .any(|s| {
                let base = s.backing.hva();
                hva >= base && hva - base < s.size
            })
    }

    fn retire(&self, slot: &Arc<Slot>) {
        let mut v: Vec<Weak<Slot>> = self
            .retired
            .load()
            .iter()
            .filter(|w| w.strong_count() > 0)
            .cloned()
            .collect();
        v.push(Arc::downgrade(slot));
        self.retired.store(Arc::new(v));
    }

    /// Start tracking what changes in guest RAM from now on (again, if it
    /// was tracked: what changed before is forgotten): KVM logs the
    /// guest's writes on every slot (and on slots added later), the VMM's
    /// own writes and discards mark the regions' bitmaps. Called with the
    /// guest and the devices still (a snapshot, a restore).
    pub fn track_dirty(&self) -> Result<(), MemError> {
        let locked = self.slots.lock_slots();
        self.log_dirty.store(true, Ordering::Release);
        for s in &locked.snapshot().slots {
            set_region(&*self.kvm, s.id, s.gpa, s.size, s.backing.hva(), true)?;
            self.take_dirty(s)?;
        }
        Ok(())
    }

    /// How KVM keeps the dirty log, and what reading it cost so far.
    pub fn dirty_log_stats(&self) -> crate::DirtyLogStats {
        let mut s = self.kvm.dirty_log_stats();
        s.read_ns = self.counters.dirty_log_ns.load(Ordering::Relaxed);
        s
    }

    /// Whether [`track_dirty`](Self::track_dirty) is on.
    pub fn tracks_dirty(&self) -> bool {
        self.log_dirty.load(Ordering::Acquire)
    }

    /// The pages of `slot` changed since tracking began or the last call
    /// (one bit per page): the guest's writes (KVM's log) and the VMM's
    /// (the region's bitmap); both are cleared.
    pub fn take_dirty(&self, slot: &Slot) -> Result<Vec<u64>, MemError> {
        let t = std::time::Instant::now();
        let bits = self.kvm.dirty_log(slot.id, slot.size);
        self.counters
            .dirty_log_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        let mut bits = bits.map_err(|source| MemError::DirtyLog {
            slot: slot.id,
            gpa: slot.gpa,
            source,
        })?;
        bits.resize(slot.size.div_ceil(PAGE_SIZE * 64) as usize, 0);
        for (w, vmm) in bits
            .iter_mut()
            .zip(slot.backing.region.bitmap().get_and_reset())
        {
            *w |= vmm;
        }
        Ok(bits)
    }

    /// Counters, the generation and the number of slots.
    /// Every value of [`MEMORY_METRICS`] now (resident pages by mincore).
    pub fn stats(&self) -> MemoryStats {
        let snap = self.snapshot();
        let mut values = [0; MemStat::COUNT];
        for (i, row) in MemStat::ALL.iter().enumerate() {
            values[i] = match row {
                MemStat::Generation => snap.generation,
                MemStat::Changes => self.counters.changes.load(Ordering::Relaxed),
                MemStat::ResidentPages => self.resident_pages(),
                MemStat::DiscardedPages => self.counters.discarded_pages.load(Ordering::Relaxed),
                MemStat::Memslots => snap.slots.len() as u64,
            };
        }
        MemoryStats { values }
    }

    fn publish_view(&self, slots: &[Arc<Slot>]) {
        // The regions are already mapped and sorted: this cannot fail.
        match view_of(slots) {
            Ok(v) => self
                .view
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .replace(v),
            Err(e) => log::error!("guest-memory view not updated: {e}"),
        }
    }

    fn lock_ids(&self) -> std::sync::MutexGuard<'_, Vec<u32>> {
        self.free_ids.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Map `size` bytes for guest address `gpa`, not populated: anonymous
/// (`MAP_NORESERVE`), a private mapping of the source file at
/// `source_offset`, or hugetlb (its pages reserved now; `at_boot`: before
/// the seccomp filters, so the pool may be raised again on a race).
fn map(
    gpa: u64,
    size: u64,
    source: PageSource,
    source_offset: u64,
    mapping: Mapping,
    at_boot: bool,
) -> Result<SlotBacking, MemError> {
    page_range(gpa, size)?;
    let prot = libc::PROT_READ | libc::PROT_WRITE;
    let host = match &source {
        PageSource::File(img) if mapping == Mapping::PrivateFile => {
            let file = img.file.try_clone().map_err(|e| MemError::Mmap {
                gpa,
                size,
                source: vm_memory::mmap::MmapRegionError::Mmap(e),
            })?;
            MmapRegion::<AtomicBitmap>::build(
                Some(vm_memory::FileOffset::new(file, source_offset)),
                size as usize,
                prot,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
            )
        }
        _ if mapping == Mapping::HugeTlb => map_hugetlb(size, prot, at_boot),
        _ => MmapRegion::<AtomicBitmap>::build(
            None,
            size as usize,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        ),
    }
    .map_err(|source| MemError::Mmap { gpa, size, source })?;
    let region = GuestRegionMmap::new(host, GuestAddress(gpa)).ok_or(MemError::Unaligned {
        gpa,
        end: gpa.wrapping_add(size),
    })?;
    Ok(SlotBacking {
        region: Arc::new(region),
        source,
        source_offset,
        huge: mapping == Mapping::HugeTlb,
        partial: PartialHugePages::default(),
    })
}

/// Discard `[gpa, gpa+len)` of `slot`: mark it discarded and drop its pages
/// with no installer inside the slot (I3).
fn zap(slot: &Slot, gpa: u64, len: u64) -> Result<(), MemError> {
    let exclusive = slot.begin_discard(slot.page_index(gpa), len / PAGE_SIZE);
    let hva = slot.backing.hva() + (gpa - slot.gpa);
    let r = madvise(hva, len, libc::MADV_DONTNEED, "MADV_DONTNEED");
    slot.backing.mark_changed(gpa - slot.gpa, len);
    drop(exclusive);
    r
}

/// The huge pages of a hugetlb slot that `[gpa, end)` touches, as
/// `(index in the slot, piece start, piece end)`; nothing on other slots.
fn huge_pieces(slot: &Slot, gpa: u64, end: u64) -> impl Iterator<Item = (u64, u64, u64)> + '_ {
    let size = slot.backing.huge_page();
    let mut at = gpa;
    std::iter::from_fn(move || {
        let size = size?;
        if at >= end {
            return None;
        }
        let huge = (at - slot.gpa) / size;
        let stop = end.min(slot.gpa + (huge + 1) * size);
        let piece = (huge, at, stop);
        at = stop;
        Some(piece)
    })
}

fn huge_base(slot: &Slot, huge: u64) -> u64 {
    slot.gpa + huge * super::hugetlb::HUGE_PAGE
}

/// Zero `[hva, hva+len)` of a hugetlb page if the page is present. Called
/// with the slot's install lock held exclusively: no install can race, and
/// a missing page is left alone (writing would fault it in through the
/// very lock held here; it installs as zeros later anyway).
fn zero_if_resident(hva: u64, len: u64) {
    if resident_pages(hva, len) == len / PAGE_SIZE {
        // SAFETY: the range lies inside a live slot mapping, its huge page
        // is present (mincore) and cannot be dropped while the exclusive
        // guard is held; the guest has given these frames up.
        unsafe { std::ptr::write_bytes(hva as *mut u8, 0, len as usize) };
    }
}

/// A hugetlb mapping, its pages reserved now. Another process (or VM) may
/// take the pages the pool was raised for between the check and the map:
/// on ENOMEM the pool is raised again and the map retried, a few times, if
/// `raise` (boot RAM, mapped before the seccomp filters, which forbid the
/// files `reserve` opens; a slot added later fails instead).
fn map_hugetlb(
    size: u64,
    prot: i32,
    raise: bool,
) -> Result<MmapRegion<AtomicBitmap>, vm_memory::mmap::MmapRegionError> {
    let huge = super::hugetlb::HUGE_PAGE;
    let mut tries = 0;
    loop {
        let r = MmapRegion::<AtomicBitmap>::build(
            None,
            size as usize,
            prot,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | libc::MAP_HUGE_2MB,
        );
        match r {
            Err(vm_memory::mmap::MmapRegionError::Mmap(e))
                if raise && e.raw_os_error() == Some(libc::ENOMEM) && tries < 4 =>
            {
                tries += 1;
                if super::hugetlb::reserve(size.div_ceil(huge)).is_err() {
                    return Err(vm_memory::mmap::MmapRegionError::Mmap(e));
                }
            }
            r => return r,
        }
    }
}

fn view_of(slots: &[Arc<Slot>]) -> Result<GuestMemory, MemError> {
    GuestMemory::from_arc_regions(slots.iter().map(|s| s.backing.region.clone()).collect())
        .map_err(MemError::Layout)
}

/// Check that `[gpa, gpa+len)` is a non-empty page-aligned range; its end.
fn page_range(gpa: u64, len: u64) -> Result<u64, MemError> {
    let end = gpa.checked_add(len);
    match end {
        Some(end) if len > 0 && gpa.is_multiple_of(PAGE_SIZE) && len.is_multiple_of(PAGE_SIZE) => {
            Ok(end)
        }
        _ => Err(MemError::Unaligned {
            gpa,
            end: gpa.wrapping_add(len),
        }),
    }
}

fn register(uffd: &Uffd, hva: u64, size: u64) -> Result<(), MemError> {
    uffd.register(hva as *mut libc::c_void, size as usize)
        .map(|_| ())
        .map_err(|source| MemError::Uffd {
            what: "UFFDIO_REGISTER",
            source,
        })
}

fn set_region(
    kvm: &dyn KvmSlots,
    slot: u32,
    gpa: u64,
    size: u64,
    hva: u64,
    log_dirty: bool,
) -> Result<(), MemError> {
    kvm.set_region(slot, gpa, size, hva, log_dirty)
        .map_err(|source| MemError::Kvm {
            slot,
            gpa,
            size,
            source,
        })
}

fn madvise(hva: u64, len: u64, advice: libc::c_int, what: &'static str) -> Result<(), MemError> {
    // SAFETY: the range lies inside a mapping owned by a live slot backing;
    // the advice only drops or populates anonymous pages.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoKvm;
    use vm_memory::{Bytes, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;

    /// RAM ranges from `(gpa, size)` pairs.
    fn ram(list: &[(u64, u64)]) -> Vec<RamRange> {
        list.iter()
            .map(|&(gpa, size)| RamRange { gpa, size })
            .collect()
    }

    fn manager() -> MemoryManager {
        let ranges = ram(&[(0, 4 * MIB), (8 * MIB, 4 * MIB)]);
        MemoryManager::new(Arc::new(NoKvm), &ranges, PageSource::Zero, 32).unwrap()
    }

    #[test]
    fn view_follows_hotplug_and_unplug() {
        let m = manager();
        assert_eq!(m.memory().num_regions(), 2);
        assert_eq!(m.boot_size(), 8 * MIB);
        let gpa = 64 * MIB;
        m.add_slot(NewSlot {
            gpa,
            size: 2 * MIB,
            source: PageSource::Zero,
            source_offset: 0,
            block_size: None,
        })
        .unwrap();
        let held = m.memory();
        assert_eq!(held.num_regions(), 3);
        held.write_obj(0xabcd_u64, GuestAddress(gpa + 8)).unwrap();
        assert_eq!(m.stats()[MemStat::Generation], 1);
        m.remove_slot(gpa).unwrap();
        // A new view never shows the removed region; the old snapshot still
        // maps it (no use after unmap).
        assert_eq!(m.memory().num_regions(), 2);
        assert!(m.memory().read_obj::<u64>(GuestAddress(gpa)).is_err());
        assert!(held.read_obj::<u64>(GuestAddress(gpa + 8)).is_ok());
        assert_eq!(m.stats()[MemStat::Changes], 2);
        assert_eq!(m.stats()[MemStat::Generation], 2);
        assert!(!m.is_ram(gpa));
    }

    #[test]
    fn bad_ranges_are_errors() {
        let m = manager();
        let slot = |gpa, size| NewSlot {
            gpa,
            size,
            source: PageSource::Zero,
            source_offset: 0,
            block_size: None,
        };
        assert!(matches!(
            m.add_slot(slot(0x1000, MIB)),
            Err(MemError::Overlap { .. })
        ));
        assert!(matches!(
            m.add_slot(slot(0x10_0001, MIB)),
            Err(MemError::Unaligned { .. })
        ));
        assert!(matches!(
            m.add_slot(slot(u64::MAX - 0xfff, 0x2000)),
            Err(MemError::Unaligned { .. })
        ));
        assert!(matches!(
            m.remove_slot(0x1000),
            Err(MemError::NoSuchSlot(_))
        ));
        assert!(matches!(
            m.discard(3 * MIB + 1, 2 * MIB),
            Err(MemError::Unaligned { .. })
        ));
        // A range across a hole and two slots: the RAM in it (1 + 2 MiB).
        assert_eq!(m.discard(3 * MIB, 7 * MIB).unwrap(), 3 * MIB);
        assert_eq!(m.discard(5 * MIB, 2 * MIB).unwrap(), 0, "all hole");
        assert!(matches!(
            m.plug(0, 2 * MIB),
            Err(MemError::NotBlocks { .. })
        ));
    }

    #[test]
    fn discard_zeroes_and_counts() {
        let m = manager();
        m.memory().write_obj(7u64, GuestAddress(0x3000)).unwrap();
        assert!(m.resident_pages() >= 1);
        m.discard(0x3000, 0x1000).unwrap();
        assert_eq!(m.memory().read_obj::<u64>(GuestAddress(0x3000)).unwrap(), 0);
        assert_eq!(m.stats()[MemStat::DiscardedPages], 1);
        assert!(m.snapshot().lookup(0x3000).unwrap().is_discarded(3));
    }

    #[test]
    fn unplug_zaps_blocks_and_replug_reads_zero() {
        let m = manager();
        let gpa = 128 * MIB;
        m.add_slot(NewSlot {
            gpa,
            size: 8 * MIB,
            source: PageSource::Zero,
            source_offset: 0,
            block_size: Some(2 * MIB),
        })
        .unwrap();
        assert!(matches!(
            m.plug(gpa + MIB, 2 * MIB),
            Err(MemError::NotBlocks { .. })
        ));
        m.plug(gpa + 2 * MIB, 4 * MIB).unwrap();
        let s = m.snapshot().lookup(gpa).unwrap().clone();
        assert_eq!(s.plugged_blocks(), 2);
        m.memory()
            .write_obj(9u64, GuestAddress(gpa + 2 * MIB))
            .unwrap();
        m.unplug(gpa + 2 * MIB, 2 * MIB).unwrap();
        assert_eq!(s.plugged_blocks(), 1);
        assert!(!s.is_plugged(s.page_index(gpa + 2 * MIB)));
        m.plug(gpa + 2 * MIB, 2 * MIB).unwrap();
        assert_eq!(
            m.memory()
                .read_obj::<u64>(GuestAddress(gpa + 2 * MIB))
                .unwrap(),
            0
        );
    }

    fn fill(m: &MemoryManager, gpa: u64, len: u64, byte: u8) {
        m.memory()
            .write_slice(&vec![byte; len as usize], GuestAddress(gpa))
            .unwrap();
    }

    /// Bytes of `[gpa, gpa+len)` that are not `byte`.
    fn not(m: &MemoryManager, gpa: u64, len: u64, byte: u8) -> usize {
        let mut buf = vec![0u8; len as usize];
        m.memory().read_slice(&mut buf, GuestAddress(gpa)).unwrap();
        buf.iter().filter(|b| **b != byte).count()
    }

    /// A balloon on hugetlb RAM: a partly inflated huge page is zeroed
    /// piecewise and stays resident; a deflated frame keeps the page (and
    /// the guest's write to it) when the rest comes in; the last frame in
    /// drops the page; a report zeroes without recording; an unplug drops
    /// the records of its blocks. Needs the host's hugetlb pool (root).
    #[test]
    fn partial_huge_pages_are_recorded_until_whole() {
        let ranges = ram(&[(0, 8 * MIB)]);
        let m = MemoryManager::new_hugetlb(Arc::new(NoKvm), &ranges, 4 * MIB, 32).unwrap();
        let h = 2 * MIB;
        fill(&m, h, 2 * MIB, 0xa5);
        assert_eq!(m.resident_pages_in(h, 2 * MIB), 512);

        m.inflate(h, MIB).unwrap();
        assert_eq!(not(&m, h, MIB, 0), 0, "inflated frames read zero");
        assert_eq!(not(&m, h + MIB, MIB, 0xa5), 0, "the rest is kept");
        assert_eq!(m.resident_pages_in(h, 2 * MIB), 512);
        assert_eq!(m.partial_huge_frames(), 256);

        // The guest gets frame 1 back and writes it.
        m.deflate(h + 4096, 4096).unwrap();
        fill(&m, h + 4096, 4096, 0x55);
        assert_eq!(m.partial_huge_frames(), 255);
        m.inflate(h + MIB, MIB).unwrap();
        assert_eq!(m.partial_huge_frames(), 511);
        assert_eq!(m.resident_pages_in(h, 2 * MIB), 512, "frame 1 is in use");
        assert_eq!(
            m.resident_touched_in(h, 2 * MIB),
            1,
            "only frame 1 was touched"
        );
        assert_eq!(
            not(&m, h + 4096, 4096, 0x55),
            0,
            "a deflated frame's write is kept"
        );
        m.inflate(h + 4096, 4096).unwrap();
        assert_eq!(m.partial_huge_frames(), 0);
        assert_eq!(
            m.resident_pages_in(h, 2 * MIB),
            0,
            "the whole page went back"
        );
        assert_eq!(not(&m, h, 2 * MIB, 0), 0);

        // Free page reporting: zeroed, not recorded; whole pages dropped.
        fill(&m, 4 * MIB, 4 * MIB, 0x77);
        m.discard(4 * MIB, MIB).unwrap();
        assert_eq!(m.partial_huge_frames(), 0);
        assert_eq!(not(&m, 4 * MIB, MIB, 0), 0);
        assert_eq!(not(&m, 5 * MIB, MIB, 0x77), 0);
        m.discard(5 * MIB, 3 * MIB).unwrap();
        assert_eq!(m.resident_pages_in(4 * MIB, 4 * MIB), 512);
        assert_eq!(not(&m, 4 * MIB, 4 * MIB, 0), 0);

        // Hotplugged slots are hugetlb too: whole huge pages and blocks.
        let slot = |gpa, size, block| NewSlot {
            gpa,
            size,
            source: PageSource::Zero,
            source_offset: 0,
            block_size: Some(block),
        };
        let g = 64 * MIB;
        assert!(matches!(
            m.add_slot(slot(g, 4 * MIB, MIB)),
            Err(MemError::NotBlocks { .. })
        ));
        assert!(matches!(
            m.add_slot(slot(g + MIB, 4 * MIB, 2 * MIB)),
            Err(MemError::Unaligned { .. })
        ));
        m.add_slot(slot(g, 4 * MIB, 2 * MIB)).unwrap();
        m.plug(g, 4 * MIB).unwrap();
        fill(&m, g, 4 * MIB, 0x33);
        m.inflate(g + 2 * MIB, 4096).unwrap();
        assert_eq!(m.partial_huge_frames(), 1);
        m.unplug(g + 2 * MIB, 2 * MIB).unwrap();
        assert_eq!(m.partial_huge_frames(), 0, "an unplug drops its records");
        assert_eq!(m.resident_pages_in(g, 4 * MIB), 512);
        m.plug(g + 2 * MIB, 2 * MIB).unwrap();
        assert_eq!(not(&m, g + 2 * MIB, 2 * MIB, 0), 0, "re-plugged reads zero");
        assert_eq!(not(&m, g, 2 * MIB, 0x33), 0);
    }

    /// The kernel mode's image mapping: each range shows the file at its
    /// running offset, a write stays private (the file is unchanged), and a
    /// discard brings the file's content back.
    #[test]
    fn file_mapping_is_private_and_follows_the_ranges() {
        let path = std::env::temp_dir().join(format!("vmm-filemap-{}", std::process::id()));
        let bytes: Vec<u8> = (0..12 * MIB)
            .map(|i| (i / 4096) as u8 ^ (i as u8))
            .collect();
        std::fs::write(&path, &bytes).unwrap();
        let ranges = ram(&[(0, 4 * MIB), (8 * MIB, 8 * MIB)]);
        let img = ImageFile::open(&path, 12 * MIB).unwrap();
        let m = MemoryManager::new_file_mapped(Arc::new(NoKvm), &ranges, img, 8).unwrap();
        let at = |gpa: u64| m.memory().read_obj::<u64>(GuestAddress(gpa)).unwrap();
        let file = |off: usize| u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap());
        assert_eq!(at(4096), file(4096));
        // The second range continues the file where the first ended.
        assert_eq!(at(8 * MIB + 3 * 4096), file(4 * MIB as usize + 3 * 4096));
        m.memory().write_obj(!0u64, GuestAddress(4096)).unwrap();
        assert_eq!(at(4096), !0);
        assert_eq!(
            std::fs::read(&path).unwrap()[4096],
            bytes[4096],
            "written through"
        );
        m.discard(0, 2 * MIB).unwrap();
        assert_eq!(at(4096), file(4096));
        let _ = std::fs::remove_file(&path);
    }
}
