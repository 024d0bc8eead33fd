//! virtio-mem (device ID 24): memory hotplug and unplug driven by the
//! guest's own PLUG/UNPLUG requests, following `requested_size`.
//!
//! The device region sits above boot RAM, aligned to 128 MiB (Linux's
//! memory-block size on x86_64), outside the e820 map. It is cut into
//! 128 MiB **slices**; a slice is a KVM memslot only while one of its blocks
//! is plugged (Firecracker/QEMU style): the first plug in a slice adds it
//! through [`MemoryManager::add_slot`] (generation + 1), and the unplug of its
//! last block removes it (invalidate, generation + 1, KVM ioctl, unmap). An
//! access to a slice that is not a memslot is not RAM; an access to an
//! unplugged block of a present slice is refused by the fault engine (I6).
//!
//! Unplug discards before the response: the memory manager takes the
//! install lock exclusively, clears the plugged bits and zaps the pages,
//! then (if the slice emptied) the slice's memslot goes; only then is the
//! ACK written. A re-plugged block reads zero.
//!
//! `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` is offered: the driver must not read
//! unplugged blocks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{
    DeviceCounters, GuestError, Interrupt, VirtioDevice, INT_CONFIG, INT_USED_RING,
    VIRTIO_F_VERSION_1,
};
use vmm_memory::{GuestMemory, MemError, MemoryManager, NewSlot, PageSource};

pub const DEVICE_ID: u32 = 24;
pub const F_UNPLUGGED_INACCESSIBLE: u32 = 1;
/// A slice: the unit of memslots (Linux's x86_64 memory-block size).
pub const SLICE: u64 = 128 << 20;
/// Smallest block size (a huge page).
pub const MIN_BLOCK: u64 = 2 << 20;
const QUEUE_SIZE: u16 = 128;
/// `struct virtio_mem_config`.
const CONFIG_SIZE: usize = 56;
/// Request: le16 type, pad[3], le64 addr, le16 nb_blocks, pad[3].
const REQ_SIZE: usize = 24;
/// Response: le16 type, pad[3], le16 state.
const RESP_SIZE: usize = 10;

/// Request types.
pub const REQ_PLUG: u16 = 0;
pub const REQ_UNPLUG: u16 = 1;
pub const REQ_UNPLUG_ALL: u16 = 2;
pub const REQ_STATE: u16 = 3;
/// Response types.
pub const RESP_ACK: u16 = 0;
pub const RESP_NACK: u16 = 1;
pub const RESP_BUSY: u16 = 2;
pub const RESP_ERROR: u16 = 3;
/// STATE answers.
pub const STATE_PLUGGED: u16 = 0;
pub const STATE_UNPLUGGED: u16 = 1;
pub const STATE_MIXED: u16 = 2;

/// Request kinds and results, for counters (`[kind][result]`).
pub const REQUEST_NAMES: [&str; 4] = ["plug", "unplug", "unplug_all", "state"];
pub const RESULT_NAMES: [&str; 4] = ["ack", "nack", "busy", "error"];

/// Counters and sizes (read by metrics and the API without the lock).
#[derive(Default)]
pub struct MemStats {
    pub plugged_bytes: AtomicU64,
    pub requested_bytes: AtomicU64,
    /// Requests by kind and result.
    pub requests: [[AtomicU64; 4]; 4],
    pub slices_added: AtomicU64,
    pub slices_removed: AtomicU64,
    /// The driver set DRIVER_OK (and has not reset the device since).
    pub driver_ready: std::sync::atomic::AtomicBool,
    /// Host time of each block plug/unplug and slice add/remove (ns), for
    /// benchmarks.
    pub timings: std::sync::Mutex<Timings>,
}

/// Latency samples (ns), at most [`Timings::MAX`] of each kind.
#[derive(Default, Debug, Clone)]
pub struct Timings {
    pub plug_block: Vec<u64>,
    pub unplug_block: Vec<u64>,
    pub slice_add: Vec<u64>,
    pub slice_remove: Vec<u64>,
}

impl Timings {
    pub const MAX: usize = 100_000;

