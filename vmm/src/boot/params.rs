//! Linux `boot_params` (the "zero page") for a direct 64-bit boot of the ELF
//! vmlinux (Documentation/arch/x86/boot.rst, "64-bit Boot Protocol"): the
//! setup header (copied from the bzImage when there is one, as the protocol
//! asks), the loader's fields, the command line, the initramfs and the
//! e820 map. The zero page goes to [`layout::ZERO_PAGE_ADDR`], the command
//! line to [`layout::CMDLINE_ADDR`]; RSI holds the zero page's address at
//! entry.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, CAN_USE_HEAP, LOADED_HIGH};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::bzimage::SetupHeaderInfo;
use crate::arch::x86_64::e820::{self, E820Entry, E820Error};
use crate::arch::x86_64::layout;
use crate::memory::{GuestMemory, RamRange};

/// `boot_flag`: the boot sector's 0xAA55 signature.
pub const BOOT_FLAG: u16 = 0xaa55;
/// `header`: "HdrS" read as a little-endian u32.
pub const HDRS: u32 = 0x5372_6448;
/// `type_of_loader`: 0xff, "undefined" (no assigned loader id).
pub const LOADER_UNDEFINED: u8 = 0xff;
/// `heap_end_ptr`: the conventional end of the setup heap (0x10000 - 0x200).
pub const HEAP_END: u16 = 0xfe00;
/// Page size for placing the initramfs.
const PAGE: u64 = 0x1000;

/// What the kernel accepts, from its setup header or protocol defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelLimits {
    /// Boot protocol version the zero page claims.
    pub version: u16,
    /// Longest command line, NUL excluded.
    pub cmdline_size: u32,
    /// Highest address the initramfs may occupy (its last byte).
    pub initrd_addr_max: u32,
}

impl KernelLimits {
    /// The protocol's defaults for a kernel whose header is unknown (an ELF
    /// vmlinux): 2.15 (Linux 6.x), COMMAND_LINE_SIZE - 1, and the
    /// conservative pre-2.03 initrd limit 0x37ffffff.
    pub const DEFAULT: KernelLimits = KernelLimits {
        version: 0x020f,
        cmdline_size: layout::CMDLINE_MAX as u32 - 1,
        initrd_addr_max: 0x37ff_ffff,
    };

    pub fn from_header(h: &SetupHeaderInfo) -> KernelLimits {
        KernelLimits {
            version: h.version,
            // Protocol 2.06 introduced the field; older kernels take 255.
            cmdline_size: if h.version >= 0x0206 {
                h.cmdline_size
            } else {
                255
            },
            initrd_addr_max: if h.version >= 0x0203 && h.initrd_addr_max != 0 {
                h.initrd_addr_max
            } else {
                Self::DEFAULT.initrd_addr_max
            },
        }
    }

    /// Longest command line this VMM can pass: the kernel's limit, and the
    /// space reserved at [`layout::CMDLINE_ADDR`].
    pub fn max_cmdline(&self) -> usize {
        (self.cmdline_size as usize).min(layout::CMDLINE_MAX - 1)
    }
}

