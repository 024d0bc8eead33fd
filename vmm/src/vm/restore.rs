//! [`Vm::new`] for a snapshot: everything is read and checked first
//! ([`Loaded::open`]); then the VM is built in the order a boot builds it,
//! with saved state where a boot writes fresh state: guest RAM over the
//! memory file, the devices, the vCPUs, the in-kernel irqchip, PIT and
//! clock.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use super::{build, engine_options, kvm, Parts, ReadyVcpu, Vm, VmError};
use crate::config::{FaultMode, Prefetch, RestoreMode, VmConfig};
use crate::exit::VmExit;
use crate::fault::{FaultCtx, FaultEngine, FaultStats, Prefetched, RestoreStats};
use crate::host::Host;
use crate::memory::snapshot::RestoreMapping;
use crate::memory::{MemoryManager, PAGE_SIZE};
use crate::snapshot::restore::{
    restore_clock, restore_irqchips, Loaded, RestoreError, RestoredDevices,
};
use crate::snapshot::save::Base;
use crate::vcpu::state::cpuid_of;

impl Vm {
    /// Restore the VM saved in `dir`. `config` gives what the restoring
    /// command chooses (fault mode, restore mode, prefetch, API socket,
    /// metrics); the snapshot gives the VM's shape.
    pub(super) fn restore(config: VmConfig, dir: &Path, started: Instant) -> Result<Vm, VmError> {
        let err = |error: RestoreError| VmError::Restore {
            dir: dir.display().to_string(),
            error,
        };
        let (host, supported) = host_and_cpuid()?;
        let loaded = Loaded::open(dir, host.flavor, host.max_vcpus, &supported).map_err(err)?;
        Self::restore_loaded(config, host, loaded, &dir.display().to_string(), started)
    }

    /// Restore a VM received by a live migration on `o.addr`: wait for one
    /// source, receive it, restore it, tell the source it is ready, and
    /// once the source has stopped its VM (`Go`) hand it back to run.
    pub(super) fn incoming(
        config: VmConfig,
        o: &crate::config::IncomingOptions,
        started: Instant,
    ) -> Result<Vm, VmError> {
        use crate::snapshot::receive;
        let (host, supported) = host_and_cpuid()?;
        build::check_dirty_log(&config, &host)?;
        let label = format!("the migration on {}", o.addr);
        let err = |error: receive::ReceiveError| VmError::Incoming(error.to_string());
        let mut r = receive::receive(o, config.seccomp).map_err(err)?;
        let loaded = r.loaded();
        let checked = loaded.check(host.flavor, host.max_vcpus, &supported);
        let vm = checked
            .map_err(|error| VmError::Restore {
                dir: label.clone(),
                error,
            })
            .and_then(|()| Self::restore_loaded(config, host, loaded, &label, started));
        match vm {
            Ok(mut vm) => {
                r.ready_then_go().map_err(err)?;
                if let Some(p) = &r.postcopy {
                    eprintln!(
                        "vmm: the source has stopped, the VM runs here; {} pages still come (post-copy)",
                        p.left()
                    );
                    vm.actions.incoming(p.clone());
                    vm.postcopy = Some(p.clone());
                } else {
                    eprintln!("vmm: migration done: the source has stopped, the VM runs here");
                }
                r.follow().map_err(err)?;
                Ok(vm)
            }
            Err(e) => {
                r.fail(&e.to_string());
                Err(e)
            }
        }
    }

