//! Boot images: what kind of image is booting and how, and everything it
//! needs written into guest memory.
//!
//! - a freestanding test guest (ELF, every vCPU at its entry, arguments in
//!   registers);
//! - Linux: a bzImage, whose payload is decompressed on the host
//!   ([`bzimage`], [`decompress`]), or an ELF vmlinux ([`elf`]); the 64-bit
//!   boot protocol with boot_params, e820 and ACPI ([`params`]); secondary
//!   vCPUs wait for INIT/SIPI from the guest.
//!
//! Every offset read from an image goes through [`le`] (checked).

pub mod bzimage;
pub mod decompress;
pub mod elf;
mod le;
pub mod params;
pub mod vcpu;

use std::path::Path;

use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout::MmioDeviceInfo;
use crate::arch::x86_64::{acpi, layout};
use crate::host::KvmFlavor;
use crate::memory::{GuestMemory, RamRange};
use elf::ElfError;
use params::{BootParamsError, LinuxBoot};

#[derive(Debug, Error)]
pub enum BootError {
    #[error("cannot read kernel image {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("bzImage: {0}")]
    BzImage(#[from] bzimage::BzImageError),
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("--initrd is only for Linux kernels; {0} is a test guest (no Linux ELF notes)")]
    InitrdForTestGuest(String),
    #[error("command line is {len} bytes; at most {max} are accepted")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing boot data to guest memory failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootKind {
    TestGuest,
    Linux,
}

/// Where and how vCPUs start.
#[derive(Debug, Clone, Copy)]
pub struct Boot {
    pub kind: BootKind,
    pub entry: u64,
    /// Value for RSI (Linux: the zero page).
    pub zero_page: u64,
    /// The kernel completes a half-done SYSCALL itself on PVM hosts (the
    /// micro kernel's patch, announced by an "RSVMM" ELF note).
    pub completes_syscall: bool,
}

/// Owner of the ELF note the micro kernel's SYSCALL patch adds
/// (guest-images/linux/patches).
pub const SYSCALL_NOTE_OWNER: &[u8] = b"RSVMM";

/// What to boot and with what.
pub struct BootSpec<'a> {
    pub image: &'a [u8],
    /// For messages: the image's path, or what it is.
    pub image_name: &'a str,
    pub initrd: Option<&'a [u8]>,
    pub cmdline: &'a str,
    pub vcpus: usize,
    pub flavor: KvmFlavor,
    /// virtio-mmio devices, announced to Linux on the command line and in the
    /// DSDT.
    pub devices: &'a [MmioDeviceInfo],
    /// A virtio-mem device exists: Linux onlines hotplugged memory by itself
    /// (movable, so it can be unplugged again), no userland needed.
    pub memory_hotplug: bool,
}

/// The features hidden from a guest kernel on PVM hosts, the most important
/// first (see [`PVM_CMDLINE`]).
macro_rules! clearcpuid {
    () => {
        "smap,smep,umip,ssse3,sse4_1,sse4_2,rdrand,rdseed,aes,pclmulqdq,sha_ni,popcnt,invpcid,pcid,movbe,bmi1,bmi2,adx,clflushopt,clwb"
    };
}

