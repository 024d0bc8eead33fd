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

/// One page a round sends: its content, or a hole (it holds nothing now),
/// or (post-copy) a page that holds data the destination will be sent
/// later, not read now.
pub enum Page<'a> {
    Data(&'a [u8]),
    Hole,
    Later,
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
            Page::Later => {
                self.data.insert(gpa);
                self.tables.remove(&gpa);
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
    /// round (or since tracking began), as data or as a hole. `later`:
    /// data pages are not read but given as [`Page::Later`] (post-copy's
    /// stop: the destination fetches them). Each page goes to `out(gpa,
    /// page)` and into `sent`. Returns the pages given.
    pub fn migration_round<E: std::error::Error + 'static>(
        &self,
        first: bool,
        later: bool,
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
                from: 0,
                phys_top,
                changed: None,
            };
            for p in 0..slot.size / PAGE_SIZE {
                if !first && !bit(&changed, p) {
                    continue;
                }
                let gpa = slot.gpa + p * PAGE_SIZE;
                let page = if saver.keep(p) && later {
                    // Page tables go now (the destination's restore walks
                    // them before any vCPU runs), the rest later.
                    if saver.is_table(p, &mut buf, phys_top)? {
                        Page::Data(&buf)
                    } else {
                        Page::Later
                    }
                } else if saver.keep(p) {
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

    /// Read `buf.len()` bytes of guest RAM at `gpa` (whole pages, one
    /// slot) as a round would send them: resident pages from memory,
    /// others from the slot's file source, holes as zeros. For a stopped
    /// VM (post-copy serves its pages from here).
    pub fn read_stopped(&self, gpa: u64, buf: &mut [u8]) -> Result<(), String> {
        let snap = self.snapshot();
        let len = buf.len() as u64;
        let slot = snap
            .lookup(gpa)
            .filter(|s| {
                gpa.is_multiple_of(PAGE_SIZE)
                    && len.is_multiple_of(PAGE_SIZE)
                    && gpa + len <= s.end()
            })
            .ok_or_else(|| format!("{len} bytes at {gpa:#x} are not whole pages of one memslot"))?;
        let from = (gpa - slot.gpa) / PAGE_SIZE;
        let saver = SlotSaver {
            slot,
            offset: 0,
            resident: residency(slot.backing.hva() + (gpa - slot.gpa), len),
            from,
            phys_top: 0,
            changed: None,
        };
        for (i, page) in buf.chunks_mut(PAGE_SIZE as usize).enumerate() {
            let p = from + i as u64;
            if saver.keep(p) {
                saver
                    .read::<std::io::Error>(p, page)
                    .map_err(|e| e.to_string())?;
            } else {
                page.fill(0);
            }
        }
        Ok(())
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
