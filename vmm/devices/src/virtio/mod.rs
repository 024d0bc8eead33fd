//! virtio devices over the virtio-mmio transport (version 2, modern only).
//!
//! - [`mmio`]: the transport: registers, device lifecycle (reset, feature
//!   negotiation, queue set-up validated, `DRIVER_OK`, `NEEDS_RESET`).
//! - [`manager`]: MMIO windows and GSIs, interrupts through irqfds, queue
//!   notifications through ioeventfds served by the event loop (or, where the
//!   host refuses an ioeventfd, by the vCPU's bus dispatch).
//! - [`balloon`] is virtio-balloon, [`mem`] virtio-mem.
//!
//! Queues are rust-vmm's `virtio-queue` over the guest-memory view the
//! [`vmm_memory::MemoryManager`] publishes; a descriptor on a missing page
//! is served by the fault engine on the thread that reads it.

pub mod balloon;
pub mod manager;
pub mod mem;
pub mod mmio;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use vmm_memory::GuestMemory;

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

/// A device's interrupt: the InterruptStatus register and the irqfd that
/// raises its GSI (edge-triggered).
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
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

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::Acquire)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::AcqRel);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::Release);
    }
}

/// A guest mistake a device met (a bad descriptor, a bad register write):
/// counted per device and logged with a rate limit; never fatal to the VMM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct GuestError(pub String);

/// Counters every virtio device keeps (read by metrics).
#[derive(Default)]
pub struct DeviceCounters {
    /// Guest errors (bad register accesses, bad descriptors, bad requests).
    pub guest_errors: AtomicU64,
    /// Queue notifications received.
    pub notifies: AtomicU64,
    /// Descriptor chains completed (put on a used ring).
    pub chains: AtomicU64,
    /// Times the device entered NEEDS_RESET.
    pub needs_reset: AtomicU64,
}

impl DeviceCounters {
    pub fn bump(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// What the transport needs from a device.
pub trait VirtioDevice: Send {
    /// Virtio device ID (5: balloon, 24: memory).
    fn device_type(&self) -> u32;
    /// Short name for logs and metrics labels.
    fn name(&self) -> &'static str;
    /// Features offered (`VIRTIO_F_VERSION_1` included).
    fn features(&self) -> u64;
    /// Maximum size of each queue; the number of queues is its length.
    fn queue_max_sizes(&self) -> &[u16];
    /// Read device config space at `offset` (out of range reads zero).
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Write device config space; a write to a read-only field is a guest
    /// error (returned, the write ignored).
    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), GuestError>;
    /// The driver set `DRIVER_OK` with `acked` features and valid queues.
    fn activate(&mut self, acked: u64);
    /// The driver reset the device.
    fn reset(&mut self);
    /// Process queue `index` after a notification. `Err`: an unrecoverable
    /// guest error; the transport sets `NEEDS_RESET`.
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<(), GuestError>;
    /// The device's counters, shared with the transport and metrics.
    fn counters(&self) -> Arc<DeviceCounters>;
    /// ConfigGeneration: changes whenever the device changes its config.
    fn config_generation(&self) -> u32 {
        0
    }
    /// Called from the event loop about every 100 ms while the device is
    /// active (e.g. to return a stats buffer). `Err` as for `process_queue`.
    fn tick(&mut self, _queues: &mut [Queue], _mem: &GuestMemory) -> Result<(), GuestError> {
        Ok(())
    }
}
