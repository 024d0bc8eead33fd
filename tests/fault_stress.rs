//! Seeded stress tests of the fault engine on real KVM, checking the
//! fault-path invariants (docs/FAULT-PATH.md) while memslots change under
//! running vCPUs:
//! I1 nothing installed into a slot after its removal began; I2 no guest
//! write lost; I3 discarded pages refault as zero; I4 every fault ends
//! installed or already present.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::inproc::{all_modes, config, demand_modes, field, host_mode, lines, text, StopOnDrop};
use common::{image_file, say, wait_for};
use vmm::config::FaultMode;
use vmm::exit::ExitReason;
use vmm::fault::stats::ThreadStat;
use vmm::fault::FaultSnapshot;
use vmm::memory::MemStat;
use vmm::memory::{resident_pages, NewSlot, PageSource};
use vmm::vm::{RunReport, Vm};

const MIB: u64 = 1 << 20;

fn zero_slot(gpa: u64, size: u64) -> NewSlot {
    NewSlot {
        gpa,
        size,
        source: PageSource::Zero,
        source_offset: 0,
        block_size: None,
    }
}

/// A small deterministic generator (xorshift64*), seeded per test so a
/// failure can be replayed; the seed is printed.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Self {
        eprintln!("seed {seed:#x}");
        Rng(seed | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `rounds=` for a guest that runs until the test stops it.
const UNTIL_STOPPED: u64 = 1 << 40;

/// Round lines the guest printed so far (each one a whole round checked).
fn rounds_printed(out: &common::inproc::Output) -> usize {
    round_lines(&text(out)).count()
}

/// The guest's round reports, whole: a line still being written when the
/// console is read (no `bad=` yet) is not one.
fn round_lines(out: &str) -> impl Iterator<Item = &str> {
    lines(out, "memstress round=").filter(|l| l.contains(" bad="))
}

/// `modes` (what this host runs) named in the CI log, per test: a host
/// without `vcpu` mode passes on fewer cases, and says so
/// (`demand_modes()` says why).
fn say_modes(modes: &[FaultMode]) {
    let names: Vec<&str> = modes.iter().map(|m| m.name()).collect();
    say(&format!("fault modes run: {names:?}"));
}

fn seed() -> u64 {
    std::env::var("VMM_STRESS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_0ffa_17a5)
}

/// I4: each fault served on a vCPU ended as exactly one of: speculative
/// install, slow-path install, already present.
fn assert_faults_accounted(s: &FaultSnapshot) {
    assert_eq!(
        s.faults(),
        s[ThreadStat::SpeculativeInstalls]
            + s[ThreadStat::SlowPathInstalls]
            + s[ThreadStat::AlreadyPresent],
        "faults not all accounted for: {s:?}"
    );
    assert_eq!(
        s.latency.count,
        s.faults(),
        "latency histogram count != faults"
    );
}

/// (a) vCPUs write and verify patterns while a host thread adds and removes
/// another memslot as fast as it can: retries occur and are counted, and the
/// guest finds every write it made (mode 2 counts a zero as lost). RAM is
/// image-backed so that each fault reads its page before the trylock, as a
/// snapshot restore would: that is the window a racing change falls into.
/// The churn is under way before the guest's first instruction and stops
/// after its last, so every fault of the run can meet a change however fast
/// the host runs the guest.
#[test]
fn writes_survive_memslot_churn() {
    let mut rng = Rng::new(seed());
    let img = image_file("churn", 128 * MIB);
    let (mut c, out) = config(
        "memstress",
        2,
        128 * MIB,
        "mode=2 rounds=2 bytes=96M stride=4096",
        host_mode(),
    );
    c.mem_source = Some(img.clone());
    // One page per fault (no fault-around): every fault reads the image
    // before its trylock, the window a racing change falls into.
    c.fault_around = 1;
    let vm = Vm::new(c).unwrap();
    let mem = vm.memory().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let changes = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, changes, mem) = (stop.clone(), changes.clone(), mem.clone());
        let gpa = 2 * 1024 * MIB + (rng.next() % 64) * 2 * MIB;
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                mem.add_slot(zero_slot(gpa, 2 * MIB)).unwrap();
                mem.remove_slot(gpa).unwrap();
                changes.fetch_add(2, Ordering::Relaxed);
            }
        })
    };
    wait_for("the churn thread to start", Duration::from_secs(60), || {
        changes.load(Ordering::Relaxed) >= 2
    });
    let before = mem.stats()[MemStat::Changes];
    let report = vm.run().unwrap();
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let _ = std::fs::remove_file(&img);
    let out = text(&out);
    assert_eq!(report.reason, ExitReason::GuestStatus(0), "{out}");
    assert_eq!(field(&out, "memstress: done", "bad"), Some(0), "{out}");
    let t = report.total();
    assert!(t.faults() >= 24_000, "too few faults: {t:?}");
    // Changes counted while the guest ran (the report is taken at its end);
    // the churn thread ran on after it: at most as many.
    let during = report.memory[MemStat::Changes] - before;
    assert!(during > 0, "no memslot change while the guest ran");
    assert!(report.memory[MemStat::Changes] <= changes.load(Ordering::Relaxed));
    assert!(
        t[ThreadStat::Retries] > 0,
        "no retries counted with {during} memslot changes while the guest faulted"
    );
    for v in &report.vcpus {
        assert_faults_accounted(v);
    }
    say(&format!(
        "faults {} retries {} slow {} memslot changes while the guest ran {during}",
        t.faults(),
        t[ThreadStat::Retries],
        t[ThreadStat::SlowPathInstalls],
    ));
}

