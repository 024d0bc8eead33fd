//! The memslot table and its install protocol (DESIGN.md, "The fault path").
//!
//! - Readers (faulting vCPUs) take a lock-free snapshot of the table
//!   ([`Memslots::snapshot`]) and remember its generation.
//! - Before installing a page they call [`Memslot::map_trylock`]: it takes the
//!   slot's install lock *shared* without waiting and re-checks that the
//!   generation is still current and the slot still valid. Any failure is a
//!   RETRY: the caller redoes the fault holding the slots lock
//!   ([`Memslots::lock_slots`]), where no memslot change can race, and uses
//!   [`Memslot::map_lock`], which waits (only per-page discards can hold the
//!   install lock then, and they are short).
//! - Writers (memslot changes) hold the slots lock, mark removed slots
//!   invalid, publish a table with `generation + 1`, then take the removed
//!   slots' install locks *exclusively* ([`Memslot::begin_removal`]): in-flight
//!   installers finish first, later ones fail their trylock. Only then does the
//!   caller tell KVM and unmap.
//! - Per-page discards take one slot's install lock exclusively, mark the pages
//!   discarded (so a page-source slot refaults them as zero) and zap them; they
//!   do not change the generation.
//!
//! This module holds no KVM or mmap state, so loom can model it (see tests).

use crate::sync::{
    Arc, AtomicBool, AtomicU64, Mutex, MutexGuard, Ordering, Published, RwLock, RwLockReadGuard,
    RwLockWriteGuard,
};

pub const PAGE_SIZE: u64 = 4096;

/// Why a speculative install did not get its lock. Each is a RETRY.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bail {
    /// A memslot change committed after the fault took its snapshot.
    GenerationChanged,
    /// The slot's removal has begun.
    SlotInvalid,
    /// A memslot change or a discard holds the slot's install lock.
    Contended,
}

/// A bitmap of pages, set-only, lock-free.
pub struct PageBitmap {
    words: Box<[AtomicU64]>,
}

impl PageBitmap {
    pub fn new(pages: u64) -> Self {
        Self {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    pub fn set(&self, page: u64) {
        self.words[(page / 64) as usize].fetch_or(1 << (page % 64), Ordering::AcqRel);
    }
    pub fn get(&self, page: u64) -> bool {
        self.words[(page / 64) as usize].load(Ordering::Acquire) & (1 << (page % 64)) != 0
    }
    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Relaxed).count_ones()))
            .sum()
    }
}

/// One memslot: a guest-physical range backed by one host mapping.
///
/// `B` is the backing (host mapping and page source); the protocol does not
/// look inside it.
pub struct Memslot<B> {
    /// KVM slot number.
    pub id: u32,
    pub gpa: u64,
    pub size: u64,
    pub backing: B,
    valid: AtomicBool,
    install_lock: RwLock<()>,
    /// Pages discarded since the slot was added: they refault as zero.
    discarded: PageBitmap,
}

/// Held while installing a page and completing the access that faulted.
/// While any guard exists the slot cannot be removed nor its pages discarded.
pub struct InstallGuard<'a> {
    _shared: RwLockReadGuard<'a, ()>,
}

/// Held by a memslot change or discard: no installer is inside the slot.
pub struct ExclusiveGuard<'a> {
    _exclusive: RwLockWriteGuard<'a, ()>,
}