    fn push(v: &mut Vec<u64>, t: std::time::Instant) {
        if v.len() < Self::MAX {
            v.push(t.elapsed().as_nanos() as u64);
        }
    }
}

/// Where the region is and how it is cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub block_size: u64,
}

impl MemRegion {
    /// Check the geometry: 128 MiB-aligned region of whole slices, block
    /// size a power of two from 2 MiB that divides a slice.
    pub fn validate(&self) -> Result<(), String> {
        if !self.addr.is_multiple_of(SLICE) || self.size == 0 || !self.size.is_multiple_of(SLICE) {
            return Err(format!(
                "hotplug region {:#x}+{:#x} must be 128 MiB aligned and a multiple of 128 MiB",
                self.addr, self.size
            ));
        }
        let b = self.block_size;
        if b < MIN_BLOCK || !b.is_power_of_two() || !SLICE.is_multiple_of(b) {
            return Err(format!(
                "hotplug block size {b:#x} must be a power of two from 2 MiB up to 128 MiB"
            ));
        }
        Ok(())
    }

    fn blocks(&self) -> u64 {
        self.size / self.block_size
    }

    /// A `requested_size` must be whole blocks within the region.
    pub fn check_requested(&self, bytes: u64) -> Result<(), String> {
        if bytes > self.size {
            return Err(format!(
                "requested size {} MiB is larger than the hotplug region ({} MiB)",
                bytes >> 20,
                self.size >> 20
            ));
        }
        if !bytes.is_multiple_of(self.block_size) {
            return Err(format!(
                "requested size {bytes:#x} is not a multiple of the block size ({} MiB)",
                self.block_size >> 20
            ));
        }
        Ok(())
    }
}

/// One request as read from the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub kind: u16,
    pub addr: u64,
    pub nb_blocks: u16,
}

impl Request {
    pub fn parse(b: &[u8]) -> Option<Request> {
        if b.len() < REQ_SIZE {
            return None;
        }
        Some(Request {
            kind: u16::from_le_bytes([b[0], b[1]]),
            addr: u64::from_le_bytes(b[8..16].try_into().ok()?),
            nb_blocks: u16::from_le_bytes([b[16], b[17]]),
        })
    }
}

/// The answer to a request: a response type and, for STATE, the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Response {
    pub kind: u16,
    pub state: u16,
}

impl Response {
    fn of(kind: u16) -> Self {
        Response { kind, state: 0 }
    }

    fn bytes(&self) -> [u8; RESP_SIZE] {
        let mut b = [0u8; RESP_SIZE];
        b[..2].copy_from_slice(&self.kind.to_le_bytes());
        b[8..10].copy_from_slice(&self.state.to_le_bytes());
        b
    }
}

pub struct VirtioMem {
    memory: Arc<MemoryManager>,
    interrupt: Arc<Interrupt>,
    counters: Arc<DeviceCounters>,
    stats: Arc<MemStats>,
    region: MemRegion,
    requested: u64,
    /// Plugged blocks.
    plugged: Vec<bool>,
    /// Plugged blocks per slice (a slice is a memslot while > 0).
    per_slice: Vec<u32>,
    acked: u64,
    generation: u32,
    max_sizes: [u16; 1],
}

impl VirtioMem {
    pub fn new(memory: Arc<MemoryManager>, interrupt: Arc<Interrupt>, region: MemRegion) -> Self {
        let blocks = region.blocks() as usize;
        let slices = (region.size / SLICE) as usize;
        Self {
            memory,
            interrupt,
            counters: Arc::new(DeviceCounters::default()),
            stats: Arc::new(MemStats::default()),
            region,
            requested: 0,
            plugged: vec![false; blocks],
            per_slice: vec![0; slices],
            acked: 0,
            generation: 0,
            max_sizes: [QUEUE_SIZE],
        }
    }

    /// The same device with `requested_size` already at `bytes` (boot time:
    /// no interrupt). `bytes` must pass [`MemRegion::check_requested`];
    /// anything else leaves it at 0.
    pub fn with_requested(mut self, bytes: u64) -> Self {
        if self.region.check_requested(bytes).is_ok() {
            self.requested = bytes;
            self.stats.requested_bytes.store(bytes, Ordering::Relaxed);
        }
        self
    }

