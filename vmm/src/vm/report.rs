//! What a finished run reports.

use std::time::{Duration, Instant};

use super::Vm;
use crate::devices::virtio::balloon::BalloonInfo;
use crate::devices::virtio::manager::DeviceSummary;
use crate::devices::virtio::mem::HotplugInfo;
use crate::exit::ExitReason;
use crate::fault::{FaultMode, FaultSnapshot};
use crate::memory::MemoryStats;

/// What a finished run reports.
pub struct RunReport {
    pub reason: ExitReason,
    pub mode: FaultMode,
    /// Per-vCPU fault counters, indexed by vCPU.
    pub vcpus: Vec<FaultSnapshot>,
    /// Handler threads' counters (`handler` mode).
    pub handlers: Vec<FaultSnapshot>,
    /// Marker-port writes: time since the vCPUs started, value.
    pub markers: Vec<(Duration, u32)>,
    /// The memory manager's counters at the end (resident pages among them).
    pub memory: MemoryStats,
    /// The balloon at the end, if there is one.
    pub balloon: Option<BalloonInfo>,
    /// The virtio-mem device at the end, if there is one.
    pub hotplug: Option<HotplugInfo>,
    /// Each virtio device's counters at the end.
    pub devices: Vec<DeviceSummary>,
    pub elapsed: Duration,
    /// Where each vCPU was when the VM stopped: (RIP, CPL).
    pub stopped_at: Vec<(u64, u8)>,
}

impl RunReport {
    /// All fault counters added up (vCPUs and handlers).
    pub fn total(&self) -> FaultSnapshot {
        let mut t = FaultSnapshot::default();
        for s in self.vcpus.iter().chain(&self.handlers) {
            t.add(s);
        }
        t
    }
}

impl Vm {
    /// The report of a run that ended for `reason`.
    pub(super) fn report(
        &self,
        reason: ExitReason,
        start: Instant,
        elapsed: Duration,
        stopped_at: Vec<(u64, u8)>,
    ) -> RunReport {
        let markers = self
            .markers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .marks
            .iter()
            .map(|(t, v)| (t.saturating_duration_since(start), *v))
            .collect();
        RunReport {
            reason,
            mode: self.mode,
            vcpus: self.metrics.vcpus.iter().map(|s| s.snapshot()).collect(),
            handlers: self.metrics.handlers.iter().map(|s| s.snapshot()).collect(),
            markers,
            memory: self.memory.stats(),
            balloon: self.control.balloon_info().ok(),
            hotplug: self.control.memory_info().ok(),
            devices: self.virtio_summaries.iter().map(|f| f()).collect(),
            elapsed,
            stopped_at,
        }
    }
}
