//! Where virtio-mmio devices live: one 4 KiB window each in the 3–4 GiB MMIO
//! gap and one edge-triggered GSI each (raised through an irqfd); queue
//! notifications through KVM ioeventfds (one per queue, matching the queue
//! index written to QueueNotify) served by the event loop, or through the
//! vCPU's MMIO exit where the host refuses an ioeventfd. Adding a device is
//! one call to [`VirtioDevices::add`].

use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::{MmioTransport, QUEUE_NOTIFY, WINDOW_SIZE};
use super::{DeviceCounters, Interrupt, VirtioDevice, VirtioStat, VIRTIO_METRICS};
use crate::{lock, Bus, DeviceError};
use vmm_memory::MemoryManager;

/// First virtio-mmio window (inside the 3–4 GiB gap, below the IOAPIC).
pub const MMIO_BASE: u64 = 0xd000_0000;
/// End of the range windows are allocated from.
pub const MMIO_END: u64 = 0xfe00_0000;
/// GSIs for devices: 5..=23 (0–4 are the PIT, keyboard, cascade and COM
/// ports; the IOAPIC has 24 pins).
pub const FIRST_GSI: u32 = 5;
pub const LAST_GSI: u32 = 23;

/// Where a virtio-mmio device sits, as the guest must be told (the command
/// line and the DSDT, written by the boot layer from these).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioWindow {
    pub base: u64,
    pub len: u64,
    pub gsi: u32,
}

/// One device as the rest of the VMM sees it.
pub struct VirtioEntry {
    pub window: MmioWindow,
    pub name: &'static str,
    pub transport: Arc<Mutex<MmioTransport>>,
    pub counters: Arc<DeviceCounters>,
}

/// A device's [`VIRTIO_METRICS`] values, copied (JSON: its name and one
/// key per row).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceSummary {
    pub name: &'static str,
    pub values: [u64; VirtioStat::COUNT],
}

impl DeviceSummary {
    pub fn of(name: &'static str, c: &DeviceCounters) -> Self {
        Self {
            name,
            values: c.read(),
        }
    }

    pub fn get(&self, s: VirtioStat) -> u64 {
        self.values[s as usize]
    }
}

impl serde::Serialize for DeviceSummary {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(1 + VIRTIO_METRICS.len()))?;
        m.serialize_entry("name", self.name)?;
        for (row, v) in VIRTIO_METRICS.iter().zip(&self.values) {
            m.serialize_entry(row.key, v)?;
        }
        m.end()
    }
}

/// The virtio devices of a VM and the allocator of their windows and GSIs.
#[derive(Default)]
pub struct VirtioDevices {
    entries: Vec<VirtioEntry>,
    /// The event-loop side of each device using ioeventfds.
    notifiers: Vec<Notifier>,
}

