//! bzImage handling: read the setup header (boot protocol 2.08+) and turn the
//! compressed payload back into the ELF vmlinux on the host, so the kernel
//! boots directly in 64-bit mode (its own decompressor would run under
//! emulation on PVM hosts: docs/ARCHITECTURE.md).
//!
//! Layout (Documentation/arch/x86/boot.rst): `setup_sects + 1` sectors of
//! real-mode setup (the setup header at 0x1f1 inside it), then the
//! protected-mode kernel, inside which `payload_offset` and `payload_length`
//! locate the compressed vmlinux.

use linux_loader::loader::bootparam::setup_header;
use thiserror::Error;
use vm_memory::ByteValued;

use super::decompress::{self, Compression, DecompressError, MAGIC_PEEK};
use super::{elf, le};

/// Where the setup header starts in the image (and in `boot_params`).
pub const SETUP_HEADER_OFFSET: usize = 0x1f1;
/// "HdrS", the setup header's magic.
pub const HDRS_OFFSET: usize = 0x202;
pub const HDRS_MAGIC: &[u8; 4] = b"HdrS";
/// Oldest protocol with `payload_offset`/`payload_length`.
pub const MIN_PROTOCOL: u16 = 0x0208;
/// End of the header fields this module reads, for protocols before 2.10
/// (through `payload_length`) and from 2.10 on (through `init_size`).
const HEADER_END_2_08: usize = 0x250;
const HEADER_END_2_10: usize = 0x264;
const SECTOR: usize = 512;

#[derive(Debug, Error)]
pub enum BzImageError {
    #[error("not a bzImage: no \"HdrS\" setup-header magic at offset 0x202 (found {found:02x?} in a {len}-byte file)")]
    NotBzImage { found: Vec<u8>, len: usize },
    #[error("bzImage boot protocol {}.{:02} is too old: 2.08 or newer is needed (it locates the payload)", .version >> 8, .version & 0xff)]
    ProtocolTooOld { version: u16 },
    #[error("bzImage is truncated: {len} bytes, but its setup header (protocol {:#06x}) runs to {need:#x}", .version)]
    TruncatedHeader {
        len: usize,
        need: usize,
        version: u16,
    },
    #[error("bzImage is truncated: its compressed payload spans [{start:#x}..{end:#x}) but the file has {len} bytes")]
    TruncatedPayload { start: u64, end: u64, len: usize },
    #[error("bzImage payload at {offset:#x} has an unknown compression (first bytes {magic:02x?}); known: gzip, xz, zstd, lz4, bzip2, lzma, lzo")]
    UnknownCompression { offset: usize, magic: Vec<u8> },
    #[error("decompressing the bzImage's {format} payload ({len} bytes at {offset:#x}) failed: {source}")]
    Decompress {
        format: Compression,
        offset: usize,
        len: usize,
        source: DecompressError,
    },
    #[error("the bzImage's {format} payload decompressed to {len} bytes that are not an x86_64 ELF64 vmlinux: {why}")]
    NotElf {
        format: Compression,
        len: usize,
        why: String,
    },
}

/// What a loader needs from the setup header.
#[derive(Debug, Clone, Copy)]
pub struct SetupHeaderInfo {
    /// Boot protocol version, e.g. 0x020f for 2.15.
    pub version: u16,
    /// Real-mode setup sectors (0 in the file means 4).
    pub setup_sects: u8,
    pub loadflags: u8,
    /// Physical alignment the kernel needs if relocated.
    pub kernel_alignment: u32,
    pub relocatable: bool,
    /// log2 of the smallest alignment the kernel accepts (2.10+, else 0).
    pub min_alignment: u8,
    /// XLF_* flags (2.12+, else 0).
    pub xloadflags: u16,
    /// Longest command line, NUL excluded.
    pub cmdline_size: u32,
    /// Highest address the initramfs may occupy (its last byte).
    pub initrd_addr_max: u32,
    /// Memory the kernel needs from its load address, decompression and
    /// early page tables included (2.10+, else 0).
    pub init_size: u32,
    /// Preferred (link-time) load address (2.10+, else 0).
    pub pref_address: u64,
    /// Payload offset from the start of the protected-mode kernel.
    pub payload_offset: u32,
    pub payload_length: u32,
    /// The header as the file has it, for copying into `boot_params.hdr`.
    pub raw: setup_header,
}

