//! Guest RAM on 2 MiB hugetlb pages (`--mem-hugepages`) on real KVM: every
//! fault mode runs the pattern guest; the demand-paging modes install a
//! whole huge page per fault (one fault per 2 MiB touched); the balloon
//! gives back whole huge pages out of 4 KiB frames (`tests/stress.rs` runs
//! the stress command on huge pages).

mod common;

use std::time::{Duration, Instant};

use common::inproc::{all_modes, config, field, host_mode, text};
use common::wait_for;
use vmm::config::{BalloonOptions, FaultMode};
use vmm::devices::virtio::balloon::BalloonStat;
use vmm::exit::ExitReason;
use vmm::fault::stats::ThreadStat;
use vmm::memory::MemStat;
use vmm::vm::Vm;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;

#[test]
fn every_mode_runs_on_huge_pages() {
    let bytes = 64 * MIB;
    let cmd = format!(
        "mode=0 rounds=2 base={} bytes={bytes} stride=4096",
        16 * MIB
    );
    for mode in all_modes() {
        let (mut c, out) = config("memstress", 2, 128 * MIB, &cmd, mode);
        c.mem_hugepages = true;
        let report = Vm::new(c).unwrap().run().unwrap();
        let out = text(&out);
        assert_eq!(
            report.reason,
            ExitReason::GuestStatus(0),
            "{}: {out}",
            mode.name()
        );
        assert_eq!(field(&out, "memstress: done", "bad"), Some(0), "{out}");
        let t = report.total();
        eprintln!(
            "{}: {} faults, {} pages installed, {} resident",
            mode.name(),
            t.faults(),
            t[ThreadStat::PagesInstalled],
            report.memory[MemStat::ResidentPages]
        );
        if matches!(mode, FaultMode::Vcpu | FaultMode::Handler) {
            // 32 huge pages in the region, plus the guest's image, stack
            // and page tables below it: a fault per 2 MiB, not per 4 KiB.
            assert!(t.faults() >= 32 && t.faults() <= 48, "{t:?}");
            assert_eq!(t[ThreadStat::PagesInstalled] % 512, 0, "{t:?}");
            assert_eq!(t[ThreadStat::PagesInstalled], t.faults() * 512, "{t:?}");
        }
    }
}

/// The balloon on hugetlb RAM: the test guest inflates and deflates 4 KiB
/// frames in 1 MiB chains from the top of its 32 MiB pool down while the
/// host moves the target 15 -> 3 -> 5 -> 0 MiB. A huge page goes back to
/// the host exactly when every one of its frames is in the balloon, so at
/// each step the pool's residency is the pool less 512 pages per whole
/// ballooned huge page, a partly ballooned one stays (zeroed where
/// ballooned), and no guest write is lost. 3 MiB after 15 MiB deflates
/// half of a dropped huge page: its other half still counts, and the
/// 5 MiB step drops it again.
#[test]
fn balloon_gives_back_whole_huge_pages() {
    let (base, bytes) = (16 * MIB, 32 * MIB);
    let cmd = format!("base={base} bytes={bytes} steps=4");
    let (mut c, out) = config("balloon", 1, 128 * MIB, &cmd, host_mode());
    c.mem_hugepages = true;
    c.balloon = Some(BalloonOptions {
        target: 0,
        free_page_reporting: false,
        stats_interval_s: 0,
    });
    let vm = Vm::new(c).unwrap();
    let control = vm.control().clone();
    let memory = vm.memory().clone();
    let pool_pages = bytes / PAGE;
    let driver = std::thread::spawn(move || {
        let pool = || memory.resident_pages_in(base, bytes);
        wait_for(
            "the guest to fill its pool",
            Duration::from_secs(120),
            || pool() == pool_pages,
        );
        let mut steps = Vec::new();
        for target in [15 * MIB, 3 * MIB, 5 * MIB, 0] {
            control.set_balloon_target(target).unwrap();
            wait_for("the balloon target", Duration::from_secs(120), || {
                control
                    .balloon_info()
                    .unwrap()
                    .get(BalloonStat::ActualPages)
                    == target / PAGE
            });
            let want = pool_pages - target / (2 * MIB) * 512;
            // The guest re-touches deflated pages after it updates `actual`.
            let settled = {
                let deadline = Instant::now() + Duration::from_secs(10);
                while pool() != want && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                pool()
            };
            let touched = control.balloon_touched_pages();
            steps.push((target >> 20, want, settled, touched));
        }
        steps
    });
    let report = vm.run().unwrap();
    let steps = driver.join().unwrap();
    let out = text(&out);
    assert_eq!(report.reason, ExitReason::GuestStatus(0), "{out}");
    for (mib, want, got, touched) in &steps {
        assert_eq!(
            got, want,
            "target {mib} MiB: pool residency {got}, expected {want}: {steps:?}"
        );
        assert_eq!(
            *touched, 0,
            "frames held in partial pages are not 'touched': {steps:?}"
        );
    }
    let done = "balloon: done";
    assert_eq!(field(&out, done, "zero_bad"), Some(0), "{out}");
    assert_eq!(field(&out, done, "pattern_bad"), Some(0), "{out}");
    let inflated = field(&out, done, "inflated").unwrap();
    assert_eq!(inflated, (15 + 2) * MIB / PAGE, "{out}");
    let b = report.balloon.as_ref().unwrap();
    assert_eq!(
        (
            b.get(BalloonStat::InflatedPages),
            b.get(BalloonStat::DeflatedPages)
        ),
        (inflated, inflated)
    );
}
