//! Guest RAM in a snapshot: which slots there were, where each one's pages
//! are in the memory file, and which pages hold anything.
//!
//! Saving writes a page if it is resident, or if it is still its source's
//! (an image or an earlier snapshot: a file-backed page never touched is
//! not a zero page); every other page — never touched, discarded (balloon,
//! free page reporting), in an unplugged block — stays a hole. Restoring
//! maps the slots over the file and marks the holes discarded: they refault
//! as zero without a read, and a fault-around window stops at them (so
//! resident memory does not grow past what the guest touches).

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::manager::Mapping;
use crate::{
    ImageFile, KvmSlots, MemError, MemoryManager, NewSlot, PageSource, RamRange, PAGE_SIZE,
};

/// How a slot came to be; a restore brings it back the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SlotKind {
    /// Boot RAM.
    Boot,
    /// A virtio-mem slice of `block_size` blocks.
    Blocks { block_size: u64 },
    /// A slot added at run time (no blocks).
    Plain,
}

/// One slot in the memory file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotImage {
    pub gpa: u64,
    pub size: u64,
    /// Where the slot's first byte is in the memory file.
    pub offset: u64,
    pub kind: SlotKind,
    /// One bit per page: set where the file has the page's content; clear
    /// for a hole (the page is zero).
    pub data: Vec<u64>,
    /// For `Blocks`: one bit per block, set where plugged.
    pub plugged: Vec<u64>,
    /// Data pages that look like x86 page tables ([`looks_like_page_table`]):
    /// a restore served on the vCPU thread installs them before the guest
    /// runs (a PVM host's page walker cannot wait for a missing one).
    pub tables: Vec<u64>,
    /// Data pages a user-mode page-table entry points at (the same
    /// heuristic): on a PVM host a guest's user-mode touch of a missing
    /// page never reaches the VMM in SIGBUS mode, so a restore served on the
    /// vCPU thread installs them first.
    pub user: Vec<u64>,
}

impl SlotImage {
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    pub fn has_data(&self, page: u64) -> bool {
        bit(&self.data, page)
    }

    /// The runs of pages with content, `(first page, pages)` in order, each
    /// at most `max` pages (a whole word of the bitmap at a time).
    pub fn data_runs(&self, max: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        let mut p = 0;
        std::iter::from_fn(move || {
            p = run_end(&self.data, p, false, self.pages());
            if p >= self.pages() {
                return None;
            }
            let end = run_end(&self.data, p, true, self.pages()).min(p.saturating_add(max));
            let run = (p, end - p);
            p = end;
            Some(run)
        })
    }

    /// Pages with content.
    pub fn data_pages(&self) -> u64 {
        self.data.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// GPAs of the pages that look like page tables.
    pub fn table_pages(&self) -> Vec<u64> {
        self.tables
            .iter()
            .filter(|&&p| p < self.pages())
            .map(|&p| self.gpa + p * PAGE_SIZE)
            .collect()
    }

    /// GPAs of the pages user-mode entries point at.
    pub fn user_pages(&self) -> Vec<u64> {
        self.user
            .iter()
            .filter(|&&p| p < self.pages())
            .map(|&p| self.gpa + p * PAGE_SIZE)
            .collect()
    }
}

/// The pages the present user-accessible entries of a page table point at
/// (U/S set): where a guest's user mode may touch memory with no kernel
/// access before it.
pub fn user_targets(page: &[u8], out: &mut Vec<u64>) {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    for e in page.chunks_exact(8) {
        let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
        if e & 0b101 == 0b101 {
            out.push(e & ADDR);
        }
    }
}

/// Whether `page` (4 KiB) could be an x86-64 page table of a guest whose
/// physical addresses end below `phys_top`: at least one present entry,
/// and every present entry's address below `phys_top`. Generous on
/// purpose: a data page taken for a table is only read early; a table
/// missed is a page the guest's page walk finds missing.
pub fn looks_like_page_table(page: &[u8], phys_top: u64) -> bool {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    let mut present = false;
    for e in page.chunks_exact(8) {
        let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
        if e & 1 == 0 {
            continue;
        }
        if e & ADDR >= phys_top {
            return false;
        }
        present = true;
    }
    present
}

/// Page tables may map MMIO up to 4 GiB (the I/O window, the LAPIC and
/// IOAPIC) whatever the RAM.
const MMIO_TOP: u64 = 1 << 32;

/// The top of guest-physical memory a page table may point below: RAM's
/// end, or the MMIO window's.
pub(crate) fn phys_top(slots: &[std::sync::Arc<crate::Slot>]) -> u64 {
    slots
        .iter()
        .map(|s| s.gpa + s.size)
        .max()
        .unwrap_or(0)
        .max(MMIO_TOP)
}

/// The first page from `from` (at most `end`) whose bit is not `set`:
/// where a run of data pages (`set`) or of holes ends. Whole words at a
/// time (a 4 GiB layout has a million pages).
fn run_end(words: &[u64], from: u64, set: bool, end: u64) -> u64 {
    let mut i = from;
    while i < end {
        let w = words.get((i / 64) as usize).copied().unwrap_or(0);
        let w = if set { !w } else { w } >> (i % 64);
        if w != 0 {
            return (i + u64::from(w.trailing_zeros())).min(end);
        }
        i = (i / 64 + 1) * 64;
    }
    end
}

pub(crate) fn bit(words: &[u64], i: u64) -> bool {
    words
        .get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

pub(crate) fn set_bit(words: &mut [u64], i: u64) {
    if let Some(w) = words.get_mut((i / 64) as usize) {
        *w |= 1 << (i % 64);
    }
}

#[derive(Debug, Error)]
pub enum SaveError<E: std::error::Error + 'static> {
    #[error("guest RAM on hugetlb pages cannot be saved yet (restart without --mem-hugepages)")]
    HugePages,
    #[error("the pages changed since the last snapshot are not tracked (a diff snapshot or a migration needs them)")]
    NotTracked,
    #[error("reading what changed: {0}")]
    Dirty(MemError),
    #[error("reading the source of GPA {gpa:#x}: {source}")]
    Source {
        gpa: u64,
        source: crate::SourceError,
    },
    #[error(transparent)]
    Write(E),
}

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error("memory layout: {0}")]
    Layout(String),
    #[error(transparent)]
    Memory(#[from] MemError),
}

