//! A KVM virtual machine monitor whose vCPU threads serve their own
//! guest-memory (stage-2) faults.
//!
//! Module map (`docs/ARCHITECTURE.md` says what each may import;
//! `tests/layers.rs` holds the code to it). The layers below this crate,
//! re-exported under the names the modules use:
//! - [`exit`] (`vmm-exit`): how any thread ends the VM and with what status.
//! - [`counters`] (`vmm-counters`): every metric declared once, as a table.
//! - [`memory`] (`vmm-memory`): guest RAM, its memslots and run-time
//!   changes (hotplug, removal, discards, plug/unplug).
//! - [`fault`] (`vmm-fault`): the stage-2 fault engine (speculative
//!   install, slow path, handler threads, SIGBUS) and its counters.
//! - [`devices`] (`vmm-devices`): the port-I/O and MMIO buses, the legacy
//!   devices, and virtio devices on one virtio layer.
//!
//! This crate's modules:
//! - [`host`]: what KVM this host has (hardware or PVM) and its limits.
//! - [`config`]: validated VM configuration; size and duration parsing.
//! - [`arch`]: x86_64 boot state (page tables, GDT, registers, CPUID,
//!   MSRs, e820, ACPI).
//! - [`boot`]: boot images (ELF, bzImage, decompression, boot_params) and
//!   each vCPU's boot configuration.
//! - [`vcpu`]: the vCPU thread loop, exit decoding and handling, PVM assists.
//! - [`seccomp`]: each VMM thread's system-call filter.
//! - [`snapshot`]: saving a running VM (pause, every state, sparse RAM) and
//!   reading a snapshot back, checked, for a restore.
//! - [`api`]: the control plane, its HTTP/JSON server and the `vmm ctl` client.
//! - [`metrics`]: the metrics endpoint (OpenMetrics and JSON).
//! - [`http1`]: one HTTP/1.1 connection, for the API and the metrics.
//! - [`summary`]: the table printed when a VM ends.
//! - [`logger`], [`terminal`]: the stderr logger; raw console mode.
//! - [`vm`]: builds a VM from a configuration (or restores one from a
//!   snapshot) and runs it to its end.

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
pub mod snapshot;
pub mod summary;
pub mod terminal;
pub mod vcpu;
pub mod vm;
