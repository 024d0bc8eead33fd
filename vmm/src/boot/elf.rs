//! Loading ELF images (test guests, and later Linux vmlinux) into guest RAM.
//!
//! The image is checked here first so that every malformed input gets an
//! error that names the problem (truncation, a segment outside RAM, ...);
//! the copy itself is done by `linux-loader`.

use std::io::Cursor;
use std::path::Path;

use linux_loader::loader::{elf::Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use crate::memory::{GuestMemory, RamRange};

#[derive(Debug, Error)]
pub enum LoaderError {
    #[error("cannot read kernel image {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel image is empty")]
    Empty,
    #[error("kernel image is not an ELF file (bad magic {0:02x?})")]
    NotElf(Vec<u8>),
    #[error("kernel image is not a 64-bit little-endian x86_64 ELF executable ({0})")]
    WrongElfKind(&'static str),
    #[error("kernel image is truncated: {0}")]
    Truncated(String),
    #[error("ELF segment {index} [{start:#x}..{end:#x}) does not fit in guest RAM ({ram})")]
    SegmentOutsideRam {
        index: usize,
        start: u64,
        end: u64,
        ram: String,
    },
    #[error("ELF has no loadable segment")]
    NoSegments,
    #[error("ELF entry point {0:#x} is not inside a loaded segment")]
    BadEntry(u64),
    #[error("loading the ELF into guest memory failed: {0}")]
    Load(linux_loader::loader::Error),
    #[error("command line is {len} bytes; at most {max} are accepted")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("command line contains a NUL byte")]
    CmdlineNul,
    #[error("writing boot data to guest memory failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

/// Where a loaded image starts running.
#[derive(Debug, Clone, Copy)]
pub struct LoadedImage {
    pub entry: u64,
    /// First byte past the highest loaded segment.
    pub end: u64,
}

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const PT_LOAD: u32 = 1;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]))
}

/// A PT_LOAD segment's placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
}

/// Check the ELF header and program headers against the file and RAM;
/// return the entry point and loadable segments.
pub fn check_elf(image: &[u8], ram: &[RamRange]) -> Result<(u64, Vec<Segment>), LoaderError> {
    if image.is_empty() {
        return Err(LoaderError::Empty);
    }
    if image.len() < 4 || &image[..4] != b"\x7fELF" {
        return Err(LoaderError::NotElf(image[..image.len().min(4)].to_vec()));
    }
    if image.len() < EHDR_SIZE {
        return Err(LoaderError::Truncated(format!(
            "{} bytes is shorter than an ELF64 header",
            image.len()
        )));
    }
    if image[4] != 2 {
        return Err(LoaderError::WrongElfKind("not ELFCLASS64"));
    }
    if image[5] != 1 {
        return Err(LoaderError::WrongElfKind("not little-endian"));
    }
    if u16_at(image, 18) != 62 {
        return Err(LoaderError::WrongElfKind("machine is not x86_64"));
    }
    let entry = u64_at(image, 24);
    let phoff = u64_at(image, 32);
    let phentsize = u16_at(image, 54) as usize;
    let phnum = u16_at(image, 56) as usize;
    if phentsize != PHDR_SIZE {
        return Err(LoaderError::WrongElfKind("unexpected program header size"));
    }
    let ph_end = phoff
        .checked_add((phnum * PHDR_SIZE) as u64)
        .filter(|&e| e <= image.len() as u64)
        .ok_or_else(|| {
            LoaderError::Truncated(format!(
                "program headers at {phoff:#x} ({phnum} entries) run past the end of the {}-byte file",
                image.len()
            ))
        })?;
    let _ = ph_end;
    let mut segs = Vec::new();
    for i in 0..phnum {
        let p = phoff as usize + i * PHDR_SIZE;
        if u32_at(image, p) != PT_LOAD {
            continue;
        }
        let s = Segment {
            offset: u64_at(image, p + 8),
            paddr: u64_at(image, p + 24),
            filesz: u64_at(image, p + 32),
            memsz: u64_at(image, p + 40),
        };
        let file_end = s.offset.checked_add(s.filesz);
        if file_end.is_none_or(|e| e > image.len() as u64) {
            return Err(LoaderError::Truncated(format!(
                "segment {i} needs file bytes [{:#x}..{:#x}) but the file has {} bytes",
                s.offset,
                s.offset.saturating_add(s.filesz),
                image.len()
            )));
        }
        let end = s.paddr.checked_add(s.memsz.max(s.filesz));
        let fits = end.is_some_and(|end| ram.iter().any(|r| s.paddr >= r.gpa && end <= r.end()));
        if !fits {
            return Err(LoaderError::SegmentOutsideRam {
                index: i,
                start: s.paddr,
                end: s.paddr.saturating_add(s.memsz),
                ram: describe_ram(ram),
            });
        }
        segs.push(s);
    }
    if segs.is_empty() {
        return Err(LoaderError::NoSegments);
    }
    Ok((entry, segs))
}

