//! The stress run's report: what happened, and each invariant with the
//! checks made and the violations found. Printed for people or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use serde::Serialize;
use vmm::api::VmControl;
use vmm::devices::virtio::balloon::BalloonStat;
use vmm::devices::virtio::mem::HotplugStat;
use vmm::fault::stats::{ThreadStat, FAULT_ROWS};
use vmm::fault::FaultSnapshot;
use vmm::memory::MemStat;
use vmm::vm::RunReport;

use super::audit::Tally;

#[derive(Debug, Clone, Serialize)]
pub struct Invariant {
    pub name: &'static str,
    pub what: &'static str,
    pub checks: u64,
    pub violations: u64,
    /// How the checks were made.
    pub how: String,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct Latency {
    pub p50_us: Option<f64>,
    pub p99_us: Option<f64>,
    pub max_us: f64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct BalloonSummary {
    pub target_changes: u64,
    pub inflated_pages: u64,
    pub deflated_pages: u64,
    /// Ballooned pages resident at the end: pages the guest used after
    /// giving them (its own data is lost; the VMM stays consistent).
    pub touched_in_balloon: u64,
}

#[derive(Debug, Clone, Serialize, Default)]
pub struct HotplugSummary {
    pub resizes: u64,
    pub plugs: u64,
    pub unplugs: u64,
    pub nacks: u64,
    pub errors: u64,
    pub slices_added: u64,
    pub slices_removed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub seed: u64,
    pub schedule_digest: String,
    pub fault_mode: &'static str,
    pub vcpus: usize,
    pub duration_s: f64,
    pub faults: BTreeMap<&'static str, u64>,
    pub faults_total: u64,
    pub faults_per_s: f64,
    pub retries: u64,
    pub retries_pct: f64,
    pub slow_path_installs: u64,
    pub already_present: u64,
    pub pages_installed: u64,
    pub memslot_changes: u64,
    pub extra_memslot_changes: u64,
    pub balloon: BalloonSummary,
    pub hotplug: HotplugSummary,
    pub fault_latency: Latency,
    pub invariants: Vec<Invariant>,
    /// The guest's own report line (test guests), parsed.
    pub guest: BTreeMap<String, u64>,
    pub exit: String,
    pub ok: bool,
}

impl Invariant {
    pub fn new(name: &'static str, what: &'static str, t: Tally, how: impl Into<String>) -> Self {
        Self {
            name,
            what,
            checks: t.checks,
            violations: t.violations,
            how: how.into(),
        }
    }
}

/// What identifies a run, whichever guest ran.
pub struct RunId {
    pub seed: u64,
    pub schedule_digest: String,
    pub vcpus: usize,
    pub elapsed: Duration,
}

/// What the host-side churn did.
pub struct Churned {
    pub extra_memslot_changes: u64,
    pub balloon_target_changes: u64,
    pub resizes: u64,
}

/// I4 from the run's counters: every fault ended installed or already
/// present (faults == speculative + slow-path + present) and none took
/// longer than the watchdog; `stuck` holds the watchdog's own checks.
pub fn i4(total: &FaultSnapshot, mut stuck: Tally, watchdog: Duration) -> Tally {
    let faults = total.faults();
    let accounted = total[ThreadStat::SpeculativeInstalls]
        + total[ThreadStat::SlowPathInstalls]
        + total[ThreadStat::AlreadyPresent];
    stuck.checks += faults;
    stuck.violations += faults.abs_diff(accounted);
    if total.latency.max_ns > watchdog.as_nanos() as u64 {
        stuck.violations += 1;
        log::error!(
            "I4: a fault took {:.3} s (watchdog {watchdog:?})",
            total.latency.max_ns as f64 / 1e9
        );
    }
    stuck
}

impl Report {
    /// The report of a finished run: its counters, the devices' and the
    /// churn's, and the invariants as checked.
    pub fn new(
        id: RunId,
        run: &RunReport,
        control: &VmControl,
        churned: Churned,
        invariants: Vec<Invariant>,
        guest: BTreeMap<String, u64>,
    ) -> Report {
        let total = run.total();
        let faults = total.faults();
        let secs = id.elapsed.as_secs_f64();
        let binfo = control.balloon_info().ok();
        let b = |s| binfo.as_ref().map_or(0, |b| b.get(s));
        let hinfo = control.memory_info().ok();
        let h = |s| hinfo.as_ref().map_or(0, |h| h.get(s));
        let lat = |q| total.latency_quantile_ns(q).map(|n| n as f64 / 1000.0);
        let ok = invariants.iter().all(|i| i.violations == 0);
        Report {
            seed: id.seed,
            schedule_digest: id.schedule_digest,
            fault_mode: run.mode.name(),
            vcpus: id.vcpus,
            duration_s: secs,
            faults: FAULT_ROWS
                .iter()
                .map(|r| (r.metric().label_value().unwrap_or_default(), total[*r]))
                .collect(),
            faults_total: faults,
            faults_per_s: faults as f64 / secs.max(1e-9),
            retries: total[ThreadStat::Retries],
            retries_pct: 100.0 * total[ThreadStat::Retries] as f64 / faults.max(1) as f64,
            slow_path_installs: total[ThreadStat::SlowPathInstalls],
            already_present: total[ThreadStat::AlreadyPresent],
            pages_installed: total[ThreadStat::PagesInstalled],
            memslot_changes: run.memory[MemStat::Changes],
            extra_memslot_changes: churned.extra_memslot_changes,
            balloon: BalloonSummary {
                target_changes: churned.balloon_target_changes,
                inflated_pages: b(BalloonStat::InflatedPages),
                deflated_pages: b(BalloonStat::DeflatedPages),
                touched_in_balloon: control.balloon_touched_pages(),
            },
            hotplug: HotplugSummary {
                resizes: churned.resizes,
                plugs: h(HotplugStat::PlugAck),
                unplugs: h(HotplugStat::UnplugAck),
                nacks: h(HotplugStat::PlugNack),
                errors: HotplugStat::ERRORS.iter().map(|s| h(*s)).sum(),
                slices_added: h(HotplugStat::SlicesAdded),
                slices_removed: h(HotplugStat::SlicesRemoved),
            },
            fault_latency: Latency {
                p50_us: lat(0.5),
                p99_us: lat(0.99),
                max_us: total.latency.max_ns as f64 / 1000.0,
            },
            invariants,
            guest,
            exit: run.reason.to_string(),
            ok,
        }
    }

    /// Print it: JSON, or for people.
    pub fn print(&self, json: bool) -> Result<(), String> {
        if json {
            let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
            println!("{text}");
        } else {
            print!("{}", self.human());
        }
        Ok(())
    }

    pub fn human(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "stress: seed {} (schedule {}), {} vCPUs, mode {}, {:.1} s",
            self.seed, self.schedule_digest, self.vcpus, self.fault_mode, self.duration_s
        );
        let kinds: Vec<String> = self
            .faults
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let _ = writeln!(
            o,
            "faults: {} ({:.0}/s; {}), pages installed {}",
            self.faults_total,
            self.faults_per_s,
            kinds.join(", "),
            self.pages_installed
        );
        let _ = writeln!(
            o,
            "retries: {} ({:.3} % of faults), slow-path installs {}, already present {}",
            self.retries, self.retries_pct, self.slow_path_installs, self.already_present
        );
        let us = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.1}"));
        let _ = writeln!(
            o,
            "fault latency: p50 {} us, p99 {} us, max {:.1} us",
            us(self.fault_latency.p50_us),
            us(self.fault_latency.p99_us),
            self.fault_latency.max_us
        );
        let _ = writeln!(
            o,
            "memslot changes: {} ({} of extra slots)",
            self.memslot_changes, self.extra_memslot_changes
        );
        let b = &self.balloon;
        let _ = writeln!(
            o,
            "balloon: {} target changes, {} pages inflated, {} deflated, {} touched while ballooned",
            b.target_changes, b.inflated_pages, b.deflated_pages, b.touched_in_balloon
        );
        let h = &self.hotplug;
        let _ = writeln!(
            o,
            "hotplug: {} resizes, {} plugs, {} unplugs, {} NACKs, {} errors, slices +{} -{}",
            h.resizes, h.plugs, h.unplugs, h.nacks, h.errors, h.slices_added, h.slices_removed
        );
        let _ = writeln!(o, "invariants:");
        for i in &self.invariants {
            let _ = writeln!(
                o,
                "  {} {:<48} checks {:>10}  violations {:>4}  {}  ({})",
                i.name,
                i.what,
                i.checks,
                i.violations,
                if i.violations == 0 { "ok" } else { "VIOLATED" },
                i.how
            );
        }
        let _ = writeln!(o, "end: {}", self.exit);
        let _ = writeln!(o, "result: {}", if self.ok { "PASS" } else { "FAIL" });
        o
    }
}
