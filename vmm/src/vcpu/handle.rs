//! What a vCPU does with each exit: serve a stage-2 fault, route port I/O
//! and MMIO to devices, assist an instruction the host cannot emulate, or
//! stop the VM with a reason. Driven by the `KVM_RUN` loop (`super`) and,
//! in unit tests, by synthesised exits without KVM.

use std::sync::Arc;
use std::time::Instant;

use vm_memory::GuestAddressSpace;

use kvm_bindings::{KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};

use super::assist;
use super::error::VcpuError;
use super::exit::{Exit, MAX_INSN_LEN};
use super::regs::VcpuState;
use super::syscall::{DebugOutcome, SyscallAssist, MSR_LSTAR};
use crate::devices::Bus;
use crate::exit::{ExitReason, VmExit};
use crate::fault::stats::{AssistKind, ThreadStat};
use crate::fault::{Access, FaultCtx, FaultEngine, FaultError, FaultKind, FaultStats, Resolved};

/// Whether the host needs the VMM to complete instructions its emulator
/// cannot (PVM hosts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assists {
    Pvm,
    None,
}

/// What every vCPU thread shares.
pub struct VcpuShared {
    pub pio: Bus,
    pub mmio: Bus,
    pub exit: Arc<VmExit>,
    /// Set in `vcpu` mode: faults are served on the vCPU thread.
    pub fault: Option<Arc<FaultEngine>>,
    /// The VM's fault engine in `vcpu` or `handler` mode: each vCPU
    /// registers its thread, so a handler charges the wait to it.
    pub engine: Option<Arc<FaultEngine>>,
    /// The VM's restore counters (its first guest entry).
    pub restore: Arc<crate::fault::RestoreStats>,
    pub assists: Assists,
    /// Set when the SYSCALL assist is on (a stock Linux kernel on a PVM
    /// host): the guest memory it reads (IDT gates, exception frames).
    pub syscall_assist: Option<vm_memory::GuestMemoryAtomic<super::GuestView>>,
    /// Parks the vCPUs for a snapshot.
    pub pause: Arc<super::pause::Pause>,
    /// The host's `KVM_GET_MSR_INDEX_LIST` (what a snapshot saves).
    pub msr_list: Vec<u32>,
    /// The VM's dirty rings (`--dirty-log ring`): a vCPU whose ring is full
    /// harvests them before it runs again.
    pub dirty_rings: Option<Arc<dyn RingFull>>,
}

/// What a vCPU calls on `KVM_EXIT_DIRTY_RING_FULL`: the VM's dirty rings
/// (`vmm_memory::ring::DirtyRings`, wired in by `vm`).
pub trait RingFull: Send + Sync {
    /// Harvest every ring so that vCPU `vcpu` may run again; an error once
    /// its ring cannot be emptied.
    fn full(&self, vcpu: usize) -> Result<u64, String>;
}

/// What the loop does after an exit.
#[derive(Debug)]
pub enum Next {
    Continue,
    /// The VM ends (the guest asked, or cannot go on).
    Stop(ExitReason),
    /// This vCPU failed: the VM ends with the error.
    Fail(VcpuError),
}

/// One vCPU's exit handling state: its fault context (bounce page, counters).
pub struct ExitHandler {
    index: usize,
    shared: Arc<VcpuShared>,
    ctx: FaultCtx,
    syscall: Option<SyscallAssist>,
    /// The RIP of the last fetch failure whose pages were all present
    /// already: another thread (a vCPU, the prefetch) may have installed
    /// them since the exit, so it is retried once before it counts as a
    /// genuine emulation failure.
    fetch_retried: Option<u64>,
}

impl ExitHandler {
    pub fn new(index: usize, shared: Arc<VcpuShared>, stats: Arc<FaultStats>) -> Self {
        Self {
            index,
            syscall: shared
                .syscall_assist
                .as_ref()
                .map(|_| SyscallAssist::new(index)),
            shared,
            ctx: FaultCtx::new(stats),
            fetch_retried: None,
        }
    }

    pub fn stats(&self) -> &Arc<FaultStats> {
        &self.ctx.stats
    }

    pub fn index(&self) -> usize {
        self.index
    }

