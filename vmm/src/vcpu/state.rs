//! A vCPU's architectural state, as a snapshot saves it and a restore
//! puts it back: every `KVM_GET_*` a vCPU has, in an order `KVM_SET_*`
//! accepts. Each failing ioctl is named in the error: a host that refuses
//! part of the state (PVM, say) says which part.
//!
//! Measured on this project's PVM host (`kvm_pvm`): every ioctl below works
//! for get and set; `KVM_GET_MSR_INDEX_LIST` gives 40 MSRs, all of which
//! the vCPU reads and writes back.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StateError {
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_GET_MSRS read {read} of {asked} MSRs: MSR {refused:#x} was refused")]
    Msrs {
        read: usize,
        asked: usize,
        refused: u32,
    },
    #[error("KVM_SET_MSRS wrote {written} of {asked} MSRs: MSR {refused:#x} was refused")]
    SetMsrs {
        written: usize,
        asked: usize,
        refused: u32,
    },
    #[error("{0} MSRs: more than KVM takes at once")]
    TooManyMsrs(usize),
    #[error("{0} CPUID entries: more than KVM takes")]
    TooManyCpuidEntries(usize),
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, StateError> {
    r.map_err(|source| StateError::Ioctl { what, source })
}

/// One CPUID entry as a snapshot records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuidEntry {
    pub function: u32,
    pub index: u32,
    pub flags: u32,
    pub eax: u32,
    pub ebx: u32,
    pub ecx: u32,
    pub edx: u32,
}

/// The CPUID a vCPU was given (set again, as it was, on restore).
pub fn cpuid_entries(c: &CpuId) -> Vec<CpuidEntry> {
    c.as_slice()
        .iter()
        .map(|e| CpuidEntry {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
        })
        .collect()
}

/// [`cpuid_entries`] back into what `KVM_SET_CPUID2` takes.
pub fn cpuid_of(entries: &[CpuidEntry]) -> Result<CpuId, StateError> {
    let list: Vec<kvm_bindings::kvm_cpuid_entry2> = entries
        .iter()
        .map(|e| kvm_bindings::kvm_cpuid_entry2 {
            function: e.function,
            index: e.index,
            flags: e.flags,
            eax: e.eax,
            ebx: e.ebx,
            ecx: e.ecx,
            edx: e.edx,
            ..Default::default()
        })
        .collect();
    CpuId::from_entries(&list).map_err(|_| StateError::TooManyCpuidEntries(entries.len()))
}

/// Everything a vCPU is, in the order it is set back.
#[derive(Serialize, Deserialize)]
pub struct VcpuSnapshot {
    pub cpuid: Vec<CpuidEntry>,
    pub tsc_khz: Option<u32>,
    pub msrs: Vec<kvm_msr_entry>,
    pub sregs: kvm_sregs,
    pub regs: kvm_regs,
    /// The FPU, SSE and AVX state (XSAVE format; its legacy region is what
    /// `KVM_GET_FPU` gives).
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
    /// The SYSCALL assist's breakpoint (PVM hosts, stock kernels): the
    /// guest's #PF handler it was armed on, re-armed on restore.
    pub syscall_assist: Option<u64>,
}

impl std::fmt::Debug for VcpuSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuSnapshot")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .field("mp_state", &self.mp_state.mp_state)
            .finish()
    }
}

impl VcpuSnapshot {
    /// Read the state of a vCPU that is not running (its thread parked).
    /// `msr_list` is the host's `KVM_GET_MSR_INDEX_LIST`.
    pub fn save(fd: &VcpuFd, cpuid: &CpuId, msr_list: &[u32]) -> Result<Self, StateError> {
        // Events and MP state first (as QEMU and Firecracker do): reading
        // them settles pending state the other reads should see.
        let mp_state = kvm("KVM_GET_MP_STATE", fd.get_mp_state())?;
        let events = kvm("KVM_GET_VCPU_EVENTS", fd.get_vcpu_events())?;
        let regs = kvm("KVM_GET_REGS", fd.get_regs())?;
        let sregs = kvm("KVM_GET_SREGS", fd.get_sregs())?;
        let xsave = kvm("KVM_GET_XSAVE", fd.get_xsave())?;
        let xcrs = kvm("KVM_GET_XCRS", fd.get_xcrs())?;
        let lapic = kvm("KVM_GET_LAPIC", fd.get_lapic())?;
        let debugregs = kvm("KVM_GET_DEBUGREGS", fd.get_debug_regs())?;
        let tsc_khz = fd.get_tsc_khz().ok();
        let msrs = save_msrs(fd, msr_list)?;
        Ok(Self {
            cpuid: cpuid_entries(cpuid),
            tsc_khz,
            msrs,
            sregs,
            regs,
            xsave,
            xcrs,
            lapic,
            events,
            mp_state,
            debugregs,
            syscall_assist: None,
        })
    }

    /// Put the state back into a new vCPU (created, nothing else done).
    pub fn restore(&self, fd: &VcpuFd) -> Result<(), StateError> {
        kvm("KVM_SET_CPUID2", fd.set_cpuid2(&cpuid_of(&self.cpuid)?))?;
        if let Some(khz) = self.tsc_khz {
            // A host that cannot scale TSC keeps its own rate; the guest's
            // clock still continues from the saved TSC and kvmclock.
            if let Err(e) = fd.set_tsc_khz(khz) {
                log::warn!(
                    "KVM_SET_TSC_KHZ({khz}) failed: {e}; the guest's TSC runs at the host's rate"
                );
            }
        }
        kvm("KVM_SET_SREGS", fd.set_sregs(&self.sregs))?;
        kvm("KVM_SET_REGS", fd.set_regs(&self.regs))?;
        kvm("KVM_SET_XSAVE", {
            // SAFETY: the buffer is a kvm_xsave read from KVM_GET_XSAVE on
            // a vCPU of the same CPUID; KVM checks its header.
            unsafe { fd.set_xsave(&self.xsave) }
        })?;
        kvm("KVM_SET_XCRS", fd.set_xcrs(&self.xcrs))?;
        // The LAPIC before the MSRs: a TSC-deadline MSR is dropped unless
        // the LAPIC timer is in TSC-deadline mode already (QEMU and
        // Firecracker order it so too).
        kvm("KVM_SET_LAPIC", fd.set_lapic(&self.lapic))?;
        restore_msrs(fd, &self.msrs)?;
        kvm("KVM_SET_DEBUGREGS", fd.set_debug_regs(&self.debugregs))?;
        kvm("KVM_SET_VCPU_EVENTS", fd.set_vcpu_events(&self.events))?;
        kvm("KVM_SET_MP_STATE", fd.set_mp_state(self.mp_state))?;
        Ok(())
    }
}

fn save_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>, StateError> {
    let entries: Vec<kvm_msr_entry> = list
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| StateError::TooManyMsrs(list.len()))?;
    let read = kvm("KVM_GET_MSRS", fd.get_msrs(&mut msrs))?;
    if read != list.len() {
        return Err(StateError::Msrs {
            read,
            asked: list.len(),
            refused: list[read],
        });
    }
    Ok(msrs.as_slice().to_vec())
}

fn restore_msrs(fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), StateError> {
    let msrs = Msrs::from_entries(entries).map_err(|_| StateError::TooManyMsrs(entries.len()))?;
    let written = kvm("KVM_SET_MSRS", fd.set_msrs(&msrs))?;
    if written != entries.len() {
        return Err(StateError::SetMsrs {
            written,
            asked: entries.len(),
            refused: entries[written].index,
        });
    }
    Ok(())
}
