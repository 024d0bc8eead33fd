//! Adaptive fault-around on real KVM (docs/FAULT-PATH.md): a sequential
//! stream of first touches grows the serving thread's window up to 2 MiB;
//! random touches install what they touch and nothing more; a window never
//! puts a page back that the balloon took (a discarded page).

mod common;

use std::sync::Arc;

use common::inproc::{config, host_mode, text};
use vmm::config::FaultMode;
use vmm::exit::ExitReason;
use vmm::memory::MemoryManager;
use vmm::vm::{RunReport, Vm};

const MIB: u64 = 1 << 20;
const BASE: u64 = 16 * MIB;

/// One vCPU runs memstress (mode 0, one round) over `bytes` at `BASE` with
/// `extra` keys; `prepare` may act on guest memory before the first
/// instruction. Returns the report and the memory manager (for `mincore`).
fn run(
    mode: FaultMode,
    bytes: u64,
    extra: &str,
    fault_around: u64,
    prepare: impl FnOnce(&MemoryManager),
) -> (RunReport, Arc<MemoryManager>) {
    let cmd = format!("mode=0 rounds=1 base={BASE} bytes={bytes} {extra}");
    let (mut c, out) = config("memstress", 1, 64 * MIB, &cmd, mode);
    c.fault_around = fault_around;
    let vm = Vm::new(c).unwrap();
    let mem = vm.memory().clone();
    prepare(&mem);
    let report = vm.run().unwrap();
    let out = text(&out);
    assert_eq!(report.reason, ExitReason::GuestStatus(0), "{out}");
    assert!(out.contains("bad=0"), "{out}");
    (report, mem)
}

/// Demand-paging modes of this host (the window is the fault engine's,
/// shared by vCPU and handler threads).
fn modes() -> Vec<FaultMode> {
    common::inproc::demand_modes()
}

#[test]
fn a_sequential_stream_grows_the_window() {
    let pages = 8 * MIB / 4096;
    for mode in modes() {
        let (off, _) = run(mode, 8 * MIB, "stride=4096", 1, |_| {});
        let (on, _) = run(mode, 8 * MIB, "stride=4096", 512, |_| {});
        let (off, on) = (off.total(), on.total());
        eprintln!(
            "{}: faults {} without fault-around, {} with (pages installed {})",
            mode.name(),
            off.faults(),
            on.faults(),
            on.pages_installed
        );
        assert!(off.faults() >= pages, "{}: {off:?}", mode.name());
        // 2048 pages: windows of 1, 2, 4, ... 512 pages cover them in about
        // a dozen faults; allow for the guest's own code and stack.
        assert!(on.faults() * 16 < pages, "{}: {on:?}", mode.name());
        assert!(on.pages_installed >= pages, "{}: {on:?}", mode.name());
    }
}

#[test]
fn random_touches_install_only_what_they_touch() {
    // Every other page, in a seeded random order: a window would install
    // the untouched ones between them.
    let bytes = 8 * MIB;
    let touched = bytes / 8192;
    let mode = host_mode();
    let (_, mem_off) = run(mode, bytes, "stride=8192 random=1", 1, |_| {});
    let (report, mem_on) = run(mode, bytes, "stride=8192 random=1", 512, |_| {});
    let off = mem_off.resident_pages_in(BASE, bytes);
    let on = mem_on.resident_pages_in(BASE, bytes);
    eprintln!("resident in the region: {off} without fault-around, {on} with ({touched} touched)");
    assert_eq!(off, touched);
    assert!(
        on * 100 <= touched * 105,
        "{on} resident for {touched} touched: {:?}",
        report.total()
    );
}

#[test]
fn the_window_stops_before_discarded_pages() {
    // The stream runs to the end of [BASE, BASE + 8 MiB): its last window
    // would reach 2 MiB past it. Discarded there (never touched, as pages
    // the balloon took), nothing may appear; not discarded, the window does
    // spill there (so the check can fail).
    let bytes = 8 * MIB;
    let after = BASE + bytes;
    let mode = host_mode();
    let (_, plain) = run(mode, bytes, "stride=4096", 512, |_| {});
    let spilled = plain.resident_pages_in(after, 2 * MIB);
    let (report, ballooned) = run(mode, bytes, "stride=4096", 512, |m| {
        m.discard(after, 2 * MIB).unwrap()
    });
    let resident = ballooned.resident_pages_in(after, 2 * MIB);
    eprintln!("past the stream: {spilled} pages without a discard, {resident} with");
    assert!(spilled > 0, "the last window did not reach past the stream");
    assert_eq!(resident, 0, "{:?}", report.total());
}
