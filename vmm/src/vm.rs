//! Builds a VM from a [`VmConfig`] and runs it to its end.
//!
//! [`Vm::new`] runs named phases, in an order that matters: the in-kernel
//! irqchip and PIT exist before any vCPU; guest RAM is mapped and
//! registered ([`MemoryManager`]), then written (page tables, image, command
//! line) before userfaultfd takes over its missing pages; devices exist
//! before the boot image is loaded (Linux learns of them from the command
//! line and the DSDT); vCPUs come last.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;

use crate::api::control::{BalloonInfo, HotplugControl, HotplugInfo};
use crate::api::{ApiError, ApiServer, BalloonControl, VmControl};
use crate::arch::x86_64::layout::MmioDeviceInfo;
use crate::arch::x86_64::{self as arch, layout};
use crate::boot::vcpu::VcpuBoot;
use crate::boot::{self, Boot, BootError, BootKind, BootSpec};
use crate::config::{BalloonOptions, ConfigError, FaultMode, HotplugOptions, Kernel, VmConfig};
use crate::devices::marker::{MarkerHook, MarkerLog};
use crate::devices::virtio::balloon::{Balloon, BalloonConfig};
use crate::devices::virtio::manager::{DeviceSummary, Ticker, VirtioDevices};
use crate::devices::virtio::mem::{MemRegion, VirtioMem};
use crate::devices::{legacy, lock, serial, Bus, DeviceError};
use crate::exit::{ExitReason, VmExit};
use crate::fault::{self, handler, FaultEngine, FaultSetupError, FaultSnapshot, FaultStats};
use crate::host::{Host, HostError, KvmFlavor};
use crate::memory::{
    ImageFile, MemError, MemoryManager, MemoryStats, PageSource, SourceError, PAGE_SIZE,
};
use crate::metrics::{MetricsServer, VmMetrics};
use crate::seccomp::{confine, SeccompMode, ThreadClass};
use crate::vcpu::{self, Assists, Vcpu, VcpuShared};

#[derive(Debug, Error)]
pub enum VmError {
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Memory(#[from] MemError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Fault(#[from] FaultSetupError),
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
        source: arch::regs::RegsError,
    },
    #[error("writing boot structures to guest memory failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Metrics(#[from] crate::metrics::MetricsError),
    #[error("device setup: {0}")]
    Device(#[from] DeviceError),
    #[error("cannot install the {what} signal handler: {source}")]
    Signal {
        what: &'static str,
        source: vmm_sys_util::errno::Error,
    },
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    #[error("SYSCALL assist setup (use --syscall-assist off to boot without it): {0}")]
    SyscallAssist(vcpu::syscall::SyscallAssistError),
}

/// The device event loop failed (it ends the VM).
#[derive(Debug, Error)]
#[error("device event loop: {0:?}")]
pub struct EventLoopError(event_manager::Error);

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
    pub memory: MemoryStats,
    pub resident_pages: u64,
    /// The balloon at the end, if there is one.
    pub balloon: Option<BalloonInfo>,
    /// The virtio-mem device at the end, if there is one.
    pub hotplug: Option<HotplugInfo>,
    /// Each virtio device's counters at the end.
    pub devices: Vec<DeviceSummary>,
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
    shared: Arc<VcpuShared>,
    serial_input: Option<serial::SerialInput>,
    /// Event-loop subscribers of the virtio devices, and their ticker.
    virtio_events: Vec<Box<dyn MutEventSubscriber + Send>>,
    virtio_ticker: Ticker,
    virtio_summaries: Vec<Box<dyn Fn() -> DeviceSummary + Send + Sync>>,
    control: Arc<VmControl>,
    api_server: Option<ApiServer>,
    markers: Arc<Mutex<MarkerLog>>,
    engine: Option<Arc<FaultEngine>>,
    metrics: Arc<VmMetrics>,
    metrics_server: Option<MetricsServer>,
    memory: Arc<MemoryManager>,
    _vm_fd: Arc<VmFd>,
    _host: Host,
}

impl Vm {
    /// Create the VM, its memory, devices and vCPUs.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let host = Host::open()?;
        config.validate(host.max_vcpus)?;
        let mode = config
            .fault_mode
            .unwrap_or_else(|| host.flavor.default_fault_mode());
        if config.mem_source.is_some() && mode == FaultMode::Prefault {
            return Err(ConfigError::SourceNeedsUffd(mode.name()).into());
        }
        if config.hotplug.is_some() && !mode.uses_uffd() {
            return Err(ConfigError::HotplugNeedsUffd(mode.name()).into());
        }
        log::info!(
            "host: {}, max {} vCPUs, {} memslots; fault mode {}",
            host.flavor,
            host.max_vcpus,
            host.max_memslots,
            mode.name()
        );
        let image = match &config.kernel {
            Kernel::File(path) => boot::read_image(path)?,
            Kernel::Embedded { image, .. } => image.to_vec(),
        };
        let initrd = read_initrd(&config)?;
        let supported = kvm(
            "KVM_GET_SUPPORTED_CPUID",
            host.kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
        )?;

