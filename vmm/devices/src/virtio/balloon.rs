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
//!   into runs and each run is discarded through [`MemoryManager::inflate`]
//!   (I3, across memslots; on hugetlb RAM a huge page is dropped when all
//!   its frames are in); only then is the chain used and the interrupt
//!   raised.
//! - deflate: the frames leave the memory manager's partial huge page
//!   records (hugetlb RAM), then the chain is used (the pages refault on
//!   touch).
//! - stats: the driver's buffer is parsed and held; every polling interval
//!   it is returned (used) so the driver refills it.
//! - free page reporting: each reported range is discarded, then the chain
//!   is used.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use vmm_counters::{metrics, Counters, Metric, Readings, Scope};
use vmm_memory::{MemoryManager, PAGE_SIZE};

use super::{
    Chain, ChainError, Completions, DeviceCounters, DeviceRestoreError, GuestError, Interrupt,
    VirtioDevice, VirtioStat,
};

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
const CONFIG_SIZE: usize = 16;
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

metrics! {
    /// What the balloon counts.
    pub enum BalloonStat in BALLOON_METRICS {
        TargetPages = Metric::gauge(
            "vmm_balloon_target_pages",
            "target_pages",
            "Balloon target (4 KiB pages)",
        ),
        ActualPages = Metric::gauge(
            "vmm_balloon_actual_pages",
            "actual_pages",
            "Pages in the balloon, as the guest reports it",
        ),
        InflatedPages = Metric::counter(
            "vmm_balloon_inflated_pages",
            "inflated_pages",
            "Pages inflated (discarded)",
        ),
        DeflatedPages = Metric::counter(
            "vmm_balloon_deflated_pages",
            "deflated_pages",
            "Pages deflated",
        ),
        ReportedPages = Metric::counter(
            "vmm_balloon_reported_pages",
            "reported_pages",
            "Free pages the guest reported (discarded)",
        ),
        DiscardedBytes = Metric::counter(
            "vmm_balloon_discarded_bytes",
            "discarded_bytes",
            "Bytes of guest RAM the balloon discarded",
        ),
        RejectedDescriptors = Metric::counter(
            "vmm_balloon_rejected_descriptors",
            "rejected_descriptors",
            "Balloon descriptor chains rejected as malformed",
        ),
        PfnsOutsideRam = Metric::counter(
            "vmm_balloon_pfns_outside_ram",
            "pfns_outside_ram",
            "Balloon PFNs outside guest RAM (ignored)",
        ),
    }
}

/// The guest's latest memory statistics, one series per statistic
/// (labelled `stat`, named as [`STAT_NAMES`] says).
pub static BALLOON_GUEST_STAT: Metric = Metric::gauge(
    "vmm_balloon_guest_stat",
    "guest_stats",
    "The guest's latest memory statistics (VIRTIO_BALLOON_S_*)",
);

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

/// The balloon's [`BALLOON_METRICS`] values and the guest's stats (read
/// by metrics and the API without the device lock).
#[derive(Default)]
pub struct BalloonStats {
    pub counters: Counters<BalloonStat, { BalloonStat::COUNT }>,
    /// The driver set DRIVER_OK (and has not reset the device since).
    pub driver_ready: AtomicBool,
    /// Latest guest stats by tag, and when they arrived.
    pub guest: Mutex<(BTreeMap<u16, u64>, Option<Instant>)>,
    /// Stats polling interval in seconds (0: off).
    pub stats_interval_s: AtomicU64,
}

impl BalloonStats {
    /// The guest's statistics by name (`tag_N` for tags this VMM does not
    /// name), and how long ago they arrived.
    pub fn guest_stats(&self) -> (BTreeMap<String, u64>, Option<Duration>) {
        let g = self.guest.lock().unwrap_or_else(|e| e.into_inner());
        let named =
            g.0.iter()
                .map(|(tag, v)| {
                    let name = STAT_NAMES
                        .iter()
                        .find(|(t, _)| t == tag)
                        .map_or_else(|| format!("tag_{tag}"), |(_, n)| n.to_string());
                    (name, *v)
                })
                .collect();
        (named, g.1.map(|t| t.elapsed()))
    }
}

