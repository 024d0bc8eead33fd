//! Benchmarks, each printing its numbers side by side from one run (times
//! are ratios' raw material, not absolutes: the machines are shared).
//!
//! `vmm bench faults`: the same guest under each fault mode.
//!
//! The guest is `memstress` (mode 0, one round): every vCPU writes one word
//! per page over its share of `pages` pages, then writes the marker port.
//! The time from vCPU start to that marker is the fault phase.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod balloon;
pub mod hotplug;

use clap::Parser;

use crate::config::{FaultMode, SerialOut, VmConfig};
use crate::exit::ExitReason;
use crate::memory::{NewSlot, PageSource};
use crate::vm::{RunReport, Vm};

#[derive(Parser, Debug, Clone)]
pub struct BenchArgs {
    /// vCPU counts to measure, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    pub vcpus: Vec<usize>,
    /// Pages the guest touches (one word per 4 KiB page).
    #[arg(long, default_value_t = 20000)]
    pub pages: u64,
    /// Runs per configuration; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeat: usize,
    /// Largest fault-around window of the default rows (pages); the
    /// `vcpu-nofa` row always runs without fault-around.
    #[arg(long, default_value_t = crate::config::DEFAULT_FAULT_AROUND)]
    pub fault_around: u64,
    /// Memslot changes per second for the churn row.
    #[arg(long, default_value_t = 100)]
    pub churn_hz: u64,
}

const BASE: u64 = 16 << 20;

struct Sample {
    secs: f64,
    report: RunReport,
}

/// One benchmark configuration.
#[derive(Clone, Copy)]
struct Row {
    name: &'static str,
    mode: FaultMode,
    fault_around: u64,
    churn_hz: u64,
    /// Serve metrics and scrape them every 100 ms.
    scrape: bool,
    /// First touches in a seeded random order (memstress `random=1`).
    random: bool,
}

