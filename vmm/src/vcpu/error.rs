//! Why a vCPU stopped the VM.

use thiserror::Error;

use super::exit::hex;
use super::syscall::SyscallAssistError;
use crate::fault::FaultError;

/// A vCPU failure, with where the vCPU was (RIP, CPL) when it is known.
#[derive(Debug, Error)]
pub enum VcpuError {
    #[error(
        "vCPU {vcpu}: KVM_EXIT_INTERNAL_ERROR suberror 1 at RIP {rip:#x} (CPL {cpl}): the host could not emulate the instruction{}",
        insn.as_ref().map(|b| format!(", instruction bytes {}", hex(b))).unwrap_or_default()
    )]
    Emulation {
        vcpu: usize,
        rip: u64,
        cpl: u8,
        insn: Option<Vec<u8>>,
    },
    #[error("vCPU {vcpu}: KVM_EXIT_INTERNAL_ERROR suberror {suberror} at RIP {rip:#x} (CPL {cpl}), data {data:x?}")]
    Internal {
        vcpu: usize,
        suberror: u32,
        rip: u64,
        cpl: u8,
        data: Vec<u64>,
    },
    #[error("vCPU {vcpu}: guest access to GPA {gpa:#x} at RIP {rip:#x}: {error}")]
    Fault {
        vcpu: usize,
        gpa: u64,
        rip: u64,
        error: FaultError,
    },
    #[error(
        "vCPU {vcpu}: KVM_RUN returned EFAULT without the faulting address at RIP {rip:#x} (CPL {cpl}): \
         this host does not report missing pages to the vCPU here; use --fault-mode handler"
    )]
    EfaultWithoutAddress { vcpu: usize, rip: u64, cpl: u8 },
    #[error("vCPU {vcpu}: its dirty ring is full and could not be harvested: {error}")]
    DirtyRing { vcpu: usize, error: String },
    #[error("vCPU {vcpu}: KVM_RUN failed at RIP {rip:#x} (CPL {cpl}): {}", std::io::Error::from_raw_os_error(*.errno))]
    Run {
        vcpu: usize,
        rip: u64,
        cpl: u8,
        errno: i32,
    },
    #[error("vCPU {vcpu}: KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x} on host CPU {cpu}")]
    FailEntry { vcpu: usize, reason: u64, cpu: u32 },
    #[error("vCPU {vcpu}: unsupported system event {kind}")]
    SystemEvent { vcpu: usize, kind: u32 },
    #[error("vCPU {vcpu}: unhandled exit {what} at RIP {rip:#x}")]
    Unhandled { vcpu: usize, what: String, rip: u64 },
    #[error("vCPU {vcpu}: the SYSCALL assist failed: {error}")]
    Assist {
        vcpu: usize,
        error: SyscallAssistError,
    },
}
