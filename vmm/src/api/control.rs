//! The control plane: every run-time change (balloon target, stats polling,
//! stopping the VM; memory hotplug later) goes through [`VmControl`],
//! whether the API server, a test or `vmm stress` asks.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::counters::{Readings, Scope};
use crate::devices::lock;
use crate::devices::virtio::balloon::{BalloonHandle, BalloonInfo};
use crate::devices::virtio::mem::{HotplugHandle, HotplugInfo, RegionError, Timings};
use crate::exit::{ExitReason, VmExit};
use crate::fault::FaultMode;
use crate::memory::{MemStat, MemoryManager, MEMORY_METRICS, PAGE_SIZE};

const MIB: u64 = 1 << 20;

/// A request the control plane refused; [`ControlError::status`] is the
/// HTTP status the API answers with.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error("no {what} is configured (start the VM with {flag})")]
    NotConfigured {
        what: &'static str,
        flag: &'static str,
    },
    #[error("{0} is too large")]
    TooLarge(&'static str),
    #[error("balloon target {target_mib} MiB is larger than guest RAM ({ram_mib} MiB)")]
    BalloonBeyondRam { target_mib: u64, ram_mib: u64 },
    #[error("interval_s {secs} is longer than {max}")]
    IntervalTooLong { secs: u64, max: u64 },
    #[error(transparent)]
    Region(#[from] RegionError),
    #[error(transparent)]
    Action(#[from] ActionError),
}

/// What the VM refused or failed to do for the control plane (a snapshot,
/// a pause): `refused` when the request does not fit the VM's state (409),
/// else the work failed (500).
#[derive(Debug, Error)]
#[error("{message}")]
pub struct ActionError {
    pub refused: bool,
    pub message: String,
}

impl ActionError {
    pub fn refused(message: impl Into<String>) -> Self {
        Self {
            refused: true,
            message: message.into(),
        }
    }

    pub fn failed(message: impl Into<String>) -> Self {
        Self {
            refused: false,
            message: message.into(),
        }
    }
}

/// What only the VM itself can do (it holds the vCPUs and every device):
/// the control plane asks through this, the vm layer implements it.
pub trait VmActions: Send + Sync {
    /// Save the VM into `dir`; it runs on after unless `resume` is false.
    /// A JSON summary of what was written.
    /// `diff`: only what changed since the VM's last snapshot (taken or
    /// restored), on top of it.
    fn snapshot(
        &self,
        dir: &Path,
        resume: bool,
        diff: bool,
    ) -> Result<serde_json::Value, ActionError>;
    fn pause(&self) -> Result<(), ActionError>;
    fn resume(&self) -> Result<(), ActionError>;
    fn is_paused(&self) -> bool;
    /// End the working-set recording now and write it; what was written.
    fn save_working_set(&self) -> Result<serde_json::Value, ActionError>;
    /// Migrate the VM live (blocks until it is done or failed); the
    /// migration's status.
    fn migrate(&self, r: &MigrateRequest) -> Result<serde_json::Value, ActionError>;
    /// The running (or last) migration's status.
    fn migration(&self) -> serde_json::Value;
    /// Resume a paused post-copy (`PUT /vm/migrate/recover`).
    fn recover(&self, r: &RecoverRequest) -> Result<serde_json::Value, ActionError>;
}

/// `PUT /vm/snapshot`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Where the snapshot goes (a directory that must not exist).
    pub dir: PathBuf,
    /// Let the VM run on afterwards (default); false leaves it paused
    /// until `PUT /vm/resume`.
    #[serde(default = "yes")]
    pub resume: bool,
    /// A diff snapshot: only the pages changed since the VM's last
    /// snapshot (the one it took, or was restored from), which it names
    /// as its base.
    #[serde(default)]
    pub diff: bool,
}

fn yes() -> bool {
    true
}

/// `PUT /vm/migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// `tcp:HOST:PORT` or `unix:PATH`: a `vmm run --incoming` there.
    pub to: String,
    /// The pre-shared key file (the destination's `--migration-key`).
    pub key_file: PathBuf,
    /// Stop the guest once the rest fits this (milliseconds).
    #[serde(default = "default_downtime")]
    pub max_downtime_ms: u64,
    /// Rounds after the first before the guest is stopped anyway.
    #[serde(default = "default_rounds")]
    pub max_rounds: u32,
    /// precopy (default), postcopy, or auto (post-copy when the rounds
    /// do not converge).
    #[serde(default)]
    pub mode: MigrationModeName,
    /// Post-copy's push at most this many MiB/s (0: as fast as it goes);
    /// answers to the destination's requests are never held back.
    #[serde(default)]
    pub max_postcopy_bandwidth_mib: u64,
}

/// How memory moves (`PUT /vm/migrate`'s `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationModeName {
    #[default]
    Precopy,
    Postcopy,
    Auto,
}

/// `PUT /vm/migrate/recover`: resume a post-copy whose connection broke.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecoverRequest {
    /// Where the destination listens again (its --incoming).
    pub to: String,
    pub key_file: PathBuf,
}

