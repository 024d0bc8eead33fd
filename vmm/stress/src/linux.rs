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
use super::report::{self, Churned, Invariant, Report, RunId};
use super::schedule::Rng;
use super::StressArgs;
use vmm::api::VmControl;
use vmm::arch::x86_64::layout;
use vmm::config::{BalloonOptions, HotplugOptions, VmConfig};
use vmm::devices::virtio::balloon::BalloonStat;
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
    let vm = Vm::new(vm_config(a, kernel)).map_err(|e| e.to_string())?;
    stress(a, vm)
}

/// The kernel and initramfs, a balloon and virtio-mem, the console captured.
fn vm_config(a: &StressArgs, kernel: PathBuf) -> VmConfig {
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
    config
}

/// Boot the kernel, churn memslots and move the balloon and virtio-mem
/// targets cycle by cycle until it ends; every invariant the host can check.
fn stress(a: &StressArgs, vm: Vm) -> Result<bool, String> {
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
    let mut i1 = hot.0;
    i1.add(extra_removed);
    let i4 = report::i4(&run.total(), Tally::default(), a.watchdog);
    let invariants = invariants(i1, hot.1, i4);
    let mut guest = std::collections::BTreeMap::new();
    guest.insert("cycles".into(), cycles.done);
    guest.insert("cycles_missed".into(), cycles.missed.len() as u64);
    let id = RunId {
        seed: a.seed,
        schedule_digest: format!("linux-{}-cycles", a.cycles),
        vcpus: a.vcpus,
        elapsed,
    };
    let churned = Churned {
        extra_memslot_changes: extra.load(Ordering::Relaxed),
        balloon_target_changes: cycles.done,
        resizes: cycles.done,
    };
    let mut report = Report::new(id, &run, &control, churned, invariants, guest);
    report.ok &= cycles.missed.is_empty();
    for m in &cycles.missed {
        eprintln!("stress: {m}");
    }
    if let Ok(b) = control.balloon_info() {
        eprintln!(
            "stress: the guest's last memory statistics: {:?}",
            b.guest_stats
        );
    }
    report.print(a.json)?;
    Ok(report.ok)
}

/// The invariants the host checks under Linux (I2 and I3 are the guest
/// kernel's own business).
fn invariants(i1: Tally, unplugged: Tally, i4: Tally) -> Vec<Invariant> {
    let not_checked = |name, what| {
        Invariant::new(
            name,
            what,
            Tally::default(),
            "not checked: Linux checks its own memory",
        )
    };
    vec![
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
            unplugged,
            "mincore of unplugged blocks after each cycle",
        ),
    ]
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
        source_offset: 0,
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
                .is_ok_and(|b| b.get(BalloonStat::ActualPages) * 4096 == target)
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
