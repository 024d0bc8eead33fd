//! The one ELF64 walker: header checks, PT_LOAD segments, PT_NOTE owners,
//! and loading into guest RAM (test guests and Linux vmlinux).
//!
//! The image is checked here first so that every malformed input gets an
//! error that names the problem (truncation, a segment outside RAM, ...);
//! the copy itself is done by `linux-loader`. Every offset read from the
//! file goes through [`super::le`] (checked arithmetic).

use std::io::Cursor;

use linux_loader::loader::{elf::Elf, KernelLoader};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::le;
use crate::memory::{GuestMemory, RamRange};

#[derive(Debug, Error)]
pub enum ElfError {
    #[error("kernel image is empty")]
    Empty,
    #[error("kernel image is not an ELF file (bad magic {0:02x?})")]
    NotElf(Vec<u8>),
    #[error("kernel image is not a 64-bit little-endian x86_64 ELF executable ({0})")]
    WrongKind(&'static str),
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
    #[error("writing the ELF into guest memory failed: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
/// Note header: namesz, descsz, type.
const NOTE_HEADER: u64 = 12;
const NOTE_ALIGN: u64 = 4;

/// A PT_LOAD segment's placement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub paddr: u64,
    pub memsz: u64,
    pub offset: u64,
    pub filesz: u64,
}

/// What the walker read from an ELF64 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub entry: u64,
    /// PT_LOAD segments, each inside the file.
    pub segments: Vec<Segment>,
    /// File ranges (offset, size) of the PT_NOTE segments, clamped to the file.
    notes: Vec<(u64, u64)>,
}

/// Check the ELF header and program headers against the file.
pub fn parse(image: &[u8]) -> Result<ElfInfo, ElfError> {
    if image.is_empty() {
        return Err(ElfError::Empty);
    }
    if image.get(..4) != Some(ELF_MAGIC) {
        return Err(ElfError::NotElf(image[..image.len().min(4)].to_vec()));
    }
    if (image.len() as u64) < EHDR_SIZE {
        return Err(ElfError::Truncated(format!(
            "{} bytes is shorter than an ELF64 header",
            image.len()
        )));
    }
    // The header is complete: these reads are in bounds.
    let hdr = |off, n| le::bytes(image, off, n).unwrap_or_default();
    if hdr(4, 1) != [ELFCLASS64] {
        return Err(ElfError::WrongKind("not ELFCLASS64"));
    }
    if hdr(5, 1) != [ELFDATA2LSB] {
        return Err(ElfError::WrongKind("not little-endian"));
    }
    if le::u16_at(image, 18) != Some(EM_X86_64) {
        return Err(ElfError::WrongKind("machine is not x86_64"));
    }
    let entry = le::u64_at(image, 24).unwrap_or_default();
    let phoff = le::u64_at(image, 32).unwrap_or_default();
    let phentsize = le::u16_at(image, 54).unwrap_or_default();
    let phnum = u64::from(le::u16_at(image, 56).unwrap_or_default());
    if u64::from(phentsize) != PHDR_SIZE {
        return Err(ElfError::WrongKind("unexpected program header size"));
    }
    let table = phnum
        .checked_mul(PHDR_SIZE)
        .and_then(|n| le::bytes(image, phoff, n))
        .ok_or_else(|| {
            ElfError::Truncated(format!(
                "program headers at {phoff:#x} ({phnum} entries) run past the end of the {}-byte file",
                image.len()
            ))
        })?;
    let mut segments = Vec::new();
    let mut notes = Vec::new();
    for i in 0..phnum {
        let p = i * PHDR_SIZE;
        // Inside `table`, which holds phnum whole entries.
        let word = |o| le::u64_at(table, p + o).unwrap_or_default();
        let kind = le::u32_at(table, p).unwrap_or_default();
        let (offset, filesz) = (word(8), word(32));
        if kind == PT_NOTE {
            let len = image.len() as u64;
            notes.push((offset.min(len), filesz.min(len - offset.min(len))));
            continue;
        }
        if kind != PT_LOAD {
            continue;
        }
        let s = Segment {
            offset,
            paddr: word(24),
            filesz,
            memsz: word(40),
        };
        if le::bytes(image, s.offset, s.filesz).is_none() {
            return Err(ElfError::Truncated(format!(
                "segment {i} needs file bytes [{:#x}..{:#x}) but the file has {} bytes",
                s.offset,
                s.offset.saturating_add(s.filesz),
                image.len()
            )));
        }
        segments.push(s);
    }
    Ok(ElfInfo {
        entry,
        segments,
        notes,
    })
}

