//! Seeded stress tests of the fault engine on real KVM, checking the
//! fault-path invariants (docs/FAULT-PATH.md) while memslots change under
//! running vCPUs:
//! I1 nothing installed into a slot after its removal began; I2 no guest
//! write lost; I3 discarded pages refault as zero; I4 every fault ends
//! installed or already present.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::image_file;
use common::inproc::{all_modes, config, demand_modes, field, host_mode, lines, text};
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
    let report = vm.run().unwrap();
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let _ = std::fs::remove_file(&img);
    let out = text(&out);
    assert_eq!(report.reason, ExitReason::GuestStatus(0), "{out}");
    assert_eq!(field(&out, "memstress: done", "bad"), Some(0), "{out}");
    let t = report.total();
    assert!(t.faults() >= 24_000, "too few faults: {t:?}");
    // The churn thread ran on after the report was taken: at most as many.
    assert!(
        report.memory[MemStat::Changes] >= 100,
        "churn made too few changes"
    );
    assert!(report.memory[MemStat::Changes] <= changes.load(Ordering::Relaxed));
    assert!(
        t[ThreadStat::Retries] > 0,
        "no retries counted with {} memslot changes",
        report.memory[MemStat::Changes]
    );
    assert!(
        t[ThreadStat::SlowPathInstalls] + t[ThreadStat::AlreadyPresent] > 0
            || t[ThreadStat::Retries] > 0
    );
    for v in &report.vcpus {
        assert_faults_accounted(v);
    }
    eprintln!(
        "faults {} retries {} slow {} changes {}",
        t.faults(),
        t[ThreadStat::Retries],
        t[ThreadStat::SlowPathInstalls],
        report.memory[MemStat::Changes]
    );
}

/// (b) A hot-plugged slot is removed while vCPUs fault on it: after the
/// removal returns, not one more page of that slot becomes resident, and the
/// guest (whose memory vanished) ends cleanly rather than the VMM.
#[test]
fn nothing_installed_after_slot_removal() {
    let base = 1024 * MIB;
    let bytes = 128 * MIB;
    let cmd = format!(
        "mode=0 rounds=1 base={base} bytes={bytes} stride=4096 memtop={}",
        base + bytes
    );
    let (c, out) = config("memstress", 2, 64 * MIB, &cmd, host_mode());
    let vm = Vm::new(c).unwrap();
    let mem = vm.memory().clone();
    mem.add_slot(zero_slot(base, bytes)).unwrap();
    let slot = mem.snapshot().lookup(base).unwrap().clone();
    let (hva, size) = (slot.backing.hva(), slot.size);
    let seen = Arc::new(Mutex::new((0u64, 0u64, 0u64)));
    let remover = {
        let seen = seen.clone();
        std::thread::spawn(move || {
            // Wait until the guest is faulting on the slot, then pull it.
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut before = 0;
            while before < 2000 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
                before = resident_pages(hva, size);
            }
            mem.remove_slot(base).unwrap();
            // The removal dropped the slot's pages; none may come back.
            let at_removal = resident_pages(hva, size);
            std::thread::sleep(Duration::from_millis(300));
            let later = resident_pages(hva, size);
            *seen.lock().unwrap() = (before, at_removal, later);
        })
    };
    let report = vm.run().unwrap();
    remover.join().unwrap();
    let (before, at_removal, later) = *seen.lock().unwrap();
    let out = text(&out);
    assert!(
        before >= 2000,
        "removal did not happen mid-run ({before} pages)"
    );
    assert!(
        before < size / 4096,
        "the guest finished before the removal"
    );
    assert_eq!(
        (at_removal, later),
        (0, 0),
        "pages resident in a removed slot (I1)"
    );
    // The guest saw its memory disappear: it reports bad words and exits 1.
    assert_eq!(report.reason, ExitReason::GuestStatus(1), "{out}");
    assert!(field(&out, "memstress: done", "bad").unwrap() > 0, "{out}");
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
/// while the guest writes and verifies; every word reads as the pattern or
/// zero, never anything else, and faults keep being served.
#[test]
fn discards_racing_with_faults() {
    let mut rng = Rng::new(seed() ^ 0xd);
    let base = 16 * MIB;
    let bytes = 48 * MIB;
    let cmd = format!("mode=0 rounds=6 base={base} bytes={bytes} stride=4096");
    let (c, out) = config("memstress", 2, 128 * MIB, &cmd, host_mode());
    let vm = Vm::new(c).unwrap();
    let mem = vm.memory().clone();
    let stop = Arc::new(AtomicBool::new(false));
    let discarder = {
        let stop = stop.clone();
        let mut r = Rng(rng.next() | 1);
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let page = r.next() % (bytes / 4096 - 16);
                let len = (1 + r.next() % 16) * 4096;
                mem.discard(base + page * 4096, len).unwrap();
                n += 1;
            }
            n
        })
    };
    let report = vm.run().unwrap();
    stop.store(true, Ordering::Relaxed);
    let discards = discarder.join().unwrap();
    let out = text(&out);
    assert_eq!(report.reason, ExitReason::GuestStatus(0), "{out}");
    for line in lines(&out, "memstress round=") {
        assert_eq!(field(line, "memstress round=", "bad"), Some(0), "{line}");
    }
    assert!(discards > 100, "only {discards} discards");
    let t = report.total();
    assert!(t.faults() > 12_000, "{t:?}");
    for v in &report.vcpus {
        assert_faults_accounted(v);
    }
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
    for mode in demand_modes() {
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
    for mode in all_modes() {
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
