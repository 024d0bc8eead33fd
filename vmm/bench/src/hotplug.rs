//! `vmm bench hotplug`: virtio-mem plug and unplug latency per block and
//! per 128 MiB slice (host time, p50/p99), and the fault latency of a vCPU
//! faulting continuously while blocks are plugged and unplugged vs while
//! nothing happens, in one run.
//!
//! The guest is `memchurn`: vCPU 0 follows requested_size; vCPU 1 faults in
//! plugged blocks and in a worker area the host discards at each pass's end.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;

use super::balloon::{us, wait, Window};
use vmm::config::{HotplugOptions, SerialOut, VmConfig};
use vmm::exit::ExitReason;
use vmm::vm::Vm;

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

const MIB: u64 = 1 << 20;
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
    let guest = std::env::temp_dir().join(format!("vmm-bench-hotplug-{}.elf", std::process::id()));
    std::fs::write(&guest, vmm_guests::MEMCHURN).map_err(|e| e.to_string())?;
    let wbytes = a.worker_mib * MIB;
    let mut config = VmConfig::new(guest.clone());
    config.vcpus = 2;
    config.mem_size = (WBASE + wbytes + 16 * MIB).next_multiple_of(2 * MIB);
    config.cmdline = format!("wbase={WBASE} wbytes={wbytes} wdiscard=1");
    config.serial = SerialOut::Capture(Default::default());
    let SerialOut::Capture(out) = config.serial.clone() else {
        unreachable!()
    };
    let region = a.mib * MIB;
    config.hotplug = Some(HotplugOptions {
        size: region,
        block_size: a.block_mib * MIB,
        requested: 0,
    });
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    let memory = vm.memory().clone();
    let control = vm.control().clone();
    let metrics = vm.metrics().clone();
    let passes = Arc::new(AtomicU64::new(0));
    {
        let (memory, passes) = (memory.clone(), passes.clone());
        vm.on_marker(Box::new(move |v| {
            if v == 0x101 {
                let _ = memory.discard(WBASE, wbytes);
                passes.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    let quiet_s = a.quiet_s;
    let bench = std::thread::spawn(move || -> Result<_, String> {
        let worker = || metrics.vcpus[1].snapshot();
        let plugged = || {
            control
                .memory_info()
                .map(|m| m.plugged_mib * MIB)
                .unwrap_or(0)
        };
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
        let plug = window(&mut || {
            control
                .set_requested_memory(region)
                .map_err(|e| e.to_string())?;
            wait("the plugs", Duration::from_secs(600), || {
                plugged() == region
            })
            .map(|_| ())
        })?;
        let unplug = window(&mut || {
            control.set_requested_memory(0).map_err(|e| e.to_string())?;
            wait("the unplugs", Duration::from_secs(600), || plugged() == 0).map(|_| ())
        })?;
        let timings = control.hotplug_timings().ok_or("no virtio-mem device")?;
        control.signal_guest(1);
        Ok((quiet, plug, unplug, timings))
    });
    let report = vm.run().map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&guest);
    let (quiet, plug, unplug, t) = bench.join().map_err(|_| "bench thread panicked")??;
    let text = String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let done = text
        .lines()
        .find(|l| l.starts_with("memchurn: done"))
        .ok_or_else(|| format!("the guest did not finish ({}): {text}", report.reason))?;
    if report.reason != ExitReason::GuestStatus(0) {
        return Err(format!("the guest failed ({}): {done}", report.reason));
    }
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
    for (name, w) in [("quiet", &quiet), ("plug", &plug), ("unplug", &unplug)] {
        println!(
            "{:<10} {:>8.3} {:>10} {:>10} {:>10}",
            name,
            w.secs,
            w.faults.faults(),
            us(w.faults.latency_quantile_ns(0.5)),
            us(w.faults.latency_quantile_ns(0.99)),
        );
    }
    println!("guest: {done}");
    Ok(())
}
