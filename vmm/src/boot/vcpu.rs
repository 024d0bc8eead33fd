//! Putting a vCPU in its boot state: CPUID, MSRs, long-mode segments and
//! control registers, FPU, entry registers, LAPIC, and whether it runs at
//! once or waits for INIT/SIPI.

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;

use super::{Boot, BootKind};
use crate::arch::x86_64::{cpuid, regs};
use crate::host::KvmFlavor;

pub use regs::RegsError;

/// What every vCPU's boot state depends on.
pub struct VcpuBoot<'a> {
    pub boot: &'a Boot,
    /// `KVM_GET_SUPPORTED_CPUID`, normalised per vCPU here.
    pub cpuid: &'a CpuId,
    pub flavor: KvmFlavor,
    pub vcpus: usize,
    pub mem_size: u64,
    /// Guest-physical address of a test guest's command line.
    pub cmdline_addr: u64,
}

/// Configure vCPU `index`.
/// Set a new vCPU up for the boot; the CPUID it was given.
pub fn configure(fd: &VcpuFd, index: usize, b: &VcpuBoot) -> Result<CpuId, RegsError> {
    let mut c = b.cpuid.clone();
    cpuid::normalize(
        &mut c,
        index,
        b.vcpus,
        cpuid::CpuidPolicy { flavor: b.flavor },
    );
    fd.set_cpuid2(&c).map_err(|source| RegsError::Ioctl {
        what: "KVM_SET_CPUID2",
        source,
    })?;
    let args = match b.boot.kind {
        // Test guest ABI: RDI vCPU index, RSI count, RDX RAM size, RCX the
        // command line.
        BootKind::TestGuest => [index as u64, b.vcpus as u64, b.mem_size, b.cmdline_addr],
        // Linux's 64-bit entry takes boot_params in RSI.
        BootKind::Linux => [0, b.boot.zero_page, 0, 0],
    };
    regs::setup_msrs(fd)?;
    regs::setup_sregs(fd)?;
    regs::setup_fpu(fd)?;
    regs::setup_regs(fd, b.boot.entry, args)?;
    regs::setup_lapic(fd)?;
    // With the in-kernel LAPIC, vCPUs other than 0 start in UNINITIALIZED,
    // waiting for INIT/SIPI: right for Linux, which starts them itself. Test
    // guests start every vCPU at the entry point, as KVM's selftests do.
    if b.boot.kind == BootKind::TestGuest || index == 0 {
        regs::make_runnable(fd)?;
    }
    Ok(c)
}
