//! `vmm stress`: balloon and hotplug churn while every vCPU faults, with
//! the invariants counted.
//!
//! A `memchurn` guest runs on N vCPUs: vCPU 0 drives the balloon (a pool of
//! boot RAM) and virtio-mem; the others fault continuously, in plugged
//! blocks and in a worker area of boot RAM that the host discards at the
//! end of every pass (so each pass first-touches discarded pages and checks
//! they read zero). A seeded controller on the host moves the balloon
//! target, virtio-mem's requested_size and extra memslots at the given
//! rates through the control plane (the API's code path); a watchdog
//! checks every vCPU keeps making progress; mincore audits check that no
//! page is resident in a removed slot or an unplugged block. At the end the
//! guest verifies what it wrote and reports; the report gives every
//! invariant with its checks and violations, and the exit status is
//! non-zero on any violation.

pub mod audit;
mod linux;
mod phases;
pub mod report;
pub mod schedule;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;

use audit::{SlotAudit, Tally};
use phases::{End, Phases};
use report::{Churned, Invariant, Report, RunId};
use schedule::{Action, Event, Limits};
use vmm::api::VmControl;
use vmm::arch::x86_64::layout;
use vmm::config::{
    parse_duration, parse_size, BalloonOptions, FaultMode, HotplugOptions, Kernel, Prefetch,
    RestoreMode, RestoreOptions, SerialOut, VmConfig,
};
use vmm::fault::stats::ThreadStat;
use vmm::fault::FaultSnapshot;
use vmm::memory::{MemoryManager, NewSlot, PageSource, PAGE_SIZE};
use vmm::metrics::VmMetrics;
use vmm::vm::Vm;

const MIB: u64 = 1 << 20;
/// Where the guest's balloon pool starts (above its image and stacks).
const POOL_BASE: u64 = 16 * MIB;
/// Size of each extra memslot the controller adds and removes.
const EXTRA_SLOT: u64 = 2 * MIB;
/// Extra memslots that may exist at once.
const EXTRA_SLOTS: u32 = 4;

/// Worker access order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Pattern {
    Seq,
    Random,
    Mixed,
}

impl Pattern {
    fn code(self) -> u32 {
        match self {
            Pattern::Seq => 0,
            Pattern::Random => 1,
            Pattern::Mixed => 2,
        }
    }
}

fn size(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

#[derive(Parser, Debug, Clone)]
pub struct StressArgs {
    /// vCPUs: one drives the devices, the others fault.
    #[arg(long, default_value_t = 3)]
    pub vcpus: usize,
    /// Boot RAM (a quarter is the balloon pool, a quarter the worker area).
    #[arg(long, default_value = "512M", value_parser = size)]
    pub mem: u64,
    /// virtio-mem region (0: no hotplug).
    #[arg(long, default_value = "512M", value_parser = size)]
    pub hotplug: u64,
    #[arg(long, default_value = "2M", value_parser = size)]
    pub hotplug_block: u64,
    /// How long to churn (e.g. 60s, 10m).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Seeds the schedule and the guest's patterns.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Balloon target changes per second.
    #[arg(long, default_value_t = 2.0)]
    pub balloon_rate: f64,
    /// requested_size changes per second.
    #[arg(long, default_value_t = 2.0)]
    pub hotplug_rate: f64,
    /// Extra memslot changes (adds and removes) per second.
    #[arg(long, default_value_t = 100.0)]
    pub memslot_rate: f64,
    /// Order in which the faulting vCPUs visit their pages.
    #[arg(long, value_enum, default_value = "mixed")]
    pub pattern: Pattern,
    /// Guest RAM (and the hotplug region and extra memslots) on 2 MiB
    /// hugetlb pages: the balloon's 4 KiB frames are taken out of huge pages.
    #[arg(long)]
    pub mem_hugepages: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    #[arg(long, value_enum)]
    pub fault_mode: Option<FaultMode>,
    /// A vCPU making no exit for this long, or a fault taking this long,
    /// violates I4.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub watchdog: Duration,
    /// Serve metrics at ADDR during the run, and for `--metrics-linger`
    /// after it (a last scrape of the final counters).
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub metrics_linger: Duration,
    /// Fault injection: every Nth install answers EAGAIN, as if a discard
    /// were in flight.
    #[arg(long)]
    pub inject_eagain_every: Option<u32>,
    /// Fault injection: the guest ignores balloon requests.
    #[arg(long)]
    pub guest_ignores_balloon: bool,
    /// Fault injection: the guest keeps using pages it gave the balloon.
    #[arg(long)]
    pub guest_uses_ballooned: bool,
    /// Fault injection: the guest plugs beyond requested_size (NACKed).
    #[arg(long)]
    pub guest_overplugs: bool,
    /// Churn a Linux kernel instead of the test guest: balloon and virtio-mem
    /// targets are cycled `--cycles` times, each cycle waiting for the
    /// guest's drivers (the VMM's invariant checks only).
    #[arg(long)]
    pub kernel: Option<std::path::PathBuf>,
    #[arg(long, requires = "kernel")]
    pub initrd: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 3)]
    pub cycles: u64,
    /// Snapshot the VM this far into the run (paused), end it, restore it
    /// from the snapshot and churn on: every write made before, during and
    /// after the restore must be found.
    #[arg(long, value_parser = parse_duration)]
    pub restore_at: Option<Duration>,
    /// How the restore brings memory back.
    #[arg(long, value_enum, default_value = "ondemand", requires = "restore_at")]
    pub restore_mode: RestoreMode,
    /// The restore's background prefetch.
    #[arg(long, value_enum, default_value = "none", requires = "restore_at")]
    pub prefetch: Prefetch,
    /// Where the snapshot goes (default: a temporary directory, removed
    /// after the run).
    #[arg(long, requires = "restore_at")]
    pub snapshot_dir: Option<std::path::PathBuf>,
}

