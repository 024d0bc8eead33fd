//! The stress run's report: what happened, and each invariant with the
//! checks made and the violations found. Printed for people or as JSON.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

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

impl Report {
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
