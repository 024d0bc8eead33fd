//! The background prefetch of a restored VM's memory: one thread installs
//! the pages of a plan (the recorded working set, sorted into long runs,
//! then, for `--prefetch all`, every page the memory file holds) through
//! the engine's install protocol ([`FaultEngine::prefetch`]), racing the
//! vCPUs: whoever comes first installs a page, the other finds it present.
//! A page the guest discarded or unplugged since is skipped, never filled.

use std::sync::Arc;
use std::thread;

use vmm_exit::VmExit;
use vmm_memory::PAGE_SIZE;

use crate::engine::{FaultCtx, FaultEngine, Prefetched};
use crate::restore::RestoreStat;
use crate::stats::FaultStats;
use crate::ServeError;

/// Pages installed at once (one read of the memory file, one ioctl).
pub const CHUNK: u64 = 256;

/// What to prefetch, in order: runs of `(gpa, pages)`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The recorded working set (its hits and misses are counted).
    pub working_set: Vec<(u64, u64)>,
    /// Then the rest.
    pub rest: Vec<(u64, u64)>,
}

impl Plan {
    pub fn pages(&self) -> u64 {
        self.working_set
            .iter()
            .chain(&self.rest)
            .map(|(_, n)| n)
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.pages() == 0
    }
}

/// Sort runs by address and merge the ones that touch or overlap (a
/// recorded set in touch order becomes long sequential reads).
pub fn coalesce(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (gpa, pages) in runs {
        let end = gpa + pages * PAGE_SIZE;
        match out.last_mut() {
            Some((g, n)) if *g + *n * PAGE_SIZE >= gpa => {
                *n = (end.max(*g + *n * PAGE_SIZE) - *g) / PAGE_SIZE;
            }
            _ => out.push((gpa, pages)),
        }
    }
    out
}

/// Start the prefetch thread; it ends when the plan is done or the VM
/// stops. `on_start` runs first (its seccomp filter) and it serves only if
/// that returns true.
pub fn spawn(
    engine: Arc<FaultEngine>,
    exit: Arc<VmExit>,
    plan: Plan,
    stats: Arc<FaultStats>,
    on_start: impl FnOnce() -> bool + Send + 'static,
) -> std::io::Result<thread::JoinHandle<()>> {
    engine
        .restore_stats()
        .counters
        .set(RestoreStat::PrefetchPlanned, plan.pages());
    thread::Builder::new()
        .name("prefetch".into())
        .spawn(move || {
            if on_start() {
                run(&engine, &exit, &plan, stats);
            }
        })
}

/// Go through the plan (the thread's body; tests call it directly).
pub fn run(engine: &FaultEngine, exit: &VmExit, plan: &Plan, stats: Arc<FaultStats>) {
    let mut ctx = FaultCtx::new(stats);
    let mut progress = Progress::new(plan.pages());
    // The guest goes first: the prefetch's reads and copies start once a
    // vCPU has entered (they would delay its first instruction on a busy
    // host), or after a second if none does.
    let wait = std::time::Instant::now();
    while !engine.restore_stats().has_entered()
        && !exit.is_stopping()
        && wait.elapsed() < std::time::Duration::from_secs(1)
    {
        thread::sleep(std::time::Duration::from_micros(200));
    }
    // The recorded set is read ahead whole: the vCPUs' first touches
    // (in their order, not the plan's) find their pages in the page cache.
    for &(gpa, pages) in &plan.working_set {
        engine.advise(gpa, pages);
    }
    let phases = [(true, &plan.working_set), (false, &plan.rest)];
    for (working_set, runs) in phases {
        for &(gpa, pages) in runs {
            let end = gpa + pages * PAGE_SIZE;
            let mut at = gpa;
            while at < end {
                if exit.is_stopping() {
                    return;
                }
                let want = CHUNK.min((end - at) / PAGE_SIZE);
                let done = match engine.prefetch(&mut ctx, at, want) {
                    Ok(p) => count(engine, p, working_set),
                    Err(error) => {
                        exit.fail(ServeError::Fault {
                            thread: "prefetch",
                            gpa: at,
                            error,
                        });
                        return;
                    }
                };
                at += done * PAGE_SIZE;
                progress.advance(engine, done);
            }
        }
    }
    progress.finish();
}

/// Pages a prefetch step went through, counted.
fn count(engine: &FaultEngine, p: Prefetched, working_set: bool) -> u64 {
    let stats = engine.restore_stats();
    match p {
        Prefetched::Installed(n) => {
            if working_set {
                stats.add(RestoreStat::WorkingSetHits, n);
            }
            n
        }
        Prefetched::Present(n) => {
            if working_set {
                stats.add(RestoreStat::WorkingSetMisses, n);
            }
            n
        }
        Prefetched::Skipped => 1,
    }
}

/// The done gauge, and a log line every tenth of a long plan.
struct Progress {
    total: u64,
    done: u64,
    next_tenth: u64,
    start: std::time::Instant,
}

/// Plans shorter than this (64 MiB) log only their end.
const LOG_PROGRESS_PAGES: u64 = 16384;

impl Progress {
    fn new(total: u64) -> Self {
        Self {
            total,
            done: 0,
            next_tenth: 1,
            start: std::time::Instant::now(),
        }
    }

    fn advance(&mut self, engine: &FaultEngine, n: u64) {
        self.done += n;
        engine
            .restore_stats()
            .counters
            .set(RestoreStat::PrefetchDone, self.done);
        if self.total >= LOG_PROGRESS_PAGES && self.done * 10 >= self.next_tenth * self.total {
            // Progress of long work is for the operator: on stderr.
            eprintln!(
                "vmm: prefetch: {}% ({} of {} MiB) in {:.1} s",
                self.next_tenth * 10,
                (self.done * PAGE_SIZE) >> 20,
                (self.total * PAGE_SIZE) >> 20,
                self.start.elapsed().as_secs_f64()
            );
            self.next_tenth = self.done * 10 / self.total + 1;
        }
    }

