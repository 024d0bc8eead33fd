//! The e820 memory map Linux reads from `boot_params`.
//!
//! RAM comes from the layout's ranges (split around the 32-bit MMIO gap);
//! the legacy hole [0x9fc00, 0x100000) — EBDA, VGA, option ROMs, BIOS,
//! where the ACPI tables live — is always reported reserved, so Linux keeps
//! off it. The MMIO gap is simply not listed: Linux treats unlisted space
//! below 4 GiB as free for MMIO (the LAPIC and IOAPIC pages need no entry).

use thiserror::Error;

use crate::memory::RamRange;

/// Start of the Extended BIOS Data Area: the end of low RAM.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the legacy hole: RAM above 1 MiB starts here.
pub const LEGACY_HOLE_END: u64 = 0x10_0000;
/// Entries `boot_params` holds (`E820_MAX_ENTRIES_ZEROPAGE`).
pub const E820_MAX_ENTRIES: usize = linux_loader::loader::bootparam::E820_MAX_ENTRIES_ZEROPAGE;

/// An e820 range type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

impl E820Entry {
    pub fn end(&self) -> u64 {
        self.addr + self.size
    }
}

#[derive(Debug, Error)]
pub enum E820Error {
    #[error("guest RAM is empty: no e820 RAM entry to give the kernel")]
    NoRam,
    #[error("guest RAM range [{start:#x}..+{size:#x}) overflows the 64-bit address space")]
    Overflow { start: u64, size: u64 },
    #[error("guest RAM ranges overlap or are unsorted: [{a_start:#x}..{a_end:#x}) and [{b_start:#x}..{b_end:#x})")]
    Overlap {
        a_start: u64,
        a_end: u64,
        b_start: u64,
        b_end: u64,
    },
    #[error("the e820 map needs {0} entries; boot_params holds at most 128")]
    TooMany(usize),
}

/// Build the e820 map for `ram` (sorted, non-overlapping ranges).
pub fn build_e820(ram: &[RamRange]) -> Result<Vec<E820Entry>, E820Error> {
    let ranges: Vec<&RamRange> = ram.iter().filter(|r| r.size > 0).collect();
    if ranges.is_empty() {
        return Err(E820Error::NoRam);
    }
    for r in &ranges {
        if r.gpa.checked_add(r.size).is_none() {
            return Err(E820Error::Overflow {
                start: r.gpa,
                size: r.size,
            });
        }
    }
    for w in ranges.windows(2) {
        if w[1].gpa < w[0].end() {
            return Err(E820Error::Overlap {
                a_start: w[0].gpa,
                a_end: w[0].end(),
                b_start: w[1].gpa,
                b_end: w[1].end(),
            });
        }
    }
    // RAM clipped around the legacy hole, then the hole itself.
    let mut map = Vec::new();
    for r in &ranges {
        for (addr, end) in [
            (r.gpa, r.end().min(EBDA_START)),
            (r.gpa.max(LEGACY_HOLE_END), r.end()),
        ] {
            if end > addr {
                map.push(E820Entry {
                    addr,
                    size: end - addr,
                    kind: E820Type::Ram,
                });
            }
        }
    }
    map.push(E820Entry {
        addr: EBDA_START,
        size: LEGACY_HOLE_END - EBDA_START,
        kind: E820Type::Reserved,
    });
    map.sort_by_key(|e| e.addr);
    if map.len() > E820_MAX_ENTRIES {
        return Err(E820Error::TooMany(map.len()));
    }
    Ok(map)
}

