//! Marker port (0x502): a guest writes a 32-bit value at a phase boundary.
//! The VMM timestamps it (benchmarks) and runs an optional hook synchronously
//! on the vCPU thread, before the guest continues (tests use it to discard
//! pages at a known point).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::BusDevice;

pub const MARKER_PORT: u64 = 0x502;

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
        log.marks.push((Instant::now(), value));
        if let Some(hook) = log.hook.as_mut() {
            hook(value);
        }
    }
}
