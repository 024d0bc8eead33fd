//! Identity page tables for starting in long mode.
//!
//! 0..4 GiB is mapped with 2 MiB pages (four page directories); RAM above
//! 4 GiB with 1 GiB pages when the CPU offers them (CPUID 0x80000001 EDX.26).
//! All entries have U/S set so that test guests may drop to CPL 3 (which this
//! host runs natively rather than emulated); CR4.SMEP/SMAP are left clear.

use vm_memory::{Bytes, GuestAddress};

use super::layout::{PDPT_ADDR, PD_ADDR, PD_COUNT, PML4_ADDR};
use crate::memory::GuestMemory;

const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const TABLE: u64 = PRESENT | WRITABLE | USER;
/// Entries in one page table (4 KiB of 8-byte entries).
const ENTRIES: usize = 512;

/// Write the tables; returns how many bytes of guest-physical space are mapped.
pub fn setup_identity_map(
    mem: &GuestMemory,
    ram_top: u64,
    gib_pages: bool,
) -> Result<u64, vm_memory::GuestMemoryError> {
    mem.write_obj(PDPT_ADDR | TABLE, GuestAddress(PML4_ADDR))?;
    for pd in 0..PD_COUNT {
        let pd_addr = PD_ADDR + pd * 0x1000;
        mem.write_obj(pd_addr | TABLE, GuestAddress(PDPT_ADDR + pd * 8))?;
        let mut entries = [0u64; ENTRIES];
        for (i, e) in entries.iter_mut().enumerate() {
            *e = ((pd << 30) + ((i as u64) << 21)) | TABLE | HUGE;
        }
        mem.write_slice(as_bytes(&entries), GuestAddress(pd_addr))?;
    }
    let mut mapped = PD_COUNT << 30;
    if gib_pages {
        // One PDPT covers 512 GiB.
        let mut gib = PD_COUNT;
        while gib < ENTRIES as u64 && (gib << 30) < ram_top {
            mem.write_obj(
                (gib << 30) | TABLE | HUGE,
                GuestAddress(PDPT_ADDR + gib * 8),
            )?;
            gib += 1;
        }
        mapped = gib << 30;
    }
    Ok(mapped)
}

fn as_bytes(e: &[u64; ENTRIES]) -> &[u8] {
    // SAFETY: u64 has no padding; the slice covers exactly the array.
    unsafe { std::slice::from_raw_parts(e.as_ptr().cast::<u8>(), std::mem::size_of_val(e)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn maps_low_4g_with_2m_pages() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let mapped = setup_identity_map(&mem, 16 << 20, false).unwrap();
        assert_eq!(mapped, 4 << 30);
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_ADDR);
        let pd1_5: u64 = mem
            .read_obj(GuestAddress(PD_ADDR + 0x1000 + 5 * 8))
            .unwrap();
        assert_eq!(pd1_5 & !0xfff, (1 << 30) + (5 << 21));
        assert_ne!(pd1_5 & HUGE, 0);
    }

    #[test]
    fn maps_high_ram_with_1g_pages() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mapped = setup_identity_map(&mem, 6 << 30, true).unwrap();
        assert_eq!(mapped, 6 << 30);
        let e: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 5 * 8)).unwrap();
        assert_eq!(e & !0xfff, 5 << 30);
    }
}