/// How a restored VM's RAM is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreMapping {
    /// Anonymous memory, filled from the file on first touch (the fault
    /// engine's page source) or all at once before the guest runs.
    Lazy,
    /// A `MAP_PRIVATE` mapping of the file: the host's page cache serves
    /// first touches (Firecracker's default restore; boot RAM only).
    Private,
}

/// Largest run of pages written at once.
const RUN: u64 = 256;

/// Where saved pages go: `(file offset, bytes)`, front to back.
pub type PageSink<'a, E> = dyn FnMut(u64, &[u8]) -> Result<(), E> + 'a;

/// A diff snapshot's memory beyond its layout: for each slot of the
/// layout, in order, one bit per page, set where the page is its base's
/// (unchanged since the base was taken). A page is then data (in the
/// diff's file), the base's, or a hole.
pub type BasePages = Vec<Vec<u64>>;

/// One slot's pages being saved (into a snapshot, or a migration's
/// stream).
pub(crate) struct SlotSaver<'s> {
    pub(crate) slot: &'s crate::Slot,
    /// Where the slot starts in the file.
    pub(crate) offset: u64,
    /// Residency (mincore) of the slot's pages from page `from` on.
    pub(crate) resident: Vec<u8>,
    pub(crate) from: u64,
    pub(crate) phys_top: u64,
    /// A diff: the pages changed since the base (the others are the
    /// base's and are not written).
    pub(crate) changed: Option<Vec<u64>>,
}