impl<B> Memslot<B> {
    pub fn new(id: u32, gpa: u64, size: u64, backing: B) -> Self {
        Self {
            id,
            gpa,
            size,
            backing,
            valid: AtomicBool::new(true),
            install_lock: RwLock::new(()),
            discarded: PageBitmap::new(size / PAGE_SIZE),
        }
    }

    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa - self.gpa < self.size
    }

    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }

    pub fn is_valid(&self) -> bool {
        self.valid.load(Ordering::Acquire)
    }

    /// Page index of `gpa` within the slot.
    pub fn page_index(&self, gpa: u64) -> u64 {
        (gpa - self.gpa) / PAGE_SIZE
    }

    /// Whether the page was discarded (and must refault as zero).
    pub fn is_discarded(&self, page: u64) -> bool {
        self.discarded.get(page)
    }

    pub fn discarded_pages(&self) -> u64 {
        self.discarded.count()
    }

    /// Speculative path: take the install lock shared, without waiting, and
    /// check that nothing changed since the fault's snapshot. The checks come
    /// after the lock so that a writer that has already taken the lock
    /// exclusively, or marked the slot invalid, is always seen.
    pub fn map_trylock<'a>(
        &'a self,
        generation: u64,
        current: &AtomicU64,
    ) -> Result<InstallGuard<'a>, Bail> {
        let shared = self.install_lock.try_read().map_err(|_| Bail::Contended)?;
        if !self.valid.load(Ordering::Acquire) {
            return Err(Bail::SlotInvalid);
        }
        if current.load(Ordering::Acquire) != generation {
            return Err(Bail::GenerationChanged);
        }
        Ok(InstallGuard { _shared: shared })
    }

    /// Slow path (caller holds the slots lock): wait for the install lock.
    /// Fails only if the slot is being removed, which the slots lock rules out
    /// for a slot found in the current table.
    pub fn map_lock(&self) -> Result<InstallGuard<'_>, Bail> {
        let shared = self.install_lock.read().unwrap_or_else(|e| e.into_inner());
        if !self.valid.load(Ordering::Acquire) {
            return Err(Bail::SlotInvalid);
        }
        Ok(InstallGuard { _shared: shared })
    }

    /// Writer side of a removal: invalidate, then wait for in-flight
    /// installers. After this returns nothing is installed into the slot.
    pub fn begin_removal(&self) -> ExclusiveGuard<'_> {
        self.valid.store(false, Ordering::Release);
        ExclusiveGuard {
            _exclusive: self.install_lock.write().unwrap_or_else(|e| e.into_inner()),
        }
    }

    /// Writer side of a per-page discard: exclude installers, mark pages
    /// `first..first+count` discarded. The caller zaps the pages while the
    /// guard is held.
    pub fn begin_discard(&self, first: u64, count: u64) -> ExclusiveGuard<'_> {
        let g = ExclusiveGuard {
            _exclusive: self.install_lock.write().unwrap_or_else(|e| e.into_inner()),
        };
        for p in first..first + count {
            self.discarded.set(p);
        }
        g
    }
}

/// An immutable table of slots, sorted by guest-physical address.
pub struct MemslotTable<B> {
    pub generation: u64,
    pub slots: Vec<Arc<Memslot<B>>>,
}

impl<B> MemslotTable<B> {
    pub fn lookup(&self, gpa: u64) -> Option<&Arc<Memslot<B>>> {
        let i = self.slots.partition_point(|s| s.gpa <= gpa);
        let s = self.slots.get(i.checked_sub(1)?)?;
        s.contains(gpa).then_some(s)
    }
}

/// The published table, its generation and the slots lock.
pub struct Memslots<B> {
    table: Published<MemslotTable<B>>,
    generation: AtomicU64,
    slots_lock: Mutex<()>,
}

/// Proof that the slots lock is held: memslot changes go through it.
pub struct SlotsLocked<'a, B> {
    owner: &'a Memslots<B>,
    _guard: MutexGuard<'a, ()>,
}

impl<B> Memslots<B> {
    pub fn new(slots: Vec<Arc<Memslot<B>>>) -> Self {
        let mut slots = slots;
        slots.sort_by_key(|s| s.gpa);
        Self {
            table: Published::new(Arc::new(MemslotTable {
                generation: 0,
                slots,
            })),
            generation: AtomicU64::new(0),
            slots_lock: Mutex::new(()),
        }
    }

    /// Lock-free snapshot for the speculative path.
    pub fn snapshot(&self) -> Arc<MemslotTable<B>> {
        self.table.load()
    }

    /// The current generation (what `map_trylock` compares against).
    pub fn generation(&self) -> &AtomicU64 {
        &self.generation
    }

    pub fn lock_slots(&self) -> SlotsLocked<'_, B> {
        SlotsLocked {
            owner: self,
            _guard: self.slots_lock.lock().unwrap_or_else(|e| e.into_inner()),
        }
    }
}

