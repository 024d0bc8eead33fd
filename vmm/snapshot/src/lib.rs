//! The snapshot format.
//!
//! A snapshot is a directory:
//! - `manifest.json`: the format version, the VMM's version, what the VM
//!   layer says about the VM (`info`: host kind, CPUID, configuration), and
//!   for every state section and for the memory file its length and CRC-32;
//! - one `NAME.bin` per state section (bincode of the layer's serde type);
//! - `memory`: guest RAM, a sparse file: pages the VM never had are holes.
//!
//! [`SnapshotWriter`] writes everything under a temporary name beside the
//! target and renames it into place only when complete (files and
//! directory synced): a failed snapshot (disk full, an I/O error, a crash)
//! leaves no snapshot, and an existing one is never written over.
//! [`SnapshotReader::open`] checks the format version, every section's
//! length and checksum and the memory file's size before anyone reads a
//! byte of state; every error names the section. Nothing reads or writes
//! the directory but through these two types, and the reader never writes.
//!
//! The memory file's checksum covers its non-zero pages (a zero page and a
//! hole are the same page): [`SnapshotReader::verify_memory`] reads only
//! the file's data extents. A lazy restore does not read the file up front
//! (that is its point), so the caller decides when to verify.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The newest format this build reads, and what it writes for a diff
/// snapshot (format 2: a `base` in the manifest; a vmm that reads only
/// format 1 must refuse a diff, whose unchanged pages it would take for
/// holes). A full snapshot is written as [`FULL_FORMAT`], which older
/// builds read.
pub const FORMAT_VERSION: u32 = 2;
/// The format of a snapshot with no base.
pub const FULL_FORMAT: u32 = 1;
const MANIFEST: &str = "manifest.json";
/// The memory file's name in the directory.
pub const MEMORY: &str = "memory";
/// Largest manifest and largest section read (state is kilobytes; a bound
/// keeps a hostile file from allocating without one).
const MAX_MANIFEST: u64 = 16 << 20;
const MAX_SECTION: u64 = 64 << 20;
const PAGE: usize = 4096;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("{0} already exists: a snapshot is never written over another")]
    Exists(PathBuf),
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the manifest ({path}) is not a snapshot manifest: {reason}")]
    Manifest { path: PathBuf, reason: String },
    #[error("snapshot format {found} is newer than this vmm reads (format {supported}): restore it with a newer vmm")]
    Newer { found: u32, supported: u32 },
    #[error("section {name}: {found} bytes on disk, the manifest says {expected} (truncated or replaced?)")]
    Length {
        name: String,
        found: u64,
        expected: u64,
    },
    #[error(
        "section {name}: checksum {found:#010x}, the manifest says {expected:#010x} (corrupted)"
    )]
    Checksum {
        name: String,
        found: u32,
        expected: u32,
    },
    #[error("section {0} is not in the snapshot")]
    Missing(String),
    #[error("section {name}: {bytes} bytes, more than the {max} a section may have")]
    TooLarge { name: String, bytes: u64, max: u64 },
    #[error("section {name} does not decode: {reason}")]
    Decode { name: String, reason: String },
    #[error("section name {0:?}: only a-z, 0-9, '-' and '_'")]
    BadName(String),
    #[error("memory file: {found} bytes, the manifest says {expected} (truncated or replaced?)")]
    MemorySize { found: u64, expected: u64 },
    #[error("memory file: checksum {found:#010x} over its {pages} non-zero pages, the manifest says {expected:#010x} (corrupted)")]
    MemoryChecksum {
        found: u32,
        expected: u32,
        pages: u64,
    },
    #[error("memory file: writes must go forward (offset {offset:#x} after {end:#x})")]
    MemoryOrder { offset: u64, end: u64 },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// One state section as the manifest records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Section {
    pub name: String,
    pub bytes: u64,
    pub crc32: u32,
}

/// The memory file as the manifest records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFile {
    /// Its length (holes included).
    pub bytes: u64,
    /// Bytes of pages written (the rest are holes).
    pub data_bytes: u64,
    /// CRC-32 over (offset, content) of every non-zero page, in order.
    pub crc32: u32,
}