fn one_run(guest: &Path, row: Row, vcpus: usize, pages: u64) -> Result<Sample, String> {
    let Row {
        mode,
        fault_around,
        churn_hz,
        scrape,
        random,
        ..
    } = row;
    let bytes = pages * 4096;
    let mut config = VmConfig::new(Some(guest.to_path_buf()));
    config.mem_size = (BASE + bytes + (16 << 20)).next_multiple_of(2 << 20);
    config.vcpus = vcpus;
    config.cmdline = format!(
        "mode=0 rounds=1 base={BASE} bytes={bytes} stride=4096 random={}",
        u8::from(random)
    );
    config.fault_mode = Some(mode);
    config.fault_around = fault_around;
    config.serial = SerialOut::Capture(Default::default());
    if scrape {
        config.metrics_addr = Some(std::net::SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    let SerialOut::Capture(out) = config.serial.clone() else {
        unreachable!()
    };
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    let churn = (churn_hz > 0).then(|| spawn_churn(&vm, churn_hz));
    let scraper = vm
        .metrics_addr()
        .map(|a| spawn_scraper(a, vm.exit_handle()));
    let report = vm.run().map_err(|e| e.to_string())?;
    if let Some((stop, t, _)) = churn {
        stop.store(true, Ordering::Relaxed);
        let _ = t.join();
    }
    if let Some(t) = scraper {
        let _ = t.join();
    }
    let text = String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    if report.reason != ExitReason::GuestStatus(0) || !text.contains("bad=0") {
        return Err(format!(
            "guest failed under {} ({}): {text}",
            mode.name(),
            report.reason
        ));
    }
    let t = report
        .markers
        .iter()
        .find(|(_, v)| *v == 1)
        .map(|(t, _)| *t)
        .ok_or("guest wrote no marker")?;
    Ok(Sample {
        secs: t.as_secs_f64(),
        report,
    })
}

/// A thread that adds and removes a 2 MiB memslot above guest RAM at `hz`
/// changes per second (each add and each remove is one change).
fn spawn_churn(vm: &Vm, hz: u64) -> (Arc<AtomicBool>, std::thread::JoinHandle<()>, Arc<AtomicU64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let mem = vm.memory().clone();
    let exit = vm.exit_handle();
    let gpa = 0x1_0000_0000 + (64 << 30);
    let (s, c) = (stop.clone(), count.clone());
    let t = std::thread::spawn(move || {
        let period = Duration::from_nanos(1_000_000_000 / hz.max(1));
        let mut next = Instant::now();
        let mut present = false;
        while !s.load(Ordering::Relaxed) && !exit.is_stopping() {
            let r = if present {
                mem.remove_slot(gpa)
            } else {
                mem.add_slot(NewSlot {
                    gpa,
                    size: 2 << 20,
                    source: PageSource::Zero,
                    block_size: None,
                })
                .map(|_| ())
            };
            if r.is_ok() {
                present = !present;
                c.fetch_add(1, Ordering::Relaxed);
            }
            next += period;
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
        }
    });
    (stop, t, count)
}

/// Scrape `/metrics` every 100 ms until the VM stops (a Prometheus server's
/// behaviour, ten times more often than usual).
fn spawn_scraper(
    addr: std::net::SocketAddr,
    exit: Arc<crate::exit::VmExit>,
) -> std::thread::JoinHandle<()> {
    use std::io::{Read, Write};
    std::thread::spawn(move || {
        while !exit.is_stopping() {
            if let Ok(mut s) = std::net::TcpStream::connect(addr) {
                let _ = s.write_all(
                    b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n",
                );
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })
}

fn median(mut v: Vec<Sample>) -> Sample {
    v.sort_by(|a, b| a.secs.total_cmp(&b.secs));
    let mid = v.len() / 2;
    v.swap_remove(mid)
}

fn us(ns: Option<u64>) -> String {
    ns.map(|n| format!("{:.1}", n as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

/// Run the fault benchmark and print its table.
///
/// Rows: the fault modes with default flags (adaptive fault-around on),
/// `vcpu-nofa` (one page per fault), `vcpu+churn` and `vcpu+scrape`, then
/// the same modes with first touches in random order (`/r`). `us/page` is
/// the headline: the cost per faulted page over the guest's own loop, `1 /
/// rate - 1 / prefault rate` (same pattern, same run).
pub fn faults(a: &BenchArgs) -> Result<(), String> {
    let guest =
        std::env::temp_dir().join(format!("vmm-bench-memstress-{}.elf", std::process::id()));
    std::fs::write(&guest, crate::MEMSTRESS_GUEST).map_err(|e| e.to_string())?;
    println!(
        "fault benchmark: {} pages (one store per 4 KiB page), median of {} runs, fault-around up to {} pages",
        a.pages, a.repeat, a.fault_around
    );
    println!(
        "{:<12} {:>5} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
        "mode",
        "vcpus",
        "pages/s",
        "us/page",
        "p50_us",
        "p99_us",
        "faults",
        "installed",
        "resident",
        "retries"
    );
    let fa = a.fault_around;
    for &vcpus in &a.vcpus {
        let mut rate = std::collections::HashMap::new();
        let row = |name, mode, fault_around, churn_hz, scrape, random| Row {
            name,
            mode,
            fault_around,
            churn_hz,
            scrape,
            random,
        };
        let rows = [
            row("prefault", FaultMode::Prefault, fa, 0, false, false),
            row("kernel", FaultMode::Kernel, fa, 0, false, false),
            row("vcpu", FaultMode::Vcpu, fa, 0, false, false),
            row("vcpu-nofa", FaultMode::Vcpu, 1, 0, false, false),
            row("handler", FaultMode::Handler, fa, 0, false, false),
            row("vcpu+churn", FaultMode::Vcpu, fa, a.churn_hz, false, false),
            row("vcpu+scrape", FaultMode::Vcpu, fa, 0, true, false),
            row("prefault/r", FaultMode::Prefault, fa, 0, false, true),
            row("kernel/r", FaultMode::Kernel, fa, 0, false, true),
            row("vcpu/r", FaultMode::Vcpu, fa, 0, false, true),
            row("handler/r", FaultMode::Handler, fa, 0, false, true),
        ];
        // Repetitions interleave the rows (all rows once, then again), so
        // drift in the shared machine's load hits every row alike.
        let mut samples: Vec<Vec<Sample>> = rows.iter().map(|_| Vec::new()).collect();
        for _ in 0..a.repeat.max(1) {
            for (i, r) in rows.iter().enumerate() {
                samples[i].push(one_run(&guest, *r, vcpus, a.pages)?);
            }
        }
        let medians: Vec<Sample> = samples.into_iter().map(median).collect();
        for (r, s) in rows.iter().zip(&medians) {
            rate.insert(r.name, a.pages as f64 / s.secs);
        }
        for (r, s) in rows.iter().zip(&medians) {
            let total = s.report.total();
            let pps = rate[r.name];
            let base = rate[if r.random { "prefault/r" } else { "prefault" }];
            let overhead = (1.0 / pps - 1.0 / base) * 1e6;
            let uffd = |v: u64| {
                if r.mode.uses_uffd() {
                    v.to_string()
                } else {
                    "-".into()
                }
            };
            println!(
                "{:<12} {:>5} {:>10.0} {:>8.2} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8}",
                r.name,
                vcpus,
                pps,
                overhead,
                us(total.latency_quantile_ns(0.5)),
                us(total.latency_quantile_ns(0.99)),
                uffd(total.faults()),
                uffd(total.pages_installed),
                s.report.resident_pages,
                total.retries,
            );
        }
        let per = |n: &str, base: &str| (1.0 / rate[n] - 1.0 / rate[base]) * 1e6;
        println!(
            "more ratios: vcpu-nofa/prefault={:.2} vcpu+scrape/vcpu={:.3} vcpu/r overhead/kernel/r overhead={:.2} (vcpus={vcpus})",
            rate["vcpu-nofa"] / rate["prefault"],
            rate["vcpu+scrape"] / rate["vcpu"],
            per("vcpu/r", "prefault/r") / per("kernel/r", "prefault/r"),
        );
        // The headline line, last for the last vCPU count.
        println!(
            "ratios: vcpu/prefault={:.2} vcpu/handler={:.2} vcpu/kernel={:.2} vcpu/r/handler/r={:.2} (vcpus={vcpus})",
            rate["vcpu"] / rate["prefault"],
            rate["vcpu"] / rate["handler"],
            rate["vcpu"] / rate["kernel"],
            rate["vcpu/r"] / rate["handler/r"],
        );
    }
    let _ = std::fs::remove_file(&guest);
    Ok(())
}
