//! `vmm bench balloon`: inflate and deflate rates of the balloon (MiB/s),
//! and the fault latency of a vCPU faulting continuously while the balloon
//! inflates vs while it does not, in one run.
//!
//! The guest is `memchurn`: vCPU 0 drives the balloon over a pool of boot
//! RAM it has filled; vCPU 1 writes and verifies a worker area, and at each
//! pass's end the host discards that area (marker hook), so every pass
//! faults every page again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use vmm::api::VmControl;
use vmm::config::BalloonOptions;
use vmm::devices::virtio::balloon::BalloonStat;
use vmm::memory::MemoryManager;
use vmm::metrics::VmMetrics;

use crate::churn::{wait, ChurnGuest, Window, MIB};

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

const PAGE: u64 = 4096;
const POOL_BASE: u64 = 16 * MIB;

/// Run the balloon benchmark and print its table.
pub fn run(a: &BalloonBenchArgs) -> Result<(), String> {
    let pool = a.mib * MIB;
    let g = ChurnGuest::boot(
        "balloon",
        format!("pool_base={POOL_BASE} pool_bytes={pool}"),
        POOL_BASE + pool,
        a.worker_mib * MIB,
        |c| {
            c.balloon = Some(BalloonOptions {
                target: 0,
                free_page_reporting: false,
                stats_interval_s: 0,
            })
        },
    )?;
    let (control, memory, metrics) = (
        g.vm.control().clone(),
        g.vm.memory().clone(),
        g.vm.metrics().clone(),
    );
    let (passes, quiet_s) = (g.passes.clone(), a.quiet_s);
    let (done, windows) = g.run(move || {
        let r = phases(&control, &memory, &metrics, &passes, pool, quiet_s);
        control.signal_guest(1);
        r
    })?;
    print_table(a, windows);
    println!("guest: {done}");
    Ok(())
}

/// Once the guest filled its pool and its worker runs: a quiet window, the
/// inflate of the whole pool, the deflate, each with the worker's faults.
fn phases(
    control: &VmControl,
    memory: &MemoryManager,
    metrics: &VmMetrics,
    passes: &AtomicU64,
    pool: u64,
    quiet_s: u64,
) -> Result<[Window; 3], String> {
    let actual = || {
        control
            .balloon_info()
            .map(|b| b.get(BalloonStat::ActualPages))
            .unwrap_or(0)
    };
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
    let quiet = Window::quiet(metrics, quiet_s)?;
    let inflate = Window::measure(metrics, &mut || {
        control
            .set_balloon_target(pool)
            .map_err(|e| e.to_string())?;
        wait("the inflate", Duration::from_secs(600), || {
            actual() == pool / PAGE
        })
        .map(|_| ())
    })?;
    let deflate = Window::measure(metrics, &mut || {
        control.set_balloon_target(0).map_err(|e| e.to_string())?;
        wait("the deflate", Duration::from_secs(600), || actual() == 0).map(|_| ())
    })?;
    Ok([quiet, inflate, deflate])
}

fn print_table(a: &BalloonBenchArgs, [quiet, inflate, deflate]: [Window; 3]) {
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
        let rate = rate.map_or_else(|| "-".into(), |r| format!("{r:.0}"));
        println!("{}", w.row(name, &format!(" {rate:>10}")));
    }
}
