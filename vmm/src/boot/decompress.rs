//! Host-side decompression of a bzImage's payload (the compressed ELF
//! vmlinux), so that the VMM can boot it directly in 64-bit mode instead of
//! running the kernel's own decompressor under emulation.
//!
//! Every kernel payload ends with a 4-byte little-endian "size trailer": the
//! decompressed length (`arch/x86/boot/compressed/Makefile` appends it with
//! `size_append`; for gzip it is the stream's own ISIZE field). It is used to
//! check the result and to bound the output. For all formats but gzip the
//! trailer follows the compressed stream and is cut off before decoding.
//!
//! Formats (the magic bytes the kernel's compressors produce):
//! gzip `1f 8b`, xz `fd 37 7a 58 5a 00` (with the x86 BCJ filter, hence
//! liblzma rather than a pure-Rust decoder without filters), zstd
//! `28 b5 2f fd`, LZ4 *legacy* `02 21 4c 18` (Debian's 6.1 cloud kernel),
//! bzip2 `BZh`, lzma-alone `5d 00 00`, lzo (lzop) `89 4c 5a 4f`.
//! LZO is recognised but not decoded: no maintained Rust crate reads lzop.
//!
//! gzip, xz, zstd (as the kernel's build runs it) and bzip2 carry checksums,
//! so a damaged payload is an error. LZ4 legacy and lzma-alone frames have
//! none: damage inside literal runs can decode to the right length; the
//! size trailer, the LZ4 block structure and the ELF check are then the
//! only guards.

use std::fmt;
use std::io::Read;

use thiserror::Error;

/// A kernel payload compression format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Xz,
    Zstd,
    /// The LZ4 legacy frame (`lz4 -l`): magic 0x184C2102, then blocks of
    /// at most 8 MiB decompressed, each prefixed by its compressed size.
    Lz4Legacy,
    Bzip2,
    /// The "lzma-alone" format (`lzma -9`).
    Lzma,
    /// lzop's container around LZO1X blocks.
    Lzo,
}

const MAGICS: &[(&[u8], Compression)] = &[
    (&[0x1f, 0x8b], Compression::Gzip),
    (&[0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00], Compression::Xz),
    (&[0x28, 0xb5, 0x2f, 0xfd], Compression::Zstd),
    (&[0x02, 0x21, 0x4c, 0x18], Compression::Lz4Legacy),
    (b"BZh", Compression::Bzip2),
    (&[0x5d, 0x00, 0x00], Compression::Lzma),
    (&[0x89, 0x4c, 0x5a, 0x4f], Compression::Lzo),
];

/// Longest magic in [`MAGICS`]: how many bytes an "unknown" error shows.
pub const MAGIC_PEEK: usize = 6;

impl Compression {
    /// Identify the format from the payload's first bytes.
    pub fn detect(data: &[u8]) -> Option<Compression> {
        MAGICS
            .iter()
            .find(|(m, _)| data.starts_with(m))
            .map(|&(_, c)| c)
    }

    pub fn name(self) -> &'static str {
        match self {
            Compression::Gzip => "gzip",
            Compression::Xz => "xz",
            Compression::Zstd => "zstd",
            Compression::Lz4Legacy => "lz4 (legacy frame)",
            Compression::Bzip2 => "bzip2",
            Compression::Lzma => "lzma",
            Compression::Lzo => "lzo",
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Error)]
pub enum DecompressError {
    #[error("{0} payloads are recognised but not supported: no maintained Rust decoder (rebuild the kernel with gzip, xz, zstd or lz4)")]
    Unsupported(Compression),
    #[error("the payload is {0} bytes: too short to hold a compressed stream and its 4-byte size trailer")]
    TooShort(usize),
    #[error("the compressed stream is corrupt: {0}")]
    Corrupt(String),
    #[error("the compressed stream is truncated: {0}")]
    Truncated(String),
    #[error(
        "the stream decoded to {actual} bytes, but the payload's size trailer says {expected}"
    )]
    SizeMismatch { actual: u64, expected: u32 },
    #[error(
        "the stream decodes to more than the {expected} bytes the payload's size trailer says"
    )]
    TooLong { expected: u32 },
}

