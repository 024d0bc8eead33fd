//! Guest-physical layout of boot structures and RAM.

use crate::memory::RamRange;

/// GDT (null, null, code64 0x10, data 0x18, TSS 0x20) as the Linux 64-bit
/// boot protocol expects (`__BOOT_CS` = 0x10, `__BOOT_DS` = 0x18).
pub const GDT_ADDR: u64 = 0x500;
/// An empty IDT (limit 0): any exception before the guest installs its own
/// triple-faults, which the VMM reports.
pub const IDT_ADDR: u64 = 0x520;
/// Linux `boot_params` (zero page).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Identity page tables: PML4, PDPT, four PDs covering 0..4 GiB.
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const PD_COUNT: u64 = 4;
/// Command line (guest-visible, NUL terminated).
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Longest command line accepted, NUL included (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX: usize = 2048;
/// Where RAM above the legacy area starts; ELF images load at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The 32-bit MMIO hole below 4 GiB: RAM is split around it.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const MMIO_GAP_END: u64 = 1 << 32;
/// KVM's TSS for real-mode emulation: three pages below the BIOS area.
pub const KVM_TSS_ADDR: usize = 0xfffb_d000;

/// Split `mem_size` bytes of RAM around the MMIO gap.
pub fn ram_ranges(mem_size: u64) -> Vec<RamRange> {
    if mem_size <= MMIO_GAP_START {
        vec![RamRange {
            gpa: 0,
            size: mem_size,
        }]
    } else {
        vec![
            RamRange {
                gpa: 0,
                size: MMIO_GAP_START,
            },
            RamRange {
                gpa: MMIO_GAP_END,
                size: mem_size - MMIO_GAP_START,
            },
        ]
    }
}

/// Alignment of a hotplug region (Linux's x86_64 memory-block size).
pub const HOTPLUG_ALIGN: u64 = 128 << 20;

/// Where a hotplug region of `size` bytes goes: above all boot RAM, 128 MiB
/// aligned, never across the MMIO gap.
pub fn hotplug_base(mem_size: u64, size: u64) -> u64 {
    let top = ram_ranges(mem_size)
        .iter()
        .map(RamRange::end)
        .max()
        .unwrap_or(0);
    let base = top.next_multiple_of(HOTPLUG_ALIGN);
    if base < MMIO_GAP_START && base + size > MMIO_GAP_START {
        MMIO_GAP_END
    } else {
        base
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hotplug_regions_sit_above_ram_and_off_the_gap() {
        use super::*;
        assert_eq!(hotplug_base(512 << 20, 1 << 30), 512 << 20);
        assert_eq!(hotplug_base(500 << 20, 128 << 20), 512 << 20);
        assert_eq!(hotplug_base(2 << 30, 2 << 30), MMIO_GAP_END);
        assert_eq!(hotplug_base(4 << 30, 1 << 30), 5 << 30);
    }

    use super::*;

    #[test]
    fn ranges_split_around_the_gap() {
        assert_eq!(
            ram_ranges(512 << 20),
            vec![RamRange {
                gpa: 0,
                size: 512 << 20
            }]
        );
        let r = ram_ranges(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].end(), MMIO_GAP_START);
        assert_eq!(r[1].gpa, MMIO_GAP_END);
        assert_eq!(r[0].size + r[1].size, 4 << 30);
    }
}

/// A virtio-mmio device as the guest is told about it (command line, DSDT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDeviceInfo {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}