impl<B> SlotsLocked<'_, B> {
    pub fn snapshot(&self) -> Arc<MemslotTable<B>> {
        self.owner.table.load()
    }

    /// Publish a table with one slot added; returns the new generation.
    pub fn publish_added(&self, slot: Arc<Memslot<B>>) -> u64 {
        let old = self.owner.table.load();
        let mut slots = old.slots.clone();
        slots.push(slot);
        slots.sort_by_key(|s| s.gpa);
        self.publish(old.generation + 1, slots)
    }

    /// Remove the slot at `gpa` from the table: mark it invalid and publish
    /// a new generation. The caller must then call [`Memslot::begin_removal`]
    /// on the returned slot and hold its guard while it tells KVM and unmaps.
    pub fn unpublish(&self, gpa: u64) -> Option<Arc<Memslot<B>>> {
        let old = self.owner.table.load();
        let idx = old.slots.iter().position(|s| s.gpa == gpa)?;
        let mut slots = old.slots.clone();
        let slot = slots.remove(idx);
        slot.valid.store(false, Ordering::Release);
        self.publish(old.generation + 1, slots);
        Some(slot)
    }

    fn publish(&self, generation: u64, slots: Vec<Arc<Memslot<B>>>) -> u64 {
        // Generation first: a speculative installer that sees the new table
        // or passes its trylock after this point sees the new generation.
        self.owner.generation.store(generation, Ordering::Release);
        self.owner
            .table
            .store(Arc::new(MemslotTable { generation, slots }));
        generation
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn slots() -> Memslots<()> {
        Memslots::new(vec![
            Arc::new(Memslot::new(1, 0x10_0000, 0x10_0000, ())),
            Arc::new(Memslot::new(0, 0, 0x8_0000, ())),
        ])
    }

    #[test]
    fn lookup_finds_containing_slot() {
        let m = slots();
        let t = m.snapshot();
        assert_eq!(t.lookup(0x7_ffff).unwrap().id, 0);
        assert!(t.lookup(0x8_0000).is_none());
        assert_eq!(t.lookup(0x10_0000).unwrap().id, 1);
        assert!(t.lookup(0x20_0000).is_none());
    }

    #[test]
    fn trylock_fails_after_a_change_and_slow_path_succeeds() {
        let m = slots();
        let snap = m.snapshot();
        let s0 = snap.lookup(0).unwrap().clone();
        assert!(s0.map_trylock(snap.generation, m.generation()).is_ok());
        {
            let locked = m.lock_slots();
            locked.publish_added(Arc::new(Memslot::new(2, 0x40_0000, 0x1000, ())));
        }
        assert_eq!(
            s0.map_trylock(snap.generation, m.generation()).err(),
            Some(Bail::GenerationChanged)
        );
        let locked = m.lock_slots();
        let fresh = locked.snapshot();
        assert_eq!(fresh.generation, 1);
        assert!(fresh.lookup(0).unwrap().map_lock().is_ok());
    }

    #[test]
    fn removal_invalidates_and_excludes() {
        let m = slots();
        let snap = m.snapshot();
        let s1 = snap.lookup(0x10_0000).unwrap().clone();
        let locked = m.lock_slots();
        let removed = locked.unpublish(0x10_0000).unwrap();
        let g = removed.begin_removal();
        assert_eq!(
            s1.map_trylock(snap.generation, m.generation()).err(),
            Some(Bail::Contended)
        );
        drop(g);
        assert_eq!(
            s1.map_trylock(1, m.generation()).err(),
            Some(Bail::SlotInvalid)
        );
        assert!(locked.snapshot().lookup(0x10_0000).is_none());
    }

    #[test]
    fn discard_marks_pages_and_excludes_installers() {
        let m = slots();
        let snap = m.snapshot();
        let s0 = snap.lookup(0).unwrap().clone();
        let g = s0.begin_discard(3, 2);
        assert_eq!(
            s0.map_trylock(0, m.generation()).err(),
            Some(Bail::Contended)
        );
        drop(g);
        assert!(s0.is_discarded(3) && s0.is_discarded(4) && !s0.is_discarded(5));
        assert_eq!(s0.discarded_pages(), 2);
        assert!(s0.map_trylock(0, m.generation()).is_ok());
    }
}

/// Loom models of the install protocol, driven exactly as the fault engine
/// (`fault/engine.rs`) drives it, against a fake host mapping.
///
/// `RUSTFLAGS="--cfg loom" cargo test --release -p vmm --lib loom_tests -- --test-threads=1`
///
/// Each slot is one page. Its host state is one word (`Fake::host`) holding
/// the page's content and the marks a remover or discarder leaves ("removal
/// complete", "discard done"). Every host event is an unconditional
/// read-modify-write of that word with `Relaxed` ordering: RMWs always read
/// the latest value, so the word's modification order is exactly the order in
/// which the host saw the events (an install after a removal is seen as such,
/// never hidden by a stale read), and `Relaxed` adds no happens-before edge
/// that the protocol does not provide itself.
///
/// Limitation: under loom, `Published` is a mutex, so a snapshot also orders
/// the writer after the reader, which `arc-swap` does not.
#[cfg(all(test, loom))]
mod loom_tests {
    use super::*;
    use loom::sync::atomic::AtomicUsize;
    use loom::thread;
    use std::sync::atomic::AtomicUsize as Count;

