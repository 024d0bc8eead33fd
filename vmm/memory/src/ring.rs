//! KVM's dirty ring (`KVM_CAP_DIRTY_LOG_RING`), the other way to learn
//! which pages the guest wrote: instead of a bitmap per memslot read with
//! `KVM_GET_DIRTY_LOG` (cost in proportion to the slot's size), KVM pushes
//! one entry `(slot, page)` per newly dirtied page into a ring per vCPU,
//! shared with the VMM by `mmap` of the vCPU fd (cost in proportion to what
//! was written). The VMM *harvests* entries, marks each one reset, and
//! `KVM_RESET_DIRTY_RINGS` write-protects those pages again so the next
//! write is logged anew. A vCPU whose ring is (nearly) full exits with
//! `KVM_EXIT_DIRTY_RING_FULL` and may not run again until its ring is
//! harvested: the vCPU thread does that itself ([`DirtyRings::full`]).
//!
//! kvm-ioctls 0.25 has the capability's number but no ring (no mapping, no
//! harvest, no reset), so this module is ours.
//!
//! The ring must be enabled on the VM before its first vCPU exists (a
//! creation choice, as in QEMU's `dirty-ring-size`); with it on, KVM refuses
//! `KVM_GET_DIRTY_LOG`, so [`DirtyRings`] stands in for the VM fd as the
//! memory manager's [`KvmSlots`]: the harvested pages of a slot are what
//! its `dirty_log` returns.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_dirty_gfn, kvm_enable_cap, KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL,
    KVM_DIRTY_LOG_PAGE_OFFSET,
};
use kvm_ioctls::VmFd;

use crate::kvm::{DirtyLogStats, KvmSlots};
use crate::PAGE_SIZE;

/// `KVM_DIRTY_GFN_F_DIRTY`: KVM published the entry.
const F_DIRTY: u32 = 1;
/// `KVM_DIRTY_GFN_F_RESET`: the VMM harvested it (KVM may reuse it after
/// `KVM_RESET_DIRTY_RINGS`).
const F_RESET: u32 = 2;
/// `_IO(KVMIO, 0xc7)`.
const KVM_RESET_DIRTY_RINGS: libc::c_ulong = 0xaec7;
/// Entries beyond this page offset are not ours to believe (1 TiB slots).
const MAX_PAGE: u64 = 1 << 28;
/// The entry size, fixed by the ABI.
const ENTRY: u32 = std::mem::size_of::<kvm_dirty_gfn>() as u32;

/// Why the ring could not be had or read.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("this host's KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)")]
    Unsupported,
    #[error(
        "dirty ring of {entries} entries: must be a power of two from 1024 to {max} \
         (this host's limit)"
    )]
    Size { entries: u32, max: u32 },
    #[error("enabling the dirty ring ({entries} entries) failed: {source}")]
    Enable {
        entries: u32,
        source: kvm_ioctls::Error,
    },
    #[error("mapping vCPU {vcpu}'s dirty ring failed: {source}")]
    Map { vcpu: usize, source: std::io::Error },
    #[error("KVM_RESET_DIRTY_RINGS failed: {0}")]
    Reset(std::io::Error),
    #[error(
        "vCPU {vcpu} exits for a full dirty ring with nothing to harvest ({times} times in a \
         row): the host's count of the ring is broken (it wrote past the ring, see \
         kvm_dirty_ring_push in the kernel log) and the vCPU cannot run again; use \
         --dirty-log bitmap"
    )]
    Wedged { vcpu: usize, times: u32 },
}

/// Full exits in a row that find nothing to harvest before a vCPU is
/// called stuck: one is normal (another thread harvested its ring between
/// its exit and its harvest), a thousand are a ring KVM will never let run.
const WEDGED: u32 = 1000;

/// One vCPU's ring: the shared mapping and the next entry to look at.
struct Ring {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    /// Where KVM publishes next, as far as this side knows (KVM's reset
    /// index when the two agree).
    fetch: u32,
    /// Harvested by a scan of every entry, not from `fetch`: set once this
    /// ring was seen to overflow or to disagree with KVM.
    scan: bool,
    /// Full exits of this ring's vCPU in a row that harvested nothing.
    empty_fulls: u32,
}

