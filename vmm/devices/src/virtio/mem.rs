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
//! A request is all or nothing: if the host fails part of a PLUG or UNPLUG
//! (no free KVM memslot, a failed mapping or zap), what the request already
//! did is undone before the ERROR response, so the layout (memslots,
//! plugged blocks) is as it was and a later request can succeed. (A KVM
//! memslot deletion that fails is the one exception: the slice is out of
//! the table, and the error is reported as the host's.)
//!
//! `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE` is offered: the driver must not read
//! unplugged blocks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use serde::Serialize;
use thiserror::Error;
use vmm_counters::{metrics, Counters, Metric, Readings, Scope};
use vmm_memory::{MemError, MemoryManager, NewSlot, PageSource};

use super::{
    Chain, ChainError, Completions, DeviceCounters, DeviceRestoreError, Interrupt, VirtioDevice,
    VirtioStat,
};

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

const REQUESTS: &str = "virtio-mem requests, by kind and result";

metrics! {
    /// What virtio-mem counts.
    pub enum HotplugStat in HOTPLUG_METRICS {
        PluggedBytes = Metric::gauge(
            "vmm_hotplug_plugged_bytes",
            "plugged_bytes",
            "virtio-mem: bytes plugged",
        ),
        RequestedBytes = Metric::gauge(
            "vmm_hotplug_requested_bytes",
            "requested_bytes",
            "virtio-mem: requested_size",
        ),
        PlugAck = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "plug"), ("result", "ack")]),
        PlugNack = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "plug"), ("result", "nack")]),
        PlugBusy = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "plug"), ("result", "busy")]),
        PlugError = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "plug"), ("result", "error")]),
        UnplugAck = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "unplug"), ("result", "ack")]),
        UnplugNack = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "unplug"), ("result", "nack")]),
        UnplugBusy = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "unplug"), ("result", "busy")]),
        UnplugError = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "unplug"), ("result", "error")]),
        UnplugAllAck = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "unplug_all"), ("result", "ack")]),
        UnplugAllNack = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "unplug_all"), ("result", "nack")]),
        UnplugAllBusy = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "unplug_all"), ("result", "busy")]),
        UnplugAllError = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "unplug_all"), ("result", "error")]),
        StateAck = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "state"), ("result", "ack")]),
        StateNack = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "state"), ("result", "nack")]),
        StateBusy = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "state"), ("result", "busy")]),
        StateError = Metric::counter("vmm_hotplug_requests", "requests", REQUESTS)
            .labels(&[("request", "state"), ("result", "error")]),
        SlicesAdded = Metric::counter(
            "vmm_hotplug_slices_added",
            "slices_added",
            "128 MiB slices that became memslots (first block plugged)",
        ),
        SlicesRemoved = Metric::counter(
            "vmm_hotplug_slices_removed",
            "slices_removed",
            "128 MiB slices whose memslot was removed (last block unplugged)",
        ),
    }
}

impl HotplugStat {
    /// The rows of requests answered ERROR.
    pub const ERRORS: [HotplugStat; 4] = [
        HotplugStat::PlugError,
        HotplugStat::UnplugError,
        HotplugStat::UnplugAllError,
        HotplugStat::StateError,
    ];
}

/// The request counters by request type and response type (the protocol's
/// numbers: `REQ_*`, `RESP_*`).
const REQUEST_ROWS: [[HotplugStat; 4]; 4] = {
    use HotplugStat::*;
    [
        [PlugAck, PlugNack, PlugBusy, PlugError],
        [UnplugAck, UnplugNack, UnplugBusy, UnplugError],
        [UnplugAllAck, UnplugAllNack, UnplugAllBusy, UnplugAllError],
        [StateAck, StateNack, StateBusy, StateError],
    ]
};

/// virtio-mem's [`HOTPLUG_METRICS`] values (read by metrics and the API
/// without the lock).
#[derive(Default)]
pub struct MemStats {
    pub counters: Counters<HotplugStat, { HotplugStat::COUNT }>,
    /// The driver set DRIVER_OK (and has not reset the device since).
    pub driver_ready: AtomicBool,
    /// Host time of each block plug/unplug and slice add/remove (ns), for
    /// benchmarks.
    pub timings: std::sync::Mutex<Timings>,
}