        let vm_fd = create_vm(&host)?;
        let memory = Arc::new(create_memory(&config, &host, &vm_fd, mode)?);
        let exit = Arc::new(VmExit::new());
        let markers = Arc::new(Mutex::new(MarkerLog::default()));
        let signal = Arc::new(AtomicU32::new(0));
        let (pio, serial_input) = legacy::build(&vm_fd, &exit, &config.serial, &markers, &signal)?;
        let mut mmio = Bus::new("MMIO");
        let mut virtio = VirtioDevices::new();
        let balloon = match config.balloon {
            Some(b) => Some(add_balloon(&mut virtio, &vm_fd, &mut mmio, &memory, b)?),
            None => None,
        };
        let hotplug = match config.hotplug {
            Some(h) => Some(add_hotplug(
                &mut virtio,
                &vm_fd,
                &mut mmio,
                &memory,
                &config,
                h,
            )?),
            None => None,
        };
        let boot = load_boot_image(
            &config,
            &host,
            &memory,
            &supported,
            &image,
            initrd.as_deref(),
            &virtio
                .windows()
                .iter()
                .map(|w| MmioDeviceInfo {
                    base: w.base,
                    len: w.len,
                    gsi: w.gsi,
                })
                .collect::<Vec<_>>(),
        )?;
        drop(initrd);

        let engine = fault::setup(
            mode,
            &memory,
            &exit,
            config.fault_around,
            config.inject_eagain_every,
        )?;
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
            devices: virtio.summaries(),
            balloon: balloon.clone(),
            hotplug: hotplug.clone(),
            ..VmMetrics::new(
                config.vcpus,
                match mode {
                    FaultMode::Handler => config.fault_threads,
                    _ => 0,
                },
                memory.clone(),
                mode,
            )
        });
        // Bind the API socket before anything runs, like the metrics port.
        let api_server = match &config.api_socket {
            Some(p) => Some(ApiServer::bind(p)?),
            None => None,
        };
        let control = Arc::new(VmControl::new(
            exit.clone(),
            memory.clone(),
            balloon,
            hotplug,
            signal,
            config.vcpus,
            mode,
        ));
        let syscall_assist = vcpu::syscall::wanted(
            config.syscall_assist,
            host.flavor,
            boot.kind == BootKind::Linux,
            boot.completes_syscall,
        );
        if syscall_assist {
            vcpu::syscall::filter_lstar_writes(&vm_fd).map_err(VmError::SyscallAssist)?;
        }
        let shared = Arc::new(VcpuShared {
            pio,
            mmio,
            exit: exit.clone(),
            fault: engine.clone().filter(|_| mode == FaultMode::Vcpu),
            assists: match host.flavor {
                KvmFlavor::Pvm => Assists::Pvm,
                _ => Assists::None,
            },
            syscall_assist: syscall_assist.then(|| memory.view()),
        });
        let vcpus = create_vcpus(&config, &host, &vm_fd, &supported, &boot)?;
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
            shared,
            serial_input: Some(serial_input),
            virtio_events: virtio.subscribers(),
            virtio_ticker: virtio.ticker(),
            virtio_summaries: virtio.summaries(),
            control,
            api_server,
            markers,
            engine,
            metrics,
            metrics_server,
            memory,
            _vm_fd: vm_fd,
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

    /// The per-thread fault counters (what the metrics endpoint reads).
    pub fn metrics(&self) -> &Arc<VmMetrics> {
        &self.metrics
    }

    /// The control plane (what the API serves; tests and `vmm stress` use it
    /// directly).
    pub fn control(&self) -> &Arc<VmControl> {
        &self.control
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
        let seccomp = self.config.seccomp;
        vcpu::install_kick_handler().map_err(|source| VmError::Signal {
            what: "vCPU kick",
            source,
        })?;
        let handlers = match (&self.engine, self.mode) {
            (Some(e), FaultMode::Handler) => {
                handler::spawn_handlers(e.clone(), self.exit.clone(), &self.metrics.handlers, {
                    let exit = self.exit.clone();
                    move || confine(seccomp, ThreadClass::Handler, &exit)
                })
                .map_err(VmError::Thread)?
            }
            _ => Vec::new(),
        };
        let linger = self.config.metrics_linger;
        let server = match self.metrics_server.take() {
            Some(s) => Some({
                let exit = self.exit.clone();
                s.spawn(self.metrics.clone(), self.exit.clone(), linger, move || {
                    confine(seccomp, ThreadClass::Metrics, &exit);
                })
                .map_err(VmError::Thread)?
            }),
            None => None,
        };
        // A lingering metrics server is left to end by itself.
        let server = server.filter(|_| linger.is_zero());
        let api = match self.api_server.take() {
            Some(s) => {
                eprintln!("vmm: API on {}", s.path().display());
                let stats = self.engine.is_some().then(|| self.metrics.thread("api"));
                let api_exit = self.exit.clone();
                Some(
                    s.spawn(self.control.clone(), self.exit.clone(), move || {
                        confine(seccomp, ThreadClass::Api, &api_exit);
                        if let Some(stats) = stats {
                            fault::sigbus::prepare_thread(stats);
                        }
                    })
                    .map_err(VmError::Thread)?,
                )
            }
            None => None,
        };
        // SIGINT/SIGTERM stop the VM cleanly (counters reported, threads
        // joined): blocked in every thread started from here on, and taken
        // by one waiter thread.
        let signals = spawn_signal_waiter(self.exit.clone(), seccomp);
        let start = Instant::now();
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            let v = Vcpu::new(
                index,
                fd,
                self.shared.clone(),
                self.metrics.vcpus[index].clone(),
            );
            let exit = self.exit.clone();
            let t = thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || {
                    // Before the first guest instruction.
                    if confine(seccomp, ThreadClass::Vcpu, &exit) {
                        v.run()
                    } else {
                        (u64::MAX, 0xff)
                    }
                })
                .map_err(VmError::Thread)?;
            threads.push(t);
        }
        let mut subscribers: Vec<Box<dyn MutEventSubscriber + Send>> =
            std::mem::take(&mut self.virtio_events);
        if let Some(i) = self.serial_input.take() {
            subscribers.push(Box::new(i));
        }
        let events = spawn_event_loop(
            subscribers,
            std::mem::replace(&mut self.virtio_ticker, Ticker::none()),
            self.exit.clone(),
            self.engine.is_some().then(|| self.metrics.thread("events")),
            seccomp,
        );
        // Every other thread runs: the caller's filter comes last (threads
        // inherit the filter of the thread that creates them).
        if self.config.seccomp_caller {
            confine(seccomp, ThreadClass::Main, &self.exit);
        }

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
        for t in handlers.into_iter().chain(server).chain(signals).chain(api) {
            let _ = t.join();
        }
        if let Ok(t) = events {
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
        Ok(RunReport {
            reason,
            mode: self.mode,
            vcpus: self.metrics.vcpus.iter().map(|s| s.snapshot()).collect(),
            handlers: self.metrics.handlers.iter().map(|s| s.snapshot()).collect(),
            markers,
            memory: self.memory.stats(),
            resident_pages: self.memory.resident_pages(),
            balloon: self.control.balloon_info().ok(),
            hotplug: self.control.memory_info().ok(),
            devices: self.virtio_summaries.iter().map(|f| f()).collect(),
            elapsed,
            stopped_at,
        })
    }
}