    /// Guest-physical addresses of the one-page slots A and B.
    const A: u64 = 0;
    const B: u64 = 0x10_0000;

    // The host word: content in the low two bits, then the marks.
    const ABSENT: usize = 0;
    const ZERO: usize = 1;
    const IMAGE: usize = 2;
    const CONTENT: usize = 3;
    /// Set by a remover after `begin_removal` returned, guard still held.
    const REMOVED: usize = 4;
    /// Set by a discarder together with its zap, guard still held.
    const DISCARDED: usize = 8;
    /// Set by a remover once the slot is unpublished, before `begin_removal`.
    const UNPUBLISHED: usize = 16;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Content {
        Zero,
        Image,
    }

    impl Content {
        fn bits(self) -> usize {
            match self {
                Content::Zero => ZERO,
                Content::Image => IMAGE,
            }
        }
    }

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Outcome {
        Installed(Content),
        AlreadyPresent,
        NotRam,
    }

    #[derive(Debug, Clone, Copy)]
    struct Fault {
        outcome: Outcome,
        /// Why the speculative path bailed, if it did (then the slow path ran).
        bail: Option<Bail>,
        /// Prepared as image, switched to zero by the re-check under the guard.
        rechecked: bool,
        /// Installed after the slot was unpublished (its remover then waits
        /// for this installer's guard in `begin_removal`).
        during_removal: bool,
    }

    impl Fault {
        fn not_ram(bail: Option<Bail>) -> Self {
            Fault {
                outcome: Outcome::NotRam,
                bail,
                rechecked: false,
                during_removal: false,
            }
        }
    }

    /// The host mapping of a one-page slot whose source is an image.
    struct Fake {
        host: AtomicUsize,
        /// Touched by installers just before `map_trylock` and by writers
        /// just after taking the install lock exclusively. Loom 0.7 does not
        /// make a lock's release a scheduling point, so without a dependency
        /// between the trylock and something inside the writer's critical
        /// section it never explores a trylock that fails against a held
        /// lock (`Bail::Contended`). `Relaxed` RMWs: no ordering added.
        probe: AtomicUsize,
    }

    type Slots = Memslots<Fake>;

    fn slot(id: u32, gpa: u64) -> Arc<Memslot<Fake>> {
        Arc::new(Memslot::new(
            id,
            gpa,
            PAGE_SIZE,
            Fake {
                host: AtomicUsize::new(ABSENT),
                probe: AtomicUsize::new(0),
            },
        ))
    }

    fn host_update(s: &Memslot<Fake>, f: impl FnMut(usize) -> usize) -> usize {
        s.backing
            .host
            .update(Ordering::Relaxed, Ordering::Relaxed, f)
    }

    /// See `Fake::probe`.
    fn poke(s: &Memslot<Fake>) {
        s.backing.probe.fetch_add(1, Ordering::Relaxed);
    }

    /// Host state once every thread is joined (joins order the reads).
    fn host(s: &Memslot<Fake>) -> usize {
        s.backing.host.load(Ordering::Relaxed)
    }

    /// Step 3, no lock held: image content unless the page was discarded.
    fn prepare(s: &Memslot<Fake>, page: u64) -> Content {
        if s.is_discarded(page) {
            Content::Zero
        } else {
            Content::Image
        }
    }

    /// Step 4, guard held: re-check the discard, then install with `EEXIST`
    /// semantics. Panics on an I1 or I3 violation.
    fn install(s: &Memslot<Fake>, page: u64, prepared: Content, _held: &InstallGuard) -> Fault {
        let content = if prepared == Content::Image && s.is_discarded(page) {
            Content::Zero
        } else {
            prepared
        };
        let prev = host_update(s, |w| {
            if w & CONTENT == ABSENT {
                w | content.bits()
            } else {
                w
            }
        });
        assert!(
            prev & REMOVED == 0,
            "I1 violated: install into slot {} after its removal completed",
            s.id
        );
        let during_removal = prev & UNPUBLISHED != 0;
        if prev & CONTENT != ABSENT {
            return Fault {
                outcome: Outcome::AlreadyPresent,
                bail: None,
                rechecked: false,
                during_removal,
            };
        }
        assert!(
            !(content == Content::Image && prev & DISCARDED != 0),
            "I3 violated: image content installed into slot {} after the discard completed",
            s.id
        );
        Fault {
            outcome: Outcome::Installed(content),
            bail: None,
            rechecked: content != prepared,
            during_removal,
        }
    }

