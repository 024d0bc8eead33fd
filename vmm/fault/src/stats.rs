//! Per-vCPU fault counters: written only by their owner thread with relaxed
//! atomics (no lock, no allocation on the fault path), read by anyone.

use std::sync::atomic::{AtomicU64, Ordering};

/// How a fault reached the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `KVM_EXIT_MMIO` at a GPA inside a RAM memslot.
    Mmio = 0,
    /// `KVM_EXIT_INTERNAL_ERROR` (emulation failure) with RIP on a missing page.
    EmulationFailure = 1,
    /// `KVM_EXIT_MEMORY_FAULT`.
    MemoryFault = 2,
    /// SIGBUS in a VMM thread on guest RAM.
    Sigbus = 3,
    /// A blocking userfaultfd event served by a handler thread.
    Userfault = 4,
}

/// Number of [`FaultKind`]s.
pub const FAULT_KIND_COUNT: usize = 5;

pub const FAULT_KINDS: [(FaultKind, &str); FAULT_KIND_COUNT] = [
    (FaultKind::Mmio, "mmio"),
    (FaultKind::EmulationFailure, "emulation_failure"),
    (FaultKind::MemoryFault, "memory_fault"),
    (FaultKind::Sigbus, "sigbus"),
    (FaultKind::Userfault, "userfault"),
];

/// `KVM_RUN` exits by reason, counted per vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Io = 0,
    Mmio = 1,
    Hlt = 2,
    Shutdown = 3,
    InternalError = 4,
    MemoryFault = 5,
    SystemEvent = 6,
    Intr = 7,
    Other = 8,
    /// `KVM_EXIT_DEBUG` (the SYSCALL assist's breakpoint).
    Debug = 9,
    /// `KVM_EXIT_X86_WRMSR`/`RDMSR` (the MSR filter).
    Msr = 10,
}

/// Number of [`ExitKind`]s.
pub const EXIT_KIND_COUNT: usize = 11;

pub const EXIT_KINDS: [(ExitKind, &str); EXIT_KIND_COUNT] = [
    (ExitKind::Io, "io"),
    (ExitKind::Mmio, "mmio"),
    (ExitKind::Hlt, "hlt"),
    (ExitKind::Shutdown, "shutdown"),
    (ExitKind::InternalError, "internal_error"),
    (ExitKind::MemoryFault, "memory_fault"),
    (ExitKind::SystemEvent, "system_event"),
    (ExitKind::Intr, "intr"),
    (ExitKind::Other, "other"),
    (ExitKind::Debug, "debug"),
    (ExitKind::Msr, "msr"),
];

/// What the VMM did for a guest on a PVM host (`vcpu::assist`,
/// `vcpu::syscall`), counted per vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssistKind {
    /// `int3` the emulator failed on: RIP+1, #BP injected.
    Int3 = 0,
    Clac = 1,
    Stac = 2,
    Fwait = 3,
    /// A guest LSTAR write seen through the MSR filter.
    LstarWrite = 4,
    /// The #PF-handler breakpoint (re)armed.
    Arm = 5,
    /// A half-done SYSCALL entered at LSTAR.
    Syscall = 6,
    /// An ordinary #PF let through by performing the handler's first
    /// instructions (endbr64, NOPs, clac, cld) and resuming past them.
    PfSkip = 7,
    /// An ordinary #PF let through with RFLAGS.RF.
    PfResume = 8,
    /// An ordinary #PF let through by single-stepping.
    PfStep = 9,
}

pub const ASSIST_KIND_COUNT: usize = 10;

pub const ASSIST_KINDS: [(AssistKind, &str); ASSIST_KIND_COUNT] = [
    (AssistKind::Int3, "int3"),
    (AssistKind::Clac, "clac"),
    (AssistKind::Stac, "stac"),
    (AssistKind::Fwait, "fwait"),
    (AssistKind::LstarWrite, "lstar_write"),
    (AssistKind::Arm, "arm"),
    (AssistKind::Syscall, "syscall"),
    (AssistKind::PfSkip, "pf_skip"),
    (AssistKind::PfResume, "pf_resume"),
    (AssistKind::PfStep, "pf_step"),
];

/// Latency histogram buckets: upper bounds in ns, powers of two from 1 µs
/// to ~8.4 ms, plus +Inf.
pub const LATENCY_BUCKETS: usize = 15;