/// The snapshot a diff snapshot was taken against: its memory pages not
/// in the diff are the base's. The base is checked to be the same snapshot
/// (its memory file's size and checksum) before it is used.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRef {
    /// Where it was when the diff was taken (an absolute path).
    pub dir: PathBuf,
    pub memory: MemoryFile,
}

/// `manifest.json`. `I` is what the VM layer records about the VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest<I> {
    pub format: u32,
    pub vmm_version: String,
    pub info: I,
    pub sections: Vec<Section>,
    pub memory: MemoryFile,
    /// Set in a diff snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<BaseRef>,
}

impl<I: DeserializeOwned> Manifest<I> {
    /// Parse a manifest (the format version first, so a newer format is
    /// named as such rather than as a parse error).
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Self, SnapshotError> {
        let bad = |reason: String| SnapshotError::Manifest {
            path: path.to_path_buf(),
            reason,
        };
        #[derive(Deserialize)]
        struct Version {
            format: u32,
        }
        let v: Version = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if v.format > FORMAT_VERSION {
            return Err(SnapshotError::Newer {
                found: v.format,
                supported: FORMAT_VERSION,
            });
        }
        let m: Self = serde_json::from_slice(bytes).map_err(|e| bad(e.to_string()))?;
        if m.base.is_some() && m.format < FORMAT_VERSION {
            return Err(bad(format!(
                "format {} has no base; a diff snapshot is format {FORMAT_VERSION}",
                m.format
            )));
        }
        Ok(m)
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_SECTION as usize }>()
}

/// Encode a section's value as it is stored.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing into memory cannot fail for the plain data of state.
    bincode::serde::encode_to_vec(value, bincode_config()).unwrap_or_default()
}

/// Decode a section's bytes; any mismatch with `T` is an error naming it.
pub fn decode<T: DeserializeOwned>(name: &str, bytes: &[u8]) -> Result<T, SnapshotError> {
    let (value, used) =
        bincode::serde::decode_from_slice(bytes, bincode_config()).map_err(|e| {
            SnapshotError::Decode {
                name: name.to_string(),
                reason: e.to_string(),
            }
        })?;
    if used != bytes.len() {
        return Err(SnapshotError::Decode {
            name: name.to_string(),
            reason: format!("{} trailing bytes", bytes.len() - used),
        });
    }
    Ok(value)
}

fn check_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.to_string()))
    }
}

fn sync_dir(dir: &Path) -> Result<(), SnapshotError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("sync", dir))
}

/// A sidecar file's header: what it is, then its payload's length and
/// CRC-32.
const SIDECAR_MAGIC: &[u8; 8] = b"VMMSIDE1";

