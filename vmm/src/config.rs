//! VM configuration: what the command line asked for, validated.

use std::path::PathBuf;

use thiserror::Error;

pub use crate::devices::serial::SerialOut;
pub use crate::fault::FaultMode;

/// Errors in the configuration, reported before any KVM object is created.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("invalid size {0:?}: expected a number with an optional K, M, G or T suffix (a bare number is MiB), e.g. 512M or 2G")]
    BadSize(String),
    #[error("--mem must be at least {min} MiB (got {got} bytes)")]
    MemTooSmall { min: u64, got: u64 },
    #[error("--mem {0} bytes is not a multiple of the 4 KiB page size")]
    MemNotPageAligned(u64),
    #[error("--mem {got} bytes is more than this VMM supports ({max} bytes)")]
    MemTooLarge { got: u64, max: u64 },
    #[error("--mem-source needs a mode that serves first touches (vcpu, handler, or kernel: a private file mapping), not {0}")]
    SourceNeedsUffd(&'static str),
    #[error("--mem-source must be file:PATH (got {0:?})")]
    BadSource(String),
    #[error("--fault-threads must be between 1 and 64")]
    BadFaultThreads,
    #[error("--fault-around must be between 1 and 512 pages")]
    BadFaultAround,
    #[error("--balloon {target} bytes is more than guest RAM ({mem} bytes)")]
    BalloonTooLarge { target: u64, mem: u64 },
    #[error("--hotplug: {0}")]
    Hotplug(#[from] crate::devices::virtio::mem::RegionError),
    #[error("--hotplug needs a userfaultfd fault mode (vcpu or handler), not {0}: only those enforce that unplugged blocks stay empty")]
    HotplugNeedsUffd(&'static str),
    #[error(
        "--dirty-log ring: this host's KVM is PVM, which writes past the dirty ring (each \
         emulated guest store takes an entry and the vCPU is not stopped in time: entries are \
         overwritten and a vCPU can be left unable to run); use --dirty-log bitmap \
         (--force-dirty-ring to measure it anyway)"
    )]
    DirtyRingOnPvm,
    #[error("invalid dirty log {0:?}: expected bitmap, ring or ring:ENTRIES (a power of two, at least 1024), e.g. ring:4096")]
    BadDirtyLog(String),
    #[error("--mem-hugepages: {0}")]
    HugePages(&'static str),
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {got} is more than this host allows ({max})")]
    TooManyVcpus { got: usize, max: usize },
    #[error("invalid duration {0:?}: a whole number with s, m or h (a bare number is seconds), e.g. 90s or 10m")]
    BadDuration(String),
}

/// Smallest guest RAM accepted: room for boot structures and a test guest.
pub const MIN_MEM_MIB: u64 = 4;
/// Default and largest fault-around window: 512 pages, 2 MiB.
pub const DEFAULT_FAULT_AROUND: u64 = 512;
/// Largest guest RAM accepted (the identity map and layout are built for it).
pub const MAX_MEM_BYTES: u64 = 256 << 30;

/// Parse a memory size: `512M`, `2G`, `1024K`, `4096` (bare numbers are MiB,
/// as in QEMU's `-m`). Suffixes are binary (K = 1024). Accepts an optional
/// trailing `B` or `iB` (`512MiB`).
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError::BadSize(s.to_string());
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        Some(c) if c.is_ascii_digit() => (t, 20),
        _ => return Err(bad()),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1u64 << shift).ok_or_else(bad)
}

/// The SYSCALL assist for stock Linux kernels on PVM hosts
/// (`vcpu::syscall`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum SyscallAssistMode {
    /// On for a Linux kernel on a PVM host unless the kernel completes
    /// SYSCALL itself (its "RSVMM" ELF note).
    #[default]
    Auto,
    /// On for any Linux kernel on a PVM host (never on hardware KVM).
    On,
    Off,
}

