//! The vCPU state exit handling reads and writes: the real vCPU fd, or a
//! fake in unit tests.

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;

/// Register access and event injection, as exit handling uses them.
pub trait VcpuState {
    fn regs(&self) -> Result<kvm_regs, kvm_ioctls::Error>;
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), kvm_ioctls::Error>;
    fn sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error>;
    /// `KVM_TRANSLATE`: the guest-physical address of `gva`, if mapped.
    fn translate(&self, gva: u64) -> Option<u64>;
    /// Inject exception `vector` (no error code) before the next entry.
    fn inject_exception(&self, vector: u8) -> Result<(), kvm_ioctls::Error>;

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
    fn inject_exception(&self, vector: u8) -> Result<(), kvm_ioctls::Error> {
        let mut ev = self.get_vcpu_events()?;
        ev.exception.injected = 1;
        ev.exception.nr = vector;
        ev.exception.has_error_code = 0;
        ev.flags = 0;
        self.set_vcpu_events(&ev)
    }
}
