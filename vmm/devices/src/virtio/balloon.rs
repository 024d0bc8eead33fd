//! virtio-balloon (device ID 5).
//!
//! Features offered: `VERSION_1`, `DEFLATE_ON_OOM`, `STATS_VQ`, and
//! `FREE_PAGE_REPORTING` when asked for. Never `FREE_PAGE_HINT`: hinting can
//! corrupt memory when the guest reuses a hinted page before the host frees
//! it (Firecracker documents it). Never `UFFD_FEATURE_EVENT_REMOVE` either:
//! `madvise` would block until somebody reads the event and pending events
//! make `UFFDIO_COPY` fail with `EAGAIN` (the Firecracker balloon freeze);
//! the memory manager's discard bitmap carries "refault as zero" instead.
//!
//! - inflate: every PFN of a chain is read first (no guest memory is touched
//!   while an install lock is held exclusively); PFNs outside RAM are counted
//!   and ignored; chains over 256 PFNs are rejected; the PFNs are coalesced
//!   into ranges split at memslot boundaries and each range is discarded
//!   through [`MemoryManager::inflate`] (I3; on hugetlb RAM a huge page is
//!   dropped when all its frames are in); only then is the chain used and
//!   the interrupt raised.
//! - deflate: the frames leave the memory manager's partial huge page
//!   records (hugetlb RAM), then the chain is used (the pages refault on
//!   touch).
//! - stats: the driver's buffer is parsed and held; every polling interval
//!   it is returned (used) so the driver refills it.
//! - free page reporting: each reported range is discarded, then the chain
//!   is used.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;

use super::{
    DeviceCounters, GuestError, Interrupt, VirtioDevice, INT_CONFIG, INT_USED_RING,
    VIRTIO_F_VERSION_1,
};
use vmm_memory::{GuestMemory, MemoryManager, PAGE_SIZE};

pub const DEVICE_ID: u32 = 5;
pub const F_STATS_VQ: u32 = 1;
pub const F_DEFLATE_ON_OOM: u32 = 2;
pub const F_FREE_PAGE_REPORTING: u32 = 5;
/// Most PFNs one inflate/deflate chain may carry (Linux sends at most 256).
pub const MAX_PFNS: usize = 256;
/// Balloon PFNs are 4 KiB frames whatever the guest's page size.
const PFN_SHIFT: u32 = 12;
const QUEUE_SIZE: u16 = 256;
/// inflateq, deflateq, statsq, reporting_vq (indices depend on features).
const QUEUES: usize = 4;
/// `struct virtio_balloon_config`: num_pages, actual, free_page_hint_cmd_id,
/// poison_val.
const CONFIG_SIZE: u64 = 16;
const CONFIG_ACTUAL: u64 = 4;
/// One stats entry: u16 tag, u64 value (packed).
const STAT_ENTRY: usize = 10;
/// Most stats entries read from one buffer (the spec defines 16 tags).
const MAX_STATS: usize = 64;

/// The guest's `VIRTIO_BALLOON_S_*` tags, by name.
pub const STAT_NAMES: [(u16, &str); 10] = [
    (0, "swap_in"),
    (1, "swap_out"),
    (2, "major_faults"),
    (3, "minor_faults"),
    (4, "free_memory"),
    (5, "total_memory"),
    (6, "available_memory"),
    (7, "disk_caches"),
    (8, "hugetlb_allocations"),
    (9, "hugetlb_failures"),
];

/// What a PFN run or reported range does to guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// Given to the host until deflated ([`MemoryManager::inflate`]).
    Inflate,
    /// Back to the guest ([`MemoryManager::deflate`]).
    Deflate,
    /// Free now, the guest's again when the chain is used
    /// ([`MemoryManager::discard`]).
    Report,
}

/// What a queue index is, given the negotiated features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

fn role(index: usize, acked: u64) -> Option<Role> {
    let stats = acked & (1 << F_STATS_VQ) != 0;
    let reporting = acked & (1 << F_FREE_PAGE_REPORTING) != 0;
    // Queues of features not negotiated are skipped (the driver numbers only
    // the queues it uses, in this order).
    let mut order = vec![Role::Inflate, Role::Deflate];
    if stats {
        order.push(Role::Stats);
    }
    if reporting {
        order.push(Role::Reporting);
    }
    order.get(index).copied()
}

