//! Per-thread fault counters: one table ([`THREAD_METRICS`]) declares every
//! series a fault-serving thread exports; [`FaultStats`] holds its values,
//! written only by their owner thread with relaxed atomics (no lock, no
//! allocation on the fault path), read by anyone.

use std::ops::Index;

use vmm_counters::{metrics, Counter, Counters, Metric, Scope};

const FAULTS: &str = "Stage-2 faults served, by how they reached the VMM";
const EXITS: &str = "KVM_RUN exits, by reason";
const ASSISTS: &str = "What the VMM did for the guest on a PVM host, by kind";
const VCPU: Scope = Scope::VCPU;

metrics! {
    /// The series of one fault-serving thread (a vCPU, a handler thread, or
    /// another VMM thread that met a missing page).
    pub enum ThreadStat in THREAD_METRICS {
        /// `KVM_EXIT_MMIO` at a GPA inside a RAM memslot.
        FaultMmio = Metric::counter("vmm_faults", "faults", FAULTS)
            .labels(&[("kind", "mmio")])
            .only(VCPU),
        /// `KVM_EXIT_INTERNAL_ERROR` (emulation failure) with RIP on a
        /// missing page.
        FaultEmulationFailure = Metric::counter("vmm_faults", "faults", FAULTS)
            .labels(&[("kind", "emulation_failure")])
            .only(VCPU),
        /// `KVM_EXIT_MEMORY_FAULT`.
        FaultMemoryFault = Metric::counter("vmm_faults", "faults", FAULTS)
            .labels(&[("kind", "memory_fault")])
            .only(VCPU),
        /// SIGBUS in a VMM thread on guest RAM (a vCPU inside `KVM_RUN`, a
        /// device or API thread).
        FaultSigbus = Metric::counter("vmm_faults", "faults", FAULTS)
            .labels(&[("kind", "sigbus")])
            .only(VCPU.or(Scope::VMM)),
        /// A blocking userfaultfd event served by a handler thread.
        FaultUserfault = Metric::counter("vmm_faults", "faults", FAULTS)
            .labels(&[("kind", "userfault")])
            .only(Scope::HANDLER),
        SpeculativeInstalls = Metric::counter(
            "vmm_speculative_installs",
            "speculative_installs",
            "Pages installed on the speculative (lock-free lookup + trylock) path",
        ),
        Retries = Metric::counter(
            "vmm_fault_retries",
            "retries",
            "Speculative attempts that bailed out (memslot change, removal, contention) and retried under the slots lock",
        ),
        SlowPathInstalls = Metric::counter(
            "vmm_slow_path_installs",
            "slow_path_installs",
            "Pages installed under the slots lock after a retry",
        ),
        AlreadyPresent = Metric::counter(
            "vmm_already_present",
            "already_present",
            "Faults whose page another thread had installed first",
        ),
        PagesInstalled = Metric::counter(
            "vmm_pages_installed",
            "pages_installed",
            "Pages installed by this thread",
        ),
        SourceBytes = Metric::counter(
            "vmm_source_read_bytes",
            "source_bytes",
            "Bytes read from page sources (memory image files)",
        ),
        ExitIo = Metric::counter("vmm_exits", "exits", EXITS).labels(&[("reason", "io")]).only(VCPU),
        ExitMmio = Metric::counter("vmm_exits", "exits", EXITS).labels(&[("reason", "mmio")]).only(VCPU),
        ExitHlt = Metric::counter("vmm_exits", "exits", EXITS).labels(&[("reason", "hlt")]).only(VCPU),
        ExitShutdown = Metric::counter("vmm_exits", "exits", EXITS)
            .labels(&[("reason", "shutdown")])
            .only(VCPU),
        ExitInternalError = Metric::counter("vmm_exits", "exits", EXITS)
            .labels(&[("reason", "internal_error")])
            .only(VCPU),
        ExitMemoryFault = Metric::counter("vmm_exits", "exits", EXITS)
            .labels(&[("reason", "memory_fault")])
            .only(VCPU),
        ExitSystemEvent = Metric::counter("vmm_exits", "exits", EXITS)
            .labels(&[("reason", "system_event")])
            .only(VCPU),
        ExitIntr = Metric::counter("vmm_exits", "exits", EXITS).labels(&[("reason", "intr")]).only(VCPU),
        ExitOther = Metric::counter("vmm_exits", "exits", EXITS).labels(&[("reason", "other")]).only(VCPU),
        /// `KVM_EXIT_DEBUG` (the SYSCALL assist's breakpoint).
        ExitDebug = Metric::counter("vmm_exits", "exits", EXITS).labels(&[("reason", "debug")]).only(VCPU),
        /// `KVM_EXIT_X86_WRMSR`/`RDMSR` (the MSR filter).
        ExitMsr = Metric::counter("vmm_exits", "exits", EXITS).labels(&[("reason", "msr")]).only(VCPU),
        /// `KVM_EXIT_DIRTY_RING_FULL` (`--dirty-log ring`): the vCPU
        /// harvested the rings before it ran again.
        ExitDirtyRingFull = Metric::counter("vmm_exits", "exits", EXITS)
            .labels(&[("reason", "dirty_ring_full")])
            .only(VCPU),
        /// `int3` the emulator failed on: RIP+1, #BP injected.
        AssistInt3 = Metric::counter("vmm_assists", "assists", ASSISTS).labels(&[("kind", "int3")]).only(VCPU),
        AssistClac = Metric::counter("vmm_assists", "assists", ASSISTS).labels(&[("kind", "clac")]).only(VCPU),
        AssistStac = Metric::counter("vmm_assists", "assists", ASSISTS).labels(&[("kind", "stac")]).only(VCPU),
        AssistFwait = Metric::counter("vmm_assists", "assists", ASSISTS)
            .labels(&[("kind", "fwait")])
            .only(VCPU),
        /// A guest LSTAR write seen through the MSR filter.
        AssistLstarWrite = Metric::counter("vmm_assists", "assists", ASSISTS)
            .labels(&[("kind", "lstar_write")])
            .only(VCPU),
        /// The #PF-handler breakpoint (re)armed.
        AssistArm = Metric::counter("vmm_assists", "assists", ASSISTS).labels(&[("kind", "arm")]).only(VCPU),
        /// A half-done SYSCALL entered at LSTAR.
        AssistSyscall = Metric::counter("vmm_assists", "assists", ASSISTS)
            .labels(&[("kind", "syscall")])
            .only(VCPU),
        /// An ordinary #PF let through by performing the handler's first
        /// instructions (endbr64, NOPs, clac, cld) and resuming past them.
        AssistPfSkip = Metric::counter("vmm_assists", "assists", ASSISTS)
            .labels(&[("kind", "pf_skip")])
            .only(VCPU),
        /// An ordinary #PF let through with RFLAGS.RF.
        AssistPfResume = Metric::counter("vmm_assists", "assists", ASSISTS)
            .labels(&[("kind", "pf_resume")])
            .only(VCPU),
        /// An ordinary #PF let through by single-stepping.
        AssistPfStep = Metric::counter("vmm_assists", "assists", ASSISTS)
            .labels(&[("kind", "pf_step")])
            .only(VCPU),
        /// Time spent in the VMM on assists (from the exit to the re-entry);
        /// the SYSCALL assist's breakpoint exits dominate it, so the summary
        /// divides it by the guest #PFs for a per-#PF cost.
        AssistTime = Metric::counter(
            "vmm_assist_seconds",
            "assist_seconds",
            "Time the VMM spent on assists (exit to re-entry)",
        )
        .nanoseconds()
        .only(VCPU),
        /// Time this vCPU waited for guest memory: its faults, from the
        /// exit to the re-entry (`vcpu` mode) or from the handler's read of
        /// the userfault to its wake (`handler` mode).
        BlocktimeNs = Metric::counter(
            "vmm_vcpu_blocktime_seconds",
            "blocktime_seconds",
            "Time this vCPU waited for guest memory (its faults, served on its thread or by a handler)",
        )
        .nanoseconds()
        .only(VCPU),
    }
}