impl Default for KernelLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[derive(Debug, Error)]
pub enum BootParamsError {
    #[error("command line is {len} bytes; the kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte at offset {0}")]
    CmdlineNul(usize),
    #[error("the initramfs is empty")]
    InitrdEmpty,
    #[error("initramfs of {size} bytes does not fit in guest RAM below {below:#x} (above {above:#x}, where the kernel ends)")]
    InitrdDoesNotFit { size: u64, below: u64, above: u64 },
    #[error("e820 map: {0}")]
    E820(#[from] E820Error),
    #[error("writing the {what} to guest memory at {addr:#x} failed: {source}")]
    GuestMemory {
        what: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// Where an initramfs was placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// What the zero page describes.
#[derive(Debug, Clone, Copy)]
pub struct BootParamsSpec<'a> {
    pub ram: &'a [RamRange],
    /// The bzImage's setup header, when the vmlinux came from one.
    pub header: Option<&'a SetupHeaderInfo>,
    pub cmdline_addr: u64,
    pub initrd: Option<Initrd>,
    /// The ACPI RSDP, if tables were written (Linux also scans 0xe0000).
    pub rsdp_addr: Option<u64>,
}

/// Check a command line against the kernel's limit.
pub fn check_cmdline(cmdline: &str, limits: &KernelLimits) -> Result<(), BootParamsError> {
    if let Some(at) = cmdline.bytes().position(|b| b == 0) {
        return Err(BootParamsError::CmdlineNul(at));
    }
    let max = limits.max_cmdline();
    if cmdline.len() > max {
        return Err(BootParamsError::CmdlineTooLong {
            len: cmdline.len(),
            max,
        });
    }
    Ok(())
}

/// The highest page-aligned address where `size` bytes of initramfs fit in
/// RAM, below min(top of RAM under 4 GiB, `initrd_addr_max` + 1) and at or
/// above `min_addr` (the end of the loaded kernel).
pub fn place_initramfs(
    ram: &[RamRange],
    size: u64,
    limits: &KernelLimits,
    min_addr: u64,
) -> Result<u64, BootParamsError> {
    if size == 0 {
        return Err(BootParamsError::InitrdEmpty);
    }
    let map = e820::build_e820(ram)?;
    let ceiling = e820::ram_top_below_4g(&map).min(u64::from(limits.initrd_addr_max) + 1);
    let floor = min_addr.max(layout::HIMEM_START);
    let fits = map
        .iter()
        .rev()
        .filter(|e| e.kind == e820::E820Type::Ram)
        .find_map(|e| {
            let lo = e.addr.max(floor);
            let hi = e.end().min(ceiling);
            let addr = hi.checked_sub(size)? & !(PAGE - 1);
            (hi > lo && addr >= lo).then_some(addr)
        });
    fits.ok_or(BootParamsError::InitrdDoesNotFit {
        size,
        below: ceiling,
        above: floor,
    })
}

/// Build the zero page.
pub fn build_boot_params(spec: &BootParamsSpec) -> Result<boot_params, BootParamsError> {
    let map = e820::build_e820(spec.ram)?;
    let limits = spec
        .header
        .map(KernelLimits::from_header)
        .unwrap_or_default();
    let mut p = boot_params::default();
    if let Some(h) = spec.header {
        // The protocol: copy the kernel's setup header, then fill in the
        // loader's fields.
        p.hdr = h.raw;
    }
    let hdr = &mut p.hdr;
    hdr.boot_flag = BOOT_FLAG;
    hdr.header = HDRS;
    hdr.version = limits.version;
    hdr.type_of_loader = LOADER_UNDEFINED;
    hdr.loadflags = LOADED_HIGH | CAN_USE_HEAP;
    hdr.heap_end_ptr = HEAP_END;
    hdr.cmdline_size = limits.cmdline_size;
    hdr.initrd_addr_max = limits.initrd_addr_max;
    hdr.hardware_subarch = 0;
    hdr.hardware_subarch_data = 0;
    hdr.setup_data = 0;
    hdr.cmd_line_ptr = spec.cmdline_addr as u32;
    p.ext_cmd_line_ptr = (spec.cmdline_addr >> 32) as u32;
    let (image, size) = spec.initrd.map_or((0, 0), |i| (i.addr, i.size));
    p.hdr.ramdisk_image = image as u32;
    p.hdr.ramdisk_size = size as u32;
    p.ext_ramdisk_image = (image >> 32) as u32;
    p.ext_ramdisk_size = (size >> 32) as u32;
    p.acpi_rsdp_addr = spec.rsdp_addr.unwrap_or(0);
    set_e820(&mut p, &map);
    Ok(p)
}

fn set_e820(p: &mut boot_params, map: &[E820Entry]) {
    // build_e820 guarantees map.len() <= E820_MAX_ENTRIES.
    for (slot, e) in p.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind as u32,
        };
    }
    p.e820_entries = map.len() as u8;
}

/// Write the zero page at [`layout::ZERO_PAGE_ADDR`].
pub fn write_boot_params(mem: &GuestMemory, params: &boot_params) -> Result<(), BootParamsError> {
    mem.write_obj(*params, GuestAddress(layout::ZERO_PAGE_ADDR))
        .map_err(|source| BootParamsError::GuestMemory {
            what: "zero page",
            addr: layout::ZERO_PAGE_ADDR,
            source,
        })
}