    /// The restore itself, from a snapshot or a migration (`what` names it).
    fn restore_loaded(
        config: VmConfig,
        host: Host,
        mut loaded: Loaded,
        what: &str,
        started: Instant,
    ) -> Result<Vm, VmError> {
        let err = |error: RestoreError| VmError::Restore {
            dir: what.to_string(),
            error,
        };
        let dir = loaded.reader.as_ref().map(|r| r.dir().to_path_buf());
        let config = loaded.config(&config);
        let mode = build::check(&config, &host)?;
        check_options(&config, mode).map_err(err)?;
        if config.restore.verify_memory {
            loaded.verify_memory().map_err(err)?;
        }
        let plan = loaded
            .plan(prefetch_for(&config, &host, mode, &loaded))
            .map_err(err)?;
        let vm_fd = build::create_vm(&host)?;
        let rings = build::dirty_rings(&config, &vm_fd)?;
        let image = loaded.image.clone();
        let mapping = match config.restore.mode {
            RestoreMode::MapPrivate => RestoreMapping::Private,
            _ => RestoreMapping::Lazy,
        };
        let memory = Arc::new(
            MemoryManager::restore(
                build::kvm_slots(&vm_fd, &rings),
                &loaded.layout,
                image.clone(),
                mapping,
                host.max_memslots,
            )
            .map_err(|e| err(e.into()))?,
        );
        if config.restore.mode == RestoreMode::Copy {
            let bytes = memory
                .fill_from(&loaded.layout, &image)
                .map_err(|e| err(e.into()))?;
            log::info!("restore: copied {} MiB", bytes >> 20);
        }
        // A diff snapshot of this VM is taken on the one it came from.
        let base = match (&dir, memory.track_dirty()) {
            (Some(dir), Ok(())) => Some(Base::new(
                &std::env::current_dir().unwrap_or_default(),
                dir,
                loaded.memory,
                &loaded.layout,
            )),
            (_, Err(e)) => {
                log::warn!("guest RAM changes are not tracked ({e}): no diff snapshot can be taken on this one");
                None
            }
            (None, Ok(())) => None,
        };
        let exit = Arc::new(VmExit::new());
        let devices = build::Devices::build(&config, &vm_fd, &memory, &exit)?;
        let serial = devices.serial_input.device();
        RestoredDevices {
            serial: &serial,
            signal: &devices.signal,
            transports: devices.transports(),
            balloon: devices.balloon.as_ref().map(|b| &b.device),
            mem: devices.hotplug.as_ref().map(|h| &h.device),
        }
        .restore(&loaded.devices)
        .map_err(err)?;
        let restore_stats = Arc::new(RestoreStats::new(started));
        let record = config
            .restore
            .record_working_set
            .map(|_| (loaded.memory.bytes / PAGE_SIZE) as usize);
        let engine = crate::fault::setup(
            mode,
            &memory,
            &exit,
            engine_options(&config, &restore_stats, record),
        )?;
        let syscall_assist = loaded.record().config.syscall_filter;
        if syscall_assist {
            crate::vcpu::syscall::filter_lstar_writes(&vm_fd).map_err(VmError::SyscallAssist)?;
        }
        let mut early = engine.as_ref().map(EarlyPages::new);
        if let Some(p) = &mut early {
            p.before_vcpus(&loaded, mode == FaultMode::Vcpu && has_user_mode(&loaded))?;
        }
        if mode == FaultMode::Vcpu {
            no_async_pf(&mut loaded);
        }
        let vcpus = restore_vcpus(&loaded, &vm_fd).map_err(err)?;
        if let Some(r) = &rings {
            for (i, v) in vcpus.iter().enumerate() {
                r.attach(i, &v.fd)?;
            }
        }
        if let Some(p) = &mut early {
            p.after_vcpus(&loaded, &vcpus)?;
            log::info!(
                "restore: {} pages the host reads for the guest installed first",
                p.installed
            );
        }
        restore_clock(&vm_fd, &loaded.vm).map_err(err)?;
        let record_for = config.restore.record_working_set;
        let mut vm = Self::assemble(Parts {
            config,
            host,
            mode,
            vm_fd,
            memory,
            exit,
            devices,
            engine,
            restore_stats,
            syscall_assist,
            vcpus,
            base,
            rings,
        })?;
        if let (Some(d), Some(e), Some(dir)) = (record_for, &vm.engine, &dir) {
            vm.actions.start_recording(e.clone(), dir);
            vm.record_for = Some(d);
        }
        vm.prefetch = (!plan.is_empty()).then_some(plan);
        log::info!(
            "restored {} ({} vCPUs, {} MiB, {} MiB of data) in {:.1} ms",
            what,
            vm.config.vcpus,
            vm.config.mem_size >> 20,
            loaded.memory.data_bytes >> 20,
            started.elapsed().as_secs_f64() * 1e3
        );
        Ok(vm)
    }
}

/// This host and the CPUID its KVM offers (what a saved VM is checked
/// against).
fn host_and_cpuid() -> Result<(Host, kvm_bindings::CpuId), VmError> {
    let host = Host::open()?;
    let supported = kvm(
        "KVM_GET_SUPPORTED_CPUID",
        host.kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
    )?;
    Ok((host, supported))
}

/// Restore modes and fault modes that go together.
fn check_options(config: &VmConfig, mode: FaultMode) -> Result<(), RestoreError> {
    let r = config.restore;
    let bad = |s: String| Err(RestoreError::Options(s));
    match (r.mode, mode) {
        (RestoreMode::Ondemand, FaultMode::Vcpu | FaultMode::Handler) => {}
        (RestoreMode::Ondemand, m) => {
            return bad(format!(
                "--restore-mode ondemand is served by the fault engine: use --fault-mode vcpu or handler (not {})",
                m.name()
            ))
        }
        (RestoreMode::MapPrivate, FaultMode::Kernel) => {}
        (RestoreMode::MapPrivate, m) => {
            return bad(format!(
                "--restore-mode map-private is served by the host's page cache: use --fault-mode kernel (not {})",
                m.name()
            ))
        }
        (RestoreMode::Copy, _) => {}
    }
    if r.prefetch != Prefetch::None && r.mode != RestoreMode::Ondemand {
        return bad(format!(
            "--prefetch fills an ondemand restore; --restore-mode {} has all of it already",
            r.mode.name()
        ));
    }
    if r.record_working_set.is_some()
        && (r.mode != RestoreMode::Ondemand || r.prefetch != Prefetch::None)
    {
        return bad(
            "--record-working-set records the faults of an ondemand restore without --prefetch"
                .into(),
        );
    }
    Ok(())
}

