//! The control plane: every run-time change (balloon target, stats polling,
//! stopping the VM; memory hotplug later) goes through [`VmControl`],
//! whether the API server, a test or `vmm stress` asks.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::FaultMode;
use crate::devices::lock;
use crate::devices::virtio::balloon::{Balloon, BalloonStats, STAT_NAMES};
use crate::devices::virtio::mem::{MemRegion, MemStats, VirtioMem, REQUEST_NAMES, RESULT_NAMES};
use crate::devices::virtio::DeviceCounters;
use crate::exit::{ExitReason, VmExit};
use crate::memory::{MemoryManager, PAGE_SIZE};

const MIB: u64 = 1 << 20;

/// A request the control plane refused; `status` is the HTTP status the API
/// answers with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ControlError {
    pub status: u16,
    pub message: String,
}

impl ControlError {
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
        }
    }
    pub fn not_configured(what: &str, flag: &str) -> Self {
        Self {
            status: 409,
            message: format!("no {what} is configured (start the VM with {flag})"),
        }
    }
}

/// `GET /vm`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VmInfo {
    /// "running" or "stopping".
    pub state: String,
    pub vcpus: usize,
    pub fault_mode: String,
    pub uptime_s: f64,
    pub memory: MemoryInfo,
    pub balloon: Option<BalloonInfo>,
    pub hotplug: Option<HotplugInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MemoryInfo {
    pub boot_mib: u64,
    pub resident_mib: f64,
    pub memslots: u64,
    pub memslot_generation: u64,
    pub memslot_changes: u64,
    pub discarded_pages: u64,
}

/// `GET /balloon`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BalloonInfo {
    /// The guest's driver has set the device up (DRIVER_OK).
    pub driver_ready: bool,
    pub target_mib: u64,
    pub target_pages: u64,
    pub actual_mib: u64,
    pub actual_pages: u64,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    pub reported_pages: u64,
    pub discarded_bytes: u64,
    pub rejected_descriptors: u64,
    pub pfns_outside_ram: u64,
    /// Guest errors the device met (bad registers, bad descriptors, ...).
    pub guest_errors: u64,
    pub stats_interval_s: u64,
    /// The guest's latest statistics by name (bytes, or counts), if it sent
    /// any.
    pub guest_stats: std::collections::BTreeMap<String, u64>,
    /// Seconds since the guest last sent statistics.
    pub guest_stats_age_s: Option<f64>,
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

/// The balloon as the control plane drives it.
#[derive(Clone)]
pub struct BalloonControl {
    pub device: Arc<Mutex<Balloon>>,
    pub stats: Arc<BalloonStats>,
    pub counters: Arc<DeviceCounters>,
}

/// `GET /memory`: the virtio-mem device.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct HotplugInfo {
    pub driver_ready: bool,
    /// Guest-physical start of the region.
    pub region_addr: u64,
    pub region_mib: u64,
    pub block_size_mib: u64,
    pub plugged_mib: u64,
    pub requested_mib: u64,
    /// Requests by kind ("plug", "unplug", "unplug_all", "state") and result
    /// ("ack", "nack", "busy", "error").
    pub requests: std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    pub slices_added: u64,
    pub slices_removed: u64,
    pub guest_errors: u64,
}

/// `PUT /memory`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRequest {
    pub requested_mib: u64,
}

/// virtio-mem as the control plane drives it.
#[derive(Clone)]
pub struct HotplugControl {
    pub device: Arc<Mutex<VirtioMem>>,
    pub stats: Arc<MemStats>,
    pub counters: Arc<DeviceCounters>,
    pub region: MemRegion,
}

impl HotplugControl {
    pub fn info(&self) -> HotplugInfo {
        let s = &self.stats;
        let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
        let requests = REQUEST_NAMES
            .iter()
            .zip(&s.requests)
            .map(|(k, row)| {
                let by = RESULT_NAMES
                    .iter()
                    .zip(row)
                    .map(|(r, c)| (r.to_string(), get(c)))
                    .collect();
                (k.to_string(), by)
            })
            .collect();
        HotplugInfo {
            driver_ready: s.driver_ready.load(Ordering::Relaxed),
            region_addr: self.region.addr,
            region_mib: self.region.size / MIB,
            block_size_mib: self.region.block_size / MIB,
            plugged_mib: get(&s.plugged_bytes) / MIB,
            requested_mib: get(&s.requested_bytes) / MIB,
            requests,
            slices_added: get(&s.slices_added),
            slices_removed: get(&s.slices_removed),
            guest_errors: get(&self.counters.guest_errors),
        }
    }
}

/// What the control plane acts on.
pub struct VmControl {
    exit: Arc<VmExit>,
    memory: Arc<MemoryManager>,
    balloon: Option<BalloonControl>,
    hotplug: Option<HotplugControl>,
    /// What the guest reads on the host-signal port (test guests).
    signal: Arc<AtomicU32>,
    vcpus: usize,
    mode: FaultMode,
    started: Instant,
}

