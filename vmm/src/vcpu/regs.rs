//! The vCPU state exit handling reads and writes: the real vCPU fd, or a
//! fake in unit tests.

use kvm_bindings::{
    kvm_guest_debug, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs, KVM_GUESTDBG_ENABLE,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP,
};
use kvm_ioctls::VcpuFd;

/// What `KVM_SET_GUEST_DEBUG` arms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestDebug {
    Off,
    /// An instruction breakpoint (DR0) at this guest-virtual address.
    Breakpoint(u64),
    /// Exit after the next instruction.
    SingleStep,
}

/// DR7: local enable of DR0, execute, length 1 (bits 16-19 zero); bit 10
/// reads as one.
const DR7_L0_EXEC: u64 = 0x401;
const DR7_RESERVED_ONE: u64 = 0x400;

fn unsupported() -> kvm_ioctls::Error {
    kvm_ioctls::Error::new(libc::ENOSYS)
}

/// Register access and event injection, as exit handling uses them.
pub trait VcpuState {
    fn regs(&self) -> Result<kvm_regs, kvm_ioctls::Error>;
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error>;
    fn sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error>;
    /// `KVM_TRANSLATE`: the guest-physical address of `gva`, if mapped.
    fn translate(&self, gva: u64) -> Option<u64>;
    /// Inject exception `vector` (no error code) before the next entry.
    fn inject_exception(&self, vector: u8) -> Result<(), kvm_ioctls::Error>;

    // Used by the SYSCALL assist only; fakes that do not need them fail.
    fn set_sregs(&self, _sregs: &kvm_sregs) -> Result<(), kvm_ioctls::Error> {
        Err(unsupported())
    }
    fn msr(&self, _index: u32) -> Result<u64, kvm_ioctls::Error> {
        Err(unsupported())
    }
    fn set_msr(&self, _index: u32, _value: u64) -> Result<(), kvm_ioctls::Error> {
        Err(unsupported())
    }
    fn set_debug(&self, _debug: GuestDebug) -> Result<(), kvm_ioctls::Error> {
        Err(unsupported())
    }

    /// Where the vCPU is (RIP, CPL), for reports; all ones when unknown.
    fn position(&self) -> (u64, u8) {
        let rip = self.regs().map(|r| r.rip).unwrap_or(u64::MAX);
        let cpl = self.sregs().map(|s| s.cs.dpl).unwrap_or(0xff);
        (rip, cpl)
    }
}

impl VcpuState for VcpuFd {
    fn regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
        self.get_regs()
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
        VcpuFd::set_regs(self, regs)
    }
    fn sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
        self.get_sregs()
    }
    fn translate(&self, gva: u64) -> Option<u64> {
        self.translate_gva(gva)
            .ok()
            .filter(|t| t.valid != 0)
            .map(|t| t.physical_address)
    }
    fn set_sregs(&self, sregs: &kvm_sregs) -> Result<(), kvm_ioctls::Error> {
        VcpuFd::set_sregs(self, sregs)
    }
    fn msr(&self, index: u32) -> Result<u64, kvm_ioctls::Error> {
        let mut m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
        match self.get_msrs(&mut m)? {
            1 => Ok(m.as_slice()[0].data),
            _ => Err(kvm_ioctls::Error::new(libc::EINVAL)),
        }
    }
    fn set_msr(&self, index: u32, data: u64) -> Result<(), kvm_ioctls::Error> {
        let m = Msrs::from_entries(&[kvm_msr_entry {
            index,
            data,
            ..Default::default()
        }])
        .map_err(|_| kvm_ioctls::Error::new(libc::ENOMEM))?;
        match self.set_msrs(&m)? {
            1 => Ok(()),
            _ => Err(kvm_ioctls::Error::new(libc::EINVAL)),
        }
    }
    fn set_debug(&self, debug: GuestDebug) -> Result<(), kvm_ioctls::Error> {
        let mut d = kvm_guest_debug::default();
        match debug {
            GuestDebug::Off => {}
            GuestDebug::Breakpoint(addr) => {
                d.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP;
                d.arch.debugreg[0] = addr;
                d.arch.debugreg[7] = DR7_L0_EXEC;
            }
            GuestDebug::SingleStep => {
                d.control = KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP;
                d.arch.debugreg[7] = DR7_RESERVED_ONE;
            }
        }
        self.set_guest_debug(&d)
    }
    fn inject_exception(&self, vector: u8) -> Result<(), kvm_ioctls::Error> {
        let mut ev = self.get_vcpu_events()?;
        ev.exception.injected = 1;
        ev.exception.nr = vector;
        ev.exception.has_error_code = 0;
        ev.flags = 0;
        self.set_vcpu_events(&ev)
    }
}
