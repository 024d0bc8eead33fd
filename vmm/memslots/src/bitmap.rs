//! A fixed-size bitmap of pages (or blocks), lock-free.

use crate::sync::{AtomicU64, Ordering};

/// One bit per page or block. Readers are lock-free; writers that need an
/// ordering with installers change bits under the slot's exclusive install
/// lock.
pub struct PageBitmap {
    words: Box<[AtomicU64]>,
    len: u64,
}

const BITS: u64 = u64::BITS as u64;

impl PageBitmap {
    /// `len` bits, all clear.
    pub fn new(len: u64) -> Self {
        Self {
            words: (0..len.div_ceil(BITS)).map(|_| AtomicU64::new(0)).collect(),
            len,
        }
    }

    /// Number of bits.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn word(&self, i: u64) -> &AtomicU64 {
        assert!(i < self.len, "bit {i} outside a bitmap of {}", self.len);
        &self.words[(i / BITS) as usize]
    }

    pub fn set(&self, i: u64) {
        self.word(i).fetch_or(1 << (i % BITS), Ordering::AcqRel);
    }

    /// Set bits `first..first + count` a word at a time (a restore marks
    /// every hole of a 4 GiB guest: a million bits).
    pub fn set_range(&self, first: u64, count: u64) {
        let end = first + count;
        assert!(
            end <= self.len,
            "bits {first}..{end} outside a bitmap of {}",
            self.len
        );
        let mut i = first;
        while i < end {
            let lo = i % BITS;
            let n = (BITS - lo).min(end - i);
            let mask = if n == BITS {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << lo
            };
            self.words[(i / BITS) as usize].fetch_or(mask, Ordering::AcqRel);
            i += n;
        }
    }

    pub fn clear(&self, i: u64) {
        self.word(i).fetch_and(!(1 << (i % BITS)), Ordering::AcqRel);
    }

    pub fn get(&self, i: u64) -> bool {
        self.word(i).load(Ordering::Acquire) & (1 << (i % BITS)) != 0
    }

    /// Bits set.
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }

    /// How many bits from `first` on (at most `max`, never past the end)
    /// are clear before the first set one.
    pub fn clear_run(&self, first: u64, max: u64) -> u64 {
        let end = first.saturating_add(max).min(self.len);
        (first..end).take_while(|&i| !self.get(i)).count() as u64
    }

    /// Whether any bit in `first..first + n` is set.
    pub fn any(&self, first: u64, n: u64) -> bool {
        (first..first.saturating_add(n).min(self.len)).any(|i| self.get(i))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn set_range_sets_exactly_the_range() {
        for (first, count) in [
            (0, 0),
            (0, 1),
            (3, 61),
            (3, 62),
            (63, 2),
            (0, 200),
            (64, 64),
            (70, 130),
        ] {
            let b = PageBitmap::new(200);
            b.set_range(first, count);
            for i in 0..200 {
                assert_eq!(
                    b.get(i),
                    (first..first + count).contains(&i),
                    "{first}+{count}: bit {i}"
                );
            }
        }
    }

    #[test]
    fn set_clear_count() {
        let b = PageBitmap::new(130);
        assert_eq!(b.len(), 130);
        b.set(0);
        b.set(64);
        b.set(129);
        assert!(b.get(0) && b.get(64) && b.get(129) && !b.get(1));
        assert_eq!(b.count(), 3);
        b.clear(64);
        assert!(!b.get(64));
        assert_eq!(b.count(), 2);
        assert!(b.any(120, 100));
        assert!(!b.any(1, 63));
        assert_eq!(b.clear_run(1, 500), 128, "stops at bit 129");
        assert_eq!(b.clear_run(1, 10), 10, "at most max");
        assert_eq!(b.clear_run(0, 10), 0, "bit 0 is set");
        assert_eq!(b.clear_run(130, 10), 0, "nothing past the end");
        b.clear(129);
        assert_eq!(b.clear_run(100, 500), 30, "never past the end");
    }

    #[test]
    #[should_panic(expected = "outside a bitmap")]
    fn out_of_range_is_a_bug() {
        PageBitmap::new(8).get(8);
    }
}