fn read_initrd(config: &VmConfig) -> Result<Option<Vec<u8>>, VmError> {
    config
        .initrd
        .as_ref()
        .map(|p| {
            std::fs::read(p).map_err(|source| VmError::Initrd {
                path: p.display().to_string(),
                source,
            })
        })
        .transpose()
}

/// The VM with its in-kernel irqchip and PIT (before any vCPU).
fn create_vm(host: &Host) -> Result<Arc<VmFd>, VmError> {
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
    Ok(vm_fd)
}

/// Boot RAM, mapped and registered with KVM, backed by the memory image if
/// one was given.
fn create_memory(
    config: &VmConfig,
    host: &Host,
    vm_fd: &Arc<VmFd>,
    mode: FaultMode,
) -> Result<MemoryManager, VmError> {
    let ranges = layout::ram_ranges(config.mem_size);
    if config.mem_hugepages {
        return Ok(MemoryManager::new_hugetlb(
            vm_fd.clone(),
            &ranges,
            config.hotplug.map_or(0, |h| h.size),
            host.max_memslots,
        )?);
    }
    let source = match &config.mem_source {
        // No fault engine: the host kernel serves the file (MAP_PRIVATE).
        Some(p) if mode == FaultMode::Kernel => {
            return Ok(MemoryManager::new_file_mapped(
                vm_fd.clone(),
                &ranges,
                ImageFile::open(p, config.mem_size)?,
                host.max_memslots,
            )?);
        }
        Some(p) => PageSource::File(ImageFile::open(p, config.mem_size)?),
        None => PageSource::Zero,
    };
    Ok(MemoryManager::new(
        vm_fd.clone(),
        &ranges,
        source,
        host.max_memslots,
    )?)
}