impl ElfInfo {
    /// Owner names of every note in the PT_NOTE segments. A malformed note
    /// ends the walk of its segment (the result is then partial).
    pub fn note_owners(&self, image: &[u8]) -> Vec<Vec<u8>> {
        let mut owners = Vec::new();
        for &(start, size) in &self.notes {
            let Some(seg) = le::bytes(image, start, size) else {
                continue;
            };
            let mut off = 0u64;
            while let (Some(namesz), Some(descsz)) =
                (le::u32_at(seg, off), le::u32_at(seg, off + 4))
            {
                let name_at = off + NOTE_HEADER;
                let Some(name) = le::bytes(seg, name_at, u64::from(namesz)) else {
                    break;
                };
                owners.push(name.strip_suffix(b"\0").unwrap_or(name).to_vec());
                off = name_at
                    + u64::from(namesz).next_multiple_of(NOTE_ALIGN)
                    + u64::from(descsz).next_multiple_of(NOTE_ALIGN);
            }
        }
        owners
    }

    /// Check every PT_LOAD segment and the entry point against guest RAM.
    pub fn check_placement(&self, ram: &[RamRange]) -> Result<(), ElfError> {
        if self.segments.is_empty() {
            return Err(ElfError::NoSegments);
        }
        for (index, s) in self.segments.iter().enumerate() {
            let end = s.paddr.checked_add(s.memsz.max(s.filesz));
            let fits =
                end.is_some_and(|end| ram.iter().any(|r| s.paddr >= r.gpa && end <= r.end()));
            if !fits {
                return Err(ElfError::SegmentOutsideRam {
                    index,
                    start: s.paddr,
                    end: s.paddr.saturating_add(s.memsz),
                    ram: describe_ram(ram),
                });
            }
        }
        let in_segment = |a: u64| {
            self.segments
                .iter()
                .any(|s| a >= s.paddr && a - s.paddr < s.memsz)
        };
        if !in_segment(self.entry) {
            return Err(ElfError::BadEntry(self.entry));
        }
        Ok(())
    }
}

/// Whether an ELF image is a Linux kernel: one of its PT_NOTE segments has a
/// note owned by "Linux" or "Xen" (the PVH entry note); the project's test
/// guests carry no notes.
pub fn is_linux(image: &[u8]) -> bool {
    parse(image).is_ok_and(|e| {
        e.note_owners(image)
            .iter()
            .any(|o| o == b"Linux" || o == b"Xen")
    })
}