/// Where the guest's pool and worker area sit in boot RAM.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pool: u64,
    wbase: u64,
    wbytes: u64,
    workers: u64,
}

impl Layout {
    fn new(mem: u64, vcpus: usize) -> Result<Self, String> {
        let quarter = (mem / 4).min(256 * MIB) & !(MIB - 1);
        let pool = quarter;
        let wbase = POOL_BASE + pool;
        let wbytes = quarter;
        if wbase + wbytes > mem.min(layout::MMIO_GAP_START) || quarter < 4 * MIB {
            return Err(format!(
                "--mem {} MiB is too small for a stress run",
                mem >> 20
            ));
        }
        Ok(Self {
            pool,
            wbase,
            wbytes,
            workers: vcpus.saturating_sub(1) as u64,
        })
    }

    /// The part of the worker area vCPU `cpu` owns (as the guest splits
    /// it: equal shares in vCPU order, the last also takes the remainder).
    fn share(&self, cpu: u64) -> Option<(u64, u64)> {
        if cpu == 0 || cpu > self.workers {
            return None;
        }
        let pages = self.wbytes / PAGE_SIZE;
        let per = pages / self.workers;
        let w = cpu - 1;
        let first = w * per;
        let count = if w + 1 == self.workers {
            pages - first
        } else {
            per
        };
        Some((self.wbase + first * PAGE_SIZE, count * PAGE_SIZE))
    }
}

/// Counters the controller keeps.
#[derive(Default)]
pub(crate) struct Activity {
    balloon_changes: AtomicU64,
    resizes: AtomicU64,
    extra_changes: AtomicU64,
}

/// Why a stress run ended the VM itself.
#[derive(Debug, thiserror::Error)]
pub enum StressError {
    #[error("stress: the guest did not finish after the run")]
    GuestDidNotFinish,
}