/// The image a VM boots.
#[derive(Debug, Clone)]
pub enum Kernel {
    /// A file: a Linux bzImage or ELF vmlinux, or an ELF test guest.
    File(PathBuf),
    /// An image built into the program (the `vmm` binary's default guest).
    Embedded {
        name: &'static str,
        image: &'static [u8],
    },
    /// No image: the VM is restored from this snapshot.
    Snapshot(PathBuf),
    /// No image: the VM comes by a live migration (`vmm run --incoming`).
    Incoming(IncomingOptions),
}

/// Where a live migration comes in, and the key its source must hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IncomingOptions {
    /// `tcp:HOST:PORT` or `unix:PATH`, as given.
    pub addr: String,
    pub key_file: PathBuf,
}

impl From<PathBuf> for Kernel {
    fn from(p: PathBuf) -> Self {
        Kernel::File(p)
    }
}

impl Kernel {
    /// For messages: the path, or what the embedded image is.
    pub fn name(&self) -> String {
        match self {
            Kernel::File(p) => p.display().to_string(),
            Kernel::Embedded { name, .. } => name.to_string(),
            Kernel::Snapshot(p) => format!("the snapshot {}", p.display()),
            Kernel::Incoming(o) => format!("a migration received on {}", o.addr),
        }
    }
}

/// A validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The image to boot.
    pub kernel: Kernel,
    /// Guest RAM in bytes (page aligned).
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Command line handed to the guest.
    pub cmdline: String,
    /// Initramfs for a Linux kernel.
    pub initrd: Option<PathBuf>,
    /// How guest RAM is populated; `None` picks `vcpu` where the host
    /// delivers faulting addresses to the vCPU, `handler` elsewhere.
    pub fault_mode: Option<FaultMode>,
    /// Memory image backing guest RAM (read lazily at first touch).
    pub mem_source: Option<PathBuf>,
    /// Boot RAM on 2 MiB hugetlb pages (`--mem-hugepages`).
    pub mem_hugepages: bool,
    /// Handler threads in `handler` mode.
    pub fault_threads: usize,
    /// Largest adaptive fault-around window, in pages (1 = off).
    pub fault_around: u64,
    /// Serial output destination.
    pub serial: SerialOut,
    /// Serve metrics over HTTP at this address.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Allow a non-loopback metrics address.
    pub metrics_allow_remote: bool,
    /// A virtio-balloon device.
    pub balloon: Option<BalloonOptions>,
    /// Serve the control API on this Unix socket.
    pub api_socket: Option<PathBuf>,
    /// A virtio-mem device.
    pub hotplug: Option<HotplugOptions>,
    /// Testing: every Nth install attempt answers EAGAIN.
    pub inject_eagain_every: Option<u32>,
    /// Keep serving metrics this long after the VM stops (a last scrape).
    pub metrics_linger: std::time::Duration,
    /// The SYSCALL assist (PVM hosts).
    pub syscall_assist: SyscallAssistMode,
    /// seccomp filters of the VM's threads.
    pub seccomp: crate::seccomp::SeccompMode,
    /// Also filter the thread that calls `Vm::run` once the others run
    /// (`vmm run`; not for embedders such as the tests, whose thread goes
    /// on after the VM).
    pub seccomp_caller: bool,
    /// How a restore (`Kernel::Snapshot`) brings the memory back.
    pub restore: RestoreOptions,
    /// How KVM reports the pages the guest writes (migration, diff
    /// snapshots): a bitmap per memslot or a ring per vCPU.
    pub dirty_log: DirtyLog,
}

/// How KVM reports the pages the guest writes (`--dirty-log`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DirtyLog {
    /// `KVM_GET_DIRTY_LOG`: a bitmap per memslot, read and cleared per
    /// round (Cloud Hypervisor, Firecracker).
    #[default]
    Bitmap,
    /// `KVM_CAP_DIRTY_LOG_RING`: a ring of this many entries per vCPU
    /// (QEMU's `dirty-ring-size`); a full ring exits to its vCPU thread.
    /// `force`: also on a host known to write past the ring (PVM), for
    /// measuring it.
    Ring { entries: u32, force: bool },
}