/// The balloon as the VMM holds it: the device (behind its lock) and what
/// is read without the lock.
#[derive(Clone)]
pub struct BalloonHandle {
    pub device: Arc<Mutex<Balloon>>,
    pub stats: Arc<BalloonStats>,
    pub counters: Arc<DeviceCounters>,
}

const MIB: u64 = 1 << 20;

impl BalloonHandle {
    /// The balloon's state and counters now.
    pub fn info(&self) -> BalloonInfo {
        let s = &self.stats;
        let (guest_stats, age) = s.guest_stats();
        BalloonInfo {
            driver_ready: s.driver_ready.load(Ordering::Relaxed),
            target_mib: s.counters.get(BalloonStat::TargetPages) * PAGE_SIZE / MIB,
            actual_mib: s.counters.get(BalloonStat::ActualPages) * PAGE_SIZE / MIB,
            guest_errors: self.counters.get(VirtioStat::GuestErrors),
            stats_interval_s: s.stats_interval_s.load(Ordering::Relaxed),
            guest_stats,
            guest_stats_age_s: age.map(|d| d.as_secs_f64()),
            counters: Readings::new(&BALLOON_METRICS, &s.counters.read(), Scope::ANY),
        }
    }
}

/// The balloon now (`GET /balloon`, metrics JSON): its state, and one key
/// per row of [`BALLOON_METRICS`].
#[derive(Debug, Clone, Serialize)]
pub struct BalloonInfo {
    /// The guest's driver has set the device up (DRIVER_OK).
    pub driver_ready: bool,
    pub target_mib: u64,
    pub actual_mib: u64,
    /// Guest errors the device met (bad registers, bad descriptors, ...).
    pub guest_errors: u64,
    pub stats_interval_s: u64,
    /// The guest's latest statistics by name (bytes, or counts), if it sent
    /// any.
    pub guest_stats: BTreeMap<String, u64>,
    /// Seconds since the guest last sent statistics.
    pub guest_stats_age_s: Option<f64>,
    #[serde(flatten)]
    pub counters: Readings,
}

impl BalloonInfo {
    pub fn get(&self, s: BalloonStat) -> u64 {
        self.counters.get(s as usize)
    }
}

