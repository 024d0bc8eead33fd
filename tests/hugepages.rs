//! Guest RAM on 2 MiB hugetlb pages (`--mem-hugepages`) on real KVM: every
//! fault mode runs the pattern guest; the demand-paging modes install a
//! whole huge page per fault (one fault per 2 MiB touched).

mod common;

use common::inproc::{all_modes, config, field, text};
use vmm::config::FaultMode;
use vmm::exit::ExitReason;
use vmm::vm::Vm;

const MIB: u64 = 1 << 20;

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
            t.pages_installed,
            report.resident_pages
        );
        if matches!(mode, FaultMode::Vcpu | FaultMode::Handler) {
            // 32 huge pages in the region, plus the guest's image, stack
            // and page tables below it: a fault per 2 MiB, not per 4 KiB.
            assert!(t.faults() >= 32 && t.faults() <= 48, "{t:?}");
            assert_eq!(t.pages_installed % 512, 0, "{t:?}");
            assert_eq!(t.pages_installed, t.faults() * 512, "{t:?}");
        }
    }
}
