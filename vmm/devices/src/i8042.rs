//! i8042 keyboard controller (vm-superio): only the CPU-reset command (0xFE
//! to port 0x64) matters; it ends the VM with status 0.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use super::BusDevice;
use vmm_exit::VmExit;

pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;

/// Requests the VM's end when the guest resets the CPU.
pub struct ResetTrigger(pub Arc<VmExit>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        log::info!("guest reset the CPU through the i8042");
        self.0.request_reset();
        Ok(())
    }
}

pub struct I8042(I8042Device<ResetTrigger>);

impl I8042 {
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self(I8042Device::new(ResetTrigger(exit)))
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.0.read(offset as u8);
        data.fill(v);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            let _ = self.0.write(offset as u8, b);
        }
    }
}
