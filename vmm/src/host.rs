//! What KVM this host has. PVM (`kvm_pvm`) emulates guest supervisor code and
//! needs assists that hardware KVM does not (docs/ARCHITECTURE.md, "PVM
//! hosts").

use std::fmt;
use std::path::Path;

use kvm_ioctls::{Cap, Kvm};
use thiserror::Error;

use crate::fault::FaultMode;

#[derive(Debug, Error)]
pub enum HostError {
    #[error("/dev/kvm does not exist: this host has no KVM (load kvm_intel, kvm_amd or kvm_pvm)")]
    NoKvm,
    #[error("/dev/kvm is not accessible: permission denied (run as root or join the kvm group)")]
    KvmPermission,
    #[error("cannot open /dev/kvm: {0}")]
    KvmOpen(std::io::Error),
    #[error("KVM API version {0} is not supported (need 12)")]
    ApiVersion(i32),
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
}

/// The kind of KVM module serving /dev/kvm.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmFlavor {
    /// Hardware virtualization (VMX or SVM).
    Hardware,
    /// PVM: paging-based virtualization without hardware support; guest CPL0
    /// code is run by the host's instruction emulator.
    Pvm,
    /// Something else (module not identified).
    Unknown,
}

impl fmt::Display for KvmFlavor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KvmFlavor::Hardware => "hardware KVM",
            KvmFlavor::Pvm => "PVM (kvm_pvm: guest supervisor code is emulated)",
            KvmFlavor::Unknown => "unidentified KVM module",
        })
    }
}

impl KvmFlavor {
    /// A short name (what a snapshot records).
    pub fn tag(self) -> &'static str {
        match self {
            KvmFlavor::Hardware => "hardware",
            KvmFlavor::Pvm => "pvm",
            KvmFlavor::Unknown => "unknown",
        }
    }

    /// The fault mode when none is asked for: `vcpu` where the host delivers
    /// a missing page's address to the faulting vCPU (PVM: an MMIO exit at
    /// the GPA, or an emulation failure on a fetch), `handler` elsewhere
    /// (hardware KVM returns a bare EFAULT until exit-on-missing is merged).
    pub fn default_fault_mode(self) -> FaultMode {
        match self {
            KvmFlavor::Pvm => FaultMode::Vcpu,
            other => {
                log::info!(
                    "fault mode: handler ({other} returns a bare EFAULT for missing pages, so the vCPU cannot learn the address)"
                );
                FaultMode::Handler
            }
        }
    }
}

/// Identify the KVM module from sysfs.
pub fn detect_flavor() -> KvmFlavor {
    detect_flavor_in(Path::new("/sys/module"))
}

fn detect_flavor_in(sys_module: &Path) -> KvmFlavor {
    if sys_module.join("kvm_pvm").exists() {
        KvmFlavor::Pvm
    } else if sys_module.join("kvm_intel").exists() || sys_module.join("kvm_amd").exists() {
        KvmFlavor::Hardware
    } else {
        KvmFlavor::Unknown
    }
}

/// An opened /dev/kvm with what we learned about it.
pub struct Host {
    pub kvm: Kvm,
    pub flavor: KvmFlavor,
    pub max_vcpus: usize,
    pub max_memslots: usize,
}

/// Capabilities without which no VM can be built.
const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
];

impl Host {
    /// Open /dev/kvm (or `$VMM_KVM_DEV`, for tests of the error paths).
    pub fn open() -> Result<Host, HostError> {
        let path = std::env::var("VMM_KVM_DEV").unwrap_or_else(|_| "/dev/kvm".to_string());
        let kvm = Kvm::new_with_path(std::ffi::CString::new(path.clone()).unwrap_or_default())
            .map_err(|e| match e.errno() {
                libc::ENOENT => HostError::NoKvm,
                libc::EACCES | libc::EPERM => HostError::KvmPermission,
                _ => HostError::KvmOpen(std::io::Error::from_raw_os_error(e.errno())),
            })?;
        let api = kvm.get_api_version();
        if api != 12 {
            return Err(HostError::ApiVersion(api));
        }
        for (cap, name) in REQUIRED_CAPS {
            if !kvm.check_extension(*cap) {
                return Err(HostError::MissingCap(name));
            }
        }
        let max_vcpus = kvm.get_max_vcpus();
        let max_memslots = kvm.get_nr_memslots();
        let flavor = detect_flavor();
        Ok(Host {
            kvm,
            flavor,
            max_vcpus,
            max_memslots,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavor_from_sysfs_layout() {
        let d = std::env::temp_dir().join(format!("vmm-flavor-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(detect_flavor_in(&d), KvmFlavor::Unknown);
        std::fs::create_dir(d.join("kvm_intel")).unwrap();
        assert_eq!(detect_flavor_in(&d), KvmFlavor::Hardware);
        std::fs::create_dir(d.join("kvm_pvm")).unwrap();
        assert_eq!(detect_flavor_in(&d), KvmFlavor::Pvm);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