pub fn bucket_bound_ns(i: usize) -> Option<u64> {
    (i + 1 < LATENCY_BUCKETS).then(|| 1024u64 << i)
}

fn bucket_of(ns: u64) -> usize {
    if ns <= 1024 {
        return 0;
    }
    let b = (64 - (ns - 1).leading_zeros()) as usize - 10;
    b.min(LATENCY_BUCKETS - 1)
}

/// One owner-written counter on its own cache line.
#[repr(align(64))]
#[derive(Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Owner-only increment: a relaxed load and store (no locked RMW).
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Owner-only store.
    #[inline]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
}

/// Counters of one fault-serving thread (a vCPU or a handler thread).
#[derive(Default)]
pub struct FaultStats {
    pub by_kind: [Counter; FAULT_KIND_COUNT],
    /// Installs done on the speculative path (trylock succeeded).
    pub speculative_installs: Counter,
    /// Speculative attempts that bailed out (generation, invalid, contended).
    pub retries: Counter,
    /// Installs done under the slots lock after a retry.
    pub slow_path_installs: Counter,
    /// Faults whose page another thread had already installed (EEXIST).
    pub already_present: Counter,
    /// Pages installed (a fault-around install counts every page).
    pub pages_installed: Counter,
    /// Bytes read from page sources (image files).
    pub source_bytes: Counter,
    pub latency_buckets: [Counter; LATENCY_BUCKETS],
    pub latency_sum_ns: Counter,
    pub latency_count: Counter,
    /// The slowest fault (ns): a stuck fault shows here.
    pub latency_max_ns: Counter,
    /// Exits by [`ExitKind`] (vCPU threads only).
    pub exits: [Counter; EXIT_KIND_COUNT],
    /// Assists by [`AssistKind`] (vCPU threads on PVM hosts only).
    pub assists: [Counter; ASSIST_KIND_COUNT],
    /// Time spent in the VMM on assists (from the exit to the re-entry);
    /// the SYSCALL assist's breakpoint exits dominate it, so the summary
    /// divides it by the guest #PFs for a per-#PF cost.
    pub assist_ns: Counter,
}

impl FaultStats {
    #[inline]
    pub fn record_latency(&self, ns: u64) {
        self.latency_buckets[bucket_of(ns)].add(1);
        self.latency_sum_ns.add(ns);
        self.latency_count.add(1);
        if ns > self.latency_max_ns.get() {
            self.latency_max_ns.set(ns);
        }
    }

    pub fn faults(&self) -> u64 {
        self.by_kind.iter().map(Counter::get).sum()
    }

    /// A plain copy for reporting.
    pub fn snapshot(&self) -> FaultSnapshot {
        FaultSnapshot {
            by_kind: std::array::from_fn(|i| self.by_kind[i].get()),
            speculative_installs: self.speculative_installs.get(),
            retries: self.retries.get(),
            slow_path_installs: self.slow_path_installs.get(),
            already_present: self.already_present.get(),
            pages_installed: self.pages_installed.get(),
            source_bytes: self.source_bytes.get(),
            latency_buckets: std::array::from_fn(|i| self.latency_buckets[i].get()),
            latency_sum_ns: self.latency_sum_ns.get(),
            latency_count: self.latency_count.get(),
            latency_max_ns: self.latency_max_ns.get(),
            exits: std::array::from_fn(|i| self.exits[i].get()),
            assists: std::array::from_fn(|i| self.assists[i].get()),
            assist_ns: self.assist_ns.get(),
        }
    }
}

/// A copy of [`FaultStats`] at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct FaultSnapshot {
    pub by_kind: [u64; FAULT_KIND_COUNT],
    pub speculative_installs: u64,
    pub retries: u64,
    pub slow_path_installs: u64,
    pub already_present: u64,
    pub pages_installed: u64,
    pub source_bytes: u64,
    pub latency_buckets: [u64; LATENCY_BUCKETS],
    pub latency_sum_ns: u64,
    pub latency_count: u64,
    pub latency_max_ns: u64,
    pub exits: [u64; EXIT_KIND_COUNT],
    pub assists: [u64; ASSIST_KIND_COUNT],
    pub assist_ns: u64,
}

