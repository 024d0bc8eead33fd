//! x86_64: start vCPUs directly in 64-bit long mode (Firecracker-style): identity
//! page tables, a flat GDT, control registers, EFER, MSRs, FPU, LAPIC, CPUID.

pub mod acpi;
pub mod bootparams;
pub mod bzimage;
pub mod cpuid;
pub mod decompress;
pub mod e820;
pub mod gdt;
pub mod layout;
pub mod paging;
pub mod regs;