/// (b) A hot-plugged slot is removed while vCPUs fault on it: after the
/// removal returns not one page of that slot is resident, then or at the
/// end of the run (I1), and the guest, whose memory vanished, runs on (its
/// writes there go nowhere, its reads get the bus's all-ones) until the test
/// stops it: the VMM does not fail.
///
/// The guest never ends by itself, so the removal falls inside its run
/// whatever the host's speed: each round writes the slot, the marker hook
/// discards all of it, and the check faults every page in again, round
/// after round. The test removes the slot while a pass is part way through
/// it (some pages resident, not all), waits for a whole round begun after
/// the removal, and stops the VM.
#[test]
fn nothing_installed_after_slot_removal() {
    let base = 1024 * MIB;
    let bytes = 128 * MIB;
    let pages = bytes / 4096;
    let cmd = format!(
        "mode=0 rounds={UNTIL_STOPPED} base={base} bytes={bytes} stride=4096 memtop={}",
        base + bytes
    );
    let (c, out) = config("memstress", 2, 64 * MIB, &cmd, host_mode());
    let vm = Vm::new(c).unwrap();
    let mem = vm.memory().clone();
    mem.add_slot(zero_slot(base, bytes)).unwrap();
    let slot = mem.snapshot().lookup(base).unwrap().clone();
    let (hva, size) = (slot.backing.hva(), slot.size);
    {
        // After the removal the range is a hole: nothing to discard.
        let mem = mem.clone();
        vm.on_marker(Box::new(move |_| {
            mem.discard(base, bytes).unwrap();
        }));
    }
    let remover = {
        let (control, out) = (vm.control().clone(), out.clone());
        std::thread::spawn(move || {
            let _end = StopOnDrop(control);
            let mut seen = 0;
            wait_for(
                "the vCPUs part way through the slot",
                Duration::from_secs(600),
                || {
                    seen = resident_pages(hva, size);
                    (2000..pages).contains(&seen)
                },
            );
            let done_before = rounds_printed(&out);
            mem.remove_slot(base).unwrap();
            // The removal dropped the slot's pages; none may come back.
            let at_removal = resident_pages(hva, size);
            // The round under way may have begun before the removal; the
            // next one did not.
            let under_way = rounds_printed(&out);
            wait_for(
                "a whole round after the removal",
                Duration::from_secs(600),
                || rounds_printed(&out) >= under_way + 2,
            );
            (seen, done_before, at_removal, under_way)
        })
    };
    let report = vm.run().unwrap();
    let (seen, done_before, at_removal, under_way) = remover.join().unwrap();
    // Every fault of the run is over: whatever raced the removal is done.
    let at_end = resident_pages(hva, size);
    let out = text(&out);
    assert_eq!(report.reason, ExitReason::Stopped, "{out}");
    assert_eq!(
        (at_removal, at_end),
        (0, 0),
        "pages resident in a removed slot (I1): right after the removal, at the end"
    );
    let rounds: Vec<&str> = round_lines(&out).collect();
    let key = |l: &str, k| field(l, "memstress round=", k).unwrap();
    for l in &rounds[..done_before] {
        assert_eq!(key(l, "bad"), 0, "a round before the removal: {l}");
    }
    // The guest saw its memory disappear: nothing it wrote there stayed.
    let after = rounds[under_way + 1];
    assert_eq!(
        key(after, "pattern"),
        0,
        "a round after the removal: {after}"
    );
    assert!(key(after, "bad") > 0, "a round after the removal: {after}");
    say(&format!(
        "removed with {seen} of {pages} pages resident, after {done_before} whole rounds"
    ));
    drop(slot);
}