/// Command-line additions on PVM hosts, each for a failure measured there
/// (docs/ARCHITECTURE.md, "PVM hosts"): the guest sees XSAVE, PKU, FSGSBASE
/// and many other features whatever CPUID says, and the host's emulator
/// cannot run `xrstor`, SMAP's `clac`/`stac` reliably, or SSE register moves
/// such as blake2s-ssse3's `movd %ecx,%xmm15`; `nokaslr` keeps addresses
/// stable for diagnosis.
///
/// `clearcpuid=` is read into a 128-byte buffer: entries past 127
/// characters are silently lost ([`CLEARCPUID`] is checked against that).
/// AVX and everything built on it (AVX2, FMA, VAES, VPCLMULQDQ, AVX-512)
/// need no entry: `noxsave` clears XSAVE, and the kernel clears the
/// features that depend on it.
///
/// Emulated boot code is slow (~1 us per instruction): ftrace's boot-time
/// check of weak functions (a workqueue scanning every ftrace record) runs
/// for minutes with soft-lockup splats (measured here: `test_for_valid_rec`
/// at 121 s), and the tracing initcalls cost minutes more (`trace_eval_init`
/// alone ~230 s), so they are skipped; `cryptomgr.notests` skips the crypto
/// self-tests (RSA alone stalls a stock kernel for over 15 minutes).
pub const PVM_CMDLINE: &str = concat!(
    "noxsave nopku nofsgsbase clearcpuid=",
    clearcpuid!(),
    " mitigations=off nokaslr cryptomgr.notests initcall_blacklist=ftrace_check_for_weak_functions,",
    "trace_eval_init,tracer_init_tracefs,event_trace_init,init_kprobe_trace,init_uprobe_trace"
);

/// The `clearcpuid=` list of [`PVM_CMDLINE`].
pub const CLEARCPUID: &str = clearcpuid!();

/// Defaults every Linux boot gets: reboot through the i8042 (which ends the
/// VMM), reboot at once on panic (the VMM reports the panic it saw on the
/// console), no waiting for a PS/2 keyboard, and no PCI probing (this VMM
/// has no PCI bus; config-space ports read as all ones).
pub const LINUX_CMDLINE: &str = "reboot=k panic=-1 i8042.noaux pci=off";

/// The full Linux command line.
pub fn linux_cmdline(user: &str, flavor: KvmFlavor) -> String {
    let mut parts = vec![LINUX_CMDLINE];
    if flavor == KvmFlavor::Pvm {
        parts.push(PVM_CMDLINE);
    }
    parts.push(user);
    parts.retain(|p| !p.is_empty());
    parts.join(" ")
}

/// The `virtio_mmio.device=` command-line entry of a device.
pub fn virtio_mmio_cmdline(d: &MmioDeviceInfo) -> String {
    format!(
        "virtio_mmio.device={}K@{:#x}:{}",
        d.len >> 10,
        d.base,
        d.gsi
    )
}