    pub fn stats(&self) -> Arc<MemStats> {
        self.stats.clone()
    }

    pub fn device_counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    pub fn region(&self) -> MemRegion {
        self.region
    }

    pub fn plugged_bytes(&self) -> u64 {
        self.plugged.iter().filter(|p| **p).count() as u64 * self.region.block_size
    }

    pub fn requested(&self) -> u64 {
        self.requested
    }

    /// Move `requested_size` (a multiple of the block size, at most the
    /// region) and tell the driver (config interrupt).
    pub fn set_requested(&mut self, bytes: u64) -> Result<(), String> {
        self.region.check_requested(bytes)?;
        self.requested = bytes;
        self.generation = self.generation.wrapping_add(1);
        self.stats.requested_bytes.store(bytes, Ordering::Relaxed);
        self.interrupt.trigger(INT_CONFIG);
        Ok(())
    }

    /// The blocks `[first, first+n)` a request names, if it is aligned and
    /// inside the usable region.
    fn blocks_of(&self, addr: u64, nb: u16) -> Option<(usize, usize)> {
        let r = &self.region;
        let offset = addr.checked_sub(r.addr)?;
        let len = u64::from(nb).checked_mul(r.block_size)?;
        let end = offset.checked_add(len)?;
        if nb == 0 || offset % r.block_size != 0 || end > r.size {
            return None;
        }
        Some(((offset / r.block_size) as usize, nb as usize))
    }

    fn block_gpa(&self, b: usize) -> u64 {
        self.region.addr + b as u64 * self.region.block_size
    }

    fn slice_of(&self, b: usize) -> usize {
        (b as u64 * self.region.block_size / SLICE) as usize
    }

    fn slice_gpa(&self, s: usize) -> u64 {
        self.region.addr + s as u64 * SLICE
    }

    /// Plug one block: add its slice's memslot if this is the slice's first
    /// plugged block, then mark the block plugged.
    fn plug_block(&mut self, b: usize) -> Result<(), MemError> {
        let t0 = std::time::Instant::now();
        let s = self.slice_of(b);
        if self.per_slice[s] == 0 {
            self.memory.add_slot(NewSlot {
                gpa: self.slice_gpa(s),
                size: SLICE,
                source: PageSource::Zero,
                block_size: Some(self.region.block_size),
            })?;
            self.stats.slices_added.fetch_add(1, Ordering::Relaxed);
            Timings::push(&mut self.timings().slice_add, t0);
        }
        self.memory
            .plug(self.block_gpa(b), self.region.block_size)?;
        self.per_slice[s] += 1;
        self.plugged[b] = true;
        Timings::push(&mut self.timings().plug_block, t0);
        Ok(())
    }

    fn timings(&self) -> std::sync::MutexGuard<'_, Timings> {
        self.stats.timings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Unplug one block: exclude installers, clear its bit and zap it (I6),
    /// then remove the slice's memslot if it emptied.
    fn unplug_block(&mut self, b: usize) -> Result<(), MemError> {
        let t0 = std::time::Instant::now();
        let s = self.slice_of(b);
        self.memory
            .unplug(self.block_gpa(b), self.region.block_size)?;
        self.plugged[b] = false;
        self.per_slice[s] -= 1;
        if self.per_slice[s] == 0 {
            let t1 = std::time::Instant::now();
            self.memory.remove_slot(self.slice_gpa(s))?;
            self.stats.slices_removed.fetch_add(1, Ordering::Relaxed);
            Timings::push(&mut self.timings().slice_remove, t1);
        }
        Timings::push(&mut self.timings().unplug_block, t0);
        Ok(())
    }

