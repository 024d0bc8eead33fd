//! Builds a VM from a [`VmConfig`] and runs it to its end.
//!
//! [`Vm::new`] runs named phases, in an order that matters: the in-kernel
//! irqchip and PIT exist before any vCPU; guest RAM is mapped and
//! registered ([`MemoryManager`]), then written (page tables, image, command
//! line) before userfaultfd takes over its missing pages; devices exist
//! before the boot image is loaded (Linux learns of them from the command
//! line and the DSDT); vCPUs come last.

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;

use crate::arch::x86_64::{self as arch, layout, vcpu::VcpuBoot};
use crate::boot::{self, Boot, BootError, BootSpec};
use crate::config::{ConfigError, FaultMode, VmConfig};
use crate::devices::marker::{MarkerHook, MarkerLog};
use crate::devices::{legacy, serial, Bus, DeviceError};
use crate::exit::{ExitReason, VmExit};
use crate::fault::{self, handler, FaultEngine, FaultSetupError, FaultSnapshot, FaultStats};
use crate::host::{Host, HostError, KvmFlavor};
use crate::memory::{ImageFile, MemError, MemoryManager, MemoryStats, PageSource, SourceError};
use crate::metrics::{MetricsServer, VmMetrics};
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
    pub memory: MemoryStats,
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
    shared: Arc<VcpuShared>,
    serial_input: Option<serial::SerialInput>,
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
        let mode = fault::choose_mode(config.fault_mode, host.flavor);
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
            Some(path) => boot::read_image(path)?,
            None => crate::DEFAULT_GUEST.to_vec(),
        };
        let initrd = read_initrd(&config)?;
        let supported = kvm(
            "KVM_GET_SUPPORTED_CPUID",
            host.kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
        )?;

        let vm_fd = create_vm(&host)?;
        let memory = Arc::new(create_memory(&config, &host, &vm_fd)?);
        let exit = Arc::new(VmExit::new());
        let markers = Arc::new(Mutex::new(MarkerLog::default()));
        let (pio, serial_input) = legacy::build(&vm_fd, &exit, &config.serial, &markers)?;
        let boot = load_boot_image(
            &config,
            &host,
            &memory,
            &supported,
            &image,
            initrd.as_deref(),
        )?;
        drop(initrd);

        let engine = fault::setup(mode, &memory, &exit, config.fault_around)?;
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
        let metrics = Arc::new(VmMetrics::new(
            config.vcpus,
            match mode {
                FaultMode::Handler => config.fault_threads,
                _ => 0,
            },
            memory.clone(),
            mode,
        ));
        let shared = Arc::new(VcpuShared {
            pio,
            mmio: Bus::new("MMIO"),
            exit: exit.clone(),
            fault: engine.clone().filter(|_| mode == FaultMode::Vcpu),
            assists: match host.flavor {
                KvmFlavor::Pvm => Assists::Pvm,
                _ => Assists::None,
            },
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
        vcpu::install_kick_handler().map_err(|source| VmError::Signal {
            what: "vCPU kick",
            source,
        })?;
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
            let v = Vcpu::new(
                index,
                fd,
                self.shared.clone(),
                self.metrics.vcpus[index].clone(),
            );
            let t = thread::Builder::new()
                .name(format!("vcpu{index}"))
                .spawn(move || v.run())
                .map_err(VmError::Thread)?;
            threads.push(t);
        }
        let input = self.serial_input.take().map(|i| {
            spawn_event_loop(
                i,
                self.exit.clone(),
                self.engine.is_some().then(|| self.metrics.thread("events")),
            )
        });

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
        Ok(RunReport {
            reason,
            mode: self.mode,
            vcpus: self.metrics.vcpus.iter().map(|s| s.snapshot()).collect(),
            handlers: self.metrics.handlers.iter().map(|s| s.snapshot()).collect(),
            markers,
            memory: self.memory.stats(),
            resident_pages: self.memory.resident_pages(),
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
) -> Result<MemoryManager, VmError> {
    let source = match &config.mem_source {
        Some(p) => PageSource::File(ImageFile::open(p, config.mem_size)?),
        None => PageSource::Zero,
    };
    Ok(MemoryManager::new(
        vm_fd.clone(),
        &layout::ram_ranges(config.mem_size),
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
) -> Result<Boot, VmError> {
    let mem = memory.memory();
    let ram = memory.boot_ranges();
    let ram_top = ram.iter().map(|r| r.end()).max().unwrap_or(0);
    arch::write_boot_structures(&mem, ram_top, arch::has_1g_pages(supported))?;
    let image_name = config
        .kernel
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "the embedded demo guest".into());
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
            devices: &[],
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
            arch::vcpu::configure(&fd, index, &b)
                .map_err(|source| VmError::VcpuSetup { index, source })?;
            Ok(fd)
        })
        .collect()
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
    fault_stats: Option<Arc<FaultStats>>,
) -> std::io::Result<thread::JoinHandle<()>> {
    thread::Builder::new().name("events".into()).spawn(move || {
        // Devices on this thread that touch a missing page of guest RAM
        // serve the fault here (SIGBUS), counted in this thread's stats.
        if let Some(stats) = fault_stats {
            fault::sigbus::prepare_thread(stats);
        }
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