impl SlotSaver<'_> {
    fn resident(&self, p: u64) -> bool {
        p.checked_sub(self.from)
            .and_then(|i| self.resident.get(i as usize))
            .is_some_and(|r| r & 1 != 0)
    }

    /// Whether page `p` is saved: changed since the base (a diff), and
    /// resident or still its file source's.
    pub(crate) fn keep(&self, p: u64) -> bool {
        if self.changed.as_ref().is_some_and(|c| !bit(c, p)) {
            return false;
        }
        self.resident(p)
            || (matches!(self.slot.backing.source(), PageSource::File(_))
                && !self.slot.is_discarded(p))
    }

    /// A diff's pages that are the base's: every page not changed.
    fn base_pages(&self) -> Option<Vec<u64>> {
        let pages = self.slot.size / PAGE_SIZE;
        self.changed.as_ref().map(|c| {
            let mut words: Vec<u64> = c.iter().map(|w| !w).collect();
            words.resize(pages.div_ceil(64) as usize, u64::MAX);
            if !pages.is_multiple_of(64) {
                if let Some(last) = words.last_mut() {
                    *last &= (1u64 << (pages % 64)) - 1;
                }
            }
            words
        })
    }

    /// Whether page `p` (kept) looks like a page table; if so its content
    /// is in `page`. A resident page is looked at in place (post-copy's
    /// stop looks at every page and copies only the tables).
    pub(crate) fn is_table<E: std::error::Error + 'static>(
        &self,
        p: u64,
        page: &mut [u8],
        phys_top: u64,
    ) -> Result<bool, SaveError<E>> {
        if self.resident(p) {
            // SAFETY: as in `read`: a resident page of the slot's mapping.
            let src = unsafe {
                std::slice::from_raw_parts(
                    (self.slot.backing.hva() + p * PAGE_SIZE) as *const u8,
                    PAGE_SIZE as usize,
                )
            };
            if !looks_like_page_table(src, phys_top) {
                return Ok(false);
            }
        }
        self.read(p, page)?;
        Ok(looks_like_page_table(page, phys_top))
    }

    /// Page `p`'s content into `page`.
    pub(crate) fn read<E: std::error::Error + 'static>(
        &self,
        p: u64,
        page: &mut [u8],
    ) -> Result<(), SaveError<E>> {
        let at = p * PAGE_SIZE;
        if self.resident(p) {
            // SAFETY: a resident page of the slot's mapping, which lives
            // while the table holds the slot; a read of a present page
            // does not fault.
            let src = unsafe {
                std::slice::from_raw_parts(
                    (self.slot.backing.hva() + at) as *const u8,
                    PAGE_SIZE as usize,
                )
            };
            page.copy_from_slice(src);
        } else if let PageSource::File(img) = self.slot.backing.source() {
            img.read_page(self.slot.backing.source_offset() + at, page)
                .map_err(|source| SaveError::Source {
                    gpa: self.slot.gpa + at,
                    source,
                })?;
        }
        Ok(())
    }

    /// Write the slot's pages in runs; its image (without `kind`).
    fn save<E: std::error::Error + 'static>(
        &self,
        buf: &mut [u8],
        user: &mut Vec<u64>,
        out: &mut PageSink<'_, E>,
    ) -> Result<SlotImage, SaveError<E>> {
        let slot = self.slot;
        let pages = slot.size / PAGE_SIZE;
        let mut data = vec![0u64; pages.div_ceil(64) as usize];
        let mut tables = Vec::new();
        let mut p = 0;
        while p < pages {
            if !self.keep(p) {
                p += 1;
                continue;
            }
            let mut n = 1;
            while p + n < pages && n < RUN && self.keep(p + n) {
                n += 1;
            }
            let bytes = &mut buf[..(n * PAGE_SIZE) as usize];
            for (i, page) in (p..p + n).zip(bytes.chunks_mut(PAGE_SIZE as usize)) {
                self.read(i, page)?;
                set_bit(&mut data, i);
                if looks_like_page_table(page, self.phys_top) {
                    tables.push(i);
                    user_targets(page, user);
                }
            }
            out(self.offset + p * PAGE_SIZE, bytes).map_err(SaveError::Write)?;
            p += n;
        }
        let plugged = plugged_blocks(slot);
        Ok(SlotImage {
            gpa: slot.gpa,
            size: slot.size,
            offset: self.offset,
            kind: SlotKind::Plain,
            data,
            plugged,
            tables,
            user: Vec::new(),
        })
    }
}

