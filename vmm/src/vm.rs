//! Builds a VM from a [`VmConfig`] and runs it to its end.
//!
//! Order matters: the in-kernel irqchip and PIT exist before any vCPU; guest
//! RAM is written (image, page tables, GDT, command line) and registered with
//! KVM before userfaultfd takes over the missing pages and vCPUs start.

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;
use userfaultfd::{FeatureFlags, UffdBuilder};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{cpuid, gdt, layout, paging, regs};
use crate::boot::{self, BootError, BootKind};
use crate::config::{ConfigError, FaultMode, SerialOut, VmConfig};
use crate::devices::marker::{MarkerHook, MarkerLog, MarkerPort, MARKER_PORT};
use crate::devices::{exit_port, i8042, serial, Bus, BusDevice, BusOverlap, Sink};
use crate::exit::{ExitReason, VmExit};
use crate::fault::{handler, sigbus, FaultEngine, FaultSnapshot, FaultStats};
use crate::host::{Host, HostError, KvmFlavor};
use crate::loader::{self, LoaderError};
use crate::memory::{
    GuestRam, ImageFile, MemError, MemoryError, MemoryManager, PageSource, SourceError,
};
use crate::metrics::{MetricsServer, VmMetrics};
use crate::vcpu::{self, Vcpu, VcpuShared};

#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Mem(#[from] MemError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error("cannot read initramfs {path}: {source}")]
    Initrd {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {index} setup: {source}")]
    VcpuSetup {
        index: usize,
        source: regs::RegsError,
    },
    #[error("writing boot structures to guest memory failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error("cannot create a userfaultfd ({0}); /dev/userfaultfd or the userfaultfd syscall is needed for --fault-mode vcpu/handler")]
    Uffd(userfaultfd::Error),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("device setup: {0}")]
    Device(String),
    #[error(transparent)]
    Bus(#[from] BusOverlap),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Kvm { what, source })
}

/// What a finished run reports.
pub struct RunReport {
    pub reason: ExitReason,
    pub mode: FaultMode,
    /// Per-vCPU fault counters, indexed by vCPU.
    pub vcpus: Vec<FaultSnapshot>,
    /// Handler threads' counters (`handler` mode).
    pub handlers: Vec<FaultSnapshot>,
    /// Marker-port writes: time since the vCPUs started, value.
    pub markers: Vec<(Duration, u32)>,
    pub memslot_changes: u64,
    pub generation: u64,
    pub discarded_pages: u64,
    pub resident_pages: u64,
    pub elapsed: Duration,
    /// Where each vCPU was when the VM stopped: (RIP, CPL).
    pub stopped_at: Vec<(u64, u8)>,
}

impl RunReport {
    /// All fault counters added up (vCPUs and handlers).
    pub fn total(&self) -> FaultSnapshot {
        let mut t = FaultSnapshot::default();
        for s in self.vcpus.iter().chain(&self.handlers) {
            t.add(s);
        }
        t
    }
}

/// A VM ready to run.
pub struct Vm {
    config: VmConfig,
    mode: FaultMode,
    // Field order is drop order: vCPUs and the VM fd go before guest RAM.
    vcpus: Vec<VcpuFd>,
    exit: Arc<VmExit>,
    shared: Option<Arc<VcpuShared>>,
    serial_input: Option<serial::SerialInput>,
    markers: Arc<Mutex<MarkerLog>>,
    engine: Option<Arc<FaultEngine>>,
    metrics: Arc<VmMetrics>,
    metrics_server: Option<MetricsServer>,
    memory: Arc<MemoryManager>,
    _vm_fd: Arc<VmFd>,
    _ram: GuestRam,
    _host: Host,
}

