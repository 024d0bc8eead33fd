//! Saving a running VM and what a restore reads back: the VM's sections of
//! a snapshot (`vmm-snapshot` is the format).
//!
//! | section | what |
//! |---|---|
//! | manifest `info` | [`VmRecord`]: host kind, vCPU count, the CPUID given, the configuration |
//! | `vm` | [`VmSnapshot`]: kvmclock, the in-kernel PIC pair and IOAPIC, the PIT |
//! | `vcpuN` | [`VcpuSnapshot`]: every register set, MSRs, LAPIC, events, MP state, TSC |
//! | `devices` | [`DevicesSnapshot`]: the UART, the host-signal port, each virtio transport, the balloon, virtio-mem |
//! | `memory` | the memslot layout and which pages hold something (`vmm_memory::snapshot`) |
//! | file `memory` | guest RAM, sparse |
//!
//! [`save::Snapshotter`] parks the vCPUs (each saves its own state), holds
//! every virtio device still, writes everything, lets the guest go on, and
//! only then syncs and renames the snapshot into place.

pub mod postcopy;
pub mod receive;
pub mod restore;
pub mod save;
pub mod send;
pub mod serve;
pub mod stream;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::config::{BalloonOptions, HotplugOptions, SyscallAssistMode};
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::balloon::BalloonSnapshot;
use crate::devices::virtio::mem::MemDeviceSnapshot;
use crate::devices::virtio::mmio::TransportSnapshot;
use crate::vcpu::state::CpuidEntry;

pub use crate::vcpu::state::VcpuSnapshot;
/// The snapshot format this build writes (and the newest it reads).
pub use vmm_snapshot::FORMAT_VERSION;

/// Section names.
pub const VM: &str = "vm";
pub const DEVICES: &str = "devices";
pub const MEMORY: &str = "memory";
/// In a diff snapshot: which pages are its base's
/// (`vmm_memory::snapshot::BasePages`).
pub const MEMORY_BASE: &str = "memory-base";

pub fn vcpu_section(i: usize) -> String {
    format!("vcpu{i}")
}

/// What the manifest says about the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    /// The host it ran on (`KvmFlavor`'s name).
    pub host: String,
    pub vcpus: usize,
    /// The CPUID vCPU 0 was given (every vCPU's is in its section).
    pub cpuid: Vec<CpuidEntry>,
    pub config: SavedConfig,
    /// When it was taken (seconds since the epoch).
    pub created_unix: u64,
}

/// The configuration a restored VM must have again (the rest — fault mode,
/// API socket, metrics, seccomp — is the restoring command's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedConfig {
    /// What it booted (for people: a restore boots nothing).
    pub kernel: String,
    pub cmdline: String,
    pub mem_size: u64,
    pub vcpus: usize,
    pub balloon: Option<BalloonOptions>,
    pub hotplug: Option<HotplugOptions>,
    pub syscall_assist: SyscallAssistMode,
    /// Whether the SYSCALL assist's MSR filter was on.
    pub syscall_filter: bool,
}

/// The VM's in-kernel devices and clock.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    pub clock: kvm_bindings::kvm_clock_data,
    pub pic_master: kvm_bindings::kvm_irqchip,
    pub pic_slave: kvm_bindings::kvm_irqchip,
    pub ioapic: kvm_bindings::kvm_irqchip,
    pub pit: kvm_bindings::kvm_pit_state2,
}

/// The VMM's devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicesSnapshot {
    pub serial: SerialSnapshot,
    /// What a test guest reads on the host-signal port.
    pub signal: u32,
    /// Each virtio transport, in window order.
    pub transports: Vec<TransportSnapshot>,
    pub balloon: Option<BalloonSnapshot>,
    pub mem: Option<MemDeviceSnapshot>,
}

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Format(#[from] vmm_snapshot::SnapshotError),
    #[error("pausing the vCPUs: {0}")]
    Pause(#[from] crate::vcpu::pause::PauseError),
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("saving guest memory: {0}")]
    Memory(String),
    #[error("saving the serial port: {0}")]
    Serial(std::io::Error),
    #[error("a snapshot is being taken already")]
    Busy,
    #[error("a diff snapshot needs a base: this VM has no snapshot since it started (or the last one failed); take a full snapshot first")]
    NoBase,
}
