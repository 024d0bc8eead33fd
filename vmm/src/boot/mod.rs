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

/// Whether an ELF image is a Linux kernel: one of its PT_NOTE segments has a
/// note owned by "Linux" or "Xen" (the PVH entry note); the project's test
/// guests carry no notes.
pub fn elf_is_linux(image: &[u8]) -> bool {
    elf_note_owners(image)
        .iter()
        .any(|o| o == b"Linux" || o == b"Xen")
}

/// Owner names of every note in the PT_NOTE segments of an ELF64 image.
/// Malformed headers or notes end the walk (the result is then partial).
pub fn elf_note_owners(image: &[u8]) -> Vec<Vec<u8>> {
    let rd = |o: usize, n: usize| image.get(o..o + n);
    let u16_at = |o| rd(o, 2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize);
    let u32_at = |o| rd(o, 4).map(|b| u32::from_le_bytes(b.try_into().unwrap()) as usize);
    let u64_at = |o| rd(o, 8).map(|b| u64::from_le_bytes(b.try_into().unwrap()) as usize);
    let mut owners = Vec::new();
    if rd(0, 4) != Some(b"\x7fELF") {
        return owners;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(32), u16_at(54), u16_at(56)) else {
        return owners;
    };
    for i in 0..phnum {
        let ph = phoff.saturating_add(i.saturating_mul(phentsize));
        if u32_at(ph) != Some(4) {
            continue; // not PT_NOTE
        }
        let (Some(mut off), Some(size)) = (u64_at(ph + 8), u64_at(ph + 32)) else {
            break;
        };
        let end = off.saturating_add(size).min(image.len());
        // Each note: namesz, descsz, type, then name and desc, 4-aligned.
        while off + 12 <= end {
            let (Some(namesz), Some(descsz)) = (u32_at(off), u32_at(off + 4)) else {
                break;
            };
            let name = off + 12;
            let Some(n) = rd(name, namesz) else { break };
            owners.push(n.strip_suffix(b"\0").unwrap_or(n).to_vec());
            off = name + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
    }
    owners
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_guests_are_not_linux() {
        assert!(!elf_is_linux(crate::DEFAULT_GUEST));
        assert!(elf_note_owners(crate::DEFAULT_GUEST).is_empty());
        assert!(!elf_is_linux(b"not an elf"));
        assert!(!elf_is_linux(&crate::DEFAULT_GUEST[..70]));
    }

    #[test]
    fn debian_vmlinux_is_linux() {
        let bz = crate::arch::x86_64::bzimage::debian_kernel_tests::debian_bzimage();
        let vmlinux = bzimage::extract_vmlinux(&bz).unwrap();
        let owners = elf_note_owners(&vmlinux);
        assert!(owners.iter().any(|o| o == b"Xen"), "{owners:?}");
        assert!(owners.iter().any(|o| o == b"Linux"), "{owners:?}");
        assert!(elf_is_linux(&vmlinux));
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