/// Page tables, GDT, the image and what it boots with, written into RAM.
fn load_boot_image(
    config: &VmConfig,
    host: &Host,
    memory: &MemoryManager,
    supported: &CpuId,
    image: &[u8],
    initrd: Option<&[u8]>,
    devices: &[MmioDeviceInfo],
) -> Result<Boot, VmError> {
    let mem = memory.memory();
    let ram = memory.boot_ranges();
    let ram_top = ram.iter().map(|r| r.end()).max().unwrap_or(0);
    arch::write_boot_structures(&mem, ram_top, arch::has_1g_pages(supported))?;
    let image_name = config.kernel.name();
    Ok(boot::load(
        &mem,
        ram,
        &BootSpec {
            image,
            image_name: &image_name,
            initrd,
            cmdline: &config.cmdline,
            vcpus: config.vcpus,
            flavor: host.flavor,
            devices,
            memory_hotplug: config.hotplug.is_some(),
        },
    )?)
}

fn create_vcpus(
    config: &VmConfig,
    host: &Host,
    vm_fd: &VmFd,
    supported: &CpuId,
    boot: &Boot,
) -> Result<Vec<VcpuFd>, VmError> {
    let b = VcpuBoot {
        boot,
        cpuid: supported,
        flavor: host.flavor,
        vcpus: config.vcpus,
        mem_size: config.mem_size,
        cmdline_addr: layout::CMDLINE_ADDR,
    };
    (0..config.vcpus)
        .map(|index| {
            let fd = kvm("KVM_CREATE_VCPU", vm_fd.create_vcpu(index as u64))?;
            boot::vcpu::configure(&fd, index, &b)
                .map_err(|source| VmError::VcpuSetup { index, source })?;
            Ok(fd)
        })
        .collect()
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

/// A virtio-balloon on the MMIO bus.
fn add_balloon(
    virtio: &mut VirtioDevices,
    vm_fd: &VmFd,
    mmio: &mut Bus,
    memory: &Arc<MemoryManager>,
    b: BalloonOptions,
) -> Result<BalloonControl, VmError> {
    let config = BalloonConfig {
        target_pages: u32::try_from(b.target / PAGE_SIZE).unwrap_or(u32::MAX),
        free_page_reporting: b.free_page_reporting,
        stats_interval: Duration::from_secs(b.stats_interval_s),
    };
    let device = virtio.add(vm_fd, mmio, memory, |irq| {
        Balloon::new(memory.clone(), irq, config)
    })?;
    let (stats, counters) = {
        let d = lock(&device);
        (d.stats(), d.device_counters())
    };
    Ok(BalloonControl {
        device,
        stats,
        counters,
    })
}

/// A virtio-mem device whose region sits above boot RAM.
fn add_hotplug(
    virtio: &mut VirtioDevices,
    vm_fd: &VmFd,
    mmio: &mut Bus,
    memory: &Arc<MemoryManager>,
    config: &VmConfig,
    h: HotplugOptions,
) -> Result<HotplugControl, VmError> {
    let region = MemRegion {
        addr: layout::hotplug_base(config.mem_size, h.size),
        size: h.size,
        block_size: h.block_size,
    };
    region.validate().map_err(ConfigError::Hotplug)?;
    log::info!(
        "virtio-mem region [{:#x}..{:#x}), {} MiB blocks",
        region.addr,
        region.addr + region.size,
        region.block_size >> 20
    );
    region
        .check_requested(h.requested)
        .map_err(ConfigError::Hotplug)?;
    let device = virtio.add(vm_fd, mmio, memory, |irq| {
        VirtioMem::new(memory.clone(), irq, region).with_requested(h.requested)
    })?;
    let (stats, counters) = {
        let d = lock(&device);
        (d.stats(), d.device_counters())
    };
    Ok(HotplugControl {
        device,
        stats,
        counters,
        region,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::acpi;
    use crate::devices::{acpi_power, i8042, serial, BusDevice};

    /// The ACPI tables (arch) describe the devices (devices) by number,
    /// and neither layer may import the other: this is where they meet.
    #[test]
    fn acpi_tables_describe_the_devices_as_they_are() {
        assert_eq!(u64::from(acpi::COM1_PORT), serial::COM1_BASE);
        assert_eq!(acpi::COM1_IRQ, serial::COM1_IRQ);
        assert_eq!(acpi::SLEEP_CONTROL_PORT, acpi_power::SLEEP_CONTROL_PORT);
        assert_eq!(acpi::SLEEP_STATUS_PORT, acpi_power::SLEEP_STATUS_PORT);
        assert_eq!(acpi::S5_SLEEP_TYPE, acpi_power::S5_SLEEP_TYPE);
        // The FADT's reset register resets through the i8042.
        let exit = Arc::new(VmExit::new());
        let mut kbd = i8042::I8042::new(exit.clone());
        kbd.write(acpi::RESET_PORT - i8042::I8042_BASE, &[acpi::RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