impl SetupHeaderInfo {
    /// File offset of the protected-mode kernel.
    pub fn kernel_offset(&self) -> usize {
        (usize::from(self.setup_sects) + 1) * SECTOR
    }

    /// File offsets of the compressed payload (size trailer included).
    pub fn payload_range(&self) -> std::ops::Range<u64> {
        let start = self.kernel_offset() as u64 + u64::from(self.payload_offset);
        start..start + u64::from(self.payload_length)
    }

    /// Whether the kernel has a 64-bit entry point (XLF_KERNEL_64).
    pub fn has_64bit_entry(&self) -> bool {
        self.xloadflags & linux_loader::loader::bootparam::XLF_KERNEL_64 != 0
    }
}

/// Setup-header fields this module reads (offsets in the image).
const SETUP_SECTS: u64 = 0x1f1;
const JUMP_LEN: u64 = 0x201;
const VERSION: u64 = 0x206;
const LOADFLAGS: u64 = 0x211;
const INITRD_ADDR_MAX: u64 = 0x22c;
const KERNEL_ALIGNMENT: u64 = 0x230;
const RELOCATABLE: u64 = 0x234;
const MIN_ALIGNMENT: u64 = 0x235;
const XLOADFLAGS: u64 = 0x236;
const CMDLINE_SIZE: u64 = 0x238;
const PAYLOAD_OFFSET: u64 = 0x248;
const PAYLOAD_LENGTH: u64 = 0x24c;
const PREF_ADDRESS: u64 = 0x258;
const INIT_SIZE: u64 = 0x260;
/// `setup_sects == 0` means 4 (boot.rst).
const DEFAULT_SETUP_SECTS: u8 = 4;

fn has_magic(image: &[u8]) -> bool {
    le::bytes(image, HDRS_OFFSET as u64, HDRS_MAGIC.len() as u64) == Some(&HDRS_MAGIC[..])
}

/// Whether `image` has a bzImage setup header of protocol 2.08 or newer.
pub fn is_bzimage(image: &[u8]) -> bool {
    image.len() >= HEADER_END_2_08
        && has_magic(image)
        && le::u16_at(image, VERSION).is_some_and(|v| v >= MIN_PROTOCOL)
}

/// Read the setup header.
pub fn setup_header(image: &[u8]) -> Result<SetupHeaderInfo, BzImageError> {
    let version = le::u16_at(image, VERSION);
    let (true, Some(version)) = (has_magic(image), version) else {
        let end = image.len().min(HDRS_OFFSET + HDRS_MAGIC.len());
        return Err(BzImageError::NotBzImage {
            found: image.get(HDRS_OFFSET..end).unwrap_or(&[]).to_vec(),
            len: image.len(),
        });
    };
    if version < MIN_PROTOCOL {
        return Err(BzImageError::ProtocolTooOld { version });
    }
    let v2_10 = version >= 0x020a;
    let need = if v2_10 {
        HEADER_END_2_10
    } else {
        HEADER_END_2_08
    };
    if image.len() < need {
        return Err(BzImageError::TruncatedHeader {
            len: image.len(),
            need,
            version,
        });
    }
    // The image holds every field below (`need` covers them): the reads
    // cannot fail, and a default would never be used.
    let b = |o| le::u8_at(image, o).unwrap_or_default();
    let w = |o| le::u16_at(image, o).unwrap_or_default();
    let d = |o| le::u32_at(image, o).unwrap_or_default();
    let q = |o| le::u64_at(image, o).unwrap_or_default();
    // The header's own length: the jump at 0x200 lands right after it.
    let declared_end = HDRS_OFFSET + usize::from(b(JUMP_LEN));
    let mut raw = setup_header::default();
    let raw_len = std::mem::size_of::<setup_header>()
        .min(declared_end.saturating_sub(SETUP_HEADER_OFFSET))
        .min(image.len() - SETUP_HEADER_OFFSET);
    raw.as_mut_slice()[..raw_len]
        .copy_from_slice(&image[SETUP_HEADER_OFFSET..SETUP_HEADER_OFFSET + raw_len]);
    let setup_sects = match b(SETUP_SECTS) {
        0 => DEFAULT_SETUP_SECTS,
        n => n,
    };
    Ok(SetupHeaderInfo {
        version,
        setup_sects,
        loadflags: b(LOADFLAGS),
        kernel_alignment: d(KERNEL_ALIGNMENT),
        relocatable: b(RELOCATABLE) != 0,
        min_alignment: if v2_10 { b(MIN_ALIGNMENT) } else { 0 },
        xloadflags: if version >= 0x020c { w(XLOADFLAGS) } else { 0 },
        cmdline_size: d(CMDLINE_SIZE),
        initrd_addr_max: d(INITRD_ADDR_MAX),
        init_size: if v2_10 { d(INIT_SIZE) } else { 0 },
        pref_address: if v2_10 { q(PREF_ADDRESS) } else { 0 },
        payload_offset: d(PAYLOAD_OFFSET),
        payload_length: d(PAYLOAD_LENGTH),
        raw,
    })
}