/// Entries per vCPU when `--dirty-log ring` names no size (QEMU's usual
/// 4096: 64 KiB per vCPU).
pub const DEFAULT_RING_ENTRIES: u32 = 4096;

impl std::str::FromStr for DirtyLog {
    type Err = ConfigError;

    /// `bitmap`, `ring` or `ring:ENTRIES`.
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        let bad = || ConfigError::BadDirtyLog(s.to_string());
        if s == "bitmap" {
            return Ok(DirtyLog::Bitmap);
        }
        let (kind, n) = s.split_once(':').unwrap_or((s, ""));
        if kind != "ring" {
            return Err(bad());
        }
        let entries = match n {
            "" => DEFAULT_RING_ENTRIES,
            n => n.parse().map_err(|_| bad())?,
        };
        if !entries.is_power_of_two() || entries < 1024 {
            return Err(bad());
        }
        Ok(DirtyLog::Ring {
            entries,
            force: false,
        })
    }
}

/// How a restored VM's memory comes back (`vmm restore --restore-mode`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RestoreMode {
    /// Nothing is read up front: each first touch is served from the
    /// memory file by the fault engine (vcpu or handler mode).
    #[default]
    Ondemand,
    /// Every page the file holds is read into memory before the guest runs
    /// (Cloud Hypervisor's default).
    Copy,
    /// A `MAP_PRIVATE` mapping of the file: the host's page cache serves
    /// first touches (Firecracker's default; `--fault-mode kernel`).
    MapPrivate,
}

impl RestoreMode {
    pub fn name(self) -> &'static str {
        match self {
            RestoreMode::Ondemand => "ondemand",
            RestoreMode::Copy => "copy",
            RestoreMode::MapPrivate => "map-private",
        }
    }
}

/// What a background thread fills before the guest asks
/// (`vmm restore --prefetch`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Prefetch {
    #[default]
    None,
    /// The pages an earlier restore recorded (`--record-working-set`), in
    /// long sorted runs; the rest on demand.
    WorkingSet,
    /// Every page the memory file holds.
    All,
}

/// `vmm restore`'s memory options.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    pub mode: RestoreMode,
    pub prefetch: Prefetch,
    /// Record the pages the guest touches first, for this long (or until
    /// `PUT /vm/working-set`), into the snapshot's `working-set` file.
    pub record_working_set: Option<std::time::Duration>,
    /// Read the whole memory file once to check its checksum before the
    /// guest runs (a lazy restore otherwise reads only what it serves).
    pub verify_memory: bool,
}

/// `--hotplug SIZE [--hotplug-block SIZE] [--hotplug-requested SIZE]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HotplugOptions {
    /// Region size (a multiple of 128 MiB).
    pub size: u64,
    /// Block size (a power of two from 2 MiB dividing 128 MiB).
    pub block_size: u64,
    /// `requested_size` at boot (whole blocks, at most `size`); the control
    /// API moves it later.
    pub requested: u64,
}

/// `--balloon SIZE` and its companions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonOptions {
    /// Initial target in bytes.
    pub target: u64,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// Guest statistics polling interval in seconds (0: off).
    pub stats_interval_s: u64,
}

impl VmConfig {
    /// A configuration with defaults for everything but the image.
    pub fn new(kernel: impl Into<Kernel>) -> Self {
        Self {
            kernel: kernel.into(),
            mem_size: 512 << 20,
            vcpus: 2,
            cmdline: String::new(),
            initrd: None,
            fault_mode: None,
            mem_source: None,
            mem_hugepages: false,
            fault_threads: 1,
            fault_around: DEFAULT_FAULT_AROUND,
            serial: SerialOut::Stdout,
            metrics_addr: None,
            metrics_allow_remote: false,
            balloon: None,
            api_socket: None,
            hotplug: None,
            inject_eagain_every: None,
            metrics_linger: std::time::Duration::ZERO,
            syscall_assist: SyscallAssistMode::Auto,
            seccomp: crate::seccomp::SeccompMode::Kill,
            seccomp_caller: false,
            restore: RestoreOptions::default(),
            dirty_log: DirtyLog::default(),
        }
    }
}

