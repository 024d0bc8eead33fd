//! A KVM virtual machine monitor whose vCPU threads serve their own
//! guest-memory (stage-2) faults.
//!
//! Module map (see `docs/ARCHITECTURE.md`):
//! - [`config`]: validated VM configuration and size parsing.
//! - [`host`]: what KVM this host has (hardware or PVM) and its limits.
//! - [`memory`]: guest RAM and its memslots.
//! - [`loader`]: ELF loading of test guests and kernels.
//! - [`arch`]: x86_64 boot state (page tables, GDT, registers, CPUID, MSRs).
//! - [`devices`]: port-I/O and MMIO buses and the legacy devices.
//! - [`vcpu`]: the vCPU thread loop and exit dispatch.
//! - [`vm`]: builds a VM from a configuration and runs it to its end.
//! - [`exit`]: how any thread ends the VM and with what status.

pub mod arch;
pub mod config;
pub mod devices;
pub mod exit;
pub mod host;
pub mod loader;
pub mod logger;
pub mod memory;
pub mod vcpu;
pub mod vm;

/// The default guest embedded in the binary (built from `guest-images/demo`).
pub static DEFAULT_GUEST: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));