/// Read a kernel image file.
pub fn read_image(path: &Path) -> Result<Vec<u8>, BootError> {
    std::fs::read(path).map_err(|source| BootError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Write the NUL-terminated command line at `addr` (at most `max` bytes with
/// the NUL).
pub fn write_cmdline(
    mem: &GuestMemory,
    addr: u64,
    cmdline: &str,
    max: usize,
) -> Result<(), BootError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(BootError::CmdlineNul);
    }
    if cmdline.len() + 1 > max {
        return Err(BootError::CmdlineTooLong {
            len: cmdline.len(),
            max: max - 1,
        });
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(addr))?;
    mem.write_obj(0u8, GuestAddress(addr + cmdline.len() as u64))?;
    Ok(())
}

/// Load the image and write everything the boot needs into guest memory.
pub fn load(mem: &GuestMemory, ram: &[RamRange], spec: &BootSpec) -> Result<Boot, BootError> {
    let image = spec.image;
    let (kind, vmlinux, header) = if bzimage::is_bzimage(image) {
        let h = bzimage::setup_header(image)?;
        (BootKind::Linux, bzimage::extract_vmlinux(image)?, Some(h))
    } else if elf::is_linux(image) {
        (BootKind::Linux, image.to_vec(), None)
    } else {
        (BootKind::TestGuest, image.to_vec(), None)
    };
    let loaded = elf::load(mem, ram, &vmlinux)?;
    match kind {
        BootKind::TestGuest => {
            if spec.initrd.is_some() {
                return Err(BootError::InitrdForTestGuest(spec.image_name.to_string()));
            }
            // Test guests find virtio devices the way Linux does: tokens on
            // the command line.
            let mut line = spec.cmdline.to_string();
            for d in spec.devices {
                line.push(' ');
                line.push_str(&virtio_mmio_cmdline(d));
            }
            write_cmdline(
                mem,
                layout::CMDLINE_ADDR,
                line.trim_start(),
                layout::CMDLINE_MAX,
            )?;
            Ok(Boot {
                kind,
                entry: loaded.entry,
                zero_page: 0,
                completes_syscall: false,
            })
        }
        BootKind::Linux => {
            let rsdp = acpi::setup_acpi(mem, spec.vcpus, spec.devices)?;
            let mut line = linux_cmdline(spec.cmdline, spec.flavor);
            if spec.memory_hotplug {
                line.push_str(" memhp_default_state=online_movable");
            }
            for d in spec.devices {
                line.push(' ');
                line.push_str(&virtio_mmio_cmdline(d));
            }
            let layout = params::setup_linux_boot(
                mem,
                ram,
                &LinuxBoot {
                    cmdline: &line,
                    initramfs: spec.initrd,
                    header: header.as_ref(),
                    kernel_end: loaded.end,
                    rsdp_addr: Some(rsdp),
                },
            )?;
            log::info!(
                "Linux boot: entry {:#x}, command line: {line}",
                loaded.entry
            );
            let completes_syscall = elf::parse(&vmlinux)
                .map(|e| {
                    e.note_owners(&vmlinux)
                        .iter()
                        .any(|o| o == SYSCALL_NOTE_OWNER)
                })
                .unwrap_or(false);
            Ok(Boot {
                kind,
                entry: loaded.entry,
                zero_page: layout.zero_page,
                completes_syscall,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clearcpuid_fits_the_kernels_buffer() {
        // arch/x86/kernel/cpu/common.c: `char arg[128]` (127 + NUL).
        assert!(CLEARCPUID.len() <= 127, "{} characters", CLEARCPUID.len());
        assert!(PVM_CMDLINE.contains(&format!("clearcpuid={CLEARCPUID} ")));
        assert_eq!(PVM_CMDLINE.matches("clearcpuid=").count(), 1);
    }

    #[test]
    fn cmdline_limits() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_cmdline(&mem, 0x20000, "console=ttyS0", 2048).unwrap();
        let mut b = [0u8; 14];
        mem.read_slice(&mut b, GuestAddress(0x20000)).unwrap();
        assert_eq!(&b, b"console=ttyS0\0");
        assert!(matches!(
            write_cmdline(&mem, 0x20000, &"x".repeat(2048), 2048),
            Err(BootError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_cmdline(&mem, 0x20000, "a\0b", 2048),
            Err(BootError::CmdlineNul)
        ));
    }

    #[test]
    fn virtio_devices_on_the_command_line() {
        let d = MmioDeviceInfo {
            base: 0xd000_0000,
            len: 0x1000,
            gsi: 5,
        };
        assert_eq!(
            virtio_mmio_cmdline(&d),
            "virtio_mmio.device=4K@0xd0000000:5"
        );
    }

    #[test]
    fn debian_vmlinux_is_linux() {
        let bz = bzimage::debian_kernel_tests::debian_bzimage();
        let vmlinux = bzimage::extract_vmlinux(&bz).unwrap();
        let owners = elf::parse(&vmlinux).unwrap().note_owners(&vmlinux);
        assert!(owners.iter().any(|o| o == b"Xen"), "{owners:?}");
        assert!(owners.iter().any(|o| o == b"Linux"), "{owners:?}");
        assert!(elf::is_linux(&vmlinux));
    }

    #[test]
    fn linux_command_line_adds_pvm_options_only_on_pvm() {
        let hw = linux_cmdline("console=ttyS0", KvmFlavor::Hardware);
        assert!(hw.starts_with(LINUX_CMDLINE) && hw.ends_with("console=ttyS0"));
        assert!(!hw.contains("clearcpuid"));
        let pvm = linux_cmdline("", KvmFlavor::Pvm);
        assert!(pvm.contains("clearcpuid=") && !pvm.ends_with(' '));
    }
}