/// virtio-mem as the VMM holds it: the device (behind its lock) and what
/// is read without the lock.
#[derive(Clone)]
pub struct HotplugHandle {
    pub device: Arc<Mutex<VirtioMem>>,
    pub stats: Arc<MemStats>,
    pub counters: Arc<DeviceCounters>,
    pub region: MemRegion,
}

const MIB: u64 = 1 << 20;

impl HotplugHandle {
    /// The device's state and counters now.
    pub fn info(&self) -> HotplugInfo {
        let s = &self.stats;
        HotplugInfo {
            driver_ready: s.driver_ready.load(Ordering::Relaxed),
            region_addr: self.region.addr,
            region_mib: self.region.size / MIB,
            block_size_mib: self.region.block_size / MIB,
            plugged_mib: s.counters.get(HotplugStat::PluggedBytes) / MIB,
            requested_mib: s.counters.get(HotplugStat::RequestedBytes) / MIB,
            guest_errors: self.counters.get(VirtioStat::GuestErrors),
            counters: Readings::new(&HOTPLUG_METRICS, &s.counters.read(), Scope::ANY),
        }
    }
}

/// virtio-mem now (`GET /memory`, metrics JSON): its region and state, and
/// one key per row of [`HOTPLUG_METRICS`] (`requests` by request and
/// result: "plug", "unplug", "unplug_all", "state"; "ack", "nack", "busy",
/// "error").
#[derive(Debug, Clone, Serialize)]
pub struct HotplugInfo {
    pub driver_ready: bool,
    /// Guest-physical start of the region.
    pub region_addr: u64,
    pub region_mib: u64,
    pub block_size_mib: u64,
    pub plugged_mib: u64,
    pub requested_mib: u64,
    pub guest_errors: u64,
    #[serde(flatten)]
    pub counters: Readings,
}

impl HotplugInfo {
    pub fn get(&self, s: HotplugStat) -> u64 {
        self.counters.get(s as usize)
    }
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

/// A region geometry or a requested size this device cannot have.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RegionError {
    #[error(
        "hotplug region {addr:#x}+{size:#x} must be 128 MiB aligned and a multiple of 128 MiB"
    )]
    Geometry { addr: u64, size: u64 },
    #[error("hotplug block size {0:#x} must be a power of two from 2 MiB up to 128 MiB")]
    BlockSize(u64),
    #[error("requested size {} MiB is larger than the hotplug region ({} MiB)", .requested >> 20, .size >> 20)]
    RequestedTooLarge { requested: u64, size: u64 },
    #[error("requested size {requested:#x} is not a multiple of the block size ({} MiB)", .block >> 20)]
    RequestedNotBlocks { requested: u64, block: u64 },
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
    pub fn validate(&self) -> Result<(), RegionError> {
        if !self.addr.is_multiple_of(SLICE) || self.size == 0 || !self.size.is_multiple_of(SLICE) {
            return Err(RegionError::Geometry {
                addr: self.addr,
                size: self.size,
            });
        }
        let b = self.block_size;
        if b < MIN_BLOCK || !b.is_power_of_two() || !SLICE.is_multiple_of(b) {
            return Err(RegionError::BlockSize(b));
        }
        Ok(())
    }

    fn blocks(&self) -> u64 {
        self.size / self.block_size
    }

    /// A `requested_size` must be whole blocks within the region.
    pub fn check_requested(&self, bytes: u64) -> Result<(), RegionError> {
        if bytes > self.size {
            return Err(RegionError::RequestedTooLarge {
                requested: bytes,
                size: self.size,
            });
        }
        if !bytes.is_multiple_of(self.block_size) {
            return Err(RegionError::RequestedNotBlocks {
                requested: bytes,
                block: self.block_size,
            });
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
    pub fn parse(b: &[u8; REQ_SIZE]) -> Request {
        Request {
            kind: u16::from_le_bytes([b[0], b[1]]),
            addr: u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]]),
            nb_blocks: u16::from_le_bytes([b[16], b[17]]),
        }
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

