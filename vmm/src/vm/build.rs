//! The phases of [`Vm::new`](super::Vm::new), in the order it runs them.

use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::VmFd;

use super::{kvm, ReadyVcpu, VmError};
use crate::api::{ApiServer, VmControl};
use crate::arch::x86_64 as arch;
use crate::arch::x86_64::layout::{self, MmioDeviceInfo};
use crate::boot::vcpu::VcpuBoot;
use crate::boot::{self, Boot, BootKind, BootSpec};
use crate::config::{
    BalloonOptions, ConfigError, DirtyLog, FaultMode, HotplugOptions, Kernel, VmConfig,
};
use crate::devices::marker::MarkerLog;
use crate::devices::virtio::balloon::{Balloon, BalloonConfig, BalloonHandle};
use crate::devices::virtio::manager::VirtioDevices;
use crate::devices::virtio::mem::{HotplugHandle, MemRegion, VirtioMem};
use crate::devices::{legacy, lock, serial, Bus};
use crate::exit::VmExit;
use crate::host::{Host, KvmFlavor};
use crate::memory::ring::DirtyRings;
use crate::memory::{ImageFile, KvmSlots, MemoryManager, PageSource, PAGE_SIZE};
use crate::metrics::{MetricsServer, VmMetrics};
use crate::vcpu::{self, Assists};

/// Whether the host can keep the dirty log the configuration asks for.
pub(super) fn check_dirty_log(config: &VmConfig, host: &Host) -> Result<(), ConfigError> {
    match config.dirty_log {
        // Measured (docs/FAULT-PATH.md, "Dirty log"): PVM emulates guest
        // supervisor code and every emulated store takes a ring entry,
        // past the ring's end before the vCPU is stopped; KVM's count of
        // the ring never recovers and the vCPU can be left unable to run.
        DirtyLog::Ring { force: false, .. } if host.flavor == KvmFlavor::Pvm => {
            Err(ConfigError::DirtyRingOnPvm)
        }
        _ => Ok(()),
    }
}

/// Check the configuration against the host; the fault mode to use.
pub(super) fn check(config: &VmConfig, host: &Host) -> Result<FaultMode, VmError> {
    config.validate(host.max_vcpus)?;
    check_dirty_log(config, host)?;
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
    Ok(mode)
}

pub(super) fn read_image(config: &VmConfig) -> Result<Vec<u8>, VmError> {
    Ok(match &config.kernel {
        Kernel::File(path) => boot::read_image(path)?,
        Kernel::Embedded { image, .. } => image.to_vec(),
        // A restore loads no image (Vm::restore does not call this).
        Kernel::Snapshot(_) | Kernel::Incoming(_) => Vec::new(),
    })
}

