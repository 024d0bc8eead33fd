//! `vmm bench hotplug`: virtio-mem plug and unplug latency per block and
//! per 128 MiB slice (host time, p50/p99), and the fault latency of a vCPU
//! faulting continuously while blocks are plugged and unplugged vs while
//! nothing happens, in one run.
//!
//! The guest is `memchurn`: vCPU 0 follows requested_size; vCPU 1 faults in
//! plugged blocks and in a worker area the host discards at each pass's end.

use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use vmm::config::HotplugOptions;

use crate::churn::{wait, ChurnGuest, Window, MIB};

#[derive(Parser, Debug, Clone)]
pub struct HotplugBenchArgs {
    /// Memory to plug, then unplug (MiB, a multiple of 128).
    #[arg(long, default_value_t = 1024)]
    pub mib: u64,
    /// Block size (MiB).
    #[arg(long, default_value_t = 2)]
    pub block_mib: u64,
    /// Worker area the faulting vCPU cycles through (MiB).
    #[arg(long, default_value_t = 64)]
    pub worker_mib: u64,
    /// Length of the quiet window, seconds.
    #[arg(long, default_value_t = 3)]
    pub quiet_s: u64,
}

const WBASE: u64 = 16 * MIB;

fn quantiles(v: &[u64]) -> (String, String, usize) {
    let mut v = v.to_vec();
    v.sort_unstable();
    let q = |p: f64| {
        v.get(((v.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map(|n| format!("{:.1}", *n as f64 / 1000.0))
            .unwrap_or_else(|| "-".into())
    };
    (q(0.5), q(0.99), v.len())
}

/// Run the hotplug benchmark and print its table.
pub fn run(a: &HotplugBenchArgs) -> Result<(), String> {
    let region = a.mib * MIB;
    let block = a.block_mib * MIB;
    let g = ChurnGuest::boot("hotplug", String::new(), WBASE, a.worker_mib * MIB, |c| {
        c.hotplug = Some(HotplugOptions {
            size: region,
            block_size: block,
            requested: 0,
        })
    })?;
    let (control, metrics, passes) = (
        g.vm.control().clone(),
        g.vm.metrics().clone(),
        g.passes.clone(),
    );
    let quiet_s = a.quiet_s;
    let (done, (windows, t)) = g.run(move || {
        let plugged = || {
            control
                .memory_info()
                .map(|m| m.plugged_mib * MIB)
                .unwrap_or(0)
        };
        let r = (|| {
            wait(
                "the worker's first passes",
                Duration::from_secs(120),
                || passes.load(Ordering::Relaxed) >= 2,
            )?;
            let quiet = Window::quiet(&metrics, quiet_s)?;
            let plug = Window::measure(&metrics, &mut || {
                control
                    .set_requested_memory(region)
                    .map_err(|e| e.to_string())?;
                wait("the plugs", Duration::from_secs(600), || {
                    plugged() == region
                })
                .map(|_| ())
            })?;
            let unplug = Window::measure(&metrics, &mut || {
                control.set_requested_memory(0).map_err(|e| e.to_string())?;
                wait("the unplugs", Duration::from_secs(600), || plugged() == 0).map(|_| ())
            })?;
            let timings = control.hotplug_timings().ok_or("no virtio-mem device")?;
            Ok(([quiet, plug, unplug], timings))
        })();
        control.signal_guest(1);
        r
    })?;
    println!(
        "hotplug benchmark: {} MiB in {} MiB blocks, faulting vCPU cycling {} MiB",
        a.mib, a.block_mib, a.worker_mib
    );
    println!(
        "{:<14} {:>8} {:>10} {:>10}",
        "host op", "count", "p50_us", "p99_us"
    );
    for (name, v) in [
        ("plug block", &t.plug_block),
        ("unplug block", &t.unplug_block),
        ("add slice", &t.slice_add),
        ("remove slice", &t.slice_remove),
    ] {
        let (p50, p99, n) = quantiles(v);
        println!("{name:<14} {n:>8} {p50:>10} {p99:>10}");
    }
    println!(
        "{:<10} {:>8} {:>10} {:>10} {:>10}",
        "phase", "secs", "faults", "p50_us", "p99_us"
    );
    for (name, w) in ["quiet", "plug", "unplug"].iter().zip(&windows) {
        println!("{}", w.row(name, ""));
    }
    println!("guest: {done}");
    Ok(())
}
