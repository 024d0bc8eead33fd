//! Adaptive fault-around on real KVM (docs/FAULT-PATH.md): a sequential
//! stream of first touches grows the serving thread's window up to 2 MiB;
//! random touches install what they touch and nothing more; a window never
//! puts a page back that the balloon took (a discarded page); image-backed
//! RAM is read in windows too, and what the guest sees is the file.

mod common;

use std::sync::Arc;

use common::image_file;
use common::inproc::{config, field, host_mode, text};
use vmm::config::FaultMode;
use vmm::exit::ExitReason;
use vmm::fault::stats::ThreadStat;
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
            on[ThreadStat::PagesInstalled]
        );
        assert!(off.faults() >= pages, "{}: {off:?}", mode.name());
        // 2048 pages: windows of 1, 2, 4, ... 512 pages cover them in about
        // a dozen faults; allow for the guest's own code and stack.
        assert!(on.faults() * 16 < pages, "{}: {on:?}", mode.name());
        assert!(
            on[ThreadStat::PagesInstalled] >= pages,
            "{}: {on:?}",
            mode.name()
        );
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
        m.discard(after, 2 * MIB).map(drop).unwrap()
    });
    let resident = ballooned.resident_pages_in(after, 2 * MIB);
    eprintln!("past the stream: {spilled} pages without a discard, {resident} with");
    assert!(spilled > 0, "the last window did not reach past the stream");
    assert_eq!(resident, 0, "{:?}", report.total());
}

/// An image-backed stream: each window is one read of the file and one
/// install, so 8 MiB take a few dozen faults instead of 2,048, and every
/// word the guest reads is the file's, except on the one page discarded
/// before the run: the stream reaches it with a large window, and only that
/// page reads zero (no window of zeros over the image after it, I3).
#[test]
fn image_backed_streams_are_read_in_windows() {
    let mem_size = 64 * MIB;
    for mode in modes() {
        let img = image_file(&format!("fa-{}", mode.name()), mem_size);
        let cmd = format!("mode=1 base={BASE} bytes={} stride=4096", 8 * MIB);
        let (mut c, out) = config("memstress", 1, mem_size, &cmd, mode);
        c.mem_source = Some(img.clone());
        let vm = Vm::new(c).unwrap();
        vm.memory().discard(BASE + 100 * 4096, 4096).unwrap();
        let report = vm.run().unwrap();
        let _ = std::fs::remove_file(&img);
        let out = text(&out);
        // Exit 1: pass 1 met a zero word (the discarded page), as intended.
        assert_eq!(report.reason, ExitReason::GuestStatus(1), "{out}");
        let p1 = "memstress image pass=1";
        assert_eq!(field(&out, p1, "ok"), Some(2047), "{out}");
        assert_eq!(field(&out, p1, "zero"), Some(1), "{out}");
        assert_eq!(field(&out, p1, "bad"), Some(0), "{out}");
        let t = report.total();
        eprintln!(
            "{}: {} faults, {} pages installed, {} bytes read",
            mode.name(),
            t.faults(),
            t[ThreadStat::PagesInstalled],
            t[ThreadStat::SourceBytes]
        );
        // The whole image below the region is read too (the guest's code
        // and stack): allow for it, but not for a fault per page.
        assert!(t.faults() * 16 < 2048, "{}: {t:?}", mode.name());
        // Every installed page was read from the file but the discarded one.
        assert_eq!(
            t[ThreadStat::SourceBytes],
            (t[ThreadStat::PagesInstalled] - 1) * 4096,
            "{t:?}"
        );
    }
}
