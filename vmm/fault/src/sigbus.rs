//! SIGBUS on guest RAM: with `UFFD_FEATURE_SIGBUS` a VMM thread that touches
//! a missing page (the host delivers it for `fxrstor` inside `KVM_RUN`, and
//! for any VMM access to guest memory) gets SIGBUS instead of blocking. The
//! handler resolves the fault and returns, so the access is retried; a guest
//! access can never kill the VMM this way.
//!
//! Signal safety: SIGBUS is synchronous, raised by an access to guest RAM,
//! which the VMM never makes from inside the allocator or while holding the
//! slots lock; the handler's work (an arc-swap load, a lock-free install
//! attempt, an ioctl) is safe at such points. A thread's first SIGBUS may
//! allocate its bounce page; vCPU threads allocate theirs up front.

use std::cell::RefCell;
use std::sync::{Arc, Weak};

use arc_swap::ArcSwap;

use crate::engine::{Access, FaultCtx, FaultEngine, FaultError};
use crate::stats::{FaultKind, FaultStats};
use crate::ServeError;

/// Engines of the VMs in this process (tests run several at once).
static ENGINES: std::sync::LazyLock<ArcSwap<Vec<Weak<FaultEngine>>>> =
    std::sync::LazyLock::new(|| ArcSwap::from_pointee(Vec::new()));
static REGISTER: std::sync::Mutex<()> = std::sync::Mutex::new(());

thread_local! {
    static CTX: RefCell<Option<FaultCtx>> = const { RefCell::new(None) };
}

/// Give this thread a fault context for SIGBUS (a VMM thread that may
/// touch guest RAM).
pub fn prepare_thread(stats: Arc<FaultStats>) {
    CTX.with(|c| *c.borrow_mut() = Some(FaultCtx::new(stats)));
}

/// A vCPU thread's context: its waits count in its blocktime.
pub fn prepare_vcpu_thread(stats: Arc<FaultStats>, vcpu: usize) {
    CTX.with(|c| *c.borrow_mut() = Some(FaultCtx::for_vcpu(stats, vcpu)));
}

/// Register `engine` and install the handler (idempotent).
pub fn register(engine: &Arc<FaultEngine>) -> Result<(), vmm_sys_util::errno::Error> {
    let _g = REGISTER.lock().unwrap_or_else(|e| e.into_inner());
    let mut v: Vec<Weak<FaultEngine>> = ENGINES
        .load()
        .iter()
        .filter(|w| w.strong_count() > 0)
        .cloned()
        .collect();
    v.push(Arc::downgrade(engine));
    ENGINES.store(Arc::new(v));
    vmm_sys_util::signal::register_signal_handler(libc::SIGBUS, handle_sigbus)
}

extern "C" fn handle_sigbus(
    _num: libc::c_int,
    info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let hva = unsafe { (*info).si_addr() } as u64;
    let engines = ENGINES.load();
    for engine in engines.iter().filter_map(Weak::upgrade) {
        let memory = engine.memory();
        let Some(gpa) = memory.gpa_of_hva(hva) else {
            if memory.is_retired_hva(hva) {
                // A stale access to a slot whose removal is under way: never
                // installed into (I1); the access repeats and, once the range
                // is unregistered, no longer faults.
                std::thread::yield_now();
                return;
            }
            continue;
        };
        CTX.with(|c| {
            let mut slot = match c.try_borrow_mut() {
                Ok(s) => s,
                Err(_) => {
                    // Re-entered (cannot happen: the handler completes
                    // nothing itself); install zero to make progress.
                    engine.install_zero_hva(hva);
                    return;
                }
            };
            let ctx = slot.get_or_insert_with(|| FaultCtx::new(Arc::new(FaultStats::default())));
            // clock_gettime is a vDSO call: fine in a signal handler.
            let start = std::time::Instant::now();
            if let Some(v) = ctx.vcpu {
                engine.wait_begins(v, start);
            }
            let r = engine.resolve(ctx, gpa, &mut Access::None);
            if let Some(v) = ctx.vcpu {
                engine.wait_ends(v, &ctx.stats);
            }
            match r {
                // Like every other fault kind: histogram count == faults.
                Ok(_) => {
                    ctx.stats.add(FaultKind::Sigbus, 1);
                    ctx.stats.record_latency(start.elapsed().as_nanos() as u64);
                }
                // The slot went away since the lookup: the access repeats.
                Err(FaultError::NotRam(_)) => {}
                Err(error) => {
                    engine.exit().fail(ServeError::Fault {
                        thread: "SIGBUS",
                        gpa,
                        error,
                    });
                    engine.install_zero_hva(hva);
                }
            }
        });
        return;
    }
    // Not guest RAM: a genuine bus error. Restore the default action; the
    // access repeats and the process dies as it would have.
    // SAFETY: resetting a signal disposition to SIG_DFL.
    unsafe { libc::signal(libc::SIGBUS, libc::SIG_DFL) };
}