/// Highest RAM address below 4 GiB (exclusive end), per the map.
pub fn ram_top_below_4g(map: &[E820Entry]) -> u64 {
    map.iter()
        .filter(|e| e.kind == E820Type::Ram && e.addr < 1 << 32)
        .map(|e| e.end().min(1 << 32))
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout;

    fn e(addr: u64, end: u64, kind: E820Type) -> E820Entry {
        E820Entry {
            addr,
            size: end - addr,
            kind,
        }
    }

    #[test]
    fn small_guest_gets_low_ram_hole_and_high_ram() {
        let map = build_e820(&layout::ram_ranges(512 << 20)).unwrap();
        assert_eq!(
            map,
            vec![
                e(0, EBDA_START, E820Type::Ram),
                e(EBDA_START, LEGACY_HOLE_END, E820Type::Reserved),
                e(LEGACY_HOLE_END, 512 << 20, E820Type::Ram),
            ]
        );
        assert_eq!(ram_top_below_4g(&map), 512 << 20);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let map = build_e820(&layout::ram_ranges(6 << 30)).unwrap();
        assert_eq!(
            map,
            vec![
                e(0, EBDA_START, E820Type::Ram),
                e(EBDA_START, LEGACY_HOLE_END, E820Type::Reserved),
                e(LEGACY_HOLE_END, layout::MMIO_GAP_START, E820Type::Ram),
                e(
                    layout::MMIO_GAP_END,
                    layout::MMIO_GAP_END + (6 << 30) - layout::MMIO_GAP_START,
                    E820Type::Ram
                ),
            ]
        );
        assert_eq!(ram_top_below_4g(&map), layout::MMIO_GAP_START);
        // Nothing in the gap is RAM.
        assert!(map.iter().all(|x| x.kind != E820Type::Ram
            || x.end() <= layout::MMIO_GAP_START
            || x.addr >= layout::MMIO_GAP_END));
        let ram: u64 = map
            .iter()
            .filter(|x| x.kind == E820Type::Ram)
            .map(|x| x.size)
            .sum();
        assert_eq!(ram, (6 << 30) - (LEGACY_HOLE_END - EBDA_START));
    }

    #[test]
    fn tiny_guest_below_one_mib() {
        let map = build_e820(&[RamRange {
            gpa: 0,
            size: 0x8_0000,
        }])
        .unwrap();
        assert_eq!(
            map,
            vec![
                e(0, 0x8_0000, E820Type::Ram),
                e(EBDA_START, LEGACY_HOLE_END, E820Type::Reserved),
            ]
        );
    }

    #[test]
    fn ram_starting_above_the_hole_keeps_order() {
        let map = build_e820(&[RamRange {
            gpa: 0x20_0000,
            size: 0x10_0000,
        }])
        .unwrap();
        assert_eq!(
            map,
            vec![
                e(EBDA_START, LEGACY_HOLE_END, E820Type::Reserved),
                e(0x20_0000, 0x30_0000, E820Type::Ram),
            ]
        );
    }

    #[test]
    fn map_is_sorted_and_disjoint() {
        for size in [1u64 << 20, 64 << 20, 3 << 30, 4 << 30, 64 << 30] {
            let map = build_e820(&layout::ram_ranges(size)).unwrap();
            for w in map.windows(2) {
                assert!(w[0].end() <= w[1].addr, "{size:#x}: {map:x?}");
            }
        }
    }

    #[test]
    fn bad_ranges_are_rejected() {
        assert!(matches!(build_e820(&[]), Err(E820Error::NoRam)));
        let overlapping = [
            RamRange {
                gpa: 0,
                size: 0x20_0000,
            },
            RamRange {
                gpa: 0x10_0000,
                size: 0x10_0000,
            },
        ];
        assert!(matches!(
            build_e820(&overlapping),
            Err(E820Error::Overlap { .. })
        ));
        let wrapping = [RamRange {
            gpa: u64::MAX - 10,
            size: 100,
        }];
        assert!(matches!(
            build_e820(&wrapping),
            Err(E820Error::Overflow { .. })
        ));
    }

    #[test]
    fn more_than_128_entries_is_an_error() {
        let many: Vec<RamRange> = (0..130u64)
            .map(|i| RamRange {
                gpa: (1 << 32) + i * 0x20_0000,
                size: 0x10_0000,
            })
            .collect();
        let err = build_e820(&many).unwrap_err();
        assert!(matches!(err, E820Error::TooMany(131)), "{err}");
        assert!(build_e820(&many[..127]).is_ok());
    }
}
