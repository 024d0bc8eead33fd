//! A KVM virtual machine monitor whose vCPU threads serve their own
//! guest-memory (stage-2) faults.
//!
//! Module map (see `docs/ARCHITECTURE.md`):
//! - [`config`]: validated VM configuration and size parsing.
//! - [`host`]: what KVM this host has (hardware or PVM) and its limits.
//! - [`memory`]: guest RAM, the memslot table and run-time memslot changes.
//! - [`fault`]: the stage-2 fault engine (speculative install, slow path,
//!   handler threads, SIGBUS).
//! - [`loader`]: ELF loading of test guests and kernels.
//! - [`arch`]: x86_64 boot state (page tables, GDT, registers, CPUID, MSRs).
//! - [`devices`]: port-I/O and MMIO buses and the legacy devices.
//! - [`vcpu`]: the vCPU thread loop and exit dispatch.
//! - [`vm`]: builds a VM from a configuration and runs it to its end.
//! - [`exit`]: how any thread ends the VM and with what status.

#[cfg(not(loom))]
pub mod arch;
#[cfg(not(loom))]
pub mod bench;
#[cfg(not(loom))]
pub mod boot;
#[cfg(not(loom))]
pub mod config;
#[cfg(not(loom))]
pub mod devices;
#[cfg(not(loom))]
pub mod exit;
#[cfg(not(loom))]
pub mod fault;
#[cfg(not(loom))]
pub mod host;
#[cfg(not(loom))]
pub mod loader;
#[cfg(not(loom))]
pub mod logger;
pub mod memory;
#[cfg(not(loom))]
pub mod metrics;
#[cfg(not(loom))]
pub mod summary;
pub mod sync;
#[cfg(not(loom))]
pub mod vcpu;
#[cfg(not(loom))]
pub mod vm;

// Under `--cfg loom` only the memslot protocol (`memory::slots`, `sync`) is
// built: the rest uses std primitives that loom cannot model.

/// The memory stress guest (`guest-images/memstress`), used by benchmarks.
pub static MEMSTRESS_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/memstress.elf"));

/// The default guest embedded in the binary (built from `guest-images/demo`).
pub static DEFAULT_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));