// SAFETY: `base` points into a shared mapping of `entries` entries owned by
// `DirtyRings` (unmapped in its `Drop`); every access is under its lock,
// and the field KVM writes concurrently (`flags`) is accessed atomically.
unsafe impl Send for Ring {}

impl Ring {
    /// Entry `i` (modulo the ring) if KVM published it: its slot and page,
    /// with the entry's flags for marking it harvested.
    fn published(&self, i: u32) -> Option<(&AtomicU32, u32, u64)> {
        // SAFETY: `i % entries` is inside the mapping, alive as long as
        // `self`.
        let e = unsafe { self.base.add((i % self.entries) as usize) };
        // SAFETY: `flags` is an aligned u32 KVM writes concurrently: only
        // accessed atomically (acquire: the entry's slot and offset are
        // KVM's before it set DIRTY).
        let flags = unsafe { AtomicU32::from_ptr(&raw mut (*e).flags) };
        if flags.load(Ordering::Acquire) & F_DIRTY == 0 {
            return None;
        }
        // SAFETY: published (DIRTY seen with acquire): KVM does not write
        // the entry again until it is reset (unless it overflows, which
        // `State::harvest` detects).
        let (slot, offset) = unsafe { ((*e).slot, (*e).offset) };
        Some((flags, slot, offset))
    }
}

/// Harvested pages not taken yet, per memslot id: one bit per page.
type Pending = HashMap<u32, Vec<u64>>;

fn collect(pending: &mut Pending, (flags, slot, offset): (&AtomicU32, u32, u64)) {
    // Address space 0 only (x86 SMM's is never logged here).
    if slot >> 16 == 0 && offset < MAX_PAGE {
        let bits = pending.entry(slot).or_default();
        let w = (offset / 64) as usize;
        if bits.len() <= w {
            bits.resize(w + 1, 0);
        }
        bits[w] |= 1 << (offset % 64);
    }
    flags.store(F_RESET, Ordering::Release);
}

/// The rings, what their harvests collected, and whether an entry may have
/// been lost.
#[derive(Default)]
struct State {
    rings: Vec<Ring>,
    pending: Pending,
    /// Raised each time KVM may have overwritten an entry not harvested
    /// yet (its ring overflowed): every page of every slot then counts as
    /// written, once, for each reader of the log.
    lost: u64,
    /// Per slot, the `lost` its last `take` accounted for.
    seen: HashMap<u32, u64>,
    /// Entries harvested since the VM began.
    harvested: u64,
    /// Harvests by a vCPU whose ring was full.
    full_exits: u64,
}

impl State {
    /// Collect every published entry (marking each harvested); `full`: the
    /// vCPU whose ring is full, if a vCPU asks. Returns the entries marked
    /// and whether every ring agreed with KVM (then KVM's reset must clear
    /// exactly that many).
    ///
    /// KVM stops a vCPU whose ring is nearly full before it writes more,
    /// keeping entries in reserve for the instruction under way. A host
    /// that does not (seen on a PVM host: its batch emulation of guest
    /// supervisor code pushes past the ring, `WARN` in
    /// `kvm_dirty_ring_push`) overwrites entries not harvested yet, and
    /// its indices no longer match this side's. Both are detected here: a
    /// pass that finds the whole ring published (it could have wrapped),
    /// a full vCPU whose ring holds published entries away from `fetch`.
    /// Such a ring is harvested by scanning all its entries from then on
    /// (order does not matter for a set of pages; KVM's reset walks from
    /// its own index over whatever is marked), and `lost` is raised.
    fn harvest(&mut self, full: Option<usize>) -> (u64, bool) {
        let State {
            rings,
            pending,
            lost,
            ..
        } = self;
        let mut marked = 0;
        let mut in_step = true;
        for (i, ring) in rings.iter_mut().enumerate() {
            let mut n = 0;
            if !ring.scan {
                while n < ring.entries {
                    let Some(e) = ring.published(ring.fetch) else {
                        break;
                    };
                    collect(pending, e);
                    ring.fetch = ring.fetch.wrapping_add(1);
                    n += 1;
                }
                let astray = full == Some(i)
                    && n == 0
                    && (0..ring.entries).any(|j| ring.published(j).is_some());
                if n == ring.entries || astray {
                    log::warn!(
                        "dirty ring of vCPU {i} overflowed or went astray (the host wrote \
                         past its ring): scanning it from now on, every page counts as written"
                    );
                    ring.scan = true;
                    *lost += 1;
                }
            }
            if ring.scan {
                in_step = false;
                for j in 0..ring.entries {
                    if let Some(e) = ring.published(j) {
                        collect(pending, e);
                        n += 1;
                    }
                }
            }
            marked += u64::from(n);
        }
        self.harvested += marked;
        (marked, in_step)
    }