impl VirtioDevices {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allocate a window and a GSI, wire the interrupt and notifications,
    /// and put the device built by `make` on the MMIO bus.
    pub fn add<D, F>(
        &mut self,
        vm_fd: &VmFd,
        mmio: &mut Bus,
        memory: &Arc<MemoryManager>,
        make: F,
    ) -> Result<(Arc<Mutex<D>>, Arc<DeviceCounters>), DeviceError>
    where
        D: VirtioDevice + 'static,
        F: FnOnce(Arc<Interrupt>) -> D,
    {
        let n = self.entries.len() as u64;
        let base = MMIO_BASE + n * WINDOW_SIZE;
        let gsi = FIRST_GSI + n as u32;
        if base + WINDOW_SIZE > MMIO_END || gsi > LAST_GSI {
            return Err(DeviceError::Full(n as usize));
        }
        let evt =
            EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::Io("virtio irq eventfd", e))?;
        vm_fd
            .register_irqfd(&evt, gsi)
            .map_err(|e| DeviceError::Kvm("KVM_IRQFD (virtio)", e))?;
        let interrupt = Arc::new(Interrupt::new(evt));
        let device = Arc::new(Mutex::new(make(interrupt.clone())));
        let dyn_device: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            dyn_device,
            interrupt,
            memory.clone(),
        )));
        let (name, counters, queues) = {
            let t = lock(&transport);
            (t.name(), t.counters(), t.queue_count())
        };
        match ioeventfds(vm_fd, base, queues)? {
            Ok(fds) => {
                log::info!("virtio-{name} at {base:#x} GSI {gsi}: queue notifications through ioeventfds (event loop)");
                self.notifiers.push(Notifier {
                    transport: transport.clone(),
                    fds,
                });
            }
            // The transport serves QueueNotify writes that reach it.
            Err(e) => log::info!(
                "virtio-{name} at {base:#x} GSI {gsi}: queue notifications through the vCPU's MMIO exit (KVM refused an ioeventfd: {e})"
            ),
        }
        mmio.insert(base, WINDOW_SIZE, transport.clone())?;
        let counters_out = counters.clone();
        self.entries.push(VirtioEntry {
            window: MmioWindow {
                base,
                len: WINDOW_SIZE,
                gsi,
            },
            name,
            transport,
            counters,
        });
        Ok((device, counters_out))
    }

    /// What the guest is told (command line, DSDT).
    pub fn windows(&self) -> Vec<MmioWindow> {
        self.entries.iter().map(|e| e.window).collect()
    }

    pub fn entries(&self) -> &[VirtioEntry] {
        &self.entries
    }

    /// The event-loop subscribers: one per device notified by ioeventfds,
    /// plus the ticker every device gets.
    pub fn subscribers(&mut self) -> Vec<Box<dyn MutEventSubscriber + Send>> {
        self.notifiers
            .drain(..)
            .map(|n| Box::new(n) as Box<dyn MutEventSubscriber + Send>)
            .collect()
    }

    /// Closures that copy each device's counters (for reports and metrics).
    pub fn summaries(&self) -> Vec<Box<dyn Fn() -> DeviceSummary + Send + Sync>> {
        self.entries
            .iter()
            .map(|e| {
                let (name, c) = (e.name, e.counters.clone());
                Box::new(move || DeviceSummary::of(name, &c))
                    as Box<dyn Fn() -> DeviceSummary + Send + Sync>
            })
            .collect()
    }

    /// What the event loop calls about every 100 ms.
    pub fn ticker(&self) -> Ticker {
        Ticker(self.entries.iter().map(|e| e.transport.clone()).collect())
    }
}

/// One ioeventfd per queue on the QueueNotify register of the window at
/// `base`, matching the queue index; `Ok(Err)` when KVM refuses one (none
/// is left registered then).
fn ioeventfds(
    vm_fd: &VmFd,
    base: u64,
    queues: usize,
) -> Result<Result<Vec<EventFd>, kvm_ioctls::Error>, DeviceError> {
    let at = IoEventAddress::Mmio(base + QUEUE_NOTIFY);
    let mut fds = Vec::with_capacity(queues);
    for q in 0..queues {
        let fd = EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::Io("virtio ioeventfd", e))?;
        if let Err(e) = vm_fd.register_ioevent(&fd, &at, q as u32) {
            for (q, fd) in fds.iter().enumerate() {
                let _ = vm_fd.unregister_ioevent(fd, &at, q as u32);
            }
            return Ok(Err(e));
        }
        fds.push(fd);
    }
    Ok(Ok(fds))
}

/// Gives every device its periodic tick (the event loop owns it).
pub struct Ticker(Vec<Arc<Mutex<MmioTransport>>>);

impl Ticker {
    /// A ticker with no devices.
    pub fn none() -> Self {
        Ticker(Vec::new())
    }

    pub fn tick(&self) {
        for t in &self.0 {
            lock(t).tick();
        }
    }
}

/// A device's queue eventfds on the event loop.
struct Notifier {
    transport: Arc<Mutex<MmioTransport>>,
    fds: Vec<EventFd>,
}

impl MutEventSubscriber for Notifier {
    fn init(&mut self, ops: &mut EventOps) {
        for (q, fd) in self.fds.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(fd, q as u32, EventSet::IN)) {
                log::error!("virtio: cannot watch queue {q}'s ioeventfd: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let q = events.data();
        if let Some(fd) = self.fds.get(q as usize) {
            // Drain the counter: several notifies may have coalesced.
            let _ = fd.read();
            debug_assert_eq!(fd.as_raw_fd(), events.fd());
            lock(&self.transport).notify(q);
        }
    }
}
