//! The vCPU thread: `KVM_RUN` in a loop; each exit is decoded ([`exit`]) and
//! handled ([`handle`]).
//!
//! Stopping: [`kick`] sends [`kick_signal`] to a vCPU thread; its handler sets
//! `immediate_exit` in that thread's `kvm_run`, so `KVM_RUN` returns `EINTR`
//! whether the signal lands inside the ioctl or just before it. The loop then
//! sees [`VmExit::is_stopping`] and returns.

mod assist;
pub mod error;
pub mod exit;
pub mod handle;
pub mod pause;
pub mod regs;
pub mod state;
pub mod syscall;

use std::cell::Cell;
use std::sync::Arc;

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

pub use error::VcpuError;

/// Guest memory as a vCPU reads it itself (the SYSCALL assist reads IDT
/// gates and exception frames): `vm-memory`'s view, which the memory
/// manager publishes. The vCPU layer never goes through the memory manager:
/// a missing page is the fault engine's business.
pub type GuestView = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
pub use handle::{Assists, ExitHandler, Next, RingFull, VcpuShared};
pub use regs::VcpuState;

use crate::exit::VmExit;
use crate::fault::{sigbus, FaultStats};

pub struct Vcpu {
    fd: VcpuFd,
    handler: ExitHandler,
    /// The CPUID this vCPU was given (a snapshot records it).
    cpuid: kvm_bindings::CpuId,
    /// Restored with the SYSCALL assist armed: arm it again before the
    /// first entry (the breakpoint is KVM's guest-debug state, which no
    /// snapshot holds).
    rearm_syscall_assist: bool,
}

thread_local! {
    /// This thread's `kvm_run`, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn handle_kick(_num: libc::c_int, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // Only async-signal-safe work: a const-initialised thread-local read and
    // one byte store.
    let p = KVM_RUN_PTR.with(|p| p.get());
    if !p.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by
        // `Vcpu::run` and cleared before the mapping can go away.
        unsafe { (*p).immediate_exit = 1 };
    }
}

/// Install the kick handler (process-wide; once, before vCPU threads start).
pub fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    register_signal_handler(kick_signal(), handle_kick)
}

/// Kick a vCPU thread out of `KVM_RUN`.
pub fn kick(thread: libc::pthread_t) {
    // SAFETY: `thread` is a live thread (the caller joins it afterwards).
    unsafe { libc::pthread_kill(thread, kick_signal()) };
}

impl Vcpu {
    pub fn new(
        index: usize,
        fd: VcpuFd,
        cpuid: kvm_bindings::CpuId,
        shared: Arc<VcpuShared>,
        stats: Arc<FaultStats>,
    ) -> Self {
        Self {
            fd,
            handler: ExitHandler::new(index, shared, stats),
            cpuid,
            rearm_syscall_assist: false,
        }
    }

    /// A restored vCPU whose SYSCALL assist was armed.
    pub fn rearm_syscall_assist(mut self) -> Self {
        self.rearm_syscall_assist = true;
        self
    }

    /// Park while a pause is on, saving this vCPU's state if asked.
    fn park(&self, exit: &VmExit) {
        let shared = self.handler.shared();
        shared.pause.park(self.handler.index(), exit, || {
            let mut s = state::VcpuSnapshot::save(&self.fd, &self.cpuid, &shared.msr_list)?;
            s.syscall_assist = self.handler.syscall_handler();
            Ok(s)
        });
    }

    /// Run until the VM stops. Any failure ends the whole VM with a reason.
    /// Returns where the vCPU was when it stopped (RIP, CPL), for reports.
    pub fn run(mut self) -> (u64, u8) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        let shared = self.handler.shared().clone();
        let index = self.handler.index();
        if shared.fault.is_some() {
            sigbus::prepare_vcpu_thread(self.handler.stats().clone(), index);
        }
        if let Some(e) = &shared.engine {
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            e.register_vcpu_thread(tid, index, self.handler.stats().clone());
        }
        if self.rearm_syscall_assist {
            if let Err(error) = self.handler.rearm_syscall_assist(&self.fd) {
                shared.exit.fail(VcpuError::Assist { vcpu: index, error });
            }
        }
        let exit: Arc<VmExit> = shared.exit.clone();
        let mut entered = false;
        while !exit.is_stopping() {
            if self.handler.shared().pause.requested() {
                self.park(&exit);
                continue;
            }
            if !entered {
                entered = true;
                shared.restore.entered();
            }
            let result = self.fd.run();
            // Fault latency is measured from here (the exit) to the next entry.
            let exited = std::time::Instant::now();
            // SAFETY: `run_ptr` is this vCPU's kvm_run. The exit's data points
            // into it, which lives as long as `self.fd`; it is used only in
            // this iteration, before the next KVM_RUN, and the register
            // ioctls exit handling makes do not touch that data area.
            let decoded = unsafe { exit::detach(exit::decode(result, run_ptr)) };
            if matches!(decoded, exit::Exit::Failed { errno } if errno == libc::EINTR) {
                // SAFETY: `run_ptr` is this vCPU's kvm_run; no exit data is
                // borrowed from it past this point of an EINTR exit.
                unsafe { (*run_ptr).immediate_exit = 0 };
            }
            match self.handler.handle(decoded, &self.fd, exited) {
                Next::Continue => {}
                Next::Stop(reason) => {
                    exit.request(reason);
                    break;
                }
                Next::Fail(error) => {
                    exit.fail(error);
                    break;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        self.fd.position()
    }
}