/// A new file only its owner may read: a snapshot is the guest's memory
/// and registers (its directory is 0700 too).
fn create_private(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

/// Write `value` as a sidecar file beside a snapshot's (a working set a
/// restore recorded): under a temporary name, synced, renamed over any
/// earlier one. The snapshot's own files are never touched.
pub fn write_sidecar<T: Serialize>(path: &Path, value: &T) -> Result<(), SnapshotError> {
    let payload = encode(value);
    let tmp = path.with_extension(format!("partial-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = create_private(&tmp)?;
        f.write_all(SIDECAR_MAGIC)?;
        f.write_all(&(payload.len() as u64).to_le_bytes())?;
        f.write_all(&crc32fast::hash(&payload).to_le_bytes())?;
        f.write_all(&payload)?;
        f.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("write", &tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(io("rename into", path))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(())
}

/// Read a sidecar file [`write_sidecar`] wrote, checking its length and
/// checksum.
pub fn read_sidecar<T: DeserializeOwned>(path: &Path) -> Result<T, SnapshotError> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bytes = read_bounded(path, MAX_SECTION + 20, &name)?;
    let bad = |reason: String| SnapshotError::Decode {
        name: name.clone(),
        reason,
    };
    if bytes.len() < 20 || &bytes[..8] != SIDECAR_MAGIC {
        return Err(bad("not a sidecar file of this vmm".into()));
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().unwrap_or_default());
    let crc = u32::from_le_bytes(bytes[16..20].try_into().unwrap_or_default());
    let payload = &bytes[20..];
    if payload.len() as u64 != len {
        return Err(SnapshotError::Length {
            name: name.clone(),
            found: payload.len() as u64,
            expected: len,
        });
    }
    let found = crc32fast::hash(payload);
    if found != crc {
        return Err(SnapshotError::Checksum {
            name: name.clone(),
            found,
            expected: crc,
        });
    }
    decode(&name, payload)
}

/// Writes one snapshot (see the crate docs). Dropped without
/// [`Self::commit`], it removes what it wrote.
pub struct SnapshotWriter {
    dir: PathBuf,
    tmp: PathBuf,
    sections: Vec<Section>,
    base: Option<BaseRef>,
    committed: bool,
}

impl SnapshotWriter {
    /// Start a snapshot that will be `dir`; `dir` must not exist.
    pub fn create(dir: &Path) -> Result<Self, SnapshotError> {
        if dir.exists() {
            return Err(SnapshotError::Exists(dir.to_path_buf()));
        }
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "snapshot".into());
        let parent = dir.parent().filter(|p| !p.as_os_str().is_empty());
        let tmp = parent
            .unwrap_or(Path::new("."))
            .join(format!(".{name}.partial-{}", std::process::id()));
        // A partial snapshot of ours left by a crash: never a snapshot.
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&tmp)
            .map_err(io("create", &tmp))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            tmp,
            sections: Vec::new(),
            base: None,
            committed: false,
        })
    }

    /// Write section `name`.
    pub fn section<T: Serialize>(&mut self, name: &str, value: &T) -> Result<(), SnapshotError> {
        check_name(name)?;
        let bytes = encode(value);
        let path = self.tmp.join(format!("{name}.bin"));
        let mut f = create_private(&path).map_err(io("create", &path))?;
        f.write_all(&bytes).map_err(io("write", &path))?;
        self.sections.push(Section {
            name: name.to_string(),
            bytes: bytes.len() as u64,
            crc32: crc32fast::hash(&bytes),
        });
        Ok(())
    }

    /// Make this a diff snapshot on `base`.
    pub fn set_base(&mut self, base: BaseRef) {
        self.base = Some(base);
    }

    /// The memory file, `bytes` long, all holes until written.
    pub fn memory(&self, bytes: u64) -> Result<MemoryWriter, SnapshotError> {
        let path = self.tmp.join(MEMORY);
        let file = create_private(&path).map_err(io("create", &path))?;
        file.set_len(bytes).map_err(io("size", &path))?;
        Ok(MemoryWriter {
            file,
            path,
            bytes,
            end: 0,
            data_bytes: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// Write the manifest, sync every file, and move the snapshot into
    /// place.
    pub fn commit<I: Serialize>(
        mut self,
        info: I,
        memory: MemoryFile,
    ) -> Result<(), SnapshotError> {
        for name in self
            .sections
            .iter()
            .map(|s| format!("{}.bin", s.name))
            .chain([MEMORY.to_string()])
        {
            let path = self.tmp.join(name);
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(io("sync", &path))?;
        }
        let manifest = Manifest {
            format: if self.base.is_some() {
                FORMAT_VERSION
            } else {
                FULL_FORMAT
            },
            vmm_version: env!("CARGO_PKG_VERSION").to_string(),
            info,
            sections: std::mem::take(&mut self.sections),
            memory,
            base: self.base.take(),
        };
        let path = self.tmp.join(MANIFEST);
        let text = serde_json::to_vec_pretty(&manifest).map_err(|e| SnapshotError::Manifest {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let mut f = create_private(&path).map_err(io("create", &path))?;
        f.write_all(&text).map_err(io("write", &path))?;
        f.sync_all().map_err(io("sync", &path))?;
        sync_dir(&self.tmp)?;
        if self.dir.exists() {
            return Err(SnapshotError::Exists(self.dir.clone()));
        }
        std::fs::rename(&self.tmp, &self.dir).map_err(io("rename into", &self.dir))?;
        self.committed = true;
        if let Some(parent) = self.dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        Ok(())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Fills the memory file, front to back.
pub struct MemoryWriter {
    file: File,
    path: PathBuf,
    bytes: u64,
    /// First byte not written yet (writes go forward).
    end: u64,
    data_bytes: u64,
    crc: crc32fast::Hasher,
}

/// Add `page` at `offset` to a memory checksum unless it is all zero.
fn hash_page(crc: &mut crc32fast::Hasher, offset: u64, page: &[u8]) -> bool {
    if page.iter().all(|b| *b == 0) {
        return false;
    }
    crc.update(&offset.to_le_bytes());
    crc.update(page);
    true
}

impl MemoryWriter {
    /// Write `data` (whole pages) at `offset`, after everything written so
    /// far.
    pub fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), SnapshotError> {
        if offset < self.end {
            return Err(SnapshotError::MemoryOrder {
                offset,
                end: self.end,
            });
        }
        self.file
            .write_all_at(data, offset)
            .map_err(io("write", &self.path))?;
        for (i, page) in data.chunks(PAGE).enumerate() {
            hash_page(&mut self.crc, offset + (i * PAGE) as u64, page);
        }
        self.end = offset + data.len() as u64;
        self.data_bytes += data.len() as u64;
        Ok(())
    }

    /// What the manifest records (the file is synced at commit).
    pub fn finish(self) -> Result<MemoryFile, SnapshotError> {
        Ok(MemoryFile {
            bytes: self.bytes,
            data_bytes: self.data_bytes,
            crc32: self.crc.finalize(),
        })
    }
}

/// A snapshot opened for restore; read-only.
pub struct SnapshotReader<I> {
    dir: PathBuf,
    pub manifest: Manifest<I>,
}

impl<I: DeserializeOwned> SnapshotReader<I> {
    /// Open `dir` and check it: the format version, every section's length
    /// and checksum, the memory file's length.
    pub fn open(dir: &Path) -> Result<Self, SnapshotError> {
        let path = dir.join(MANIFEST);
        let bytes = read_bounded(&path, MAX_MANIFEST, "manifest").map_err(|e| match e {
            // No manifest: not a snapshot (or no directory at all).
            SnapshotError::Missing(_) => SnapshotError::Io {
                what: "open",
                path: path.clone(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
            e => e,
        })?;
        let manifest = Manifest::<I>::parse(&bytes, &path)?;
        let r = Self {
            dir: dir.to_path_buf(),
            manifest,
        };
        for s in &r.manifest.sections {
            r.read_section(s)?;
        }
        let mem = r.memory_path();
        let found = std::fs::metadata(&mem).map_err(io("open", &mem))?.len();
        let expected = r.manifest.memory.bytes;
        if found != expected {
            return Err(SnapshotError::MemorySize { found, expected });
        }
        Ok(r)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }

    /// Section `name`'s bytes, checked against the manifest.
    fn read_section(&self, s: &Section) -> Result<Vec<u8>, SnapshotError> {
        check_name(&s.name)?;
        if s.bytes > MAX_SECTION {
            return Err(SnapshotError::TooLarge {
                name: s.name.clone(),
                bytes: s.bytes,
                max: MAX_SECTION,
            });
        }
        let path = self.dir.join(format!("{}.bin", s.name));
        let bytes = read_bounded(&path, MAX_SECTION, &s.name)?;
        if bytes.len() as u64 != s.bytes {
            return Err(SnapshotError::Length {
                name: s.name.clone(),
                found: bytes.len() as u64,
                expected: s.bytes,
            });
        }
        let crc = crc32fast::hash(&bytes);
        if crc != s.crc32 {
            return Err(SnapshotError::Checksum {
                name: s.name.clone(),
                found: crc,
                expected: s.crc32,
            });
        }
        Ok(bytes)
    }

    /// Section `name`, decoded as `T`.
    pub fn section<T: DeserializeOwned>(&self, name: &str) -> Result<T, SnapshotError> {
        let s = self
            .manifest
            .sections
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| SnapshotError::Missing(name.to_string()))?;
        decode(name, &self.read_section(s)?)
    }

    /// Read the memory file's data extents and check its checksum.
    pub fn verify_memory(&self) -> Result<(), SnapshotError> {
        let path = self.memory_path();
        let file = File::open(&path).map_err(io("open", &path))?;
        let mut crc = crc32fast::Hasher::new();
        let mut pages = 0;
        let mut buf = vec![0u8; 1 << 20];
        for (start, end) in data_extents(&file, self.manifest.memory.bytes) {
            let mut at = start;
            while at < end {
                let n = ((end - at) as usize).min(buf.len());
                file.read_exact_at(&mut buf[..n], at)
                    .map_err(io("read", &path))?;
                for (i, page) in buf[..n].chunks(PAGE).enumerate() {
                    pages += u64::from(hash_page(&mut crc, at + (i * PAGE) as u64, page));
                }
                at += n as u64;
            }
        }
        let found = crc.finalize();
        let expected = self.manifest.memory.crc32;
        if found != expected {
            return Err(SnapshotError::MemoryChecksum {
                found,
                expected,
                pages,
            });
        }
        Ok(())
    }
}

/// A file's data extents `[start, end)`, page aligned (SEEK_DATA and
/// SEEK_HOLE; a file system without them reports one extent).
pub fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at: i64 = 0;
    while (at as u64) < len {
        // SAFETY: lseek on an open descriptor; it only moves the offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past `at`
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { len as i64 } else { hole };
        let start = (data as u64) & !(PAGE as u64 - 1);
        let end = (hole as u64)
            .min(len)
            .next_multiple_of(PAGE as u64)
            .min(len);
        out.push((start, end));
        at = hole;
    }
    out
}

fn read_bounded(path: &Path, max: u64, name: &str) -> Result<Vec<u8>, SnapshotError> {
    let f = File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing(name.to_string()),
        _ => SnapshotError::Io {
            what: "open",
            path: path.to_path_buf(),
            source: e,
        },
    })?;
    let mut bytes = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io("read", path))?;
    if bytes.len() as u64 > max {
        return Err(SnapshotError::TooLarge {
            name: name.to_string(),
            bytes: bytes.len() as u64,
            max,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Info {
        vcpus: usize,
    }

    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct Regs {
        rip: u64,
        rax: u64,
        bytes: Vec<u8>,
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vmm-snap-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A snapshot with one section and 4 pages of memory, two of them data.
    fn write(dir: &Path) {
        let mut w = SnapshotWriter::create(dir).unwrap();
        let regs = Regs {
            rip: 0x1000,
            rax: 7,
            bytes: vec![1, 2, 3],
        };
        w.section("vcpu0", &regs).unwrap();
        let mut m = w.memory(4 * PAGE as u64).unwrap();
        m.write_at(PAGE as u64, &[0xab; PAGE]).unwrap();
        m.write_at(3 * PAGE as u64, &[0xcd; PAGE]).unwrap();
        let mem = m.finish().unwrap();
        w.commit(Info { vcpus: 1 }, mem).unwrap();
    }

    #[test]
    fn a_snapshot_reads_back_and_is_sparse() {
        let d = tmp("rt").join("s");
        write(&d);
        let r = SnapshotReader::<Info>::open(&d).unwrap();
        assert_eq!(r.manifest.info, Info { vcpus: 1 });
        let regs: Regs = r.section("vcpu0").unwrap();
        assert_eq!(regs.rip, 0x1000);
        r.verify_memory().unwrap();
        assert_eq!(r.manifest.memory.data_bytes, 2 * PAGE as u64);
        let f = File::open(r.memory_path()).unwrap();
        let extents = data_extents(&f, 4 * PAGE as u64);
        let data: u64 = extents.iter().map(|(a, b)| b - a).sum();
        assert!(data <= 3 * PAGE as u64, "holes stay holes: {extents:?}");
        assert!(matches!(
            r.section::<Regs>("vcpu1"),
            Err(SnapshotError::Missing(_))
        ));
        // Writing over it is refused; nothing partial is left behind.
        assert!(matches!(
            SnapshotWriter::create(&d),
            Err(SnapshotError::Exists(_))
        ));
        let _ = std::fs::remove_dir_all(d.parent().unwrap());
    }

    #[test]
    fn every_damage_is_an_error_naming_what_is_damaged() {
        let base = tmp("bad");
        let fresh = |n: &str| {
            let d = base.join(n);
            write(&d);
            d
        };
        // A flipped byte in a section.
        let d = fresh("crc");
        let p = d.join("vcpu0.bin");
        let mut b = std::fs::read(&p).unwrap();
        b[0] ^= 1;
        std::fs::write(&p, b).unwrap();
        let e = SnapshotReader::<Info>::open(&d).err().unwrap();
        assert!(
            matches!(e, SnapshotError::Checksum { ref name, .. } if name == "vcpu0"),
            "{e}"
        );
        // A truncated section.
        let d = fresh("trunc");
        let p = d.join("vcpu0.bin");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() - 1]).unwrap();
        let e = SnapshotReader::<Info>::open(&d).err().unwrap();
        assert!(
            matches!(e, SnapshotError::Length { ref name, .. } if name == "vcpu0"),
            "{e}"
        );
        // A newer format.
        let d = fresh("newer");
        let p = d.join(MANIFEST);
        let t = std::fs::read_to_string(&p)
            .unwrap()
            .replace("\"format\": 1", "\"format\": 99");
        std::fs::write(&p, t).unwrap();
        let e = SnapshotReader::<Info>::open(&d).err().unwrap();
        assert!(matches!(e, SnapshotError::Newer { found: 99, .. }), "{e}");
        // A memory file of the wrong size.
        let d = fresh("size");
        File::options()
            .write(true)
            .open(d.join(MEMORY))
            .unwrap()
            .set_len(3 * PAGE as u64)
            .unwrap();
        let e = SnapshotReader::<Info>::open(&d).err().unwrap();
        assert!(matches!(e, SnapshotError::MemorySize { .. }), "{e}");
        // Memory content changed: found by verify_memory.
        let d = fresh("mem");
        File::options()
            .write(true)
            .open(d.join(MEMORY))
            .unwrap()
            .write_all_at(&[1], 0)
            .unwrap();
        let r = SnapshotReader::<Info>::open(&d).unwrap();
        assert!(matches!(
            r.verify_memory(),
            Err(SnapshotError::MemoryChecksum { .. })
        ));
        // A missing manifest, and garbage as a manifest.
        let d = fresh("nomanifest");
        std::fs::remove_file(d.join(MANIFEST)).unwrap();
        assert!(SnapshotReader::<Info>::open(&d).is_err());
        std::fs::write(d.join(MANIFEST), b"\x00garbage").unwrap();
        let e = SnapshotReader::<Info>::open(&d).err().unwrap();
        assert!(matches!(e, SnapshotError::Manifest { .. }), "{e}");
        // A section that decodes as the wrong type.
        let d = fresh("type");
        let r = SnapshotReader::<Info>::open(&d).unwrap();
        assert!(matches!(
            r.section::<Vec<Regs>>("vcpu0"),
            Err(SnapshotError::Decode { .. })
        ));
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_dropped_writer_leaves_nothing() {
        let base = tmp("drop");
        let d = base.join("s");
        {
            let mut w = SnapshotWriter::create(&d).unwrap();
            w.section("a", &1u32).unwrap();
            // dropped: as when writing failed half way
        }
        assert!(!d.exists());
        assert_eq!(
            std::fs::read_dir(&base).unwrap().count(),
            0,
            "no partial left"
        );
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn names_are_checked() {
        let d = tmp("names").join("s");
        let mut w = SnapshotWriter::create(&d).unwrap();
        assert!(matches!(
            w.section("../x", &1u32),
            Err(SnapshotError::BadName(_))
        ));
        assert!(matches!(
            w.section("", &1u32),
            Err(SnapshotError::BadName(_))
        ));
        drop(w);
        let _ = std::fs::remove_dir_all(d.parent().unwrap());
    }
}
