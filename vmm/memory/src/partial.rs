//! Huge pages a balloon has inflated only part of.
//!
//! Balloon PFNs are 4 KiB frames; a hugetlb mapping can only give a whole
//! 2 MiB page back to the host. So, as Cloud Hypervisor does, the frames
//! inflated out of each huge page are recorded, and the huge page is
//! dropped once every one of its frames is in the balloon. A deflate takes
//! frames out of the record again: a frame the guest got back is never
//! dropped with its neighbours later. The record of a dropped page is kept
//! (full) until its frames are all deflated: a page deflated in part
//! refaults whole, and its frames still in the balloon must count towards
//! dropping it again.
//!
//! The records are bounded by the RAM (one of at most 64 bytes per huge
//! page of a slot), whatever the guest sends.

use std::collections::HashMap;
use std::sync::Mutex;

use super::PAGE_SIZE;

/// 4 KiB frames per 2 MiB page.
const FRAMES: u64 = super::hugetlb::HUGE_PAGE / PAGE_SIZE;
const WORDS: usize = (FRAMES / 64) as usize;

/// Per-slot records of partially inflated huge pages, keyed by the huge
/// page's index within the slot.
#[derive(Default)]
pub struct PartialHugePages {
    map: Mutex<HashMap<u64, [u64; WORDS]>>,
}

impl PartialHugePages {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, [u64; WORDS]>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Record frames `first..first+count` of huge page `huge` as inflated.
    /// Returns true when every frame of the huge page is inflated (the
    /// caller drops the page).
    pub fn inflate(&self, huge: u64, first: u64, count: u64) -> bool {
        debug_assert!(first + count <= FRAMES);
        let mut map = self.lock();
        let bits = map.entry(huge).or_insert([0; WORDS]);
        for f in first..first + count {
            bits[(f / 64) as usize] |= 1 << (f % 64);
        }
        full(bits)
    }

    /// Take frames `first..first+count` of huge page `huge` out of the
    /// record (the guest has them back).
    pub fn deflate(&self, huge: u64, first: u64, count: u64) {
        debug_assert!(first + count <= FRAMES);
        let mut map = self.lock();
        if let Some(bits) = map.get_mut(&huge) {
            for f in first..first + count {
                bits[(f / 64) as usize] &= !(1 << (f % 64));
            }
            if bits.iter().all(|w| *w == 0) {
                map.remove(&huge);
            }
        }
    }

    /// The whole huge page is the guest's again, or gone (discarded as a
    /// whole, unplugged): no record is left.
    pub fn forget(&self, huge: u64) {
        self.lock().remove(&huge);
    }

    /// Inflated frames of huge pages only partly inflated (still resident).
    pub fn frames(&self) -> u64 {
        self.lock()
            .values()
            .filter(|b| !full(b))
            .map(|b| b.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
            .sum()
    }

    /// Frames of `first..first+count` of huge page `huge` recorded in a
    /// partial record (inflated, yet resident with their page).
    pub fn held(&self, huge: u64, first: u64, count: u64) -> u64 {
        match self.lock().get(&huge) {
            Some(b) if !full(b) => (first..first + count)
                .filter(|f| b[(f / 64) as usize] & (1 << (f % 64)) != 0)
                .count() as u64,
            _ => 0,
        }
    }

    /// Huge pages whose every frame is inflated (dropped).
    #[cfg(test)]
    pub fn whole(&self) -> u64 {
        self.lock().values().filter(|b| full(b)).count() as u64
    }
}

fn full(bits: &[u64; WORDS]) -> bool {
    bits.iter().all(|w| *w == u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_page_is_whole_only_when_every_frame_is_in() {
        let p = PartialHugePages::default();
        assert!(!p.inflate(3, 0, 256));
        assert!(!p.inflate(3, 256, 255));
        assert_eq!(p.frames(), 511);
        assert!(p.inflate(3, 511, 1));
        assert_eq!((p.frames(), p.whole()), (0, 1));
        // Deflating part of a dropped page: the rest still counts.
        p.deflate(3, 0, 2);
        assert_eq!((p.frames(), p.whole()), (510, 0));
        assert!(p.inflate(3, 0, 2), "dropped again when the frames return");
    }

    #[test]
    fn a_deflated_frame_keeps_the_page() {
        let p = PartialHugePages::default();
        assert!(!p.inflate(0, 0, 300));
        p.deflate(0, 10, 1);
        // Everything but frame 10: the guest uses it again.
        assert!(!p.inflate(0, 300, 212));
        assert_eq!(p.frames(), 511);
        assert_eq!(p.held(0, 8, 4), 3);
        assert!(p.inflate(0, 10, 1));
        assert_eq!(p.held(0, 8, 4), 0, "a dropped page holds nothing");
        // Deflating all of a record drops it.
        assert!(!p.inflate(1, 5, 2));
        p.deflate(1, 0, 512);
        assert_eq!(p.frames(), 0);
        p.forget(7);
        assert!(!p.inflate(7, 0, 1));
        p.forget(7);
        assert_eq!(p.frames(), 0);
    }
}
