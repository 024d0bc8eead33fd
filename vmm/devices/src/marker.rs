//! Test-guest ports.
//! - Marker (0x502): a guest writes a 32-bit value at a phase boundary. The
//!   VMM timestamps it (benchmarks) and runs an optional hook synchronously
//!   on the vCPU thread, before the guest continues (tests use it to discard
//!   pages at a known point).
//! - Host signal (0x503): a guest reads a 32-bit value the host sets (0 =
//!   carry on, 1 = finish): how a run of fixed length ends a test guest.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::BusDevice;

pub const MARKER_PORT: u64 = 0x502;
pub const SIGNAL_PORT: u64 = 0x503;
/// Marks kept (a guest writing markers in a loop must not grow the VMM
/// without bound); later ones still run the hook.
pub const MAX_MARKS: usize = 1 << 20;

pub type MarkerHook = Box<dyn FnMut(u32) + Send>;

#[derive(Default)]
pub struct MarkerLog {
    pub marks: Vec<(Instant, u32)>,
    pub hook: Option<MarkerHook>,
}

pub struct MarkerPort(pub Arc<Mutex<MarkerLog>>);

impl BusDevice for MarkerPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return;
        }
        let mut v = [0u8; 4];
        let n = data.len().min(4);
        v[..n].copy_from_slice(&data[..n]);
        let value = u32::from_le_bytes(v);
        let mut log = super::lock(&self.0);
        if log.marks.len() < MAX_MARKS {
            log.marks.push((Instant::now(), value));
        }
        if let Some(hook) = log.hook.as_mut() {
            hook(value);
        }
    }
}

/// The host-signal port: reads return what the host last set.
pub struct SignalPort(pub Arc<AtomicU32>);

impl BusDevice for SignalPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        let v = self.0.load(Ordering::Acquire).to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.get(i).copied().unwrap_or(0);
        }
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}