/// Longest polling interval accepted (a day).
const MAX_STATS_INTERVAL_S: u64 = 86_400;

impl VmControl {
    pub fn new(
        exit: Arc<VmExit>,
        memory: Arc<MemoryManager>,
        balloon: Option<BalloonControl>,
        hotplug: Option<HotplugControl>,
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
        }
    }

    pub fn vm_info(&self) -> VmInfo {
        let m = self.memory.stats();
        VmInfo {
            state: if self.exit.is_stopping() {
                "stopping"
            } else {
                "running"
            }
            .into(),
            vcpus: self.vcpus,
            fault_mode: self.mode.name().into(),
            uptime_s: self.started.elapsed().as_secs_f64(),
            memory: MemoryInfo {
                boot_mib: self.memory.boot_size() / MIB,
                resident_mib: (self.memory.resident_pages() * PAGE_SIZE) as f64 / MIB as f64,
                memslots: m.slots,
                memslot_generation: m.generation,
                memslot_changes: m.memslot_changes,
                discarded_pages: m.discarded_pages,
            },
            balloon: self.balloon.as_ref().map(balloon_info),
            hotplug: self.hotplug.as_ref().map(HotplugControl::info),
        }
    }

    fn balloon(&self) -> Result<&BalloonControl, ControlError> {
        self.balloon
            .as_ref()
            .ok_or_else(|| ControlError::not_configured("balloon", "--balloon SIZE"))
    }

    pub fn balloon_info(&self) -> Result<BalloonInfo, ControlError> {
        self.balloon().map(balloon_info)
    }

    /// Move the balloon's target; at most the boot RAM.
    pub fn set_balloon_target(&self, bytes: u64) -> Result<(), ControlError> {
        let b = self.balloon()?;
        let ram = self.memory.boot_size();
        if bytes > ram {
            return Err(ControlError::bad_request(format!(
                "balloon target {} MiB is larger than guest RAM ({} MiB)",
                bytes / MIB,
                ram / MIB
            )));
        }
        let pages = u32::try_from(bytes / PAGE_SIZE).map_err(|_| {
            ControlError::bad_request(format!("balloon target {} MiB is too large", bytes / MIB))
        })?;
        lock(&b.device).set_target(pages);
        Ok(())
    }

    pub fn set_balloon_stats_interval(&self, secs: u64) -> Result<(), ControlError> {
        let b = self.balloon()?;
        if secs > MAX_STATS_INTERVAL_S {
            return Err(ControlError::bad_request(format!(
                "interval_s {secs} is longer than {MAX_STATS_INTERVAL_S}"
            )));
        }
        b.stats.stats_interval_s.store(secs, Ordering::Relaxed);
        Ok(())
    }

    fn hotplug(&self) -> Result<&HotplugControl, ControlError> {
        self.hotplug
            .as_ref()
            .ok_or_else(|| ControlError::not_configured("hotplug memory", "--hotplug SIZE"))
    }

    pub fn memory_info(&self) -> Result<HotplugInfo, ControlError> {
        self.hotplug().map(HotplugControl::info)
    }

    /// Move virtio-mem's `requested_size` (bytes; a multiple of the block
    /// size, at most the region).
    pub fn set_requested_memory(&self, bytes: u64) -> Result<(), ControlError> {
        let h = self.hotplug()?;
        lock(&h.device)
            .set_requested(bytes)
            .map_err(ControlError::bad_request)
    }

    /// virtio-mem's host-side timings so far (benchmarks).
    pub fn hotplug_timings(&self) -> Option<crate::devices::virtio::mem::Timings> {
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

impl BalloonControl {
    /// The balloon's state and counters now.
    pub fn info(&self) -> BalloonInfo {
        balloon_info(self)
    }
}

fn balloon_info(b: &BalloonControl) -> BalloonInfo {
    let s = &b.stats;
    let get = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (guest_stats, age) = {
        let g = s.guest.lock().unwrap_or_else(|e| e.into_inner());
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
        (named, g.1.map(|t| t.elapsed().as_secs_f64()))
    };
    let target = get(&s.target_pages);
    let actual = get(&s.actual_pages);
    BalloonInfo {
        driver_ready: s.driver_ready.load(Ordering::Relaxed),
        target_mib: target * PAGE_SIZE / MIB,
        target_pages: target,
        actual_mib: actual * PAGE_SIZE / MIB,
        actual_pages: actual,
        inflated_pages: get(&s.inflated_pages),
        deflated_pages: get(&s.deflated_pages),
        reported_pages: get(&s.reported_pages),
        discarded_bytes: get(&s.discarded_bytes),
        rejected_descriptors: get(&s.rejected_descriptors),
        pfns_outside_ram: get(&s.pfns_outside_ram),
        guest_errors: get(&b.counters.guest_errors),
        stats_interval_s: get(&s.stats_interval_s),
        guest_stats,
        guest_stats_age_s: age,
    }
}
