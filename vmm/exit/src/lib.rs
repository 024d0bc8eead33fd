//! How the VM ends. Any vCPU or device may request the end; the first request
//! wins and fixes the exit status. All vCPU threads are then kicked out of
//! `KVM_RUN` (a signal whose handler sets `immediate_exit`) and joined.
//!
//! A failure is carried as the typed error its layer raised ([`Failure`]):
//! this crate sits below every layer and names none of their error types;
//! whoever needs the detail downcasts.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};

/// A failure that ended the VM: the error of the layer that failed (a
/// vCPU's `VcpuError`, the fault engine's `FaultError`, ...), shared.
#[derive(Clone)]
pub struct Failure(Arc<dyn std::error::Error + Send + Sync>);

impl Failure {
    pub fn new(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Failure(Arc::new(e))
    }

    /// The layer's own error, if it is a `T`.
    pub fn downcast_ref<T: std::error::Error + 'static>(&self) -> Option<&T> {
        self.0.downcast_ref()
    }
}

impl fmt::Debug for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

/// The same failure (one report, shared by clones).
impl PartialEq for Failure {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Failure {}

/// Why the VM stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest wrote a status to the debug-exit port.
    GuestStatus(u8),
    /// The guest reset the machine through the i8042 (treated as power-off).
    Reset,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN) on the given vCPU.
    TripleFault { vcpu: usize, rip: u64 },
    /// All vCPUs halted with interrupts disabled: nothing can wake them.
    AllHalted,
    /// A vCPU, device thread or fault handler could not go on (emulation
    /// failure, unservable fault, event loop error, ...).
    Failed(Failure),
    /// The VMM was asked to stop (SIGINT, SIGTERM).
    Signal(i32),
    /// A Linux guest panicked (seen on its console) and then reset.
    KernelPanic,
    /// Stopped through the control API.
    Stopped,
    /// The guest powered off (ACPI S5 through the sleep control register).
    PowerOff,
    /// The VM was migrated live to another VMM (where it runs on).
    Migrated(String),
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::GuestStatus(s) => i32::from(*s),
            ExitReason::Reset | ExitReason::PowerOff => 0,
            ExitReason::TripleFault { .. } | ExitReason::AllHalted | ExitReason::Failed(_) => 1,
            ExitReason::Signal(n) => 128 + n,
            ExitReason::KernelPanic => 1,
            ExitReason::Stopped | ExitReason::Migrated(_) => 0,
        }
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitReason::GuestStatus(s) => write!(f, "guest exited with status {s}"),
            ExitReason::Reset => write!(f, "guest reset the machine (i8042)"),
            ExitReason::TripleFault { vcpu, rip } => {
                write!(
                    f,
                    "vCPU {vcpu} triple-faulted (KVM_EXIT_SHUTDOWN) at RIP {rip:#x}"
                )
            }
            ExitReason::AllHalted => write!(f, "all vCPUs halted with no way to wake them"),
            ExitReason::Failed(e) => write!(f, "{e}"),
            ExitReason::Signal(n) => write!(f, "stopped by signal {n}"),
            ExitReason::KernelPanic => {
                write!(f, "the guest kernel panicked (see its console) and reset")
            }
            ExitReason::Stopped => write!(f, "stopped through the API"),
            ExitReason::PowerOff => write!(f, "guest powered off (ACPI S5)"),
            ExitReason::Migrated(to) => write!(f, "migrated to {to}, where it runs on"),
        }
    }
}

/// Shared stop state. Cheap to poll from the vCPU loop.
#[derive(Default)]
pub struct VmExit {
    stopping: AtomicBool,
    /// The guest's console showed a kernel panic: its next reset is a crash.
    panicked: AtomicBool,
    reason: Mutex<Option<ExitReason>>,
    cond: Condvar,
}

impl VmExit {
    pub fn new() -> Self {
        Self::default()
    }

    /// End the VM because `error` happened (see [`Failure`]).
    pub fn fail(&self, error: impl std::error::Error + Send + Sync + 'static) -> bool {
        self.request(ExitReason::Failed(Failure::new(error)))
    }

    /// Request the VM to end. Only the first reason is kept. Returns true if
    /// this call was the first.
    pub fn request(&self, reason: ExitReason) -> bool {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        let first = r.is_none();
        if first {
            *r = Some(reason);
        }
        self.stopping.store(true, Ordering::Release);
        self.cond.notify_all();
        first
    }

    /// Note that the guest kernel panicked.
    pub fn note_panic(&self) {
        self.panicked.store(true, Ordering::Release);
    }

    /// A guest reset: after a panic it ends the VM as a crash.
    pub fn request_reset(&self) -> bool {
        if self.panicked.load(Ordering::Acquire) {
            self.request(ExitReason::KernelPanic)
        } else {
            self.request(ExitReason::Reset)
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Acquire)
    }

    /// Block until some thread requests the end; returns the reason.
    pub fn wait(&self) -> ExitReason {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(reason) = r.as_ref() {
                return reason.clone();
            }
            r = self.cond.wait(r).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins() {
        let e = VmExit::new();
        assert!(!e.is_stopping());
        assert!(e.request(ExitReason::GuestStatus(3)));
        assert!(!e.request(ExitReason::Reset));
        assert!(e.is_stopping());
        assert_eq!(e.wait(), ExitReason::GuestStatus(3));
        assert_eq!(e.reason().unwrap().status(), 3);
    }

    #[derive(Debug, PartialEq)]
    struct Broke(u32);
    impl fmt::Display for Broke {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(f, "broke {}", self.0)
        }
    }
    impl std::error::Error for Broke {}

    #[test]
    fn a_failure_keeps_its_type() {
        let e = VmExit::new();
        assert!(e.fail(Broke(7)));
        let ExitReason::Failed(f) = e.wait() else {
            panic!("not a failure")
        };
        assert_eq!(f.downcast_ref::<Broke>(), Some(&Broke(7)));
        assert_eq!(e.reason().unwrap().to_string(), "broke 7");
        assert_eq!(e.reason().unwrap().status(), 1);
    }
}
