//! Loom models of the install protocol: the production driver
//! ([`crate::resolve`]) and the production slot/table code, with a model
//! page table as the installer.
//!
//! `RUSTFLAGS="--cfg loom" cargo test --release -p memslots -- --test-threads=1`
//!
//! Each slot is one page. Its host state is one word (`Fake::host`) holding
//! the page's content, the guest writes completed into it, and the marks a
//! remover, discarder or unplugger leaves when its work is done. Every host
//! event is an unconditional read-modify-write of that word with `Relaxed`
//! ordering: RMWs always read the latest value, so the word's modification
//! order is exactly the order in which the host saw the events (an install
//! after a removal is seen as such, never hidden by a stale read), and
//! `Relaxed` adds no happens-before edge the protocol does not provide.
//!
//! Negative controls plant a defect in the *installer* or the *writer* and
//! run the same driver: each must be caught. Removing a check from the
//! driver itself fails the positive models (`scripts/mutants.sh` does it).
//!
//! Limitation: under loom, `Published` is a mutex, so a snapshot also orders
//! the writer after the reader, which `arc-swap` does not.

use std::sync::atomic::AtomicUsize as Count;

use loom::sync::atomic::AtomicUsize;
use loom::thread;

use crate::sync::{Arc, Ordering};
use crate::{
    resolve, Bail, Content, Install, InstallGuard, Installer, Memslot, Memslots, Outcome,
    ResolveError, PAGE_SIZE,
};

/// Guest-physical addresses of the one-page slots A and B.
const A: u64 = 0;
const B: u64 = 0x10_0000;

// The host word: content in the low two bits, then writes and marks.
const ABSENT: usize = 0;
const ZERO: usize = 1;
const IMAGE: usize = 2;
const CONTENT: usize = 3;
/// Set by a remover after `begin_removal` returned, guard still held.
const REMOVED: usize = 1 << 2;
/// Set by a discarder together with its zap, guard still held.
const DISCARDED: usize = 1 << 3;
/// Set by a remover once the slot is unpublished, before `begin_removal`.
const UNPUBLISHED: usize = 1 << 4;
/// Guest writes completed by fault 1 and fault 2.
const WRITE_1: usize = 1 << 5;
const WRITE_2: usize = 1 << 6;
const WRITES: usize = WRITE_1 | WRITE_2;
/// Set by an unplugger together with its zap.
const UNPLUGGED: usize = 1 << 7;

/// The host mapping of a one-page slot.
struct Fake {
    host: AtomicUsize,
    /// Touched by installers at the end of `prepare` (just before
    /// `map_trylock`) and by writers just after taking the install lock
    /// exclusively. Loom 0.7 does not make a lock's release a scheduling
    /// point, so without a dependency between the trylock and something
    /// inside the writer's critical section it never explores a trylock that
    /// fails against a held lock (`Bail::Contended`). `Relaxed`: no ordering.
    probe: AtomicUsize,
    /// The slot's source is an image (else zero).
    image: bool,
}

type Slots = Memslots<Fake>;

fn fake(image: bool) -> Fake {
    Fake {
        host: AtomicUsize::new(ABSENT),
        probe: AtomicUsize::new(0),
        image,
    }
}

fn slot(id: u32, gpa: u64) -> Arc<Memslot<Fake>> {
    Arc::new(Memslot::new(id, gpa, PAGE_SIZE, fake(true)))
}

fn zero_slot(id: u32, gpa: u64) -> Arc<Memslot<Fake>> {
    Arc::new(Memslot::new(id, gpa, PAGE_SIZE, fake(false)))
}

/// A one-page slot carved into one one-page block, plugged.
fn plugged_slot(id: u32, gpa: u64) -> Arc<Memslot<Fake>> {
    let s = Memslot::with_blocks(id, gpa, PAGE_SIZE, PAGE_SIZE, fake(false));
    s.plug(0, 1);
    Arc::new(s)
}

