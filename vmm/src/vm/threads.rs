//! The threads of a running VM: vCPUs, the device event loop, and the
//! helpers (userfaultfd handlers, metrics, API, signals), each confined by
//! its seccomp filter before it serves the guest.

use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};

use super::{EventLoopError, Vm, VmError};
use crate::devices::virtio::manager::Ticker;
use crate::exit::{ExitReason, VmExit};
use crate::fault::{self, handler, FaultMode, FaultStats};
use crate::seccomp::{confine, SeccompMode, ThreadClass};
use crate::vcpu::{self, Vcpu};

/// The helper threads, joined when the VM has stopped.
pub(super) struct Helpers(Vec<thread::JoinHandle<()>>);

impl Helpers {
    pub fn join(self) {
        for t in self.0 {
            let _ = t.join();
        }
    }
}

/// Kick every vCPU out of `KVM_RUN` and join it; where each one stopped.
pub(super) fn stop_vcpus(threads: Vec<thread::JoinHandle<(u64, u8)>>) -> Vec<(u64, u8)> {
    for t in &threads {
        vcpu::kick(t.as_pthread_t());
    }
    threads
        .into_iter()
        .map(|t| {
            t.join().unwrap_or_else(|_| {
                log::error!("a vCPU thread panicked");
                (u64::MAX, 0xff)
            })
        })
        .collect()
}

impl Vm {
    /// userfaultfd handlers (`handler` mode), the metrics server (left to
    /// end by itself when it lingers), the API server, and the signal
    /// waiter.
    pub(super) fn spawn_helpers(&mut self) -> Result<Helpers, VmError> {
        let seccomp = self.config.seccomp;
        let mut out = Vec::new();
        if let (Some(e), FaultMode::Handler) = (&self.engine, self.mode) {
            let exit = self.exit.clone();
            out.extend(
                handler::spawn_handlers(e.clone(), self.exit.clone(), &self.metrics.handlers, {
                    move || confine(seccomp, ThreadClass::Handler, &exit)
                })
                .map_err(VmError::Thread)?,
            );
        }
        let linger = self.config.metrics_linger;
        if let Some(s) = self.metrics_server.take() {
            let exit = self.exit.clone();
            let t = s
                .spawn(self.metrics.clone(), self.exit.clone(), linger, move || {
                    confine(seccomp, ThreadClass::Metrics, &exit);
                })
                .map_err(VmError::Thread)?;
            out.extend(Some(t).filter(|_| linger.is_zero()));
        }
        if let Some(s) = self.api_server.take() {
            eprintln!("vmm: API on {}", s.path().display());
            let stats = self.engine.is_some().then(|| self.metrics.thread("api"));
            let exit = self.exit.clone();
            let t = s
                .spawn(self.control.clone(), self.exit.clone(), move || {
                    confine(seccomp, ThreadClass::Api, &exit);
                    if let Some(stats) = stats {
                        fault::sigbus::prepare_thread(stats);
                    }
                })
                .map_err(VmError::Thread)?;
            out.push(t);
        }
        if let (Some(plan), Some(e)) = (self.prefetch.take(), &self.engine) {
            let exit = self.exit.clone();
            let t = fault::prefetch::spawn(
                e.clone(),
                self.exit.clone(),
                plan,
                self.metrics.thread("prefetch"),
                move || confine(seccomp, ThreadClass::Handler, &exit),
            )
            .map_err(VmError::Thread)?;
            out.push(t);
        }
        out.push(
            self.actions
                .spawn_control(self.record_for.take(), seccomp)
                .map_err(VmError::Thread)?,
        );
        // SIGINT/SIGTERM stop the VM cleanly (counters reported, threads
        // joined): blocked in every thread started from here on, and taken
        // by one waiter thread.
        out.extend(spawn_signal_waiter(self.exit.clone(), seccomp));
        Ok(Helpers(out))
    }

    /// One thread per vCPU, each confined before its first guest
    /// instruction.
    pub(super) fn spawn_vcpus(&mut self) -> Result<Vec<thread::JoinHandle<(u64, u8)>>, VmError> {
        let seccomp = self.config.seccomp;
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (index, ready) in self.vcpus.drain(..).enumerate() {
            let mut v = Vcpu::new(
                index,
                ready.fd,
                ready.cpuid,
                self.shared.clone(),
                self.metrics.vcpus[index].clone(),
            );
            if ready.rearm_syscall_assist {
                v = v.rearm_syscall_assist();
            }
            let exit = self.exit.clone();
            let t = thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    if confine(seccomp, ThreadClass::Vcpu, &exit) {
                        v.run()
                    } else {
                        (u64::MAX, 0xff)
                    }
                })
                .map_err(VmError::Thread)?;
            self.pause.register(t.as_pthread_t());
            threads.push(t);
        }
        Ok(threads)
    }

    /// The device event loop: virtio notifications, serial input, ticks.
    pub(super) fn spawn_events(&mut self) -> std::io::Result<thread::JoinHandle<()>> {
        let mut subscribers = std::mem::take(&mut self.virtio_events);
        if let Some(i) = self.serial_input.take() {
            subscribers.push(Box::new(i));
        }
        spawn_event_loop(
            subscribers,
            std::mem::replace(&mut self.virtio_ticker, Ticker::none()),
            self.exit.clone(),
            self.engine.is_some().then(|| self.metrics.thread("events")),
            self.config.seccomp,
        )
    }
}

/// Block SIGINT and SIGTERM in this thread (inherited by threads it starts)
/// and wait for them on a dedicated thread, which ends the VM.
fn spawn_signal_waiter(exit: Arc<VmExit>, seccomp: SeccompMode) -> Option<thread::JoinHandle<()>> {
    // SAFETY: plain sigset manipulation on a local set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            if !confine(seccomp, ThreadClass::Signals, &exit) {
                return;
            }
            let timeout = libc::timespec {
                tv_sec: 0,
                tv_nsec: 100_000_000,
            };
            while !exit.is_stopping() {
                // SAFETY: waiting on a valid set; no siginfo wanted.
                let n = unsafe { libc::sigtimedwait(&set, std::ptr::null_mut(), &timeout) };
                if n > 0 {
                    exit.request(ExitReason::Signal(n));
                }
            }
        })
        .ok()
}

/// The device event loop (serial input, virtio queue notifications, device
/// ticks) on its own thread; it ends with the VM.
fn spawn_event_loop(
    subscribers: Vec<Box<dyn MutEventSubscriber + Send>>,
    ticker: Ticker,
    exit: Arc<VmExit>,
    fault_stats: Option<Arc<FaultStats>>,
    seccomp: SeccompMode,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name("events".into()).spawn(move || {
        if !confine(seccomp, ThreadClass::Events, &exit) {
            return;
        }
        // Devices on this thread that touch a missing page of guest RAM
        // serve the fault here (SIGBUS), counted in this thread's stats.
        if let Some(stats) = fault_stats {
            fault::sigbus::prepare_thread(stats);
        }
        let mut em = match EventManager::<Box<dyn MutEventSubscriber + Send>>::new() {
            Ok(em) => em,
            Err(e) => {
                exit.fail(EventLoopError(e));
                return;
            }
        };
        for s in subscribers {
            em.add_subscriber(s);
        }
        while !exit.is_stopping() {
            if let Err(e) = em.run_with_timeout(100) {
                exit.fail(EventLoopError(e));
                break;
            }
            ticker.tick();
        }
    })
}