/// The balloon's counters and the guest's stats (read by metrics and the
/// API without the device lock).
#[derive(Default)]
pub struct BalloonStats {
    /// The driver set DRIVER_OK (and has not reset the device since).
    pub driver_ready: std::sync::atomic::AtomicBool,
    pub target_pages: AtomicU64,
    pub actual_pages: AtomicU64,
    pub inflated_pages: AtomicU64,
    pub deflated_pages: AtomicU64,
    pub reported_pages: AtomicU64,
    pub discarded_bytes: AtomicU64,
    pub rejected_descriptors: AtomicU64,
    pub pfns_outside_ram: AtomicU64,
    /// Latest guest stats by tag, and when they arrived.
    pub guest: Mutex<(BTreeMap<u16, u64>, Option<Instant>)>,
    /// Stats polling interval in seconds (0: off).
    pub stats_interval_s: AtomicU64,
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// How the balloon is configured at boot.
#[derive(Debug, Clone, Copy)]
pub struct BalloonConfig {
    /// Initial target, in 4 KiB pages.
    pub target_pages: u32,
    /// Offer `FREE_PAGE_REPORTING`.
    pub free_page_reporting: bool,
    /// Stats polling interval (0: do not poll).
    pub stats_interval: Duration,
}

pub struct Balloon {
    memory: Arc<MemoryManager>,
    interrupt: Arc<Interrupt>,
    counters: Arc<DeviceCounters>,
    stats: Arc<BalloonStats>,
    offered: u64,
    acked: u64,
    num_pages: u32,
    actual: u32,
    generation: u32,
    /// The driver's stats buffer, held until the next poll.
    stats_head: Option<u16>,
    /// Frames in the balloon now (inflated, not deflated since).
    ballooned: std::collections::BTreeSet<u64>,
    last_poll: Instant,
    max_sizes: [u16; QUEUES],
}

impl Balloon {
    pub fn new(
        memory: Arc<MemoryManager>,
        interrupt: Arc<Interrupt>,
        config: BalloonConfig,
    ) -> Self {
        let mut offered = 1u64 << VIRTIO_F_VERSION_1 | 1 << F_STATS_VQ | 1 << F_DEFLATE_ON_OOM;
        if config.free_page_reporting {
            offered |= 1 << F_FREE_PAGE_REPORTING;
        }
        let stats = Arc::new(BalloonStats::default());
        stats
            .target_pages
            .store(config.target_pages.into(), Ordering::Relaxed);
        stats
            .stats_interval_s
            .store(config.stats_interval.as_secs(), Ordering::Relaxed);
        Self {
            memory,
            interrupt,
            counters: Arc::new(DeviceCounters::default()),
            stats,
            offered,
            acked: 0,
            num_pages: config.target_pages,
            actual: 0,
            generation: 0,
            stats_head: None,
            ballooned: Default::default(),
            last_poll: Instant::now(),
            max_sizes: [QUEUE_SIZE; QUEUES],
        }
    }

    pub fn stats(&self) -> Arc<BalloonStats> {
        self.stats.clone()
    }

    /// The device's generic counters (guest errors, notifies, ...).
    pub fn device_counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    /// Set the target (4 KiB pages) and tell the driver (config interrupt).
    pub fn set_target(&mut self, pages: u32) {
        self.num_pages = pages;
        self.generation = self.generation.wrapping_add(1);
        self.stats
            .target_pages
            .store(pages.into(), Ordering::Relaxed);
        self.interrupt.trigger(INT_CONFIG);
    }

    /// Pages in the balloon that are resident again: the guest used them
    /// after giving them (its own data, lost; the VMM stays consistent).
    pub fn touched_pages(&self) -> u64 {
        let mut n = 0;
        let mut run: Option<(u64, u64)> = None;
        for &p in &self.ballooned {
            run = match run {
                Some((first, last)) if p == last + 1 => Some((first, p)),
                Some((first, last)) => {
                    n += self.resident_run(first, last);
                    Some((p, p))
                }
                None => Some((p, p)),
            };
        }
        if let Some((first, last)) = run {
            n += self.resident_run(first, last);
        }
        n
    }

    fn resident_run(&self, first: u64, last: u64) -> u64 {
        self.memory
            .resident_touched_in(first << PFN_SHIFT, (last - first + 1) << PFN_SHIFT)
    }

    pub fn target(&self) -> u32 {
        self.num_pages
    }

    pub fn actual(&self) -> u32 {
        self.actual
    }

    /// Inflate (or deflate) the 4 KiB frames `pfns` (deduplicated,
    /// coalesced, split at memslot boundaries); PFNs outside RAM are
    /// skipped (and counted on inflate). Returns the pages acted on.
    fn balloon_pfns(&self, pfns: &mut [u64], op: Op) -> u64 {
        pfns.sort_unstable();
        let mut done = 0;
        let mut i = 0;
        while i < pfns.len() {
            let mut j = i + 1;
            while j < pfns.len() && pfns[j] <= pfns[j - 1] + 1 {
                j += 1;
            }
            // One run of consecutive frames (duplicates folded).
            let first = pfns[i];
            let count = pfns[j - 1] - first + 1;
            done += self.apply_range(first << PFN_SHIFT, count * PAGE_SIZE, op);
            i = j;
        }
        done
    }