fn host_update(s: &Memslot<Fake>, f: impl FnMut(usize) -> usize) -> usize {
    let mut f = f;
    let mut cur = s.backing.host.load(Ordering::Relaxed);
    loop {
        match s
            .backing
            .host
            .compare_exchange(cur, f(cur), Ordering::Relaxed, Ordering::Relaxed)
        {
            Ok(prev) => return prev,
            Err(now) => cur = now,
        }
    }
}

/// See `Fake::probe`.
fn poke(s: &Memslot<Fake>) {
    s.backing.probe.fetch_add(1, Ordering::Relaxed);
}

/// Host state once every thread is joined (joins order the reads).
fn host(s: &Memslot<Fake>) -> usize {
    s.backing.host.load(Ordering::Relaxed)
}

/// A defect planted in the installer, for the negative controls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Defect {
    None,
    /// Install what was prepared, ignoring the driver's I3 re-check.
    SkipI3Recheck,
    /// Install during `prepare`, holding no lock (no trylock at all).
    InstallWithoutTrylock,
    /// Replace a page that is already present (loses completed writes).
    Overwrite,
}

/// The model installer: one fault, with the write it completes.
struct ModelInstaller {
    /// Write bits this fault's access completes (0 for a read/fetch).
    writes: usize,
    defect: Defect,
    prepared_image: bool,
    /// The driver turned prepared image content into zero (I3 re-check).
    rechecked: bool,
    /// The install landed after the slot was unpublished (its remover then
    /// waits for this installer's guard in `begin_removal`).
    during_removal: bool,
    /// Why the speculative attempt bailed, as the driver reported it.
    bail: Option<Bail>,
    /// `prepare` calls (2 or more: the slow path ran).
    prepares: u32,
}

impl ModelInstaller {
    fn new(writes: usize) -> Self {
        Self::with_defect(writes, Defect::None)
    }

    fn with_defect(writes: usize, defect: Defect) -> Self {
        Self {
            writes,
            defect,
            prepared_image: false,
            rechecked: false,
            during_removal: false,
            bail: None,
            prepares: 0,
        }
    }

    /// Install into the host word, checking I1, I3 and I6 as the host sees
    /// them. `replace` models an install that ignores `EEXIST`.
    fn put(&mut self, s: &Memslot<Fake>, image: bool, replace: bool) -> Install {
        let bits = if image { IMAGE } else { ZERO };
        let prev = host_update(s, |w| {
            if w & CONTENT == ABSENT {
                w | bits
            } else if replace {
                (w & !(CONTENT | WRITES)) | bits
            } else {
                w
            }
        });
        assert!(
            prev & REMOVED == 0,
            "I1 violated: install into slot {} after its removal completed",
            s.id
        );
        assert!(
            prev & UNPLUGGED == 0,
            "I6 violated: install into slot {} after its block was unplugged",
            s.id
        );
        self.during_removal = prev & UNPUBLISHED != 0;
        if prev & CONTENT != ABSENT && !replace {
            return Install::Exists;
        }
        assert!(
            !(image && prev & DISCARDED != 0),
            "I3 violated: image content installed into slot {} after the discard completed",
            s.id
        );
        Install::Done
    }
}

impl Installer<Fake> for ModelInstaller {
    type Prepared = ();
    type Error = std::convert::Infallible;

    /// Step 3, no lock held: image content unless the page was discarded.
    fn prepare(&mut self, s: &Memslot<Fake>, page: u64) -> Result<Content<()>, Self::Error> {
        self.prepares += 1;
        self.prepared_image = s.backing.image && !s.is_discarded(s.page_index(page));
        if self.defect == Defect::InstallWithoutTrylock {
            self.put(s, self.prepared_image, false);
        }
        poke(s);
        Ok(if self.prepared_image {
            Content::Source(())
        } else {
            Content::Zero
        })
    }

