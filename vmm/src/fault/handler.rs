//! `handler` mode: a blocking userfaultfd served by handler threads (the
//! Firecracker/QEMU design). The faulting thread sleeps in the kernel until a
//! handler installs the page and wakes it.

use crate::seccomp::{confine, SeccompMode, ThreadClass};
use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::thread;

use userfaultfd::{Event, EventBuffer};

use super::engine::{Access, FaultCtx, FaultEngine};
use super::stats::{FaultKind, FaultStats};
use crate::exit::{ExitReason, VmExit};

/// Start one handler thread per counter set in `stats`; they end when the
/// VM stops.
pub fn spawn_handlers(
    engine: Arc<FaultEngine>,
    exit: Arc<VmExit>,
    stats: &[Arc<FaultStats>],
    seccomp: SeccompMode,
) -> std::io::Result<Vec<thread::JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(stats.len());
    for (i, s) in stats.iter().enumerate() {
        let s = s.clone();
        let engine = engine.clone();
        let exit = exit.clone();
        threads.push(
            thread::Builder::new()
                .name(format!("uffd{i}"))
                .spawn(move || {
                    if confine(seccomp, ThreadClass::Handler, &exit) {
                        serve(engine, exit, s)
                    }
                })?,
        );
    }
    Ok(threads)
}

fn serve(engine: Arc<FaultEngine>, exit: Arc<VmExit>, stats: Arc<FaultStats>) {
    let uffd = engine.uffd().clone();
    let mut ctx = FaultCtx::new(stats.clone());
    let mut events = EventBuffer::new(16);
    let mut pfd = libc::pollfd {
        fd: uffd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    while !exit.is_stopping() {
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, 100) };
        if r <= 0 {
            continue;
        }
        let batch = match uffd.read_events(&mut events) {
            Ok(b) => b,
            Err(e) => {
                exit.request(ExitReason::Error(format!("userfaultfd read failed: {e}")));
                return;
            }
        };
        for ev in batch {
            let Ok(Event::Pagefault { addr, .. }) = ev else {
                continue;
            };
            let start = std::time::Instant::now();
            let hva = addr as u64;
            let Some(gpa) = engine.memory().gpa_of_hva(hva) else {
                log::warn!("userfault at {hva:#x} outside guest RAM");
                continue;
            };
            stats.by_kind[FaultKind::Userfault as usize].add(1);
            if let Err(e) = engine.resolve(&mut ctx, gpa, &mut Access::None) {
                exit.request(ExitReason::Error(format!("fault at GPA {gpa:#x}: {e}")));
                // Unblock the faulting thread so the VM can stop.
                engine.install_zero_hva(hva);
                return;
            }
            stats.record_latency(start.elapsed().as_nanos() as u64);
        }
    }
}
