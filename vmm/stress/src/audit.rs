//! Host-side checks of the memory invariants by mincore: nothing resident
//! in a removed slot (I1) or in an unplugged block of a present slice (I6).

use std::sync::Arc;

use vmm::memory::{resident_pages, MemoryManager, Slot};

/// Checks made and violations found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Tally {
    pub checks: u64,
    pub violations: u64,
}

impl Tally {
    pub fn add(&mut self, o: Tally) {
        self.checks += o.checks;
        self.violations += o.violations;
    }
}

/// Watches the slots of a guest-physical range across changes: it keeps
/// every slot it has seen (so a removed slot's mapping stays to be looked
/// at) and checks residency at each call.
pub struct SlotAudit {
    base: u64,
    size: u64,
    /// Slots seen, with how many checks they have had since their removal
    /// (a removed slot is checked twice, then let go so it can be unmapped).
    seen: Vec<(Arc<Slot>, u8)>,
    pub removed: Tally,
    pub unplugged: Tally,
}

impl SlotAudit {
    pub fn new(base: u64, size: u64) -> Self {
        Self {
            base,
            size,
            seen: Vec::new(),
            removed: Tally::default(),
            unplugged: Tally::default(),
        }
    }

    /// The VM was replaced (a restore): its slots are not removed ones;
    /// forget them (the tallies stay).
    pub fn new_vm(&mut self) {
        self.seen.clear();
    }

    /// Check now: every slot seen before and removed since has no resident
    /// page (I1); every unplugged block of a present block slot has none
    /// (I6). Violations are logged.
    pub fn check(&mut self, memory: &MemoryManager) {
        let snap = memory.snapshot();
        let (base, end) = (self.base, self.base + self.size);
        for s in snap.slots.iter().filter(|s| s.gpa >= base && s.gpa < end) {
            if !self.seen.iter().any(|(x, _)| Arc::ptr_eq(x, s)) {
                self.seen.push((s.clone(), 0));
            }
            let Some(block) = s.block_size() else {
                continue;
            };
            // Under the install lock (shared) no plug, unplug or zap is half
            // done: an unplug clears the bits and zaps under the exclusive
            // lock, so a block seen unplugged here is empty or I6 is broken.
            let Ok(_stable) = s.map_lock() else {
                continue; // being removed: the removal check covers it
            };
            for b in 0..s.size / block {
                let page = s.page_index(s.gpa + b * block);
                if s.is_plugged(page) {
                    continue;
                }
                let n = resident_pages(s.backing.hva() + b * block, block);
                self.unplugged.checks += 1;
                if n != 0 {
                    self.unplugged.violations += 1;
                    log::error!(
                        "I6 violated: {n} pages resident in unplugged block {:#x}",
                        s.gpa + b * block
                    );
                }
            }
        }
        let mut keep = Vec::with_capacity(self.seen.len());
        for (s, after) in self.seen.drain(..) {
            if snap.slots.iter().any(|x| Arc::ptr_eq(x, &s)) {
                keep.push((s, after));
                continue;
            }
            let n = resident_pages(s.backing.hva(), s.size);
            self.removed.checks += 1;
            if n != 0 {
                self.removed.violations += 1;
                log::error!(
                    "I1 violated: {n} pages resident in removed slot {:#x}",
                    s.gpa
                );
            }
            if after == 0 {
                keep.push((s, 1));
            }
        }
        self.seen = keep;
    }
}