/// Where the host delivers a missing page's address to the faulting vCPU:
/// PVM does (an MMIO exit at the GPA, or an emulation failure on a fetch);
/// hardware KVM returns a bare EFAULT until exit-on-missing is merged.
fn auto_mode(flavor: KvmFlavor) -> FaultMode {
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

impl Vm {
    /// Create the VM, its memory, devices and vCPUs.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let host = Host::open()?;
        config.validate(host.max_vcpus)?;
        let mode = config.fault_mode.unwrap_or_else(|| auto_mode(host.flavor));
        if config.mem_source.is_some() && !mode.uses_uffd() {
            return Err(ConfigError::SourceNeedsUffd(mode.name()).into());
        }
        log::info!(
            "host: {}, max {} vCPUs, {} memslots; fault mode {}",
            host.flavor,
            host.max_vcpus,
            host.max_memslots,
            mode.name()
        );
        let image = match &config.kernel {
            Some(path) => loader::read_image(path)?,
            None => crate::DEFAULT_GUEST.to_vec(),
        };
        let source = match &config.mem_source {
            Some(p) => PageSource::File(ImageFile::open(p, config.mem_size)?),
            None => PageSource::Zero,
        };

        let vm_fd = Arc::new(kvm("KVM_CREATE_VM", host.kvm.create_vm())?);
        kvm(
            "KVM_SET_TSS_ADDR",
            vm_fd.set_tss_address(layout::KVM_TSS_ADDR),
        )?;
        kvm("KVM_CREATE_IRQCHIP", vm_fd.create_irq_chip())?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        kvm("KVM_CREATE_PIT2", vm_fd.create_pit2(pit))?;

        let initrd = match &config.initrd {
            Some(p) => Some(std::fs::read(p).map_err(|source| VmError::Initrd {
                path: p.display().to_string(),
                source,
            })?),
            None => None,
        };
        let ram = GuestRam::new(&layout::ram_ranges(config.mem_size))?;
        write_boot_structures(&host, &ram)?;
        let image_name = config
            .kernel
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "the embedded demo guest".into());
        let boot = boot::load(
            ram.memory(),
            ram.ranges(),
            &image,
            &image_name,
            initrd.as_deref(),
            &config.cmdline,
            config.vcpus,
            host.flavor,
        )?;
        drop(initrd);
        ram.register(&vm_fd)?;

        let exit = Arc::new(VmExit::new());
        let mut offset = 0;
        let boot_slots = ram
            .mappings()
            .into_iter()
            .map(|(gpa, mapping)| {
                let o = offset;
                offset += mapping.size() as u64;
                (gpa, mapping, source.clone(), o)
            })
            .collect();
        let mut memory = MemoryManager::new(vm_fd.clone(), boot_slots, host.max_memslots);
        let engine = match mode {
            FaultMode::Vcpu | FaultMode::Handler => {
                let mut b = UffdBuilder::new();
                b.close_on_exec(true)
                    .non_blocking(true)
                    .user_mode_only(false);
                if mode == FaultMode::Vcpu {
                    b.require_features(FeatureFlags::SIGBUS);
                }
                let uffd = Arc::new(b.create().map_err(VmError::Uffd)?);
                memory.attach_uffd(uffd.clone())?;
                let memory = Arc::new(memory);
                let e = Arc::new(FaultEngine::new(
                    memory.clone(),
                    uffd,
                    exit.clone(),
                    mode == FaultMode::Handler,
                    config.fault_around,
                ));
                (Some(e), memory)
            }
            FaultMode::Prefault => {
                memory.populate_all()?;
                (None, Arc::new(memory))
            }
            FaultMode::Kernel => (None, Arc::new(memory)),
        };
        let (engine, memory) = engine;
        if mode == FaultMode::Vcpu {
            if let Some(e) = &engine {
                sigbus::register(e).map_err(|e| VmError::Device(format!("SIGBUS handler: {e}")))?;
            }
        }

        // Bind the metrics endpoint before anything runs: a port in use is
        // an error now, not after the guest started.
        let metrics_server = match config.metrics_addr {
            Some(addr) => {
                let server = MetricsServer::bind(addr, config.metrics_allow_remote)?;
                eprintln!("vmm: metrics on http://{}/metrics", server.addr());
                Some(server)
            }
            None => None,
        };
        let metrics = Arc::new(VmMetrics {
            vcpus: (0..config.vcpus)
                .map(|_| Arc::new(FaultStats::default()))
                .collect(),
            handlers: match mode {
                FaultMode::Handler => (0..config.fault_threads)
                    .map(|_| Arc::new(FaultStats::default()))
                    .collect(),
                _ => Vec::new(),
            },
            memory: memory.clone(),
            mode,
        });

        let markers = Arc::new(Mutex::new(MarkerLog::default()));
        let vcpu_engine = if mode == FaultMode::Vcpu {
            engine.clone()
        } else {
            None
        };
        let (shared, serial_input) = build_devices(
            &vm_fd,
            &exit,
            &config.serial,
            &markers,
            vcpu_engine,
            host.flavor == KvmFlavor::Pvm,
        )?;

        let base = kvm(
            "KVM_GET_SUPPORTED_CPUID",
            host.kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
        )?;
        let mut vcpus = Vec::with_capacity(config.vcpus);
        for index in 0..config.vcpus {
            let fd = kvm("KVM_CREATE_VCPU", vm_fd.create_vcpu(index as u64))?;
            let mut c = base.clone();
            cpuid::normalize(
                &mut c,
                index,
                config.vcpus,
                cpuid::CpuidPolicy {
                    flavor: host.flavor,
                },
            );
            kvm("KVM_SET_CPUID2", fd.set_cpuid2(&c))?;
            let args = match boot.kind {
                BootKind::TestGuest => [
                    index as u64,
                    config.vcpus as u64,
                    config.mem_size,
                    layout::CMDLINE_ADDR,
                ],
                // Linux's 64-bit entry takes boot_params in RSI.
                BootKind::Linux => [0, boot.zero_page, 0, 0],
            };
            let setup = || -> Result<(), regs::RegsError> {
                regs::setup_msrs(&fd)?;
                regs::setup_sregs(&fd)?;
                regs::setup_fpu(&fd)?;
                regs::setup_regs(&fd, boot.entry, args)?;
                regs::setup_lapic(&fd)?;
                // With the in-kernel LAPIC, vCPUs other than 0 start in
                // UNINITIALIZED, waiting for INIT/SIPI: right for Linux, which
                // starts them itself. Test guests start every vCPU at the
                // entry point, as KVM's selftests do.
                if boot.kind == BootKind::TestGuest || index == 0 {
                    regs::make_runnable(&fd)?;
                }
                Ok(())
            };
            setup().map_err(|source| VmError::VcpuSetup { index, source })?;
            vcpus.push(fd);
        }
        log::info!(
            "VM: {} vCPUs, {} MiB RAM, entry {:#x}",
            config.vcpus,
            config.mem_size >> 20,
            boot.entry
        );
        Ok(Vm {
            config,
            mode,
            vcpus,
            exit,
            shared: Some(shared),
            serial_input: Some(serial_input),
            markers,
            engine,
            metrics,
            metrics_server,
            memory,
            _vm_fd: vm_fd,
            _ram: ram,
            _host: host,
        })
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    pub fn mode(&self) -> FaultMode {
        self.mode
    }

    /// Where metrics are served, if they are.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_server.as_ref().map(MetricsServer::addr)
    }

    /// Run-time memslot changes (hotplug, unplug, discards).
    pub fn memory(&self) -> &Arc<MemoryManager> {
        &self.memory
    }

    /// A handle that ends the VM (e.g. from a test's churn thread).
    pub fn exit_handle(&self) -> Arc<VmExit> {
        self.exit.clone()
    }

    /// Run `hook(value)` on the vCPU thread at each marker-port write.
    pub fn on_marker(&self, hook: MarkerHook) {
        self.markers.lock().unwrap_or_else(|e| e.into_inner()).hook = Some(hook);
    }

    /// Run the guest until any vCPU or device ends it.
    pub fn run(mut self) -> Result<RunReport, VmError> {
        vcpu::install_kick_handler()
            .map_err(|e| VmError::Device(format!("kick signal handler: {e}")))?;
        let shared = self.shared.take().expect("run called once");
        let handlers = match (&self.engine, self.mode) {
            (Some(e), FaultMode::Handler) => {
                handler::spawn_handlers(e.clone(), self.exit.clone(), &self.metrics.handlers)
                    .map_err(VmError::Thread)?
            }
            _ => Vec::new(),
        };
        let server = match self.metrics_server.take() {
            Some(s) => Some(
                s.spawn(self.metrics.clone(), self.exit.clone())
                    .map_err(VmError::Thread)?,
            ),
            None => None,
        };
        // SIGINT/SIGTERM stop the VM cleanly (counters reported, threads
        // joined): blocked in every thread started from here on, and taken
        // by one waiter thread.
        let signals = spawn_signal_waiter(self.exit.clone());
        let start = Instant::now();
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            let v = Vcpu::new(index, fd, shared.clone(), self.metrics.vcpus[index].clone());
            let t = thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || v.run())
                .map_err(VmError::Thread)?;
            threads.push(t);
        }
        let input = self
            .serial_input
            .take()
            .map(|i| spawn_event_loop(i, self.exit.clone()));

        let reason = self.exit.wait();
        for t in &threads {
            vcpu::kick(t.as_pthread_t());
        }
        let stopped_at = threads
            .into_iter()
            .map(|t| {
                t.join().unwrap_or_else(|_| {
                    log::error!("a vCPU thread panicked");
                    (u64::MAX, 0xff)
                })
            })
            .collect();
        let elapsed = start.elapsed();
        for t in handlers.into_iter().chain(server).chain(signals) {
            let _ = t.join();
        }
        if let Some(Ok(t)) = input {
            let _ = t.join();
        }
        let markers = self
            .markers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .marks
            .iter()
            .map(|(t, v)| (t.saturating_duration_since(start), *v))
            .collect();
        let counters = &self.memory.counters;
        Ok(RunReport {
            reason,
            mode: self.mode,
            vcpus: self.metrics.vcpus.iter().map(|s| s.snapshot()).collect(),
            handlers: self.metrics.handlers.iter().map(|s| s.snapshot()).collect(),
            markers,
            memslot_changes: counters.changes.load(std::sync::atomic::Ordering::Relaxed),
            generation: self.memory.slots.snapshot().generation,
            discarded_pages: counters
                .discarded_pages
                .load(std::sync::atomic::Ordering::Relaxed),
            resident_pages: self.memory.resident_pages(),
            elapsed,
            stopped_at,
        })
    }
}

