//! The published memslot table, its generation and the slots lock.

use crate::slot::Memslot;
use crate::sync::{Arc, AtomicU64, Mutex, MutexGuard, Ordering, Published};

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
///
/// Writers (memslot changes) hold the slots lock, mark removed slots
/// invalid, publish a table with `generation + 1`, then take the removed
/// slots' install locks exclusively ([`Memslot::begin_removal`]): in-flight
/// installers finish first, later ones fail their trylock. Only then does
/// the caller tell KVM and unmap.
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
        slot.begin_invalidate();
        self.publish(old.generation + 1, slots);
        Some(slot)
    }

    fn publish(&self, generation: u64, slots: Vec<Arc<Memslot<B>>>) -> u64 {
        // Generation first: a speculative installer that sees the new table
        // or passes its trylock after this point sees the new generation (I1).
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
    use crate::Bail;

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
        assert!(s1.map_lock().is_err());
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

    #[test]
    fn blocks_start_unplugged_and_follow_plug_and_unplug() {
        let s = Memslot::with_blocks(0, 0, 0x80_0000, 0x20_0000, ());
        assert_eq!(s.block_size(), Some(0x20_0000));
        assert!(!s.is_plugged(0));
        s.plug(1, 2);
        assert!(!s.is_plugged(0x1ff) && s.is_plugged(0x200) && s.is_plugged(0x5ff));
        assert_eq!(s.plugged_blocks(), 2);
        let g = s.begin_unplug(1, 1);
        assert_eq!(
            s.map_trylock(0, &AtomicU64::new(0)).err(),
            Some(Bail::Contended)
        );
        drop(g);
        assert!(!s.is_plugged(0x200) && s.is_plugged(0x400));
        assert!(Memslot::new(0, 0, 0x1000, ()).is_plugged(0));
    }
}
