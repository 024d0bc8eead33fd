//! Fault metrics published over HTTP while the VM runs (`--metrics-addr`).
//!
//! The fault path only bumps its own thread's counters (`fault::stats`); the
//! HTTP thread reads them on each scrape and aggregates. See docs/METRICS.md.

mod http;
mod prometheus;

use std::sync::Arc;

use serde::Serialize;

pub use http::{MetricsError, MetricsServer};

use crate::api::control::{BalloonControl, BalloonInfo, HotplugControl, HotplugInfo};
use crate::config::FaultMode;
use crate::devices::virtio::manager::DeviceSummary;
use crate::fault::stats::{
    bucket_bound_ns, ASSIST_KINDS, EXIT_KINDS, FAULT_KINDS, LATENCY_BUCKETS,
};
use crate::fault::{FaultSnapshot, FaultStats};
use crate::memory::MemoryManager;

/// VMM threads other than vCPUs and handlers that may touch guest RAM (and
/// then serve the fault themselves, through SIGBUS), by name.
pub const VMM_THREADS: [&str; 2] = ["events", "api"];

/// Reads one device's counters.
pub type DeviceProbe = Box<dyn Fn() -> DeviceSummary + Send + Sync>;

/// What a scrape reads.
pub struct VmMetrics {
    pub vcpus: Vec<Arc<FaultStats>>,
    pub handlers: Vec<Arc<FaultStats>>,
    /// Counters of the [`VMM_THREADS`], in that order.
    pub threads: Vec<Arc<FaultStats>>,
    pub memory: Arc<MemoryManager>,
    pub mode: FaultMode,
    /// Each virtio device's counters.
    pub devices: Vec<DeviceProbe>,
    pub balloon: Option<BalloonControl>,
    pub hotplug: Option<HotplugControl>,
}

impl VmMetrics {
    /// Fresh counters for `vcpus` vCPUs and `handlers` handler threads.
    pub fn new(vcpus: usize, handlers: usize, memory: Arc<MemoryManager>, mode: FaultMode) -> Self {
        let fresh = |n| (0..n).map(|_| Arc::new(FaultStats::default())).collect();
        Self {
            vcpus: fresh(vcpus),
            handlers: fresh(handlers),
            threads: fresh(VMM_THREADS.len()),
            memory,
            mode,
            devices: Vec::new(),
            balloon: None,
            hotplug: None,
        }
    }

    /// The counters of VMM thread `name` (one of [`VMM_THREADS`]).
    pub fn thread(&self, name: &str) -> Arc<FaultStats> {
        let i = VMM_THREADS
            .iter()
            .position(|n| *n == name)
            .unwrap_or_else(|| panic!("{name} is not one of {VMM_THREADS:?}"));
        self.threads[i].clone()
    }
}

/// One consistent-enough copy of every metric (each counter is read once).
#[derive(Debug, Clone, Serialize)]
pub struct MetricsSnapshot {
    pub fault_mode: &'static str,
    pub memslot_generation: u64,
    pub memslot_changes: u64,
    pub resident_pages: u64,
    pub discarded_pages: u64,
    pub vcpus: Vec<ThreadMetrics>,
    pub handlers: Vec<ThreadMetrics>,
    /// Other VMM threads, by name.
    pub threads: std::collections::BTreeMap<&'static str, ThreadMetrics>,
    pub devices: Vec<DeviceSummary>,
    pub balloon: Option<BalloonInfo>,
    pub hotplug: Option<HotplugInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ThreadMetrics {
    pub faults: std::collections::BTreeMap<&'static str, u64>,
    pub speculative_installs: u64,
    pub retries: u64,
    pub slow_path_installs: u64,
    pub already_present: u64,
    pub pages_installed: u64,
    pub source_bytes: u64,
    pub exits: std::collections::BTreeMap<&'static str, u64>,
    /// What the VMM did for the guest on a PVM host, by kind.
    pub assists: std::collections::BTreeMap<&'static str, u64>,
    /// Time spent in the VMM on assists.
    pub assist_seconds: f64,
    pub fault_latency: Histogram,
}

/// A histogram in seconds, per-bucket (not cumulative) counts.
#[derive(Debug, Clone, Serialize)]
pub struct Histogram {
    pub sum_seconds: f64,
    pub count: u64,
    /// (upper bound in seconds, +Inf as `null` in JSON; count in that bucket)
    pub buckets: Vec<(Option<f64>, u64)>,
}

impl ThreadMetrics {
    fn from(s: &FaultSnapshot) -> Self {
        Self {
            faults: FAULT_KINDS
                .iter()
                .map(|(k, n)| (*n, s.by_kind[*k as usize]))
                .collect(),
            speculative_installs: s.speculative_installs,
            retries: s.retries,
            slow_path_installs: s.slow_path_installs,
            already_present: s.already_present,
            pages_installed: s.pages_installed,
            source_bytes: s.source_bytes,
            exits: EXIT_KINDS
                .iter()
                .map(|(k, n)| (*n, s.exits[*k as usize]))
                .collect(),
            assists: ASSIST_KINDS
                .iter()
                .map(|(k, n)| (*n, s.assists[*k as usize]))
                .collect(),
            assist_seconds: s.assist_ns as f64 / 1e9,
            fault_latency: Histogram {
                sum_seconds: s.latency_sum_ns as f64 / 1e9,
                count: s.latency_count,
                buckets: (0..LATENCY_BUCKETS)
                    .map(|i| {
                        (
                            bucket_bound_ns(i).map(|b| b as f64 / 1e9),
                            s.latency_buckets[i],
                        )
                    })
                    .collect(),
            },
        }
    }
}

impl VmMetrics {
    pub fn snapshot(&self) -> MetricsSnapshot {
        let m = self.memory.stats();
        MetricsSnapshot {
            fault_mode: self.mode.name(),
            memslot_generation: m.generation,
            memslot_changes: m.memslot_changes,
            resident_pages: self.memory.resident_pages(),
            discarded_pages: m.discarded_pages,
            vcpus: self
                .vcpus
                .iter()
                .map(|s| ThreadMetrics::from(&s.snapshot()))
                .collect(),
            handlers: self
                .handlers
                .iter()
                .map(|s| ThreadMetrics::from(&s.snapshot()))
                .collect(),
            threads: VMM_THREADS
                .iter()
                .zip(&self.threads)
                .map(|(n, s)| (*n, ThreadMetrics::from(&s.snapshot())))
                .collect(),
            devices: self.devices.iter().map(|f| f()).collect(),
            balloon: self.balloon.as_ref().map(BalloonControl::info),
            hotplug: self.hotplug.as_ref().map(HotplugControl::info),
        }
    }
}
