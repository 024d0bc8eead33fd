//! virtio devices over the virtio-mmio transport (version 2, modern only),
//! on one common layer.
//!
//! - [`mmio`]: the transport, the one place that speaks virtio to the
//!   driver: registers, feature negotiation (`VIRTIO_F_VERSION_1` is always
//!   offered and required), config space reads and the config generation,
//!   queue set-up, validation, activation and reset, walking the rings,
//!   completing chains, interrupts, `NEEDS_RESET`, and the counters of
//!   [`VIRTIO_METRICS`]. Its state is what a snapshot of the device saves.
//! - [`queue`]: one descriptor chain as a device sees it ([`Chain`]):
//!   bounds-checked reads of what the driver wrote, the response written
//!   back, and what the device completes ([`Completions`]).
//! - [`manager`]: MMIO windows and GSIs, interrupts through irqfds, queue
//!   notifications through ioeventfds served by the event loop.
//! - A device ([`balloon`], [`mem`]) implements [`VirtioDevice`]: its ID,
//!   features, queue sizes, config bytes, and what one chain means.
//!
//! Queues are rust-vmm's `virtio-queue` over the guest-memory view the
//! memory manager publishes; a descriptor on a missing page is served by
//! the fault engine on the thread that reads it.

pub mod balloon;
pub mod manager;
pub mod mem;
pub mod mmio;
pub mod queue;

use std::sync::atomic::{AtomicU32, Ordering};

use thiserror::Error;
use vmm_counters::{metrics, Counters, Metric};
use vmm_sys_util::eventfd::EventFd;

pub use queue::{Chain, ChainError, Completions};

/// `VIRTIO_F_VERSION_1`: the only kind of device this VMM offers.
pub const VIRTIO_F_VERSION_1: u32 = 32;

/// Device status bits (virtio 1.2 §2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// InterruptStatus bits.
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// How a device reaches its driver: the InterruptStatus register, the
/// irqfd that raises its GSI (edge-triggered), and the config generation.
pub struct Interrupt {
    status: AtomicU32,
    generation: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            generation: AtomicU32::new(0),
            evt,
        }
    }

    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Set `bits` in InterruptStatus and raise the GSI.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        if let Err(e) = self.evt.write(1) {
            log::warn!("virtio interrupt eventfd: {e}");
        }
    }

    /// The device changed its config space: a new ConfigGeneration and a
    /// config interrupt.
    pub fn config_changed(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.trigger(INT_CONFIG);
    }

    pub fn config_generation(&self) -> u32 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }

    /// A saved InterruptStatus and generation; a pending interrupt is
    /// raised again (the restored guest may not have taken it).
    pub fn restore(&self, status: u32, generation: u32) {
        self.generation.store(generation, Ordering::Release);
        self.status.store(0, Ordering::Release);
        if status != 0 {
            self.trigger(status);
        }
    }
}

metrics! {
    /// What every virtio device counts (labelled with the device's name).
    pub enum VirtioStat in VIRTIO_METRICS {
        Notifies = Metric::counter(
            "vmm_virtio_notifies",
            "notifies",
            "Queue notifications a virtio device received",
        ),
        Chains = Metric::counter(
            "vmm_virtio_chains",
            "chains",
            "Descriptor chains a virtio device completed",
        ),
        GuestErrors = Metric::counter(
            "vmm_virtio_guest_errors",
            "guest_errors",
            "Guest errors a virtio device met (bad registers, descriptors, requests)",
        ),
        NeedsReset = Metric::counter(
            "vmm_virtio_needs_reset",
            "needs_reset",
            "Times a virtio device entered NEEDS_RESET",
        ),
    }
}

/// A device's [`VIRTIO_METRICS`] values (any thread may bump them).
pub type DeviceCounters = Counters<VirtioStat, { VirtioStat::COUNT }>;

