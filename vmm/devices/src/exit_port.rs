//! Debug-exit port: a guest writes a status (1, 2 or 4 bytes, little-endian)
//! and the VM ends; `vmm` exits with `status & 0xff`.

use std::sync::Arc;

use super::BusDevice;
use vmm_exit::{ExitReason, VmExit};

/// The port test guests use (QEMU's isa-debug-exit default).
pub const EXIT_PORT: u64 = 0x501;

pub struct ExitPort {
    exit: Arc<VmExit>,
}

impl ExitPort {
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for ExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && !data.is_empty() {
            self.exit.request(ExitReason::GuestStatus(data[0]));
        }
    }
}