impl MemoryManager {
    /// Write every page that holds something into `out(file offset,
    /// bytes)`, front to back; the layout. The caller keeps the guest and
    /// the devices still (and memslots do not change: the slots lock is
    /// held here).
    pub fn save_pages<E: std::error::Error + 'static>(
        &self,
        out: &mut PageSink<'_, E>,
    ) -> Result<Vec<SlotImage>, SaveError<E>> {
        Ok(self.save_memory(out, None)?.0)
    }

    /// A diff on a snapshot whose RAM was `base`, taken when tracking
    /// began or at the last diff (what changed since is cleared here):
    /// only the pages changed since are written; the layout and which
    /// pages are the base's. Otherwise as [`Self::save_pages`].
    pub fn save_diff<E: std::error::Error + 'static>(
        &self,
        out: &mut PageSink<'_, E>,
        base: &[RamRange],
    ) -> Result<(Vec<SlotImage>, BasePages), SaveError<E>> {
        if !self.tracks_dirty() {
            return Err(SaveError::NotTracked);
        }
        let (layout, pages) = self.save_memory(out, Some(base))?;
        Ok((layout, pages.unwrap_or_default()))
    }

    fn save_memory<E: std::error::Error + 'static>(
        &self,
        out: &mut PageSink<'_, E>,
        base: Option<&[RamRange]>,
    ) -> Result<(Vec<SlotImage>, Option<BasePages>), SaveError<E>> {
        if self.has_hugetlb() {
            return Err(SaveError::HugePages);
        }
        let locked = self.slots().lock_slots();
        let snap = locked.snapshot();
        let phys_top = phys_top(&snap.slots);
        let mut offset = 0;
        let mut images = Vec::with_capacity(snap.slots.len());
        let mut buf = vec![0u8; (RUN * PAGE_SIZE) as usize];
        let mut user = Vec::new();
        let mut base_pages = Vec::new();
        for slot in &snap.slots {
            let changed = match base {
                None => None,
                Some(base) => {
                    let mut c = self.take_dirty(slot).map_err(SaveError::Dirty)?;
                    // A slot the base did not have is all new (a slot
                    // added while tracking is marked so; this is the
                    // check that it cannot be taken for the base's).
                    if !base
                        .iter()
                        .any(|r| r.gpa <= slot.gpa && slot.end() <= r.end())
                    {
                        c.fill(u64::MAX);
                    }
                    Some(c)
                }
            };
            let saver = SlotSaver {
                slot,
                offset,
                resident: residency(slot.backing.hva(), slot.size),
                from: 0,
                phys_top,
                changed,
            };
            base_pages.extend(saver.base_pages());
            let mut image = saver.save(&mut buf, &mut user, out)?;
            image.kind = self.kind_of(slot);
            images.push(image);
            offset += slot.size;
        }
        mark_user_pages(&mut images, user);
        Ok((images, base.map(|_| base_pages)))
    }

    /// Guest RAM as `layout` says, over `image` (the memory file): boot RAM
    /// first (it must come first in the file, as [`Self::save_pages`] puts
    /// it), then the other slots, plugged blocks plugged, holes marked
    /// discarded. Registered with KVM; not with userfaultfd yet.
    pub fn restore(
        kvm: Arc<dyn KvmSlots>,
        layout: &[SlotImage],
        image: Arc<ImageFile>,
        mapping: RestoreMapping,
        max_slots: usize,
    ) -> Result<Self, RestoreError> {
        check_layout(layout, image.len)?;
        let boot: Vec<RamRange> = layout
            .iter()
            .filter(|s| s.kind == SlotKind::Boot)
            .map(|s| RamRange {
                gpa: s.gpa,
                size: s.size,
            })
            .collect();
        let m = match mapping {
            RestoreMapping::Lazy => Self::build(
                kvm,
                &boot,
                PageSource::File(image.clone()),
                max_slots,
                Mapping::Anonymous,
            )?,
            RestoreMapping::Private => {
                if image.is_layered() {
                    return Err(RestoreError::Layout(
                        "a file mapping maps one file: a diff snapshot restores with ondemand or copy"
                            .into(),
                    ));
                }
                if layout.iter().any(|s| s.kind != SlotKind::Boot) {
                    return Err(RestoreError::Layout(
                        "a file mapping restores boot RAM only (this VM had hotplugged memory)"
                            .into(),
                    ));
                }
                Self::build(
                    kvm,
                    &boot,
                    PageSource::File(image.clone()),
                    max_slots,
                    Mapping::PrivateFile,
                )?
            }
        };
        for s in layout.iter().filter(|s| s.kind != SlotKind::Boot) {
            let block_size = match s.kind {
                SlotKind::Blocks { block_size } => Some(block_size),
                _ => None,
            };
            m.add_slot(NewSlot {
                gpa: s.gpa,
                size: s.size,
                source: PageSource::File(image.clone()),
                source_offset: s.offset,
                block_size,
            })?;
            if let Some(b) = block_size {
                for i in (0..s.size / b).filter(|i| bit(&s.plugged, *i)) {
                    m.plug(s.gpa + i * b, b)?;
                }
            }
        }
        m.mark_holes(layout);
        Ok(m)
    }

    /// The pages `layout` has no content for refault as zero, without a
    /// read, and stop fault-around windows.
    fn mark_holes(&self, layout: &[SlotImage]) {
        let snap = self.snapshot();
        for s in layout {
            let Some(slot) = snap.lookup(s.gpa) else {
                continue;
            };
            let mut p = 0;
            while p < s.pages() {
                p = run_end(&s.data, p, true, s.pages());
                let n = run_end(&s.data, p, false, s.pages()) - p;
                if n > 0 {
                    drop(slot.begin_discard(p, n));
                }
                p += n;
            }
        }
    }

    /// Copy every data page of `layout` from the file into RAM (a `copy`
    /// restore: before userfaultfd is attached and before any vCPU runs).
    pub fn fill_from(&self, layout: &[SlotImage], image: &ImageFile) -> Result<u64, RestoreError> {
        let snap = self.snapshot();
        let mut bytes = 0;
        let mut buf = vec![0u8; (RUN * PAGE_SIZE) as usize];
        for s in layout {
            let Some(slot) = snap.lookup(s.gpa) else {
                continue;
            };
            for (p, n) in s.data_runs(RUN) {
                let len = (n * PAGE_SIZE) as usize;
                image
                    .read_page(s.offset + p * PAGE_SIZE, &mut buf[..len])
                    .map_err(|e| RestoreError::Layout(e.to_string()))?;
                // SAFETY: pages p..p+n of the slot's own mapping (no
                // userfaultfd yet: the write faults in anonymous memory).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        buf.as_ptr(),
                        (slot.backing.hva() + p * PAGE_SIZE) as *mut u8,
                        len,
                    );
                }
                bytes += len as u64;
            }
        }
        Ok(bytes)
    }
}