/// Pages the host itself reads or writes for the guest, installed from the
/// memory file before any vCPU runs (an ondemand restore; a booted guest
/// has them all resident before its first entry, or writes them itself):
/// - pages KVM maps when the vCPU state is set: kvmclock, the wall clock,
///   steal time, PV EOI, async PF (their GPAs are in the KVM MSRs).
///   `KVM_SET_MSRS` maps them at once: with a blocking userfaultfd and no
///   handler running yet it would wait forever (measured), with SIGBUS it
///   fails;
/// - every page that looks like a page table, and each vCPU's GDT, IDT,
///   TSS and the stacks an interrupt frame goes on: on this project's PVM
///   host a page walk or an event delivery that meets a missing page in
///   SIGBUS mode is no exit to the VMM but a fault the guest cannot take
///   (measured: a triple fault at the first instruction).
///
/// Each comes through the install protocol, like any prefetch.
struct EarlyPages<'e> {
    engine: &'e FaultEngine,
    ctx: FaultCtx,
    installed: u64,
}

impl<'e> EarlyPages<'e> {
    fn new(engine: &'e Arc<FaultEngine>) -> Self {
        Self {
            engine,
            ctx: FaultCtx::new(Arc::new(FaultStats::default())),
            installed: 0,
        }
    }

    fn install(&mut self, gpa: u64) -> Result<(), VmError> {
        if let Prefetched::Installed(n) = self.engine.prefetch(&mut self.ctx, gpa, 1)? {
            self.installed += n;
        }
        Ok(())
    }

    /// What needs no vCPU: the page tables and the pages user-mode
    /// entries map (`vcpu` mode), the KVM MSRs' pages.
    fn before_vcpus(&mut self, loaded: &Loaded, user: bool) -> Result<(), VmError> {
        for s in &loaded.layout {
            log::debug!(
                "restore: slot {:#x}: {} table-like pages, {} user-mapped pages",
                s.gpa,
                s.tables.len(),
                s.user.len()
            );
            for gpa in s.table_pages() {
                self.install(gpa)?;
            }
            if user {
                for gpa in s.user_pages() {
                    self.install(gpa)?;
                }
            }
        }
        for m in loaded.vcpus.iter().flat_map(|v| &v.msrs) {
            if KVM_PV_MSRS.contains(&m.index) && m.data & !(PAGE_SIZE - 1) != 0 {
                self.install(m.data & !(PAGE_SIZE - 1))?;
            }
        }
        Ok(())
    }

    /// What the restored vCPUs translate: descriptor tables and stacks.
    fn after_vcpus(&mut self, loaded: &Loaded, vcpus: &[ReadyVcpu]) -> Result<(), VmError> {
        for (v, s) in vcpus.iter().zip(&loaded.vcpus) {
            let translate = |va: u64| {
                v.fd.translate_gva(va)
                    .ok()
                    .filter(|t| t.valid != 0)
                    .map(|t| t.physical_address & !(PAGE_SIZE - 1))
            };
            let sr = &s.sregs;
            let mut pages = Vec::new();
            // Limits capped at what each table can use (a flat TR limit
            // must not cover all of RAM): 64 KiB of GDT, 256 IDT gates, a
            // TSS with a full I/O bitmap.
            for (base, limit) in [
                (sr.gdt.base, u64::from(sr.gdt.limit).min(0xffff)),
                (sr.idt.base, u64::from(sr.idt.limit).min(0xfff)),
                (sr.tr.base, u64::from(sr.tr.limit).min(0x2067)),
            ] {
                let mut va = base & !(PAGE_SIZE - 1);
                while va <= base.saturating_add(limit) {
                    pages.extend(translate(va));
                    va += PAGE_SIZE;
                }
            }
            // The stacks a frame is pushed on: the current one, and the
            // TSS's RSP0-2 and IST1-7 (a frame may cross into the page
            // below).
            let mut stacks = vec![s.regs.rsp];
            if let Some(tss) = translate(sr.tr.base) {
                // The TSS is read here: in first.
                self.install(tss)?;
                let mem = self.engine.memory().memory();
                let at = tss + (sr.tr.base & (PAGE_SIZE - 1));
                for field in [4u64, 12, 20, 36, 44, 52, 60, 68, 76, 84] {
                    let a = vm_memory::GuestAddress(at + field);
                    if let Ok(rsp) = vm_memory::Bytes::read_obj::<u64>(&*mem, a) {
                        stacks.extend(Some(rsp).filter(|r| *r != 0));
                    }
                }
            }
            for rsp in stacks {
                for va in [rsp.wrapping_sub(8), rsp.wrapping_sub(8 + PAGE_SIZE)] {
                    pages.extend(translate(va));
                }
            }
            for gpa in pages {
                self.install(gpa)?;
            }
        }
        Ok(())
    }
}

