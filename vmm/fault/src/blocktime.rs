//! Blocktime: how long each vCPU waited for guest memory, and how long
//! every vCPU waited at once (the whole VM stalled), as QEMU reports for
//! post-copy migration.
//!
//! Each vCPU publishes when its current wait began (`since`, 0 when it
//! runs). The vCPU whose wait ends first closes an all-blocked interval:
//! if every other vCPU is waiting too, the interval began at the latest of
//! their starts. Two vCPUs leaving at once may both see it; the interval
//! is named by its start, and only the one that swaps that start into
//! `counted` adds it. Atomics only: the SIGBUS handler calls this.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

pub struct Blocktime {
    base: Instant,
    /// Per vCPU: when its wait began (ns since `base`, plus one), or 0.
    since: Box<[AtomicU64]>,
    all_ns: AtomicU64,
    /// Start of the last all-blocked interval counted.
    counted: AtomicU64,
}

impl Blocktime {
    pub fn new(vcpus: usize) -> Self {
        Self {
            base: Instant::now(),
            since: (0..vcpus).map(|_| AtomicU64::new(0)).collect(),
            all_ns: AtomicU64::new(0),
            counted: AtomicU64::new(0),
        }
    }

    fn ns(&self, at: Instant) -> u64 {
        // +1: a wait that began at `base` is still "waiting".
        at.saturating_duration_since(self.base).as_nanos() as u64 + 1
    }

    /// vCPU `vcpu` waits for memory since `at` (its exit, or the handler's
    /// read of its fault).
    pub fn enter(&self, vcpu: usize, at: Instant) {
        if let Some(s) = self.since.get(vcpu) {
            s.store(self.ns(at), Ordering::SeqCst);
        }
    }

    /// vCPU `vcpu` runs again; how long it waited (ns).
    pub fn leave(&self, vcpu: usize) -> u64 {
        let Some(mine) = self.since.get(vcpu) else {
            return 0;
        };
        let now = self.ns(Instant::now());
        let began = mine.load(Ordering::SeqCst);
        if began == 0 {
            return 0;
        }
        let mut latest = began;
        let all = self.since.iter().all(|s| {
            let v = s.load(Ordering::SeqCst);
            latest = latest.max(v);
            v != 0
        });
        if all {
            let prev = self.counted.load(Ordering::SeqCst);
            if prev != latest
                && self
                    .counted
                    .compare_exchange(prev, latest, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
            {
                self.all_ns
                    .fetch_add(now.saturating_sub(latest), Ordering::Relaxed);
            }
        }
        mine.store(0, Ordering::SeqCst);
        now.saturating_sub(began)
    }

    /// vCPU `vcpu`'s exit was not a wait after all (MMIO to a device).
    pub fn cancel(&self, vcpu: usize) {
        if let Some(s) = self.since.get(vcpu) {
            s.store(0, Ordering::SeqCst);
        }
    }

    /// Time every vCPU waited at once (closed intervals).
    pub fn all_blocked_ns(&self) -> u64 {
        self.all_ns.load(Ordering::Relaxed)
    }

    pub fn vcpus(&self) -> usize {
        self.since.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn one_vcpu_waiting_is_not_the_whole_vm() {
        let b = Blocktime::new(2);
        b.enter(0, Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        assert!(b.leave(0) >= 5_000_000);
        assert_eq!(b.all_blocked_ns(), 0);
    }

    #[test]
    fn overlap_of_all_is_counted_once() {
        let b = Blocktime::new(2);
        b.enter(0, Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        b.enter(1, Instant::now());
        std::thread::sleep(Duration::from_millis(5));
        let w0 = b.leave(0);
        let all = b.all_blocked_ns();
        assert!(w0 >= 10_000_000, "{w0}");
        assert!((5_000_000..w0).contains(&all), "{all} of {w0}");
        b.leave(1);
        assert_eq!(b.all_blocked_ns(), all, "the second leaver adds nothing");
        // A vCPU out of range (no such vCPU) counts nothing.
        b.enter(7, Instant::now());
        assert_eq!(b.leave(7), 0);
    }
}
