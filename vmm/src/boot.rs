//! What kind of image is booting and how: a freestanding test guest (every
//! vCPU at the ELF entry, arguments in registers) or Linux (a bzImage, whose
//! payload is decompressed on the host, or an ELF vmlinux; 64-bit boot
//! protocol with boot_params, e820 and ACPI; secondary vCPUs wait for
//! INIT/SIPI from the guest).

use thiserror::Error;

use crate::arch::x86_64::bootparams::{self, BootParamsError, LinuxBoot};
use crate::arch::x86_64::{acpi, bzimage, layout};
use crate::host::KvmFlavor;
use crate::loader::{self, LoaderError};
use crate::memory::{GuestMemory, RamRange};

#[derive(Debug, Error)]
pub enum BootError {
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error("bzImage: {0}")]
    BzImage(#[from] bzimage::BzImageError),
    #[error(transparent)]
    BootParams(#[from] BootParamsError),
    #[error("ACPI tables: {0}")]
    Acpi(#[from] acpi::AcpiError),
    #[error("--initrd is only for Linux kernels; {0} is a test guest (no Linux ELF notes)")]
    InitrdForTestGuest(String),
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
}

/// Command-line additions on PVM hosts, each for a failure measured there
/// (../shared/PLATFORM.md): the guest sees XSAVE, PKU, FSGSBASE and many
/// other features whatever CPUID says, and the host's emulator cannot run
/// `xrstor` or SMAP's `clac`/`stac` reliably; `nokaslr` keeps addresses
/// stable for diagnosis. Emulated boot code is slow (~1 µs per instruction):
/// ftrace's boot-time check of weak functions (a workqueue scanning every
/// ftrace record) then runs for minutes with soft-lockup splats (measured
/// here: `test_for_valid_rec` at 121 s), so its initcall is skipped.
pub const PVM_CMDLINE: &str = "noxsave nopku nofsgsbase \
clearcpuid=smap,smep,rdrand,rdseed,aes,pclmulqdq,sha_ni,popcnt,invpcid,pcid,avx,avx2,f16c,fma,movbe,bmi1,bmi2,adx,vaes,vpclmulqdq,clflushopt,clwb,rdpid,umip \
mitigations=off nokaslr initcall_blacklist=ftrace_check_for_weak_functions";

/// Defaults every Linux boot gets: reboot through the i8042 (which ends the
/// VMM), reboot at once on panic (the VMM reports the panic it saw on the
/// console), no waiting for a PS/2 keyboard, and no PCI probing (this VMM
/// has no PCI bus; config-space ports read as all ones).
pub const LINUX_CMDLINE: &str = "reboot=k panic=-1 i8042.noaux pci=off";

/// Whether an ELF image is a Linux kernel: it carries a "Linux" or "Xen"
/// (PVH) ELF note; the project's test guests carry none.
pub fn elf_is_linux(image: &[u8]) -> bool {
    let note_owner = |owner: &[u8]| image.windows(owner.len()).any(|w| w == owner);
    // Cheap and sufficient: the strings sit in the notes segment.
    loader::check_elf(
        image,
        &[RamRange {
            gpa: 0,
            size: u64::MAX / 2,
        }],
    )
    .is_ok()
        && (note_owner(b"Linux\0") && note_owner(b"Xen\0"))
}

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

/// Load `image` and write everything the boot needs into guest memory.
#[allow(clippy::too_many_arguments)]
pub fn load(
    mem: &GuestMemory,
    ram: &[RamRange],
    image: &[u8],
    image_name: &str,
    initrd: Option<&[u8]>,
    cmdline: &str,
    vcpus: usize,
    flavor: KvmFlavor,
) -> Result<Boot, BootError> {
    let (kind, vmlinux, header) = if bzimage::is_bzimage(image) {
        let h = bzimage::setup_header(image)?;
        (BootKind::Linux, bzimage::extract_vmlinux(image)?, Some(h))
    } else if elf_is_linux(image) {
        (BootKind::Linux, image.to_vec(), None)
    } else {
        (BootKind::TestGuest, image.to_vec(), None)
    };
    let loaded = loader::load_elf(mem, ram, &vmlinux)?;
    match kind {
        BootKind::TestGuest => {
            if initrd.is_some() {
                return Err(BootError::InitrdForTestGuest(image_name.to_string()));
            }
            loader::write_cmdline(mem, layout::CMDLINE_ADDR, cmdline, layout::CMDLINE_MAX)?;
            Ok(Boot {
                kind,
                entry: loaded.entry,
                zero_page: 0,
            })
        }
        BootKind::Linux => {
            let rsdp = acpi::setup_acpi(mem, vcpus)?;
            let line = linux_cmdline(cmdline, flavor);
            let layout = bootparams::setup_linux_boot(
                mem,
                ram,
                &LinuxBoot {
                    cmdline: &line,
                    initramfs: initrd,
                    header: header.as_ref(),
                    kernel_end: loaded.end,
                    rsdp_addr: Some(rsdp),
                },
            )?;
            log::info!(
                "Linux boot: entry {:#x}, command line: {line}",
                loaded.entry
            );
            Ok(Boot {
                kind,
                entry: loaded.entry,
                zero_page: layout.zero_page,
            })
        }
    }
}