pub(super) fn read_initrd(config: &VmConfig) -> Result<Option<Vec<u8>>, VmError> {
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
pub(super) fn create_vm(host: &Host) -> Result<Arc<VmFd>, VmError> {
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

/// The dirty ring, when the configuration asks for it: enabled now, before
/// any vCPU exists (KVM's rule).
pub(super) fn dirty_rings(
    config: &VmConfig,
    vm_fd: &Arc<VmFd>,
) -> Result<Option<Arc<DirtyRings>>, VmError> {
    match config.dirty_log {
        DirtyLog::Bitmap => Ok(None),
        DirtyLog::Ring { entries, .. } => {
            let r = DirtyRings::enable(vm_fd.clone(), entries)?;
            log::info!("dirty log: a ring of {entries} entries per vCPU");
            Ok(Some(r))
        }
    }
}

impl vcpu::RingFull for DirtyRings {
    fn full(&self, vcpu: usize) -> Result<u64, String> {
        DirtyRings::full(self, vcpu).map_err(|e| e.to_string())
    }
}

/// Where the memory manager registers memslots and reads the dirty log:
/// the VM itself, or its rings.
pub(super) fn kvm_slots(vm_fd: &Arc<VmFd>, rings: &Option<Arc<DirtyRings>>) -> Arc<dyn KvmSlots> {
    match rings {
        Some(r) => r.clone(),
        None => vm_fd.clone(),
    }
}

/// Boot RAM, mapped and registered with KVM, backed by the memory image if
/// one was given.
pub(super) fn create_memory(
    config: &VmConfig,
    host: &Host,
    kvm: Arc<dyn KvmSlots>,
    mode: FaultMode,
) -> Result<MemoryManager, VmError> {
    let ranges = layout::ram_ranges(config.mem_size);
    if config.mem_hugepages {
        return Ok(MemoryManager::new_hugetlb(
            kvm,
            &ranges,
            config.hotplug.map_or(0, |h| h.size),
            host.max_memslots,
        )?);
    }
    let source = match &config.mem_source {
        // No fault engine: the host kernel serves the file (MAP_PRIVATE).
        Some(p) if mode == FaultMode::Kernel => {
            return Ok(MemoryManager::new_file_mapped(
                kvm,
                &ranges,
                ImageFile::open(p, config.mem_size)?,
                host.max_memslots,
            )?);
        }
        Some(p) => PageSource::File(ImageFile::open(p, config.mem_size)?),
        None => PageSource::Zero,
    };
    Ok(MemoryManager::new(kvm, &ranges, source, host.max_memslots)?)
}

/// The VM's devices, built before the image is loaded (Linux learns of the
/// virtio ones from the command line and the DSDT).
pub(super) struct Devices {
    pub pio: Bus,
    pub mmio: Bus,
    pub serial_input: serial::SerialInput,
    pub virtio: VirtioDevices,
    pub balloon: Option<BalloonHandle>,
    pub hotplug: Option<HotplugHandle>,
    pub markers: Arc<Mutex<MarkerLog>>,
    /// What a test guest reads on the host-signal port.
    pub signal: Arc<AtomicU32>,
}

impl Devices {
    /// Every virtio transport, in the order they were added (a snapshot's
    /// order).
    pub fn transports(&self) -> Vec<Arc<Mutex<crate::devices::virtio::mmio::MmioTransport>>> {
        self.virtio
            .entries()
            .iter()
            .map(|e| e.transport.clone())
            .collect()
    }

    /// The legacy devices on the port-I/O bus, then the virtio devices the
    /// configuration asks for, one window and GSI each.
    pub fn build(
        config: &VmConfig,
        vm_fd: &VmFd,
        memory: &Arc<MemoryManager>,
        exit: &Arc<VmExit>,
    ) -> Result<Self, VmError> {
        let markers = Arc::new(Mutex::new(MarkerLog::default()));
        let signal = Arc::new(AtomicU32::new(0));
        let (pio, serial_input) = legacy::build(vm_fd, exit, &config.serial, &markers, &signal)?;
        let mut mmio = Bus::new("MMIO");
        let mut virtio = VirtioDevices::new();
        let balloon = config
            .balloon
            .map(|b| add_balloon(&mut virtio, vm_fd, &mut mmio, memory, b))
            .transpose()?;
        let hotplug = config
            .hotplug
            .map(|h| add_hotplug(&mut virtio, vm_fd, &mut mmio, memory, config, h))
            .transpose()?;
        Ok(Devices {
            pio,
            mmio,
            serial_input,
            virtio,
            balloon,
            hotplug,
            markers,
            signal,
        })
    }

    /// What the guest is told of the virtio devices.
    pub fn windows(&self) -> Vec<MmioDeviceInfo> {
        self.virtio
            .windows()
            .iter()
            .map(|w| MmioDeviceInfo {
                base: w.base,
                len: w.len,
                gsi: w.gsi,
            })
            .collect()
    }

    /// The counters a scrape reads: fresh per-thread ones, and the devices'.
    pub fn metrics(
        &self,
        config: &VmConfig,
        mode: FaultMode,
        memory: &Arc<MemoryManager>,
    ) -> VmMetrics {
        let handlers = match mode {
            FaultMode::Handler => config.fault_threads,
            _ => 0,
        };
        VmMetrics {
            devices: self.virtio.summaries(),
            balloon: self.balloon.clone(),
            hotplug: self.hotplug.clone(),
            ..VmMetrics::new(config.vcpus, handlers, memory.clone(), mode)
        }
    }

    /// The control plane over these devices.
    pub fn control(
        &self,
        config: &VmConfig,
        mode: FaultMode,
        memory: &Arc<MemoryManager>,
        exit: &Arc<VmExit>,
    ) -> VmControl {
        VmControl::new(
            exit.clone(),
            memory.clone(),
            self.balloon.clone(),
            self.hotplug.clone(),
            self.signal.clone(),
            config.vcpus,
            mode,
        )
    }
}

/// A virtio-balloon on the MMIO bus.
fn add_balloon(
    virtio: &mut VirtioDevices,
    vm_fd: &VmFd,
    mmio: &mut Bus,
    memory: &Arc<MemoryManager>,
    b: BalloonOptions,
) -> Result<BalloonHandle, VmError> {
    let config = BalloonConfig {
        target_pages: u32::try_from(b.target / PAGE_SIZE).unwrap_or(u32::MAX),
        free_page_reporting: b.free_page_reporting,
        stats_interval: Duration::from_secs(b.stats_interval_s),
    };
    let (device, counters) = virtio.add(vm_fd, mmio, memory, |irq| {
        Balloon::new(memory.clone(), irq, config)
    })?;
    let stats = lock(&device).stats();
    Ok(BalloonHandle {
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
) -> Result<HotplugHandle, VmError> {
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
    let (device, counters) = virtio.add(vm_fd, mmio, memory, |irq| {
        VirtioMem::new(memory.clone(), irq, region).with_requested(h.requested)
    })?;
    let stats = lock(&device).stats();
    Ok(HotplugHandle {
        device,
        stats,
        counters,
        region,
    })
}

/// Page tables, GDT, the image and what it boots with, written into RAM.
pub(super) fn load_boot_image(
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

/// The metrics endpoint and the API socket, bound before anything runs: a
/// port or socket in use is an error now, not after the guest started.
pub(super) struct Servers {
    pub metrics: Option<MetricsServer>,
    pub api: Option<ApiServer>,
}

impl Servers {
    pub fn bind(config: &VmConfig) -> Result<Self, VmError> {
        let metrics = match config.metrics_addr {
            Some(addr) => {
                let server = MetricsServer::bind(addr, config.metrics_allow_remote)?;
                eprintln!("vmm: metrics on http://{}/metrics", server.addr());
                Some(server)
            }
            None => None,
        };
        let api = config
            .api_socket
            .as_deref()
            .map(ApiServer::bind)
            .transpose()?;
        Ok(Servers { metrics, api })
    }
}

/// Whether the host needs the VMM to complete instructions its emulator
/// cannot (PVM).
pub(super) fn assists(host: &Host) -> Assists {
    match host.flavor {
        KvmFlavor::Pvm => Assists::Pvm,
        _ => Assists::None,
    }
}

/// Whether this VM gets the SYSCALL assist; if so its MSR filter is set
/// now, before any vCPU exists.
pub(super) fn syscall_assist(
    config: &VmConfig,
    host: &Host,
    vm_fd: &VmFd,
    boot: &Boot,
) -> Result<bool, VmError> {
    let wanted = vcpu::syscall::wanted(
        config.syscall_assist,
        host.flavor,
        boot.kind == BootKind::Linux,
        boot.completes_syscall,
    );
    if wanted {
        vcpu::syscall::filter_lstar_writes(vm_fd).map_err(VmError::SyscallAssist)?;
    }
    Ok(wanted)
}

/// The host's `KVM_GET_MSR_INDEX_LIST`: the MSRs a snapshot saves.
pub(super) fn msr_list(host: &Host) -> Result<Vec<u32>, VmError> {
    let list = kvm("KVM_GET_MSR_INDEX_LIST", host.kvm.get_msr_index_list())?;
    Ok(list.as_slice().to_vec())
}

pub(super) fn create_vcpus(
    config: &VmConfig,
    host: &Host,
    vm_fd: &VmFd,
    supported: &CpuId,
    boot: &Boot,
    rings: Option<&DirtyRings>,
) -> Result<Vec<ReadyVcpu>, VmError> {
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
            if let Some(r) = rings {
                r.attach(index, &fd)?;
            }
            let cpuid = boot::vcpu::configure(&fd, index, &b)
                .map_err(|source| VmError::VcpuSetup { index, source })?;
            Ok(ReadyVcpu {
                fd,
                cpuid,
                rearm_syscall_assist: false,
            })
        })
        .collect()
}