/// Decompress a whole bzImage payload (compressed stream plus size trailer).
pub fn decompress(format: Compression, payload: &[u8]) -> Result<Vec<u8>, DecompressError> {
    if payload.len() < 8 {
        return Err(DecompressError::TooShort(payload.len()));
    }
    let (stream, trailer) = payload.split_at(payload.len() - 4);
    let expected = u32::from_le_bytes([trailer[0], trailer[1], trailer[2], trailer[3]]);
    match format {
        // A gzip member ends with its own ISIZE, which is the trailer.
        Compression::Gzip => read_bounded(flate2::read::GzDecoder::new(payload), expected),
        Compression::Xz => read_bounded(xz2::read::XzDecoder::new(stream), expected),
        Compression::Lzma => {
            let decoder = xz2::stream::Stream::new_lzma_decoder(u64::MAX)
                .map_err(|e| DecompressError::Corrupt(format!("liblzma: {e}")))?;
            read_bounded(xz2::read::XzDecoder::new_stream(stream, decoder), expected)
        }
        Compression::Zstd => {
            let mut d = zstd::stream::read::Decoder::with_buffer(stream)
                .map_err(|e| DecompressError::Corrupt(format!("zstd: {e}")))?;
            // `zstd -22 --ultra` may use windows past the library's default
            // limit (2^27); the size trailer bounds the output anyway.
            d.window_log_max(31)
                .map_err(|e| DecompressError::Corrupt(format!("zstd: {e}")))?;
            read_bounded(d, expected)
        }
        Compression::Bzip2 => read_bounded(bzip2::read::BzDecoder::new(stream), expected),
        Compression::Lz4Legacy => {
            let out = lz4_legacy(stream, expected)?;
            check_len(out, expected)
        }
        Compression::Lzo => Err(DecompressError::Unsupported(format)),
    }
}

/// Most memory reserved up front, whatever the trailer claims.
const MAX_PREALLOC: usize = 256 << 20;

fn read_bounded<R: Read>(reader: R, expected: u32) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::with_capacity((expected as usize).min(MAX_PREALLOC));
    reader
        .take(u64::from(expected) + 1)
        .read_to_end(&mut out)
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => DecompressError::Truncated(e.to_string()),
            _ => DecompressError::Corrupt(e.to_string()),
        })?;
    check_len(out, expected)
}

fn check_len(out: Vec<u8>, expected: u32) -> Result<Vec<u8>, DecompressError> {
    if out.len() as u64 > u64::from(expected) {
        return Err(DecompressError::TooLong { expected });
    }
    if out.len() as u64 != u64::from(expected) {
        return Err(DecompressError::SizeMismatch {
            actual: out.len() as u64,
            expected,
        });
    }
    Ok(out)
}

/// The LZ4 legacy frame's magic, little-endian.
pub const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
/// Decompressed size of every legacy block but a stream's last.
pub const LZ4_LEGACY_BLOCK: usize = 8 << 20;

