//! Builds a VM from a [`VmConfig`] and runs it to its end: the only place
//! that wires the layers together.
//!
//! [`Vm::new`] runs named phases ([`build`]), in an order that matters: the
//! in-kernel irqchip and PIT exist before any vCPU; guest RAM is mapped and
//! registered ([`MemoryManager`]), then written (page tables, image,
//! command line) before userfaultfd takes over its missing pages; devices
//! exist before the boot image is loaded (Linux learns of them from the
//! command line and the DSDT); vCPUs come last. [`Vm::run`] starts the
//! threads ([`threads`]), waits for the end and reports ([`RunReport`]).

mod actions;
mod build;
mod report;
mod restore;
mod threads;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::MutEventSubscriber;
use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;

pub use report::RunReport;

use crate::api::{ApiError, ApiServer, VmControl};
use crate::arch::x86_64 as arch;
use crate::boot::BootError;
use crate::config::{ConfigError, FaultMode, Kernel, VmConfig};
use crate::devices::marker::{MarkerHook, MarkerLog};
use crate::devices::virtio::manager::{DeviceSummary, Ticker};
use crate::devices::{serial, DeviceError};
use crate::exit::VmExit;
use crate::fault::prefetch::Plan;
use crate::fault::{EngineOptions, FaultEngine, FaultSetupError, RestoreStats};
use crate::host::{Host, HostError};
use crate::memory::{MemError, MemoryManager, SourceError};
use crate::metrics::{MetricsServer, VmMetrics};
use crate::snapshot::restore::RestoreError;
use crate::snapshot::SnapshotError;
use crate::vcpu::pause::Pause;
use crate::vcpu::{self, VcpuShared};

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
    #[error("restore: installing a page before the first entry: {0}")]
    Install(#[from] crate::fault::FaultError),
    #[error("cannot read initramfs {path}: {source}")]
    Initrd {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    DirtyRing(#[from] crate::memory::ring::RingError),
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
    #[error("restore from {dir}: {error}")]
    Restore { dir: String, error: RestoreError },
    #[error("incoming migration: {0}")]
    Incoming(String),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

/// The device event loop failed (it ends the VM).
#[derive(Debug, Error)]
#[error("device event loop: {0:?}")]
pub struct EventLoopError(event_manager::Error);

pub(crate) fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, VmError> {
    r.map_err(|source| VmError::Kvm { what, source })
}

/// A vCPU created and set up (booted or restored), not running yet.
struct ReadyVcpu {
    fd: VcpuFd,
    /// The CPUID it was given (what a snapshot records).
    cpuid: CpuId,
    /// Restored with the SYSCALL assist armed.
    rearm_syscall_assist: bool,
}

/// A VM ready to run.
pub struct Vm {
    config: VmConfig,
    mode: FaultMode,
    // Field order is drop order: vCPUs and the VM fd go before guest RAM.
    vcpus: Vec<ReadyVcpu>,
    exit: Arc<VmExit>,
    pause: Arc<Pause>,
    actions: Arc<actions::Actions>,
    restore_stats: Arc<RestoreStats>,
    /// A restore's background prefetch.
    prefetch: Option<Plan>,
    /// A restore records its working set this long.
    record_for: Option<Duration>,
    /// A post-copy migration's pages still coming: readers waiting for
    /// one give up when the VM ends.
    postcopy: Option<Arc<crate::snapshot::postcopy::Arrivals>>,
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
    /// Create the VM, its memory, devices and vCPUs: booted from the
    /// configuration's image, or restored from its snapshot
    /// ([`Kernel::Snapshot`]).
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let started = Instant::now();
        if let Kernel::Snapshot(dir) = &config.kernel {
            let dir = dir.clone();
            return Self::restore(config, &dir, started);
        }
        if let Kernel::Incoming(o) = &config.kernel {
            let o = o.clone();
            return Self::incoming(config, &o, started);
        }
        let host = Host::open()?;
        let mode = build::check(&config, &host)?;
        let image = build::read_image(&config)?;
        let initrd = build::read_initrd(&config)?;
        let supported = kvm(
            "KVM_GET_SUPPORTED_CPUID",
            host.kvm
                .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES),
        )?;
        let vm_fd = build::create_vm(&host)?;
        let rings = build::dirty_rings(&config, &vm_fd)?;
        let memory = Arc::new(build::create_memory(
            &config,
            &host,
            build::kvm_slots(&vm_fd, &rings),
            mode,
        )?);
        let exit = Arc::new(VmExit::new());
        let devices = build::Devices::build(&config, &vm_fd, &memory, &exit)?;
        let boot = build::load_boot_image(
            &config,
            &host,
            &memory,
            &supported,
            &image,
            initrd.as_deref(),
            &devices.windows(),
        )?;
        drop(initrd);
        let restore_stats = Arc::new(RestoreStats::new(started));
        let engine = crate::fault::setup(
            mode,
            &memory,
            &exit,
            engine_options(&config, &restore_stats, None),
        )?;
        let syscall_assist = build::syscall_assist(&config, &host, &vm_fd, &boot)?;
        let vcpus =
            build::create_vcpus(&config, &host, &vm_fd, &supported, &boot, rings.as_deref())?;
        log::info!(
            "VM: {} vCPUs, {} MiB RAM, entry {:#x}",
            config.vcpus,
            config.mem_size >> 20,
            boot.entry
        );
        Self::assemble(Parts {
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
            base: None,
            rings,
        })
    }

    /// The rest of a VM, booted or restored alike: its servers, metrics,
    /// control plane, what its vCPUs share, and what a snapshot reads.
    fn assemble(p: Parts) -> Result<Vm, VmError> {
        let pause = Arc::new(Pause::new(p.config.vcpus));
        let actions = Arc::new(actions::Actions::new(&p, &pause));
        let Parts {
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
            base: _,
            rings,
        } = p;
        let servers = build::Servers::bind(&config)?;
        let a = actions.clone();
        let metrics = Arc::new(VmMetrics {
            restore: Some(restore_stats.clone()),
            engine: engine.clone(),
            migration: Some(Box::new(move || a.migration_reading())),
            ..devices.metrics(&config, mode, &memory)
        });
        let control = Arc::new(devices.control(&config, mode, &memory, &exit));
        control.set_actions(actions.clone());
        control.set_restore_view(restore_view(&restore_stats, &metrics.vcpus, engine.clone()));
        let m = metrics.clone();
        control.set_metrics_view(Box::new(move || m.snapshot().to_json()));
        let build::Devices {
            pio,
            mmio,
            serial_input,
            mut virtio,
            markers,
            ..
        } = devices;
        let shared = Arc::new(VcpuShared {
            pio,
            mmio,
            exit: exit.clone(),
            fault: engine.clone().filter(|_| mode == FaultMode::Vcpu),
            engine: engine.clone(),
            restore: restore_stats.clone(),
            assists: build::assists(&host),
            syscall_assist: syscall_assist.then(|| memory.view()),
            pause: pause.clone(),
            msr_list: build::msr_list(&host)?,
            dirty_rings: rings.map(|r| r as Arc<dyn crate::vcpu::RingFull>),
        });
        Ok(Vm {
            mode,
            vcpus,
            exit,
            pause,
            actions,
            restore_stats,
            prefetch: None,
            record_for: None,
            postcopy: None,
            shared,
            serial_input: Some(serial_input),
            virtio_events: virtio.subscribers(),
            virtio_ticker: virtio.ticker(),
            virtio_summaries: virtio.summaries(),
            control,
            api_server: servers.api,
            markers,
            engine,
            metrics,
            metrics_server: servers.metrics,
            memory,
            _vm_fd: vm_fd,
            _host: host,
            config,
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

    /// Pause, resume and snapshot this VM (what the API's `/vm/*`
    /// actions do; tests call it directly).
    pub fn actions(&self) -> Arc<dyn crate::api::VmActions> {
        self.actions.clone()
    }

    /// The VM's first-entry, stall and restore counters.
    pub fn restore_stats(&self) -> &Arc<RestoreStats> {
        &self.restore_stats
    }

    /// Run the guest until any vCPU or device ends it.
    pub fn run(mut self) -> Result<RunReport, VmError> {
        vcpu::install_kick_handler().map_err(|source| VmError::Signal {
            what: "vCPU kick",
            source,
        })?;
        let helpers = self.spawn_helpers()?;
        let start = Instant::now();
        let vcpus = self.spawn_vcpus()?;
        let events = self.spawn_events();
        // Every other thread runs: the caller's filter comes last (threads
        // inherit the filter of the thread that creates them).
        if self.config.seccomp_caller {
            crate::seccomp::confine(
                self.config.seccomp,
                crate::seccomp::ThreadClass::Main,
                &self.exit,
            );
        }
        let reason = self.exit.wait();
        if let Some(p) = &self.postcopy {
            p.end("the VM ended on the destination");
        }
        self.actions.vm_ended();
        let stopped_at = threads::stop_vcpus(vcpus);
        let elapsed = start.elapsed();
        helpers.join();
        if let Ok(t) = events {
            let _ = t.join();
        }
        Ok(self.report(reason, start, elapsed, stopped_at))
    }
}

/// Everything [`Vm::assemble`] takes.
struct Parts {
    config: VmConfig,
    host: Host,
    mode: FaultMode,
    vm_fd: Arc<VmFd>,
    memory: Arc<MemoryManager>,
    exit: Arc<VmExit>,
    devices: build::Devices,
    engine: Option<Arc<FaultEngine>>,
    restore_stats: Arc<RestoreStats>,
    syscall_assist: bool,
    vcpus: Vec<ReadyVcpu>,
    /// What a diff snapshot of this VM is taken on (a restored VM's
    /// snapshot).
    base: Option<crate::snapshot::save::Base>,
    /// The dirty ring (`--dirty-log ring`), harvested by a vCPU whose ring
    /// is full.
    rings: Option<Arc<crate::memory::ring::DirtyRings>>,
}

fn engine_options(
    config: &VmConfig,
    restore: &Arc<RestoreStats>,
    record: Option<usize>,
) -> EngineOptions {
    EngineOptions {
        fault_around: config.fault_around,
        inject_eagain: config.inject_eagain_every,
        vcpus: config.vcpus,
        restore: restore.clone(),
        record,
    }
}

/// What `GET /vm` shows of [`RESTORE_METRICS`](crate::fault::RESTORE_METRICS)
/// and the vCPUs' blocktime.
fn restore_view(
    restore: &Arc<crate::fault::RestoreStats>,
    vcpus: &[Arc<crate::fault::FaultStats>],
    engine: Option<Arc<FaultEngine>>,
) -> crate::api::control::RestoreView {
    let (restore, vcpus) = (restore.clone(), vcpus.to_vec());
    Box::new(move || {
        if let Some(e) = &engine {
            e.sync_stats();
        }
        crate::api::control::RestoreInfo {
            counters: crate::counters::Readings::new(
                &crate::fault::RESTORE_METRICS,
                &restore.counters.read(),
                crate::counters::Scope::ANY,
            ),
            vcpu_blocktime_seconds: vcpus
                .iter()
                .map(|v| v.snapshot()[crate::fault::ThreadStat::BlocktimeNs] as f64 / 1e9)
                .collect(),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::acpi;
    use crate::devices::{acpi_power, i8042, serial, BusDevice};
    use crate::exit::ExitReason;

    /// The ACPI tables (arch) describe the devices (devices) by number,
    /// and neither layer may import the other: this is where they meet.
    #[test]
    fn acpi_tables_describe_the_devices_as_they_are() {
        assert_eq!(u64::from(acpi::COM1_PORT), serial::COM1_BASE);
        assert_eq!(acpi::COM1_IRQ, serial::COM1_IRQ);
        assert_eq!(acpi::SLEEP_CONTROL_PORT, acpi_power::SLEEP_CONTROL_PORT);
        assert_eq!(acpi::SLEEP_STATUS_PORT, acpi_power::SLEEP_STATUS_PORT);
        assert_eq!(acpi::S5_SLEEP_TYPE, acpi_power::S5_SLEEP_TYPE);
        assert_eq!(acpi::CMOS_RTC_PORT, crate::devices::cmos::CMOS_BASE);
        // The FADT's reset register resets through the i8042.
        let exit = Arc::new(VmExit::new());
        let mut kbd = i8042::I8042::new(exit.clone());
        kbd.write(acpi::RESET_PORT - i8042::I8042_BASE, &[acpi::RESET_VALUE]);
        assert_eq!(exit.reason(), Some(ExitReason::Reset));
    }
}
