//! Initial register state of a vCPU started in 64-bit long mode.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use thiserror::Error;

use super::gdt::{segment, BOOT_GDT, CODE_SELECTOR, DATA_SELECTOR, TSS_SELECTOR};
use super::layout::{GDT_ADDR, IDT_ADDR, PML4_ADDR};

#[derive(Debug, Error)]
pub enum RegsError {
    #[error("{what} failed: {source}")]
    Ioctl {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM_SET_MSRS set {set} of {wanted} MSRs")]
    Msrs { set: usize, wanted: usize },
}

fn ioctl<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, RegsError> {
    r.map_err(|source| RegsError::Ioctl { what, source })
}

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Segments, descriptor tables, control registers and EFER for long mode.
pub fn setup_sregs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut s: kvm_sregs = ioctl("KVM_GET_SREGS", vcpu.get_sregs())?;
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (std::mem::size_of_val(&BOOT_GDT) - 1) as u16;
    s.idt.base = IDT_ADDR;
    s.idt.limit = 0;
    s.cs = segment(CODE_SELECTOR);
    let data = segment(DATA_SELECTOR);
    s.ds = data;
    s.es = data;
    s.fs = data;
    s.gs = data;
    s.ss = data;
    s.tr = segment(TSS_SELECTOR);
    s.cr3 = PML4_ADDR;
    s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    s.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    s.efer = EFER_LME | EFER_LMA;
    ioctl("KVM_SET_SREGS", vcpu.set_sregs(&s))
}

/// General registers: entry point, flags, and up to four argument registers
/// (RDI, RSI, RDX, RCX as in the SysV ABI; Linux takes boot_params in RSI).
pub fn setup_regs(vcpu: &VcpuFd, rip: u64, args: [u64; 4]) -> Result<(), RegsError> {
    let regs = kvm_regs {
        rip,
        rflags: 0x2,
        rdi: args[0],
        rsi: args[1],
        rdx: args[2],
        rcx: args[3],
        ..Default::default()
    };
    ioctl("KVM_SET_REGS", vcpu.set_regs(&regs))
}

/// x87 control word and MXCSR at their reset values.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    ioctl("KVM_SET_FPU", vcpu.set_fpu(&fpu))
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WB: u64 = 6;

/// Boot MSRs: syscall/sysenter state cleared, fast strings on, write-back
/// default memory type.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let entries = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WB),
    ]
    .map(|(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    });
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        wanted: entries.len(),
    })?;
    let set = ioctl("KVM_SET_MSRS", vcpu.set_msrs(&msrs))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            wanted: entries.len(),
        });
    }
    Ok(())
}

/// Mark a vCPU runnable (skipping the INIT/SIPI wait of application processors).
pub fn make_runnable(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let state = kvm_bindings::kvm_mp_state {
        mp_state: kvm_bindings::KVM_MP_STATE_RUNNABLE,
    };
    ioctl("KVM_SET_MP_STATE", vcpu.set_mp_state(state))
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// LINT0 as ExtINT (the PIC's output), LINT1 as NMI, as a PC's BIOS leaves them.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let mut l = ioctl("KVM_GET_LAPIC", vcpu.get_lapic())?;
    for (reg, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let v = read_lapic_reg(&l.regs, reg);
        write_lapic_reg(&mut l.regs, reg, (v & !0x700) | (mode << 8));
    }
    ioctl("KVM_SET_LAPIC", vcpu.set_lapic(&l))
}

fn read_lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    u32::from_le_bytes([0, 1, 2, 3].map(|i| regs[off + i] as u8))
}

fn write_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().into_iter().enumerate() {
        regs[off + i] = b as std::os::raw::c_char;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_reg_roundtrip() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        write_lapic_reg(&mut regs, APIC_LVT0, 0xdead_beef);
        assert_eq!(read_lapic_reg(&regs, APIC_LVT0), 0xdead_beef);
        assert_eq!(read_lapic_reg(&regs, APIC_LVT1), 0);
    }
}