/// virtio-mem's own state (its memslots and their plugged blocks are the
/// memory manager's; its transport's is the transport's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct MemDeviceSnapshot {
    pub region: (u64, u64, u64),
    pub requested: u64,
    pub plugged: Vec<bool>,
    pub counters: Vec<u64>,
    pub driver_ready: bool,
}

pub struct VirtioMem {
    memory: Arc<MemoryManager>,
    interrupt: Arc<Interrupt>,
    stats: Arc<MemStats>,
    region: MemRegion,
    requested: u64,
    /// Plugged blocks.
    plugged: Vec<bool>,
    /// Plugged blocks per slice (a slice is a memslot while > 0).
    per_slice: Vec<u32>,
    max_sizes: [u16; 1],
}

impl VirtioMem {
    pub fn new(memory: Arc<MemoryManager>, interrupt: Arc<Interrupt>, region: MemRegion) -> Self {
        let blocks = region.blocks() as usize;
        let slices = (region.size / SLICE) as usize;
        Self {
            memory,
            interrupt,
            stats: Arc::new(MemStats::default()),
            region,
            requested: 0,
            plugged: vec![false; blocks],
            per_slice: vec![0; slices],
            max_sizes: [QUEUE_SIZE],
        }
    }

    /// The same device with `requested_size` already at `bytes` (boot time:
    /// no interrupt). `bytes` must pass [`MemRegion::check_requested`];
    /// anything else leaves it at 0.
    pub fn with_requested(mut self, bytes: u64) -> Self {
        if self.region.check_requested(bytes).is_ok() {
            self.requested = bytes;
            self.stats.counters.set(HotplugStat::RequestedBytes, bytes);
        }
        self
    }