fn default_downtime() -> u64 {
    300
}

fn default_rounds() -> u32 {
    30
}

impl ControlError {
    /// 409 for a device the VM does not have, 400 for a bad value.
    pub fn status(&self) -> u16 {
        match self {
            ControlError::NotConfigured { .. } => 409,
            ControlError::Action(a) if a.refused => 409,
            ControlError::Action(_) => 500,
            _ => 400,
        }
    }
}

/// `GET /vm`.
#[derive(Debug, Clone, Serialize)]
pub struct VmInfo {
    /// "running", "paused" or "stopping".
    pub state: String,
    pub vcpus: usize,
    pub fault_mode: String,
    pub uptime_s: f64,
    pub memory: MemoryInfo,
    pub balloon: Option<BalloonInfo>,
    pub hotplug: Option<HotplugInfo>,
    /// First entry, stalls, a restore's pages and prefetch progress.
    pub restore: Option<RestoreInfo>,
}

/// Guest memory: boot RAM, resident RAM, and one key per row of
/// [`MEMORY_METRICS`].
#[derive(Debug, Clone, Serialize)]
pub struct MemoryInfo {
    pub boot_mib: u64,
    pub resident_mib: f64,
    #[serde(flatten)]
    pub counters: Readings,
}

/// `PUT /balloon`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonTarget {
    pub target_mib: u64,
}

/// `PUT /balloon/statistics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatsInterval {
    pub interval_s: u64,
}

/// `PUT /memory`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRequest {
    pub requested_mib: u64,
}

/// What the control plane acts on.
pub struct VmControl {
    exit: Arc<VmExit>,
    memory: Arc<MemoryManager>,
    balloon: Option<BalloonHandle>,
    hotplug: Option<HotplugHandle>,
    /// What the guest reads on the host-signal port (test guests).
    signal: Arc<AtomicU32>,
    vcpus: usize,
    mode: FaultMode,
    started: Instant,
    actions: OnceLock<Arc<dyn VmActions>>,
    /// The VM's first entry, stalls, restore and prefetch progress, and
    /// each vCPU's blocktime, as `GET /vm` shows them.
    restore_view: OnceLock<RestoreView>,
    /// Every metric as `/metrics.json` has it (`GET /vm/metrics`, what
    /// `vmm top` reads).
    metrics_view: OnceLock<MetricsView>,
}

/// Reads every metric as JSON (the vm layer holds the counters).
pub type MetricsView = Box<dyn Fn() -> serde_json::Value + Send + Sync>;

/// Reads the rows of `RESTORE_METRICS` and the vCPUs' blocktime (the vm
/// layer holds the counters).
pub type RestoreView = Box<dyn Fn() -> RestoreInfo + Send + Sync>;

/// `GET /vm`'s `restore`: the rows of `RESTORE_METRICS` (`docs/METRICS.md`)
/// and each vCPU's time waiting for memory.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreInfo {
    #[serde(flatten)]
    pub counters: Readings,
    pub vcpu_blocktime_seconds: Vec<f64>,
}

/// Longest polling interval accepted (a day).
const MAX_STATS_INTERVAL_S: u64 = 86_400;

impl VmControl {
    pub fn new(
        exit: Arc<VmExit>,
        memory: Arc<MemoryManager>,
        balloon: Option<BalloonHandle>,
        hotplug: Option<HotplugHandle>,
        signal: Arc<AtomicU32>,
        vcpus: usize,
        mode: FaultMode,
    ) -> Self {
        Self {
            exit,
            memory,
            balloon,
            hotplug,
            signal,
            vcpus,
            mode,
            started: Instant::now(),
            actions: OnceLock::new(),
            restore_view: OnceLock::new(),
            metrics_view: OnceLock::new(),
        }
    }

    /// What the VM does for the control plane (set once, when the VM is
    /// built).
    pub fn set_actions(&self, actions: Arc<dyn VmActions>) {
        let _ = self.actions.set(actions);
    }

    pub fn set_restore_view(&self, view: RestoreView) {
        let _ = self.restore_view.set(view);
    }

    pub fn set_metrics_view(&self, view: MetricsView) {
        let _ = self.metrics_view.set(view);
    }

    /// Every metric, as `/metrics.json` (`GET /vm/metrics`).
    pub fn metrics(&self) -> Result<serde_json::Value, ControlError> {
        self.metrics_view
            .get()
            .map(|v| v())
            .ok_or_else(|| ActionError::refused("this VM keeps no metrics").into())
    }

    fn actions(&self) -> Result<&Arc<dyn VmActions>, ControlError> {
        self.actions
            .get()
            .ok_or_else(|| ActionError::refused("this VM cannot be paused or saved").into())
    }

    /// Save the VM (`PUT /vm/snapshot`).
    pub fn snapshot(&self, r: &SnapshotRequest) -> Result<serde_json::Value, ControlError> {
        if r.dir.as_os_str().is_empty() {
            return Err(ActionError::refused("dir is empty").into());
        }
        Ok(self.actions()?.snapshot(&r.dir, r.resume, r.diff)?)
    }

