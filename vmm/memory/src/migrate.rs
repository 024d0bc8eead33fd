//! Guest RAM for a live migration: rounds of pages read while the guest
//! runs (all that hold something, then what changed since the last round),
//! and the layout the destination restores from what it was sent.
//!
//! Tracking (`MemoryManager::track_dirty`) must be on before the first
//! round: a page written while a round reads it is changed again, and goes
//! in a later round.

use std::collections::BTreeSet;

use crate::snapshot::{
    bit, looks_like_page_table, plugged_blocks, residency, set_bit, SaveError, SlotImage, MMIO_TOP,
};
use crate::{MemoryManager, PageSource, PAGE_SIZE};

/// One page a round sends: its content, or a hole (it holds nothing now).
pub enum Page<'a> {
    Data(&'a [u8]),
    Hole,
}

/// What the destination has, page by page, as the source sent it: which
/// pages hold data, which of those look like page tables.
#[derive(Default)]
pub struct Sent {
    data: BTreeSet<u64>,
    tables: BTreeSet<u64>,
}

impl Sent {
    pub fn pages(&self) -> u64 {
        self.data.len() as u64
    }

    fn record(&mut self, gpa: u64, page: &Page<'_>, phys_top: u64) {
        match page {
            Page::Data(bytes) => {
                self.data.insert(gpa);
                if looks_like_page_table(bytes, phys_top) {
                    self.tables.insert(gpa);
                } else {
                    self.tables.remove(&gpa);
                }
            }
            Page::Hole => {
                self.data.remove(&gpa);
                self.tables.remove(&gpa);
            }
        }
    }
}

impl MemoryManager {
    /// One round: `first`: every page that holds something (resident, or
    /// still its file source's); otherwise each page changed since the last
    /// round (or since tracking began), as data or as a hole. Each page
    /// goes to `out(gpa, page)` and into `sent`. Returns the pages sent.
    pub fn migration_round<E: std::error::Error + 'static>(
        &self,
        first: bool,
        sent: &mut Sent,
        out: &mut dyn FnMut(u64, Page<'_>) -> Result<(), E>,
    ) -> Result<u64, SaveError<E>> {
        if self.has_hugetlb() {
            return Err(SaveError::HugePages);
        }
        if !self.tracks_dirty() {
            return Err(SaveError::NotTracked);
        }
        let snap = self.snapshot();
        let phys_top = phys_top(&snap.slots);
        let mut buf = vec![0u8; PAGE_SIZE as usize];
        let mut count = 0;
        for slot in &snap.slots {
            let changed = self.take_dirty(slot).map_err(SaveError::Dirty)?;
            let resident = residency(slot.backing.hva(), slot.size);
            let file = matches!(slot.backing.source(), PageSource::File(_));
            for p in 0..slot.size / PAGE_SIZE {
                if !first && !bit(&changed, p) {
                    continue;
                }
                let gpa = slot.gpa + p * PAGE_SIZE;
                let holds = resident[p as usize] & 1 != 0 || (file && !slot.is_discarded(p));
                let page = if holds {
                    read_page(slot, p, resident[p as usize] & 1 != 0, &mut buf)
                        .map_err(|source| SaveError::Source { gpa, source })?;
                    Page::Data(&buf)
                } else if first || !sent.data.contains(&gpa) {
                    continue;
                } else {
                    Page::Hole
                };
                sent.record(gpa, &page, phys_top);
                out(gpa, page).map_err(SaveError::Write)?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// The layout the destination restores: every slot now (the caller
    /// keeps memslots still), its data pages those `sent` says the
    /// destination holds.
    pub fn migration_layout(&self, sent: &Sent) -> Vec<SlotImage> {
        let locked = self.slots().lock_slots();
        let snap = locked.snapshot();
        let mut offset = 0;
        let mut images = Vec::with_capacity(snap.slots.len());
        for slot in &snap.slots {
            let pages = slot.size / PAGE_SIZE;
            let mut data = vec![0u64; pages.div_ceil(64) as usize];
            let end = slot.gpa + slot.size;
            for gpa in sent.data.range(slot.gpa..end) {
                set_bit(&mut data, (gpa - slot.gpa) / PAGE_SIZE);
            }
            let tables = sent
                .tables
                .range(slot.gpa..end)
                .map(|gpa| (gpa - slot.gpa) / PAGE_SIZE)
                .collect();
            images.push(SlotImage {
                gpa: slot.gpa,
                size: slot.size,
                offset,
                kind: self.kind_of(slot),
                data,
                plugged: plugged_blocks(slot),
                tables,
                user: Vec::new(),
            });
            offset += slot.size;
        }
        images
    }
}

fn phys_top(slots: &[std::sync::Arc<crate::Slot>]) -> u64 {
    slots
        .iter()
        .map(|s| s.gpa + s.size)
        .max()
        .unwrap_or(0)
        .max(MMIO_TOP)
}

/// Page `p` of `slot` into `buf`: from its mapping if resident, else from
/// its file source.
fn read_page(
    slot: &crate::Slot,
    p: u64,
    resident: bool,
    buf: &mut [u8],
) -> Result<(), crate::SourceError> {
    let at = p * PAGE_SIZE;
    if resident {
        // SAFETY: a page of the slot's mapping, alive while the table
        // snapshot holds the slot. Were it discarded since the residency
        // check, the read faults it in as zero (userfaultfd SIGBUS handler
        // or the host's zero page), and the discard has marked it changed:
        // the next round sends it again.
        unsafe {
            std::ptr::copy_nonoverlapping(
                (slot.backing.hva() + at) as *const u8,
                buf.as_mut_ptr(),
                PAGE_SIZE as usize,
            )
        };
        return Ok(());
    }
    match slot.backing.source() {
        PageSource::File(img) => img.read_page(slot.backing.source_offset() + at, buf),
        PageSource::Zero => {
            buf.fill(0);
            Ok(())
        }
    }
}