/// The prefetch asked for, except where the guest would otherwise stall:
/// on a PVM host a guest user-mode touch of a page not yet installed does
/// not reach a `vcpu`-mode VMM (it spins in KVM's async-PF path, measured
/// with the micro Linux's shell), so a guest with a user mode gets every
/// page prefetched, with a warning saying so.
fn prefetch_for(config: &VmConfig, host: &Host, mode: FaultMode, loaded: &Loaded) -> Prefetch {
    let r = config.restore;
    let at_risk = host.flavor == crate::host::KvmFlavor::Pvm
        && mode == FaultMode::Vcpu
        && r.mode == RestoreMode::Ondemand
        && has_user_mode(loaded);
    if !at_risk || r.prefetch != Prefetch::None {
        return r.prefetch;
    }
    if r.record_working_set.is_some() {
        log::warn!(
            "restore: this guest runs user code; on a PVM host its user-mode touches of pages not yet \
             installed can stall a vcpu-mode restore without a prefetch: record with --fault-mode handler"
        );
        return Prefetch::None;
    }
    log::warn!(
        "restore: this guest runs user code; on a PVM host its user-mode touches of pages not yet \
         installed would stall a vcpu-mode restore: prefetching every page (--prefetch all; or \
         --fault-mode handler)"
    );
    Prefetch::All
}

/// `IA32_LSTAR`: a guest kernel that set it has a user mode (test guests,
/// which run at CPL 0 only, never do).
const MSR_LSTAR: u32 = 0xc000_0082;

/// Whether any vCPU's guest has a user mode (its user-mapped pages are then
/// installed first in `vcpu` mode).
fn has_user_mode(loaded: &Loaded) -> bool {
    loaded
        .vcpus
        .iter()
        .flat_map(|v| &v.msrs)
        .any(|m| m.index == MSR_LSTAR && m.data != 0)
}

/// `MSR_KVM_ASYNC_PF_EN`.
const MSR_ASYNC_PF_EN: u32 = 0x4b56_4d02;

/// In `vcpu` mode a restored guest gets no more async page faults. KVM
/// turns a guest user-mode touch of a missing page into an async PF ("not
/// present", later "ready") when the guest enabled them: with a SIGBUS
/// userfaultfd the page never becomes ready, and the guest retries forever
/// without an exit to the VMM (measured: a restored shell spinning on
/// `kvm_async_pf_not_present`). Without them the touch reaches the VMM as
/// any other fault. (A booted guest never meets this: its kernel zeroes a
/// page before user mode touches it.)
fn no_async_pf(loaded: &mut Loaded) {
    for v in &mut loaded.vcpus {
        for m in v.msrs.iter_mut().filter(|m| m.index == MSR_ASYNC_PF_EN) {
            m.data = 0;
        }
    }
}

/// KVM's paravirtual MSRs that hold a GPA: wall clock, system time,
/// async PF, steal time, PV EOI.
const KVM_PV_MSRS: [u32; 5] = [
    0x4b56_4d00,
    0x4b56_4d01,
    0x4b56_4d02,
    0x4b56_4d03,
    0x4b56_4d04,
];

/// Create every vCPU, put the irqchip and PIT back (before the LAPICs),
/// then each vCPU's state.
fn restore_vcpus(
    loaded: &Loaded,
    vm_fd: &kvm_ioctls::VmFd,
) -> Result<Vec<ReadyVcpu>, RestoreError> {
    let fds = (0..loaded.vcpus.len())
        .map(|i| {
            vm_fd
                .create_vcpu(i as u64)
                .map_err(|source| RestoreError::Kvm {
                    section: "vcpu",
                    what: "KVM_CREATE_VCPU",
                    source,
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    restore_irqchips(vm_fd, &loaded.vm)?;
    fds.into_iter()
        .zip(&loaded.vcpus)
        .enumerate()
        .map(|(vcpu, (fd, s))| {
            s.restore(&fd)
                .map_err(|error| RestoreError::Vcpu { vcpu, error })?;
            Ok(ReadyVcpu {
                fd,
                cpuid: cpuid_of(&s.cpuid).map_err(|error| RestoreError::Vcpu { vcpu, error })?,
                rearm_syscall_assist: s.syscall_assist.is_some(),
            })
        })
        .collect()
}