/// The fault latency histogram of every thread.
pub static FAULT_LATENCY: Metric = Metric::histogram(
    "vmm_fault_latency_seconds",
    "fault_latency",
    "Fault latency from the exit (or event) to re-entry (or wake)",
);

/// How a fault reached the VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    Mmio,
    EmulationFailure,
    MemoryFault,
    Sigbus,
    Userfault,
}

impl From<FaultKind> for ThreadStat {
    fn from(k: FaultKind) -> Self {
        match k {
            FaultKind::Mmio => ThreadStat::FaultMmio,
            FaultKind::EmulationFailure => ThreadStat::FaultEmulationFailure,
            FaultKind::MemoryFault => ThreadStat::FaultMemoryFault,
            FaultKind::Sigbus => ThreadStat::FaultSigbus,
            FaultKind::Userfault => ThreadStat::FaultUserfault,
        }
    }
}

/// The rows that count faults (one per [`FaultKind`]).
pub const FAULT_ROWS: [ThreadStat; 5] = [
    ThreadStat::FaultMmio,
    ThreadStat::FaultEmulationFailure,
    ThreadStat::FaultMemoryFault,
    ThreadStat::FaultSigbus,
    ThreadStat::FaultUserfault,
];

/// `KVM_RUN` exits by reason, counted per vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    Io,
    Mmio,
    Hlt,
    Shutdown,
    InternalError,
    MemoryFault,
    SystemEvent,
    Intr,
    Other,
    Debug,
    Msr,
    DirtyRingFull,
}

