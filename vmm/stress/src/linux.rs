//! `vmm stress --kernel ...`: the same churn against a Linux guest. Balloon
//! and virtio-mem targets are cycled while the kernel runs, each cycle
//! waiting for the guest's drivers to reach the target, with extra memslots
//! churning underneath; the invariants are checked on the VMM's side (I1,
//! I4, I6). Linux checks its own memory: I2 and I3 are reported as not
//! checked.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::audit::{SlotAudit, Tally};
use super::report::{BalloonSummary, HotplugSummary, Invariant, Latency, Report};
use super::schedule::Rng;
use super::StressArgs;
use vmm::api::VmControl;
use vmm::arch::x86_64::layout;
use vmm::config::{BalloonOptions, HotplugOptions, VmConfig};
use vmm::fault::stats::FAULT_KINDS;
use vmm::memory::{MemoryManager, NewSlot, PageSource};
use vmm::vm::Vm;

const MIB: u64 = 1 << 20;

fn wait(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t0 = Instant::now();
    while !f() {
        if t0.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// What a cycle reached.
struct Cycles {
    done: u64,
    missed: Vec<String>,
}

pub fn run(a: &StressArgs, kernel: PathBuf) -> Result<bool, String> {
    let mut config = VmConfig::new(kernel);
    config.initrd = a.initrd.clone();
    config.vcpus = a.vcpus;
    config.mem_size = a.mem;
    config.cmdline = "console=ttyS0".into();
    config.fault_mode = a.fault_mode;
    config.serial = vmm::config::SerialOut::Capture(Default::default());
    config.balloon = Some(BalloonOptions {
        target: 0,
        free_page_reporting: false,
        stats_interval_s: 1,
    });
    config.hotplug = (a.hotplug > 0).then_some(HotplugOptions {
        size: a.hotplug,
        block_size: a.hotplug_block,
        requested: 0,
    });
    config.metrics_addr = a.metrics_addr;
    config.metrics_linger = a.metrics_linger;
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    let mode = vm.mode();
    let memory = vm.memory().clone();
    let control = vm.control().clone();
    let region = control
        .memory_info()
        .map(|m| (m.region_addr, m.region_mib * MIB))
        .unwrap_or((0, 0));
    let extra_base = (region.0 + region.1)
        .max(a.mem + layout::MMIO_GAP_END)
        .next_multiple_of(1 << 30);
    let audit = Arc::new(Mutex::new((
        SlotAudit::new(region.0, region.1),
        SlotAudit::new(extra_base, 1 << 30),
    )));
    let stop = Arc::new(AtomicBool::new(false));
    let extra = Arc::new(AtomicU64::new(0));
    let churn = {
        let (memory, audit, stop, extra) =
            (memory.clone(), audit.clone(), stop.clone(), extra.clone());
        let period = Duration::from_secs_f64(1.0 / a.memslot_rate.max(0.001));
        let on = a.memslot_rate > 0.0;
        std::thread::spawn(move || {
            while on && !stop.load(Ordering::Acquire) {
                churn_once(&memory, extra_base, &audit, &extra);
                std::thread::sleep(period);
            }
        })
    };
    let started = Instant::now();
    let driver = {
        let (control, memory, audit, stop) =
            (control.clone(), memory.clone(), audit.clone(), stop.clone());
        let (seed, cycles, pool, block) = (a.seed, a.cycles, a.mem / 4, a.hotplug_block);
        let hot = region.1;
        std::thread::spawn(move || {
            let c = cycle(&control, &memory, &audit, seed, cycles, pool, hot, block);
            stop.store(true, Ordering::Release);
            control.stop();
            c
        })
    };
    let run = vm.run().map_err(|e| e.to_string())?;
    stop.store(true, Ordering::Release);
    let cycles = driver.join().map_err(|_| "stress driver panicked")?;
    let _ = churn.join();
    let elapsed = started.elapsed();
    let (hot, extra_removed) = {
        let mut au = audit.lock().unwrap_or_else(|e| e.into_inner());
        au.0.check(&memory);
        au.1.check(&memory);
        ((au.0.removed, au.0.unplugged), au.1.removed)
    };
    let total = run.total();
    let faults = total.faults();
    let accounted = total.speculative_installs + total.slow_path_installs + total.already_present;
    let mut i4 = Tally {
        checks: faults,
        violations: faults.abs_diff(accounted),
    };
    if total.latency_max_ns > a.watchdog.as_nanos() as u64 {
        i4.violations += 1;
    }
    let mut i1 = hot.0;
    i1.add(extra_removed);
    let not_checked = |name, what| {
        Invariant::new(
            name,
            what,
            Tally::default(),
            "not checked: Linux checks its own memory",
        )
    };
    let invariants = vec![
        Invariant::new(
            "I1",
            "no resident page in a removed slot",
            i1,
            "mincore of each removed slot",
        ),
        not_checked("I2", "every write the guest made is found"),
        not_checked("I3", "discarded and re-plugged pages read zero"),
        Invariant::new(
            "I4",
            "every fault ended installed or present",
            i4,
            "faults == speculative + slow-path + present; no fault stuck",
        ),
        Invariant::new(
            "I6",
            "nothing installed into an unplugged block",
            hot.1,
            "mincore of unplugged blocks after each cycle",
        ),
    ];
    let ok = invariants.iter().all(|i| i.violations == 0) && cycles.missed.is_empty();
    let binfo = control.balloon_info().ok();
    let hinfo = control.memory_info().ok();
    let lat = |q| total.latency_quantile_ns(q).map(|n| n as f64 / 1000.0);
    let mut guest = std::collections::BTreeMap::new();
    guest.insert("cycles".into(), cycles.done);
    guest.insert("cycles_missed".into(), cycles.missed.len() as u64);
    let report = Report {
        seed: a.seed,
        schedule_digest: format!("linux-{}-cycles", a.cycles),
        fault_mode: mode.name(),
        vcpus: a.vcpus,
        duration_s: elapsed.as_secs_f64(),
        faults: FAULT_KINDS
            .iter()
            .map(|(k, n)| (*n, total.by_kind[*k as usize]))
            .collect(),
        faults_total: faults,
        faults_per_s: faults as f64 / elapsed.as_secs_f64().max(1e-9),
        retries: total.retries,
        retries_pct: 100.0 * total.retries as f64 / faults.max(1) as f64,
        slow_path_installs: total.slow_path_installs,
        already_present: total.already_present,
        pages_installed: total.pages_installed,
        memslot_changes: run.memory.memslot_changes,
        extra_memslot_changes: extra.load(Ordering::Relaxed),
        balloon: BalloonSummary {
            target_changes: cycles.done,
            inflated_pages: binfo.as_ref().map_or(0, |b| b.inflated_pages),
            deflated_pages: binfo.as_ref().map_or(0, |b| b.deflated_pages),
            touched_in_balloon: control.balloon_touched_pages(),
        },
        hotplug: HotplugSummary {
            resizes: cycles.done,
            plugs: hinfo.as_ref().map_or(0, |h| h.requests["plug"]["ack"]),
            unplugs: hinfo.as_ref().map_or(0, |h| h.requests["unplug"]["ack"]),
            nacks: hinfo.as_ref().map_or(0, |h| h.requests["plug"]["nack"]),
            errors: hinfo
                .as_ref()
                .map_or(0, |h| h.requests.values().map(|r| r["error"]).sum()),
            slices_added: hinfo.as_ref().map_or(0, |h| h.slices_added),
            slices_removed: hinfo.as_ref().map_or(0, |h| h.slices_removed),
        },
        fault_latency: Latency {
            p50_us: lat(0.5),
            p99_us: lat(0.99),
            max_us: total.latency_max_ns as f64 / 1000.0,
        },
        invariants,
        guest,
        exit: run.reason.to_string(),
        ok,
    };
    for m in &cycles.missed {
        eprintln!("stress: {m}");
    }
    if let Some(b) = &binfo {
        eprintln!(
            "stress: the guest's last memory statistics: {:?}",
            b.guest_stats
        );
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
        );
    } else {
        print!("{}", report.human());
    }
    Ok(report.ok)
}

fn churn_once(
    memory: &MemoryManager,
    base: u64,
    audit: &Mutex<(SlotAudit, SlotAudit)>,
    n: &AtomicU64,
) {
    let slot = NewSlot {
        gpa: base,
        size: 2 * MIB,
        source: PageSource::Zero,
        block_size: None,
    };
    if memory.add_slot(slot).is_ok() {
        n.fetch_add(1, Ordering::Relaxed);
        if memory.remove_slot(base).is_ok() {
            n.fetch_add(1, Ordering::Relaxed);
        }
    }
    audit
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .1
        .check(memory);
}

/// Wait for both drivers, then `cycles` times move both targets and wait
/// for the guest to reach them.
#[allow(clippy::too_many_arguments)]
fn cycle(
    control: &VmControl,
    memory: &MemoryManager,
    audit: &Mutex<(SlotAudit, SlotAudit)>,
    seed: u64,
    cycles: u64,
    pool: u64,
    hot: u64,
    block: u64,
) -> Cycles {
    let mut c = Cycles {
        done: 0,
        missed: Vec::new(),
    };
    let ready = wait(Duration::from_secs(900), || {
        control.balloon_info().is_ok_and(|b| b.driver_ready)
            && (hot == 0 || control.memory_info().is_ok_and(|m| m.driver_ready))
    });
    if !ready {
        c.missed
            .push("the guest's balloon/virtio-mem drivers never came up".into());
        return c;
    }
    let mut rng = Rng::new(seed);
    for i in 0..cycles {
        // Balloon in whole MiB, hotplug in 128 MiB steps (Linux onlines and
        // offlines whole memory blocks).
        let target = rng.below(pool / MIB + 1) * MIB;
        let requested = if hot == 0 {
            0
        } else {
            rng.below(hot / (128 * MIB) + 1) * 128 * MIB
        };
        let _ = control.set_balloon_target(target);
        if hot > 0 {
            let _ = control.set_requested_memory(requested - requested % block);
        }
        let reached = wait(Duration::from_secs(900), || {
            control
                .balloon_info()
                .is_ok_and(|b| b.actual_pages * 4096 == target)
                && (hot == 0
                    || control
                        .memory_info()
                        .is_ok_and(|m| m.plugged_mib * MIB == requested))
        });
        audit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .0
            .check(memory);
        if reached {
            c.done += 1;
            eprintln!(
                "stress: cycle {}: balloon {} MiB, hotplug {} MiB reached",
                i + 1,
                target / MIB,
                requested / MIB
            );
        } else {
            c.missed.push(format!(
                "cycle {}: the guest did not reach balloon {} MiB / hotplug {} MiB",
                i + 1,
                target / MIB,
                requested / MIB
            ));
        }
    }
    c
}
