//! virtio-balloon on real KVM: the freestanding `balloon` guest follows the
//! target with exact accounting (its counts == the VMM's; the pool's
//! resident pages drop by exactly the pages inflated, by mincore), a hostile
//! guest attacks the device and the VMM keeps going, and Linux's own driver
//! inflates and deflates through the API.

mod common;

use std::time::Duration;

use common::inproc::{config, field, host_mode, text, StopIfPanicking};
use common::{guest, linux_file, run_with, vmm, wait_for};
use vmm::config::{BalloonOptions, FaultMode};
use vmm::devices::virtio::balloon::BalloonStat;
use vmm::exit::ExitReason;
use vmm::vm::Vm;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

fn balloon(target: u64) -> Option<BalloonOptions> {
    Some(BalloonOptions {
        target,
        free_page_reporting: false,
        stats_interval_s: 0,
    })
}

/// The test guest fills a 32 MiB pool, the host moves the target
/// 16 MiB -> 4 MiB -> 0 through the control plane (the API's code path), and
/// at each step: the guest reaches the target, the pool's resident pages
/// drop by exactly the pages inflated (mincore), and deflated pages read
/// back zero. At the end the guest's counts equal the VMM's.
#[test]
fn test_guest_follows_the_target_with_exact_accounting() {
    let base = 16 * MIB;
    let bytes = 32 * MIB;
    let cmd = format!("base={base} bytes={bytes} steps=3");
    let (mut c, out) = config("balloon", 1, 128 * MIB, &cmd, host_mode());
    c.balloon = balloon(0);
    let vm = Vm::new(c).unwrap();
    let control = vm.control().clone();
    let memory = vm.memory().clone();
    let pool_pages = bytes / PAGE;
    let console = out.clone();
    let guard = vm.control().clone();
    let driver = std::thread::spawn(move || {
        let _stop = StopIfPanicking(guard);
        let reached = || text(&console).matches("balloon: reached target=").count();
        let pool = || memory.resident_pages_in(base, bytes);
        let actual = || {
            control
                .balloon_info()
                .unwrap()
                .get(BalloonStat::ActualPages)
        };
        wait_for(
            "the guest to fill its pool",
            Duration::from_secs(120),
            || pool() == pool_pages,
        );
        let mut log = Vec::new();
        for (step, target) in [16 * MIB, 4 * MIB, 0].into_iter().enumerate() {
            let before = pool();
            let was = actual();
            control.set_balloon_target(target).unwrap();
            // The guest prints the step once its last chain is done and
            // every deflated page re-touched: measure after that line, not
            // after some time.
            wait_for(
                "the guest to reach the target",
                Duration::from_secs(300),
                || reached() > step,
            );
            log.push((was, actual(), before, pool()));
        }
        log
    });
    let report = vm.run().unwrap();
    let steps = driver.join().unwrap();
    let out = text(&out);
    assert_eq!(report.reason, ExitReason::GuestStatus(0), "{out}");
    let reached: Vec<u64> = steps.iter().map(|s| s.1).collect();
    assert_eq!(
        reached,
        [16 * MIB / PAGE, 4 * MIB / PAGE, 0],
        "the device's `actual` at each step the guest reached"
    );
    for (was, now, before, after) in &steps {
        if now > was {
            assert_eq!(
                before - after,
                now - was,
                "pool residency must drop by exactly the pages inflated: {steps:?}"
            );
        } else {
            assert_eq!(
                after - before,
                was - now,
                "deflated pages come back when the guest touches them: {steps:?}"
            );
        }
    }
    let done = "balloon: done";
    assert_eq!(field(&out, done, "zero_bad"), Some(0), "{out}");
    assert_eq!(field(&out, done, "pattern_bad"), Some(0), "{out}");
    let inflated = field(&out, done, "inflated").unwrap();
    let deflated = field(&out, done, "deflated").unwrap();
    assert_eq!(inflated, 16 * MIB / PAGE);
    assert_eq!(deflated, 16 * MIB / PAGE);
    let vmm_side = vm_balloon_counts(&out, &report);
    assert_eq!(vmm_side, (inflated, deflated), "guest counts != VMM counts");
}

/// The VMM's own inflate/deflate counts from the run's memory stats.
fn vm_balloon_counts(_out: &str, report: &vmm::vm::RunReport) -> (u64, u64) {
    let b = report.balloon.as_ref().expect("a balloon in the report");
    (
        b.get(BalloonStat::InflatedPages),
        b.get(BalloonStat::DeflatedPages),
    )
}

