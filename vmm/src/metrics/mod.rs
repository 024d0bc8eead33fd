//! Fault metrics published over HTTP while the VM runs (`--metrics-addr`).
//!
//! Every series is a row of one table, declared once where it is counted
//! (`vmm_counters::metrics!`): per fault-serving thread
//! ([`THREAD_METRICS`], the fault engine), per VM ([`MEMORY_METRICS`], the
//! memory manager), per virtio device ([`VIRTIO_METRICS`]), the balloon's
//! and virtio-mem's. A scrape copies the values ([`MetricsSnapshot`]); the
//! OpenMetrics encoder ([`prometheus`]), the JSON and the end-of-run
//! summary walk the same rows. See docs/METRICS.md.

mod http;
pub mod migration;
mod prometheus;

use std::sync::Arc;

use serde_json::{json, Map, Value};

pub use http::{MetricsError, MetricsServer};

use crate::counters::{Metric, Readings, Sample, Scope};
use crate::devices::virtio::balloon::{BalloonHandle, BalloonInfo, BALLOON_GUEST_STAT};
use crate::devices::virtio::manager::DeviceSummary;
use crate::devices::virtio::mem::{HotplugHandle, HotplugInfo};
use crate::devices::virtio::VIRTIO_METRICS;
use crate::fault::stats::{bucket_bound_ns, FAULT_LATENCY, LATENCY_BUCKETS, THREAD_METRICS};
use crate::fault::{
    FaultEngine, FaultMode, FaultSnapshot, FaultStats, RestoreStats, RESTORE_METRICS,
};
use crate::memory::{MemoryManager, MemoryStats, MEMORY_METRICS};

/// VMM threads other than vCPUs and handlers that may touch guest RAM (and
/// then serve the fault themselves, through SIGBUS), by name.
pub const VMM_THREADS: [&str; 3] = ["events", "api", "prefetch"];

/// Which fault mode the VM runs (1 for the active mode, labelled `mode`).
pub static FAULT_MODE: Metric = Metric::gauge(
    "vmm_fault_mode",
    "fault_mode",
    "How guest RAM is populated (1 for the active mode)",
);

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
    pub balloon: Option<BalloonHandle>,
    pub hotplug: Option<HotplugHandle>,
    /// The VM's first-entry, stall and restore counters.
    pub restore: Option<Arc<RestoreStats>>,
    /// The fault engine (its stall and recording counters are copied into
    /// `restore` at each scrape).
    pub engine: Option<Arc<FaultEngine>>,
    /// Live migrations, out of and into this VM.
    pub migration: Option<migration::MigrationProbe>,
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
            restore: None,
            engine: None,
            migration: None,
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

    pub fn snapshot(&self) -> MetricsSnapshot {
        let snap = |v: &[Arc<FaultStats>]| v.iter().map(|s| s.snapshot()).collect();
        if let Some(e) = &self.engine {
            e.sync_stats();
        }
        MetricsSnapshot {
            restore: self
                .restore
                .as_ref()
                .map_or_else(Vec::new, |r| r.counters.read().to_vec()),
            fault_mode: self.mode.name(),
            memory: self.memory.stats(),
            vcpus: snap(&self.vcpus),
            handlers: snap(&self.handlers),
            threads: VMM_THREADS
                .iter()
                .zip(&self.threads)
                .map(|(n, s)| (*n, s.snapshot()))
                .collect(),
            devices: self.devices.iter().map(|f| f()).collect(),
            balloon: self.balloon.as_ref().map(BalloonHandle::info),
            hotplug: self.hotplug.as_ref().map(HotplugHandle::info),
            migration: self.migration.as_ref().map(|f| f()),
        }
    }
}

/// A fault-serving thread as the exporters see it: its label, its kind
/// (which rows apply) and its counters.
pub struct Thread<'a> {
    pub label: (&'static str, String),
    pub scope: Scope,
    pub stats: &'a FaultSnapshot,
}

impl Thread<'_> {
    /// The rows of [`THREAD_METRICS`] that apply to this thread.
    pub fn readings(&self) -> Readings {
        Readings::new(&THREAD_METRICS, &self.stats.values, self.scope)
    }
}

/// One consistent-enough copy of every metric (each counter is read once).
#[derive(Debug, Clone)]
pub struct MetricsSnapshot {
    pub fault_mode: &'static str,
    pub memory: MemoryStats,
    pub vcpus: Vec<FaultSnapshot>,
    pub handlers: Vec<FaultSnapshot>,
    /// Other VMM threads, by name.
    pub threads: Vec<(&'static str, FaultSnapshot)>,
    pub devices: Vec<DeviceSummary>,
    pub balloon: Option<BalloonInfo>,
    pub hotplug: Option<HotplugInfo>,
    /// [`RESTORE_METRICS`] values (empty when not kept).
    pub restore: Vec<u64>,
    pub migration: Option<migration::MigrationReading>,
}

impl MetricsSnapshot {
    /// The VM's first-entry, stall and restore counters.
    pub fn restore_readings(&self) -> Option<Readings> {
        (!self.restore.is_empty())
            .then(|| Readings::new(&RESTORE_METRICS, &self.restore, Scope::ANY))
    }

