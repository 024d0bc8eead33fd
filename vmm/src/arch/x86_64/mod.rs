//! x86_64: start vCPUs directly in 64-bit long mode (Firecracker-style): identity
//! page tables, a flat GDT, control registers, EFER, MSRs, FPU, LAPIC, CPUID.

pub mod acpi;
pub mod cpuid;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod paging;
pub mod regs;

use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// Write the identity page tables, the GDT and an empty IDT (the image and
/// its command line come after). `gib_pages`: the host's CPUs support 1 GiB
/// pages, so RAM above 4 GiB is mapped too.
pub fn write_boot_structures(
    mem: &GuestMemory,
    ram_top: u64,
    gib_pages: bool,
) -> Result<(), vm_memory::GuestMemoryError> {
    let mapped = paging::setup_identity_map(mem, ram_top, gib_pages)?;
    if mapped < ram_top {
        log::warn!(
            "identity map covers {mapped:#x} bytes of {ram_top:#x}: the host has no 1 GiB pages"
        );
    }
    for (i, e) in gdt::BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))
}

/// CPUID.80000001H:EDX.Page1GB in the supported set.
pub fn has_1g_pages(supported: &kvm_bindings::CpuId) -> bool {
    const PAGE_1GB: u32 = 1 << 26;
    cpuid::leaf(supported, 0x8000_0001, 0).is_some_and(|e| e.edx & PAGE_1GB != 0)
}