    /// Apply `op` to `[gpa, gpa+len)`, split at memslot boundaries; pages
    /// outside RAM are counted (except on deflate). Returns the pages acted
    /// on.
    fn apply_range(&self, gpa: u64, len: u64, op: Op) -> u64 {
        let end = gpa.saturating_add(len);
        let snap = self.memory.snapshot();
        let mut at = gpa;
        let mut done = 0;
        while at < end {
            match snap.lookup(at) {
                Some(slot) => {
                    let stop = end.min(slot.end());
                    let r = match op {
                        Op::Inflate => self.memory.inflate(at, stop - at),
                        Op::Deflate => self.memory.deflate(at, stop - at),
                        Op::Report => self.memory.discard(at, stop - at),
                    };
                    match r {
                        Ok(()) => {
                            done += (stop - at) / PAGE_SIZE;
                            if op != Op::Deflate {
                                add(&self.stats.discarded_bytes, stop - at);
                            }
                        }
                        Err(e) => log::warn!("virtio-balloon: {op:?} failed: {e}"),
                    }
                    at = stop;
                }
                None => {
                    // Skip to the next slot, or to the end.
                    let next = snap
                        .slots
                        .iter()
                        .map(|s| s.gpa)
                        .filter(|&g| g > at)
                        .min()
                        .unwrap_or(end)
                        .min(end);
                    if op != Op::Deflate {
                        add(
                            &self.stats.pfns_outside_ram,
                            (next - at).div_ceil(PAGE_SIZE),
                        );
                    }
                    at = next;
                }
            }
        }
        done
    }

    /// Every device-readable byte of a chain, at most `max` (else `Err`).
    fn read_chain(
        chain: DescriptorChain<&GuestMemory>,
        mem: &GuestMemory,
        max: usize,
    ) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        for d in chain {
            if d.is_write_only() {
                return Err("a write-only descriptor where the device reads".into());
            }
            let len = d.len() as usize;
            if out.len() + len > max {
                return Err(format!("chain of more than {max} bytes"));
            }
            let start = out.len();
            out.resize(start + len, 0);
            mem.read_slice(&mut out[start..], d.addr())
                .map_err(|e| format!("descriptor at {:#x}+{len:#x}: {e}", d.addr().0))?;
        }
        Ok(out)
    }

    /// Inflate or deflate chains: read every PFN first, then act.
    fn pfn_queue(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        inflate: bool,
    ) -> Result<(), GuestError> {
        let chains = pop_all(queue, mem)?;
        for chain in chains {
            let head = chain.head_index();
            match Self::read_chain(chain, mem, MAX_PFNS * 4) {
                Ok(bytes) if bytes.len() % 4 == 0 => {
                    let mut pfns: Vec<u64> = bytes
                        .chunks_exact(4)
                        .map(|c| u64::from(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                        .collect();
                    if inflate {
                        let n = self.balloon_pfns(&mut pfns, Op::Inflate);
                        add(&self.stats.inflated_pages, n);
                        self.ballooned.extend(pfns.iter().copied());
                    } else {
                        add(&self.stats.deflated_pages, pfns.len() as u64);
                        for p in &pfns {
                            self.ballooned.remove(p);
                        }
                        self.balloon_pfns(&mut pfns, Op::Deflate);
                    }
                }
                Ok(bytes) => self.reject(format!(
                    "{} bytes is not a whole number of PFNs",
                    bytes.len()
                )),
                Err(e) => self.reject(e),
            }
            used(queue, mem, head)?;
            DeviceCounters::bump(&self.counters.chains, 1);
        }
        self.interrupt.trigger(INT_USED_RING);
        Ok(())
    }

    fn reject(&self, why: String) {
        add(&self.stats.rejected_descriptors, 1);
        DeviceCounters::bump(&self.counters.guest_errors, 1);
        log::debug!("virtio-balloon: rejected chain: {why}");
    }

    /// Free page reporting: discard each reported range, then use the chain.
    fn reporting(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<(), GuestError> {
        let chains = pop_all(queue, mem)?;
        for chain in chains {
            let head = chain.head_index();
            for d in chain {
                let (gpa, len) = (d.addr().0, u64::from(d.len()));
                if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
                    self.reject(format!(
                        "reported range {gpa:#x}+{len:#x} is not whole pages"
                    ));
                    continue;
                }
                let n = self.apply_range(gpa, len, Op::Report);
                add(&self.stats.reported_pages, n);
            }
            used(queue, mem, head)?;
            DeviceCounters::bump(&self.counters.chains, 1);
        }
        self.interrupt.trigger(INT_USED_RING);
        Ok(())
    }

    /// A stats buffer arrived: parse it and hold it until the next poll.
    fn stats_buffer(&mut self, queue: &mut Queue, mem: &GuestMemory) -> Result<(), GuestError> {
        for chain in pop_all(queue, mem)? {
            let head = chain.head_index();
            if let Some(old) = self.stats_head.replace(head) {
                // The driver has one buffer out at a time; give back the old.
                used(queue, mem, old)?;
            }
            match Self::read_chain(chain, mem, MAX_STATS * STAT_ENTRY) {
                Ok(bytes) => {
                    let mut g = self.stats.guest.lock().unwrap_or_else(|e| e.into_inner());
                    for e in bytes.chunks_exact(STAT_ENTRY) {
                        let tag = u16::from_le_bytes([e[0], e[1]]);
                        let mut v = [0u8; 8];
                        v.copy_from_slice(&e[2..]);
                        g.0.insert(tag, u64::from_le_bytes(v));
                    }
                    g.1 = Some(Instant::now());
                }
                Err(e) => self.reject(format!("stats buffer: {e}")),
            }
        }
        Ok(())
    }
}

/// Every available chain (at most the queue size). A broken avail ring is
/// an unrecoverable guest error.
fn pop_all<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemory,
) -> Result<Vec<DescriptorChain<&'m GuestMemory>>, GuestError> {
    queue
        .iter(mem)
        .map(|it| it.collect())
        .map_err(|e| GuestError(format!("avail ring: {e}")))
}

