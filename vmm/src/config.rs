//! VM configuration: what the command line asked for, validated.

use std::path::PathBuf;

use thiserror::Error;

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
    #[error("--vcpus must be at least 1")]
    NoVcpus,
    #[error("--vcpus {got} is more than this host allows ({max})")]
    TooManyVcpus { got: usize, max: usize },
}

/// Smallest guest RAM accepted: room for boot structures and a test guest.
pub const MIN_MEM_MIB: u64 = 4;
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

/// How guest RAM is populated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultMode {
    /// The host kernel fills anonymous memory on first touch (no VMM involvement).
    #[default]
    Kernel,
}

/// A validated VM configuration.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// ELF image to boot; `None` runs the embedded default guest.
    pub kernel: Option<PathBuf>,
    /// Guest RAM in bytes (page aligned).
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: usize,
    /// Command line handed to the guest.
    pub cmdline: String,
    /// How guest RAM is populated.
    pub fault_mode: FaultMode,
}

impl VmConfig {
    /// Check the values that do not need the host; `max_vcpus` is the host's limit.
    pub fn validate(&self, max_vcpus: usize) -> Result<(), ConfigError> {
        validate_mem(self.mem_size)?;
        if self.vcpus == 0 {
            return Err(ConfigError::NoVcpus);
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
    fn mem_limits() {
        assert!(validate_mem(0).is_err());
        assert!(validate_mem(1 << 20).is_err());
        assert!(validate_mem((64 << 20) + 1).is_err());
        assert!(validate_mem(64 << 20).is_ok());
        assert!(validate_mem(1 << 50).is_err());
    }
}