    /// The engine's `resolve` for one page: speculative path, then on any
    /// bail the slow path under the slots lock.
    fn fault(m: &Slots, gpa: u64) -> Fault {
        let snap = m.snapshot();
        let generation = snap.generation;
        let Some(s) = snap.lookup(gpa) else {
            return Fault::not_ram(None);
        };
        let page = s.page_index(gpa);
        let prepared = prepare(s, page);
        poke(s);
        let bail = match s.map_trylock(generation, m.generation()) {
            Ok(guard) => {
                let done = install(s, page, prepared, &guard);
                drop(guard);
                return done;
            }
            Err(bail) => bail,
        };
        // Slow path: no memslot change can race.
        let locked = m.lock_slots();
        let snap = locked.snapshot();
        let Some(s) = snap.lookup(gpa) else {
            return Fault::not_ram(Some(bail));
        };
        let prepared = prepare(s, page);
        // The slots lock rules out a removal of a slot in the current table.
        let guard = s.map_lock().expect("map_lock failed under the slots lock");
        let done = install(s, page, prepared, &guard);
        drop(guard);
        drop(locked);
        Fault {
            bail: Some(bail),
            ..done
        }
    }

    /// `MemoryManager::remove_slot`, with the "removal complete" mark where
    /// it would tell KVM and unregister the range.
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
    fn discard(s: &Memslot<Fake>, page: u64) {
        let exclusive = s.begin_discard(page, 1);
        poke(s);
        host_update(s, |w| (w & !CONTENT) | DISCARDED);
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
            let m = Arc::new(Memslots::new(vec![a.clone()]));
            let installer = {
                let m = m.clone();
                thread::spawn(move || fault(&m, A))
            };
            remove(&m, A);
            let f = installer.join().unwrap();
            match f.outcome {
                Outcome::Installed(Content::Image) => {
                    assert_eq!(host(&a) & CONTENT, IMAGE);
                    bump(&INSTALLED);
                }
                Outcome::NotRam if f.bail.is_some() => bump(&NOT_RAM_AFTER_RETRY),
                Outcome::NotRam => bump(&NOT_RAM_AT_ONCE),
                o => panic!("I4: unexpected fault outcome {o:?} ({f:?})"),
            }
            if let Some(bail) = f.bail {
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
            "  installs while the removal was under way: {}",
            seen(&DURING_REMOVAL)
        );
        eprintln!(
            "  bails: generation changed {}, slot invalid {}, contended {}",
            seen(&BAILS[0]),
            seen(&BAILS[1]),
            seen(&BAILS[2])
        );
    }