/// (c) Discards at a known point: between the write and verify phases of
/// each round the marker hook discards a random set of pages; the guest must
/// then read exactly that many zero words and no stale or foreign value (I3).
#[test]
fn discarded_pages_read_back_as_zero() {
    let mut rng = Rng::new(seed() ^ 0xc);
    let base = 16 * MIB;
    let bytes = 32 * MIB;
    let rounds = 4;
    let cmd = format!("mode=0 rounds={rounds} base={base} bytes={bytes} stride=4096");
    let (c, out) = config("memstress", 2, 128 * MIB, &cmd, host_mode());
    let vm = Vm::new(c).unwrap();
    let mem = vm.memory().clone();
    let expected = Arc::new(Mutex::new(Vec::new()));
    let exp = expected.clone();
    let pages = bytes / 4096;
    let mut seed = rng.next();
    vm.on_marker(Box::new(move |_round| {
        let mut picked = std::collections::BTreeSet::new();
        let mut r = Rng(seed | 1);
        for _ in 0..pages / 10 {
            picked.insert(r.next() % pages);
        }
        seed = r.next();
        for p in &picked {
            mem.discard(base + p * 4096, 4096).unwrap();
        }
        exp.lock().unwrap().push(picked.len() as u64);
    }));
    let report = vm.run().unwrap();
    let out = text(&out);
    assert_eq!(report.reason, ExitReason::GuestStatus(0), "{out}");
    let expected = expected.lock().unwrap().clone();
    assert_eq!(expected.len(), rounds);
    for (i, line) in lines(&out, "memstress round=").enumerate() {
        let zero = field(line, "memstress round=", "zero").unwrap();
        let bad = field(line, "memstress round=", "bad").unwrap();
        assert_eq!(bad, 0, "{line}");
        assert_eq!(
            zero,
            expected[i],
            "round {}: zero words != pages discarded: {line}",
            i + 1
        );
    }
    assert_eq!(
        report.memory[MemStat::DiscardedPages],
        expected.iter().sum::<u64>()
    );
    for v in &report.vcpus {
        assert_faults_accounted(v);
    }
}

