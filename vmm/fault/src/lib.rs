//! The stage-2 fault engine: guest RAM left unpopulated under userfaultfd and
//! filled on first touch, on the faulting vCPU thread (`vcpu` mode) or by
//! handler threads (`handler` mode). See docs/FAULT-PATH.md.
//!
//! - [`engine`]: `FaultEngine::resolve`, the userfaultfd installer the
//!   `memslots` protocol drives (fault-around, I3/I6 under the guard);
//! - [`uffd`]: the two install ioctls, issued directly;
//! - [`sigbus`]: faults met by VMM threads (and `fxrstor` inside `KVM_RUN`);
//! - [`handler`]: `handler` mode's threads;
//! - [`stats`]: per-thread counters, written by their owner only;
//! - [`blocktime`]: how long each vCPU, and the whole VM, waited for memory;
//! - [`restore`]: the VM's restore counters and the working-set recorder;
//! - [`prefetch`]: the background prefetch of a restored VM's memory.
//!
//! It knows guest memory through `vmm-memory` and ends the VM through
//! `vmm-exit`; it knows nothing of vCPUs, devices or seccomp (a handler
//! thread's filter is its caller's `on_start`).

pub mod blocktime;
pub mod engine;
pub mod handler;
pub mod prefetch;
pub mod restore;
pub mod sigbus;
pub mod stats;
pub mod uffd;

use std::sync::Arc;

use thiserror::Error;
use userfaultfd::{FeatureFlags, UffdBuilder};
use vmm_exit::VmExit;
use vmm_memory::{MemError, MemoryManager};

pub use engine::{Access, FaultCtx, FaultEngine, FaultError, Prefetched, Resolved, Wake};
pub use restore::{RestoreStat, RestoreStats, RESTORE_METRICS};
pub use stats::{FaultKind, FaultSnapshot, FaultStats, ThreadStat};

/// How guest RAM is populated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
pub enum FaultMode {
    /// Userfaultfd (SIGBUS mode): the faulting vCPU thread serves its own fault.
    Vcpu,
    /// Blocking userfaultfd served by handler threads (Firecracker/QEMU).
    Handler,
    /// All RAM populated before the guest starts: no faults.
    Prefault,
    /// Anonymous memory filled by the host kernel (benchmark baseline).
    Kernel,
}

impl FaultMode {
    pub fn uses_uffd(self) -> bool {
        matches!(self, FaultMode::Vcpu | FaultMode::Handler)
    }
    pub fn name(self) -> &'static str {
        match self {
            FaultMode::Vcpu => "vcpu",
            FaultMode::Handler => "handler",
            FaultMode::Prefault => "prefault",
            FaultMode::Kernel => "kernel",
        }
    }
}

/// A fault a serving thread (not a vCPU: those report their own) could not
/// serve; it ends the VM.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("userfaultfd read failed: {0}")]
    UffdRead(userfaultfd::Error),
    #[error("{thread} fault at GPA {gpa:#x}: {error}")]
    Fault {
        thread: &'static str,
        gpa: u64,
        error: FaultError,
    },
}

#[derive(Debug, Error)]
pub enum FaultSetupError {
    #[error("cannot create a userfaultfd ({0}); /dev/userfaultfd or the userfaultfd syscall is needed for --fault-mode vcpu/handler")]
    Uffd(userfaultfd::Error),
    #[error(transparent)]
    Memory(#[from] MemError),
    #[error("cannot install the SIGBUS handler: {0}")]
    Sigbus(vmm_sys_util::errno::Error),
}

/// What an engine is built with besides its memory.
pub struct EngineOptions {
    /// Largest adaptive fault-around window, in pages (1 = off).
    pub fault_around: u64,
    /// Testing: every Nth install attempt answers EAGAIN.
    pub inject_eagain: Option<u32>,
    pub vcpus: usize,
    /// The VM's restore and stall counters.
    pub restore: Arc<RestoreStats>,
    /// Record first touches of the memory file (at most this many runs).
    pub record: Option<usize>,
}

/// Set guest RAM up for `mode`: register it with a new userfaultfd and build
/// the engine (vcpu, handler), or populate it (prefault), or leave it to the
/// host kernel. In `vcpu` mode the userfaultfd raises SIGBUS instead of
/// blocking, and the process's SIGBUS handler serves faults of VMM threads.
pub fn setup(
    mode: FaultMode,
    memory: &Arc<MemoryManager>,
    exit: &Arc<VmExit>,
    options: EngineOptions,
) -> Result<Option<Arc<FaultEngine>>, FaultSetupError> {
    let wake = match mode {
        FaultMode::Vcpu => Wake::Nobody,
        FaultMode::Handler => Wake::Waiters,
        FaultMode::Prefault => {
            memory.populate_all()?;
            return Ok(None);
        }
        FaultMode::Kernel => return Ok(None),
    };
    let mut b = UffdBuilder::new();
    b.close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false);
    if wake == Wake::Nobody {
        b.require_features(FeatureFlags::SIGBUS);
    } else {
        // A userfault names the thread it blocks: its wait is that vCPU's.
        b.require_features(FeatureFlags::THREAD_ID);
    }
    let uffd = Arc::new(b.create().map_err(FaultSetupError::Uffd)?);
    memory.attach_uffd(uffd.clone())?;
    let mut engine = FaultEngine::new(
        memory.clone(),
        uffd,
        exit.clone(),
        wake,
        options.fault_around,
        options.vcpus,
        options.restore,
    );
    if let Some(capacity) = options.record {
        engine.with_recorder(capacity);
    }
    if let Some(n) = options.inject_eagain {
        log::warn!("fault injection: every {n}th install answers EAGAIN");
        engine.inject_eagain_every(n);
    }
    let engine = Arc::new(engine);
    if wake == Wake::Nobody {
        sigbus::register(&engine).map_err(FaultSetupError::Sigbus)?;
    }
    Ok(Some(engine))
}