    /// Every fault-serving thread: `vcpu="N"`, `handler="N"`,
    /// `thread="NAME"`.
    pub fn threads(&self) -> impl Iterator<Item = Thread<'_>> {
        let v = self.vcpus.iter().enumerate().map(|(i, s)| Thread {
            label: ("vcpu", i.to_string()),
            scope: Scope::VCPU,
            stats: s,
        });
        let h = self.handlers.iter().enumerate().map(|(i, s)| Thread {
            label: ("handler", i.to_string()),
            scope: Scope::HANDLER,
            stats: s,
        });
        let o = self.threads.iter().map(|(n, s)| Thread {
            label: ("thread", n.to_string()),
            scope: Scope::VMM,
            stats: s,
        });
        v.chain(h).chain(o)
    }

    /// Every value but the latency histograms, in table order: threads,
    /// memory, devices, balloon, virtio-mem, the fault mode.
    pub fn samples(&self) -> Vec<Sample> {
        let mut out = Vec::new();
        for t in self.threads() {
            out.extend(t.readings().samples(std::slice::from_ref(&t.label)));
        }
        out.extend(Readings::new(&MEMORY_METRICS, &self.memory.values, Scope::ANY).samples(&[]));
        for d in &self.devices {
            let r = Readings::new(&VIRTIO_METRICS, &d.values, Scope::ANY);
            out.extend(r.samples(&[("device", d.name.to_string())]));
        }
        if let Some(b) = &self.balloon {
            out.extend(b.counters.samples(&[]));
            for (stat, v) in &b.guest_stats {
                out.push(Sample {
                    metric: &BALLOON_GUEST_STAT,
                    labels: vec![("stat", stat.clone())],
                    value: *v,
                });
            }
        }
        if let Some(h) = &self.hotplug {
            out.extend(h.counters.samples(&[]));
        }
        if let Some(r) = self.restore_readings() {
            out.extend(r.samples(&[]));
        }
        if let Some(m) = &self.migration {
            out.extend(migration::samples(m));
        }
        out.push(Sample {
            metric: &FAULT_MODE,
            labels: vec![("mode", self.fault_mode.to_string())],
            value: 1,
        });
        out
    }

    /// The JSON of `/metrics.json`: the same rows, by their keys.
    pub fn to_json(&self) -> Value {
        let thread = |t: Thread| -> Value {
            let mut m = t.readings().to_json();
            m.insert(FAULT_LATENCY.key.into(), latency_json(t.stats));
            Value::Object(m)
        };
        let mut threads = self.threads();
        let vcpus: Vec<Value> = threads
            .by_ref()
            .take(self.vcpus.len())
            .map(thread)
            .collect();
        let handlers: Vec<Value> = threads
            .by_ref()
            .take(self.handlers.len())
            .map(thread)
            .collect();
        let others: Map<String, Value> = self
            .threads
            .iter()
            .map(|(n, _)| n.to_string())
            .zip(threads.map(thread))
            .collect();
        let mut out = Readings::new(&MEMORY_METRICS, &self.memory.values, Scope::ANY).to_json();
        out.insert(FAULT_MODE.key.into(), json!(self.fault_mode));
        out.insert("vcpus".into(), Value::Array(vcpus));
        out.insert("handlers".into(), Value::Array(handlers));
        out.insert("threads".into(), Value::Object(others));
        out.insert("devices".into(), json!(self.devices));
        out.insert("balloon".into(), json!(self.balloon));
        out.insert("hotplug".into(), json!(self.hotplug));
        if let Some(r) = self.restore_readings() {
            out.insert("restore".into(), Value::Object(r.to_json()));
        }
        if let Some(m) = &self.migration {
            out.insert("migration".into(), m.json.clone());
        }
        Value::Object(out)
    }
}

/// A latency histogram in JSON: seconds, per-bucket (not cumulative)
/// counts, the open bucket's bound `null`.
fn latency_json(s: &FaultSnapshot) -> Value {
    let l = &s.latency;
    let buckets: Vec<Value> = (0..LATENCY_BUCKETS)
        .map(|i| json!([bucket_bound_ns(i).map(|b| b as f64 / 1e9), l.buckets[i]]))
        .collect();
    json!({
        "sum_seconds": l.sum_ns as f64 / 1e9,
        "count": l.count,
        "buckets": buckets,
    })
}

pub use prometheus::render;
