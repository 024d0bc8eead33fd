//! x86_64: start vCPUs directly in 64-bit long mode (Firecracker-style): identity
//! page tables, a flat GDT, control registers, EFER, MSRs, FPU, LAPIC, CPUID.

pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod paging;
pub mod regs;