    /// KVM's reset cleared `cleared` entries after a harvest that marked
    /// `marked` with every ring in step: fewer means KVM met an entry it
    /// overwrote after it was marked (its walk stops there).
    fn after_reset(&mut self, marked: u64, in_step: bool, cleared: u64) {
        if in_step && cleared < marked {
            log::warn!(
                "dirty rings: KVM reset {cleared} of {marked} harvested entries (the host \
                 wrote past a ring): scanning them from now on, every page counts as written"
            );
            for r in &mut self.rings {
                r.scan = true;
            }
            self.lost += 1;
        }
    }

    /// Count a vCPU's full exit that harvested `n` entries: an error once
    /// such exits keep finding nothing.
    fn full_done(&mut self, vcpu: usize, n: u64) -> Result<(), RingError> {
        let Some(r) = self.rings.get_mut(vcpu) else {
            return Ok(());
        };
        r.empty_fulls = if n == 0 { r.empty_fulls + 1 } else { 0 };
        if r.empty_fulls >= WEDGED {
            return Err(RingError::Wedged {
                vcpu,
                times: r.empty_fulls,
            });
        }
        Ok(())
    }

    /// The pages of `slot` (`size` bytes) collected since its last take;
    /// all of them once after an entry may have been lost.
    fn take(&mut self, slot: u32, size: u64) -> Vec<u64> {
        let words = size.div_ceil(PAGE_SIZE * 64) as usize;
        let mut bits = self.pending.remove(&slot).unwrap_or_default();
        bits.resize(words, 0);
        let seen = self.seen.entry(slot).or_default();
        if *seen < self.lost {
            *seen = self.lost;
            bits.fill(u64::MAX);
        }
        bits
    }
}

/// The VM's dirty rings, one per vCPU.
pub struct DirtyRings {
    vm: Arc<VmFd>,
    entries: u32,
    state: Mutex<State>,
}

impl DirtyRings {
    /// Turn the ring on for `vm` with `entries` entries per vCPU. Before
    /// any vCPU is created (KVM refuses it after).
    pub fn enable(vm: Arc<VmFd>, entries: u32) -> Result<Arc<Self>, RingError> {
        // The acquire/release flavour where the host has it (what KVM asks
        // of new VMMs); x86 takes either.
        let (cap, max_bytes) = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
            .into_iter()
            .map(|c| (c, vm.check_extension_raw(c.into())))
            .find(|(_, n)| *n > 0)
            .ok_or(RingError::Unsupported)?;
        let max = (max_bytes as u32) / ENTRY;
        if !entries.is_power_of_two() || !(1024..=max).contains(&entries) {
            return Err(RingError::Size { entries, max });
        }
        let mut c = kvm_enable_cap {
            cap,
            ..Default::default()
        };
        c.args[0] = u64::from(entries * ENTRY);
        vm.enable_cap(&c)
            .map_err(|source| RingError::Enable { entries, source })?;
        Ok(Arc::new(Self {
            vm,
            entries,
            state: Mutex::default(),
        }))
    }