/// Run `vmm stress`; returns whether every invariant held.
pub fn run(a: &StressArgs) -> Result<bool, String> {
    if let Some(k) = &a.kernel {
        return linux::run(a, k.clone());
    }
    if a.vcpus < 2 {
        return Err("--vcpus must be at least 2 (one drives the devices, the others fault)".into());
    }
    let lay = Layout::new(a.mem, a.vcpus)?;
    let guest =
        std::env::temp_dir().join(format!("vmm-stress-memchurn-{}.elf", std::process::id()));
    std::fs::write(&guest, vmm_guests::MEMCHURN).map_err(|e| e.to_string())?;
    let (config, out) = vm_config(a, &lay, guest.clone())?;
    let vm = Vm::new(config).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&guest);
    let control = vm.control().clone();
    let region = control
        .memory_info()
        .map(|m| (m.region_addr, m.region_mib * MIB))
        .unwrap_or((0, 0));
    let extra_base = (region.0 + region.1)
        .max(layout::MMIO_GAP_END)
        .max(a.mem + layout::MMIO_GAP_END)
        .next_multiple_of(1 << 30);
    let events = schedule::build(a.seed, &limits(a, &lay));
    let digest = format!("{:016x}", schedule::digest(&events));
    let audit = Arc::new(Mutex::new((
        SlotAudit::new(region.0, region.1),
        SlotAudit::new(extra_base, u64::from(EXTRA_SLOTS) * (1 << 30)),
    )));
    let phases = Phases::new(a, events)?;
    let started = Instant::now();
    let mut ran = phases.run(a, vm, lay, extra_base, &audit, &out)?;
    let elapsed = started.elapsed();
    let memory = ran.vm_memory.clone();
    let control = ran.control.clone();
    let run = ran.last.take().ok_or("stress: no run")?;
    let text = String::from_utf8_lossy(&out.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let guest = guest_report(&text);
    // A last audit after everything stopped.
    let (hot, extra) = {
        let mut au = audit.lock().unwrap_or_else(|e| e.into_inner());
        au.0.check(&memory);
        au.1.check(&memory);
        ((au.0.removed, au.0.unplugged), au.1.removed)
    };
    let mut i1 = hot.0;
    i1.add(extra);
    let i4 = report::i4(&ran.total, ran.stuck, a.watchdog);
    let mut invariants = invariants(i1, hot.1, i4, &guest);
    invariants.extend(ran.restored);
    let id = RunId {
        seed: a.seed,
        schedule_digest: digest,
        vcpus: a.vcpus,
        elapsed,
    };
    let activity = &ran.activity;
    let churned = Churned {
        extra_memslot_changes: activity.extra_changes.load(Ordering::Relaxed),
        balloon_target_changes: activity.balloon_changes.load(Ordering::Relaxed),
        resizes: activity.resizes.load(Ordering::Relaxed),
    };
    let g = |k: &str| guest.get(k).copied().unwrap_or(0);
    let finished = !guest.is_empty();
    let ok_guest = g("errors") == 0 && finished;
    let mut report = Report::new(id, &run, &control, churned, invariants, guest);
    report.ok &= ok_guest;
    report.print(a.json)?;
    if !finished {
        eprintln!("stress: the guest gave no report; its console:\n{text}");
    }
    linger(a);
    Ok(report.ok)
}

/// Where the guest's console goes (read after the run).
pub(crate) type Console = Arc<Mutex<Vec<u8>>>;

/// The VM a stress run boots: the churn guest with its layout on the
/// command line, a balloon, virtio-mem, its console captured (returned).
fn vm_config(
    a: &StressArgs,
    lay: &Layout,
    guest: std::path::PathBuf,
) -> Result<(VmConfig, Console), String> {
    let mut config = VmConfig::new(guest);
    config.vcpus = a.vcpus;
    config.mem_size = a.mem;
    config.fault_mode = a.fault_mode;
    let out = Arc::new(Mutex::new(Vec::new()));
    config.serial = SerialOut::Capture(out.clone());
    let mut cmdline = format!(
        "seed={} pool_base={POOL_BASE} pool_bytes={} wbase={} wbytes={} wdiscard=1 wpattern={}",
        a.seed,
        lay.pool,
        lay.wbase,
        lay.wbytes,
        a.pattern.code()
    );
    for (on, key) in [
        (a.guest_ignores_balloon, " ignore_balloon=1"),
        (a.guest_uses_ballooned, " use_ballooned=1"),
        (a.guest_overplugs, " overplug=1"),
    ] {
        if on {
            cmdline.push_str(key);
        }
    }
    config.cmdline = cmdline;
    config.balloon = Some(BalloonOptions {
        target: 0,
        free_page_reporting: false,
        stats_interval_s: 0,
    });
    config.hotplug = (a.hotplug > 0).then_some(HotplugOptions {
        size: a.hotplug,
        block_size: a.hotplug_block,
        requested: 0,
    });
    config.inject_eagain_every = a.inject_eagain_every;
    config.metrics_addr = a.metrics_addr;
    config.metrics_linger = a.metrics_linger;
    config.mem_hugepages = a.mem_hugepages;
    if a.mem_hugepages {
        // The extra memslots are hugetlb too: room for them in the pool.
        let bytes = a.mem + a.hotplug + EXTRA_SLOT * u64::from(EXTRA_SLOTS);
        vmm::memory::hugetlb::reserve(bytes.div_ceil(vmm::memory::hugetlb::HUGE_PAGE))
            .map_err(|e| e.to_string())?;
    }
    Ok((config, out))
}