impl MemoryManager {
    /// How `slot` came to be.
    pub(crate) fn kind_of(&self, slot: &crate::Slot) -> SlotKind {
        if self.boot_ranges().iter().any(|r| r.gpa == slot.gpa) {
            SlotKind::Boot
        } else if let Some(block_size) = slot.block_size() {
            SlotKind::Blocks { block_size }
        } else {
            SlotKind::Plain
        }
    }
}

/// A block slot's plugged blocks, one bit each (empty for other slots).
pub(crate) fn plugged_blocks(slot: &crate::Slot) -> Vec<u64> {
    match slot.block_size() {
        Some(b) => {
            let blocks = slot.size / b;
            let mut words = vec![0u64; blocks.div_ceil(64) as usize];
            for i in (0..blocks).filter(|i| slot.is_plugged(i * b / PAGE_SIZE)) {
                set_bit(&mut words, i);
            }
            words
        }
        None => Vec::new(),
    }
}

/// Put a diff snapshot's layout (`top`, with `base_pages` its
/// [`BasePages`]) over its base's (`below`, itself layered if the base is a
/// diff): every page that is the base's and has data there becomes a data
/// page of `top` (with its page-table and user marks), read from the
/// base's image at the returned ranges (for [`ImageFile::open_over`]); a
/// page that is the base's and a hole there stays a hole.
pub fn layer(
    top: &mut [SlotImage],
    base_pages: &[Vec<u64>],
    below: &[SlotImage],
) -> Result<Vec<crate::Redirect>, RestoreError> {
    if base_pages.len() != top.len() {
        return Err(RestoreError::Layout(format!(
            "{} slots, base pages for {}",
            top.len(),
            base_pages.len()
        )));
    }
    let marks = |pages: &[u64]| {
        pages
            .iter()
            .copied()
            .collect::<std::collections::HashSet<u64>>()
    };
    let below_marks: Vec<_> = below
        .iter()
        .map(|b| (marks(&b.tables), marks(&b.user)))
        .collect();
    let mut redirects: Vec<crate::Redirect> = Vec::new();
    for (s, bits) in top.iter_mut().zip(base_pages) {
        if bits.len() != s.data.len() {
            return Err(RestoreError::Layout(format!(
                "slot at {:#x}: base page bitmap size",
                s.gpa
            )));
        }
        for p in 0..s.pages() {
            if !bit(bits, p) || s.has_data(p) {
                continue;
            }
            let gpa = s.gpa + p * PAGE_SIZE;
            let Some((i, b)) = below
                .iter()
                .enumerate()
                .find(|(_, b)| gpa >= b.gpa && gpa < b.gpa + b.size)
            else {
                return Err(RestoreError::Layout(format!(
                    "page {gpa:#x} is the base's, and the base has no RAM there"
                )));
            };
            let bp = (gpa - b.gpa) / PAGE_SIZE;
            if !b.has_data(bp) {
                continue;
            }
            set_bit(&mut s.data, p);
            if below_marks[i].0.contains(&bp) {
                s.tables.push(p);
            }
            if below_marks[i].1.contains(&bp) {
                s.user.push(p);
            }
            let (offset, at) = (s.offset + p * PAGE_SIZE, b.offset + bp * PAGE_SIZE);
            match redirects.last_mut() {
                Some(r) if r.offset + r.len == offset && r.at + r.len == at => r.len += PAGE_SIZE,
                _ => redirects.push(crate::Redirect {
                    offset,
                    len: PAGE_SIZE,
                    at,
                }),
            }
        }
        s.tables.sort_unstable();
        s.user.sort_unstable();
    }
    Ok(redirects)
}

/// Record in each slot the data pages that user-mode entries point at.
fn mark_user_pages(images: &mut [SlotImage], mut user: Vec<u64>) {
    user.sort_unstable();
    user.dedup();
    for gpa in user {
        if let Some(s) = images
            .iter_mut()
            .find(|s| gpa >= s.gpa && gpa < s.gpa + s.size)
        {
            let p = (gpa - s.gpa) / PAGE_SIZE;
            if s.has_data(p) {
                s.user.push(p);
            }
        }
    }
}