    /// Map vCPU `vcpu`'s ring (vCPUs attach in index order, right after
    /// `KVM_CREATE_VCPU`).
    pub fn attach(&self, vcpu: usize, fd: &impl AsRawFd) -> Result<(), RingError> {
        let base = map_ring(fd.as_raw_fd(), self.entries)
            .map_err(|source| RingError::Map { vcpu, source })?;
        self.lock().rings.push(Ring {
            base,
            entries: self.entries,
            fetch: 0,
            scan: false,
            empty_fulls: 0,
        });
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding it left only whole entries behind.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// vCPU `vcpu`'s ring is full (`KVM_EXIT_DIRTY_RING_FULL`): harvest
    /// them all so that it may run again.
    pub fn full(&self, vcpu: usize) -> Result<u64, RingError> {
        let mut state = self.lock();
        state.full_exits += 1;
        let n = self.harvest_locked(&mut state, Some(vcpu))?;
        state.full_done(vcpu, n)?;
        Ok(n)
    }

    /// Collect every published entry of every ring into the per-slot sets
    /// and let KVM reuse them (`KVM_RESET_DIRTY_RINGS` write-protects those
    /// pages again); `full`: the vCPU whose ring is full, if one asks.
    /// Returns the entries collected.
    fn harvest_locked(&self, state: &mut State, full: Option<usize>) -> Result<u64, RingError> {
        let (marked, in_step) = state.harvest(full);
        if marked > 0 {
            // SAFETY: an argument-less ioctl on the VM fd we hold.
            let r = unsafe { libc::ioctl(self.vm.as_raw_fd(), KVM_RESET_DIRTY_RINGS) };
            if r < 0 {
                return Err(RingError::Reset(std::io::Error::last_os_error()));
            }
            state.after_reset(marked, in_step, r as u64);
        }
        Ok(marked)
    }

    /// The pages of `slot` (`size` bytes) written since the last call, and
    /// forgotten.
    pub fn take(&self, slot: u32, size: u64) -> Result<Vec<u64>, RingError> {
        let mut state = self.lock();
        self.harvest_locked(&mut state, None)?;
        Ok(state.take(slot, size))
    }
}

impl Drop for DirtyRings {
    fn drop(&mut self) {
        let bytes = self.entries as usize * ENTRY as usize;
        for r in &self.lock().rings {
            // SAFETY: the mapping `map_ring` made, of this size; nothing
            // reads it after the rings are dropped.
            unsafe { libc::munmap(r.base.cast(), bytes) };
        }
    }
}

fn map_ring(fd: RawFd, entries: u32) -> std::io::Result<*mut kvm_dirty_gfn> {
    let bytes = entries as usize * ENTRY as usize;
    // SAFETY: a new shared mapping of the vCPU fd at the ring's offset, of
    // the size the ring was enabled with; the kernel checks both.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            (KVM_DIRTY_LOG_PAGE_OFFSET as u64 * PAGE_SIZE) as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    Ok(p.cast())
}

impl KvmSlots for DirtyRings {
    fn set_region(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        hva: u64,
        log_dirty: bool,
    ) -> Result<(), kvm_ioctls::Error> {
        self.vm.set_region(slot, gpa, size, hva, log_dirty)
    }

    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, kvm_ioctls::Error> {
        self.take(slot, size).map_err(|e| match e {
            RingError::Reset(io) => kvm_ioctls::Error::new(io.raw_os_error().unwrap_or(libc::EIO)),
            _ => kvm_ioctls::Error::new(libc::EINVAL),
        })
    }

