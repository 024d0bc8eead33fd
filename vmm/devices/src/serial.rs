//! 8250 UART at 0x3f8 (vm-superio) with its interrupt on IRQ 4 through an
//! irqfd, output to the VMM's stdout and input from its stdin through an
//! `event-manager` subscriber.

use std::io::{self, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::{serial::SerialEvents, Serial, Trigger};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{lock, BusDevice};

pub const COM1_BASE: u64 = 0x3f8;
pub const COM1_LEN: u64 = 8;
pub const COM1_IRQ: u32 = 4;

/// Raises the UART's interrupt by writing to an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Signals the input side when the guest has drained the receive FIFO, so
/// reading from stdin resumes (input is paused while the FIFO is full).
pub struct InputEvents {
    pub drained: EventFd,
}

impl SerialEvents for InputEvents {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        let _ = self.drained.write(1);
    }
}

/// Serial output goes to stdout, flushed per write so that a guest's partial
/// line (a prompt) is visible at once.
/// Where serial output goes.
#[derive(Debug, Clone, Default)]
pub enum SerialOut {
    #[default]
    Stdout,
    /// Into a buffer (benchmarks and in-process tests).
    Capture(Arc<Mutex<Vec<u8>>>),
}

pub struct FlushingStdout;

impl Write for FlushingStdout {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut out = io::stdout().lock();
        out.write_all(buf)?;
        out.flush()?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        io::stdout().flush()
    }
}

/// Serial output into a shared buffer (benchmarks, in-process tests).
pub struct CaptureWriter(pub Arc<Mutex<Vec<u8>>>);

impl Write for CaptureWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&self.0).extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Watches serial output for Linux's panic banner ("Kernel panic - not
/// syncing"), so that the reset `panic=-1` triggers ends `vmm` as a crash.
pub struct PanicWatch<W> {
    inner: W,
    exit: Arc<vmm_exit::VmExit>,
    /// The last bytes seen, to match across writes (the UART writes bytes).
    tail: Vec<u8>,
}

const PANIC_BANNER: &[u8] = b"Kernel panic - not syncing";

impl<W: Write> PanicWatch<W> {
    pub fn new(inner: W, exit: Arc<vmm_exit::VmExit>) -> Self {
        Self {
            inner,
            exit,
            tail: Vec::with_capacity(2 * PANIC_BANNER.len()),
        }
    }
}

impl<W: Write> Write for PanicWatch<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.tail.extend_from_slice(buf);
        if self
            .tail
            .windows(PANIC_BANNER.len())
            .any(|w| w == PANIC_BANNER)
        {
            self.exit.note_panic();
        }
        let keep = PANIC_BANNER.len() - 1;
        if self.tail.len() > keep {
            self.tail.drain(..self.tail.len() - keep);
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

type Uart = Serial<IrqTrigger, Arc<InputEvents>, Box<dyn Write + Send>>;

pub struct SerialDevice {
    uart: Uart,
}

impl SerialDevice {
    pub fn new(irq: EventFd, events: Arc<InputEvents>, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::with_events(IrqTrigger(irq), events, out),
        }
    }

    /// Queue bytes for the guest; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        self.uart.enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

/// The UART's registers and input FIFO (vm-superio's `SerialState`, which
/// has no serde of its own).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Put the registers back (the interrupt line, input events and output
    /// stay this device's). A FIFO over the UART's size is refused.
    pub fn restore(&mut self, s: &SerialSnapshot) -> io::Result<()> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let trigger = || -> io::Result<IrqTrigger> {
            Ok(IrqTrigger(self.uart.interrupt_evt().0.try_clone()?))
        };
        let (t1, t2) = (trigger()?, trigger()?);
        let events = self.uart.events().clone();
        let placeholder = Serial::with_events(
            t1,
            events.clone(),
            Box::new(io::sink()) as Box<dyn Write + Send>,
        );
        let out = std::mem::replace(&mut self.uart, placeholder).into_writer();
        self.uart = Serial::from_state(&state, t2, events, out)
            .map_err(|e| io::Error::other(format!("serial state: {e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.uart.read(offset as u8);
        data.fill(v);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            if let Err(e) = self.uart.write(offset as u8, b) {
                log::warn!("serial: {e:?}");
            }
        }
    }
}

/// Feeds stdin (or any readable fd) to the UART.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    events: Arc<InputEvents>,
    fd: RawFd,
    reading: bool,
    eof: bool,
}