    /// The guest #PF handler the SYSCALL assist's breakpoint is armed on.
    pub fn syscall_handler(&self) -> Option<u64> {
        self.syscall.as_ref().and_then(SyscallAssist::handler)
    }

    /// A restored vCPU: arm the SYSCALL assist on the #PF handler its IDT
    /// names now (the snapshot had it armed).
    pub fn rearm_syscall_assist(
        &mut self,
        vcpu: &dyn VcpuState,
    ) -> Result<(), super::syscall::SyscallAssistError> {
        match (self.syscall.as_mut(), self.shared.syscall_assist.as_ref()) {
            (Some(a), Some(mem)) => a.resume(vcpu, &mem.memory(), &self.ctx.stats),
            _ => Ok(()),
        }
    }

    pub fn shared(&self) -> &Arc<VcpuShared> {
        &self.shared
    }

    /// Handle one exit. `exited` is when `KVM_RUN` returned: fault latency is
    /// measured from there to the next entry.
    pub fn handle(&mut self, exit: Exit, vcpu: &dyn VcpuState, exited: Instant) -> Next {
        self.ctx.stats.add(exit.kind(), 1);
        let index = self.index;
        let shared = self.shared.clone();
        let engine = shared.fault.as_deref();
        match exit {
            // In `vcpu` mode an MMIO exit inside a RAM memslot is a stage-2
            // fault: install the page, complete the access, re-enter. A GPA
            // outside RAM (or in an unplugged block: a guest error) goes to
            // the MMIO bus.
            Exit::MmioWrite { gpa, data } => self.mmio(vcpu, gpa, Access::Write(data), exited),
            Exit::MmioRead { gpa, data } => self.mmio(vcpu, gpa, Access::Read(data), exited),
            Exit::MemoryFault { gpa } => match engine {
                Some(e) => {
                    e.wait_begins(index, exited);
                    let r = e.resolve(&mut self.ctx, gpa, &mut Access::None);
                    e.wait_ends(index, &self.ctx.stats);
                    self.fault_done(vcpu, FaultKind::MemoryFault, gpa, r, exited)
                }
                None => self.unhandled(vcpu, "KVM_EXIT_MEMORY_FAULT without a fault engine"),
            },
            Exit::IoOut { port, data } => {
                shared.pio.write(index, u64::from(port), data);
                Next::Continue
            }
            Exit::IoIn { port, data } => {
                shared.pio.read(index, u64::from(port), data);
                Next::Continue
            }
            Exit::Hlt => {
                // With the in-kernel LAPIC, HLT is handled by KVM; an HLT exit
                // means this vCPU can never be woken.
                log::info!("vCPU {index} halted at RIP {:#x}", vcpu.position().0);
                Next::Stop(ExitReason::AllHalted)
            }
            Exit::Shutdown => Next::Stop(ExitReason::TripleFault {
                vcpu: index,
                rip: vcpu.position().0,
            }),
            Exit::SystemEvent(KVM_SYSTEM_EVENT_RESET) => Next::Stop(ExitReason::Reset),
            Exit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN) => Next::Stop(ExitReason::GuestStatus(0)),
            Exit::SystemEvent(kind) => self.stop(VcpuError::SystemEvent { vcpu: index, kind }),
            Exit::Emulation { insn } => self.emulation(vcpu, insn, exited),
            Exit::Internal { suberror, data } => {
                let (rip, cpl) = vcpu.position();
                self.stop(VcpuError::Internal {
                    vcpu: index,
                    suberror,
                    rip,
                    cpl,
                    data,
                })
            }
            Exit::FailEntry { reason, cpu } => self.stop(VcpuError::FailEntry {
                vcpu: index,
                reason,
                cpu,
            }),
            Exit::Intr => Next::Continue,
            Exit::WrMsr { index, data, error } => self.wrmsr(vcpu, index, data, error),
            Exit::Debug { pc, .. } => self.debug(vcpu, pc, exited),
            Exit::Failed { errno } => self.failed(vcpu, errno),
            Exit::DirtyRingFull => self.dirty_ring_full(vcpu),
            Exit::Unhandled(what) => self.unhandled(vcpu, &what),
        }
    }

    /// An emulation failure. Instruction bytes mean the fetch worked: an
    /// assist may apply (PVM). Without them the instruction may sit on a
    /// missing page (a fetch fault). Anything else ends the VM.
    fn emulation(&mut self, vcpu: &dyn VcpuState, insn: Option<Vec<u8>>, exited: Instant) -> Next {
        if self.shared.assists == Assists::Pvm {
            if let Some(a) = insn.as_deref().and_then(|b| assist::apply(vcpu, b)) {
                log::debug!("vCPU {}: assisted {a:?}", self.index);
                let stats = &self.ctx.stats;
                stats.add(AssistKind::from(a), 1);
                stats.add(ThreadStat::AssistTime, exited.elapsed().as_nanos() as u64);
                return Next::Continue;
            }
        }
        if let Some(next) = self.fetch_fault(vcpu, exited) {
            return next;
        }
        let (rip, cpl) = vcpu.position();
        self.stop(VcpuError::Emulation {
            vcpu: self.index,
            rip,
            cpl,
            insn,
        })
    }

    /// `KVM_RUN` failed: a kick (EINTR) or a retry (EAGAIN) goes on; a
    /// bare EFAULT in `vcpu` mode is a missing page this host did not
    /// report; anything else ends the VM.
    fn failed(&self, vcpu: &dyn VcpuState, errno: i32) -> Next {
        if errno == libc::EINTR || errno == libc::EAGAIN {
            return Next::Continue;
        }
        let (vcpu_index, (rip, cpl)) = (self.index, vcpu.position());
        self.stop(if errno == libc::EFAULT && self.shared.fault.is_some() {
            VcpuError::EfaultWithoutAddress {
                vcpu: vcpu_index,
                rip,
                cpl,
            }
        } else {
            VcpuError::Run {
                vcpu: vcpu_index,
                rip,
                cpl,
                errno,
            }
        })
    }

    /// An MMIO exit. In `vcpu` mode an access inside a RAM memslot is a
    /// stage-2 fault: install the page, complete the access, re-enter. A GPA
    /// outside RAM (or in an unplugged block: a guest error) goes to the MMIO
    /// bus.
    fn mmio(
        &mut self,
        vcpu: &dyn VcpuState,
        gpa: u64,
        mut access: Access,
        exited: Instant,
    ) -> Next {
        let shared = self.shared.clone();
        if let Some(e) = shared.fault.as_deref() {
            e.wait_begins(self.index, exited);
            match e.resolve_range(&mut self.ctx, gpa, &mut access) {
                Err(FaultError::NotRam(_) | FaultError::NotPlugged(_)) => {
                    e.wait_cancelled(self.index);
                }
                r => {
                    e.wait_ends(self.index, &self.ctx.stats);
                    return self.fault_done(vcpu, FaultKind::Mmio, gpa, r, exited);
                }
            }
        }
        match access {
            Access::Write(data) => shared.mmio.write(self.index, gpa, data),
            Access::Read(data) => shared.mmio.read(self.index, gpa, data),
            Access::None => {}
        }
        Next::Continue
    }

    /// A guest MSR write the filter sent here: LSTAR (the SYSCALL assist
    /// arms itself) or, should the filter ever cover more, any other MSR,
    /// performed as the guest asked.
    fn wrmsr(&mut self, vcpu: &dyn VcpuState, msr: u32, data: u64, error: &mut u8) -> Next {
        let index = self.index;
        if let (MSR_LSTAR, Some(a), Some(mem)) = (
            msr,
            self.syscall.as_mut(),
            self.shared.syscall_assist.as_ref(),
        ) {
            *error = 0;
            return match a.on_lstar_write(vcpu, &mem.memory(), data, &self.ctx.stats) {
                Ok(()) => Next::Continue,
                Err(error) => self.stop(VcpuError::Assist { vcpu: index, error }),
            };
        }
        // Performed from the host side (filters apply to the guest only).
        *error = u8::from(vcpu.set_msr(msr, data).is_err());
        if *error != 0 {
            log::warn!("vCPU {index}: WRMSR {msr:#x} <- {data:#x} failed: #GP to the guest");
        }
        Next::Continue
    }

    /// `KVM_EXIT_DEBUG`: the SYSCALL assist's breakpoint or single step.
    fn debug(&mut self, vcpu: &dyn VcpuState, pc: u64, exited: Instant) -> Next {
        let index = self.index;
        let (Some(a), Some(mem)) = (self.syscall.as_mut(), self.shared.syscall_assist.as_ref())
        else {
            return self.unhandled(
                vcpu,
                &format!("KVM_EXIT_DEBUG at {pc:#x} without a breakpoint of ours"),
            );
        };
        let r = a.on_debug(vcpu, &mem.memory(), pc, &self.ctx.stats);
        self.ctx
            .stats
            .add(ThreadStat::AssistTime, exited.elapsed().as_nanos() as u64);
        match r {
            Ok(DebugOutcome::NotOurs) => self.unhandled(
                vcpu,
                &format!("KVM_EXIT_DEBUG at {pc:#x} before the SYSCALL assist armed"),
            ),
            Ok(_) => Next::Continue,
            Err(error) => self.stop(VcpuError::Assist { vcpu: index, error }),
        }
    }

    fn stop(&self, e: VcpuError) -> Next {
        Next::Fail(e)
    }

    /// This vCPU's dirty ring is full: harvest every ring (the pages wait
    /// in the per-slot sets for whoever reads the log) so KVM lets it run.
    fn dirty_ring_full(&self, vcpu: &dyn VcpuState) -> Next {
        let Some(rings) = &self.shared.dirty_rings else {
            return self.unhandled(vcpu, "KVM_EXIT_DIRTY_RING_FULL without a dirty ring");
        };
        match rings.full(self.index) {
            Ok(_) => Next::Continue,
            Err(error) => self.stop(VcpuError::DirtyRing {
                vcpu: self.index,
                error,
            }),
        }
    }

    fn unhandled(&self, vcpu: &dyn VcpuState, what: &str) -> Next {
        self.stop(VcpuError::Unhandled {
            vcpu: self.index,
            what: what.to_string(),
            rip: vcpu.position().0,
        })
    }

    /// Account a served fault; a fault that cannot be served ends the VM.
    fn fault_done(
        &mut self,
        vcpu: &dyn VcpuState,
        kind: FaultKind,
        gpa: u64,
        r: Result<Resolved, FaultError>,
        exited: Instant,
    ) -> Next {
        match r {
            Ok(_) => {
                self.count_fault(kind, exited);
                Next::Continue
            }
            Err(error) => self.stop(VcpuError::Fault {
                vcpu: self.index,
                gpa,
                rip: vcpu.position().0,
                error,
            }),
        }
    }

    /// An emulation failure whose instruction lies on a missing page: the
    /// host could not fetch it. Install the page(s) the instruction spans and
    /// re-enter. `None` when this is not such a fault.
    fn fetch_fault(&mut self, vcpu: &dyn VcpuState, exited: Instant) -> Option<Next> {
        let engine = self.shared.fault.clone()?;
        let rip = vcpu.regs().ok()?.rip;
        let last = rip.wrapping_add(MAX_INSN_LEN as u64 - 1);
        // An instruction spans at most two pages: its first and last byte.
        let pages = [Some(rip), (last >> 12 != rip >> 12).then_some(last)];
        let mut installed = false;
        engine.wait_begins(self.index, exited);
        let next = self.fetch_pages(vcpu, &engine, pages, &mut installed, exited);
        if installed {
            engine.wait_ends(self.index, &self.ctx.stats);
        } else {
            engine.wait_cancelled(self.index);
        }
        if next.is_some() {
            return next;
        }
        if installed {
            self.fetch_retried = None;
            return Some(Next::Continue);
        }
        // Nothing was missing now: once, the page may have come in since
        // the exit (another thread's install); twice, a genuine emulation
        // failure, reported as such.
        if self.fetch_retried != Some(rip) {
            self.fetch_retried = Some(rip);
            return Some(Next::Continue);
        }
        None
    }

    /// The pages of [`Self::fetch_fault`]; `Some` when one failed.
    fn fetch_pages(
        &mut self,
        vcpu: &dyn VcpuState,
        engine: &FaultEngine,
        pages: [Option<u64>; 2],
        installed: &mut bool,
        exited: Instant,
    ) -> Option<Next> {
        for gva in pages.into_iter().flatten() {
            let Some(gpa) = vcpu.translate(gva) else {
                continue;
            };
            // Each page resolved is one fault (installed or found present):
            // the accounting identity holds per resolve.
            match engine.resolve(&mut self.ctx, gpa, &mut Access::None) {
                Ok(r) => {
                    *installed |= r == Resolved::Installed;
                    self.count_fault(FaultKind::EmulationFailure, exited);
                }
                // Not RAM (MMIO, unplugged): not a missing-page fetch.
                Err(FaultError::NotRam(_) | FaultError::NotPlugged(_)) => {}
                Err(e) => {
                    return Some(self.fault_done(
                        vcpu,
                        FaultKind::EmulationFailure,
                        gpa,
                        Err(e),
                        exited,
                    ))
                }
            }
        }
        None
    }

    fn count_fault(&self, kind: FaultKind, exited: Instant) {
        let stats = &self.ctx.stats;
        stats.add(kind, 1);
        stats.record_latency(exited.elapsed().as_nanos() as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};
    use std::sync::Mutex;

    use kvm_bindings::{kvm_regs, kvm_sregs};
    use userfaultfd::{FeatureFlags, UffdBuilder};
    use vm_memory::{Bytes, GuestAddress};

    use crate::devices::BusDevice;
    use crate::fault::engine::Wake;
    use crate::fault::stats::ExitKind;
    use crate::memory::{MemoryManager, NoKvm, PageSource, RamRange};

    const RAM: u64 = 4 << 20;
    const DEV: u64 = 0xd000_0000;

    /// A vCPU without KVM: registers in cells, identity translation inside
    /// `RAM`, injected exceptions recorded.
    struct FakeVcpu {
        regs: RefCell<kvm_regs>,
        injected: Cell<Option<u8>>,
    }

    impl FakeVcpu {
        fn at(rip: u64) -> Self {
            Self {
                regs: RefCell::new(kvm_regs {
                    rip,
                    ..Default::default()
                }),
                injected: Cell::new(None),
            }
        }
    }

    impl VcpuState for FakeVcpu {
        fn regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
            Ok(*self.regs.borrow())
        }
        fn set_regs(&self, r: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
            *self.regs.borrow_mut() = *r;
            Ok(())
        }
        fn sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
            Ok(kvm_sregs::default())
        }
        fn translate(&self, gva: u64) -> Option<u64> {
            (gva < RAM).then_some(gva)
        }
        fn inject_exception(&self, vector: u8) -> Result<(), kvm_ioctls::Error> {
            self.injected.set(Some(vector));
            Ok(())
        }
    }

    /// A device that records writes and answers reads with 0x5a.
    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    struct Rig {
        handler: ExitHandler,
        memory: Arc<MemoryManager>,
        dev: Arc<Mutex<Recorder>>,
    }

    /// A handler over 4 MiB of demand-paged RAM (real userfaultfd, no KVM)
    /// and a recording device at `DEV` on both buses.
    fn rig(with_engine: bool, assists: Assists) -> Rig {
        rig_with(with_engine, assists, None)
    }

    fn rig_with(with_engine: bool, assists: Assists, rings: Option<Arc<dyn RingFull>>) -> Rig {
        let memory = Arc::new(
            MemoryManager::new(
                Arc::new(NoKvm),
                &[RamRange { gpa: 0, size: RAM }],
                PageSource::Zero,
                8,
            )
            .unwrap(),
        );
        let exit = Arc::new(VmExit::new());
        let fault = with_engine.then(|| {
            let uffd = Arc::new(
                UffdBuilder::new()
                    .close_on_exec(true)
                    .non_blocking(true)
                    .user_mode_only(false)
                    .require_features(FeatureFlags::SIGBUS)
                    .create()
                    .expect("userfaultfd (root, or vm.unprivileged_userfaultfd=1)"),
            );
            memory.attach_uffd(uffd.clone()).unwrap();
            Arc::new(FaultEngine::new(
                memory.clone(),
                uffd,
                exit.clone(),
                Wake::Nobody,
                1,
                1,
                Arc::new(crate::fault::RestoreStats::new(std::time::Instant::now())),
            ))
        });
        let dev = Arc::new(Mutex::new(Recorder::default()));
        let mut pio = Bus::new("port-I/O");
        let mut mmio = Bus::new("MMIO");
        pio.insert(0x3f8, 8, dev.clone()).unwrap();
        mmio.insert(DEV, 0x1000, dev.clone()).unwrap();
        let shared = Arc::new(VcpuShared {
            pio,
            mmio,
            exit,
            engine: fault.clone(),
            fault,
            restore: Arc::new(crate::fault::RestoreStats::new(std::time::Instant::now())),
            assists,
            syscall_assist: None,
            pause: Arc::new(crate::vcpu::pause::Pause::new(1)),
            msr_list: Vec::new(),
            dirty_rings: rings,
        });
        Rig {
            handler: ExitHandler::new(0, shared, Arc::new(FaultStats::default())),
            memory,
            dev,
        }
    }

    fn resident(m: &MemoryManager) -> u64 {
        m.resident_pages()
    }

    #[test]
    fn mmio_write_inside_ram_installs_and_completes() {
        let mut r = rig(true, Assists::None);
        let v = FakeVcpu::at(0);
        let data = 0x1122_3344u32.to_le_bytes();
        let next = r.handler.handle(
            Exit::MmioWrite {
                gpa: 0x5008,
                data: &data,
            },
            &v,
            Instant::now(),
        );
        assert!(matches!(next, Next::Continue));
        assert_eq!(resident(&r.memory), 1);
        let got: u32 = r.memory.memory().read_obj(GuestAddress(0x5008)).unwrap();
        assert_eq!(got, 0x1122_3344);
        let s = r.handler.stats().snapshot();
        assert_eq!(s[FaultKind::Mmio], 1);
        assert_eq!(
            (s[ThreadStat::SpeculativeInstalls], s.latency.count),
            (1, 1)
        );
        assert_eq!(s[ExitKind::Mmio], 1);
        assert!(r.dev.lock().unwrap().0.is_empty());
    }

    #[test]
    fn mmio_read_straddling_two_pages_installs_both() {
        let mut r = rig(true, Assists::None);
        let v = FakeVcpu::at(0);
        let mut data = [0xeeu8; 4];
        let next = r.handler.handle(
            Exit::MmioRead {
                gpa: 0x1ffe,
                data: &mut data,
            },
            &v,
            Instant::now(),
        );
        assert!(matches!(next, Next::Continue));
        assert_eq!(data, [0; 4]);
        let s = r.handler.stats().snapshot();
        assert_eq!(s[ThreadStat::PagesInstalled], 2);
    }

    #[test]
    fn mmio_outside_ram_goes_to_the_bus() {
        let mut r = rig(true, Assists::None);
        let v = FakeVcpu::at(0);
        let next = r.handler.handle(
            Exit::MmioWrite {
                gpa: DEV + 0x10,
                data: &[7],
            },
            &v,
            Instant::now(),
        );
        assert!(matches!(next, Next::Continue));
        let mut data = [0u8; 2];
        r.handler.handle(
            Exit::MmioRead {
                gpa: DEV,
                data: &mut data,
            },
            &v,
            Instant::now(),
        );
        assert_eq!(data, [0x5a; 2]);
        assert_eq!(r.dev.lock().unwrap().0, vec![(0x10, vec![7])]);
        assert_eq!(resident(&r.memory), 0);
        assert_eq!(r.handler.stats().snapshot().faults(), 0);
    }

    #[test]
    fn port_io_reaches_the_device() {
        let mut r = rig(false, Assists::None);
        let v = FakeVcpu::at(0);
        r.handler.handle(
            Exit::IoOut {
                port: 0x3f9,
                data: &[1, 2],
            },
            &v,
            Instant::now(),
        );
        let mut data = [0u8; 1];
        r.handler.handle(
            Exit::IoIn {
                port: 0x3f8,
                data: &mut data,
            },
            &v,
            Instant::now(),
        );
        assert_eq!(data, [0x5a]);
        assert_eq!(r.dev.lock().unwrap().0, vec![(1, vec![1, 2])]);
        assert_eq!(r.handler.stats().snapshot()[ExitKind::Io], 2);
    }

    #[test]
    fn emulation_failure_on_a_missing_page_fetch_installs_it() {
        let mut r = rig(true, Assists::None);
        let v = FakeVcpu::at(0x3ff8);
        let next = r
            .handler
            .handle(Exit::Emulation { insn: None }, &v, Instant::now());
        assert!(matches!(next, Next::Continue));
        // The instruction's first and last possible byte: pages 3 and 4,
        // each a fault, and the accounting identity holds.
        assert_eq!(resident(&r.memory), 2);
        let s = r.handler.stats().snapshot();
        assert_eq!(s[FaultKind::EmulationFailure], 2);
        assert_eq!(
            s.faults(),
            s[ThreadStat::SpeculativeInstalls] + s[ThreadStat::AlreadyPresent]
        );
        assert_eq!(s.latency.count, s.faults());
        // Re-entering retries the fetch. A failure with the pages present
        // is retried once (another thread may have installed them since
        // the exit); the second at that RIP is a genuine one.
        let next = r
            .handler
            .handle(Exit::Emulation { insn: None }, &v, Instant::now());
        assert!(matches!(next, Next::Continue));
        let next = r
            .handler
            .handle(Exit::Emulation { insn: None }, &v, Instant::now());
        assert!(matches!(next, Next::Fail(VcpuError::Emulation { .. })));
        let s = r.handler.stats().snapshot();
        assert_eq!(
            s.faults(),
            s[ThreadStat::SpeculativeInstalls] + s[ThreadStat::AlreadyPresent]
        );
    }

    #[test]
    fn an_assist_needs_no_fetch_fault() {
        // Instruction bytes mean the fetch worked: the assist applies and
        // no page is resolved (no fault counted).
        let mut r = rig(true, Assists::Pvm);
        let v = FakeVcpu::at(0x5000);
        let next = r.handler.handle(
            Exit::Emulation {
                insn: Some(vec![0x9b]),
            },
            &v,
            Instant::now(),
        );
        assert!(matches!(next, Next::Continue));
        assert_eq!(r.handler.stats().snapshot().faults(), 0);
        assert_eq!(resident(&r.memory), 0);
    }

    #[test]
    fn pvm_assists_by_instruction_bytes() {
        let mut r = rig(false, Assists::Pvm);
        let v = FakeVcpu::at(0x1000);
        v.regs.borrow_mut().rflags = 0x2;
        let t = Instant::now();
        assert!(matches!(
            r.handler.handle(
                Exit::Emulation {
                    insn: Some(vec![0xcc])
                },
                &v,
                t
            ),
            Next::Continue
        ));
        assert_eq!((v.regs.borrow().rip, v.injected.get()), (0x1001, Some(3)));
        let stac = Exit::Emulation {
            insn: Some(vec![0x0f, 0x01, 0xcb, 0x90]),
        };
        assert!(matches!(r.handler.handle(stac, &v, t), Next::Continue));
        assert_eq!(v.regs.borrow().rip, 0x1004);
        assert_ne!(v.regs.borrow().rflags & (1 << 18), 0);
        let clac = Exit::Emulation {
            insn: Some(vec![0x0f, 0x01, 0xca]),
        };
        assert!(matches!(r.handler.handle(clac, &v, t), Next::Continue));
        assert_eq!(v.regs.borrow().rflags & (1 << 18), 0);
        assert!(matches!(
            r.handler.handle(
                Exit::Emulation {
                    insn: Some(vec![0x9b])
                },
                &v,
                t
            ),
            Next::Continue
        ));
        assert_eq!(v.regs.borrow().rip, 0x1008);
        // Each one is counted by kind, in this vCPU's stats.
        let s = r.handler.stats().snapshot();
        let counts: Vec<u64> = [
            AssistKind::Int3,
            AssistKind::Stac,
            AssistKind::Clac,
            AssistKind::Fwait,
        ]
        .iter()
        .map(|k| s[*k])
        .collect();
        assert_eq!(counts, [1, 1, 1, 1]);
        assert_eq!(s.total("assists"), 4);
    }

    #[test]
    fn assists_are_off_on_hardware_hosts() {
        let mut r = rig(false, Assists::None);
        let v = FakeVcpu::at(0x1000);
        let next = r.handler.handle(
            Exit::Emulation {
                insn: Some(vec![0xcc]),
            },
            &v,
            Instant::now(),
        );
        assert!(
            matches!(next, Next::Fail(VcpuError::Emulation { .. })),
            "{next:?}"
        );
        assert_eq!(v.regs.borrow().rip, 0x1000);
    }

    #[test]
    fn unknown_emulation_failure_reports_rip_and_bytes() {
        let mut r = rig(false, Assists::Pvm);
        let v = FakeVcpu::at(0xffff_ffff_8100_0000);
        let next = r.handler.handle(
            Exit::Emulation {
                insn: Some(vec![0x0f, 0xc7, 0x0e]),
            },
            &v,
            Instant::now(),
        );
        let Next::Fail(e) = next else {
            panic!("not a failure: {next:?}")
        };
        let msg = e.to_string();
        assert!(msg.contains("RIP 0xffffffff81000000"), "{msg}");
        assert!(msg.contains("instruction bytes 0f c7 0e"), "{msg}");
    }

    #[test]
    fn efault_without_an_address_is_a_clear_error() {
        let mut r = rig(true, Assists::None);
        let v = FakeVcpu::at(0x401000);
        let Next::Fail(e) = r.handler.handle(
            Exit::Failed {
                errno: libc::EFAULT,
            },
            &v,
            Instant::now(),
        ) else {
            panic!("not a failure")
        };
        let msg = e.to_string();
        assert!(msg.contains("EFAULT without the faulting address"), "{msg}");
        assert!(msg.contains("--fault-mode handler"), "{msg}");
        // EINTR (a kick) just continues.
        assert!(matches!(
            r.handler
                .handle(Exit::Failed { errno: libc::EINTR }, &v, Instant::now()),
            Next::Continue
        ));
    }

    /// Rings that answer a full exit with a harvest, then with an error.
    struct FakeRings(std::sync::atomic::AtomicU32);

    impl RingFull for FakeRings {
        fn full(&self, vcpu: usize) -> Result<u64, String> {
            assert_eq!(vcpu, 0);
            match self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed) {
                0 => Ok(7),
                _ => Err("wedged".into()),
            }
        }
    }

    #[test]
    fn a_full_dirty_ring_is_harvested_by_its_vcpu_or_ends_the_vm() {
        let v = FakeVcpu::at(0x2000);
        let t = Instant::now();
        let rings = Arc::new(FakeRings(Default::default()));
        let mut r = rig_with(false, Assists::None, Some(rings.clone()));
        assert!(matches!(
            r.handler.handle(Exit::DirtyRingFull, &v, t),
            Next::Continue
        ));
        let Next::Fail(e) = r.handler.handle(Exit::DirtyRingFull, &v, t) else {
            panic!("a ring that cannot be emptied ends the VM")
        };
        assert!(e.to_string().contains("dirty ring is full") && e.to_string().contains("wedged"));
        assert_eq!(rings.0.load(std::sync::atomic::Ordering::Relaxed), 2);
        // Without rings the exit is a clear error at the vCPU's RIP.
        let mut r = rig(false, Assists::None);
        let Next::Fail(e) = r.handler.handle(Exit::DirtyRingFull, &v, t) else {
            panic!("not a failure")
        };
        assert!(e.to_string().contains("0x2000"), "{e}");
    }

    #[test]
    fn system_events_and_shutdowns() {
        let mut r = rig(false, Assists::None);
        let v = FakeVcpu::at(0x1234);
        let t = Instant::now();
        assert!(matches!(
            r.handler
                .handle(Exit::SystemEvent(KVM_SYSTEM_EVENT_RESET), &v, t),
            Next::Stop(ExitReason::Reset)
        ));
        assert!(matches!(
            r.handler
                .handle(Exit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN), &v, t),
            Next::Stop(ExitReason::GuestStatus(0))
        ));
        assert!(matches!(
            r.handler.handle(Exit::SystemEvent(99), &v, t),
            Next::Fail(VcpuError::SystemEvent { kind: 99, .. })
        ));
        assert!(matches!(
            r.handler.handle(Exit::Shutdown, &v, t),
            Next::Stop(ExitReason::TripleFault {
                vcpu: 0,
                rip: 0x1234
            })
        ));
        assert!(matches!(
            r.handler.handle(Exit::Hlt, &v, t),
            Next::Stop(ExitReason::AllHalted)
        ));
    }
}