impl VmConfig {
    /// Check the values that do not need the host; `max_vcpus` is the host's limit.
    pub fn validate(&self, max_vcpus: usize) -> Result<(), ConfigError> {
        validate_mem(self.mem_size)?;
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
        }
        if self.fault_threads == 0 || self.fault_threads > 64 {
            return Err(ConfigError::BadFaultThreads);
        }
        if self.fault_around == 0 || self.fault_around > DEFAULT_FAULT_AROUND {
            return Err(ConfigError::BadFaultAround);
        }
        if let Some(b) = &self.balloon {
            if b.target > self.mem_size {
                return Err(ConfigError::BalloonTooLarge {
                    target: b.target,
                    mem: self.mem_size,
                });
            }
        }
        if let Some(h) = &self.hotplug {
            let region = crate::devices::virtio::mem::MemRegion {
                addr: 0,
                size: h.size,
                block_size: h.block_size,
            };
            region.validate()?;
        }
        if self.mem_hugepages {
            let why = if !self.mem_size.is_multiple_of(2 << 20) {
                Some("--mem must be a multiple of 2M")
            } else if self.mem_source.is_some() {
                Some("not with --mem-source (image pages are read 4 KiB at a time)")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(ConfigError::HugePages(why));
            }
        }
        if self.vcpus > max_vcpus {
            return Err(ConfigError::TooManyVcpus {
                got: self.vcpus,
                max: max_vcpus,
            });
        }
        Ok(())
    }
}

/// Parse a duration: `90s`, `10m`, `1h`, or bare seconds.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, ConfigError> {
    let bad = || ConfigError::BadDuration(s.to_string());
    let t = s.trim();
    let (n, unit) = match t.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: u64 = n.parse().map_err(|_| bad())?;
    let secs = match unit {
        "s" => Some(n),
        "m" => n.checked_mul(60),
        "h" => n.checked_mul(3600),
        _ => None,
    };
    secs.map(std::time::Duration::from_secs).ok_or_else(bad)
}

/// Parse `--mem-source file:PATH`.
pub fn parse_mem_source(s: &str) -> Result<PathBuf, ConfigError> {
    match s.strip_prefix("file:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(ConfigError::BadSource(s.to_string())),
    }
}

/// Check a guest RAM size.
pub fn validate_mem(bytes: u64) -> Result<(), ConfigError> {
    if bytes < (MIN_MEM_MIB << 20) {
        return Err(ConfigError::MemTooSmall {
            min: MIN_MEM_MIB,
            got: bytes,
        });
    }
    if !bytes.is_multiple_of(4096) {
        return Err(ConfigError::MemNotPageAligned(bytes));
    }
    if bytes > MAX_MEM_BYTES {
        return Err(ConfigError::MemTooLarge {
            got: bytes,
            max: MAX_MEM_BYTES,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert_eq!(parse_size("64").unwrap(), 64 << 20);
        assert_eq!(parse_size("4096K").unwrap(), 4 << 20);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("1GB").unwrap(), 1 << 30);
        for bad in [
            "",
            "M",
            "12X",
            "-1M",
            "1.5G",
            "abc",
            "99999999999999999999T",
            "1 G",
        ] {
            assert!(parse_size(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("90s").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("10m").unwrap().as_secs(), 600);
        assert_eq!(parse_duration("2h").unwrap().as_secs(), 7200);
        for bad in ["", "s", "1d", "-1s", "1.5m", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn mem_limits() {
        assert!(validate_mem(0).is_err());
        assert!(validate_mem(1 << 20).is_err());
        assert!(validate_mem((64 << 20) + 1).is_err());
        assert!(validate_mem(64 << 20).is_ok());
        assert!(validate_mem(1 << 50).is_err());
    }
}
