//! The fault summary printed when a VM ends.

use std::fmt::Write;

use crate::fault::stats::{AssistKind, ASSIST_KINDS, FAULT_KINDS};
use crate::fault::FaultSnapshot;
use crate::vm::RunReport;

fn us(ns: Option<u64>) -> String {
    ns.map(|n| format!("{:.1}", n as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

fn row(out: &mut String, name: &str, s: &FaultSnapshot) {
    let _ = write!(out, "  {name:<8} {:>8}", s.faults());
    for (k, _) in FAULT_KINDS {
        let _ = write!(out, " {:>8}", s.by_kind[k as usize]);
    }
    let _ = writeln!(
        out,
        " {:>8} {:>7} {:>7} {:>8} {:>8} {:>9} {:>7} {:>7}",
        s.speculative_installs,
        s.retries,
        s.slow_path_installs,
        s.already_present,
        s.pages_installed,
        s.source_bytes,
        us(s.latency_quantile_ns(0.5)),
        us(s.latency_quantile_ns(0.99)),
    );
}

/// A table of per-thread fault counters and memslot activity.
pub fn render(r: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "fault summary: mode {}, {:.3} s, generation {}, memslot changes {}, discarded pages {}, resident pages {}",
        r.mode.name(),
        r.elapsed.as_secs_f64(),
        r.memory.generation,
        r.memory.memslot_changes,
        r.memory.discarded_pages,
        r.resident_pages
    );
    let _ = write!(out, "  {:<8} {:>8}", "thread", "faults");
    for (_, name) in FAULT_KINDS {
        let short: String = name.chars().take(8).collect();
        let _ = write!(out, " {short:>8}");
    }
    let _ = writeln!(
        out,
        " {:>8} {:>7} {:>7} {:>8} {:>8} {:>9} {:>7} {:>7}",
        "specul", "retries", "slow", "present", "pages", "src_bytes", "p50_us", "p99_us"
    );
    for (i, s) in r.vcpus.iter().enumerate() {
        row(&mut out, &format!("vcpu{i}"), s);
    }
    for (i, s) in r.handlers.iter().enumerate() {
        row(&mut out, &format!("uffd{i}"), s);
    }
    let at: Vec<String> = r
        .stopped_at
        .iter()
        .enumerate()
        .map(|(i, (rip, cpl))| format!("vcpu{i} RIP {rip:#x} CPL {cpl}"))
        .collect();
    let _ = writeln!(out, "  stopped at: {}", at.join(", "));
    for (i, s) in r.vcpus.iter().enumerate() {
        if s.assists.iter().any(|&n| n > 0) {
            let kinds: Vec<String> = ASSIST_KINDS
                .iter()
                .filter(|(k, _)| s.assists[*k as usize] > 0)
                .map(|(k, name)| format!("{name}={}", s.assists[*k as usize]))
                .collect();
            let pfs = s.assists[AssistKind::Syscall as usize]
                + s.assists[AssistKind::PfSkip as usize]
                + s.assists[AssistKind::PfResume as usize]
                + s.assists[AssistKind::PfStep as usize];
            let per = if pfs > 0 {
                format!(
                    " ({:.1} us in the VMM per guest #PF)",
                    s.assist_ns as f64 / 1e3 / pfs as f64
                )
            } else {
                String::new()
            };
            let _ = writeln!(out, "  assists vcpu{i}: {}{per}", kinds.join(" "));
        }
    }
    for d in &r.devices {
        let _ = writeln!(
            out,
            "  virtio-{}: notifies={} chains={} guest_errors={} needs_reset={}",
            d.name, d.notifies, d.chains, d.guest_errors, d.needs_reset
        );
    }
    if let Some(b) = &r.balloon {
        let _ = writeln!(
            out,
            "  balloon: target={} actual={} inflated={} deflated={} reported={} rejected={} outside_ram={} (pages)",
            b.target_pages,
            b.actual_pages,
            b.inflated_pages,
            b.deflated_pages,
            b.reported_pages,
            b.rejected_descriptors,
            b.pfns_outside_ram
        );
    }
    out
}
