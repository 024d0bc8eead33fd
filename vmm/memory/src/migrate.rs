//! Guest RAM for a live migration: rounds of pages read while the guest
//! runs (all that hold something, then what changed since the last round),
//! and the layout the destination restores from what it was sent.
//!
//! Tracking (`MemoryManager::track_dirty`) must be on before the first
//! round: a page written while a round reads it is changed again, and goes
//! in a later round.

use std::collections::BTreeSet;

use crate::snapshot::{
    bit, looks_like_page_table, phys_top, plugged_blocks, residency, set_bit, SaveError, SlotImage,
    SlotSaver,
};
use crate::{MemoryManager, PAGE_SIZE};

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
            // Which pages hold something and how they are read: as a
            // snapshot saves them. A resident page discarded after the
            // residency check reads as zero (faulted in by the SIGBUS
            // handler or the host's zero page), and the discard has marked
            // it changed: the next round sends it again.
            let saver = SlotSaver {
                slot,
                offset: 0,
                resident: residency(slot.backing.hva(), slot.size),
                phys_top,
                changed: None,
            };
            for p in 0..slot.size / PAGE_SIZE {
                if !first && !bit(&changed, p) {
                    continue;
                }
                let gpa = slot.gpa + p * PAGE_SIZE;
                let page = if saver.keep(p) {
                    saver.read(p, &mut buf)?;
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