    fn dirty_log_stats(&self) -> DirtyLogStats {
        let s = self.lock();
        DirtyLogStats {
            kind: format!("ring:{}", self.entries),
            ring_entries: s.harvested,
            ring_full: s.full_exits,
            ring_lost: s.lost,
            read_ns: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIZE: u32 = 1024;

    /// KVM's side of one ring as the kernel keeps it (`virt/kvm/
    /// dirty_ring.c`): a push publishes at `dirty_index`, a reset walks from
    /// `reset_index` over the entries marked harvested. Pushes are not
    /// stopped at the soft limit: this is the host that overflows.
    struct FakeKvm {
        gfns: Vec<kvm_dirty_gfn>,
        dirty_index: u32,
        reset_index: u32,
    }

    impl FakeKvm {
        fn new() -> Box<Self> {
            Box::new(Self {
                gfns: vec![kvm_dirty_gfn::default(); SIZE as usize],
                dirty_index: 0,
                reset_index: 0,
            })
        }

        fn push(&mut self, slot: u32, offset: u64) {
            let e = &mut self.gfns[(self.dirty_index % SIZE) as usize];
            e.slot = slot;
            e.offset = offset;
            e.flags = F_DIRTY;
            self.dirty_index = self.dirty_index.wrapping_add(1);
        }

        fn reset(&mut self) -> u64 {
            let mut n = 0;
            loop {
                let e = &mut self.gfns[(self.reset_index % SIZE) as usize];
                if e.flags & F_RESET == 0 {
                    return n;
                }
                e.flags = 0;
                self.reset_index = self.reset_index.wrapping_add(1);
                n += 1;
            }
        }
    }

    fn state(kvm: &mut [Box<FakeKvm>]) -> State {
        State {
            rings: kvm
                .iter_mut()
                .map(|k| Ring {
                    base: k.gfns.as_mut_ptr(),
                    entries: SIZE,
                    fetch: 0,
                    scan: false,
                    empty_fulls: 0,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// One harvest and KVM's reset, as `DirtyRings::harvest_locked`.
    fn harvest(s: &mut State, kvm: &mut [Box<FakeKvm>], full: Option<usize>) -> u64 {
        let (marked, in_step) = s.harvest(full);
        let cleared = kvm.iter_mut().map(|k| k.reset()).sum();
        s.after_reset(marked, in_step, cleared);
        marked
    }

    fn pages(bits: &[u64]) -> Vec<u64> {
        (0..bits.len() as u64 * 64)
            .filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0)
            .collect()
    }

    const SLOT: u64 = 4096 * PAGE_SIZE;

    #[test]
    fn entries_are_collected_per_slot_and_reset_in_step_with_kvm() {
        let mut kvm = vec![FakeKvm::new(), FakeKvm::new()];
        let mut s = state(&mut kvm);
        kvm[0].push(0, 1);
        kvm[0].push(0, 3);
        kvm[1].push(1, 5);
        kvm[1].push(1 << 16, 7); // SMM's address space: not ours
        assert_eq!(harvest(&mut s, &mut kvm, None), 4);
        assert_eq!(pages(&s.take(0, SLOT)), [1, 3]);
        assert_eq!(pages(&s.take(1, SLOT)), [5]);
        assert_eq!(pages(&s.take(0, SLOT)), [] as [u64; 0]);
        // Many laps of the ring, harvested as a vCPU whose ring fills would.
        for lap in 0..5u64 {
            for p in 0..900 {
                kvm[lap as usize % 2].push(0, (lap * 900 + p) % 4096);
            }
            harvest(&mut s, &mut kvm, Some(lap as usize % 2));
        }
        assert_eq!(pages(&s.take(0, SLOT)).len(), 4096);
        for k in &kvm {
            assert_eq!(k.reset_index, k.dirty_index, "every entry reset");
        }
        assert_eq!(s.lost, 0);
        assert!(s.rings.iter().all(|r| !r.scan));
    }

    #[test]
    fn a_ring_written_past_its_end_counts_every_page_written() {
        let mut kvm = vec![FakeKvm::new()];
        let mut s = state(&mut kvm);
        // More than the ring holds: the first entries are overwritten.
        for p in 0..SIZE as u64 + 10 {
            kvm[0].push(0, p);
        }
        harvest(&mut s, &mut kvm, Some(0));
        assert_eq!(s.lost, 1);
        assert_eq!(pages(&s.take(0, SLOT)).len(), 4096, "all pages, once");
        assert_eq!(pages(&s.take(1, SLOT)).len(), 4096, "every slot");
        kvm[0].push(0, 9);
        harvest(&mut s, &mut kvm, None);
        assert_eq!(pages(&s.take(0, SLOT)), [9], "then what was written");
    }

    #[test]
    fn an_entry_overwritten_between_harvest_and_reset_is_caught_by_the_reset_count() {
        let mut kvm = vec![FakeKvm::new()];
        let mut s = state(&mut kvm);
        for p in 0..1000 {
            kvm[0].push(0, p);
        }
        let (marked, in_step) = s.harvest(None);
        assert_eq!((marked, in_step), (1000, true));
        // The vCPU runs on past the ring before the reset: entries 0..30
        // (marked harvested) are written again, and KVM's walk stops there.
        for p in 1000..SIZE as u64 + 30 {
            kvm[0].push(0, p);
        }
        let cleared = kvm[0].reset();
        assert_eq!(cleared, 0);
        s.after_reset(marked, in_step, cleared);
        assert_eq!(
            s.lost, 1,
            "the reset count shows an entry overwritten before the reset"
        );
        assert_eq!(pages(&s.take(0, SLOT)).len(), 4096);
        // Scanning from now on, later pages are still seen. KVM's walk,
        // though, now stops for good where it counts an entry twice (one
        // it overwrote): its count of the ring never comes down again and
        // the vCPU ends up stuck (as measured on the PVM host; see
        // `a_vcpu_whose_full_ring_never_yields_is_reported_stuck`).
        harvest(&mut s, &mut kvm, Some(0));
        let stopped = kvm[0].reset_index;
        kvm[0].push(0, 4000);
        harvest(&mut s, &mut kvm, Some(0));
        assert!(pages(&s.take(0, SLOT)).contains(&4000));
        assert_eq!(kvm[0].reset_index, stopped);
        assert_eq!(kvm[0].dirty_index - kvm[0].reset_index, 31);
    }

    #[test]
    fn a_full_vcpu_with_entries_away_from_fetch_is_scanned() {
        let mut kvm = vec![FakeKvm::new()];
        let mut s = state(&mut kvm);
        // KVM publishes from 100 on while this side expects 0 (its indices
        // moved on after an overflow).
        kvm[0].dirty_index = 100;
        kvm[0].reset_index = 100;
        for p in 0..900 {
            kvm[0].push(0, p);
        }
        assert_eq!(harvest(&mut s, &mut kvm, None), 0, "a reader alone waits");
        assert_eq!(s.lost, 0);
        assert_eq!(
            harvest(&mut s, &mut kvm, Some(0)),
            900,
            "the full vCPU's ring is scanned for entries away from the fetch index"
        );
        assert_eq!(s.lost, 1);
        assert!(s.rings[0].scan);
        assert_eq!(kvm[0].reset_index, kvm[0].dirty_index);
    }

    #[test]
    fn a_vcpu_whose_full_ring_never_yields_is_reported_stuck() {
        let mut kvm = vec![FakeKvm::new()];
        let mut s = state(&mut kvm);
        let full = |s: &mut State, kvm: &mut Vec<Box<FakeKvm>>| {
            let n = harvest(s, kvm, Some(0));
            s.full_done(0, n)
        };
        for _ in 0..WEDGED - 1 {
            full(&mut s, &mut kvm).unwrap();
        }
        // One harvest that finds something starts the count again.
        kvm[0].push(0, 1);
        full(&mut s, &mut kvm).unwrap();
        for _ in 0..WEDGED - 1 {
            full(&mut s, &mut kvm).unwrap();
        }
        assert!(
            matches!(
                full(&mut s, &mut kvm),
                Err(RingError::Wedged {
                    vcpu: 0,
                    times: WEDGED
                })
            ),
            "a vCPU whose full ring never yields is reported stuck"
        );
    }
}