fn used(queue: &mut Queue, mem: &GuestMemory, head: u16) -> Result<(), GuestError> {
    queue
        .add_used(mem, head, 0)
        .map_err(|e| GuestError(format!("used ring: {e}")))
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        DEVICE_ID
    }

    fn name(&self) -> &'static str {
        "balloon"
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut cfg = [0u8; CONFIG_SIZE as usize];
        cfg[..4].copy_from_slice(&self.num_pages.to_le_bytes());
        cfg[4..8].copy_from_slice(&self.actual.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = offset
                .checked_add(i as u64)
                .and_then(|o| cfg.get(o as usize))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), GuestError> {
        if offset != CONFIG_ACTUAL || data.len() != 4 {
            return Err(GuestError(format!(
                "{}-byte write at {offset:#x}: only `actual` (4 bytes at 4) is writable",
                data.len()
            )));
        }
        self.actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        self.stats
            .actual_pages
            .store(self.actual.into(), Ordering::Relaxed);
        Ok(())
    }

    fn activate(&mut self, acked: u64) {
        self.acked = acked;
        self.last_poll = Instant::now();
        self.stats.driver_ready.store(true, Ordering::Relaxed);
    }

    fn reset(&mut self) {
        self.acked = 0;
        self.ballooned.clear();
        self.stats.driver_ready.store(false, Ordering::Relaxed);
        self.stats_head = None;
        self.actual = 0;
        self.stats.actual_pages.store(0, Ordering::Relaxed);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<(), GuestError> {
        match role(index, self.acked) {
            Some(Role::Inflate) => self.pfn_queue(queue, mem, true),
            Some(Role::Deflate) => self.pfn_queue(queue, mem, false),
            Some(Role::Stats) => self.stats_buffer(queue, mem),
            Some(Role::Reporting) => self.reporting(queue, mem),
            None => Err(GuestError(format!(
                "queue {index} is not used with features {:#x}",
                self.acked
            ))),
        }
    }

    fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    fn config_generation(&self) -> u32 {
        self.generation
    }

    /// Every stats interval, give the held stats buffer back so the driver
    /// refills it.
    fn tick(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> Result<(), GuestError> {
        let interval = self.stats.stats_interval_s.load(Ordering::Relaxed);
        if interval == 0 || self.last_poll.elapsed() < Duration::from_secs(interval) {
            return Ok(());
        }
        self.last_poll = Instant::now();
        let Some(index) = (0..QUEUES).find(|&i| role(i, self.acked) == Some(Role::Stats)) else {
            return Ok(());
        };
        if let (Some(head), Some(q)) = (self.stats_head.take(), queues.get_mut(index)) {
            used(q, mem, head)?;
            self.interrupt.trigger(INT_USED_RING);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_roles_follow_the_negotiated_features() {
        let none = 0;
        let stats = 1 << F_STATS_VQ;
        let rep = 1 << F_FREE_PAGE_REPORTING;
        assert_eq!(role(0, none), Some(Role::Inflate));
        assert_eq!(role(1, none), Some(Role::Deflate));
        assert_eq!(role(2, none), None);
        assert_eq!(role(2, stats), Some(Role::Stats));
        assert_eq!(role(2, rep), Some(Role::Reporting));
        assert_eq!(role(3, stats | rep), Some(Role::Reporting));
        assert_eq!(role(3, stats), None);
    }
}