/// The balloon's own state (its transport's is the transport's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct BalloonSnapshot {
    pub offered: u64,
    pub acked: u64,
    pub num_pages: u32,
    pub actual: u32,
    pub stats_head: Option<u16>,
    /// Frames in the balloon.
    pub ballooned: Vec<u64>,
    pub counters: Vec<u64>,
    pub stats_interval_s: u64,
    pub guest_stats: Vec<(u16, u64)>,
    pub driver_ready: bool,
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
    stats: Arc<BalloonStats>,
    offered: u64,
    acked: u64,
    num_pages: u32,
    actual: u32,
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
        let mut offered = 1u64 << F_STATS_VQ | 1 << F_DEFLATE_ON_OOM;
        if config.free_page_reporting {
            offered |= 1 << F_FREE_PAGE_REPORTING;
        }
        let stats = Arc::new(BalloonStats::default());
        stats
            .counters
            .set(BalloonStat::TargetPages, config.target_pages.into());
        stats
            .stats_interval_s
            .store(config.stats_interval.as_secs(), Ordering::Relaxed);
        Self {
            memory,
            interrupt,
            stats,
            offered,
            acked: 0,
            num_pages: config.target_pages,
            actual: 0,
            stats_head: None,
            ballooned: Default::default(),
            last_poll: Instant::now(),
            max_sizes: [QUEUE_SIZE; QUEUES],
        }
    }

    pub fn stats(&self) -> Arc<BalloonStats> {
        self.stats.clone()
    }

    /// Set the target (4 KiB pages) and tell the driver (config interrupt).
    pub fn set_target(&mut self, pages: u32) {
        self.num_pages = pages;
        self.stats
            .counters
            .set(BalloonStat::TargetPages, pages.into());
        self.interrupt.config_changed();
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

    pub fn save(&self) -> BalloonSnapshot {
        let guest = self.stats.guest.lock().unwrap_or_else(|e| e.into_inner());
        BalloonSnapshot {
            offered: self.offered,
            acked: self.acked,
            num_pages: self.num_pages,
            actual: self.actual,
            stats_head: self.stats_head,
            ballooned: self.ballooned.iter().copied().collect(),
            counters: self.stats.counters.read().to_vec(),
            stats_interval_s: self.stats.stats_interval_s.load(Ordering::Relaxed),
            guest_stats: guest.0.iter().map(|(k, v)| (*k, *v)).collect(),
            driver_ready: self.stats.driver_ready.load(Ordering::Relaxed),
        }
    }

    /// Put a saved balloon back (the VM's memory already has the inflated
    /// pages as holes).
    pub fn restore(&mut self, s: &BalloonSnapshot) -> Result<(), DeviceRestoreError> {
        if s.offered != self.offered {
            return Err(DeviceRestoreError {
                device: "balloon",
                why: format!(
                    "saved with features {:#x}, configured with {:#x} (--balloon-free-page-reporting differs?)",
                    s.offered, self.offered
                ),
            });
        }
        self.acked = s.acked;
        self.num_pages = s.num_pages;
        self.actual = s.actual;
        self.stats_head = s.stats_head;
        self.ballooned = s.ballooned.iter().copied().collect();
        self.stats.counters.load(&s.counters);
        self.stats
            .stats_interval_s
            .store(s.stats_interval_s, Ordering::Relaxed);
        self.stats
            .driver_ready
            .store(s.driver_ready, Ordering::Relaxed);
        let mut g = self.stats.guest.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = s.guest_stats.iter().copied().collect();
        self.last_poll = Instant::now();
        Ok(())
    }

    pub fn actual(&self) -> u32 {
        self.actual
    }

    /// Inflate (or deflate) the 4 KiB frames `pfns` (deduplicated,
    /// coalesced into runs). Returns the pages acted on.
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

    /// Apply `op` to the guest RAM in `[gpa, gpa+len)` (across memslots);
    /// pages outside RAM are counted (except on deflate). Returns the pages
    /// acted on.
    fn apply_range(&self, gpa: u64, len: u64, op: Op) -> u64 {
        let r = match op {
            Op::Inflate => self.memory.inflate(gpa, len),
            Op::Deflate => self.memory.deflate(gpa, len),
            Op::Report => self.memory.discard(gpa, len),
        };
        match r {
            Ok(ram) => {
                let outside = len.div_ceil(PAGE_SIZE) - ram / PAGE_SIZE;
                if op != Op::Deflate {
                    self.stats
                        .counters
                        .add_shared(BalloonStat::DiscardedBytes, ram);
                    self.stats
                        .counters
                        .add_shared(BalloonStat::PfnsOutsideRam, outside);
                }
                ram / PAGE_SIZE
            }
            Err(e) => {
                log::warn!("virtio-balloon: {op:?} failed: {e}");
                0
            }
        }
    }

    /// A chain the balloon cannot use: counted here (and by the transport
    /// as a guest error).
    fn reject(&self, e: ChainError) -> ChainError {
        self.stats
            .counters
            .add_shared(BalloonStat::RejectedDescriptors, 1);
        e
    }

    /// An inflate or deflate chain: read every PFN first, then act.
    fn pfns(&mut self, chain: &Chain, inflate: bool) -> Result<(), ChainError> {
        let entries = chain
            .read_entries::<4>(MAX_PFNS)
            .map_err(|e| self.reject(e))?;
        let mut pfns: Vec<u64> = entries
            .iter()
            .map(|e| u64::from(u32::from_le_bytes(*e)))
            .collect();
        if inflate {
            let n = self.balloon_pfns(&mut pfns, Op::Inflate);
            self.stats
                .counters
                .add_shared(BalloonStat::InflatedPages, n);
            self.ballooned.extend(pfns.iter().copied());
        } else {
            self.stats
                .counters
                .add_shared(BalloonStat::DeflatedPages, pfns.len() as u64);
            for p in &pfns {
                self.ballooned.remove(p);
            }
            self.balloon_pfns(&mut pfns, Op::Deflate);
        }
        Ok(())
    }

    /// Free page reporting: discard each reported range (whole pages only;
    /// another is rejected and the rest of the chain still served).
    fn reporting(&mut self, chain: &Chain, done: &mut Completions) {
        for (gpa, len) in chain.ranges() {
            if gpa % PAGE_SIZE != 0 || len % PAGE_SIZE != 0 || len == 0 {
                done.guest_error(
                    self.reject(ChainError::Request("a reported range is not whole pages")),
                );
                continue;
            }
            let n = self.apply_range(gpa, len, Op::Report);
            self.stats
                .counters
                .add_shared(BalloonStat::ReportedPages, n);
        }
    }

    /// A stats buffer arrived: parse it and hold it until the next poll.
    fn stats_buffer(&mut self, chain: &Chain, done: &mut Completions) -> Result<(), ChainError> {
        let bytes = chain
            .read_all(MAX_STATS * STAT_ENTRY)
            .map_err(|e| self.reject(e))?;
        if let Some(old) = self.stats_head.replace(chain.head()) {
            // The driver has one buffer out at a time; give back the old.
            done.used(old, 0);
        }
        let mut g = self.stats.guest.lock().unwrap_or_else(|e| e.into_inner());
        for e in bytes.chunks_exact(STAT_ENTRY) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..]);
            g.0.insert(tag, u64::from_le_bytes(v));
        }
        g.1 = Some(Instant::now());
        Ok(())
    }
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

    fn config(&self) -> Vec<u8> {
        let mut cfg = vec![0u8; CONFIG_SIZE];
        cfg[..4].copy_from_slice(&self.num_pages.to_le_bytes());
        cfg[4..8].copy_from_slice(&self.actual.to_le_bytes());
        cfg
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) -> Result<(), GuestError> {
        let Ok(v) = <[u8; 4]>::try_from(data) else {
            return Err(GuestError::ConfigWrite {
                offset,
                len: data.len(),
                why: "only `actual` (4 bytes at 4) is writable",
            });
        };
        if offset != CONFIG_ACTUAL {
            return Err(GuestError::ConfigWrite {
                offset,
                len: 4,
                why: "only `actual` (4 bytes at 4) is writable",
            });
        }
        self.actual = u32::from_le_bytes(v);
        self.stats
            .counters
            .set(BalloonStat::ActualPages, self.actual.into());
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
        self.stats.counters.set(BalloonStat::ActualPages, 0);
    }

    fn process(
        &mut self,
        queue: usize,
        chain: &Chain,
        done: &mut Completions,
    ) -> Result<(), ChainError> {
        match role(queue, self.acked) {
            Some(Role::Inflate) => self.pfns(chain, true)?,
            Some(Role::Deflate) => self.pfns(chain, false)?,
            // Held until the next poll: not completed now.
            Some(Role::Stats) => return self.stats_buffer(chain, done),
            Some(Role::Reporting) => self.reporting(chain, done),
            None => {
                return Err(ChainError::QueueNotInUse {
                    queue,
                    features: self.acked,
                })
            }
        }
        done.used(chain.head(), 0);
        Ok(())
    }

    /// Every stats interval, give the held stats buffer back so the driver
    /// refills it.
    fn tick(&mut self, done: &mut Completions) {
        let interval = self.stats.stats_interval_s.load(Ordering::Relaxed);
        if interval == 0 || self.last_poll.elapsed() < Duration::from_secs(interval) {
            return;
        }
        self.last_poll = Instant::now();
        let Some(index) = (0..QUEUES).find(|&i| role(i, self.acked) == Some(Role::Stats)) else {
            return;
        };
        if let Some(head) = self.stats_head.take() {
            done.used_on(index, head, 0);
        }
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