/// Page tables and the GDT (the image and its command line come after).
fn write_boot_structures(host: &Host, ram: &GuestRam) -> Result<(), VmError> {
    let mem = ram.memory();
    let ram_top = ram.ranges().iter().map(|r| r.end()).max().unwrap_or(0);
    let gib_pages = host_has_1g_pages(host);
    let mapped = paging::setup_identity_map(mem, ram_top, gib_pages)?;
    if mapped < ram_top {
        log::warn!(
            "identity map covers {mapped:#x} bytes of {ram_top:#x}: the host has no 1 GiB pages"
        );
    }
    for (i, e) in gdt::BOOT_GDT.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(layout::GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(layout::IDT_ADDR))?;
    Ok(())
}

fn host_has_1g_pages(host: &Host) -> bool {
    host.kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .ok()
        .and_then(|c| cpuid::leaf(&c, 0x8000_0001, 0))
        .is_some_and(|e| e.edx & (1 << 26) != 0)
}

/// The legacy devices on the port-I/O bus.
fn build_devices(
    vm_fd: &VmFd,
    exit: &Arc<VmExit>,
    out: &SerialOut,
    markers: &Arc<Mutex<MarkerLog>>,
    fault: Option<Arc<FaultEngine>>,
    emulation_assists: bool,
) -> Result<(Arc<VcpuShared>, serial::SerialInput), VmError> {
    let dev_err = |what: &str, e: std::io::Error| VmError::Device(format!("{what}: {e}"));
    let mut pio = Bus::new("port-I/O");

    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| dev_err("serial eventfd", e))?;
    kvm(
        "KVM_IRQFD (serial)",
        vm_fd.register_irqfd(&irq, serial::COM1_IRQ),
    )?;
    let events =
        serial::SerialInput::new_events().map_err(|e| dev_err("serial input eventfd", e))?;
    let writer: Box<dyn std::io::Write + Send> = match out {
        SerialOut::Stdout => Box::new(serial::PanicWatch::new(
            serial::FlushingStdout,
            exit.clone(),
        )),
        SerialOut::Capture(buf) => Box::new(serial::PanicWatch::new(
            serial::CaptureWriter(buf.clone()),
            exit.clone(),
        )),
    };
    let uart = Arc::new(Mutex::new(serial::SerialDevice::new(
        irq,
        events.clone(),
        writer,
    )));
    pio.insert(serial::COM1_BASE, serial::COM1_LEN, uart.clone())?;
    let input = serial::SerialInput::new(uart, events, libc::STDIN_FILENO);

    let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(i8042::I8042::new(exit.clone())));
    pio.insert(i8042::I8042_BASE, i8042::I8042_LEN, i8042)?;
    pio.insert(
        exit_port::EXIT_PORT,
        1,
        Arc::new(Mutex::new(exit_port::ExitPort::new(exit.clone()))),
    )?;
    pio.insert(
        MARKER_PORT,
        1,
        Arc::new(Mutex::new(MarkerPort(markers.clone()))),
    )?;
    pio.insert(0x80, 1, Arc::new(Mutex::new(Sink)))?;

    let shared = Arc::new(VcpuShared {
        pio,
        mmio: Bus::new("MMIO"),
        exit: exit.clone(),
        fault,
        emulation_assists,
    });
    Ok((shared, input))
}

/// Block SIGINT and SIGTERM in this thread (inherited by threads it starts)
/// and wait for them on a dedicated thread, which ends the VM.
fn spawn_signal_waiter(exit: Arc<VmExit>) -> Option<thread::JoinHandle<()>> {
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

/// The device event loop (serial input) on its own thread; it ends with the VM.
fn spawn_event_loop(
    input: serial::SerialInput,
    exit: Arc<VmExit>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name("events".into()).spawn(move || {
        let mut em = match EventManager::<Box<dyn MutEventSubscriber + Send>>::new() {
            Ok(em) => em,
            Err(e) => {
                log::warn!("serial input disabled: event manager: {e:?}");
                return;
            }
        };
        em.add_subscriber(Box::new(input));
        while !exit.is_stopping() {
            if let Err(e) = em.run_with_timeout(100) {
                log::warn!("event loop: {e:?}");
                break;
            }
        }
    })
}
