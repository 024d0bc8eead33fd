//! What the fault engine counts for a VM as a whole (its first guest
//! entry, the whole-VM stalls, who filled a restored VM's memory, the
//! prefetch's progress), and the working-set recorder.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use vmm_counters::{metrics, Counters, Metric};
use vmm_memory::PAGE_SIZE;

const PAGES: &str = "Pages of a restored VM's memory file installed, by who installed them";
const PROGRESS: &str = "The background prefetch: pages it plans to go through, and has gone through (installed, found present, or skipped as discarded)";
const WS: &str = "Pages of the replayed working set: installed by the prefetch before any vCPU touched them (hit), or touched by a vCPU first (miss)";

metrics! {
    /// One VM's restore and stall counters.
    pub enum RestoreStat in RESTORE_METRICS {
        /// From the call that creates the VM (a boot or a restore) to the
        /// first `KVM_RUN` of any vCPU.
        FirstEntryNs = Metric::gauge(
            "vmm_first_entry_seconds",
            "first_entry_seconds",
            "Time from the call that created the VM (boot or restore) to its first guest entry",
        )
        .nanoseconds(),
        /// Closed intervals during which every vCPU waited for memory.
        AllBlockedNs = Metric::counter(
            "vmm_all_vcpus_blocked_seconds",
            "all_vcpus_blocked_seconds",
            "Time every vCPU at once waited for guest memory (the whole VM stalled)",
        )
        .nanoseconds(),
        DemandPages = Metric::counter("vmm_restore_pages", "restore_pages", PAGES)
            .labels(&[("by", "demand")]),
        PrefetchPages = Metric::counter("vmm_restore_pages", "restore_pages", PAGES)
            .labels(&[("by", "prefetch")]),
        PrefetchPlanned = Metric::gauge("vmm_prefetch_pages", "prefetch_pages", PROGRESS)
            .labels(&[("of", "planned")]),
        PrefetchDone = Metric::gauge("vmm_prefetch_pages", "prefetch_pages", PROGRESS)
            .labels(&[("of", "done")]),
        WorkingSetHits = Metric::counter("vmm_working_set_pages", "working_set_pages", WS)
            .labels(&[("result", "hit")]),
        WorkingSetMisses = Metric::counter("vmm_working_set_pages", "working_set_pages", WS)
            .labels(&[("result", "miss")]),
        RecordedPages = Metric::gauge(
            "vmm_working_set_recorded_pages",
            "working_set_recorded_pages",
            "Pages recorded so far into the working set of this restore (--record-working-set)",
        ),
    }
}

/// A VM's [`RESTORE_METRICS`] values.
pub struct RestoreStats {
    pub counters: Counters<RestoreStat, { RestoreStat::COUNT }>,
    /// When the VM's creation began.
    pub started: Instant,
    first: AtomicBool,
}

impl RestoreStats {
    pub fn new(started: Instant) -> Self {
        Self {
            counters: Counters::default(),
            started,
            first: AtomicBool::new(false),
        }
    }

    /// A vCPU enters the guest for the first time (only the first call of
    /// the VM counts).
    pub fn entered(&self) {
        if !self.first.swap(true, Ordering::AcqRel) {
            let ns = self.started.elapsed().as_nanos() as u64;
            self.counters.set(RestoreStat::FirstEntryNs, ns.max(1));
        }
    }

    /// Whether a vCPU has entered the guest.
    pub fn has_entered(&self) -> bool {
        self.first.load(Ordering::Acquire)
    }

    #[inline]
    pub fn add(&self, s: RestoreStat, n: u64) {
        self.counters.add_shared(s, n);
    }

    pub fn get(&self, s: RestoreStat) -> u64 {
        self.counters.get(s)
    }
}

/// The pages a restored guest touches first, in order: each demand install
/// from the memory file appends its first page and length. Lock-free and
/// allocation-free (the SIGBUS handler records), bounded by the capacity
/// given (the snapshot's pages: nothing is installed twice).
pub struct Recorder {
    /// `gpa | (pages - 1)` (page aligned; runs of at most 4096 pages).
    entries: Box<[AtomicU64]>,
    len: AtomicUsize,
    on: AtomicBool,
    pages: AtomicU64,
}

/// Longest run one entry holds.
const MAX_RUN: u64 = PAGE_SIZE;

impl Recorder {
    /// Off; [`Self::start`] turns it on.
    pub fn new(capacity: usize) -> Self {
        Self {
            entries: (0..capacity).map(|_| AtomicU64::new(0)).collect(),
            len: AtomicUsize::new(0),
            on: AtomicBool::new(false),
            pages: AtomicU64::new(0),
        }
    }

    pub fn start(&self) {
        self.on.store(true, Ordering::Release);
    }

    #[inline]
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// `pages` pages from `gpa` were installed on demand.
    pub fn record(&self, gpa: u64, pages: u64) {
        if !self.is_on() || pages == 0 {
            return;
        }
        let mut at = gpa;
        let mut left = pages;
        while left > 0 {
            let n = left.min(MAX_RUN);
            let i = self.len.fetch_add(1, Ordering::AcqRel);
            let Some(e) = self.entries.get(i) else {
                self.len.store(self.entries.len(), Ordering::Release);
                return;
            };
            e.store(at | (n - 1), Ordering::Release);
            self.pages.fetch_add(n, Ordering::Relaxed);
            at += n * PAGE_SIZE;
            left -= n;
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages.load(Ordering::Relaxed)
    }

    /// Stop and take what was recorded: (gpa, pages) in the order the guest
    /// touched them. An entry still being written reads as 0 and is left
    /// out.
    pub fn stop(&self) -> Vec<(u64, u64)> {
        self.on.store(false, Ordering::Release);
        let n = self.len.load(Ordering::Acquire).min(self.entries.len());
        self.entries[..n]
            .iter()
            .map(|e| e.load(Ordering::Acquire))
            .filter(|&v| v != 0)
            .map(|v| (v & !(PAGE_SIZE - 1), (v & (PAGE_SIZE - 1)) + 1))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_in_order_only_while_on() {
        let r = Recorder::new(4);
        r.record(0x1000, 1);
        r.start();
        r.record(0x5000, 3);
        r.record(0x2000, 1);
        assert_eq!(r.pages(), 4);
        assert_eq!(r.stop(), vec![(0x5000, 3), (0x2000, 1)]);
        r.record(0x9000, 1);
        assert_eq!(r.stop(), vec![(0x5000, 3), (0x2000, 1)]);
    }

    #[test]
    fn long_runs_split_and_capacity_bounds() {
        let r = Recorder::new(2);
        r.start();
        r.record(0x10_0000, MAX_RUN + 2);
        r.record(0x90_0000, 1);
        let got = r.stop();
        assert_eq!(
            got,
            vec![(0x10_0000, MAX_RUN), (0x10_0000 + MAX_RUN * PAGE_SIZE, 2)]
        );
    }

    #[test]
    fn first_entry_counts_once() {
        let s = RestoreStats::new(Instant::now());
        assert_eq!(s.get(RestoreStat::FirstEntryNs), 0);
        s.entered();
        let first = s.get(RestoreStat::FirstEntryNs);
        assert!(first > 0);
        std::thread::sleep(std::time::Duration::from_millis(2));
        s.entered();
        assert_eq!(s.get(RestoreStat::FirstEntryNs), first);
    }
}
