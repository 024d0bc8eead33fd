//! `vmm bench balloon`: inflate and deflate rates of the balloon (MiB/s),
//! and the fault latency of a vCPU faulting continuously while the balloon
//! inflates vs while it does not, in one run.
//!
//! The guest is `memchurn`: vCPU 0 drives the balloon over a pool of boot
//! RAM it has filled; vCPU 1 writes and verifies a worker area, and at each
//! pass's end the host discards that area (marker hook), so every pass
//! faults every page again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use vmm::config::{BalloonOptions, SerialOut, VmConfig};
use vmm::exit::ExitReason;
use vmm::fault::FaultSnapshot;
use vmm::vm::Vm;

#[derive(Parser, Debug, Clone)]
pub struct BalloonBenchArgs {
    /// Balloon size to inflate to and deflate from (MiB).
    #[arg(long, default_value_t = 256)]
    pub mib: u64,
    /// Worker area the faulting vCPU cycles through (MiB).
    #[arg(long, default_value_t = 64)]
    pub worker_mib: u64,
    /// Length of the quiet window (no balloon activity), seconds.
    #[arg(long, default_value_t = 3)]
    pub quiet_s: u64,
}

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
const POOL_BASE: u64 = 16 * MIB;

pub(super) fn wait(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> bool,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > limit {
            return Err(format!("timed out after {limit:?} waiting for {what}"));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(t0.elapsed())
}

pub(super) struct Window {
    pub secs: f64,
    pub faults: FaultSnapshot,
}

pub(super) fn us(ns: Option<u64>) -> String {
    ns.map(|n| format!("{:.1}", n as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

/// Run the balloon benchmark and print its table.
pub fn run(a: &BalloonBenchArgs) -> Result<(), String> {
    let guest = std::env::temp_dir().join(format!("vmm-bench-memchurn-{}.elf", std::process::id()));
    std::fs::write(&guest, vmm_guests::MEMCHURN).map_err(|e| e.to_string())?;
    let pool = a.mib * MIB;
    let wbase = POOL_BASE + pool;
    let wbytes = a.worker_mib * MIB;
    let mut config = VmConfig::new(guest.clone());
    config.vcpus = 2;
    config.mem_size = (wbase + wbytes + 16 * MIB).next_multiple_of(2 * MIB);
    config.cmdline =
        format!("pool_base={POOL_BASE} pool_bytes={pool} wbase={wbase} wbytes={wbytes} wdiscard=1");
    config.serial = SerialOut::Capture(Default::default());
    let SerialOut::Capture(out) = config.serial.clone() else {
        unreachable!()
    };
    config.balloon = Some(BalloonOptions {
        target: 0,
        free_page_reporting: false,
        stats_interval_s: 0,
    });
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    let memory = vm.memory().clone();
    let control = vm.control().clone();
    let metrics = vm.metrics().clone();
    // The faulting vCPU's passes: discard its area at each pass's end.
    let passes = Arc::new(AtomicU64::new(0));
    {
        let (memory, passes) = (memory.clone(), passes.clone());
        vm.on_marker(Box::new(move |v| {
            if v == 0x101 {
                let _ = memory.discard(wbase, wbytes);
                passes.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let quiet_s = a.quiet_s;
    let bench = std::thread::spawn(move || -> Result<_, String> {
        let worker = || metrics.vcpus[1].snapshot();
        let actual = || control.balloon_info().map(|b| b.actual_pages).unwrap_or(0);
        wait(
            "the guest to fill its pool",
            Duration::from_secs(300),
            || memory.resident_pages_in(POOL_BASE, pool) == pool / PAGE,
        )?;
        wait(
            "the worker's first passes",
            Duration::from_secs(120),
            || passes.load(Ordering::Relaxed) >= 2,
        )?;
        let window = |f: &mut dyn FnMut() -> Result<(), String>| -> Result<Window, String> {
            let s0 = worker();
            let t0 = Instant::now();
            f()?;
            Ok(Window {
                secs: t0.elapsed().as_secs_f64(),
                faults: worker().since(&s0),
            })
        };
        let quiet = window(&mut || {
            std::thread::sleep(Duration::from_secs(quiet_s));
            Ok(())
        })?;
        let inflate = window(&mut || {
            control
                .set_balloon_target(pool)
                .map_err(|e| e.to_string())?;
            wait("the inflate", Duration::from_secs(600), || {
                actual() == pool / PAGE
            })
            .map(|_| ())
        })?;
        let deflate = window(&mut || {
            control.set_balloon_target(0).map_err(|e| e.to_string())?;
            wait("the deflate", Duration::from_secs(600), || actual() == 0).map(|_| ())
        })?;
        control.signal_guest(1);
        Ok((quiet, inflate, deflate))
    });
    let report = vm.run().map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&guest);
    let (quiet, inflate, deflate) = bench.join().map_err(|_| "bench thread panicked")??;
    let text = String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let done = text
        .lines()
        .find(|l| l.starts_with("memchurn: done"))
        .ok_or_else(|| format!("the guest did not finish ({}): {text}", report.reason))?;
    if report.reason != ExitReason::GuestStatus(0) {
        return Err(format!("the guest failed ({}): {done}", report.reason));
    }
    println!(
        "balloon benchmark: {} MiB, faulting vCPU cycling {} MiB (host discards it each pass)",
        a.mib, a.worker_mib
    );
    println!(
        "{:<10} {:>8} {:>10} {:>10} {:>10} {:>10}",
        "phase", "secs", "MiB/s", "faults", "p50_us", "p99_us"
    );
    for (name, w, rate) in [
        ("quiet", &quiet, None),
        ("inflate", &inflate, Some(a.mib as f64 / inflate.secs)),
        ("deflate", &deflate, Some(a.mib as f64 / deflate.secs)),
    ] {
        println!(
            "{:<10} {:>8.3} {:>10} {:>10} {:>10} {:>10}",
            name,
            w.secs,
            rate.map(|r| format!("{r:.0}"))
                .unwrap_or_else(|| "-".into()),
            w.faults.faults(),
            us(w.faults.latency_quantile_ns(0.5)),
            us(w.faults.latency_quantile_ns(0.99)),
        );
    }
    println!("guest: {done}");
    Ok(())
}