impl From<ExitKind> for ThreadStat {
    fn from(k: ExitKind) -> Self {
        match k {
            ExitKind::Io => ThreadStat::ExitIo,
            ExitKind::Mmio => ThreadStat::ExitMmio,
            ExitKind::Hlt => ThreadStat::ExitHlt,
            ExitKind::Shutdown => ThreadStat::ExitShutdown,
            ExitKind::InternalError => ThreadStat::ExitInternalError,
            ExitKind::MemoryFault => ThreadStat::ExitMemoryFault,
            ExitKind::SystemEvent => ThreadStat::ExitSystemEvent,
            ExitKind::Intr => ThreadStat::ExitIntr,
            ExitKind::Other => ThreadStat::ExitOther,
            ExitKind::Debug => ThreadStat::ExitDebug,
            ExitKind::Msr => ThreadStat::ExitMsr,
            ExitKind::DirtyRingFull => ThreadStat::ExitDirtyRingFull,
        }
    }
}

/// What the VMM did for a guest on a PVM host (`vcpu::assist`,
/// `vcpu::syscall`), counted per vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssistKind {
    Int3,
    Clac,
    Stac,
    Fwait,
    LstarWrite,
    Arm,
    Syscall,
    PfSkip,
    PfResume,
    PfStep,
}

impl From<AssistKind> for ThreadStat {
    fn from(k: AssistKind) -> Self {
        match k {
            AssistKind::Int3 => ThreadStat::AssistInt3,
            AssistKind::Clac => ThreadStat::AssistClac,
            AssistKind::Stac => ThreadStat::AssistStac,
            AssistKind::Fwait => ThreadStat::AssistFwait,
            AssistKind::LstarWrite => ThreadStat::AssistLstarWrite,
            AssistKind::Arm => ThreadStat::AssistArm,
            AssistKind::Syscall => ThreadStat::AssistSyscall,
            AssistKind::PfSkip => ThreadStat::AssistPfSkip,
            AssistKind::PfResume => ThreadStat::AssistPfResume,
            AssistKind::PfStep => ThreadStat::AssistPfStep,
        }
    }
}

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

/// One thread's fault latency histogram (owner-written).
#[derive(Default)]
pub struct Latency {
    buckets: [Counter; LATENCY_BUCKETS],
    sum_ns: Counter,
    count: Counter,
    /// The slowest fault (ns): a stuck fault shows here.
    max_ns: Counter,
}

impl Latency {
    /// Owner-only: count one latency of `ns`.
    #[inline]
    pub fn record(&self, ns: u64) {
        self.buckets[bucket_of(ns)].add(1);
        self.sum_ns.add(ns);
        self.count.add(1);
        if ns > self.max_ns.get() {
            self.max_ns.set(ns);
        }
    }

    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            buckets: std::array::from_fn(|i| self.buckets[i].get()),
            sum_ns: self.sum_ns.get(),
            count: self.count.get(),
            max_ns: self.max_ns.get(),
        }
    }
}

/// A copy of a [`Latency`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct LatencySnapshot {
    /// Per bucket (not cumulative).
    pub buckets: [u64; LATENCY_BUCKETS],
    pub sum_ns: u64,
    pub count: u64,
    pub max_ns: u64,
}

/// Counters of one fault-serving thread (a vCPU or a handler thread).
#[derive(Default)]
pub struct FaultStats {
    counters: Counters<ThreadStat, { ThreadStat::COUNT }>,
    latency: Latency,
}

impl FaultStats {
    /// Owner-only: add `n` to row `stat`.
    #[inline]
    pub fn add(&self, stat: impl Into<ThreadStat>, n: u64) {
        self.counters.add(stat.into(), n);
    }

    /// Add from a thread that does not own the counters (a handler
    /// charging a vCPU's wait).
    #[inline]
    pub fn add_shared(&self, stat: impl Into<ThreadStat>, n: u64) {
        self.counters.add_shared(stat.into(), n);
    }

    #[inline]
    pub fn get(&self, stat: impl Into<ThreadStat>) -> u64 {
        self.counters.get(stat.into())
    }

    #[inline]
    pub fn record_latency(&self, ns: u64) {
        self.latency.record(ns);
    }