fn describe_ram(ram: &[RamRange]) -> String {
    ram.iter()
        .map(|r| format!("[{:#x}..{:#x})", r.gpa, r.end()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Read a kernel image file.
pub fn read_image(path: &Path) -> Result<Vec<u8>, LoaderError> {
    std::fs::read(path).map_err(|source| LoaderError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Load an ELF image at its physical addresses. The entry point is taken as
/// a physical address (the image is identity mapped).
pub fn load_elf(
    mem: &GuestMemory,
    ram: &[RamRange],
    image: &[u8],
) -> Result<LoadedImage, LoaderError> {
    let (entry, segs) = check_elf(image, ram)?;
    let in_segment = |a: u64| segs.iter().any(|s| a >= s.paddr && a < s.paddr + s.memsz);
    if !in_segment(entry) {
        return Err(LoaderError::BadEntry(entry));
    }
    let r = Elf::load(mem, None, &mut Cursor::new(image), None).map_err(LoaderError::Load)?;
    // Zero each segment's tail past its file data (.bss) explicitly: guest
    // RAM is not always fresh zeroes (it may be backed by a memory image).
    for s in &segs {
        if s.memsz > s.filesz {
            zero_fill(mem, s.paddr + s.filesz, s.memsz - s.filesz)?;
        }
    }
    let end = segs.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(0);
    Ok(LoadedImage {
        entry: r.kernel_load.0,
        end,
    })
}

fn zero_fill(mem: &GuestMemory, mut gpa: u64, mut len: u64) -> Result<(), LoaderError> {
    let zeros = [0u8; 4096];
    while len > 0 {
        let n = len.min(zeros.len() as u64);
        mem.write_slice(&zeros[..n as usize], GuestAddress(gpa))?;
        gpa += n;
        len -= n;
    }
    Ok(())
}

/// Write the NUL-terminated command line at `addr`.
pub fn write_cmdline(
    mem: &GuestMemory,
    addr: u64,
    cmdline: &str,
    max: usize,
) -> Result<(), LoaderError> {
    if cmdline.as_bytes().contains(&0) {
        return Err(LoaderError::CmdlineNul);
    }
    if cmdline.len() + 1 > max {
        return Err(LoaderError::CmdlineTooLong {
            len: cmdline.len(),
            max: max - 1,
        });
    }
    mem.write_slice(cmdline.as_bytes(), GuestAddress(addr))?;
    mem.write_obj(0u8, GuestAddress(addr + cmdline.len() as u64))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: [RamRange; 1] = [RamRange {
        gpa: 0,
        size: 64 << 20,
    }];

    #[test]
    fn the_default_guest_is_a_valid_image() {
        let (entry, segs) = check_elf(crate::DEFAULT_GUEST, &RAM).unwrap();
        assert!(entry >= 0x100000);
        assert!(!segs.is_empty());
    }

    #[test]
    fn malformed_images_are_named() {
        let good = crate::DEFAULT_GUEST;
        assert!(matches!(check_elf(&[], &RAM), Err(LoaderError::Empty)));
        assert!(matches!(
            check_elf(b"MZ\x90\x00junk", &RAM),
            Err(LoaderError::NotElf(_))
        ));
        assert!(matches!(
            check_elf(&good[..40], &RAM),
            Err(LoaderError::Truncated(_))
        ));
        assert!(matches!(
            check_elf(&good[..200], &RAM),
            Err(LoaderError::Truncated(_))
        ));
        let small = [RamRange {
            gpa: 0,
            size: 0x100000,
        }];
        assert!(matches!(
            check_elf(good, &small),
            Err(LoaderError::SegmentOutsideRam { .. })
        ));
        let mut be = good.to_vec();
        be[5] = 2;
        assert!(matches!(
            check_elf(&be, &RAM),
            Err(LoaderError::WrongElfKind(_))
        ));
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
            Err(LoaderError::CmdlineTooLong { .. })
        ));
        assert!(matches!(
            write_cmdline(&mem, 0x20000, "a\0b", 2048),
            Err(LoaderError::CmdlineNul)
        ));
    }
}