/// mincore's answer for a range (one byte per page; all zero if unmapped).
pub(crate) fn residency(hva: u64, size: u64) -> Vec<u8> {
    let pages = size.div_ceil(PAGE_SIZE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: one byte per page of the range; mincore only reads page
    // tables and fails cleanly on unmapped ranges.
    let r = unsafe { libc::mincore(hva as *mut libc::c_void, size as usize, vec.as_mut_ptr()) };
    if r != 0 {
        vec.fill(0);
    }
    vec
}

/// The layout must be sorted, disjoint, page aligned, inside the file,
/// boot slots first and consecutive from offset 0, bitmaps of the right
/// size.
pub fn check_layout(layout: &[SlotImage], file_len: u64) -> Result<(), RestoreError> {
    let bad = |why: String| Err(RestoreError::Layout(why));
    let mut gpa_end = 0;
    let mut offset = 0;
    let mut boot_done = false;
    for s in layout {
        let end = s.gpa.checked_add(s.size);
        if s.size == 0
            || s.gpa % PAGE_SIZE != 0
            || s.size % PAGE_SIZE != 0
            || s.gpa < gpa_end
            || end.is_none()
        {
            return bad(format!(
                "slot at {:#x}+{:#x} overlaps or is unaligned",
                s.gpa, s.size
            ));
        }
        if s.offset != offset || s.offset.checked_add(s.size).is_none_or(|e| e > file_len) {
            return bad(format!(
                "slot at {:#x} is at file offset {:#x}, expected {offset:#x} within {file_len:#x} bytes",
                s.gpa, s.offset
            ));
        }
        match s.kind {
            SlotKind::Boot if boot_done => return bad("boot RAM after other slots".into()),
            SlotKind::Boot => {}
            SlotKind::Blocks { block_size } => {
                boot_done = true;
                if block_size == 0 || s.size % block_size != 0 {
                    return bad(format!("slot at {:#x}: block size {block_size:#x}", s.gpa));
                }
                if s.plugged.len() as u64 != (s.size / block_size).div_ceil(64) {
                    return bad(format!("slot at {:#x}: plugged bitmap size", s.gpa));
                }
            }
            SlotKind::Plain => boot_done = true,
        }
        if s.data.len() as u64 != s.pages().div_ceil(64) {
            return bad(format!("slot at {:#x}: data bitmap size", s.gpa));
        }
        if let Some(p) = s.tables.iter().chain(&s.user).find(|&&p| !s.has_data(p)) {
            return bad(format!(
                "slot at {:#x}: page {p} is listed as a page table or user page but holds no data",
                s.gpa
            ));
        }
        gpa_end = end.unwrap_or(u64::MAX);
        offset += s.size;
    }
    if !layout.iter().any(|s| s.kind == SlotKind::Boot) {
        return bad("no boot RAM".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NoKvm;
    use std::io::Write;
    use vm_memory::{Bytes, GuestAddress};

    const MIB: u64 = 1 << 20;

    #[test]
    fn data_runs_are_the_runs_of_set_bits() {
        let s = SlotImage {
            gpa: 0,
            size: 300 * PAGE_SIZE,
            offset: 0,
            kind: SlotKind::Boot,
            data: vec![0x00ff_0000_0000_000f, u64::MAX, 0, 1 << 63, 0x7],
            plugged: Vec::new(),
            tables: Vec::new(),
            user: Vec::new(),
        };
        let runs: Vec<_> = s.data_runs(u64::MAX).collect();
        assert_eq!(runs, vec![(0, 4), (48, 8), (64, 64), (255, 4)]);
        let capped: Vec<_> = s.data_runs(50).collect();
        assert_eq!(capped, vec![(0, 4), (48, 8), (64, 50), (114, 14), (255, 4)]);
    }

    #[test]
    fn run_end_finds_where_each_run_ends() {
        let words = [0x00ff_0000_0000_000f_u64, u64::MAX, 0, 1 << 63];
        let naive = |from: u64, set: bool, end: u64| {
            (from..end).find(|&i| bit(&words, i) != set).unwrap_or(end)
        };
        for end in [0, 1, 63, 64, 130, 200, 256, 300] {
            for from in 0..end.min(256) {
                for set in [true, false] {
                    assert_eq!(
                        run_end(&words, from, set, end),
                        naive(from, set, end),
                        "{from} {set} {end}"
                    );
                }
            }
        }
    }

    #[test]
    fn resident_and_source_pages_are_saved_the_rest_are_holes_and_restore_reads_them() {
        let m = MemoryManager::new(
            Arc::new(NoKvm),
            &[RamRange {
                gpa: 0,
                size: 4 * MIB,
            }],
            PageSource::Zero,
            8,
        )
        .unwrap();
        m.memory().write_obj(0x11u8, GuestAddress(0x1000)).unwrap();
        m.memory().write_obj(0x22u8, GuestAddress(0x3000)).unwrap();
        m.discard(0x3000, 0x1000).unwrap();
        let mut file = Vec::new();
        let layout = m
            .save_pages::<std::io::Error>(&mut |off, bytes| {
                if file.len() < (off as usize) + bytes.len() {
                    file.resize(off as usize + bytes.len(), 0);
                }
                file[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
                Ok(())
            })
            .unwrap();
        assert_eq!(layout.len(), 1);
        assert_eq!(layout[0].kind, SlotKind::Boot);
        assert!(layout[0].has_data(1), "a written page is data");
        assert!(!layout[0].has_data(3), "a discarded page is a hole");
        assert!(!layout[0].has_data(2), "a page never touched is a hole");
        // Restore over a file with those bytes.
        let dir = std::env::temp_dir().join(format!("vmm-memsnap-{}", std::process::id()));
        let mut f = std::fs::File::create(&dir).unwrap();
        file.resize(4 * MIB as usize, 0);
        f.write_all(&file).unwrap();
        let image = ImageFile::open(&dir, 4 * MIB).unwrap();
        let r = MemoryManager::restore(
            Arc::new(NoKvm),
            &layout,
            image.clone(),
            RestoreMapping::Lazy,
            8,
        )
        .unwrap();
        let snap = r.snapshot();
        let s = snap.lookup(0).unwrap();
        assert!(!s.is_discarded(1), "a data page refaults from the file");
        assert!(
            s.is_discarded(2) && s.is_discarded(3),
            "holes refault as zero"
        );
        assert_eq!(r.fill_from(&layout, &image).unwrap(), 4096);
        let v: u8 = r.memory().read_obj(GuestAddress(0x1000)).unwrap();
        assert_eq!(v, 0x11);
        let _ = std::fs::remove_file(&dir);
    }

    /// KVM whose dirty log says what the test says the guest wrote.
    #[derive(Default)]
    struct LoggingKvm {
        guest_wrote: std::sync::Mutex<Vec<(u32, u64)>>,
    }

    impl KvmSlots for LoggingKvm {
        fn set_region(
            &self,
            _: u32,
            _: u64,
            _: u64,
            _: u64,
            _: bool,
        ) -> Result<(), kvm_ioctls::Error> {
            Ok(())
        }
        fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, kvm_ioctls::Error> {
            let mut bits = vec![0u64; size.div_ceil(PAGE_SIZE * 64) as usize];
            self.guest_wrote.lock().unwrap().retain(|&(s, p)| {
                if s == slot {
                    set_bit(&mut bits, p);
                }
                s != slot
            });
            Ok(bits)
        }
    }

    /// Save into a memory file in `path` (its length `len`).
    fn file_sink(
        path: &std::path::Path,
        len: u64,
    ) -> impl FnMut(u64, &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(path).unwrap();
        f.set_len(len).unwrap();
        move |off, bytes| f.write_all_at(bytes, off)
    }

    /// A diff takes exactly what changed since the full snapshot — the
    /// guest's writes (KVM's log), the VMM's (the view's bitmap),
    /// discards, a slot added since — and restored over its base it gives
    /// the memory as it was at the diff.
    #[test]
    fn a_diff_over_its_base_restores_the_memory_at_the_diff() {
        let kvm = Arc::new(LoggingKvm::default());
        let ram = RamRange {
            gpa: 0,
            size: 4 * MIB,
        };
        let m = MemoryManager::new(kvm.clone(), &[ram], PageSource::Zero, 8).unwrap();
        for (page, v) in [(1u64, 0x11u8), (3, 0x33), (5, 0x55), (9, 0x99)] {
            m.memory()
                .write_obj(v, GuestAddress(page * PAGE_SIZE))
                .unwrap();
        }
        let plain = |gpa| NewSlot {
            gpa,
            size: MIB,
            source: PageSource::Zero,
            source_offset: 0,
            block_size: None,
        };
        m.add_slot(plain(16 * MIB)).unwrap();
        m.memory()
            .write_obj(0x16u8, GuestAddress(16 * MIB))
            .unwrap();
        let base_ram = [
            ram,
            RamRange {
                gpa: 16 * MIB,
                size: MIB,
            },
        ];
        let dir = std::env::temp_dir().join(format!("vmm-memdiff-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (base_file, diff_file) = (dir.join("base"), dir.join("diff"));
        let base = m.save_pages(&mut file_sink(&base_file, 5 * MIB)).unwrap();
        m.track_dirty().unwrap();

        // The guest rewrites page 1 behind the VMM's back (KVM sees it),
        // the VMM writes page 7 (a device), page 3 is discarded, page 5
        // and 9 stay; a slot is added and written.
        let hva = m.snapshot().lookup(0).unwrap().backing.hva();
        // SAFETY: page 1 of the slot's own mapping.
        unsafe { *((hva + PAGE_SIZE) as *mut u8) = 0x12 };
        kvm.guest_wrote.lock().unwrap().push((0, 1));
        m.memory()
            .write_obj(0x77u8, GuestAddress(7 * PAGE_SIZE))
            .unwrap();
        m.discard(3 * PAGE_SIZE, PAGE_SIZE).unwrap();
        m.add_slot(plain(8 * MIB)).unwrap();
        m.memory()
            .write_obj(0x88u8, GuestAddress(8 * MIB + PAGE_SIZE))
            .unwrap();
        // The slot at 16 MiB goes and comes back: zero, not the base's.
        m.remove_slot(16 * MIB).unwrap();
        m.add_slot(plain(16 * MIB)).unwrap();

        let (mut top, base_pages) = m
            .save_diff(&mut file_sink(&diff_file, 6 * MIB), &base_ram)
            .unwrap();
        let data: Vec<u64> = (0..10).filter(|&p| top[0].has_data(p)).collect();
        assert_eq!(data, vec![1, 7], "the diff writes only what changed");
        let is_base = |p| bit(&base_pages[0], p);
        assert!(
            is_base(5) && is_base(9) && is_base(0),
            "unchanged pages are the base's"
        );
        assert!(!is_base(1) && !is_base(3) && !is_base(7));
        assert!(
            top[1].has_data(1) && base_pages[1].iter().all(|w| *w == 0),
            "a new slot is all new"
        );
        assert!(
            top[2].data_pages() == 0 && base_pages[2].iter().all(|w| *w == 0),
            "a slot added again is new"
        );

        let below = ImageFile::open(&base_file, 5 * MIB).unwrap();
        let redirects = layer(&mut top, &base_pages, &base).unwrap();
        let image = ImageFile::open_over(&diff_file, 6 * MIB, below, redirects).unwrap();
        let r = MemoryManager::restore(
            Arc::new(NoKvm),
            &top,
            image.clone(),
            RestoreMapping::Lazy,
            8,
        )
        .unwrap();
        r.fill_from(&top, &image).unwrap();
        for (gpa, want) in [
            (PAGE_SIZE, 0x12u8),
            (3 * PAGE_SIZE, 0),
            (5 * PAGE_SIZE, 0x55),
            (7 * PAGE_SIZE, 0x77),
            (9 * PAGE_SIZE, 0x99),
            (8 * MIB + PAGE_SIZE, 0x88),
            (16 * MIB, 0),
        ] {
            let v: u8 = r.memory().read_obj(GuestAddress(gpa)).unwrap();
            assert_eq!(v, want, "GPA {gpa:#x}");
        }
        assert!(
            MemoryManager::restore(Arc::new(NoKvm), &top, image, RestoreMapping::Private, 8)
                .is_err(),
            "a file mapping cannot layer"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_bad_layout_is_refused() {
        let ok = SlotImage {
            gpa: 0,
            size: 64 * 4096,
            offset: 0,
            kind: SlotKind::Boot,
            data: vec![0],
            plugged: vec![],
            tables: vec![],
            user: vec![],
        };
        assert!(check_layout(std::slice::from_ref(&ok), 64 * 4096).is_ok());
        assert!(
            check_layout(std::slice::from_ref(&ok), 4096).is_err(),
            "past the file"
        );
        let unaligned = SlotImage {
            gpa: 1,
            ..ok.clone()
        };
        assert!(check_layout(&[unaligned], 1 << 30).is_err());
        let bitmap = SlotImage {
            data: vec![],
            ..ok.clone()
        };
        assert!(check_layout(&[bitmap], 1 << 30).is_err());
        let plain_first = SlotImage {
            kind: SlotKind::Plain,
            ..ok.clone()
        };
        let boot_after = SlotImage {
            gpa: 1 << 20,
            offset: 64 * 4096,
            ..ok.clone()
        };
        assert!(check_layout(&[plain_first, boot_after], 1 << 30).is_err());
        assert!(check_layout(&[], 1 << 30).is_err(), "no boot RAM");
        // Found by the fuzzer: a slot ending past the address space.
        let wraps = SlotImage {
            gpa: u64::MAX - 0xfff,
            ..ok.clone()
        };
        assert!(check_layout(&[wraps], 1 << 30).is_err());
    }
}