/// A guest mistake on the register window or in config space: counted per
/// device and logged with a rate limit; never fatal to the VMM.
#[derive(Debug, Error)]
pub enum GuestError {
    #[error("{len}-byte register {access} at {offset:#x} (registers are 32-bit, aligned)")]
    RegisterWidth {
        access: &'static str,
        offset: u64,
        len: usize,
    },
    #[error("read of write-only or reserved register {0:#x}")]
    ReadOfWriteOnly(u64),
    #[error("write of {value:#x} to read-only or reserved register {offset:#x}")]
    WriteToReadOnly { offset: u64, value: u32 },
    #[error("status {new:#x} clears bits of {old:#x} (only a reset may)")]
    StatusCleared { old: u32, new: u32 },
    #[error("features {acked:#x} refused (not offered: {unoffered:#x}; VERSION_1 is required)")]
    FeaturesRefused { acked: u64, unoffered: u64 },
    #[error("DriverFeatures written in status {0:#x}")]
    FeaturesOutOfPhase(u32),
    #[error("features {value:#x} in word {word}, beyond bit 63")]
    FeaturesBeyond64 { word: u32, value: u32 },
    #[error("DRIVER_OK without FEATURES_OK")]
    DriverOkEarly,
    #[error("DRIVER_OK with queue {0} outside guest RAM: device needs a reset")]
    QueueOutsideRam(usize),
    #[error("{what} for queue {queue} outside queue set-up (status {status:#x})")]
    QueueSetupOutOfPhase {
        what: &'static str,
        queue: usize,
        status: u32,
    },
    #[error("{what} for queue {queue}, which is ready")]
    QueueAlreadyReady { what: &'static str, queue: usize },
    #[error("{what} for queue {queue}, which does not exist")]
    NoSuchQueue { what: &'static str, queue: u32 },
    #[error("queue {queue} size {size}: {error}")]
    QueueSize {
        queue: usize,
        size: u32,
        error: virtio_queue::Error,
    },
    #[error("queue {queue} not made ready: {error}")]
    QueueAddress {
        queue: usize,
        error: virtio_queue::Error,
    },
    #[error("QueueReady {0}")]
    QueueReadyValue(u32),
    #[error("notify of queue {0} before DRIVER_OK")]
    NotifyEarly(u32),
    #[error("notify of queue {0}, which is not ready")]
    NotifyNotReady(u32),
    #[error("{len}-byte config write at {offset:#x}: {why}")]
    ConfigWrite {
        offset: u64,
        len: usize,
        why: &'static str,
    },
    #[error("queue {queue}: {error}")]
    Queue { queue: usize, error: ChainError },
}

/// A saved device that does not fit the device it is restored into.
#[derive(Debug, Error)]
#[error("{device}: {why}")]
pub struct DeviceRestoreError {
    pub device: &'static str,
    pub why: String,
}

/// What a virtio device implements. The transport does the rest: it reads
/// and completes the chains and raises the interrupts, so a device is its
/// ID, features, config bytes and what one chain means.
pub trait VirtioDevice: Send {
    /// Virtio device ID (5: balloon, 24: memory).
    fn device_type(&self) -> u32;
    /// Short name for logs and metrics labels.
    fn name(&self) -> &'static str;
    /// Device features offered (the transport adds `VIRTIO_F_VERSION_1`).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];
    /// The device config space as it is now (the transport serves reads,
    /// out of range as zero).
    fn config(&self) -> Vec<u8>;
    /// A driver write to config space; read-only unless the device says.
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), GuestError> {
        Err(GuestError::ConfigWrite {
            offset,
            len: data.len(),
            why: "config space is read-only",
        })
    }
    /// The driver set `DRIVER_OK` with `acked` features and valid queues.
    fn activate(&mut self, acked: u64);
    /// The driver reset the device (queues are the transport's).
    fn reset(&mut self);
    /// One available chain of queue `queue`. Complete it (or a chain held
    /// earlier) through `done`; a chain neither completed nor held is the
    /// device's to complete later (in `tick`). `Err`: the chain was
    /// malformed; the transport completes it empty and counts a guest
    /// error, or resets the device if the error says so.
    fn process(
        &mut self,
        queue: usize,
        chain: &Chain,
        done: &mut Completions,
    ) -> Result<(), ChainError>;
    /// About every 100 ms while the device is active: timed work, such as
    /// completing a held chain.
    fn tick(&mut self, _done: &mut Completions) {}
}