/// Everything a Linux boot puts in guest memory besides the kernel.
#[derive(Debug, Clone, Copy)]
pub struct LinuxBoot<'a> {
    pub cmdline: &'a str,
    pub initramfs: Option<&'a [u8]>,
    /// The bzImage's setup header, when the vmlinux came from one.
    pub header: Option<&'a SetupHeaderInfo>,
    /// First byte past the loaded kernel: the initramfs goes above it.
    pub kernel_end: u64,
    pub rsdp_addr: Option<u64>,
}

/// Where [`setup_linux_boot`] put things.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootLayout {
    /// The zero page: the value for RSI at the kernel's 64-bit entry.
    pub zero_page: u64,
    pub cmdline: u64,
    pub initrd: Option<Initrd>,
}

/// Check and write the command line, the initramfs and the zero page.
pub fn setup_linux_boot(
    mem: &GuestMemory,
    ram: &[RamRange],
    boot: &LinuxBoot,
) -> Result<BootLayout, BootParamsError> {
    let limits = boot
        .header
        .map(KernelLimits::from_header)
        .unwrap_or_default();
    check_cmdline(boot.cmdline, &limits)?;
    let initrd = match boot.initramfs {
        None => None,
        Some(data) => {
            let size = data.len() as u64;
            let addr = place_initramfs(ram, size, &limits, boot.kernel_end)?;
            mem.write_slice(data, GuestAddress(addr))
                .map_err(|source| BootParamsError::GuestMemory {
                    what: "initramfs",
                    addr,
                    source,
                })?;
            Some(Initrd { addr, size })
        }
    };
    let mut line = boot.cmdline.as_bytes().to_vec();
    line.push(0);
    mem.write_slice(&line, GuestAddress(layout::CMDLINE_ADDR))
        .map_err(|source| BootParamsError::GuestMemory {
            what: "command line",
            addr: layout::CMDLINE_ADDR,
            source,
        })?;
    let params = build_boot_params(&BootParamsSpec {
        ram,
        header: boot.header,
        cmdline_addr: layout::CMDLINE_ADDR,
        initrd,
        rsdp_addr: boot.rsdp_addr,
    })?;
    write_boot_params(mem, &params)?;
    Ok(BootLayout {
        zero_page: layout::ZERO_PAGE_ADDR,
        cmdline: layout::CMDLINE_ADDR,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::e820::{EBDA_START, LEGACY_HOLE_END};
    use crate::boot::bzimage;

    fn ram(size: u64) -> Vec<RamRange> {
        layout::ram_ranges(size)
    }

    fn spec(ram: &[RamRange]) -> BootParamsSpec<'_> {
        BootParamsSpec {
            ram,
            header: None,
            cmdline_addr: layout::CMDLINE_ADDR,
            initrd: None,
            rsdp_addr: None,
        }
    }

    fn e820_of(p: &boot_params) -> Vec<(u64, u64, u32)> {
        let table = p.e820_table;
        table[..usize::from(p.e820_entries)]
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect()
    }

    #[test]
    fn zero_page_has_the_loader_fields() {
        let r = ram(512 << 20);
        let p = build_boot_params(&spec(&r)).unwrap();
        let h = p.hdr;
        assert_eq!({ h.boot_flag }, 0xaa55);
        assert_eq!({ h.header }, u32::from_le_bytes(*b"HdrS"));
        assert_eq!({ h.version }, 0x020f);
        assert_eq!(h.type_of_loader, 0xff);
        assert_eq!(h.loadflags, LOADED_HIGH | CAN_USE_HEAP);
        assert_eq!({ h.heap_end_ptr }, 0xfe00);
        assert_eq!({ h.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
        assert_eq!({ p.ext_cmd_line_ptr }, 0);
        assert_eq!({ h.cmdline_size }, 2047);
        assert_eq!({ h.ramdisk_image }, 0);
        assert_eq!({ h.ramdisk_size }, 0);
        assert_eq!({ p.acpi_rsdp_addr }, 0);
        assert_eq!(
            e820_of(&p),
            vec![
                (0, EBDA_START, 1),
                (EBDA_START, LEGACY_HOLE_END - EBDA_START, 2),
                (LEGACY_HOLE_END, (512 << 20) - LEGACY_HOLE_END, 1),
            ]
        );
    }

    #[test]
    fn zero_page_layout_matches_the_kernel_abi() {
        // Offsets from arch/x86/include/uapi/asm/bootparam.h.
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
        let r = ram(8 << 30);
        let mut s = spec(&r);
        s.rsdp_addr = Some(0xe0000);
        s.initrd = Some(Initrd {
            addr: 0x1_2345_6000,
            size: 0x1_0000_0010,
        });
        let p = build_boot_params(&s).unwrap();
        let b = vm_memory::ByteValued::as_slice(&p);
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        assert_eq!(u64_at(0x070), 0xe0000, "acpi_rsdp_addr");
        assert_eq!(b[0x1e8], 4, "e820_entries");
        assert_eq!(&b[0x1fe..0x200], &[0x55, 0xaa], "boot_flag");
        assert_eq!(&b[0x202..0x206], b"HdrS");
        assert_eq!(b[0x210], 0xff, "type_of_loader");
        assert_eq!(b[0x211], 0x81, "loadflags");
        assert_eq!(u32_at(0x218), 0x2345_6000, "ramdisk_image");
        assert_eq!(u32_at(0x21c), 0x10, "ramdisk_size");
        assert_eq!(u32_at(0x0c0), 1, "ext_ramdisk_image");
        assert_eq!(u32_at(0x0c4), 1, "ext_ramdisk_size");
        assert_eq!(u32_at(0x228), layout::CMDLINE_ADDR as u32, "cmd_line_ptr");
        // The fourth e820 entry: RAM above 4 GiB.
        let e = 0x2d0 + 3 * 20;
        assert_eq!(u64_at(e), 1 << 32);
        assert_eq!(u64_at(e + 8), (8 << 30) - layout::MMIO_GAP_START);
        assert_eq!(u32_at(e + 16), 1);
    }

    #[test]
    fn high_cmdline_uses_ext_field() {
        let r = ram(8 << 30);
        let mut s = spec(&r);
        s.cmdline_addr = 0x1_0000_2000;
        let p = build_boot_params(&s).unwrap();
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x2000);
        assert_eq!({ p.ext_cmd_line_ptr }, 1);
    }

    #[test]
    fn header_from_a_bzimage_is_copied_and_completed() {
        let payload = crate::boot::decompress::tests::compress(
            crate::boot::decompress::Compression::Gzip,
            vmm_guests::DEMO,
        );
        let img = bzimage::tests::make_bzimage(&payload, 0x020d);
        let h = bzimage::setup_header(&img).unwrap();
        let r = ram(256 << 20);
        let mut s = spec(&r);
        s.header = Some(&h);
        let p = build_boot_params(&s).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.version }, 0x020d);
        assert_eq!({ hdr.kernel_alignment }, 0x20_0000);
        assert_eq!({ hdr.init_size }, 0x300_0000);
        assert_eq!({ hdr.pref_address }, 0x100_0000);
        assert_eq!({ hdr.initrd_addr_max }, 0x7fff_ffff);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, layout::CMDLINE_ADDR as u32);
    }

    #[test]
    fn cmdline_limits() {
        let l = KernelLimits::DEFAULT;
        assert!(check_cmdline("console=ttyS0", &l).is_ok());
        assert!(check_cmdline(&"x".repeat(2047), &l).is_ok());
        assert!(matches!(
            check_cmdline(&"x".repeat(2048), &l),
            Err(BootParamsError::CmdlineTooLong {
                len: 2048,
                max: 2047
            })
        ));
        let small = KernelLimits {
            cmdline_size: 255,
            ..l
        };
        let e = check_cmdline(&"y".repeat(256), &small).unwrap_err();
        assert_eq!(
            e.to_string(),
            "command line is 256 bytes; the kernel accepts at most 255"
        );
        assert!(matches!(
            check_cmdline("a\0b", &l),
            Err(BootParamsError::CmdlineNul(1))
        ));
        // A kernel allowing more than the VMM's buffer is held to the buffer.
        let big = KernelLimits {
            cmdline_size: 4095,
            ..l
        };
        assert_eq!(big.max_cmdline(), layout::CMDLINE_MAX - 1);
    }

    #[test]
    fn initramfs_goes_to_the_top_of_low_ram() {
        let l = KernelLimits::DEFAULT;
        let r = ram(512 << 20);
        let addr = place_initramfs(&r, 10_000_000, &l, 0x400_0000).unwrap();
        assert_eq!(addr % PAGE, 0);
        assert!(addr + 10_000_000 <= 512 << 20);
        assert!((512 << 20) - (addr + 10_000_000) < PAGE);
        // Capped by initrd_addr_max (default 0x37ffffff) on a big guest.
        let big = ram(2 << 30);
        let addr = place_initramfs(&big, 1 << 20, &l, 0x400_0000).unwrap();
        assert_eq!(addr + (1 << 20), 0x3800_0000);
        // And by the MMIO gap when the header allows more.
        let lax = KernelLimits {
            initrd_addr_max: 0xffff_ffff,
            ..l
        };
        let huge = ram(8 << 30);
        let addr = place_initramfs(&huge, 1 << 20, &lax, 0x400_0000).unwrap();
        assert_eq!(addr + (1 << 20), layout::MMIO_GAP_START);
    }

    #[test]
    fn initramfs_too_big_is_an_error_that_says_so() {
        let l = KernelLimits::DEFAULT;
        let r = ram(64 << 20);
        let e = place_initramfs(&r, 100 << 20, &l, 0x200_0000).unwrap_err();
        assert!(
            matches!(e, BootParamsError::InitrdDoesNotFit { size, below, .. }
                if size == 100 << 20 && below == 64 << 20),
            "{e}"
        );
        assert!(e
            .to_string()
            .starts_with("initramfs of 104857600 bytes does not fit in guest RAM below 0x4000000"));
        // Fits in RAM, but not above the kernel.
        assert!(place_initramfs(&r, 40 << 20, &l, 0x300_0000).is_err());
        assert!(place_initramfs(&r, 40 << 20, &l, 0x100_0000).is_ok());
        assert!(matches!(
            place_initramfs(&r, 0, &l, 0),
            Err(BootParamsError::InitrdEmpty)
        ));
    }

    #[test]
    fn setup_writes_cmdline_initramfs_and_zero_page() {
        let r = ram(128 << 20);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 128 << 20)]).unwrap();
        let initramfs: Vec<u8> = (0..50_000u32).map(|i| (i % 251) as u8).collect();
        let out = setup_linux_boot(
            &mem,
            &r,
            &LinuxBoot {
                cmdline: "console=ttyS0 panic=-1",
                initramfs: Some(&initramfs),
                header: None,
                kernel_end: 0x300_0000,
                rsdp_addr: Some(0xe0000),
            },
        )
        .unwrap();
        assert_eq!(out.zero_page, layout::ZERO_PAGE_ADDR);
        let rd = out.initrd.unwrap();
        assert_eq!(rd.size, 50_000);
        let mut back = vec![0u8; 50_000];
        mem.read_slice(&mut back, GuestAddress(rd.addr)).unwrap();
        assert!(back == initramfs);
        let mut line = [0u8; 23];
        mem.read_slice(&mut line, GuestAddress(layout::CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&line, b"console=ttyS0 panic=-1\0");
        let p: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.ramdisk_image } as u64, rd.addr);
        assert_eq!({ p.hdr.ramdisk_size }, 50_000);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
    }

    #[test]
    fn setup_rejects_a_long_cmdline_before_writing() {
        let r = ram(16 << 20);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let long = "z".repeat(3000);
        let e = setup_linux_boot(
            &mem,
            &r,
            &LinuxBoot {
                cmdline: &long,
                initramfs: None,
                header: None,
                kernel_end: 0x20_0000,
                rsdp_addr: None,
            },
        )
        .unwrap_err();
        assert!(matches!(e, BootParamsError::CmdlineTooLong { .. }), "{e}");
        let p: boot_params = mem.read_obj(GuestAddress(layout::ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0);
    }

    #[test]
    fn debian_kernel_header_gives_its_limits() {
        let img = bzimage::debian_kernel_tests::debian_bzimage();
        let h = bzimage::setup_header(&img).unwrap();
        let l = KernelLimits::from_header(&h);
        assert_eq!(l.version, h.version);
        assert!(l.cmdline_size >= 2047);
        assert!(l.initrd_addr_max >= 0x37ff_ffff);
        let r = ram(512 << 20);
        let mut s = spec(&r);
        s.header = Some(&h);
        let p = build_boot_params(&s).unwrap();
        assert_eq!({ p.hdr.version }, h.version);
        assert_eq!({ p.hdr.init_size }, h.init_size);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!(p.hdr.loadflags, LOADED_HIGH | CAN_USE_HEAP);
    }
}