    pub fn faults(&self) -> u64 {
        FAULT_ROWS.iter().map(|r| self.get(*r)).sum()
    }

    /// A plain copy for reporting.
    pub fn snapshot(&self) -> FaultSnapshot {
        FaultSnapshot {
            values: self.counters.read(),
            latency: self.latency.snapshot(),
        }
    }
}

/// A copy of [`FaultStats`] at one moment: `values[i]` is row `i` of
/// [`THREAD_METRICS`]; index it with a [`ThreadStat`] (or a kind).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FaultSnapshot {
    pub values: [u64; ThreadStat::COUNT],
    pub latency: LatencySnapshot,
}

impl Default for FaultSnapshot {
    fn default() -> Self {
        Self {
            values: [0; ThreadStat::COUNT],
            latency: LatencySnapshot::default(),
        }
    }
}

impl<T: Into<ThreadStat>> Index<T> for FaultSnapshot {
    type Output = u64;
    fn index(&self, stat: T) -> &u64 {
        &self.values[stat.into() as usize]
    }
}

impl FaultSnapshot {
    pub fn faults(&self) -> u64 {
        self.total("faults")
    }

    /// The sum of a family's rows (by JSON key: "faults", "exits", ...).
    pub fn total(&self, key: &str) -> u64 {
        THREAD_METRICS
            .iter()
            .zip(&self.values)
            .filter(|(m, _)| m.key == key)
            .map(|(_, v)| v)
            .sum()
    }

    pub fn add(&mut self, o: &FaultSnapshot) {
        for (a, b) in self.values.iter_mut().zip(&o.values) {
            *a += b;
        }
        let (l, m) = (&mut self.latency, &o.latency);
        for (a, b) in l.buckets.iter_mut().zip(&m.buckets) {
            *a += b;
        }
        l.sum_ns += m.sum_ns;
        l.count += m.count;
        l.max_ns = l.max_ns.max(m.max_ns);
    }

    /// What happened between `earlier` and this snapshot (counters only go
    /// up; a counter that went down counts 0).
    pub fn since(&self, earlier: &FaultSnapshot) -> FaultSnapshot {
        let d = |a: u64, b: u64| a.saturating_sub(b);
        let (l, e) = (&self.latency, &earlier.latency);
        FaultSnapshot {
            values: std::array::from_fn(|i| d(self.values[i], earlier.values[i])),
            latency: LatencySnapshot {
                buckets: std::array::from_fn(|i| d(l.buckets[i], e.buckets[i])),
                sum_ns: d(l.sum_ns, e.sum_ns),
                count: d(l.count, e.count),
                // The max over the whole run: not a difference.
                max_ns: l.max_ns,
            },
        }
    }

    /// Latency quantile estimated from the histogram (upper bucket bound, ns;
    /// in the open-ended top bucket, the largest latency seen).
    pub fn latency_quantile_ns(&self, q: f64) -> Option<u64> {
        let l = &self.latency;
        if l.count == 0 {
            return None;
        }
        let target = ((l.count as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in l.buckets.iter().enumerate() {
            seen += n;
            if seen >= target {
                return Some(bucket_bound_ns(i).unwrap_or(l.max_ns));
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
        s.add(FaultKind::Mmio, 100);
        let snap = s.snapshot();
        assert_eq!(snap.faults(), 100);
        assert_eq!(snap[FaultKind::Mmio], 100);
        assert_eq!(snap.latency.count, 100);
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

    /// Rows of one family are adjacent and share their help and labels'
    /// names, and every kind enum maps onto a row of its family.
    #[test]
    fn the_table_is_consistent() {
        let mut seen = std::collections::BTreeSet::new();
        let mut last = "";
        for m in &THREAD_METRICS {
            if m.name != last {
                assert!(seen.insert(m.name), "{} is split in the table", m.name);
                last = m.name;
            }
        }
        for (i, m) in THREAD_METRICS.iter().enumerate() {
            for n in &THREAD_METRICS[i + 1..] {
                if n.name == m.name {
                    assert_eq!((n.key, n.help), (m.key, m.help));
                    assert_ne!(n.labels, m.labels, "{} twice", m.name);
                } else {
                    assert_ne!(n.key, m.key, "two families keyed {}", m.key);
                }
            }
        }
        for r in FAULT_ROWS {
            assert_eq!(r.metric().name, "vmm_faults");
        }
        assert_eq!(
            ThreadStat::from(ExitKind::Msr).metric().label_value(),
            Some("msr")
        );
        assert_eq!(
            ThreadStat::from(AssistKind::PfStep).metric().label_value(),
            Some("pf_step")
        );
    }
}
