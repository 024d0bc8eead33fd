//! The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2): the register
//! window a driver sees, the device lifecycle behind it, and the common
//! work of every device (walking the rings, completing chains, raising
//! interrupts, counting), so that a device is only what its chains mean.
//!
//! Lifecycle rules enforced here (each violation is a [`GuestError`]:
//! counted, logged with a rate limit, never fatal to the VMM):
//! - writing 0 to Status resets the device, its queues and its interrupt;
//! - `FEATURES_OK` stays clear if the driver accepted a feature the device
//!   did not offer, or did not accept `VIRTIO_F_VERSION_1`;
//! - queue registers are writable only between `FEATURES_OK` and
//!   `DRIVER_OK`, on a queue that is not ready; `QueueReady` = 1 validates
//!   size (a power of two, at most QueueNumMax) and ring alignment;
//! - `DRIVER_OK` validates every ready queue against guest RAM and then
//!   activates the device; a queue outside RAM sets `NEEDS_RESET` instead;
//! - notifications before `DRIVER_OK`, or for a queue that does not exist,
//!   are ignored;
//! - a malformed chain is completed empty and counted; a broken ring, or a
//!   queue the device does not use, sets `NEEDS_RESET` and raises a config
//!   interrupt: that device stops until the driver resets it, and nothing
//!   else is affected.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueOwnedT, QueueState, QueueT};
use vm_memory::GuestAddress;
use vmm_memory::{GuestMemory, MemoryManager};

use super::{
    status, Chain, ChainError, Completions, DeviceCounters, GuestError, Interrupt, VirtioDevice,
    VirtioStat, INT_USED_RING, VIRTIO_F_VERSION_1,
};
use crate::{lock, BusDevice, RateLimit};

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;
/// Where device config space starts in the window.
pub const CONFIG_OFFSET: u64 = 0x100;
/// The window's size (one page).
pub const WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (ioeventfds match on it).
pub const QUEUE_NOTIFY: u64 = 0x50;

/// Register offsets in the window (virtio 1.2 §4.2.2).
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::QUEUE_NOTIFY;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    /// QueueDesc{Low,High} at 0x80/0x84, QueueDriver{Low,High} (avail ring)
    /// at 0x90/0x94, QueueDevice{Low,High} (used ring) at 0xa0/0xa4.
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// One queue as a snapshot saves it (virtio-queue's `QueueState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The transport's state: all a device's virtio state (the device's own
/// state is its own).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueSnapshot>,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub early: u64,
}

/// A saved transport that does not fit this device.
#[derive(Debug, thiserror::Error)]
pub enum TransportRestoreError {
    #[error("saved as device type {saved}, restored into type {here}")]
    DeviceType { saved: u32, here: u32 },
    #[error("saved with {saved} queues, the device has {here}")]
    Queues { saved: usize, here: usize },
    #[error("queue {queue}: {error}")]
    Queue {
        queue: usize,
        error: virtio_queue::Error,
    },
}

/// Ring addresses as the driver writes them, 32 bits at a time.
#[derive(Default, Clone, Copy)]
struct RingAddrs {
    desc: u64,
    avail: u64,
    used: u64,
}

pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    counters: Arc<DeviceCounters>,
    interrupt: Arc<Interrupt>,
    memory: Arc<MemoryManager>,
    device_type: u32,
    name: &'static str,
    offered: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    queues: Vec<Queue>,
    addrs: Vec<RingAddrs>,
    /// Queues notified after set-up but before DRIVER_OK (Linux's balloon
    /// driver kicks its stats queue there): served at activation.
    early: u64,
    /// Restored: serve every ready queue once at the next tick (a kick
    /// the saved VM had not served yet is not lost).
    rescan: bool,
    log: RateLimit,
}

