//! The fault summary printed when a VM ends: one row per fault-serving
//! thread, one column per row of the thread table that counts faults and
//! installs (headers are the table's keys and labels, whole words), then
//! the assists, devices and balloon.

use std::fmt::Write;

use crate::counters::{Metric, Readings, Scope};
use crate::devices::virtio::balloon::BalloonStat;
use crate::devices::virtio::VIRTIO_METRICS;
use crate::fault::stats::{AssistKind, ThreadStat, THREAD_METRICS};
use crate::fault::FaultSnapshot;
use crate::memory::MemStat;
use crate::vm::RunReport;

/// The thread table's families shown as columns (the per-vCPU exit and
/// assist counts follow the table).
const COLUMNS: [&str; 7] = [
    "faults",
    "speculative_installs",
    "retries",
    "slow_path_installs",
    "already_present",
    "pages_installed",
    "source_bytes",
];

fn us(ns: Option<u64>) -> String {
    ns.map(|n| format!("{:.1}", n as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

/// The rows of [`THREAD_METRICS`] that are columns, with their headers: a
/// labelled row by its label value (`mmio`), another by its key.
fn columns() -> Vec<(usize, &'static Metric, &'static str)> {
    THREAD_METRICS
        .iter()
        .enumerate()
        .filter(|(_, m)| COLUMNS.contains(&m.key))
        .map(|(i, m)| (i, m, m.label_value().unwrap_or(m.key)))
        .collect()
}

fn row(out: &mut String, name: &str, s: &FaultSnapshot, widths: &[usize]) {
    let _ = write!(out, "  {name:<8} {:>w$}", s.faults(), w = widths[0]);
    for ((i, _, _), w) in columns().into_iter().zip(&widths[1..]) {
        let _ = write!(out, " {:>w$}", s.values[i]);
    }
    let _ = writeln!(
        out,
        " {:>8} {:>8}",
        us(s.latency_quantile_ns(0.5)),
        us(s.latency_quantile_ns(0.99))
    );
}

/// A table of per-thread fault counters and memslot activity.
pub fn render(r: &RunReport) -> String {
    let mut out = String::new();
    let m = &r.memory;
    let _ = writeln!(
        out,
        "fault summary: mode {}, {:.3} s, memslot generation {}, memslot changes {}, discarded pages {}, resident pages {}",
        r.mode.name(),
        r.elapsed.as_secs_f64(),
        m[MemStat::Generation],
        m[MemStat::Changes],
        m[MemStat::DiscardedPages],
        m[MemStat::ResidentPages],
    );
    let headers: Vec<&str> = std::iter::once("faults")
        .chain(columns().into_iter().map(|(_, _, h)| h))
        .collect();
    let widths: Vec<usize> = headers.iter().map(|h| h.len().max(7)).collect();
    let _ = write!(out, "  {:<8}", "thread");
    for (h, w) in headers.iter().zip(&widths) {
        let _ = write!(out, " {h:>w$}");
    }
    let _ = writeln!(out, " {:>8} {:>8}", "p50_us", "p99_us");
    for (i, s) in r.vcpus.iter().enumerate() {
        row(&mut out, &format!("vcpu{i}"), s, &widths);
    }
    for (i, s) in r.handlers.iter().enumerate() {
        row(&mut out, &format!("uffd{i}"), s, &widths);
    }
    let at: Vec<String> = r
        .stopped_at
        .iter()
        .enumerate()
        .map(|(i, (rip, cpl))| format!("vcpu{i} RIP {rip:#x} CPL {cpl}"))
        .collect();
    let _ = writeln!(out, "  stopped at: {}", at.join(", "));
    for (i, s) in r.vcpus.iter().enumerate() {
        assists(&mut out, i, s);
    }
    for d in &r.devices {
        let r = Readings::new(&VIRTIO_METRICS, &d.values, Scope::ANY);
        let kv: Vec<String> = r.rows().map(|(m, v)| format!("{}={v}", m.key)).collect();
        let _ = writeln!(out, "  virtio-{}: {}", d.name, kv.join(" "));
    }
    if let Some(b) = &r.balloon {
        let _ = writeln!(
            out,
            "  balloon: target={} actual={} inflated={} deflated={} reported={} rejected={} outside_ram={} (pages)",
            b.get(BalloonStat::TargetPages),
            b.get(BalloonStat::ActualPages),
            b.get(BalloonStat::InflatedPages),
            b.get(BalloonStat::DeflatedPages),
            b.get(BalloonStat::ReportedPages),
            b.get(BalloonStat::RejectedDescriptors),
            b.get(BalloonStat::PfnsOutsideRam)
        );
    }
    out
}

/// vCPU `i`'s assists, if it had any, with the VMM time per guest #PF.
fn assists(out: &mut String, i: usize, s: &FaultSnapshot) {
    let kinds: Vec<String> = THREAD_METRICS
        .iter()
        .zip(&s.values)
        .filter(|(m, v)| m.key == "assists" && **v > 0)
        .map(|(m, v)| format!("{}={v}", m.label_value().unwrap_or(m.key)))
        .collect();
    if kinds.is_empty() {
        return;
    }
    let pfs = s[AssistKind::Syscall]
        + s[AssistKind::PfSkip]
        + s[AssistKind::PfResume]
        + s[AssistKind::PfStep];
    let per = if pfs > 0 {
        format!(
            " ({:.1} us in the VMM per guest #PF)",
            s[ThreadStat::AssistTime] as f64 / 1e3 / pfs as f64
        )
    } else {
        String::new()
    };
    let _ = writeln!(out, "  assists vcpu{i}: {}{per}", kinds.join(" "));
}
