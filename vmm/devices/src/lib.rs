//! Devices and the buses that route port I/O and MMIO exits to them.
//!
//! The bus is a sorted list of address ranges, each owned by one device behind
//! its own mutex. rust-vmm's `vm-device` offers a similar manager, but its
//! traits take `&self`-style interior mutability and a resource allocator we
//! do not need; a dozen lines here keep the exit path obvious.

pub mod acpi_power;
pub mod cmos;
pub mod exit_port;
pub mod i8042;
pub mod legacy;
pub mod marker;
mod rate_limit;
pub mod serial;
pub mod virtio;

use std::sync::{Arc, Mutex};

pub use rate_limit::RateLimit;

/// A device that could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{0}: {1}")]
    Io(&'static str, std::io::Error),
    #[error("{0} failed: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error(transparent)]
    Bus(#[from] BusOverlap),
    #[error("no room for another virtio device ({0} already: MMIO windows or GSIs exhausted)")]
    Full(usize),
}

/// A device on a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

struct Entry {
    base: u64,
    len: u64,
    dev: Arc<Mutex<dyn BusDevice>>,
}

/// An address space (port I/O or MMIO) of devices.
pub struct Bus {
    name: &'static str,
    entries: Vec<Entry>,
    unhandled: RateLimit,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{bus} range [{base:#x}..{end:#x}) overlaps an existing device")]
pub struct BusOverlap {
    pub bus: &'static str,
    pub base: u64,
    pub end: u64,
}

impl Bus {
    pub fn new(name: &'static str) -> Self {
        Self {
            name,
            entries: Vec::new(),
            unhandled: RateLimit::new(10),
        }
    }

    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        dev: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusOverlap> {
        let end = base + len;
        if self
            .entries
            .iter()
            .any(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusOverlap {
                bus: self.name,
                base,
                end,
            });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, dev });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<&Entry> {
        let i = self.entries.partition_point(|e| e.base <= addr);
        let e = self.entries.get(i.checked_sub(1)?)?;
        (addr < e.base + e.len).then_some(e)
    }

    /// Route a read; unclaimed addresses read as all ones (an empty ISA bus)
    /// and are logged, rate-limited.
    pub fn read(&self, vcpu: usize, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some(e) => lock(&e.dev).read(addr - e.base, data),
            None => {
                data.fill(0xff);
                self.log_unhandled(vcpu, "read from", addr, data.len(), None);
            }
        }
    }

    /// Route a write; unclaimed writes are logged (rate-limited) and dropped.
    pub fn write(&self, vcpu: usize, addr: u64, data: &[u8]) {
        match self.find(addr) {
            Some(e) => lock(&e.dev).write(addr - e.base, data),
            None => self.log_unhandled(vcpu, "write to", addr, data.len(), Some(data)),
        }
    }

    fn log_unhandled(&self, vcpu: usize, what: &str, addr: u64, len: usize, data: Option<&[u8]>) {
        if let Some(suppressed) = self.unhandled.check() {
            let extra = if suppressed > 0 {
                format!(" ({suppressed} similar messages suppressed)")
            } else {
                String::new()
            };
            log::warn!(
                "vCPU {vcpu}: ignored {len}-byte {what} unclaimed {} address {addr:#x}{}{extra}",
                self.name,
                data.map(|d| format!(" (data {d:02x?})"))
                    .unwrap_or_default()
            );
        }
    }
}

/// Lock a device, recovering from poisoning: a device whose thread panicked
/// still answers rather than taking the VMM down with it.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A port that absorbs everything silently (e.g. the POST-code port 0x80,
/// which Linux writes to as an I/O delay).
pub struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// Ports where a PC has hardware this VM does not, probed by Linux at
/// every boot: reads are all ones (what an empty ISA bus answers: "no
/// device"), writes are dropped, silently (no warning for the user).
pub struct Absent;

impl BusDevice for Absent {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0 + offset as u8);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn routes_by_range_and_rejects_overlap() {
        let mut bus = Bus::new("pio");
        bus.insert(0x10, 4, Arc::new(Mutex::new(Reg(1)))).unwrap();
        bus.insert(0x20, 2, Arc::new(Mutex::new(Reg(7)))).unwrap();
        assert!(bus.insert(0x12, 8, Arc::new(Mutex::new(Sink))).is_err());
        let mut d = [0u8; 1];
        bus.read(0, 0x13, &mut d);
        assert_eq!(d[0], 4);
        bus.write(0, 0x21, &[9]);
        bus.read(0, 0x20, &mut d);
        assert_eq!(d[0], 9);
        bus.read(0, 0x14, &mut d);
        assert_eq!(d[0], 0xff);
        bus.read(0, 0x0, &mut d);
        assert_eq!(d[0], 0xff);
    }
}
