//! The ACPI sleep registers of a hardware-reduced platform (ACPI 6.x, 4.8.3.7):
//! the FADT points `SLEEP_CONTROL_REG` and `SLEEP_STATUS_REG` here, and the
//! DSDT's `\_S5_` package names sleep type 5. Linux's `poweroff` writes
//! `SLP_TYP << 2 | SLP_EN` to the control register; for S5 the VM ends
//! with status 0. Other sleep states are not offered (no `\_S1_`..`\_S4_`),
//! so any other write is logged and ignored.

use std::sync::Arc;

use super::BusDevice;
use vmm_exit::{ExitReason, VmExit};

/// `SLEEP_CONTROL_REG` (1 byte); `SLEEP_STATUS_REG` is the next port.
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const SLEEP_STATUS_PORT: u16 = SLEEP_CONTROL_PORT + 1;
/// The sleep type the DSDT's `\_S5_` package gives.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Control register bits: SLP_TYPx in bits 2..4, SLP_EN bit 5.
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;
const SLP_EN: u8 = 1 << 5;

pub struct AcpiSleep {
    exit: Arc<VmExit>,
}

impl AcpiSleep {
    pub fn new(exit: Arc<VmExit>) -> Self {
        Self { exit }
    }
}

impl BusDevice for AcpiSleep {
    /// Status reads as 0: no wake event pending (the guest never sleeps).
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let (0, Some(&v)) = (offset, data.first()) else {
            return; // status register: write-1-to-clear of nothing
        };
        if v & SLP_EN == 0 {
            return;
        }
        let typ = (v >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if typ == S5_SLEEP_TYPE {
            log::info!("guest powered off (ACPI S5)");
            self.exit.request(ExitReason::PowerOff);
        } else {
            log::warn!("guest asked for ACPI sleep type {typ}, which this VM does not offer");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn s5_with_slp_en_powers_off() {
        let exit = Arc::new(VmExit::new());
        let mut d = AcpiSleep::new(exit.clone());
        // Status register writes and reads change nothing.
        d.write(1, &[0x80]);
        let mut b = [0xffu8];
        d.read(1, &mut b);
        assert_eq!(b, [0]);
        // SLP_TYP 5 without SLP_EN, and another type with it: ignored.
        d.write(0, &[S5_SLEEP_TYPE << 2]);
        d.write(0, &[3 << 2 | SLP_EN]);
        assert!(!exit.is_stopping());
        // What Linux writes for S5.
        d.write(0, &[S5_SLEEP_TYPE << 2 | SLP_EN]);
        assert!(exit.is_stopping());
        assert_eq!(exit.wait(), ExitReason::PowerOff);
        assert_eq!(ExitReason::PowerOff.status(), 0);
    }
}