/// A guest that attacks both virtio devices, the balloon and virtio-mem
/// (5,000 random register writes each, loops, bad addresses, lengths near 4 GiB, write-only descriptors,
/// notifies before DRIVER_OK and in floods, read-only and unaligned register
/// writes, bogus features, queues outside RAM; for virtio-mem also 300
/// random requests and malformed request chains) while its other vCPU
/// faults and checks memory: the VMM keeps running, the checker sees no
/// corruption, each device recovers after a reset (virtio-mem: writes to
/// unplugged memory are dropped, plugged blocks keep what is written,
/// re-plugged blocks read zero), each device's error counter rose, and the
/// log stayed rate-limited.
#[test]
fn hostile_guest_breaks_only_its_own_devices() {
    let mut c = vmm();
    c.args([
        "run",
        "--vcpus",
        "2",
        "--mem",
        "256M",
        "--balloon",
        "0",
        "--hotplug",
        "256M",
        "--hotplug-requested",
        "32M",
        "--kernel",
    ])
    .arg(guest("vhostile"))
    .args(["--cmdline", "ptpfns=0"]);
    let started = std::time::Instant::now();
    let r = run_with(c, Duration::from_secs(300));
    let secs = started.elapsed().as_secs();
    r.assert_ok();
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("vhostile: done"))
        .unwrap_or_else(|| panic!("no done line:\n{}", r.stdout));
    let f = |k| field(line, "vhostile: done", k).unwrap();
    assert_eq!(f("devices"), 2, "{line}");
    assert_eq!(f("features_ok_stuck"), 0, "bogus features accepted: {line}");
    assert_eq!(f("recovered"), 2, "a device did not recover: {line}");
    assert_eq!(
        f("checker_bad"),
        0,
        "memory corrupted under the attack: {line}"
    );
    assert_eq!(
        f("mem_bad"),
        0,
        "virtio-mem lost a chain, broke its accounting or its memory: {}",
        r.stdout
    );
    let requests = r
        .stdout
        .lines()
        .find(|l| l.contains(" mem requests="))
        .unwrap_or_else(|| panic!("no virtio-mem request line:\n{}", r.stdout));
    let g = |k| field(requests, "vhostile: dev=1 mem", k).unwrap();
    assert_eq!(g("requests"), 300, "{requests}");
    assert!(g("ack") > 0 && g("error") > 0, "{requests}");
    assert_eq!(g("unanswered"), 0, "{requests}");
    let mut total = 0;
    for dev in ["virtio-balloon", "virtio-mem"] {
        let errors: u64 = r
            .stderr
            .lines()
            .find_map(|l| l.trim().strip_prefix(&format!("{dev}: ")))
            .and_then(|l| field(l, "", "guest_errors"))
            .unwrap_or_else(|| panic!("no {dev} summary:\n{}", r.stderr));
        assert!(errors > 20, "{dev}: guest errors counted: {errors}");
        total += errors;
    }
    let logged = r
        .stderr
        .lines()
        .filter(|l| l.contains("guest error"))
        .count() as u64;
    // 10 lines per second per device at most.
    assert!(
        logged <= 2 * 10 * (secs + 1) && logged * 10 < total,
        "{logged} guest-error lines for {total} errors in {secs} s: not rate-limited"
    );
}

/// The same guest also gives the balloon its own page tables: the VMM
/// discards them as asked (the guest's data is its own to lose), the guest
/// then triple-faults, and the VMM says so and exits 1 — it neither crashes
/// nor hangs.
#[test]
fn guest_that_balloons_its_own_page_tables_crashes_alone() {
    let mut c = vmm();
    c.args([
        "run",
        "--vcpus",
        "2",
        "--mem",
        "256M",
        "--balloon",
        "0",
        "--kernel",
    ])
    .arg(guest("vhostile"))
    .args(["--cmdline", "ptpfns=1"]);
    let r = run_with(c, Duration::from_secs(300));
    r.assert_error("triple-faulted");
    assert!(r.stderr.contains("balloon: "), "{}", r.stderr);
}

/// Linux's virtio-balloon driver (the microVM kernel, `idle` /init: no
/// userland needed) inflates to a target set through the control plane and
/// deflates back. Guest RAM is prefaulted, so every page is resident and the
/// drop in resident pages is exactly the pages the driver gave.
#[test]
fn linux_driver_inflates_and_deflates() {
    let out: common::inproc::Output = Default::default();
    let mut c = vmm::config::VmConfig::new(std::path::PathBuf::from(linux_file("bzImage-micro")));
    c.initrd = Some(linux_file("initramfs-idle.cpio").into());
    c.vcpus = 1;
    c.mem_size = 256 * MIB;
    c.cmdline = "console=ttyS0".into();
    c.fault_mode = Some(FaultMode::Prefault);
    c.serial = vmm::config::SerialOut::Capture(out.clone());
    c.balloon = balloon(0);
    let vm = Vm::new(c).unwrap();
    let control = vm.control().clone();
    let memory = vm.memory().clone();
    let exit = vm.exit_handle();
    let driver = std::thread::spawn(move || {
        let info = || control.balloon_info().unwrap();
        wait_for("Linux's balloon driver", Duration::from_secs(600), || {
            info().driver_ready
        });
        let before = memory.resident_pages();
        let target = 32 * MIB;
        control.set_balloon_target(target).unwrap();
        wait_for("the driver to inflate", Duration::from_secs(600), || {
            info().get(BalloonStat::ActualPages) == target / PAGE
        });
        let inflated = memory.resident_pages();
        control.set_balloon_target(0).unwrap();
        wait_for("the driver to deflate", Duration::from_secs(600), || {
            info().get(BalloonStat::ActualPages) == 0
        });
        let i = info();
        control.stop();
        (before, inflated, i)
    });
    let report = vm.run().unwrap();
    let (before, inflated, info) = driver.join().unwrap();
    let console = text(&out);
    assert_eq!(report.reason, ExitReason::Stopped, "{console}");
    assert_eq!(
        info.get(BalloonStat::InflatedPages),
        32 * MIB / PAGE,
        "{info:?}"
    );
    assert_eq!(
        info.get(BalloonStat::DeflatedPages),
        32 * MIB / PAGE,
        "{info:?}"
    );
    assert_eq!(
        before - inflated,
        info.get(BalloonStat::InflatedPages),
        "resident pages must drop by exactly the pages inflated"
    );
    assert_eq!(info.get(BalloonStat::RejectedDescriptors), 0);
    drop(exit);
}
