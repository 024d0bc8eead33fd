//! The legacy devices on the port-I/O bus: COM1 (8250, IRQ 4 through an
//! irqfd), the i8042 reset line, the debug-exit and marker ports, and the
//! POST-code port Linux uses as an I/O delay, the ACPI sleep registers
//! (power-off), the CMOS RTC, and the PCI configuration and ISA DMA ports
//! answering "absent".

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::acpi_power::{AcpiSleep, SLEEP_CONTROL_PORT};
use super::marker::{MarkerLog, MarkerPort, SignalPort, MARKER_PORT, SIGNAL_PORT};
use super::serial::SerialOut;
use super::{cmos, exit_port, i8042, serial, Absent, Bus, BusDevice, DeviceError, Sink};
use vmm_exit::VmExit;

/// Linux's I/O-delay port.
const POST_CODE_PORT: u64 = 0x80;
/// PCI configuration address and data (0xcf8–0xcff).
const PCI_CONFIG_PORTS: u64 = 0xcf8;
/// The ISA DMA controller's channel-0 page register.
const DMA_PAGE_0_PORT: u64 = 0x87;

/// Build the port-I/O bus; returns it and the serial input subscriber (for
/// the event loop).
pub fn build(
    vm_fd: &VmFd,
    exit: &Arc<VmExit>,
    out: &SerialOut,
    markers: &Arc<Mutex<MarkerLog>>,
    signal: &Arc<AtomicU32>,
) -> Result<(Bus, serial::SerialInput), DeviceError> {
    let mut pio = Bus::new("port-I/O");
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| DeviceError::Io("serial eventfd", e))?;
    vm_fd
        .register_irqfd(&irq, serial::COM1_IRQ)
        .map_err(|e| DeviceError::Kvm("KVM_IRQFD (serial)", e))?;
    let events = serial::SerialInput::new_events()
        .map_err(|e| DeviceError::Io("serial input eventfd", e))?;
    let writer: Box<dyn std::io::Write + Send> = match out {
        SerialOut::Stdout => Box::new(serial::PanicWatch::new(
            serial::FlushingStdout,
            exit.clone(),
        )),
        SerialOut::Capture(buf) => Box::new(serial::PanicWatch::new(
            serial::CaptureWriter(buf.clone()),
            exit.clone(),
        )),
    };
    let uart = Arc::new(Mutex::new(serial::SerialDevice::new(
        irq,
        events.clone(),
        writer,
    )));
    pio.insert(serial::COM1_BASE, serial::COM1_LEN, uart.clone())?;
    let input = serial::SerialInput::new(uart, events, libc::STDIN_FILENO);

    let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(i8042::I8042::new(exit.clone())));
    pio.insert(i8042::I8042_BASE, i8042::I8042_LEN, i8042)?;
    pio.insert(
        exit_port::EXIT_PORT,
        1,
        Arc::new(Mutex::new(exit_port::ExitPort::new(exit.clone()))),
    )?;
    pio.insert(
        MARKER_PORT,
        1,
        Arc::new(Mutex::new(MarkerPort(markers.clone()))),
    )?;
    pio.insert(
        SIGNAL_PORT,
        4,
        Arc::new(Mutex::new(SignalPort(signal.clone()))),
    )?;
    pio.insert(POST_CODE_PORT, 1, Arc::new(Mutex::new(Sink)))?;
    pio.insert(
        cmos::CMOS_BASE,
        cmos::CMOS_LEN,
        Arc::new(Mutex::new(cmos::Cmos::new())),
    )?;
    // No PCI bus (configuration mechanism #1: this VMM's devices are
    // virtio-mmio) and no ISA DMA controller (Linux's i8237 probe reads
    // the channel-0 page register): absent, silently.
    pio.insert(PCI_CONFIG_PORTS, 8, Arc::new(Mutex::new(Absent)))?;
    pio.insert(DMA_PAGE_0_PORT, 1, Arc::new(Mutex::new(Absent)))?;
    pio.insert(
        u64::from(SLEEP_CONTROL_PORT),
        2,
        Arc::new(Mutex::new(AcpiSleep::new(exit.clone()))),
    )?;
    Ok((pio, input))
}