/// The compressed payload, its format and its file offset.
pub fn payload(image: &[u8]) -> Result<(Compression, &[u8], usize), BzImageError> {
    let hdr = setup_header(image)?;
    let range = hdr.payload_range();
    if range.end > image.len() as u64 {
        return Err(BzImageError::TruncatedPayload {
            start: range.start,
            end: range.end,
            len: image.len(),
        });
    }
    let (start, end) = (range.start as usize, range.end as usize);
    let data = &image[start..end];
    let format = Compression::detect(data).ok_or_else(|| BzImageError::UnknownCompression {
        offset: start,
        magic: data[..data.len().min(MAGIC_PEEK)].to_vec(),
    })?;
    Ok((format, data, start))
}

/// Decompress the payload into the ELF vmlinux.
pub fn extract_vmlinux(image: &[u8]) -> Result<Vec<u8>, BzImageError> {
    let (format, data, offset) = payload(image)?;
    let elf = decompress::decompress(format, data).map_err(|source| BzImageError::Decompress {
        format,
        offset,
        len: data.len(),
        source,
    })?;
    match elf::parse(&elf) {
        Ok(_) => Ok(elf),
        Err(why) => Err(BzImageError::NotElf {
            format,
            len: elf.len(),
            why: why.to_string(),
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::boot::decompress::tests::compress;

    /// A synthetic bzImage around `payload` (already compressed, trailer
    /// included): protocol `version`, 2 setup sectors, 0x100 bytes of
    /// protected-mode code before the payload, 32 bytes after it.
    pub(crate) fn make_bzimage(payload: &[u8], version: u16) -> Vec<u8> {
        let setup_sects = 1u8;
        let kernel_off = (usize::from(setup_sects) + 1) * SECTOR;
        let payload_offset = 0x100usize;
        let mut img = vec![0u8; kernel_off + payload_offset];
        img[0x1f1] = setup_sects;
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x200] = 0xeb;
        img[0x201] = (0x268 - HDRS_OFFSET) as u8;
        img[HDRS_OFFSET..HDRS_OFFSET + 4].copy_from_slice(HDRS_MAGIC);
        img[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        img[0x211] = 0x01; // LOADED_HIGH
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[0x230..0x234].copy_from_slice(&0x20_0000u32.to_le_bytes());
        img[0x234] = 1;
        img[0x235] = 21;
        img[0x236..0x238].copy_from_slice(&0x7fu16.to_le_bytes());
        img[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        img[0x248..0x24c].copy_from_slice(&(payload_offset as u32).to_le_bytes());
        img[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        img[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes());
        img[0x260..0x264].copy_from_slice(&0x300_0000u32.to_le_bytes());
        img.extend_from_slice(payload);
        img.extend_from_slice(&[0xcc; 32]);
        img
    }

    fn guest_bzimage(format: Compression) -> Vec<u8> {
        make_bzimage(&compress(format, vmm_guests::DEMO), 0x020f)
    }

    #[test]
    fn synthetic_bzimages_of_every_format_extract() {
        for format in [
            Compression::Gzip,
            Compression::Xz,
            Compression::Lzma,
            Compression::Zstd,
            Compression::Bzip2,
            Compression::Lz4Legacy,
        ] {
            let img = guest_bzimage(format);
            assert!(is_bzimage(&img));
            let elf = extract_vmlinux(&img).unwrap_or_else(|e| panic!("{format}: {e}"));
            assert!(elf == vmm_guests::DEMO, "{format}: output differs");
        }
    }

    #[test]
    fn header_fields_are_read() {
        let img = guest_bzimage(Compression::Gzip);
        let h = setup_header(&img).unwrap();
        assert_eq!(h.version, 0x020f);
        assert_eq!(h.setup_sects, 1);
        assert_eq!(h.kernel_alignment, 0x20_0000);
        assert!(h.relocatable);
        assert_eq!(h.min_alignment, 21);
        assert_eq!(h.xloadflags, 0x7f);
        assert!(h.has_64bit_entry());
        assert_eq!(h.cmdline_size, 2047);
        assert_eq!(h.initrd_addr_max, 0x7fff_ffff);
        assert_eq!(h.pref_address, 0x100_0000);
        assert_eq!(h.init_size, 0x300_0000);
        assert_eq!(h.payload_offset, 0x100);
        assert_eq!(h.kernel_offset(), 1024);
        assert_eq!(h.payload_range().start, 1024 + 0x100);
        // The raw copy is the file's bytes.
        let raw = h.raw;
        assert_eq!({ raw.header }, u32::from_le_bytes(*b"HdrS"));
        assert_eq!({ raw.version }, 0x020f);
        assert_eq!({ raw.boot_flag }, 0xaa55);
        assert_eq!({ raw.init_size }, 0x300_0000);
    }

    #[test]
    fn zero_setup_sects_means_four() {
        let mut img = guest_bzimage(Compression::Gzip);
        img[0x1f1] = 0;
        assert_eq!(setup_header(&img).unwrap().setup_sects, 4);
    }

    #[test]
    fn older_protocols_read_only_their_fields() {
        let mut img = guest_bzimage(Compression::Gzip);
        img[0x206..0x208].copy_from_slice(&0x0208u16.to_le_bytes());
        let h = setup_header(&img).unwrap();
        assert_eq!((h.init_size, h.pref_address, h.xloadflags), (0, 0, 0));
        assert!(extract_vmlinux(&img).is_ok());
    }

    #[test]
    fn non_bzimages_are_rejected() {
        let inputs: [&[u8]; 4] = [vmm_guests::DEMO, &[], b"MZ\x90\x00", &[0u8; 4096]];
        for input in inputs {
            assert!(!is_bzimage(input));
            assert!(matches!(
                extract_vmlinux(input),
                Err(BzImageError::NotBzImage { .. })
            ));
        }
    }

    #[test]
    fn old_protocol_is_rejected() {
        let mut img = guest_bzimage(Compression::Gzip);
        img[0x206..0x208].copy_from_slice(&0x0207u16.to_le_bytes());
        assert!(!is_bzimage(&img));
        let e = setup_header(&img).unwrap_err();
        assert!(matches!(
            e,
            BzImageError::ProtocolTooOld { version: 0x0207 }
        ));
        assert!(e.to_string().contains("2.07"), "{e}");
    }

    #[test]
    fn truncated_header_is_reported() {
        let img = guest_bzimage(Compression::Gzip);
        let e = setup_header(&img[..0x240]).unwrap_err();
        assert!(
            matches!(e, BzImageError::TruncatedHeader { len: 0x240, .. }),
            "{e}"
        );
    }

    #[test]
    fn truncated_payload_is_reported() {
        let img = guest_bzimage(Compression::Xz);
        let end = setup_header(&img).unwrap().payload_range().end as usize;
        let e = extract_vmlinux(&img[..end - 100]).unwrap_err();
        assert!(matches!(e, BzImageError::TruncatedPayload { .. }), "{e}");
    }

    #[test]
    fn unknown_compression_names_the_magic() {
        let mut payload = b"ABCDEFGH".to_vec();
        payload.extend_from_slice(&[0; 16]);
        let img = make_bzimage(&payload, 0x020f);
        let e = extract_vmlinux(&img).unwrap_err();
        assert!(
            matches!(&e, BzImageError::UnknownCompression { magic, .. } if magic == b"ABCDEF"),
            "{e}"
        );
        assert!(e.to_string().contains("41, 42, 43"), "{e}");
    }

    #[test]
    fn lzo_payload_is_reported_as_unsupported() {
        let mut payload = vec![0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a];
        payload.extend_from_slice(&[0; 16]);
        let e = extract_vmlinux(&make_bzimage(&payload, 0x020f)).unwrap_err();
        assert!(
            matches!(
                e,
                BzImageError::Decompress {
                    format: Compression::Lzo,
                    source: DecompressError::Unsupported(_),
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn corrupted_payload_is_a_decompression_error() {
        for format in [
            Compression::Gzip,
            Compression::Xz,
            Compression::Zstd,
            Compression::Bzip2,
            Compression::Lz4Legacy,
        ] {
            let mut img = guest_bzimage(format);
            let r = setup_header(&img).unwrap().payload_range();
            // The checksummed formats: damage the middle. LZ4 legacy has no
            // checksum: damage its first block's structure (from the token).
            let at = if format == Compression::Lz4Legacy {
                r.start as usize + 8
            } else {
                ((r.start + r.end) / 2) as usize - 16
            };
            for b in &mut img[at..at + 32] {
                *b = 0xff;
            }
            let e = extract_vmlinux(&img).unwrap_err();
            assert!(
                matches!(e, BzImageError::Decompress { .. }),
                "{format}: {e}"
            );
        }
    }

    #[test]
    fn payload_that_is_not_elf_is_reported() {
        let img = make_bzimage(
            &compress(Compression::Gzip, b"not a kernel at all, just words"),
            0x020f,
        );
        let e = extract_vmlinux(&img).unwrap_err();
        assert!(matches!(e, BzImageError::NotElf { .. }), "{e}");
        let mut elf32 = vmm_guests::DEMO.to_vec();
        elf32[4] = 1;
        let img = make_bzimage(&compress(Compression::Zstd, &elf32), 0x020f);
        assert!(matches!(
            extract_vmlinux(&img),
            Err(BzImageError::NotElf { ref why, .. }) if why.contains("not ELFCLASS64")
        ));
    }
}

/// Tests against Debian's real cloud kernel (LZ4-compressed, protocol 2.15).
#[cfg(test)]
pub(crate) mod debian_kernel_tests {
    use super::*;
    use crate::arch::x86_64::layout;
    use crate::boot::elf;

    const DEFAULT_PATH: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../guest-images/out/linux/vmlinuz-cloud"
    );

    /// The bzImage: $VMM_LINUX_BZIMAGE, else guest-images/out/linux/vmlinuz-cloud.
    /// A missing file fails the test: these tests must not pass vacuously.
    pub(crate) fn debian_bzimage() -> Vec<u8> {
        let path = std::env::var("VMM_LINUX_BZIMAGE").unwrap_or_else(|_| DEFAULT_PATH.into());
        match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => panic!(
                "cannot read the Debian cloud kernel bzImage at {path}: {e}. \
                 Run guest-images/build.sh (it puts it at guest-images/out/linux/vmlinuz-cloud), \
                 or point VMM_LINUX_BZIMAGE at a bzImage"
            ),
        }
    }

    #[test]
    fn debian_kernel_is_a_bzimage_with_a_sane_header() {
        let img = debian_bzimage();
        assert!(is_bzimage(&img));
        let h = setup_header(&img).unwrap();
        assert!(h.version >= 0x020c, "protocol {:#x}", h.version);
        assert!(h.relocatable);
        assert!(h.has_64bit_entry());
        assert!(h.kernel_alignment.is_power_of_two() && h.kernel_alignment >= 0x20_0000);
        assert!(h.init_size > 0);
        assert!(h.pref_address >= 0x10_0000);
        assert!(h.cmdline_size >= 255);
        assert!(h.initrd_addr_max >= 0x37ff_ffff);
        assert!(h.payload_range().end <= img.len() as u64);
    }

    #[test]
    fn debian_kernel_payload_is_lz4_legacy() {
        let img = debian_bzimage();
        let (format, data, _) = payload(&img).unwrap();
        assert_eq!(format, Compression::Lz4Legacy, "Debian 6.1 cloud kernel");
        assert!(data.len() > 1 << 20);
    }

    #[test]
    fn debian_kernel_extracts_to_a_loadable_vmlinux() {
        let img = debian_bzimage();
        let h = setup_header(&img).unwrap();
        let elf = extract_vmlinux(&img).unwrap();
        assert_eq!(&elf[..4], b"\x7fELF");
        assert_eq!(elf[4], 2, "ELFCLASS64");
        assert_eq!(le::u16_at(&elf, 18), Some(62), "EM_X86_64");
        let ram = layout::ram_ranges(512 << 20);
        let info = elf::parse(&elf).unwrap();
        info.check_placement(&ram).unwrap();
        let (entry, segs) = (info.entry, info.segments);
        assert!(!segs.is_empty());
        assert!(
            segs.iter()
                .any(|s| entry >= s.paddr && entry < s.paddr + s.memsz),
            "entry {entry:#x} outside the PT_LOAD segments"
        );
        let lo = segs.iter().map(|s| s.paddr).min().unwrap();
        let hi = segs.iter().map(|s| s.paddr + s.memsz).max().unwrap();
        assert!(lo >= layout::HIMEM_START);
        assert_eq!(lo, h.pref_address, "vmlinux loads at the preferred address");
        assert!(
            hi - lo <= u64::from(h.init_size),
            "vmlinux spans {:#x}, more than init_size {:#x}",
            hi - lo,
            h.init_size
        );
    }

    #[test]
    fn truncated_debian_kernel_is_reported() {
        let img = debian_bzimage();
        let e = extract_vmlinux(&img[..img.len() / 2]).unwrap_err();
        assert!(matches!(e, BzImageError::TruncatedPayload { .. }), "{e}");
        let e = extract_vmlinux(&img[..0x230]).unwrap_err();
        assert!(matches!(e, BzImageError::TruncatedHeader { .. }), "{e}");
    }

    #[test]
    fn corrupted_debian_kernel_is_a_decompression_error() {
        let img = debian_bzimage();
        let start = setup_header(&img).unwrap().payload_range().start as usize;
        // LZ4 legacy has no checksum, so damage the structure: 0xff from the
        // first token of the second block on (a literal run past the block).
        let first = le::u32_at(&img, start as u64 + 4).unwrap() as usize;
        let second = start + 8 + first + 4;
        let mut bad = img.clone();
        for b in &mut bad[second..second + 4096] {
            *b = 0xff;
        }
        let e = extract_vmlinux(&bad).unwrap_err();
        assert!(matches!(e, BzImageError::Decompress { .. }), "{e}");
        assert!(e.to_string().contains("lz4 block"), "{e}");
    }

    #[test]
    fn flipped_bytes_in_the_debian_kernel_never_pass_as_the_kernel() {
        let img = debian_bzimage();
        let good = extract_vmlinux(&img).unwrap();
        let r = setup_header(&img).unwrap().payload_range();
        let mid = ((r.start + r.end) / 2) as usize;
        let mut bad = img.clone();
        for b in &mut bad[mid..mid + 64] {
            *b ^= 0xff;
        }
        // An error, or (damage confined to literals) a different image.
        if let Ok(out) = extract_vmlinux(&bad) {
            assert!(out != good, "corruption went unnoticed");
        }
    }

    #[test]
    fn debian_kernel_with_unknown_compression_names_the_magic() {
        let mut img = debian_bzimage();
        let start = setup_header(&img).unwrap().payload_range().start as usize;
        img[start..start + 4].copy_from_slice(b"\xde\xad\xbe\xef");
        let e = extract_vmlinux(&img).unwrap_err();
        assert!(
            matches!(&e, BzImageError::UnknownCompression { magic, .. } if magic[..4] == [0xde, 0xad, 0xbe, 0xef]),
            "{e}"
        );
    }
}
