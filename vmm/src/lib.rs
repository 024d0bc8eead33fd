//! A KVM virtual machine monitor whose vCPU threads serve their own
//! guest-memory (stage-2) faults.
//!
//! Module map (see `docs/ARCHITECTURE.md`):
//! - [`config`]: validated VM configuration and size parsing.
//! - [`host`]: what KVM this host has (hardware or PVM) and its limits.
//! - [`memory`]: guest RAM, the memslot table and run-time memslot changes.
//! - [`fault`]: the stage-2 fault engine (speculative install, slow path,
//!   handler threads, SIGBUS).
//! - [`boot`]: boot images (ELF, bzImage, decompression, boot_params).
//! - [`arch`]: x86_64 boot state (page tables, GDT, registers, CPUID, MSRs,
//!   ACPI).
//! - [`devices`]: port-I/O and MMIO buses and the legacy devices.
//! - [`vcpu`]: the vCPU thread loop and exit dispatch.
//! - [`vm`]: builds a VM from a configuration and runs it to its end.
//! - [`exit`]: how any thread ends the VM and with what status.

pub use vmm_counters as counters;
pub use vmm_devices as devices;
pub use vmm_exit as exit;
pub use vmm_fault as fault;
pub use vmm_memory as memory;

pub mod api;
pub mod arch;
pub mod boot;
pub mod config;
pub mod host;
pub mod http1;
pub mod logger;
pub mod metrics;
pub mod seccomp;
pub mod summary;
pub mod terminal;
pub mod vcpu;
pub mod vm;