fn set_half(v: &mut u64, high: bool, half: u32) {
    *v = if high {
        (*v & 0xffff_ffff) | (u64::from(half) << 32)
    } else {
        (*v & !0xffff_ffff) | u64::from(half)
    };
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        interrupt: Arc<Interrupt>,
        memory: Arc<MemoryManager>,
    ) -> Self {
        let (device_type, name, offered, queues) = {
            let d = lock(&device);
            let queues: Vec<Queue> = d
                .queue_max_sizes()
                .iter()
                .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
                .collect();
            (
                d.device_type(),
                d.name(),
                d.features() | 1 << VIRTIO_F_VERSION_1,
                queues,
            )
        };
        let n = queues.len();
        Self {
            device,
            counters: Arc::new(DeviceCounters::default()),
            interrupt,
            memory,
            device_type,
            name,
            offered,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            queues,
            addrs: vec![RingAddrs::default(); n],
            early: 0,
            rescan: false,
            log: RateLimit::new(10),
        }
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The device's [`super::VIRTIO_METRICS`] values.
    pub fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    pub fn save(&self) -> TransportSnapshot {
        TransportSnapshot {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueSnapshot {
                        size: s.size,
                        ready: s.ready,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx: s.event_idx_enabled,
                        desc: s.desc_table,
                        avail: s.avail_ring,
                        used: s.used_ring,
                    }
                })
                .collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            early: self.early,
        }
    }

    /// Put a saved transport back (before the guest runs; the device's own
    /// state is restored by its owner). An active device is told its
    /// features again; its queues are served once at the first tick, for
    /// notifications that were in flight when it was saved.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), TransportRestoreError> {
        if s.device_type != self.device_type {
            return Err(TransportRestoreError::DeviceType {
                saved: s.device_type,
                here: self.device_type,
            });
        }
        if s.queues.len() != self.queues.len() {
            return Err(TransportRestoreError::Queues {
                saved: s.queues.len(),
                here: self.queues.len(),
            });
        }
        for (i, (q, saved)) in self.queues.iter_mut().zip(&s.queues).enumerate() {
            let state = QueueState {
                max_size: q.max_size(),
                next_avail: saved.next_avail,
                next_used: saved.next_used,
                event_idx_enabled: saved.event_idx,
                size: saved.size,
                ready: saved.ready,
                desc_table: saved.desc,
                avail_ring: saved.avail,
                used_ring: saved.used,
            };
            *q = Queue::try_from(state)
                .map_err(|error| TransportRestoreError::Queue { queue: i, error })?;
            self.addrs[i] = RingAddrs {
                desc: saved.desc,
                avail: saved.avail,
                used: saved.used,
            };
        }
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.driver_features = s.driver_features;
        self.queue_sel = s.queue_sel;
        self.early = s.early;
        self.interrupt
            .restore(s.interrupt_status, s.config_generation);
        if self.status & status::DRIVER_OK != 0 {
            lock(&self.device).activate(self.driver_features);
            self.rescan = true;
        }
        Ok(())
    }

    /// A guest mistake: count it on the device, log it (rate-limited).
    fn guest_error(&self, e: GuestError) {
        self.counters.add_shared(VirtioStat::GuestErrors, 1);
        if let Some(suppressed) = self.log.check() {
            let more = if suppressed > 0 {
                format!(" ({suppressed} similar messages suppressed)")
            } else {
                String::new()
            };
            log::warn!("virtio-{}: guest error: {e}{more}", self.name);
        }
    }

    fn reset(&mut self) {
        self.status = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.device_features_sel = 0;
        self.queue_sel = 0;
        self.early = 0;
        for q in &mut self.queues {
            q.reset();
        }
        self.addrs
            .iter_mut()
            .for_each(|a| *a = RingAddrs::default());
        self.interrupt.clear();
        lock(&self.device).reset();
    }

    /// The driver must be between `FEATURES_OK` and `DRIVER_OK` to set queues
    /// up, and the selected queue must exist and not be ready.
    fn queue_for_setup(&mut self, what: &'static str) -> Option<usize> {
        let i = self.queue_sel as usize;
        let phase_ok =
            self.status & status::FEATURES_OK != 0 && self.status & status::DRIVER_OK == 0;
        let e = match self.queues.get(i) {
            Some(q) if phase_ok && !q.ready() => return Some(i),
            Some(_) if !phase_ok => GuestError::QueueSetupOutOfPhase {
                what,
                queue: i,
                status: self.status,
            },
            Some(_) => GuestError::QueueAlreadyReady { what, queue: i },
            None => GuestError::NoSuchQueue {
                what,
                queue: self.queue_sel,
            },
        };
        self.guest_error(e);
        None
    }

    /// `QueueReady` = 1: validate what was set up and mark the queue ready.
    fn queue_ready(&mut self, i: usize) {
        let a = self.addrs[i];
        let q = &mut self.queues[i];
        let r = q
            .try_set_desc_table_address(GuestAddress(a.desc))
            .and_then(|_| q.try_set_avail_ring_address(GuestAddress(a.avail)))
            .and_then(|_| q.try_set_used_ring_address(GuestAddress(a.used)));
        match r {
            Ok(()) => q.set_ready(true),
            Err(error) => self.guest_error(GuestError::QueueAddress { queue: i, error }),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        if v & self.status != self.status {
            self.guest_error(GuestError::StatusCleared {
                old: self.status,
                new: v,
            });
            return;
        }
        let new = v & !self.status;
        let mut v = v;
        if new & status::FEATURES_OK != 0 {
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            let unoffered = self.driver_features & !self.offered;
            if unoffered != 0 || self.driver_features & version_1 == 0 {
                self.guest_error(GuestError::FeaturesRefused {
                    acked: self.driver_features,
                    unoffered,
                });
                v &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 {
            if v & status::FEATURES_OK == 0 {
                self.guest_error(GuestError::DriverOkEarly);
                v &= !status::DRIVER_OK;
            } else if let Some(bad) = self.invalid_queue() {
                self.guest_error(GuestError::QueueOutsideRam(bad));
                self.status = v & !status::DRIVER_OK;
                self.needs_reset();
                return;
            }
        }
        self.status = v;
        if new & status::DRIVER_OK != 0 && v & status::DRIVER_OK != 0 {
            lock(&self.device).activate(self.driver_features);
            let early = std::mem::take(&mut self.early);
            for q in (0..self.queues.len()).filter(|q| early & (1 << q) != 0) {
                self.notify(q as u32);
            }
        }
    }

    /// The first ready queue whose rings are not inside guest RAM.
    fn invalid_queue(&self) -> Option<usize> {
        let mem = self.memory.memory();
        self.queues
            .iter()
            .position(|q| q.ready() && !q.is_valid(&*mem))
    }

    fn needs_reset(&mut self) {
        self.status |= status::NEEDS_RESET;
        self.counters.add_shared(VirtioStat::NeedsReset, 1);
        self.interrupt.trigger(super::INT_CONFIG);
    }

    fn active(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::NEEDS_RESET == 0
    }

    /// A queue notification (from the ioeventfd or the bus).
    pub fn notify(&mut self, index: u32) {
        self.counters.add_shared(VirtioStat::Notifies, 1);
        let i = index as usize;
        let ready = self.queues.get(i).map(|q| q.ready());
        if self.status & status::DRIVER_OK == 0 {
            if ready == Some(true) && index < 64 && self.status & status::FEATURES_OK != 0 {
                // A set-up queue kicked just before DRIVER_OK: the spec says
                // the driver must not; Linux's balloon driver does. Serve it
                // at activation rather than lose the buffer.
                self.early |= 1 << index;
            } else {
                self.guest_error(GuestError::NotifyEarly(index));
            }
            return;
        }
        if self.status & status::NEEDS_RESET != 0 {
            return;
        }
        match ready {
            None => self.guest_error(GuestError::NoSuchQueue {
                what: "notify",
                queue: index,
            }),
            Some(false) => self.guest_error(GuestError::NotifyNotReady(index)),
            Some(true) => self.serve(i),
        }
    }

    /// Serve ready queue `i`: every available chain, then the used ring.
    fn serve(&mut self, i: usize) {
        let mem = self.memory.memory();
        let mut done = Completions::for_queue(i);
        let r = self.process(i, &mem, &mut done);
        self.finish(i, r, &mem, &mut done);
    }

    /// Hand every available chain of queue `i` to the device. A malformed
    /// chain is completed empty and counted; an error that needs a reset
    /// stops the walk.
    fn process(
        &mut self,
        i: usize,
        mem: &GuestMemory,
        done: &mut Completions,
    ) -> Result<(), ChainError> {
        let chains: Vec<_> = self.queues[i]
            .iter(mem)
            .map_err(|error| ChainError::Ring {
                ring: "avail",
                error,
            })?
            .collect();
        let mut device = lock(&self.device);
        for c in chains {
            let chain = Chain::new(c, mem);
            match device.process(i, &chain, done) {
                Ok(()) => {}
                Err(e) if e.needs_reset() => return Err(e),
                Err(e) => {
                    self.guest_error(GuestError::Queue { queue: i, error: e });
                    done.used(chain.head(), 0);
                }
            }
        }
        Ok(())
    }

    /// Put what the device completed on the used rings and raise one
    /// interrupt; a failure (here or before) sets `NEEDS_RESET`.
    fn finish(
        &mut self,
        i: usize,
        r: Result<(), ChainError>,
        mem: &GuestMemory,
        done: &mut Completions,
    ) {
        for error in done.take_errors() {
            self.guest_error(GuestError::Queue { queue: i, error });
        }
        let mut r = r.map_err(|e| (i, e));
        let completed = done.take();
        for &(q, head, len) in &completed {
            let used = match self.queues.get_mut(q) {
                Some(queue) => queue.add_used(mem, head, len),
                None => Err(virtio_queue::Error::QueueNotReady),
            };
            match used {
                Ok(()) => self.counters.add_shared(VirtioStat::Chains, 1),
                Err(error) => {
                    r = r.and(Err((
                        q,
                        ChainError::Ring {
                            ring: "used",
                            error,
                        },
                    )));
                    break;
                }
            }
        }
        if !completed.is_empty() {
            self.interrupt.trigger(INT_USED_RING);
        }
        if let Err((queue, error)) = r {
            self.guest_error(GuestError::Queue { queue, error });
            self.needs_reset();
        }
    }

    /// The event loop's periodic call: lets an active device do timed work.
    pub fn tick(&mut self) {
        if !self.active() {
            return;
        }
        if std::mem::take(&mut self.rescan) {
            for q in 0..self.queues.len() {
                if self.queues[q].ready() {
                    self.serve(q);
                }
            }
        }
        let mem = self.memory.memory();
        let mut done = Completions::for_queue(0);
        lock(&self.device).tick(&mut done);
        self.finish(0, Ok(()), &mem, &mut done);
    }

    fn read_reg(&self, offset: u64) -> Option<u32> {
        Some(match offset {
            reg::MAGIC => MAGIC,
            reg::VERSION => VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.offered as u32,
                1 => (self.offered >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .is_some_and(|q| q.ready())
                .into(),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            reg::CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => return None,
        })
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                let phase_ok =
                    self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0;
                if !phase_ok {
                    self.guest_error(GuestError::FeaturesOutOfPhase(self.status));
                } else if self.driver_features_sel < 2 {
                    set_half(&mut self.driver_features, self.driver_features_sel == 1, v);
                } else if v != 0 {
                    self.guest_error(GuestError::FeaturesBeyond64 {
                        word: self.driver_features_sel,
                        value: v,
                    });
                }
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM => {
                if let Some(i) = self.queue_for_setup("QueueNum") {
                    let size = u16::try_from(v).unwrap_or(0);
                    if let Err(error) = self.queues[i].try_set_size(size) {
                        self.guest_error(GuestError::QueueSize {
                            queue: i,
                            size: v,
                            error,
                        });
                    }
                }
            }
            reg::QUEUE_READY => match v {
                1 => {
                    if let Some(i) = self.queue_for_setup("QueueReady") {
                        self.queue_ready(i);
                    }
                }
                0 => {
                    if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
                        q.set_ready(false);
                    }
                }
                _ => self.guest_error(GuestError::QueueReadyValue(v)),
            },
            reg::QUEUE_NOTIFY => self.notify(v),
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            reg::QUEUE_DESC_LOW..=reg::QUEUE_DEVICE_HIGH
                if (offset - reg::QUEUE_DESC_LOW) % 0x10 < 8 =>
            {
                // Three (low, high) pairs, 0x10 apart.
                let rel = offset - reg::QUEUE_DESC_LOW;
                let (which, high) = (rel / 0x10, rel % 0x10 == 4);
                if let Some(i) = self.queue_for_setup("ring address") {
                    let a = &mut self.addrs[i];
                    let field = match which {
                        0 => &mut a.desc,
                        1 => &mut a.avail,
                        _ => &mut a.used,
                    };
                    set_half(field, high, v);
                }
            }
            _ => self.guest_error(GuestError::WriteToReadOnly { offset, value: v }),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            let config = lock(&self.device).config();
            let at = offset - CONFIG_OFFSET;
            for (i, b) in data.iter_mut().enumerate() {
                *b = at
                    .checked_add(i as u64)
                    .and_then(|o| config.get(usize::try_from(o).ok()?))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        data.fill(0);
        if data.len() != 4 || !offset.is_multiple_of(4) {
            self.guest_error(GuestError::RegisterWidth {
                access: "read",
                offset,
                len: data.len(),
            });
            return;
        }
        match self.read_reg(offset) {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => self.guest_error(GuestError::ReadOfWriteOnly(offset)),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            let r = lock(&self.device).write_config(offset - CONFIG_OFFSET, data);
            if let Err(e) = r {
                self.guest_error(e);
            }
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => {
                self.write_reg(offset, u32::from_le_bytes(word))
            }
            _ => self.guest_error(GuestError::RegisterWidth {
                access: "write",
                offset,
                len: data.len(),
            }),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::virtio::balloon::BalloonStat;
    use crate::virtio::balloon::{Balloon, BalloonConfig};
    use crate::virtio::{INT_CONFIG, INT_USED_RING};
    use std::time::Duration;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_memory::{NoKvm, PageSource, RamRange};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    pub const RAM: u64 = 16 << 20;
    /// Where the test driver puts its rings and buffers.
    const DESC: u64 = 0x10_0000;
    const AVAIL: u64 = 0x10_1000;
    const USED: u64 = 0x10_2000;
    const BUF: u64 = 0x10_3000;

    /// A balloon behind a transport over 16 MiB of RAM (no KVM).
    pub struct Rig {
        pub t: MmioTransport,
        pub memory: Arc<MemoryManager>,
        pub balloon: Arc<Mutex<Balloon>>,
        pub interrupt: Arc<Interrupt>,
    }

    pub fn rig() -> Rig {
        let memory = Arc::new(
            MemoryManager::new(
                Arc::new(NoKvm),
                &[RamRange { gpa: 0, size: RAM }],
                PageSource::Zero,
                8,
            )
            .unwrap(),
        );
        let interrupt = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let balloon = Arc::new(Mutex::new(Balloon::new(
            memory.clone(),
            interrupt.clone(),
            BalloonConfig {
                target_pages: 0,
                free_page_reporting: true,
                stats_interval: Duration::ZERO,
            },
        )));
        let t = MmioTransport::new(balloon.clone(), interrupt.clone(), memory.clone());
        Rig {
            t,
            memory,
            balloon,
            interrupt,
        }
    }

    impl Rig {
        pub fn w(&mut self, off: u64, v: u32) {
            self.t.write(off, &v.to_le_bytes());
        }
        pub fn r(&mut self, off: u64) -> u32 {
            let mut d = [0u8; 4];
            self.t.read(off, &mut d);
            u32::from_le_bytes(d)
        }
        pub fn errors(&self) -> u64 {
            self.t.counters.get(VirtioStat::GuestErrors)
        }
        /// ACK, DRIVER, features (low, high), FEATURES_OK; the status after.
        pub fn negotiate(&mut self, lo: u32, hi: u32) -> u32 {
            self.w(reg::STATUS, 0);
            self.w(reg::STATUS, status::ACKNOWLEDGE);
            self.w(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
            self.w(reg::DRIVER_FEATURES_SEL, 0);
            self.w(reg::DRIVER_FEATURES, lo);
            self.w(reg::DRIVER_FEATURES_SEL, 1);
            self.w(reg::DRIVER_FEATURES, hi);
            let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
            self.w(reg::STATUS, s);
            self.r(reg::STATUS)
        }
        /// Queue `q` of `size` entries with rings at the given addresses.
        pub fn queue(&mut self, q: u32, size: u32, desc: u64, avail: u64, used: u64) {
            self.w(reg::QUEUE_SEL, q);
            self.w(reg::QUEUE_NUM, size);
            for (off, a) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
                self.w(off, a as u32);
                self.w(off + 4, (a >> 32) as u32);
            }
            self.w(reg::QUEUE_READY, 1);
        }
        /// A working balloon driver: VERSION_1 only, queues 0 and 1.
        pub fn driver_ok(&mut self) {
            assert_ne!(self.negotiate(0, 1) & status::FEATURES_OK, 0);
            self.queue(0, 16, DESC, AVAIL, USED);
            self.queue(1, 16, DESC + 0x4000, AVAIL + 0x4000, USED + 0x4000);
            let s = self.r(reg::STATUS);
            self.w(reg::STATUS, s | status::DRIVER_OK);
            assert_eq!(self.r(reg::STATUS) & status::NEEDS_RESET, 0);
        }
        /// Post descriptor `i` (addr, len, flags, next) as chain number `n`
        /// on queue 0 and notify.
        pub fn post(&mut self, n: u16, descs: &[(u64, u32, u16, u16)]) {
            let mem = self.memory.memory();
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                let d = DESC + 16 * i as u64;
                mem.write_obj(addr, GuestAddress(d)).unwrap();
                mem.write_obj(len, GuestAddress(d + 8)).unwrap();
                mem.write_obj(flags, GuestAddress(d + 12)).unwrap();
                mem.write_obj(next, GuestAddress(d + 14)).unwrap();
            }
            mem.write_obj(0u16, GuestAddress(AVAIL + 4 + 2 * u64::from(n % 16)))
                .unwrap();
            mem.write_obj(n + 1, GuestAddress(AVAIL + 2)).unwrap();
            drop(mem);
            self.w(reg::QUEUE_NOTIFY, 0);
        }
        pub fn used_idx(&self) -> u16 {
            self.memory
                .memory()
                .read_obj(GuestAddress(USED + 2))
                .unwrap()
        }
        pub fn pfns(&self, pfns: &[u32]) -> (u64, u32) {
            let mem = self.memory.memory();
            for (i, p) in pfns.iter().enumerate() {
                mem.write_obj(*p, GuestAddress(BUF + 4 * i as u64)).unwrap();
            }
            (BUF, 4 * pfns.len() as u32)
        }
    }

    #[test]
    fn identity_registers_and_bad_accesses() {
        let mut r = rig();
        assert_eq!(r.r(reg::MAGIC), MAGIC);
        assert_eq!(r.r(reg::VERSION), 2);
        assert_eq!(r.r(reg::DEVICE_ID), 5);
        r.w(reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r.r(reg::DEVICE_FEATURES), 1, "VERSION_1 in word 1");
        assert_eq!(r.errors(), 0);
        // Unaligned, short, read-only: errors, no effect.
        let mut b = [0u8; 2];
        r.t.read(0x1, &mut b);
        r.t.write(0x13, &[1]);
        r.w(reg::MAGIC, 0);
        r.w(reg::QUEUE_NUM_MAX, 0);
        assert_eq!(r.r(reg::MAGIC), MAGIC);
        assert_eq!(r.errors(), 4);
    }

    #[test]
    fn features_ok_refused_for_unoffered_or_missing_version_1() {
        let mut r = rig();
        let all = r.negotiate(u32::MAX, u32::MAX);
        assert_eq!(
            all & status::FEATURES_OK,
            0,
            "accepted features not offered"
        );
        let legacy = r.negotiate(0, 0);
        assert_eq!(legacy & status::FEATURES_OK, 0, "VERSION_1 not accepted");
        let ok = r.negotiate(1 << super::super::balloon::F_STATS_VQ, 1);
        assert_ne!(ok & status::FEATURES_OK, 0);
    }

    #[test]
    fn queue_setup_is_validated() {
        let mut r = rig();
        // Before FEATURES_OK: refused.
        r.queue(0, 16, DESC, AVAIL, USED);
        r.w(reg::QUEUE_SEL, 0);
        assert_eq!(r.r(reg::QUEUE_READY), 0);
        assert_ne!(r.negotiate(0, 1) & status::FEATURES_OK, 0);
        let before = r.errors();
        r.w(reg::QUEUE_SEL, 0);
        r.w(reg::QUEUE_NUM, 3);
        r.w(reg::QUEUE_NUM, 512);
        assert_eq!(r.errors(), before + 2, "sizes 3 and 512 refused");
        // Misaligned rings: not ready.
        r.queue(0, 16, DESC + 8, AVAIL, USED);
        assert_eq!(r.r(reg::QUEUE_READY), 0);
        // Rings outside RAM: ready, but DRIVER_OK needs a reset.
        r.queue(0, 16, 0xd000_0000, AVAIL, USED);
        assert_eq!(r.r(reg::QUEUE_READY), 1);
        let s = r.r(reg::STATUS);
        r.w(reg::STATUS, s | status::DRIVER_OK);
        assert_ne!(r.r(reg::STATUS) & status::NEEDS_RESET, 0);
        assert_eq!(r.r(reg::STATUS) & status::DRIVER_OK, 0);
        assert_ne!(r.interrupt.status() & INT_CONFIG, 0);
        // A reset recovers the device.
        r.driver_ok();
        assert_eq!(r.r(reg::STATUS) & status::NEEDS_RESET, 0);
    }

    #[test]
    fn notify_before_driver_ok_and_of_missing_queues_is_ignored() {
        let mut r = rig();
        r.w(reg::QUEUE_NOTIFY, 0);
        r.driver_ok();
        let before = r.errors();
        r.w(reg::QUEUE_NOTIFY, 7);
        r.w(reg::QUEUE_NOTIFY, 0xffff_ffff);
        assert_eq!(r.errors(), before + 2);
    }

    #[test]
    fn a_queue_kicked_before_driver_ok_is_served_at_activation() {
        let mut r = rig();
        assert_ne!(r.negotiate(0, 1) & status::FEATURES_OK, 0);
        r.queue(0, 16, DESC, AVAIL, USED);
        r.queue(1, 16, DESC + 0x4000, AVAIL + 0x4000, USED + 0x4000);
        let (buf, len) = r.pfns(&[0x880]);
        let before = r.errors();
        r.post(0, &[(buf, len, 0, 0)]);
        assert_eq!(r.used_idx(), 0, "nothing served before DRIVER_OK");
        assert_eq!(
            r.errors(),
            before,
            "a set-up queue's early kick is tolerated"
        );
        let s = r.r(reg::STATUS);
        r.w(reg::STATUS, s | status::DRIVER_OK);
        assert_eq!(r.used_idx(), 1, "served at activation");
    }

    #[test]
    fn inflate_discards_the_pfns_and_uses_the_chain() {
        let mut r = rig();
        r.driver_ok();
        // Make pages 0x800..0x803 resident with data.
        for p in 0x800u64..0x804 {
            r.memory
                .memory()
                .write_obj(0xabu8, GuestAddress(p << 12))
                .unwrap();
        }
        let (buf, len) = r.pfns(&[0x801, 0x800, 0x802, 0x802, 0xd0000]);
        r.post(0, &[(buf, len, 0, 0)]);
        assert_eq!(r.used_idx(), 1);
        let b = lock(&r.balloon).stats();
        assert_eq!(b.counters.get(BalloonStat::InflatedPages), 3);
        assert_eq!(b.counters.get(BalloonStat::PfnsOutsideRam), 1);
        let snap = r.memory.snapshot();
        let s = snap.lookup(0).unwrap();
        assert!(s.is_discarded(0x800) && s.is_discarded(0x802) && !s.is_discarded(0x803));
        let v: u8 = r
            .memory
            .memory()
            .read_obj(GuestAddress(0x801 << 12))
            .unwrap();
        assert_eq!(v, 0, "an inflated page reads zero");
        let v: u8 = r
            .memory
            .memory()
            .read_obj(GuestAddress(0x803 << 12))
            .unwrap();
        assert_eq!(v, 0xab, "a page not inflated keeps its data");
        assert_ne!(r.interrupt.status() & INT_USED_RING, 0);
    }

    #[test]
    fn bad_chains_are_rejected_and_the_device_goes_on() {
        let mut r = rig();
        r.driver_ok();
        let b = lock(&r.balloon).stats();
        let rejected = || b.counters.get(BalloonStat::RejectedDescriptors);
        // 257 PFNs: too many.
        let (buf, _) = r.pfns(&[0x900; 257]);
        r.post(0, &[(buf, 257 * 4, 0, 0)]);
        assert_eq!(rejected(), 1);
        // Write-only descriptor where the device reads.
        r.post(1, &[(buf, 8, 2, 0)]);
        assert_eq!(rejected(), 2);
        // A descriptor pointing into the MMIO gap, one near 4 GiB long.
        r.post(2, &[(0xd000_0000, 8, 0, 0)]);
        r.post(3, &[(buf, 0xffff_f000, 0, 0)]);
        assert_eq!(rejected(), 4);
        // A descriptor that chains to itself: the walk ends (TTL).
        r.post(4, &[(buf, 4, 1, 0)]);
        assert_eq!(r.used_idx(), 5, "every chain was used");
        assert_eq!(r.r(reg::STATUS) & status::NEEDS_RESET, 0);
        // A sane chain still works.
        let (buf, len) = r.pfns(&[0x950]);
        r.post(5, &[(buf, len, 0, 0)]);
        assert_eq!(r.used_idx(), 6);
    }

    #[test]
    fn a_broken_avail_ring_needs_a_reset() {
        let mut r = rig();
        r.driver_ok();
        // avail idx 1000 ahead of what the device has seen.
        r.memory
            .memory()
            .write_obj(1000u16, GuestAddress(AVAIL + 2))
            .unwrap();
        r.w(reg::QUEUE_NOTIFY, 0);
        assert_ne!(r.r(reg::STATUS) & status::NEEDS_RESET, 0);
        // Further notifies are ignored until a reset.
        r.w(reg::QUEUE_NOTIFY, 0);
        r.driver_ok();
        assert_eq!(r.r(reg::STATUS) & status::NEEDS_RESET, 0);
    }

    #[test]
    fn config_target_and_actual() {
        let mut r = rig();
        lock(&r.balloon).set_target(1234);
        assert_eq!(r.r(CONFIG_OFFSET), 1234);
        assert_ne!(r.interrupt.status() & INT_CONFIG, 0);
        assert_eq!(r.r(reg::CONFIG_GENERATION), 1);
        r.w(CONFIG_OFFSET + 4, 77);
        assert_eq!(lock(&r.balloon).actual(), 77);
        let before = r.errors();
        r.w(CONFIG_OFFSET, 5);
        assert_eq!(r.errors(), before + 1, "num_pages is read-only");
        assert_eq!(r.r(CONFIG_OFFSET), 1234);
    }
}
