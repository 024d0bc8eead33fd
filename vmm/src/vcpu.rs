//! The vCPU thread: `KVM_RUN` in a loop and dispatch of every exit.
//!
//! Stopping: [`kick`] sends [`kick_signal`] to a vCPU thread; its handler sets
//! `immediate_exit` in that thread's `kvm_run`, so `KVM_RUN` returns `EINTR`
//! whether the signal lands inside the ioctl or just before it. The loop then
//! sees [`VmExit::is_stopping`] and returns.

use std::cell::Cell;
use std::sync::Arc;

use kvm_bindings::{
    kvm_run, KVM_INTERNAL_ERROR_EMULATION, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::devices::Bus;
use crate::exit::{ExitReason, VmExit};
use crate::fault::stats::ExitKind;
use crate::fault::{
    sigbus, Access, FaultCtx, FaultEngine, FaultError, FaultKind, FaultStats, Resolved,
};

/// What every vCPU thread shares.
pub struct VcpuShared {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<VmExit>,
    /// Set in `vcpu` mode: faults are served on the vCPU thread.
    pub fault: Option<Arc<FaultEngine>>,
    /// Complete instructions the host's emulator cannot (PVM hosts).
    pub emulation_assists: bool,
}

pub struct Vcpu {
    pub index: usize,
    pub fd: VcpuFd,
    pub shared: Arc<VcpuShared>,
    pub stats: Arc<FaultStats>,
    pub ctx: FaultCtx,
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

/// Read one GPR-free snapshot of where the vCPU is, for error reports.
fn where_is(fd: &VcpuFd) -> (u64, u8) {
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(u64::MAX);
    let cpl = fd.get_sregs().map(|s| s.cs.dpl).unwrap_or(0xff);
    (rip, cpl)
}

/// Describe a `KVM_EXIT_INTERNAL_ERROR`: suberror, RIP, CPL, instruction bytes.
pub fn describe_internal_error(index: usize, run: &kvm_run, rip: u64, cpl: u8) -> String {
    // SAFETY: called only for KVM_EXIT_INTERNAL_ERROR, whose union member is `internal`.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let ndata = (internal.ndata as usize).min(internal.data.len());
    let mut msg = format!(
        "vCPU {index}: KVM_EXIT_INTERNAL_ERROR suberror {} at RIP {rip:#x} (CPL {cpl})",
        internal.suberror
    );
    if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
        msg.push_str(": the host could not emulate the instruction");
        if let Some(bytes) = emulation_insn_bytes(run) {
            msg.push_str(&format!(", instruction bytes {}", hex(&bytes)));
        }
    } else if ndata > 0 {
        msg.push_str(&format!(", data {:x?}", &internal.data[..ndata]));
    }
    msg
}

/// Instruction bytes of an emulation failure, when the kernel supplies them
/// (`KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`: data[0] = flags,
/// then a size byte and up to 15 bytes).
pub fn emulation_insn_bytes(run: &kvm_run) -> Option<Vec<u8>> {
    // SAFETY: called only for KVM_EXIT_INTERNAL_ERROR.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    if internal.ndata < 2 {
        return None;
    }
    let raw: Vec<u8> = internal.data[1..]
        .iter()
        .flat_map(|d| d.to_le_bytes())
        .collect();
    let len = usize::from(raw[0]).min(15);
    (len > 0).then(|| raw[1..1 + len].to_vec())
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn exit_kind(r: &Result<VcpuExit, kvm_ioctls::Error>) -> ExitKind {
    match r {
        Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => ExitKind::Io,
        Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => ExitKind::Mmio,
        Ok(VcpuExit::Hlt) => ExitKind::Hlt,
        Ok(VcpuExit::Shutdown) => ExitKind::Shutdown,
        Ok(VcpuExit::InternalError) => ExitKind::InternalError,
        Ok(VcpuExit::MemoryFault { .. }) => ExitKind::MemoryFault,
        Ok(VcpuExit::SystemEvent(..)) => ExitKind::SystemEvent,
        Ok(VcpuExit::Intr) => ExitKind::Intr,
        Err(e) if e.errno() == libc::EINTR => ExitKind::Intr,
        _ => ExitKind::Other,
    }
}

/// What the loop does after an exit.
enum Next {
    Continue,
    Stop(ExitReason),
}

impl Vcpu {
    pub fn new(index: usize, fd: VcpuFd, shared: Arc<VcpuShared>, stats: Arc<FaultStats>) -> Self {
        Self {
            index,
            fd,
            shared,
            ctx: FaultCtx::new(stats.clone()),
            stats,
        }
    }

    /// Run until the VM stops. Any failure ends the whole VM with a reason.
    /// Returns where the vCPU was when it stopped (RIP, CPL), for reports.
    pub fn run(mut self) -> (u64, u8) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        if self.shared.fault.is_some() {
            sigbus::prepare_thread(self.stats.clone());
        }
        let exit = self.shared.exit.clone();
        while !exit.is_stopping() {
            match self.run_once() {
                Next::Continue => {}
                Next::Stop(reason) => {
                    exit.request(reason);
                    break;
                }
            }
        }
        KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
        where_is(&self.fd)
    }

    fn run_once(&mut self) -> Next {
        let index = self.index;
        let shared = &*self.shared;
        let engine = shared.fault.as_deref();
        let result = self.fd.run();
        // Fault latency is measured from here (the exit) to the next entry.
        let exited = std::time::Instant::now();
        self.stats.exits[exit_kind(&result) as usize].add(1);
        match result {
            // In `vcpu` mode an MMIO exit inside a RAM memslot is a stage-2
            // fault: install the page, complete the access, re-enter. A GPA
            // outside RAM falls through to the MMIO bus.
            Ok(VcpuExit::MmioWrite(addr, data)) if engine.is_some() => {
                let len = data.len() as u64;
                match engine
                    .unwrap()
                    .resolve_range(&mut self.ctx, addr, len, Access::Write(data))
                {
                    Err(FaultError::NotRam(_)) => {
                        shared.mmio.write(index, addr, data);
                        Next::Continue
                    }
                    r => self.fault_done(FaultKind::Mmio, addr, r, exited),
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) if engine.is_some() => {
                let len = data.len() as u64;
                match engine.unwrap().resolve_range(
                    &mut self.ctx,
                    addr,
                    len,
                    Access::Read(&mut *data),
                ) {
                    Err(FaultError::NotRam(_)) => {
                        shared.mmio.read(index, addr, data);
                        Next::Continue
                    }
                    r => self.fault_done(FaultKind::Mmio, addr, r, exited),
                }
            }
            Ok(VcpuExit::MemoryFault { gpa, .. }) if engine.is_some() => {
                let r = engine.unwrap().resolve(&mut self.ctx, gpa, Access::None);
                self.fault_done(FaultKind::MemoryFault, gpa, r, exited)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                shared.pio.write(index, u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                shared.pio.read(index, u64::from(port), data);
                Next::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                shared.mmio.write(index, addr, data);
                Next::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                shared.mmio.read(index, addr, data);
                Next::Continue
            }
            Ok(VcpuExit::Hlt) => {
                // With the in-kernel LAPIC, HLT is handled by KVM; an HLT exit
                // means this vCPU can never be woken.
                let (rip, _) = where_is(&self.fd);
                log::info!("vCPU {index} halted at RIP {rip:#x}");
                Next::Stop(ExitReason::AllHalted)
            }
            Ok(VcpuExit::Shutdown) => {
                let (rip, _) = where_is(&self.fd);
                Next::Stop(ExitReason::TripleFault { vcpu: index, rip })
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_RESET => Next::Stop(ExitReason::Reset),
                KVM_SYSTEM_EVENT_SHUTDOWN => Next::Stop(ExitReason::GuestStatus(0)),
                other => Next::Stop(ExitReason::Error(format!(
                    "vCPU {index}: unsupported system event {other}"
                ))),
            },
            Ok(VcpuExit::InternalError) => {
                if let Some(next) = self.fetch_fault(exited) {
                    return next;
                }
                if self.shared.emulation_assists && self.assist() {
                    return Next::Continue;
                }
                let (rip, cpl) = where_is(&self.fd);
                let msg = describe_internal_error(index, self.fd.get_kvm_run(), rip, cpl);
                Next::Stop(ExitReason::Error(msg))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Next::Stop(ExitReason::Error(format!(
                "vCPU {index}: KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on host CPU {cpu}"
            ))),
            Ok(VcpuExit::Intr) => Next::Continue,
            Ok(other) => {
                let what = format!("{other:?}");
                let (rip, _) = where_is(&self.fd);
                Next::Stop(ExitReason::Error(format!(
                    "vCPU {index}: unhandled exit {what} at RIP {rip:#x}"
                )))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                self.fd.set_kvm_immediate_exit(0);
                Next::Continue
            }
            Err(e) if e.errno() == libc::EFAULT && engine.is_some() => {
                let (rip, cpl) = where_is(&self.fd);
                Next::Stop(ExitReason::Error(format!(
                    "vCPU {index}: KVM_RUN returned EFAULT without the faulting address at RIP \
                     {rip:#x} (CPL {cpl}): this host does not report missing pages to the vCPU \
                     here; use --fault-mode handler"
                )))
            }
            Err(e) => {
                let (rip, cpl) = where_is(&self.fd);
                Next::Stop(ExitReason::Error(format!(
                    "vCPU {index}: KVM_RUN failed at RIP {rip:#x} (CPL {cpl}): {e}"
                )))
            }
        }
    }

    /// Account a served fault; a fault that cannot be served ends the VM.
    fn fault_done(
        &mut self,
        kind: FaultKind,
        gpa: u64,
        r: Result<Resolved, FaultError>,
        exited: std::time::Instant,
    ) -> Next {
        match r {
            Ok(_) => {
                self.stats.by_kind[kind as usize].add(1);
                self.stats
                    .record_latency(exited.elapsed().as_nanos() as u64);
                Next::Continue
            }
            Err(e) => {
                let (rip, _) = where_is(&self.fd);
                Next::Stop(ExitReason::Error(format!(
                    "vCPU {}: guest access to GPA {gpa:#x} at RIP {rip:#x}: {e}",
                    self.index
                )))
            }
        }
    }

    /// PVM's emulator fails on a few instructions a stock kernel executes in
    /// supervisor mode; where the architectural effect is simple, do it here
    /// (each one measured failing on this host, ../shared/PLATFORM.md):
    /// `int3` -> RIP+1 and inject #BP (the kernel's int3 self-test and text
    /// patching rely on the handler running); `clac`/`stac` -> clear/set
    /// RFLAGS.AC; `fwait` -> no-op (no pending x87 exceptions: CR0.NE and no
    /// unmasked FPU faults at boot). Returns whether it assisted.
    fn assist(&mut self) -> bool {
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR.
        let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        if sub != KVM_INTERNAL_ERROR_EMULATION {
            return false;
        }
        let Some(bytes) = emulation_insn_bytes(self.fd.get_kvm_run()) else {
            return false;
        };
        let Ok(mut regs) = self.fd.get_regs() else {
            return false;
        };
        const RFLAGS_AC: u64 = 1 << 18;
        let ok = match bytes.as_slice() {
            [0xcc, ..] => {
                regs.rip += 1;
                let Ok(mut ev) = self.fd.get_vcpu_events() else {
                    return false;
                };
                ev.exception.injected = 1;
                ev.exception.nr = 3;
                ev.exception.has_error_code = 0;
                ev.flags = 0;
                self.fd.set_regs(&regs).is_ok() && self.fd.set_vcpu_events(&ev).is_ok()
            }
            [0x0f, 0x01, op @ (0xca | 0xcb), ..] => {
                if *op == 0xca {
                    regs.rflags &= !RFLAGS_AC;
                } else {
                    regs.rflags |= RFLAGS_AC;
                }
                regs.rip += 3;
                self.fd.set_regs(&regs).is_ok()
            }
            [0x9b, ..] => {
                regs.rip += 1;
                self.fd.set_regs(&regs).is_ok()
            }
            _ => false,
        };
        if ok {
            log::debug!(
                "vCPU {}: assisted {:02x?}",
                self.index,
                &bytes[..bytes.len().min(3)]
            );
        }
        ok
    }

    /// An emulation failure whose instruction lies on a missing page: the
    /// host could not fetch it. Install the page(s) the instruction spans and
    /// re-enter. Returns `None` when this is not such a fault.
    fn fetch_fault(&mut self, exited: std::time::Instant) -> Option<Next> {
        let engine = self.shared.fault.clone()?;
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR.
        let sub = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
        if sub != KVM_INTERNAL_ERROR_EMULATION {
            return None;
        }
        let rip = self.fd.get_regs().ok()?.rip;
        let mut installed = false;
        // An instruction is at most 15 bytes: it spans at most two pages.
        for gva in [rip, rip.wrapping_add(14)] {
            let t = self.fd.translate_gva(gva).ok()?;
            if t.valid == 0 || !engine.is_ram(t.physical_address) {
                continue;
            }
            match engine.resolve(&mut self.ctx, t.physical_address, Access::None) {
                Ok(Resolved::Installed) => installed = true,
                Ok(Resolved::AlreadyPresent) => {}
                Err(e) => {
                    return Some(self.fault_done(
                        FaultKind::EmulationFailure,
                        t.physical_address,
                        Err(e),
                        exited,
                    ))
                }
            }
        }
        // Nothing was missing: a genuine emulation failure, reported as such.
        installed.then(|| {
            self.fault_done(
                FaultKind::EmulationFailure,
                rip,
                Ok(Resolved::Installed),
                exited,
            )
        })
    }
}