    /// Carry out one request (the response is written by the caller).
    pub fn execute(&mut self, req: Request) -> Response {
        let host_error = |what: &str, e: MemError| {
            log::warn!("virtio-mem: {what} failed: {e}");
            Response::of(RESP_ERROR)
        };
        match req.kind {
            REQ_PLUG | REQ_UNPLUG | REQ_STATE => {
                let Some((first, n)) = self.blocks_of(req.addr, req.nb_blocks) else {
                    return Response::of(RESP_ERROR);
                };
                let range = first..first + n;
                let plugged = self.plugged[range.clone()].iter().filter(|p| **p).count();
                match req.kind {
                    REQ_PLUG => {
                        if plugged != 0 {
                            return Response::of(RESP_ERROR);
                        }
                        let size = n as u64 * self.region.block_size;
                        if self.plugged_bytes() + size > self.requested {
                            return Response::of(RESP_NACK);
                        }
                        for b in range {
                            if let Err(e) = self.plug_block(b) {
                                return host_error("plug", e);
                            }
                        }
                    }
                    REQ_UNPLUG => {
                        if plugged != n {
                            return Response::of(RESP_ERROR);
                        }
                        for b in range {
                            if let Err(e) = self.unplug_block(b) {
                                return host_error("unplug", e);
                            }
                        }
                    }
                    _ => {
                        let state = match plugged {
                            0 => STATE_UNPLUGGED,
                            p if p == n => STATE_PLUGGED,
                            _ => STATE_MIXED,
                        };
                        return Response {
                            kind: RESP_ACK,
                            state,
                        };
                    }
                }
                self.publish_plugged();
                Response::of(RESP_ACK)
            }
            REQ_UNPLUG_ALL => {
                for b in 0..self.plugged.len() {
                    if self.plugged[b] {
                        if let Err(e) = self.unplug_block(b) {
                            return host_error("unplug all", e);
                        }
                    }
                }
                self.publish_plugged();
                Response::of(RESP_ACK)
            }
            _ => Response::of(RESP_ERROR),
        }
    }

    fn publish_plugged(&self) {
        self.stats
            .plugged_bytes
            .store(self.plugged_bytes(), Ordering::Relaxed);
    }