/// Decode an LZ4 legacy stream (possibly several concatenated, each starting
/// with the magic, as the kernel's `unlz4` accepts). A block that decodes to
/// less than 8 MiB must be its stream's last. Output is bounded by the size
/// trailer (`expected`): decoding stops at the first block that passes it.
fn lz4_legacy(data: &[u8], expected: u32) -> Result<Vec<u8>, DecompressError> {
    let le32 = |p: usize| super::le::u32_at(data, p as u64).unwrap_or_default();
    if data.len() < 4 || le32(0) != LZ4_LEGACY_MAGIC {
        return Err(DecompressError::Corrupt(
            "the stream does not start with the LZ4 legacy magic 0x184c2102".into(),
        ));
    }
    let limit = expected as usize;
    let mut out: Vec<u8> = Vec::with_capacity(limit.min(MAX_PREALLOC));
    let mut pos = 4;
    let mut block = 0usize;
    // Set while the last block decoded to less than 8 MiB (its size).
    let mut short_block: Option<usize> = None;
    while pos < data.len() {
        if data.len() - pos < 4 {
            return Err(DecompressError::Truncated(format!(
                "{} stray bytes at offset {pos:#x} where a block size was expected",
                data.len() - pos
            )));
        }
        let size = le32(pos) as usize;
        pos += 4;
        if size as u32 == LZ4_LEGACY_MAGIC {
            short_block = None;
            continue;
        }
        if let Some(short) = short_block {
            return Err(DecompressError::Corrupt(format!(
                "lz4 block {block} at offset {:#x} follows block {} that decoded to only {short} bytes: a block under 8 MiB must end its stream",
                pos - 4,
                block - 1
            )));
        }
        if size > data.len() - pos {
            return Err(DecompressError::Truncated(format!(
                "lz4 block {block} at offset {:#x} claims {size} compressed bytes, only {} remain",
                pos - 4,
                data.len() - pos
            )));
        }
        let start = out.len();
        out.resize(start + LZ4_LEGACY_BLOCK, 0);
        let n = lz4_flex::block::decompress_into(&data[pos..pos + size], &mut out[start..])
            .map_err(|e| {
                DecompressError::Corrupt(format!(
                    "lz4 block {block} at offset {:#x} ({size} bytes): {e}",
                    pos - 4
                ))
            })?;
        out.truncate(start + n);
        if out.len() > limit {
            return Err(DecompressError::TooLong { expected });
        }
        short_block = (n < LZ4_LEGACY_BLOCK).then_some(n);
        pos += size;
        block += 1;
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    /// Append the kernel's size trailer.
    fn with_trailer(mut stream: Vec<u8>, len: usize) -> Vec<u8> {
        stream.extend_from_slice(&(len as u32).to_le_bytes());
        stream
    }

    /// Compress `data` the way the kernel's build does for `format`
    /// (stream followed by the size trailer). Not available for LZO.
    pub(crate) fn compress(format: Compression, data: &[u8]) -> Vec<u8> {
        match format {
            Compression::Gzip => {
                let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Xz => {
                // As scripts/xz_wrap.sh: x86 BCJ filter, LZMA2, CRC32 check.
                let opts = xz2::stream::LzmaOptions::new_preset(6).unwrap();
                let mut filters = xz2::stream::Filters::new();
                filters.x86().lzma2(&opts);
                let s =
                    xz2::stream::Stream::new_stream_encoder(&filters, xz2::stream::Check::Crc32)
                        .unwrap();
                let mut e = xz2::write::XzEncoder::new_stream(Vec::new(), s);
                e.write_all(data).unwrap();
                with_trailer(e.finish().unwrap(), data.len())
            }
            Compression::Lzma => {
                let opts = xz2::stream::LzmaOptions::new_preset(6).unwrap();
                let s = xz2::stream::Stream::new_lzma_encoder(&opts).unwrap();
                let mut e = xz2::write::XzEncoder::new_stream(Vec::new(), s);
                e.write_all(data).unwrap();
                with_trailer(e.finish().unwrap(), data.len())
            }
            Compression::Zstd => {
                let mut e = zstd::stream::write::Encoder::new(Vec::new(), 19).unwrap();
                e.include_checksum(true).unwrap();
                e.write_all(data).unwrap();
                with_trailer(e.finish().unwrap(), data.len())
            }
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
                e.write_all(data).unwrap();
                with_trailer(e.finish().unwrap(), data.len())
            }
            Compression::Lz4Legacy => with_trailer(lz4_legacy_encode(data), data.len()),
            Compression::Lzo => panic!("no LZO encoder in tests"),
        }
    }

    /// What `lz4 -l` writes: the magic, then 8 MiB blocks.
    pub(crate) fn lz4_legacy_encode(data: &[u8]) -> Vec<u8> {
        let mut out = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(LZ4_LEGACY_BLOCK) {
            let block = lz4_flex::block::compress(chunk);
            out.extend_from_slice(&(block.len() as u32).to_le_bytes());
            out.extend_from_slice(&block);
        }
        out
    }

    /// Compressible but not trivial test data.
    fn sample(len: usize) -> Vec<u8> {
        let mut x = 0x1234_5678u32;
        (0..len)
            .map(|i| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                if i % 7 < 4 {
                    (i / 64) as u8
                } else {
                    (x >> 24) as u8
                }
            })
            .collect()
    }

    const DECODABLE: [Compression; 6] = [
        Compression::Gzip,
        Compression::Xz,
        Compression::Lzma,
        Compression::Zstd,
        Compression::Bzip2,
        Compression::Lz4Legacy,
    ];

    #[test]
    fn magics_are_detected() {
        let cases: [(&[u8], Option<Compression>); 9] = [
            (&[0x1f, 0x8b, 8, 0], Some(Compression::Gzip)),
            (&[0xfd, b'7', b'z', b'X', b'Z', 0, 0], Some(Compression::Xz)),
            (&[0x28, 0xb5, 0x2f, 0xfd, 0], Some(Compression::Zstd)),
            (&[0x02, 0x21, 0x4c, 0x18, 0], Some(Compression::Lz4Legacy)),
            (b"BZh9", Some(Compression::Bzip2)),
            (&[0x5d, 0, 0, 0, 4], Some(Compression::Lzma)),
            (&[0x89, b'L', b'Z', b'O', 0], Some(Compression::Lzo)),
            (b"\x7fELF", None),
            (&[], None),
        ];
        for (bytes, want) in cases {
            assert_eq!(Compression::detect(bytes), want, "{bytes:02x?}");
        }
    }

    #[test]
    fn every_decodable_format_round_trips() {
        let data = sample(300_000);
        for format in DECODABLE {
            let payload = compress(format, &data);
            assert_eq!(Compression::detect(&payload), Some(format), "{format}");
            let out = decompress(format, &payload).unwrap_or_else(|e| panic!("{format}: {e}"));
            assert!(out == data, "{format}: output differs");
        }
    }

    #[test]
    fn lz4_legacy_spans_several_blocks() {
        let data = sample(2 * LZ4_LEGACY_BLOCK + 12345);
        let payload = compress(Compression::Lz4Legacy, &data);
        assert!(decompress(Compression::Lz4Legacy, &payload).unwrap() == data);
    }

    #[test]
    fn lz4_legacy_accepts_concatenated_streams() {
        let a = sample(100_000);
        let b = sample(50_000);
        let mut stream = lz4_legacy_encode(&a);
        stream.extend_from_slice(&lz4_legacy_encode(&b));
        let payload = with_trailer(stream, a.len() + b.len());
        let out = decompress(Compression::Lz4Legacy, &payload).unwrap();
        assert_eq!(&out[..a.len()], &a[..]);
        assert_eq!(&out[a.len()..], &b[..]);
    }

    #[test]
    fn lz4_legacy_rejects_a_block_after_a_short_one() {
        let a = sample(100_000);
        let mut stream = lz4_legacy_encode(&a);
        let extra = lz4_flex::block::compress(&a);
        stream.extend_from_slice(&(extra.len() as u32).to_le_bytes());
        stream.extend_from_slice(&extra);
        let payload = with_trailer(stream, 2 * a.len());
        let e = decompress(Compression::Lz4Legacy, &payload).unwrap_err();
        assert!(matches!(e, DecompressError::Corrupt(_)), "{e}");
    }

    #[test]
    fn lz4_legacy_truncated_block_is_reported() {
        let data = sample(100_000);
        let full = lz4_legacy_encode(&data);
        let cut = full[..full.len() / 2].to_vec();
        let e = decompress(Compression::Lz4Legacy, &with_trailer(cut, data.len())).unwrap_err();
        assert!(matches!(e, DecompressError::Truncated(_)), "{e}");
    }

    #[test]
    fn wrong_size_trailer_is_reported() {
        let data = sample(10_000);
        for format in DECODABLE {
            let mut payload = compress(format, &data);
            let n = payload.len();
            // Claim fewer bytes: the bounded read stops one byte past it.
            payload[n - 4..].copy_from_slice(&((data.len() - 10) as u32).to_le_bytes());
            let e = decompress(format, &payload).unwrap_err();
            if format == Compression::Gzip {
                // gzip's trailer is its own ISIZE: the decoder itself objects.
                assert!(
                    matches!(
                        e,
                        DecompressError::Corrupt(_) | DecompressError::TooLong { .. }
                    ),
                    "{format}: {e}"
                );
            } else {
                assert!(
                    matches!(e, DecompressError::TooLong { .. }),
                    "{format}: {e}"
                );
                // Claim more bytes than there are.
                payload[n - 4..].copy_from_slice(&((data.len() + 10) as u32).to_le_bytes());
                let e = decompress(format, &payload).unwrap_err();
                assert!(
                    matches!(e, DecompressError::SizeMismatch { .. }),
                    "{format}: {e}"
                );
            }
        }
    }

    #[test]
    fn corrupt_streams_fail_without_panicking() {
        let data = sample(200_000);
        for format in DECODABLE {
            let mut payload = compress(format, &data);
            let mid = payload.len() / 2;
            for b in &mut payload[mid..mid + 64] {
                *b = 0xff;
            }
            let r = decompress(format, &payload);
            match format {
                // No checksum in these frames: damage inside literals can
                // decode to the right length. It must not panic, and must
                // not give back the original.
                Compression::Lz4Legacy | Compression::Lzma => {
                    assert!(r.map_or(true, |out| out != data), "{format}")
                }
                _ => assert!(r.is_err(), "{format}: corrupt stream decoded"),
            }
        }
    }

    #[test]
    fn corrupt_lz4_structure_is_an_error() {
        let data = sample(200_000);
        let mut payload = compress(Compression::Lz4Legacy, &data);
        // 0xff as the first token and its length bytes: a literal run far
        // longer than the block.
        for b in &mut payload[8..8 + 4096] {
            *b = 0xff;
        }
        let e = decompress(Compression::Lz4Legacy, &payload).unwrap_err();
        assert!(matches!(e, DecompressError::Corrupt(_)), "{e}");
        // A block size pointing past the end.
        let mut payload = compress(Compression::Lz4Legacy, &data);
        payload[4..8].copy_from_slice(&0x00ff_ffffu32.to_le_bytes());
        let e = decompress(Compression::Lz4Legacy, &payload).unwrap_err();
        assert!(matches!(e, DecompressError::Truncated(_)), "{e}");
    }

    #[test]
    fn truncated_streams_fail() {
        let data = sample(200_000);
        for format in DECODABLE {
            let payload = compress(format, &data);
            let mut cut = payload[..payload.len() / 2].to_vec();
            cut.extend_from_slice(&(data.len() as u32).to_le_bytes());
            assert!(decompress(format, &cut).is_err(), "{format}");
        }
    }

    #[test]
    fn lzo_is_recognised_but_unsupported() {
        let payload = [0x89, 0x4c, 0x5a, 0x4f, 0, 0, 0, 0, 1, 0, 0, 0];
        assert!(matches!(
            decompress(Compression::Lzo, &payload),
            Err(DecompressError::Unsupported(Compression::Lzo))
        ));
    }

    #[test]
    fn tiny_payload_is_too_short() {
        assert!(matches!(
            decompress(Compression::Gzip, &[0x1f, 0x8b, 0]),
            Err(DecompressError::TooShort(3))
        ));
    }
}