    pub fn pause(&self) -> Result<(), ControlError> {
        Ok(self.actions()?.pause()?)
    }

    pub fn resume(&self) -> Result<(), ControlError> {
        Ok(self.actions()?.resume()?)
    }

    /// Migrate the VM live (`PUT /vm/migrate`).
    pub fn migrate(&self, r: &MigrateRequest) -> Result<serde_json::Value, ControlError> {
        if r.max_rounds == 0 || r.max_rounds > 1000 {
            return Err(ActionError::refused("max_rounds is 1..1000").into());
        }
        Ok(self.actions()?.migrate(r)?)
    }

    /// Resume a paused post-copy (`PUT /vm/migrate/recover`).
    pub fn recover(&self, r: &RecoverRequest) -> Result<serde_json::Value, ControlError> {
        Ok(self.actions()?.recover(r)?)
    }

    /// The running or last migration (`GET /vm/migrate`).
    pub fn migration(&self) -> Result<serde_json::Value, ControlError> {
        Ok(self.actions()?.migration())
    }

    pub fn save_working_set(&self) -> Result<serde_json::Value, ControlError> {
        Ok(self.actions()?.save_working_set()?)
    }

    pub fn vm_info(&self) -> VmInfo {
        let m = self.memory.stats();
        let resident = m[MemStat::ResidentPages];
        VmInfo {
            state: if self.exit.is_stopping() {
                "stopping"
            } else if self.actions.get().is_some_and(|a| a.is_paused()) {
                "paused"
            } else {
                "running"
            }
            .into(),
            vcpus: self.vcpus,
            fault_mode: self.mode.name().into(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            memory: MemoryInfo {
                boot_mib: self.memory.boot_size() / MIB,
                resident_mib: (resident * PAGE_SIZE) as f64 / MIB as f64,
                counters: Readings::new(&MEMORY_METRICS, &m.values, Scope::ANY),
            },
            balloon: self.balloon.as_ref().map(BalloonHandle::info),
            hotplug: self.hotplug.as_ref().map(HotplugHandle::info),
            restore: self.restore_view.get().map(|v| v()),
        }
    }

    fn balloon(&self) -> Result<&BalloonHandle, ControlError> {
        self.balloon.as_ref().ok_or(ControlError::NotConfigured {
            what: "balloon",
            flag: "--balloon SIZE",
        })
    }

    pub fn balloon_info(&self) -> Result<BalloonInfo, ControlError> {
        self.balloon().map(BalloonHandle::info)
    }

    /// Move the balloon's target; at most the boot RAM.
    pub fn set_balloon_target(&self, bytes: u64) -> Result<(), ControlError> {
        let b = self.balloon()?;
        let ram = self.memory.boot_size();
        if bytes > ram {
            return Err(ControlError::BalloonBeyondRam {
                target_mib: bytes / MIB,
                ram_mib: ram / MIB,
            });
        }
        let pages = u32::try_from(bytes / PAGE_SIZE)
            .map_err(|_| ControlError::TooLarge("the balloon target"))?;
        lock(&b.device).set_target(pages);
        Ok(())
    }

    pub fn set_balloon_stats_interval(&self, secs: u64) -> Result<(), ControlError> {
        let b = self.balloon()?;
        if secs > MAX_STATS_INTERVAL_S {
            return Err(ControlError::IntervalTooLong {
                secs,
                max: MAX_STATS_INTERVAL_S,
            });
        }
        b.stats.stats_interval_s.store(secs, Ordering::Relaxed);
        Ok(())
    }

    fn hotplug(&self) -> Result<&HotplugHandle, ControlError> {
        self.hotplug.as_ref().ok_or(ControlError::NotConfigured {
            what: "hotplug memory",
            flag: "--hotplug SIZE",
        })
    }

    pub fn memory_info(&self) -> Result<HotplugInfo, ControlError> {
        self.hotplug().map(HotplugHandle::info)
    }

    /// Move virtio-mem's `requested_size` (bytes; a multiple of the block
    /// size, at most the region).
    pub fn set_requested_memory(&self, bytes: u64) -> Result<(), ControlError> {
        let h = self.hotplug()?;
        Ok(lock(&h.device).set_requested(bytes)?)
    }

    /// virtio-mem's host-side timings so far (benchmarks).
    pub fn hotplug_timings(&self) -> Option<Timings> {
        self.hotplug.as_ref().map(|h| {
            h.stats
                .timings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        })
    }

    /// Ballooned pages the guest has touched since giving them (0 without a
    /// balloon).
    pub fn balloon_touched_pages(&self) -> u64 {
        self.balloon
            .as_ref()
            .map_or(0, |b| lock(&b.device).touched_pages())
    }

    /// Set what a test guest reads on the host-signal port (1: finish).
    pub fn signal_guest(&self, value: u32) {
        self.signal.store(value, Ordering::Release);
    }

    /// Stop the VM (as SIGTERM would, but with status 0).
    pub fn stop(&self) {
        self.exit.request(ExitReason::Stopped);
    }

    pub fn memory(&self) -> &Arc<MemoryManager> {
        &self.memory
    }
}