    /// I4: an installer on slot A races the hotplug of an unrelated slot B;
    /// a stale generation makes it retry, and the retry always installs.
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
                f.outcome,
                Outcome::Installed(Content::Image),
                "I4: fault lost ({f:?})"
            );
            let snap = m.snapshot();
            assert_eq!(host(snap.lookup(A).unwrap()) & CONTENT, IMAGE);
            assert_eq!(host(snap.lookup(B).unwrap()), ABSENT);
            if let Some(bail) = f.bail {
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

    /// I3: an installer on page 0 of an image-backed slot races a discard of
    /// that page. Whatever the order, the page never ends up holding image
    /// content: an image installed before the discard is zapped by it, and
    /// an install after it installs zero.
    #[test]
    fn i3_discarded_page_refaults_as_zero() {
        static IMAGE_THEN_ZAPPED: Count = Count::new(0);
        static ZERO_AFTER_DISCARD: Count = Count::new(0);
        static RECHECK_SWITCHED: Count = Count::new(0);
        static CONTENDED: Count = Count::new(0);
        check("i3_discarded_page_refaults_as_zero", None, || {
            let a = slot(0, A);
            let m = Arc::new(Memslots::new(vec![a.clone()]));
            let installer = {
                let m = m.clone();
                thread::spawn(move || fault(&m, A))
            };
            discard(&a, 0);
            let f = installer.join().unwrap();
            let w = host(&a);
            assert!(a.is_discarded(0));
            assert_ne!(
                w & CONTENT,
                IMAGE,
                "I3: image content survived the discard ({f:?})"
            );
            match f.outcome {
                Outcome::Installed(Content::Image) => {
                    assert_eq!(w & CONTENT, ABSENT);
                    bump(&IMAGE_THEN_ZAPPED);
                }
                Outcome::Installed(Content::Zero) => {
                    assert_eq!(w & CONTENT, ZERO);
                    bump(&ZERO_AFTER_DISCARD);
                }
                o => panic!("I4: unexpected fault outcome {o:?} ({f:?})"),
            }
            if f.rechecked {
                bump(&RECHECK_SWITCHED);
            }
            if f.bail == Some(Bail::Contended) {
                bump(&CONTENDED);
            }
        });
        assert!(seen(&IMAGE_THEN_ZAPPED) > 0);
        assert!(seen(&ZERO_AFTER_DISCARD) > 0);
        // The window between prepare and the lock was exercised, and the
        // installer met the discarder holding the lock (then waited for it
        // in `map_lock`).
        assert!(seen(&RECHECK_SWITCHED) > 0);
        assert!(seen(&CONTENDED) > 0);
    }

    /// I4: two installers on the same page while slot B is hotplugged:
    /// exactly one installs, the other finds the page present.
    #[test]
    fn two_installers_one_installs() {
        static RETRIES: Count = Count::new(0);
        check("two_installers_one_installs", Some(4), || {
            let a = slot(0, A);
            let m = Arc::new(Memslots::new(vec![a.clone()]));
            let installers: Vec<_> = (0..2)
                .map(|_| {
                    let m = m.clone();
                    thread::spawn(move || fault(&m, A))
                })
                .collect();
            add(&m, slot(1, B));
            let faults: Vec<Fault> = installers.into_iter().map(|t| t.join().unwrap()).collect();
            let installed = faults
                .iter()
                .filter(|f| f.outcome == Outcome::Installed(Content::Image))
                .count();
            let present = faults
                .iter()
                .filter(|f| f.outcome == Outcome::AlreadyPresent)
                .count();
            assert_eq!((installed, present), (1, 1), "{faults:?}");
            assert_eq!(host(&a) & CONTENT, IMAGE);
            if faults.iter().any(|f| f.bail.is_some()) {
                bump(&RETRIES);
            }
        });
        assert!(seen(&RETRIES) > 0);
    }

    /// The harness has teeth: an installer that skips `map_trylock` is
    /// caught installing after the removal completed.
    #[test]
    #[should_panic(expected = "I1 violated")]
    fn harness_catches_install_without_trylock() {
        check("harness_catches_install_without_trylock", None, || {
            let a = slot(0, A);
            let m = Arc::new(Memslots::new(vec![a.clone()]));
            let installer = {
                let m = m.clone();
                thread::spawn(move || {
                    let snap = m.snapshot();
                    if let Some(s) = snap.lookup(A) {
                        let prepared = prepare(s, 0);
                        // A guard on another slot's install lock: a
                        // stand-in that excludes nothing.
                        let dummy = slot(9, B);
                        let guard = dummy.map_lock().unwrap();
                        install(s, 0, prepared, &guard);
                    };
                })
            };
            remove(&m, A);
            installer.join().unwrap();
        });
    }

    /// The harness has teeth: an installer that skips the re-check of the
    /// discard under the guard is caught installing stale image content.
    #[test]
    #[should_panic(expected = "I3")]
    fn harness_catches_missing_discard_recheck() {
        check("harness_catches_missing_discard_recheck", None, || {
            let a = slot(0, A);
            let m = Arc::new(Memslots::new(vec![a.clone()]));
            let installer = {
                let m = m.clone();
                thread::spawn(move || {
                    let snap = m.snapshot();
                    let s = snap.lookup(A).unwrap();
                    let prepared = prepare(s, 0);
                    if let Ok(guard) = s.map_trylock(snap.generation, m.generation()) {
                        // Install what was prepared, without the re-check.
                        let prev = host_update(s, |w| {
                            if w & CONTENT == ABSENT {
                                w | prepared.bits()
                            } else {
                                w
                            }
                        });
                        assert!(
                            !(prepared == Content::Image
                                && prev & (DISCARDED | CONTENT) == DISCARDED),
                            "I3 violated: stale image installed"
                        );
                        drop(guard);
                    };
                })
            };
            discard(&a, 0);
            installer.join().unwrap();
            assert_ne!(
                host(&a) & CONTENT,
                IMAGE,
                "I3: image content survived the discard"
            );
        });
    }
}