    fn finish(&self) {
        log::info!(
            "prefetch: done, {} MiB in {:.1} ms",
            (self.done * PAGE_SIZE) >> 20,
            self.start.elapsed().as_secs_f64() * 1e3
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalesce_sorts_and_merges() {
        let p = PAGE_SIZE;
        let runs = vec![(10 * p, 2), (0, 1), (p, 1), (11 * p, 3), (20 * p, 1)];
        assert_eq!(coalesce(runs), vec![(0, 2), (10 * p, 4), (20 * p, 1)]);
        assert_eq!(coalesce(vec![(0, 4), (p, 1)]), vec![(0, 4)]);
    }

    /// A prefetch never writes over a page a vCPU installed and changed: a
    /// memory file of 64 pages, page 5 installed by a fault (with a window
    /// of 1) and rewritten before the prefetch looks (it is skipped), page
    /// 40 installed and written by a racing "vCPU" just after the prefetch
    /// looked and before it reads (the install must refuse it). Real
    /// userfaultfd (SIGBUS mode, as vcpu mode), no KVM.
    #[test]
    fn prefetch_keeps_what_a_vcpu_installed() {
        use std::io::Write;
        use vmm_memory::{ImageFile, MemoryManager, NoKvm, PageSource, RamRange};
        const PAGES: u64 = 64;
        let path = std::env::temp_dir().join(format!("vmm-prefetch-test-{}", std::process::id()));
        let mut f = std::fs::File::create(&path).unwrap();
        for p in 0..PAGES {
            f.write_all(&[p as u8 + 1; PAGE_SIZE as usize]).unwrap();
        }
        drop(f);
        let image = ImageFile::open(&path, PAGES * PAGE_SIZE).unwrap();
        let _ = std::fs::remove_file(&path);
        let size = PAGES * PAGE_SIZE;
        let memory = Arc::new(
            MemoryManager::new(
                Arc::new(NoKvm),
                &[RamRange { gpa: 0, size }],
                PageSource::File(image),
                8,
            )
            .unwrap(),
        );
        let uffd = Arc::new(
            userfaultfd::UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(false)
                .require_features(userfaultfd::FeatureFlags::SIGBUS)
                .create()
                .expect("userfaultfd (root, or vm.unprivileged_userfaultfd=1)"),
        );
        memory.attach_uffd(uffd.clone()).unwrap();
        let exit = Arc::new(VmExit::new());
        let restore = Arc::new(crate::RestoreStats::new(std::time::Instant::now()));
        let engine = FaultEngine::new(
            memory.clone(),
            uffd,
            exit.clone(),
            crate::Wake::Nobody,
            1,
            1,
            restore.clone(),
        );
        let stats = Arc::new(FaultStats::default());
        let mut ctx = FaultCtx::for_vcpu(stats.clone(), 0);
        let page = 5 * PAGE_SIZE;
        engine
            .resolve(&mut ctx, page, &mut crate::Access::None)
            .unwrap();
        let hva = |gpa: u64| {
            let snap = memory.snapshot();
            let slot = snap.lookup(gpa).unwrap();
            (slot.backing.hva() + (gpa - slot.gpa)) as *mut u8
        };
        // SAFETY: page 5 is installed (resident) in the test's mapping.
        unsafe {
            assert_eq!(
                std::ptr::read_volatile(hva(page)),
                6,
                "the fault read the file"
            );
            std::ptr::write_volatile(hva(page), 0xee);
        }
        // The race: at the prefetch's look at page 40, a "vCPU" installs
        // it (0xdd) first.
        let racer = memory.uffd().unwrap().clone();
        let page40 = hva(40 * PAGE_SIZE) as usize;
        let raced = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let r = raced.clone();
        let hook: Box<dyn Fn(u64) + Send + Sync> = Box::new(move |gpa| {
            if gpa == 40 * PAGE_SIZE && !r.swap(true, std::sync::atomic::Ordering::SeqCst) {
                let src = Box::new(crate::engine::Page([0xdd; PAGE_SIZE as usize]));
                // SAFETY: one page from a page-sized buffer into the
                // registered, missing page 40.
                unsafe {
                    racer
                        .copy(
                            (&*src as *const crate::engine::Page).cast(),
                            page40 as *mut libc::c_void,
                            PAGE_SIZE as usize,
                            true,
                        )
                        .unwrap();
                }
            }
        });
        assert!(engine.after_residency.set(hook).is_ok());
        let plan = Plan {
            working_set: vec![(0, 40), (40 * PAGE_SIZE, PAGES - 40)],
            rest: Vec::new(),
        };
        restore.entered();
        run(&engine, &exit, &plan, stats);
        assert!(!exit.is_stopping(), "the prefetch failed");
        for p in 0..PAGES {
            let want = match p {
                5 => 0xee,
                40 => 0xdd,
                _ => p as u8 + 1,
            };
            // SAFETY: every page is installed now (the prefetch's claim; a
            // missing one raises SIGBUS and fails the test loudly).
            let got = unsafe { std::ptr::read_volatile(hva(p * PAGE_SIZE)) };
            assert_eq!(got, want, "page {p} after the prefetch");
        }
        assert!(
            raced.load(std::sync::atomic::Ordering::SeqCst),
            "the race was not run"
        );
        assert_eq!(restore.get(RestoreStat::PrefetchPages), PAGES - 2);
        assert_eq!(restore.get(RestoreStat::WorkingSetMisses), 2);
    }
}
