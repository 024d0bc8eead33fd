//! `handler` mode: a blocking userfaultfd served by handler threads (the
//! Firecracker/QEMU design). The faulting thread sleeps in the kernel until a
//! handler installs the page and wakes it.

use std::os::unix::io::AsRawFd;
use std::sync::Arc;
use std::thread;

use userfaultfd::{Event, EventBuffer};
use vmm_exit::VmExit;

use crate::engine::{Access, FaultCtx, FaultEngine};
use crate::stats::{FaultKind, FaultStats};
use crate::ServeError;

/// Start one handler thread per counter set in `stats`; they end when the
/// VM stops. Each runs `on_start` first (e.g. its seccomp filter) and
/// serves only if it returns true.
pub fn spawn_handlers(
    engine: Arc<FaultEngine>,
    exit: Arc<VmExit>,
    stats: &[Arc<FaultStats>],
    on_start: impl Fn() -> bool + Clone + Send + 'static,
) -> std::io::Result<Vec<thread::JoinHandle<()>>> {
    let mut threads = Vec::with_capacity(stats.len());
    for (i, s) in stats.iter().enumerate() {
        let s = s.clone();
        let engine = engine.clone();
        let exit = exit.clone();
        let on_start = on_start.clone();
        threads.push(
            thread::Builder::new()
                .name(format!("uffd{i}"))
                .spawn(move || {
                    if on_start() {
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
                exit.fail(ServeError::UffdRead(e));
                return;
            }
        };
        for ev in batch {
            let Ok(Event::Pagefault {
                addr, thread_id, ..
            }) = ev
            else {
                continue;
            };
            let start = std::time::Instant::now();
            // The blocked thread's wait, as far as this thread sees it (from
            // the read of its userfault to its wake).
            let vcpu = engine.vcpu_of_thread(thread_id.as_raw());
            if let Some((i, _)) = &vcpu {
                engine.wait_begins(*i, start);
            }
            let hva = addr as u64;
            let Some(gpa) = engine.memory().gpa_of_hva(hva) else {
                log::warn!("userfault at {hva:#x} outside guest RAM");
                continue;
            };
            stats.add(FaultKind::Userfault, 1);
            if let Err(error) = engine.resolve(&mut ctx, gpa, &mut Access::None) {
                exit.fail(ServeError::Fault {
                    thread: "userfaultfd handler",
                    gpa,
                    error,
                });
                // Unblock the faulting thread so the VM can stop.
                engine.install_zero_hva(hva);
                return;
            }
            stats.record_latency(start.elapsed().as_nanos() as u64);
            if let Some((i, vcpu_stats)) = &vcpu {
                engine.wait_ends(*i, vcpu_stats);
            }
        }
    }
}