impl SerialInput {
    pub fn new(serial: Arc<Mutex<SerialDevice>>, events: Arc<InputEvents>, fd: RawFd) -> Self {
        Self {
            serial,
            events,
            fd,
            reading: false,
            eof: false,
        }
    }

    /// The UART this input feeds (a snapshot saves its registers).
    pub fn device(&self) -> Arc<Mutex<SerialDevice>> {
        self.serial.clone()
    }

    /// An eventfd for [`InputEvents::drained`].
    pub fn new_events() -> io::Result<Arc<InputEvents>> {
        Ok(Arc::new(InputEvents {
            drained: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    fn start_reading(&mut self, ops: &mut EventOps) {
        if self.reading || self.eof {
            return;
        }
        match ops.add(Events::new_raw(self.fd, EventSet::IN)) {
            Ok(()) => self.reading = true,
            Err(e) => {
                // A regular file or /dev/null cannot be polled: no input.
                log::debug!("serial input disabled: cannot poll fd {}: {e:?}", self.fd);
                self.eof = true;
            }
        }
    }

    fn stop_reading(&mut self, ops: &mut EventOps) {
        if self.reading {
            let _ = ops.remove(Events::empty_raw(self.fd));
            self.reading = false;
        }
    }

    fn read_input(&mut self, ops: &mut EventOps) {
        let mut dev = lock(&self.serial);
        let room = dev.input_capacity();
        if room == 0 {
            drop(dev);
            self.stop_reading(ops);
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        // SAFETY: reading into a stack buffer of at least `want` bytes.
        let n = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), want) };
        match n {
            n if n > 0 => {
                dev.enqueue_input(&buf[..n as usize]);
            }
            0 => {
                drop(dev);
                self.eof = true;
                self.stop_reading(ops);
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock && e.kind() != io::ErrorKind::Interrupted {
                    drop(dev);
                    log::debug!("serial input stopped: {e}");
                    self.eof = true;
                    self.stop_reading(ops);
                }
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.events.drained, EventSet::IN)) {
            log::warn!("serial input: cannot watch the FIFO-drained event: {e:?}");
        }
        self.start_reading(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.events.drained.as_raw_fd() {
            let _ = self.events.drained.read();
            self.start_reading(ops);
        } else if events.fd() == self.fd {
            if events.event_set().contains(EventSet::IN) {
                self.read_input(ops);
            } else {
                // HUP or error without data: input is over.
                self.eof = true;
                self.stop_reading(ops);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl Write for Capture {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn panic_banner_is_seen_across_byte_writes() {
        let exit = Arc::new(vmm_exit::VmExit::new());
        let mut w = PanicWatch::new(io::sink(), exit.clone());
        for b in b"[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n" {
            w.write_all(&[*b]).unwrap();
        }
        exit.request_reset();
        assert_eq!(exit.reason(), Some(vmm_exit::ExitReason::KernelPanic));
        let calm = Arc::new(vmm_exit::VmExit::new());
        let mut w = PanicWatch::new(io::sink(), calm.clone());
        w.write_all(b"reboot: Restarting system\n").unwrap();
        calm.request_reset();
        assert_eq!(calm.reason(), Some(vmm_exit::ExitReason::Reset));
    }

    #[test]
    fn output_and_input_with_interrupts() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let irq2 = irq.try_clone().unwrap();
        let ev = SerialInput::new_events().unwrap();
        let mut dev = SerialDevice::new(irq, ev, Box::new(Capture(out.clone())));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*out.lock().unwrap(), b"hi\n");
        // Enable the received-data interrupt (IER bit 0), then feed input.
        dev.write(1, &[1]);
        assert_eq!(dev.enqueue_input(b"ok"), 2);
        assert!(irq2.read().unwrap() >= 1);
        let mut d = [0u8];
        dev.read(0, &mut d);
        assert_eq!(d[0], b'o');
    }
}