    fn install(
        &mut self,
        s: &Memslot<Fake>,
        _page: u64,
        content: Content<()>,
        _guard: &InstallGuard<'_>,
    ) -> Result<Install, Self::Error> {
        let mut image = content == Content::Source(());
        self.rechecked = self.prepared_image && !image;
        if self.defect == Defect::SkipI3Recheck {
            image = self.prepared_image;
        }
        Ok(self.put(s, image, self.defect == Defect::Overwrite))
    }

    fn bailed(&mut self, bail: Bail) {
        self.bail = Some(bail);
    }

    fn complete(&mut self, s: &Memslot<Fake>, _guard: &InstallGuard<'_>) {
        let writes = self.writes;
        let prev = host_update(s, |w| w | writes);
        assert!(
            prev & CONTENT != ABSENT,
            "I2/I4 violated: access completed against a missing page of slot {}",
            s.id
        );
    }
}

/// One fault as the VMM serves it: the production driver.
#[derive(Debug)]
struct Fault {
    result: Result<crate::Resolution, ResolveError<std::convert::Infallible>>,
    rechecked: bool,
    during_removal: bool,
    bail: Option<Bail>,
    prepares: u32,
}

impl Fault {
    fn outcome(&self) -> Option<Outcome> {
        self.result.as_ref().ok().map(|r| r.outcome)
    }
    fn bail(&self) -> Option<Bail> {
        self.bail
    }
}

fn fault_with(m: &Slots, gpa: u64, mut i: ModelInstaller) -> Fault {
    let result = resolve(m, gpa, &mut i);
    if let Ok(r) = &result {
        assert_eq!(r.bail, i.bail, "the driver reports the bail it announced");
    }
    Fault {
        result,
        rechecked: i.rechecked,
        during_removal: i.during_removal,
        bail: i.bail,
        prepares: i.prepares,
    }
}

fn fault(m: &Slots, gpa: u64) -> Fault {
    fault_with(m, gpa, ModelInstaller::new(0))
}

/// One fault on slot `a` (at `A`) by `installer`, racing `writer` on the
/// main thread; returns the fault once both are done.
fn race(
    a: &Arc<Memslot<Fake>>,
    installer: ModelInstaller,
    writer: impl FnOnce(&Slots, &Memslot<Fake>),
) -> Fault {
    let m = Arc::new(Memslots::new(vec![a.clone()]));
    let t = {
        let m = m.clone();
        thread::spawn(move || fault_with(&m, A, installer))
    };
    writer(&m, a);
    t.join().unwrap()
}

/// `MemoryManager::remove_slot`, with the "removal complete" mark where it
/// would tell KVM and unregister the range.
fn remove(m: &Slots, gpa: u64) {
    let locked = m.lock_slots();
    let s = locked.unpublish(gpa).expect("slot to remove is published");
    host_update(&s, |w| w | UNPUBLISHED);
    let exclusive = s.begin_removal();
    poke(&s);
    host_update(&s, |w| w | REMOVED);
    drop(exclusive);
    drop(locked);
}

/// `MemoryManager::add_slot` of an unrelated slot.
fn add(m: &Slots, s: Arc<Memslot<Fake>>) {
    let locked = m.lock_slots();
    locked.publish_added(s);
    drop(locked);
}

/// `MemoryManager::discard` of one page: mark, zap, with the guard held.
fn discard(s: &Memslot<Fake>) {
    let exclusive = s.begin_discard(0, 1);
    poke(s);
    host_update(s, |w| (w & !(CONTENT | WRITES)) | DISCARDED);
    drop(exclusive);
}

/// The virtio-mem unplug of the slot's one block: clear the plugged bit,
/// zap, with the guard held.
fn unplug(s: &Memslot<Fake>) {
    let exclusive = s.begin_unplug(0, 1);
    poke(s);
    host_update(s, |w| (w & !(CONTENT | WRITES)) | UNPLUGGED);
    drop(exclusive);
}

