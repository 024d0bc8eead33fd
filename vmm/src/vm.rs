//! Builds a VM from a [`VmConfig`] and runs it to its end.
//!
//! Order matters: the in-kernel irqchip and PIT exist before any vCPU; guest
//! RAM is written (image, page tables, GDT, command line) before vCPUs start.

use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{VcpuFd, VmFd};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::{cpuid, gdt, layout, paging, regs};
use crate::config::{ConfigError, VmConfig};
use crate::devices::{exit_port, i8042, serial, Bus, BusDevice, BusOverlap, Sink};
use crate::exit::{ExitReason, VmExit};
use crate::host::{Host, HostError};
use crate::loader::{self, LoaderError};
use crate::memory::{GuestRam, MemoryError};
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
    Loader(#[from] LoaderError),
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

/// A VM ready to run.
pub struct Vm {
    config: VmConfig,
    host: Host,
    // Field order is drop order: vCPUs and the VM fd go before guest RAM.
    vcpus: Vec<VcpuFd>,
    vm_fd: VmFd,
    exit: Arc<VmExit>,
    shared: Option<Arc<VcpuShared>>,
    serial_input: Option<serial::SerialInput>,
    entry: u64,
    ram: GuestRam,
}

impl Vm {
    /// Create the VM, its memory, devices and vCPUs.
    pub fn new(config: VmConfig) -> Result<Vm, VmError> {
        let host = Host::open()?;
        config.validate(host.max_vcpus)?;
        log::info!(
            "host: {}, max {} vCPUs, {} memslots",
            host.flavor,
            host.max_vcpus,
            host.max_memslots
        );
        let image = match &config.kernel {
            Some(path) => loader::read_image(path)?,
            None => crate::DEFAULT_GUEST.to_vec(),
        };

        let vm_fd = kvm("KVM_CREATE_VM", host.kvm.create_vm())?;
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

        let ram = GuestRam::new(&layout::ram_ranges(config.mem_size))?;
        let loaded = loader::load_elf(ram.memory(), ram.ranges(), &image)?;
        write_boot_structures(&host, &ram, &config)?;
        ram.register(&vm_fd)?;

        let exit = Arc::new(VmExit::new());
        let (shared, serial_input) = build_devices(&vm_fd, &exit)?;

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
            let args = [
                index as u64,
                config.vcpus as u64,
                config.mem_size,
                layout::CMDLINE_ADDR,
            ];
            let setup = || -> Result<(), regs::RegsError> {
                regs::setup_msrs(&fd)?;
                regs::setup_sregs(&fd)?;
                regs::setup_fpu(&fd)?;
                regs::setup_regs(&fd, loaded.entry, args)?;
                regs::setup_lapic(&fd)?;
                // With the in-kernel LAPIC, vCPUs other than 0 start in
                // UNINITIALIZED, waiting for INIT/SIPI. Test guests start every
                // vCPU at the entry point, as KVM's selftests do.
                regs::make_runnable(&fd)
            };
            setup().map_err(|source| VmError::VcpuSetup { index, source })?;
            vcpus.push(fd);
        }
        log::info!(
            "VM: {} vCPUs, {} MiB RAM, entry {:#x}",
            config.vcpus,
            config.mem_size >> 20,
            loaded.entry
        );
        Ok(Vm {
            config,
            host,
            vcpus,
            vm_fd,
            exit,
            shared: Some(shared),
            serial_input: Some(serial_input),
            entry: loaded.entry,
            ram,
        })
    }

    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Run the guest until any vCPU or device ends it.
    pub fn run(mut self) -> Result<ExitReason, VmError> {
        vcpu::install_kick_handler()
            .map_err(|e| VmError::Device(format!("kick signal handler: {e}")))?;
        let shared = self.shared.take().expect("run called once");
        let mut threads = Vec::with_capacity(self.vcpus.len());
        for (index, fd) in self.vcpus.drain(..).enumerate() {
            let v = Vcpu {
                index,
                fd,
                shared: shared.clone(),
            };
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
        for t in threads {
            if t.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        if let Some(Ok(t)) = input {
            let _ = t.join();
        }
        let _ = (&self.host, &self.vm_fd, self.entry, &self.ram);
        Ok(reason)
    }
}

/// Page tables, GDT, and the command line.
fn write_boot_structures(host: &Host, ram: &GuestRam, config: &VmConfig) -> Result<(), VmError> {
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
    loader::write_cmdline(
        mem,
        layout::CMDLINE_ADDR,
        &config.cmdline,
        layout::CMDLINE_MAX,
    )?;
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
    let uart = Arc::new(Mutex::new(serial::SerialDevice::new(
        irq,
        events.clone(),
        Box::new(serial::FlushingStdout),
    )));
    pio.insert(serial::COM1_BASE, serial::COM1_LEN, uart.clone())?;
    let input = serial::SerialInput::new(uart, events, libc::STDIN_FILENO);

    let i8042: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(i8042::I8042::new(exit.clone())));
    pio.insert(i8042::I8042_BASE, i8042::I8042_LEN, i8042)?;
    pio.insert(
        exit_port::EXIT_PORT,
        4,
        Arc::new(Mutex::new(exit_port::ExitPort::new(exit.clone()))),
    )?;
    pio.insert(0x80, 1, Arc::new(Mutex::new(Sink)))?;

    let shared = Arc::new(VcpuShared {
        pio,
        mmio: Bus::new("MMIO"),
        exit: exit.clone(),
    });
    Ok((shared, input))
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