    pub fn stats(&self) -> Arc<MemStats> {
        self.stats.clone()
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

    pub fn save(&self) -> MemDeviceSnapshot {
        let r = self.region;
        MemDeviceSnapshot {
            region: (r.addr, r.size, r.block_size),
            requested: self.requested,
            plugged: self.plugged.clone(),
            counters: self.stats.counters.read().to_vec(),
            driver_ready: self.stats.driver_ready.load(Ordering::Relaxed),
        }
    }

    /// Put a saved device back over memory the memory manager restored:
    /// every block it says is plugged must be plugged RAM there.
    pub fn restore(&mut self, s: &MemDeviceSnapshot) -> Result<(), DeviceRestoreError> {
        let r = self.region;
        let bad = |why: String| DeviceRestoreError { device: "mem", why };
        if s.region != (r.addr, r.size, r.block_size) || s.plugged.len() != self.plugged.len() {
            return Err(bad(format!(
                "saved region {:#x?}, configured {:#x?} (--hotplug or --hotplug-block differs?)",
                s.region,
                (r.addr, r.size, r.block_size)
            )));
        }
        self.region
            .check_requested(s.requested)
            .map_err(|e| bad(e.to_string()))?;
        let snap = self.memory.snapshot();
        for (b, _) in s.plugged.iter().enumerate().filter(|(_, p)| **p) {
            let gpa = self.block_gpa(b);
            let ok = snap
                .lookup(gpa)
                .is_some_and(|slot| slot.is_plugged(slot.page_index(gpa)));
            if !ok {
                return Err(bad(format!("block at {gpa:#x} is plugged but not RAM")));
            }
        }
        self.requested = s.requested;
        self.plugged = s.plugged.clone();
        self.per_slice.fill(0);
        for b in (0..self.plugged.len()).filter(|b| self.plugged[*b]) {
            let slice = self.slice_of(b);
            self.per_slice[slice] += 1;
        }
        self.stats.counters.load(&s.counters);
        self.stats
            .counters
            .set(HotplugStat::PluggedBytes, self.plugged_bytes());
        self.stats
            .counters
            .set(HotplugStat::RequestedBytes, self.requested);
        self.stats
            .driver_ready
            .store(s.driver_ready, Ordering::Relaxed);
        Ok(())
    }

    /// Move `requested_size` (a multiple of the block size, at most the
    /// region) and tell the driver (config interrupt).
    pub fn set_requested(&mut self, bytes: u64) -> Result<(), RegionError> {
        self.region.check_requested(bytes)?;
        self.requested = bytes;
        self.stats.counters.set(HotplugStat::RequestedBytes, bytes);
        self.interrupt.config_changed();
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

    fn timings(&self) -> std::sync::MutexGuard<'_, Timings> {
        self.stats.timings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Plug one block: add its slice's memslot if this is the slice's first
    /// plugged block, then mark the block plugged. On failure nothing has
    /// changed (a slot added for it is removed again).
    fn plug_block(&mut self, b: usize) -> Result<(), MemError> {
        let t0 = std::time::Instant::now();
        let s = self.slice_of(b);
        let first = self.per_slice[s] == 0;
        if first {
            self.memory.add_slot(NewSlot {
                gpa: self.slice_gpa(s),
                size: SLICE,
                source: PageSource::Zero,
                source_offset: 0,
                block_size: Some(self.region.block_size),
            })?;
            self.stats.counters.add_shared(HotplugStat::SlicesAdded, 1);
            Timings::push(&mut self.timings().slice_add, t0);
        }
        if let Err(e) = self.memory.plug(self.block_gpa(b), self.region.block_size) {
            if first {
                if let Err(u) = self.remove_slice(s) {
                    log::error!("virtio-mem: removing slice {s} after a failed plug: {u}");
                }
            }
            return Err(e);
        }
        self.per_slice[s] += 1;
        self.plugged[b] = true;
        Timings::push(&mut self.timings().plug_block, t0);
        Ok(())
    }

    /// Remove slice `s`'s memslot (its last block went).
    fn remove_slice(&mut self, s: usize) -> Result<(), MemError> {
        let t = std::time::Instant::now();
        self.memory.remove_slot(self.slice_gpa(s))?;
        self.stats
            .counters
            .add_shared(HotplugStat::SlicesRemoved, 1);
        Timings::push(&mut self.timings().slice_remove, t);
        Ok(())
    }

    /// Unplug one block: exclude installers, clear its bit and zap it (I6),
    /// then remove the slice's memslot if it emptied. If the zap fails the
    /// block is plugged again (its content may be gone: the driver gave it
    /// up). A slice whose memslot KVM will not delete is out of the table
    /// all the same: the block counts as unplugged and the error is the
    /// host's, reported.
    fn unplug_block(&mut self, b: usize) -> Result<(), MemError> {
        let t0 = std::time::Instant::now();
        let s = self.slice_of(b);
        let (gpa, size) = (self.block_gpa(b), self.region.block_size);
        if let Err(e) = self.memory.unplug(gpa, size) {
            if let Err(u) = self.memory.plug(gpa, size) {
                log::error!("virtio-mem: re-plugging block {b} after a failed unplug: {u}");
            }
            return Err(e);
        }
        self.plugged[b] = false;
        self.per_slice[s] -= 1;
        if self.per_slice[s] == 0 {
            self.remove_slice(s)?;
        }
        Timings::push(&mut self.timings().unplug_block, t0);
        Ok(())
    }

    /// Plug (or unplug) every block of `blocks`, all or nothing: on a
    /// failure the blocks this call changed are changed back.
    fn change(&mut self, blocks: &[usize], plug: bool) -> Result<(), MemError> {
        for (i, &b) in blocks.iter().enumerate() {
            let r = if plug {
                self.plug_block(b)
            } else {
                self.unplug_block(b)
            };
            if let Err(e) = r {
                for &done in blocks[..i].iter().rev() {
                    let undo = if plug {
                        self.unplug_block(done)
                    } else {
                        self.plug_block(done)
                    };
                    if let Err(u) = undo {
                        log::error!("virtio-mem: undoing block {done} failed: {u}");
                    }
                }
                return Err(e);
            }
        }
        self.stats
            .counters
            .set(HotplugStat::PluggedBytes, self.plugged_bytes());
        Ok(())
    }

    /// Carry out one request (the response is written by the caller).
    pub fn execute(&mut self, req: Request) -> Response {
        let (blocks, plugged) = match req.kind {
            REQ_PLUG | REQ_UNPLUG | REQ_STATE => {
                let Some((first, n)) = self.blocks_of(req.addr, req.nb_blocks) else {
                    return Response::of(RESP_ERROR);
                };
                let range = first..first + n;
                let plugged = self.plugged[range.clone()].iter().filter(|p| **p).count();
                (range.collect::<Vec<_>>(), plugged)
            }
            REQ_UNPLUG_ALL => {
                let all: Vec<usize> = (0..self.plugged.len())
                    .filter(|&b| self.plugged[b])
                    .collect();
                let n = all.len();
                (all, n)
            }
            _ => return Response::of(RESP_ERROR),
        };
        let n = blocks.len();
        let plug = match req.kind {
            REQ_STATE => {
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
            REQ_PLUG if plugged != 0 => return Response::of(RESP_ERROR),
            REQ_PLUG
                if self.plugged_bytes() + n as u64 * self.region.block_size > self.requested =>
            {
                return Response::of(RESP_NACK)
            }
            REQ_PLUG => true,
            REQ_UNPLUG if plugged != n => return Response::of(RESP_ERROR),
            _ => false,
        };
        match self.change(&blocks, plug) {
            Ok(()) => Response::of(RESP_ACK),
            Err(e) => {
                log::warn!("virtio-mem: {req:?} failed (undone): {e}");
                Response::of(RESP_ERROR)
            }
        }
    }

    fn count(&self, req: &Request, resp: &Response) {
        let row = REQUEST_ROWS
            .get(usize::from(req.kind))
            .and_then(|r| r.get(usize::from(resp.kind)));
        if let Some(row) = row {
            self.stats.counters.add_shared(*row, 1);
        }
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
        1 << F_UNPLUGGED_INACCESSIBLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn config(&self) -> Vec<u8> {
        let r = &self.region;
        let mut cfg = vec![0u8; CONFIG_SIZE];
        cfg[0..8].copy_from_slice(&r.block_size.to_le_bytes());
        // node_id 0, padding.
        cfg[16..24].copy_from_slice(&r.addr.to_le_bytes());
        cfg[24..32].copy_from_slice(&r.size.to_le_bytes());
        cfg[32..40].copy_from_slice(&r.size.to_le_bytes());
        cfg[40..48].copy_from_slice(&self.plugged_bytes().to_le_bytes());
        cfg[48..56].copy_from_slice(&self.requested.to_le_bytes());
        cfg
    }

    fn activate(&mut self, _acked: u64) {
        self.stats.driver_ready.store(true, Ordering::Relaxed);
    }

    /// A reset leaves plugged memory plugged (the spec lets the driver find
    /// it with STATE or UNPLUG_ALL it).
    fn reset(&mut self) {
        self.stats.driver_ready.store(false, Ordering::Relaxed);
    }

    /// One chain: a readable request, then a writable response buffer.
    fn process(
        &mut self,
        queue: usize,
        chain: &Chain,
        done: &mut Completions,
    ) -> Result<(), ChainError> {
        if queue != 0 {
            return Err(ChainError::QueueNotInUse { queue, features: 0 });
        }
        let req = Request::parse(&chain.read_request::<REQ_SIZE>()?);
        let resp = self.execute(req);
        self.count(&req, &resp);
        let written = chain.write_response(&resp.bytes())?;
        if resp.kind == RESP_ERROR {
            done.guest_error(ChainError::Request("virtio-mem request answered ERROR"));
        }
        done.used(chain.head(), written);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use vmm_memory::{KvmSlots, MemStat, NoKvm, RamRange};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    const MIB: u64 = 1 << 20;
    const BASE: u64 = 512 * MIB;

    fn dev(size: u64) -> VirtioMem {
        dev_on(Arc::new(NoKvm), size)
    }

    /// KVM that refuses to register memory at `fail_gpa` (an injected host
    /// failure: no free memslot, say).
    struct Refusing {
        fail_gpa: AtomicU64,
    }

    impl KvmSlots for Refusing {
        fn set_region(
            &self,
            _slot: u32,
            gpa: u64,
            size: u64,
            _hva: u64,
            _log_dirty: bool,
        ) -> Result<(), kvm_ioctls::Error> {
            if size != 0 && gpa == self.fail_gpa.load(Ordering::Relaxed) {
                return Err(kvm_ioctls::Error::new(libc::ENOSPC));
            }
            Ok(())
        }

        fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, kvm_ioctls::Error> {
            NoKvm.dirty_log(slot, size)
        }
    }

    fn dev_on(kvm: Arc<dyn KvmSlots>, size: u64) -> VirtioMem {
        let memory = Arc::new(
            MemoryManager::new(
                kvm,
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
        let gen = || d.memory.stats()[MemStat::Generation];
        let g0 = gen();
        // A range straddling the first slice boundary: both slices appear.
        let edge = BASE + 126 * MIB;
        assert_eq!(d.execute(req(REQ_PLUG, edge, 2)).kind, RESP_ACK);
        assert!(d.memory.is_ram(BASE) && d.memory.is_ram(BASE + 128 * MIB));
        assert!(!d.memory.is_ram(BASE + 256 * MIB), "third slice untouched");
        assert_eq!(stats.counters.get(HotplugStat::SlicesAdded), 2);
        assert_eq!(d.memory.stats()[MemStat::Generation], g0 + 2);
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
        assert_eq!(stats.counters.get(HotplugStat::SlicesRemoved), 1);
    }

    #[test]
    fn requested_size_is_validated() {
        let mut d = dev(128 * MIB);
        assert!(d.set_requested(129 * MIB).is_err());
        assert!(d.set_requested(3 * MIB).is_err());
        assert!(d.set_requested(128 * MIB).is_ok());
        let cfg = d.config();
        assert_eq!(cfg[48..56], (128 * MIB).to_le_bytes());
        assert_eq!(cfg[16..24], BASE.to_le_bytes());
    }

    /// A plug the host fails half way leaves the layout as it was (the
    /// slice the first block added is gone again), answers ERROR, and a
    /// later plug of the same blocks succeeds: no `Overlap` left behind.
    #[test]
    fn a_failed_plug_is_undone() {
        let kvm = Arc::new(Refusing {
            fail_gpa: AtomicU64::new(BASE + SLICE),
        });
        let mut d = dev_on(kvm.clone(), 256 * MIB);
        d.set_requested(256 * MIB).unwrap();
        let slots = |d: &VirtioMem| d.memory.stats()[MemStat::Memslots];
        let before = slots(&d);
        // Two blocks across the slice boundary: the second slice's memslot
        // is refused after the first slice's was added.
        let r = d.execute(req(REQ_PLUG, BASE + SLICE - 2 * MIB, 2));
        assert_eq!(r, Response::of(RESP_ERROR));
        assert_eq!(d.plugged_bytes(), 0);
        assert_eq!(slots(&d), before, "the first slice's memslot was removed");
        assert!(!d.memory.is_ram(BASE + SLICE - 2 * MIB));
        assert_eq!(d.stats().counters.get(HotplugStat::PluggedBytes), 0);
        // The host recovers: the same request now succeeds.
        kvm.fail_gpa.store(u64::MAX, Ordering::Relaxed);
        let r = d.execute(req(REQ_PLUG, BASE + SLICE - 2 * MIB, 2));
        assert_eq!(r, Response::of(RESP_ACK));
        assert_eq!(d.plugged_bytes(), 4 * MIB);
        assert_eq!(slots(&d), before + 2);
    }
}