/// Each worker's pass ends with a marker: discard its share, so the next
/// pass first-touches discarded pages (and checks they read zero).
pub(crate) fn discard_each_pass(vm: &Vm, lay: Layout) {
    let memory = vm.memory().clone();
    vm.on_marker(Box::new(move |v| {
        if let Some((gpa, len)) = v.checked_sub(0x100).and_then(|c| lay.share(u64::from(c))) {
            if let Err(e) = memory.discard(gpa, len) {
                log::error!("stress: discard of a worker share failed: {e}");
            }
        }
    }));
}

/// What the seeded schedule may do.
fn limits(a: &StressArgs, lay: &Layout) -> Limits {
    Limits {
        duration: a.duration,
        balloon_rate: a.balloon_rate,
        hotplug_rate: if a.hotplug > 0 { a.hotplug_rate } else { 0.0 },
        memslot_rate: a.memslot_rate,
        balloon_max: lay.pool,
        balloon_unit: MIB,
        hotplug_max: a.hotplug,
        hotplug_unit: a.hotplug_block,
        extra_slots: EXTRA_SLOTS,
    }
}

/// The guest's `memchurn: done k=v ...` line, parsed (empty if it never
/// finished).
fn guest_report(console: &str) -> BTreeMap<String, u64> {
    console
        .lines()
        .find(|l| l.starts_with("memchurn: done"))
        .map(|l| {
            l.split_whitespace()
                .filter_map(|t| t.split_once('='))
                .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Every invariant with its checks: I1 and I6 from the host's audits, I2,
/// I3 and I6's STATE checks from the guest's report, I4 from the counters.
fn invariants(
    i1: Tally,
    unplugged: Tally,
    i4: Tally,
    guest: &BTreeMap<String, u64>,
) -> Vec<Invariant> {
    let g = |k: &str| guest.get(k).copied().unwrap_or(0);
    let finished = !guest.is_empty();
    vec![
        Invariant::new(
            "I1",
            "no resident page in a removed slot",
            i1,
            "mincore of each removed slot, after the removal and once more",
        ),
        Invariant::new(
            "I2",
            "every write the guest made is found",
            Tally {
                checks: g("verified"),
                violations: g("worker_bad") + g("pattern_bad") + u64::from(!finished),
            },
            "the guest re-reads every page it wrote",
        ),
        Invariant::new(
            "I3",
            "discarded and re-plugged pages read zero",
            Tally {
                checks: g("zero_checks") + g("worker_zero_checks"),
                violations: g("zero_bad") + g("worker_zero_bad"),
            },
            "the guest reads each discarded, deflated or re-plugged page first",
        ),
        Invariant::new(
            "I4",
            "every fault ended installed or present",
            i4,
            "faults == speculative + slow-path + present; no vCPU or fault stuck",
        ),
        Invariant::new(
            "I6",
            "nothing installed into an unplugged block",
            Tally {
                checks: unplugged.checks + g("plugs") + g("unplugs"),
                violations: unplugged.violations + g("state_bad") + g("overplug_acked"),
            },
            "mincore of unplugged blocks after each resize; STATE after each plug/unplug",
        ),
    ]
}

/// The report is out; the metrics endpoint serves the same final counters
/// a little longer (for a last scrape).
fn linger(a: &StressArgs) {
    if a.metrics_addr.is_some() && !a.metrics_linger.is_zero() {
        use std::io::Write;
        let _ = std::io::stdout().flush();
        std::thread::sleep(a.metrics_linger);
    }
}

/// The host side of a run: the controller applying the schedule, the
/// watchdog, and the guard that ends a guest that never finishes.
pub(crate) struct Churn {
    threads: Vec<std::thread::JoinHandle<()>>,
    done: Arc<AtomicBool>,
    activity: Arc<Activity>,
    stuck: Arc<Mutex<Tally>>,
}

impl Churn {
    /// Churn `vm` with `events` for `duration`, then `end` the phase.
    fn start(
        a: &StressArgs,
        vm: &Vm,
        events: Vec<Event>,
        (duration, end): (Duration, End),
        extra_base: u64,
        audit: Arc<Mutex<(SlotAudit, SlotAudit)>>,
        activity: Arc<Activity>,
    ) -> Result<Churn, String> {
        let (control, memory, metrics, exit) = (
            vm.control().clone(),
            vm.memory().clone(),
            vm.metrics().clone(),
            vm.exit_handle(),
        );
        let actions = vm.actions();
        let done = Arc::new(AtomicBool::new(false));
        let stuck = Arc::new(Mutex::new(Tally::default()));
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|e| e.to_string())
        };
        let controller = {
            let (activity, done, exit) = (activity.clone(), done.clone(), exit.clone());
            let started = Instant::now();
            spawn(
                "stress-controller",
                Box::new(move || {
                    controller(
                        &control, &memory, &events, extra_base, &activity, &audit, &exit,
                    );
                    // The run lasts its duration even when the schedule
                    // ends earlier (or is empty: a churn-free baseline).
                    while let Some(left) = duration.checked_sub(started.elapsed()) {
                        if exit.is_stopping() || left.is_zero() {
                            break;
                        }
                        std::thread::sleep(left.min(Duration::from_millis(100)));
                    }
                    done.store(true, Ordering::Release);
                    end.apply(&control, actions.as_ref(), &exit);
                }),
            )?
        };
        let watchdog = {
            let (done, stuck, exit, activity) =
                (done.clone(), stuck.clone(), exit.clone(), activity.clone());
            let limit = a.watchdog;
            spawn(
                "stress-watchdog",
                Box::new(move || {
                    watchdog(&metrics, &done, &stuck, &exit, limit, duration, &activity)
                }),
            )?
        };
        // The guest gets this long after the signal to verify and report.
        let finish = {
            let done = done.clone();
            let limit = a.duration + Duration::from_secs(300);
            spawn(
                "stress-finish",
                Box::new(move || {
                    let t0 = Instant::now();
                    while !exit.is_stopping() {
                        if t0.elapsed() > limit && done.load(Ordering::Acquire) {
                            exit.fail(StressError::GuestDidNotFinish);
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }),
            )?
        };
        Ok(Churn {
            threads: vec![controller, watchdog, finish],
            done,
            activity,
            stuck,
        })
    }

    /// After the VM ended: what the controller did and what the watchdog
    /// counted.
    pub(crate) fn join(self) -> (Arc<Activity>, Tally) {
        self.done.store(true, Ordering::Release);
        for t in self.threads {
            let _ = t.join();
        }
        let stuck = *self.stuck.lock().unwrap_or_else(|e| e.into_inner());
        (self.activity, stuck)
    }
}

/// Apply the schedule in time; audit after each change.
#[allow(clippy::too_many_arguments)]
pub(crate) fn controller(
    control: &VmControl,
    memory: &MemoryManager,
    events: &[Event],
    extra_base: u64,
    activity: &Activity,
    audit: &Mutex<(SlotAudit, SlotAudit)>,
    exit: &vmm::exit::VmExit,
) {
    let t0 = Instant::now();
    for e in events {
        if exit.is_stopping() {
            return;
        }
        if let Some(wait) = e.at.checked_sub(t0.elapsed()) {
            std::thread::sleep(wait);
        }
        let mut au = audit.lock().unwrap_or_else(|e| e.into_inner());
        match e.action {
            Action::Balloon(bytes) => {
                if let Err(err) = control.set_balloon_target(bytes) {
                    log::error!("stress: balloon target: {err}");
                }
                activity.balloon_changes.fetch_add(1, Ordering::Relaxed);
            }
            Action::Hotplug(bytes) => {
                if let Err(err) = control.set_requested_memory(bytes) {
                    log::error!("stress: requested size: {err}");
                }
                activity.resizes.fetch_add(1, Ordering::Relaxed);
                au.0.check(memory);
            }
            Action::SlotAdd(n) => {
                let r = memory.add_slot(NewSlot {
                    gpa: extra_base + u64::from(n) * (1 << 30),
                    size: EXTRA_SLOT,
                    source: PageSource::Zero,
                    source_offset: 0,
                    block_size: None,
                });
                if let Err(err) = r {
                    log::error!("stress: add an extra memslot: {err}");
                }
                activity.extra_changes.fetch_add(1, Ordering::Relaxed);
                au.1.check(memory);
            }
            Action::SlotRemove(n) => {
                if let Err(err) = memory.remove_slot(extra_base + u64::from(n) * (1 << 30)) {
                    log::error!("stress: remove an extra memslot: {err}");
                }
                activity.extra_changes.fetch_add(1, Ordering::Relaxed);
                au.1.check(memory);
            }
        }
        // The virtio-mem side changes by the guest's requests, between ours.
        au.0.check(memory);
    }
}

/// Every second: every vCPU must have exited since the last look (a vCPU
/// that stops exiting is stuck), and on a terminal a progress line.
fn watchdog(
    metrics: &VmMetrics,
    done: &AtomicBool,
    stuck: &Mutex<Tally>,
    exit: &vmm::exit::VmExit,
    limit: Duration,
    duration: Duration,
    activity: &Activity,
) {
    let exits = |s: &FaultSnapshot| s.total("exits");
    let snap = || -> Vec<FaultSnapshot> { metrics.vcpus.iter().map(|s| s.snapshot()).collect() };
    let mut last: Vec<(u64, Instant)> = snap().iter().map(|s| (exits(s), Instant::now())).collect();
    let tty = std::io::stderr().is_terminal();
    let t0 = Instant::now();
    let mut last_faults = 0;
    let mut tick = 0u64;
    while !exit.is_stopping() && !done.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_secs(1));
        tick += 1;
        let now = snap();
        let mut t = stuck.lock().unwrap_or_else(|e| e.into_inner());
        for (i, s) in now.iter().enumerate() {
            t.checks += 1;
            let e = exits(s);
            if e != last[i].0 {
                last[i] = (e, Instant::now());
            } else if last[i].1.elapsed() > limit {
                t.violations += 1;
                log::error!("I4: vCPU {i} made no exit for {:?}", last[i].1.elapsed());
                last[i].1 = Instant::now();
            }
        }
        drop(t);
        let mut total = FaultSnapshot::default();
        now.iter().for_each(|s| total.add(s));
        let faults = total.faults();
        let line = format!(
            "[{:>4}/{} s] faults {} ({}/s) retries {} balloon {} hotplug {} memslots {}",
            t0.elapsed().as_secs(),
            duration.as_secs(),
            faults,
            faults - last_faults,
            total[ThreadStat::Retries],
            activity.balloon_changes.load(Ordering::Relaxed),
            activity.resizes.load(Ordering::Relaxed),
            activity.extra_changes.load(Ordering::Relaxed)
        );
        last_faults = faults;
        if tty {
            eprint!("\r{line}   ");
        } else if tick.is_multiple_of(10) {
            eprintln!("{line}");
        }
    }
    if tty {
        eprintln!();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_match_the_guest_split() {
        let l = Layout::new(512 * MIB, 4).unwrap();
        let pages = l.wbytes / PAGE_SIZE;
        let (a1, n1) = l.share(1).unwrap();
        let (a3, n3) = l.share(3).unwrap();
        assert_eq!(a1, l.wbase);
        assert_eq!(n1, pages / 3 * PAGE_SIZE);
        assert_eq!(a3 + n3, l.wbase + l.wbytes, "the last takes the rest");
        assert!(l.share(0).is_none() && l.share(4).is_none());
        assert!(Layout::new(8 * MIB, 2).is_err());
    }
}