/// Explore every interleaving with at most `preemption_bound` preemptions
/// (`None`: all of them); print how many there were (`--nocapture`).
fn check(name: &str, preemption_bound: Option<usize>, f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    // LOOM_MAX_PREEMPTIONS in the environment wins.
    if b.preemption_bound.is_none() {
        b.preemption_bound = preemption_bound;
    }
    let runs = std::sync::Arc::new(Count::new(0));
    let counted = runs.clone();
    let started = std::time::Instant::now();
    b.check(move || {
        bump(&counted);
        f()
    });
    eprintln!(
        "{name}: {} interleavings in {:?} (preemption bound {:?})",
        seen(&runs),
        started.elapsed(),
        b.preemption_bound
    );
}

fn bump(c: &Count) {
    c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

fn seen(c: &Count) -> usize {
    c.load(std::sync::atomic::Ordering::Relaxed)
}

/// I1 and I4: an installer on slot A races the removal of A.
#[test]
fn i1_no_install_after_removal() {
    static INSTALLED: Count = Count::new(0);
    static NOT_RAM_AFTER_RETRY: Count = Count::new(0);
    static NOT_RAM_AT_ONCE: Count = Count::new(0);
    static BAILS: [Count; 3] = [Count::new(0), Count::new(0), Count::new(0)];
    static DURING_REMOVAL: Count = Count::new(0);
    check("i1_no_install_after_removal", None, || {
        let a = slot(0, A);
        let f = race(&a, ModelInstaller::new(0), |m, _| remove(m, A));
        match &f.result {
            Ok(r) if r.outcome == Outcome::Installed => {
                assert_eq!(host(&a) & CONTENT, IMAGE);
                bump(&INSTALLED);
            }
            // The snapshot already missed A: nothing prepared.
            Err(ResolveError::NotRam { .. }) if f.prepares == 0 => bump(&NOT_RAM_AT_ONCE),
            // The speculative attempt bailed and the retry found A gone.
            Err(ResolveError::NotRam { .. }) if f.bail.is_some() => {
                assert_eq!(host(&a) & CONTENT, ABSENT);
                bump(&NOT_RAM_AFTER_RETRY)
            }
            o => panic!("I4: unexpected fault outcome {o:?} ({f:?})"),
        }
        if let Some(bail) = f.bail() {
            bump(&BAILS[bail as usize]);
        }
        if f.during_removal {
            bump(&DURING_REMOVAL);
        }
    });
    // Every ending was reached, so the model is not vacuous.
    assert!(seen(&INSTALLED) > 0);
    assert!(seen(&NOT_RAM_AFTER_RETRY) > 0);
    assert!(seen(&NOT_RAM_AT_ONCE) > 0);
    // The remover was met holding the install lock, and after it.
    assert!(seen(&BAILS[Bail::Contended as usize]) > 0);
    assert!(seen(&BAILS[Bail::SlotInvalid as usize]) > 0);
    // An installer held its guard while the remover waited for it.
    assert!(seen(&DURING_REMOVAL) > 0);
    eprintln!(
        "  installs while the removal was under way: {}; bails: generation {}, invalid {}, contended {}",
        seen(&DURING_REMOVAL),
        seen(&BAILS[0]),
        seen(&BAILS[1]),
        seen(&BAILS[2])
    );
}

/// I4: an installer on slot A races the hotplug of an unrelated slot B; a
/// stale generation makes it retry, and the retry always installs.
#[test]
fn generation_change_retries_and_installs() {
    static RETRIES: Count = Count::new(0);
    static GENERATION_BAILS: Count = Count::new(0);
    check("generation_change_retries_and_installs", None, || {
        let m = Arc::new(Memslots::new(vec![slot(0, A)]));
        let installer = {
            let m = m.clone();
            thread::spawn(move || fault(&m, A))
        };
        add(&m, slot(1, B));
        let f = installer.join().unwrap();
        assert_eq!(
            f.outcome(),
            Some(Outcome::Installed),
            "I4: fault lost ({f:?})"
        );
        let snap = m.snapshot();
        assert_eq!(host(snap.lookup(A).unwrap()) & CONTENT, IMAGE);
        assert_eq!(host(snap.lookup(B).unwrap()), ABSENT);
        if let Some(bail) = f.bail() {
            bump(&RETRIES);
            if bail == Bail::GenerationChanged {
                bump(&GENERATION_BAILS);
            }
        }
    });
    assert!(
        seen(&RETRIES) > 0,
        "no interleaving made the installer retry"
    );
    assert!(seen(&GENERATION_BAILS) > 0);
}

/// I3: an installer on an image-backed page races a discard of that page.
/// Whatever the order, the page never ends up holding image content: an
/// image installed before the discard is zapped by it, and an install after
/// it installs zero.
#[test]
fn i3_discarded_page_refaults_as_zero() {
    static IMAGE_THEN_ZAPPED: Count = Count::new(0);
    static ZERO_AFTER_DISCARD: Count = Count::new(0);
    static RECHECK_SWITCHED: Count = Count::new(0);
    static CONTENDED: Count = Count::new(0);
    check("i3_discarded_page_refaults_as_zero", None, || {
        let a = slot(0, A);
        let f = race(&a, ModelInstaller::new(0), |_, a| discard(a));
        let w = host(&a);
        assert!(a.is_discarded(0));
        assert_ne!(
            w & CONTENT,
            IMAGE,
            "I3: image content survived the discard ({f:?})"
        );
        assert_eq!(f.outcome(), Some(Outcome::Installed), "I4: {f:?}");
        match w & CONTENT {
            ABSENT => bump(&IMAGE_THEN_ZAPPED),
            ZERO => bump(&ZERO_AFTER_DISCARD),
            _ => unreachable!(),
        }
        if f.rechecked {
            bump(&RECHECK_SWITCHED);
        }
        if f.bail() == Some(Bail::Contended) {
            bump(&CONTENDED);
        }
    });
    assert!(seen(&IMAGE_THEN_ZAPPED) > 0);
    assert!(seen(&ZERO_AFTER_DISCARD) > 0);
    // The window between prepare and the lock was exercised (the driver's
    // re-check switched content), and the installer met the discarder
    // holding the lock (then waited for it in `map_lock`).
    assert!(seen(&RECHECK_SWITCHED) > 0);
    assert!(seen(&CONTENDED) > 0);
}

/// I2 and I4: two faults on the same page, each completing a guest write,
/// while slot B is hotplugged: exactly one installs, the other finds the
/// page present, and both writes are in the page.
#[test]
fn i2_two_writers_one_install_no_lost_write() {
    static RETRIES: Count = Count::new(0);
    check("i2_two_writers_one_install_no_lost_write", Some(3), || {
        let a = zero_slot(0, A);
        let m = Arc::new(Memslots::new(vec![a.clone()]));
        let writers: Vec<_> = [WRITE_1, WRITE_2]
            .into_iter()
            .map(|w| {
                let m = m.clone();
                thread::spawn(move || fault_with(&m, A, ModelInstaller::new(w)))
            })
            .collect();
        add(&m, slot(1, B));
        let faults: Vec<Fault> = writers.into_iter().map(|t| t.join().unwrap()).collect();
        let installed = faults
            .iter()
            .filter(|f| f.outcome() == Some(Outcome::Installed))
            .count();
        let present = faults
            .iter()
            .filter(|f| f.outcome() == Some(Outcome::AlreadyPresent))
            .count();
        assert_eq!((installed, present), (1, 1), "I4: {faults:?}");
        assert_eq!(
            host(&a) & (CONTENT | WRITES),
            ZERO | WRITES,
            "I2 violated: a completed write was lost ({faults:?})"
        );
        if faults.iter().any(|f| f.bail().is_some()) {
            bump(&RETRIES);
        }
    });
    assert!(seen(&RETRIES) > 0);
}

/// I6: a fault on a plugged block races the block's unplug: either it
/// installs before the unplug (which then zaps the page) or it is refused;
/// nothing is installed after the unplug.
#[test]
fn i6_no_install_into_an_unplugged_block() {
    static INSTALLED_THEN_ZAPPED: Count = Count::new(0);
    static REFUSED: Count = Count::new(0);
    check("i6_no_install_into_an_unplugged_block", None, || {
        let a = plugged_slot(0, A);
        let f = race(&a, ModelInstaller::new(0), |_, a| unplug(a));
        assert_eq!(host(&a) & CONTENT, ABSENT, "I6: page present after unplug");
        match f.result {
            Ok(r) if r.outcome == Outcome::Installed => bump(&INSTALLED_THEN_ZAPPED),
            Err(ResolveError::NotPlugged { .. }) => bump(&REFUSED),
            o => panic!("unexpected outcome {o:?}"),
        }
    });
    assert!(seen(&INSTALLED_THEN_ZAPPED) > 0);
    assert!(seen(&REFUSED) > 0);
}

// ---- negative controls: each planted defect must be caught ----

/// An installer that installs without the trylock (in `prepare`, no lock
/// held) is caught installing after the removal completed.
#[test]
#[should_panic(expected = "I1 violated")]
fn negative_install_without_trylock_breaks_i1() {
    check("negative_install_without_trylock_breaks_i1", None, || {
        let a = slot(0, A);
        let m = Arc::new(Memslots::new(vec![a.clone()]));
        let installer = {
            let m = m.clone();
            thread::spawn(move || {
                fault_with(
                    &m,
                    A,
                    ModelInstaller::with_defect(0, Defect::InstallWithoutTrylock),
                )
            })
        };
        remove(&m, A);
        installer.join().unwrap();
    });
}

/// An installer that ignores the driver's I3 re-check (installs the image it
/// prepared before a discard) is caught.
#[test]
#[should_panic(expected = "I3 violated")]
fn negative_skip_i3_recheck_breaks_i3() {
    check("negative_skip_i3_recheck_breaks_i3", None, || {
        let defective = ModelInstaller::with_defect(0, Defect::SkipI3Recheck);
        race(&slot(0, A), defective, |_, a| discard(a));
    });
}

/// An installer that replaces a present page (ignores `EEXIST`) loses the
/// other fault's completed write: the I2 model carries write data and
/// catches it.
#[test]
#[should_panic(expected = "I2 violated")]
fn negative_overwriting_install_loses_a_write() {
    check(
        "negative_overwriting_install_loses_a_write",
        Some(3),
        || {
            let a = zero_slot(0, A);
            let m = Arc::new(Memslots::new(vec![a.clone()]));
            let writers: Vec<_> = [WRITE_1, WRITE_2]
                .into_iter()
                .map(|w| {
                    let m = m.clone();
                    thread::spawn(move || {
                        fault_with(&m, A, ModelInstaller::with_defect(w, Defect::Overwrite))
                    })
                })
                .collect();
            for t in writers {
                t.join().unwrap();
            }
            assert_eq!(
                host(&a) & WRITES,
                WRITES,
                "I2 violated: a completed write was lost"
            );
        },
    );
}

/// An unplug that clears the plugged bit without excluding installers is
/// caught: an installer that passed the I6 check installs after the zap.
#[test]
#[should_panic(expected = "I6 violated")]
fn negative_unguarded_unplug_breaks_i6() {
    check("negative_unguarded_unplug_breaks_i6", None, || {
        race(&plugged_slot(0, A), ModelInstaller::new(0), |_, a| {
            a.unplug_unguarded(0, 1);
            poke(a);
            host_update(a, |w| (w & !(CONTENT | WRITES)) | UNPLUGGED);
        });
    });
}