/// (c') Discards racing with faults: a host thread discards random pages
/// while the guest writes and verifies round after round; every word reads
/// as the pattern or zero, never anything else, and faults keep being
/// served. The guest runs until the test has counted 100 discards made
/// after its first whole round and two more rounds checked: the discards
/// fall inside its run, however fast the host runs it.
#[test]
fn discards_racing_with_faults() {
    let mut rng = Rng::new(seed() ^ 0xd);
    let base = 16 * MIB;
    let bytes = 48 * MIB;
    let cmd = format!("mode=0 rounds={UNTIL_STOPPED} base={base} bytes={bytes} stride=4096");
    let (c, out) = config("memstress", 2, 128 * MIB, &cmd, host_mode());
    let vm = Vm::new(c).unwrap();
    let mem = vm.memory().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let discards = Arc::new(AtomicU64::new(0));
    let discarder = {
        let (stop, discards) = (stop.clone(), discards.clone());
        let mut r = Rng(rng.next() | 1);
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let page = r.next() % (bytes / 4096 - 16);
                let len = (1 + r.next() % 16) * 4096;
                mem.discard(base + page * 4096, len).unwrap();
                discards.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let watcher = {
        let (control, out, discards) = (vm.control().clone(), out.clone(), discards.clone());
        std::thread::spawn(move || {
            let _end = StopOnDrop(control);
            wait_for("the guest's first round", Duration::from_secs(600), || {
                rounds_printed(&out) >= 1
            });
            let (r0, d0) = (rounds_printed(&out), discards.load(Ordering::Relaxed));
            wait_for(
                "100 discards and two rounds more",
                Duration::from_secs(600),
                || rounds_printed(&out) >= r0 + 2 && discards.load(Ordering::Relaxed) >= d0 + 100,
            );
            discards.load(Ordering::Relaxed) - d0
        })
    };
    let report = vm.run().unwrap();
    stop.store(true, Ordering::Relaxed);
    discarder.join().unwrap();
    let raced = watcher.join().unwrap();
    let out = text(&out);
    assert_eq!(report.reason, ExitReason::Stopped, "{out}");
    let rounds: Vec<&str> = lines(&out, "memstress round=").collect();
    assert!(rounds.len() >= 3, "{out}");
    let mut zero = 0;
    for line in &rounds {
        assert_eq!(field(line, "memstress round=", "bad"), Some(0), "{line}");
        zero += field(line, "memstress round=", "zero").unwrap();
    }
    let t = report.total();
    assert!(t.faults() > 12_000, "{t:?}");
    for v in &report.vcpus {
        assert_faults_accounted(v);
    }
    say(&format!(
        "{} rounds, {raced} discards after the first, {zero} words read zero",
        rounds.len()
    ));
}

fn image_run(mode: FaultMode) -> (RunReport, String, u64) {
    let mem_size = 64 * MIB;
    let img = image_file(mode.name(), mem_size);
    let base = 16 * MIB;
    let bytes = 32 * MIB;
    let cmd = format!("mode=1 base={base} bytes={bytes} stride=512");
    let (mut c, out) = config("memstress", 2, mem_size, &cmd, mode);
    c.mem_source = Some(img.clone());
    let vm = Vm::new(c).unwrap();
    let mem = vm.memory().clone();
    let discarded = Arc::new(AtomicU64::new(0));
    let d = discarded.clone();
    vm.on_marker(Box::new(move |_| {
        for p in (0..bytes / 4096).step_by(5) {
            mem.discard(base + p * 4096, 4096).unwrap();
            d.fetch_add(1, Ordering::Relaxed);
        }
    }));
    let report = vm.run().unwrap();
    let _ = std::fs::remove_file(&img);
    (report, text(&out), discarded.load(Ordering::Relaxed))
}

/// (d) Image-backed memory: every word the guest reads equals the file's
/// content; after a discard those pages read zero, never image content (I3).
#[test]
fn image_backed_memory_matches_the_file() {
    let modes = demand_modes();
    say_modes(&modes);
    for mode in modes {
        let (report, out, discarded) = image_run(mode);
        assert_eq!(
            report.reason,
            ExitReason::GuestStatus(0),
            "{}: {out}",
            mode.name()
        );
        let words_per_page = 4096 / 512;
        let p1 = "memstress image pass=1";
        let p2 = "memstress image pass=2";
        assert_eq!(field(&out, p1, "bad"), Some(0), "{out}");
        assert_eq!(field(&out, p1, "zero"), Some(0), "{out}");
        assert_eq!(field(&out, p2, "bad"), Some(0), "{out}");
        assert_eq!(
            field(&out, p2, "zero"),
            Some(discarded * words_per_page),
            "{out}"
        );
        let t = report.total();
        assert!(
            t[ThreadStat::SourceBytes] >= 32 * MIB,
            "{}: read {} bytes from the image",
            mode.name(),
            t[ThreadStat::SourceBytes]
        );
    }
}

/// A memory image truncated under the running VM: the fault that cannot
/// read its page stops the VM with an error naming the file; no hang.
#[test]
fn truncated_image_is_a_clear_error() {
    let mem_size = 64 * MIB;
    let img = image_file("trunc", mem_size);
    let (mut c, _out) = config(
        "memstress",
        2,
        mem_size,
        "mode=1 base=16M bytes=32M stride=4096",
        host_mode(),
    );
    c.mem_source = Some(img.clone());
    let vm = Vm::new(c).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&img)
        .unwrap()
        .set_len(20 * MIB)
        .unwrap();
    let report = vm.run().unwrap();
    let _ = std::fs::remove_file(&img);
    let m = report.reason.to_string();
    assert_eq!(report.reason.status(), 1, "{m}");
    assert!(
        m.contains("truncated") && m.contains("vmm-img-trunc"),
        "{m}"
    );
}

/// Each fault mode boots `touch` with 2 vCPUs and passes; the modes that
/// populate on demand see faults, prefault sees none.
#[test]
fn every_fault_mode_runs_touch() {
    let modes = all_modes();
    say_modes(&modes);
    for mode in modes {
        let (c, out) = config("touch", 2, 128 * MIB, "bytes=4M stride=64", mode);
        let report = Vm::new(c).unwrap().run().unwrap();
        let out = text(&out);
        assert_eq!(
            report.reason,
            ExitReason::GuestStatus(0),
            "{}: {out}",
            mode.name()
        );
        assert!(out.contains("touch: OK"), "{}: {out}", mode.name());
        let t = report.total();
        match mode {
            // 4 MiB touched: 1024 pages installed, by fewer faults where
            // fault-around covers the sequential stream.
            FaultMode::Vcpu | FaultMode::Handler => {
                assert!(t.faults() > 0, "{}: {t:?}", mode.name());
                assert!(
                    t[ThreadStat::PagesInstalled] >= 1024,
                    "{}: {t:?}",
                    mode.name()
                );
            }
            _ => assert_eq!(t.faults(), 0),
        }
        if mode == FaultMode::Prefault {
            assert_eq!(report.memory[MemStat::ResidentPages], 128 * MIB / 4096);
        }
    }
}
