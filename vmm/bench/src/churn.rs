//! What the device benchmarks share: the `memchurn` guest on two vCPUs
//! (vCPU 0 drives a device, vCPU 1 cycles through a worker area the host
//! discards at the end of each pass, so every pass faults again), measured
//! in windows of the worker's fault counters.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vmm::config::{SerialOut, VmConfig};
use vmm::exit::ExitReason;
use vmm::fault::FaultSnapshot;
use vmm::metrics::VmMetrics;
use vmm::vm::{RunReport, Vm};

pub(crate) const MIB: u64 = 1 << 20;

/// The worker area's end-of-pass marker.
const PASS_MARKER: u32 = 0x101;

/// Poll `f` every 2 ms until it holds; how long that took.
pub(crate) fn wait(
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

/// Microseconds, or `-`.
pub(crate) fn us(ns: Option<u64>) -> String {
    ns.map(|n| format!("{:.1}", n as f64 / 1000.0))
        .unwrap_or_else(|| "-".into())
}

/// The worker's faults during one phase.
pub(crate) struct Window {
    pub secs: f64,
    pub faults: FaultSnapshot,
}

impl Window {
    /// Run `f`, counting what the worker (vCPU 1) faulted meanwhile.
    pub fn measure(
        metrics: &VmMetrics,
        f: &mut dyn FnMut() -> Result<(), String>,
    ) -> Result<Window, String> {
        let worker = || metrics.vcpus[1].snapshot();
        let s0 = worker();
        let t0 = Instant::now();
        f()?;
        Ok(Window {
            secs: t0.elapsed().as_secs_f64(),
            faults: worker().since(&s0),
        })
    }

    /// A phase with nothing but the worker.
    pub fn quiet(metrics: &VmMetrics, secs: u64) -> Result<Window, String> {
        Self::measure(metrics, &mut || {
            std::thread::sleep(Duration::from_secs(secs));
            Ok(())
        })
    }

    /// One table row: name, seconds, `extra` columns, the worker's faults
    /// and their latency.
    pub fn row(&self, name: &str, extra: &str) -> String {
        format!(
            "{:<10} {:>8.3}{extra} {:>10} {:>10} {:>10}",
            name,
            self.secs,
            self.faults.faults(),
            us(self.faults.latency_quantile_ns(0.5)),
            us(self.faults.latency_quantile_ns(0.99)),
        )
    }
}

/// The churn guest, booted (not yet running).
pub(crate) struct ChurnGuest {
    pub vm: Vm,
    console: Arc<Mutex<Vec<u8>>>,
    /// Worker passes so far.
    pub passes: Arc<AtomicU64>,
    guest: std::path::PathBuf,
}

impl ChurnGuest {
    /// Boot `memchurn` on two vCPUs with `cmdline`, the worker area
    /// `[wbase, wbase+wbytes)` discarded at each pass's end; `configure`
    /// adds the device under test.
    pub fn boot(
        name: &str,
        cmdline: String,
        wbase: u64,
        wbytes: u64,
        configure: impl FnOnce(&mut VmConfig),
    ) -> Result<ChurnGuest, String> {
        let guest =
            std::env::temp_dir().join(format!("vmm-bench-{name}-{}.elf", std::process::id()));
        std::fs::write(&guest, vmm_guests::MEMCHURN).map_err(|e| e.to_string())?;
        let mut config = VmConfig::new(guest.clone());
        config.vcpus = 2;
        config.mem_size = (wbase + wbytes + 16 * MIB).next_multiple_of(2 * MIB);
        config.cmdline = format!("{cmdline} wbase={wbase} wbytes={wbytes} wdiscard=1");
        let console = Arc::new(Mutex::new(Vec::new()));
        config.serial = SerialOut::Capture(console.clone());
        configure(&mut config);
        let vm = Vm::new(config).map_err(|e| e.to_string())?;
        let passes = Arc::new(AtomicU64::new(0));
        let (memory, counted) = (vm.memory().clone(), passes.clone());
        vm.on_marker(Box::new(move |v| {
            if v == PASS_MARKER {
                let _ = memory.discard(wbase, wbytes);
                counted.fetch_add(1, Ordering::Relaxed);
            }
        }));
        Ok(ChurnGuest {
            vm,
            console,
            passes,
            guest,
        })
    }

    /// Run the guest while `bench` runs on another thread (it signals the
    /// guest to finish when done); the guest's report line and `bench`'s
    /// result.
    pub fn run<T: Send + 'static>(
        self,
        bench: impl FnOnce() -> Result<T, String> + Send + 'static,
    ) -> Result<(String, T), String> {
        let bench = std::thread::spawn(bench);
        let report = self.vm.run().map_err(|e| e.to_string());
        let _ = std::fs::remove_file(&self.guest);
        let result = bench.join().map_err(|_| "bench thread panicked")?;
        let report = report?;
        let result = result?;
        Ok((finished(&report, &self.console)?, result))
    }
}

/// The guest's `memchurn: done` line, if it finished well.
fn finished(report: &RunReport, console: &Mutex<Vec<u8>>) -> Result<String, String> {
    let text =
        String::from_utf8_lossy(&console.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let done = text
        .lines()
        .find(|l| l.starts_with("memchurn: done"))
        .ok_or_else(|| format!("the guest did not finish ({}): {text}", report.reason))?;
    if report.reason != ExitReason::GuestStatus(0) {
        return Err(format!("the guest failed ({}): {done}", report.reason));
    }
    Ok(done.to_string())
}