impl FaultSnapshot {
    pub fn faults(&self) -> u64 {
        self.by_kind.iter().sum()
    }

    pub fn add(&mut self, o: &FaultSnapshot) {
        for i in 0..self.by_kind.len() {
            self.by_kind[i] += o.by_kind[i];
        }
        self.speculative_installs += o.speculative_installs;
        self.retries += o.retries;
        self.slow_path_installs += o.slow_path_installs;
        self.already_present += o.already_present;
        self.pages_installed += o.pages_installed;
        self.source_bytes += o.source_bytes;
        for i in 0..LATENCY_BUCKETS {
            self.latency_buckets[i] += o.latency_buckets[i];
        }
        self.latency_sum_ns += o.latency_sum_ns;
        self.latency_count += o.latency_count;
        self.latency_max_ns = self.latency_max_ns.max(o.latency_max_ns);
        for i in 0..self.exits.len() {
            self.exits[i] += o.exits[i];
        }
        for i in 0..self.assists.len() {
            self.assists[i] += o.assists[i];
        }
        self.assist_ns += o.assist_ns;
    }

    /// What happened between `earlier` and this snapshot (counters only go
    /// up; a counter that went down counts 0).
    pub fn since(&self, earlier: &FaultSnapshot) -> FaultSnapshot {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        FaultSnapshot {
            by_kind: std::array::from_fn(|i| d(self.by_kind[i], earlier.by_kind[i])),
            speculative_installs: d(self.speculative_installs, earlier.speculative_installs),
            retries: d(self.retries, earlier.retries),
            slow_path_installs: d(self.slow_path_installs, earlier.slow_path_installs),
            already_present: d(self.already_present, earlier.already_present),
            pages_installed: d(self.pages_installed, earlier.pages_installed),
            source_bytes: d(self.source_bytes, earlier.source_bytes),
            latency_buckets: std::array::from_fn(|i| {
                d(self.latency_buckets[i], earlier.latency_buckets[i])
            }),
            latency_sum_ns: d(self.latency_sum_ns, earlier.latency_sum_ns),
            latency_count: d(self.latency_count, earlier.latency_count),
            // The max over the whole run: not a difference.
            latency_max_ns: self.latency_max_ns,
            exits: std::array::from_fn(|i| d(self.exits[i], earlier.exits[i])),
            assists: std::array::from_fn(|i| d(self.assists[i], earlier.assists[i])),
            assist_ns: d(self.assist_ns, earlier.assist_ns),
        }
    }

    /// Latency quantile estimated from the histogram (upper bucket bound, ns;
    /// in the open-ended top bucket, the largest latency seen).
    pub fn latency_quantile_ns(&self, q: f64) -> Option<u64> {
        if self.latency_count == 0 {
            return None;
        }
        let target = ((self.latency_count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency_buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Some(bucket_bound_ns(i).unwrap_or(self.latency_max_ns));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1024), 0);
        assert_eq!(bucket_of(1025), 1);
        assert_eq!(bucket_of(2048), 1);
        assert_eq!(bucket_of(2049), 2);
        assert_eq!(bucket_of(u64::MAX), LATENCY_BUCKETS - 1);
        assert_eq!(bucket_bound_ns(0), Some(1024));
        assert_eq!(bucket_bound_ns(LATENCY_BUCKETS - 1), None);
    }

    #[test]
    fn quantiles_and_counts() {
        let s = FaultStats::default();
        for _ in 0..99 {
            s.record_latency(1500);
        }
        s.record_latency(1_000_000);
        s.by_kind[FaultKind::Mmio as usize].add(100);
        let snap = s.snapshot();
        assert_eq!(snap.faults(), 100);
        assert_eq!(snap.latency_count, 100);
        assert_eq!(snap.latency_quantile_ns(0.5), Some(2048));
        assert_eq!(snap.latency_quantile_ns(0.99), Some(2048));
        assert_eq!(snap.latency_quantile_ns(1.0), Some(1 << 20));
        // Past the last bound: the largest latency seen, not u64::MAX (the
        // bench printed p99 = 18446744073709552.0 us for a cold image).
        s.record_latency(u64::MAX / 2);
        s.record_latency(5_000_000_000);
        let snap = s.snapshot();
        assert_eq!(snap.latency_quantile_ns(1.0), Some(u64::MAX / 2));
    }
}
