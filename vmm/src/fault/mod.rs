//! The stage-2 fault engine: guest RAM left unpopulated under userfaultfd and
//! filled on first touch, on the faulting vCPU thread (`vcpu` mode) or by
//! handler threads (`handler` mode). See docs/FAULT-PATH.md.

pub mod engine;
pub mod handler;
pub mod sigbus;
pub mod stats;
pub(crate) mod uffd;

use std::sync::Arc;

use thiserror::Error;
use userfaultfd::{FeatureFlags, UffdBuilder};

pub use engine::{Access, FaultCtx, FaultEngine, FaultError, Resolved, Wake};
pub use stats::{FaultKind, FaultSnapshot, FaultStats};

use crate::config::FaultMode;
use crate::exit::VmExit;
use crate::host::KvmFlavor;
use crate::memory::{MemError, MemoryManager};

#[derive(Debug, Error)]
pub enum FaultSetupError {
    #[error("cannot create a userfaultfd ({0}); /dev/userfaultfd or the userfaultfd syscall is needed for --fault-mode vcpu/handler")]
    Uffd(userfaultfd::Error),
    #[error(transparent)]
    Memory(#[from] MemError),
    #[error("cannot install the SIGBUS handler: {0}")]
    Sigbus(vmm_sys_util::errno::Error),
}

/// The fault mode to use: the one asked for, else `vcpu` where the host
/// delivers a missing page's address to the faulting vCPU (PVM: an MMIO
/// exit at the GPA, or an emulation failure on a fetch) and `handler`
/// elsewhere (hardware KVM returns a bare EFAULT until exit-on-missing is
/// merged).
pub fn choose_mode(asked: Option<FaultMode>, flavor: KvmFlavor) -> FaultMode {
    if let Some(m) = asked {
        return m;
    }
    match flavor {
        KvmFlavor::Pvm => FaultMode::Vcpu,
        other => {
            log::info!(
                "fault mode: handler ({other} returns a bare EFAULT for missing pages, so the vCPU cannot learn the address)"
            );
            FaultMode::Handler
        }
    }
}

/// Set guest RAM up for `mode`: register it with a new userfaultfd and build
/// the engine (vcpu, handler), or populate it (prefault), or leave it to the
/// host kernel. In `vcpu` mode the userfaultfd raises SIGBUS instead of
/// blocking, and the process's SIGBUS handler serves faults of VMM threads.
pub fn setup(
    mode: FaultMode,
    memory: &Arc<MemoryManager>,
    exit: &Arc<VmExit>,
    fault_around: u64,
    inject_eagain: Option<u32>,
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
    }
    let uffd = Arc::new(b.create().map_err(FaultSetupError::Uffd)?);
    memory.attach_uffd(uffd.clone())?;
    let mut engine = FaultEngine::new(memory.clone(), uffd, exit.clone(), wake, fault_around);
    if let Some(n) = inject_eagain {
        log::warn!("fault injection: every {n}th install answers EAGAIN");
        engine.inject_eagain_every(n);
    }
    let engine = Arc::new(engine);
    if wake == Wake::Nobody {
        sigbus::register(&engine).map_err(FaultSetupError::Sigbus)?;
    }
    Ok(Some(engine))
}