fn describe_ram(ram: &[RamRange]) -> String {
    ram.iter()
        .map(|r| format!("[{:#x}..{:#x})", r.gpa, r.end()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Where a loaded image starts running.
#[derive(Debug, Clone, Copy)]
pub struct LoadedImage {
    pub entry: u64,
    /// First byte past the highest loaded segment.
    pub end: u64,
}

/// Load an ELF image at its physical addresses. The entry point is taken as
/// a physical address (the image is identity mapped).
pub fn load(mem: &GuestMemory, ram: &[RamRange], image: &[u8]) -> Result<LoadedImage, ElfError> {
    let info = parse(image)?;
    info.check_placement(ram)?;
    let r = Elf::load(mem, None, &mut Cursor::new(image), None).map_err(ElfError::Load)?;
    // Zero each segment's tail past its file data (.bss) explicitly: guest
    // RAM is not always fresh zeroes (it may be backed by a memory image).
    for s in &info.segments {
        if s.memsz > s.filesz {
            zero_fill(mem, s.paddr + s.filesz, s.memsz - s.filesz)?;
        }
    }
    // check_placement proved paddr + memsz fits in RAM: no overflow.
    let end = info
        .segments
        .iter()
        .map(|s| s.paddr + s.memsz)
        .max()
        .unwrap_or(0);
    Ok(LoadedImage {
        entry: r.kernel_load.0,
        end,
    })
}

fn zero_fill(mem: &GuestMemory, mut gpa: u64, mut len: u64) -> Result<(), ElfError> {
    const CHUNK: usize = 4096;
    let zeros = [0u8; CHUNK];
    while len > 0 {
        let n = len.min(CHUNK as u64);
        mem.write_slice(&zeros[..n as usize], GuestAddress(gpa))?;
        gpa += n;
        len -= n;
    }
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
        let info = parse(vmm_guests::DEMO).unwrap();
        info.check_placement(&RAM).unwrap();
        assert!(info.entry >= 0x100000);
        assert!(!info.segments.is_empty());
        assert!(info.note_owners(vmm_guests::DEMO).is_empty());
        assert!(!is_linux(vmm_guests::DEMO));
    }

    #[test]
    fn malformed_images_are_named() {
        let good = vmm_guests::DEMO;
        assert!(matches!(parse(&[]), Err(ElfError::Empty)));
        assert!(matches!(parse(b"MZ\x90\x00junk"), Err(ElfError::NotElf(_))));
        assert!(matches!(parse(&good[..40]), Err(ElfError::Truncated(_))));
        assert!(matches!(parse(&good[..200]), Err(ElfError::Truncated(_))));
        let small = [RamRange {
            gpa: 0,
            size: 0x100000,
        }];
        assert!(matches!(
            parse(good).unwrap().check_placement(&small),
            Err(ElfError::SegmentOutsideRam { .. })
        ));
        let mut be = good.to_vec();
        be[5] = 2;
        assert!(matches!(parse(&be), Err(ElfError::WrongKind(_))));
        assert!(!is_linux(b"not an elf"));
        assert!(!is_linux(&good[..70]));
    }

    /// Offsets from the file near `u64::MAX` are errors, never a panic or a
    /// wrap (debug builds check overflow).
    #[test]
    fn huge_offsets_are_errors_not_panics() {
        let good = vmm_guests::DEMO;
        let info = parse(good).unwrap();
        // Program header table offset near u64::MAX.
        let mut img = good.to_vec();
        img[32..40].copy_from_slice(&(u64::MAX - 8).to_le_bytes());
        assert!(matches!(parse(&img), Err(ElfError::Truncated(_))));
        // A segment's file offset, and then its paddr, near u64::MAX.
        let phoff = le::u64_at(good, 32).unwrap() as usize;
        let first_load = (0..info.segments.len() + 8)
            .map(|i| phoff + i * PHDR_SIZE as usize)
            .find(|&p| le::u32_at(good, p as u64) == Some(PT_LOAD))
            .unwrap();
        let mut img = good.to_vec();
        img[first_load + 8..first_load + 16].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        assert!(matches!(parse(&img), Err(ElfError::Truncated(_))));
        let mut img = good.to_vec();
        img[first_load + 24..first_load + 32].copy_from_slice(&(u64::MAX - 0xfff).to_le_bytes());
        assert!(matches!(
            parse(&img).unwrap().check_placement(&RAM),
            Err(ElfError::SegmentOutsideRam { .. })
        ));
        // Entry point at u64::MAX.
        let mut img = good.to_vec();
        img[24..32].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            parse(&img).unwrap().check_placement(&RAM),
            Err(ElfError::BadEntry(_))
        ));
    }

    /// Notes with sizes that run past their segment end the walk.
    #[test]
    fn malformed_notes_end_the_walk() {
        let mut seg = Vec::new();
        for (name, desc) in [(&b"Xen\0"[..], 8u32), (&b"Linux\0"[..], 4)] {
            seg.extend_from_slice(&(name.len() as u32).to_le_bytes());
            seg.extend_from_slice(&desc.to_le_bytes());
            seg.extend_from_slice(&1u32.to_le_bytes());
            seg.extend_from_slice(name);
            seg.resize(seg.len().next_multiple_of(4) + desc as usize, 0);
        }
        let ok = ElfInfo {
            entry: 0,
            segments: vec![],
            notes: vec![(0, seg.len() as u64)],
        };
        assert_eq!(
            ok.note_owners(&seg),
            vec![b"Xen".to_vec(), b"Linux".to_vec()]
        );
        let mut bad = seg.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(ok.note_owners(&bad).is_empty());
    }
}