    fn count(&self, req: &Request, resp: &Response) {
        let k = usize::from(req.kind).min(REQUEST_NAMES.len() - 1);
        let r = usize::from(resp.kind).min(RESULT_NAMES.len() - 1);
        if usize::from(req.kind) < REQUEST_NAMES.len() {
            self.stats.requests[k][r].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// One chain: a readable request, then a writable response buffer.
    fn serve(
        &mut self,
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
    ) -> Result<u32, String> {
        let mut req_bytes = Vec::with_capacity(REQ_SIZE);
        let mut resp_at: Option<(GuestAddress, u32)> = None;
        for d in chain {
            if d.is_write_only() {
                resp_at.get_or_insert((d.addr(), d.len()));
            } else if resp_at.is_some() {
                return Err("a readable descriptor after the response buffer".into());
            } else if req_bytes.len() < REQ_SIZE {
                let take = (d.len() as usize).min(REQ_SIZE - req_bytes.len());
                let start = req_bytes.len();
                req_bytes.resize(start + take, 0);
                mem.read_slice(&mut req_bytes[start..], d.addr())
                    .map_err(|e| format!("request at {:#x}: {e}", d.addr().0))?;
            }
        }
        let req = Request::parse(&req_bytes)
            .ok_or_else(|| format!("request of {} bytes (needs {REQ_SIZE})", req_bytes.len()))?;
        let (addr, len) = resp_at.ok_or("no writable response buffer")?;
        if (len as usize) < RESP_SIZE {
            return Err(format!(
                "response buffer of {len} bytes (needs {RESP_SIZE})"
            ));
        }
        let resp = self.execute(req);
        self.count(&req, &resp);
        if req.kind as usize >= REQUEST_NAMES.len() || resp.kind == RESP_ERROR {
            DeviceCounters::bump(&self.counters.guest_errors, 1);
            log::debug!("virtio-mem: {req:?} -> {resp:?}");
        }
        mem.write_slice(&resp.bytes(), addr)
            .map_err(|e| format!("response at {:#x}: {e}", addr.0))?;
        Ok(RESP_SIZE as u32)
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn name(&self) -> &'static str {
        "mem"
    }

    fn features(&self) -> u64 {
        1u64 << VIRTIO_F_VERSION_1 | 1 << F_UNPLUGGED_INACCESSIBLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let r = &self.region;
        let mut cfg = [0u8; CONFIG_SIZE];
        cfg[0..8].copy_from_slice(&r.block_size.to_le_bytes());
        // node_id 0, padding.
        cfg[16..24].copy_from_slice(&r.addr.to_le_bytes());
        cfg[24..32].copy_from_slice(&r.size.to_le_bytes());
        cfg[32..40].copy_from_slice(&r.size.to_le_bytes());
        cfg[40..48].copy_from_slice(&self.plugged_bytes().to_le_bytes());
        cfg[48..56].copy_from_slice(&self.requested.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), GuestError> {
        Err(GuestError(format!(
            "{}-byte write at {offset:#x}: virtio-mem config is read-only",
            data.len()
        )))
    }

    fn activate(&mut self, acked: u64) {
        self.acked = acked;
        self.stats.driver_ready.store(true, Ordering::Relaxed);
    }

    /// A reset leaves plugged memory plugged (the spec lets the driver find
    /// it with STATE or UNPLUG_ALL it).
    fn reset(&mut self) {
        self.acked = 0;
        self.stats.driver_ready.store(false, Ordering::Relaxed);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<(), GuestError> {
        if index != 0 {
            return Err(GuestError(format!("queue {index} does not exist")));
        }
        let chains: Vec<_> = queue
            .iter(mem)
            .map(|it| it.collect())
            .map_err(|e| GuestError(format!("avail ring: {e}")))?;
        for chain in chains {
            let head = chain.head_index();
            let len = match self.serve(chain, mem) {
                Ok(n) => n,
                Err(e) => {
                    DeviceCounters::bump(&self.counters.guest_errors, 1);
                    log::debug!("virtio-mem: bad request chain: {e}");
                    0
                }
            };
            queue
                .add_used(mem, head, len)
                .map_err(|e| GuestError(format!("used ring: {e}")))?;
            DeviceCounters::bump(&self.counters.chains, 1);
        }
        self.interrupt.trigger(INT_USED_RING);
        Ok(())
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    fn config_generation(&self) -> u32 {
        self.generation
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_memory::{NoKvm, RamRange};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 512 * MIB;

    fn dev(size: u64) -> VirtioMem {
        let memory = Arc::new(
            MemoryManager::new(
                Arc::new(NoKvm),
                &[RamRange {
                    gpa: 0,
                    size: 64 * MIB,
                }],
                PageSource::Zero,
                64,
            )
            .unwrap(),
        );
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        VirtioMem::new(
            memory,
            irq,
            MemRegion {
                addr: BASE,
                size,
                block_size: 2 * MIB,
            },
        )
    }

    fn req(kind: u16, addr: u64, nb: u16) -> Request {
        Request {
            kind,
            addr,
            nb_blocks: nb,
        }
    }

    #[test]
    fn geometry_is_validated() {
        let ok = MemRegion {
            addr: BASE,
            size: 256 * MIB,
            block_size: 2 * MIB,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            MemRegion {
                addr: BASE + MIB,
                ..ok
            },
            MemRegion {
                size: 100 * MIB,
                ..ok
            },
            MemRegion { size: 0, ..ok },
            MemRegion {
                block_size: MIB,
                ..ok
            },
            MemRegion {
                block_size: 3 * MIB,
                ..ok
            },
            MemRegion {
                block_size: 256 * MIB,
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn request_validation_follows_the_spec() {
        let mut d = dev(256 * MIB);
        let ack = Response::of(RESP_ACK);
        let err = Response::of(RESP_ERROR);
        let nack = Response::of(RESP_NACK);
        // Nothing requested yet: a plug is NACKed.
        assert_eq!(d.execute(req(REQ_PLUG, BASE, 1)), nack);
        d.set_requested(8 * MIB).unwrap();
        // Unaligned, empty, below and beyond the region: ERROR.
        assert_eq!(d.execute(req(REQ_PLUG, BASE + 4096, 1)), err);
        assert_eq!(d.execute(req(REQ_PLUG, BASE, 0)), err);
        assert_eq!(d.execute(req(REQ_PLUG, BASE - 2 * MIB, 1)), err);
        assert_eq!(d.execute(req(REQ_PLUG, BASE + 254 * MIB, 2)), err);
        assert_eq!(d.execute(req(REQ_PLUG, u64::MAX - MIB, 1)), err);
        assert_eq!(d.execute(req(REQ_STATE, BASE + 256 * MIB, 1)), err);
        // Plug 2 blocks; plugging one of them again is an ERROR.
        assert_eq!(d.execute(req(REQ_PLUG, BASE, 2)), ack);
        assert_eq!(d.execute(req(REQ_PLUG, BASE + 2 * MIB, 1)), err);
        // Beyond requested_size: NACK.
        assert_eq!(d.execute(req(REQ_PLUG, BASE + 4 * MIB, 3)), nack);
        assert_eq!(d.execute(req(REQ_PLUG, BASE + 4 * MIB, 2)), ack);
        assert_eq!(d.plugged_bytes(), 8 * MIB);
        // STATE answers plugged, unplugged, mixed.
        let state = |d: &mut VirtioMem, a, n| d.execute(req(REQ_STATE, a, n)).state;
        assert_eq!(state(&mut d, BASE, 4), STATE_PLUGGED);
        assert_eq!(state(&mut d, BASE + 8 * MIB, 4), STATE_UNPLUGGED);
        assert_eq!(state(&mut d, BASE + 6 * MIB, 2), STATE_MIXED);
        // Unplugging a range with an unplugged block is an ERROR.
        assert_eq!(d.execute(req(REQ_UNPLUG, BASE + 6 * MIB, 2)), err);
        assert_eq!(d.execute(req(REQ_UNPLUG, BASE + 2 * MIB, 2)), ack);
        assert_eq!(d.execute(req(REQ_UNPLUG, BASE + 2 * MIB, 1)), err);
        assert_eq!(d.plugged_bytes(), 4 * MIB);
        // UNPLUG_ALL leaves nothing plugged, and the slice's memslot gone.
        assert_eq!(d.execute(req(REQ_UNPLUG_ALL, 0, 0)), ack);
        assert_eq!(d.plugged_bytes(), 0);
        assert!(!d.memory.is_ram(BASE));
        assert_eq!(d.execute(req(9, BASE, 1)), err);
    }

    #[test]
    fn slices_become_memslots_while_a_block_is_plugged() {
        let mut d = dev(384 * MIB);
        d.set_requested(384 * MIB).unwrap();
        let stats = d.stats();
        let gen = || d.memory.stats().generation;
        let g0 = gen();
        // A range straddling the first slice boundary: both slices appear.
        let edge = BASE + 126 * MIB;
        assert_eq!(d.execute(req(REQ_PLUG, edge, 2)).kind, RESP_ACK);
        assert!(d.memory.is_ram(BASE) && d.memory.is_ram(BASE + 128 * MIB));
        assert!(!d.memory.is_ram(BASE + 256 * MIB), "third slice untouched");
        assert_eq!(stats.slices_added.load(Ordering::Relaxed), 2);
        assert_eq!(d.memory.stats().generation, g0 + 2);
        // Only the plugged blocks are installable (I6).
        let snap = d.memory.snapshot();
        let s0 = snap.lookup(BASE).unwrap();
        assert!(s0.is_plugged(s0.page_index(edge)));
        assert!(!s0.is_plugged(s0.page_index(BASE)));
        drop(snap);
        // Unplugging the block in slice 1 removes that slice only.
        assert_eq!(
            d.execute(req(REQ_UNPLUG, BASE + 128 * MIB, 1)).kind,
            RESP_ACK
        );
        assert!(d.memory.is_ram(BASE) && !d.memory.is_ram(BASE + 128 * MIB));
        assert_eq!(stats.slices_removed.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn requested_size_is_validated() {
        let mut d = dev(128 * MIB);
        assert!(d.set_requested(129 * MIB).is_err());
        assert!(d.set_requested(3 * MIB).is_err());
        assert!(d.set_requested(128 * MIB).is_ok());
        let mut cfg = [0u8; 8];
        d.read_config(48, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), 128 * MIB);
        d.read_config(16, &mut cfg);
        assert_eq!(u64::from_le_bytes(cfg), BASE);
    }
}
