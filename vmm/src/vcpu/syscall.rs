//! The SYSCALL assist: system calls of a stock Linux kernel on a PVM host.
//!
//! On PVM hosts (`kvm_pvm`) `syscall` from guest user mode loads RIP =
//! LSTAR, RCX, R11 and the SFMASK-masked RFLAGS but leaves CS/SS, and so the
//! privilege level, at user mode. The fetch at LSTAR (a supervisor page) then
//! raises a guest #PF from user mode with CR2 == RIP == LSTAR, and nothing
//! exits to the VMM: the kernel sees a user fault on its own entry point and
//! kills the process. The first system call of `/init` ends the boot.
//!
//! The assist finishes those SYSCALLs for the guest:
//! - the MSR filter sends each guest write of LSTAR to the VMM
//!   ([`SyscallAssist::on_lstar_write`]); the VMM performs it and arms a
//!   hardware breakpoint (`KVM_SET_GUEST_DEBUG`, DR0) on the guest's #PF
//!   handler, read from the IDT gate 14. Each vCPU does this for itself when
//!   its own LSTAR is written (every CPU's `syscall_init`).
//! - at each breakpoint hit ([`SyscallAssist::on_debug`]) the exception
//!   frame on the kernel stack tells a half-done SYSCALL (frame RIP == CR2 ==
//!   LSTAR, user CS, RFLAGS.IF clear: user mode cannot clear IF, SFMASK does)
//!   from an ordinary #PF. The former is entered at LSTAR as SYSCALL would
//!   have: CS from STAR[47:32] at CPL 0, SS = CS + 8, the user RSP and the
//!   masked RFLAGS from the frame; RCX and R11 are already right. The frame
//!   the CPU pushed is abandoned (it lies below TSS.RSP0, unused).
//! - an ordinary #PF must run the handler without hitting the breakpoint
//!   again. Linux's handler starts with instructions that touch nothing but
//!   RIP and two flags (`endbr64`, the NOPs of an unpatched `clac`, `cld`):
//!   the assist performs those and resumes past them, one exit per guest
//!   #PF ([`prologue`]). Otherwise it resumes at the handler with RFLAGS.RF,
//!   which suppresses an instruction breakpoint for one instruction; a host
//!   that ignores RF (measured: PVM does; the same fault hits the breakpoint
//!   twice in a row) is detected, and the assist then steps one instruction
//!   with the breakpoint off and re-arms it (two exits per #PF).
//!
//! A user jump to LSTAR (RFLAGS.IF set) is left to the kernel as the fault
//! it is. The IDT is re-read whenever the breakpoint fires somewhere else
//! than where it was put. Nothing here is armed on hardware KVM, where
//! SYSCALL works (`vm.rs` decides), nor for a kernel that completes the
//! SYSCALL itself (the micro kernel's patch, its "RSVMM" ELF note).

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::regs::{GuestDebug, VcpuState};
use super::GuestView as GuestMemory;
use crate::config::SyscallAssistMode;
use crate::fault::stats::{AssistKind, FaultStats};
use crate::host::KvmFlavor;

pub const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
const PF_VECTOR: u64 = 14;
const IDT_GATE_SIZE: u64 = 16;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_DF: u64 = 1 << 10;
const RFLAGS_AC: u64 = 1 << 18;
const RFLAGS_RF: u64 = 1 << 16;
/// Bytes of the handler read for [`prologue`].
const PROLOGUE_BYTES: usize = 16;
/// Code and data segment types (accessed, read/write).
const SEG_TYPE_CODE: u8 = 0xb;
const SEG_TYPE_DATA: u8 = 0x3;

#[derive(Debug, Error)]
pub enum SyscallAssistError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("the exception frame at guest RSP {rsp:#x} is not readable")]
    Frame { rsp: u64 },
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, SyscallAssistError> {
    r.map_err(|source| SyscallAssistError::Kvm { what, source })
}

/// Whether this VM gets the assist (logged either way on a PVM host):
/// `linux`, the image is a Linux kernel; `completes_syscall`, it finishes a
/// half-done SYSCALL itself (its "RSVMM" note).
pub fn wanted(
    mode: SyscallAssistMode,
    flavor: KvmFlavor,
    linux: bool,
    completes_syscall: bool,
) -> bool {
    if !linux || mode == SyscallAssistMode::Off {
        return false;
    }
    if flavor != KvmFlavor::Pvm {
        if mode == SyscallAssistMode::On {
            log::info!("SYSCALL assist not armed: {flavor} runs guest SYSCALL itself");
        }
        return false;
    }
    if mode == SyscallAssistMode::Auto && completes_syscall {
        log::info!("SYSCALL assist not armed: the kernel completes SYSCALL itself (RSVMM note)");
        return false;
    }
    log::info!("SYSCALL assist on (PVM host): each vCPU arms it when its guest writes LSTAR");
    true
}

/// Send guest writes of LSTAR to the VMM (`KVM_CAP_X86_USER_SPACE_MSR` with
/// filter exits, and a filter denying that one write; every other MSR
/// access stays with KVM).
pub fn filter_lstar_writes(vm: &kvm_ioctls::VmFd) -> Result<(), SyscallAssistError> {
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_X86_USER_SPACE_MSR,
        args: [u64::from(kvm_bindings::KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
        ..Default::default()
    };
    kvm(
        "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR)",
        vm.enable_cap(&cap),
    )?;
    let deny = [0u8];
    kvm(
        "KVM_X86_SET_MSR_FILTER",
        vm.set_msr_filter(
            kvm_ioctls::MsrFilterDefaultAction::ALLOW,
            &[kvm_ioctls::MsrFilterRange {
                flags: kvm_ioctls::MsrFilterRangeFlags::WRITE,
                base: MSR_LSTAR,
                msr_count: 1,
                bitmap: &deny,
            }],
        ),
    )
}

/// The frame the CPU pushes for a #PF from user mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PfFrame {
    pub error_code: u64,
    pub rip: u64,
    pub cs: u64,
    pub rflags: u64,
    pub rsp: u64,
    pub ss: u64,
}

/// Is this #PF a SYSCALL the host left half done?
pub fn is_half_done_syscall(lstar: u64, cr2: u64, f: &PfFrame) -> bool {
    lstar != 0 && cr2 == lstar && f.rip == lstar && f.cs & 3 == 3 && f.rflags & RFLAGS_IF == 0
}

/// The vCPU state SYSCALL would have produced: CPL 0 at LSTAR with the
/// kernel's flat code and stack segments, the user RSP, the masked RFLAGS.
pub fn enter_syscall(
    regs: &mut kvm_regs,
    sregs: &mut kvm_sregs,
    kernel_cs: u16,
    lstar: u64,
    f: &PfFrame,
) {
    let flat = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 0,
        db,
        s: 1,
        l,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    sregs.cs = flat(kernel_cs, SEG_TYPE_CODE, 1, 0);
    sregs.ss = flat(kernel_cs + 8, SEG_TYPE_DATA, 0, 1);
    regs.rsp = f.rsp;
    regs.rflags = f.rflags;
    regs.rip = lstar;
}

/// Read `buf.len()` bytes at guest-virtual `gva` (page by page).
fn read_virt(vcpu: &dyn VcpuState, mem: &GuestMemory, gva: u64, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        let at = gva.wrapping_add(done as u64);
        let n = ((0x1000 - (at & 0xfff)) as usize).min(buf.len() - done);
        let Some(gpa) = vcpu.translate(at) else {
            return false;
        };
        if mem
            .read_slice(&mut buf[done..done + n], GuestAddress(gpa))
            .is_err()
        {
            return false;
        }
        done += n;
    }
    true
}

/// The handler address of IDT gate `vector`, if the IDT holds a present
/// interrupt or trap gate there.
pub fn idt_handler(
    vcpu: &dyn VcpuState,
    mem: &GuestMemory,
    base: u64,
    limit: u16,
    vector: u64,
) -> Option<u64> {
    let at = vector * IDT_GATE_SIZE;
    if at + IDT_GATE_SIZE - 1 > u64::from(limit) {
        return None;
    }
    let mut g = [0u8; 16];
    if !read_virt(vcpu, mem, base.wrapping_add(at), &mut g) {
        return None;
    }
    decode_gate(&g)
}

/// A 64-bit IDT gate: offset 15..0 at bytes 0-1, 31..16 at 6-7, 63..32 at
/// 8-11; type in byte 5 bits 0-3 (0xe interrupt, 0xf trap), present bit 7.
pub fn decode_gate(g: &[u8; 16]) -> Option<u64> {
    let attr = g[5];
    if attr & 0x80 == 0 || !matches!(attr & 0xf, 0xe | 0xf) {
        return None;
    }
    let lo = u64::from(u16::from_le_bytes([g[0], g[1]]));
    let mid = u64::from(u16::from_le_bytes([g[6], g[7]]));
    let hi = u64::from(u32::from_le_bytes([g[8], g[9], g[10], g[11]]));
    Some(lo | mid << 16 | hi << 32)
}

/// The handler's leading instructions the assist can perform itself: they
/// change only RIP and RFLAGS (`endbr64`; NOPs, including the multi-byte
/// `0f 1f /0` forms with 0x66/0x2e prefixes; `clac`; `cld`). Returns how
/// many bytes they span and the RFLAGS bits they clear. An instruction cut
/// off by the end of `code` ends the prologue.
pub fn prologue(code: &[u8]) -> (usize, u64) {
    let mut at = 0;
    let mut clear = 0;
    while at < code.len() {
        let Some((len, flags)) = harmless(&code[at..]) else {
            break;
        };
        at += len;
        clear |= flags;
    }
    (at, clear)
}

/// One instruction of [`prologue`]: its length and the flags it clears.
fn harmless(code: &[u8]) -> Option<(usize, u64)> {
    let (len, flags) = match code {
        [0xf3, 0x0f, 0x1e, 0xfa, ..] => (4, 0),   // endbr64
        [0x90, ..] => (1, 0),                     // nop
        [0x0f, 0x01, 0xca, ..] => (3, RFLAGS_AC), // clac
        [0xfc, ..] => (1, RFLAGS_DF),             // cld
        _ => (long_nop(code)?, 0),
    };
    (len <= code.len()).then_some((len, flags))
}

/// `[66|2e]* 0f 1f /0 modrm`: the length of a multi-byte NOP.
fn long_nop(code: &[u8]) -> Option<usize> {
    let prefixes = code.iter().take_while(|&&b| b == 0x66 || b == 0x2e).count();
    let rest = &code[prefixes..];
    if prefixes == 0 && rest.first() == Some(&0x90) {
        return None;
    }
    if prefixes > 0 && rest.first() == Some(&0x90) {
        return Some(prefixes + 1); // 66 90 (xchg ax, ax)
    }
    let [0x0f, 0x1f, modrm, ..] = rest else {
        return None;
    };
    if (modrm >> 3) & 7 != 0 {
        return None;
    }
    let (mode, rm) = (modrm >> 6, modrm & 7);
    let sib = usize::from(mode != 3 && rm == 4);
    let disp = match mode {
        0 if rm == 5 => 4,
        0 if rm == 4 && rest.get(3).is_some_and(|s| s & 7 == 5) => 4,
        1 => 1,
        2 => 4,
        _ => 0,
    };
    Some(prefixes + 3 + sib + disp)
}

/// How an ordinary #PF gets past the breakpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassThrough {
    /// RFLAGS.RF: one exit per #PF.
    ResumeFlag,
    /// Breakpoint off, one single step, breakpoint on: two exits per #PF.
    SingleStep,
}

/// What a debug exit turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebugOutcome {
    Syscall,
    /// Resumed past the handler's prologue (performed by the VMM).
    Skipped,
    Resumed,
    Stepping,
    /// The single step ended; the breakpoint is back.
    Rearmed,
    /// The breakpoint fired away from the handler: the IDT moved (re-read).
    Moved,
    /// No breakpoint of ours: not the assist's exit.
    NotOurs,
}

/// One vCPU's SYSCALL assist state.
pub struct SyscallAssist {
    vcpu: usize,
    lstar: u64,
    kernel_cs: u16,
    handler: Option<u64>,
    pass: PassThrough,
    stepping: bool,
    /// The last #PF let through with RF (handler RSP, CR2, frame): the same
    /// one at the breakpoint again means the host ignored RF.
    last_resume: Option<(u64, u64, PfFrame)>,
}

impl SyscallAssist {
    pub fn new(vcpu: usize) -> Self {
        Self {
            vcpu,
            lstar: 0,
            kernel_cs: 0,
            handler: None,
            pass: PassThrough::ResumeFlag,
            stepping: false,
            last_resume: None,
        }
    }

    pub fn pass_through(&self) -> PassThrough {
        self.pass
    }

    /// The breakpoint address, once armed.
    pub fn handler(&self) -> Option<u64> {
        self.handler
    }

    /// The guest wrote LSTAR (the filter stopped the write): perform it,
    /// then arm the breakpoint on the #PF handler.
    pub fn on_lstar_write(
        &mut self,
        vcpu: &dyn VcpuState,
        mem: &GuestMemory,
        value: u64,
        stats: &FaultStats,
    ) -> Result<(), SyscallAssistError> {
        kvm("KVM_SET_MSRS (LSTAR)", vcpu.set_msr(MSR_LSTAR, value))?;
        stats.add(AssistKind::LstarWrite, 1);
        self.lstar = value;
        self.arm(vcpu, mem, stats)
    }

    /// A restored vCPU: LSTAR is in its MSRs already; arm the breakpoint
    /// again.
    pub fn resume(
        &mut self,
        vcpu: &dyn VcpuState,
        mem: &GuestMemory,
        stats: &FaultStats,
    ) -> Result<(), SyscallAssistError> {
        self.lstar = kvm("KVM_GET_MSRS (LSTAR)", vcpu.msr(MSR_LSTAR))?;
        self.arm(vcpu, mem, stats)
    }

    /// Put the breakpoint on the #PF handler the IDT names now. An IDT
    /// without a usable gate 14 leaves it off (logged).
    fn arm(
        &mut self,
        vcpu: &dyn VcpuState,
        mem: &GuestMemory,
        stats: &FaultStats,
    ) -> Result<(), SyscallAssistError> {
        let star = kvm("KVM_GET_MSRS (STAR)", vcpu.msr(MSR_STAR))?;
        self.kernel_cs = ((star >> 32) & 0xfffc) as u16;
        let s = kvm("KVM_GET_SREGS", vcpu.sregs())?;
        match idt_handler(vcpu, mem, s.idt.base, s.idt.limit, PF_VECTOR) {
            Some(h) => {
                kvm(
                    "KVM_SET_GUEST_DEBUG",
                    vcpu.set_debug(GuestDebug::Breakpoint(h)),
                )?;
                if self.handler != Some(h) {
                    log::info!(
                        "vCPU {}: SYSCALL assist armed: LSTAR {:#x}, #PF handler {h:#x}, kernel CS {:#x}",
                        self.vcpu,
                        self.lstar,
                        self.kernel_cs
                    );
                }
                self.handler = Some(h);
                self.stepping = false;
                stats.add(AssistKind::Arm, 1);
            }
            None => {
                log::warn!(
                    "vCPU {}: LSTAR set but the IDT (base {:#x}, limit {:#x}) has no #PF gate: SYSCALL assist not armed",
                    self.vcpu,
                    s.idt.base,
                    s.idt.limit
                );
                kvm("KVM_SET_GUEST_DEBUG", vcpu.set_debug(GuestDebug::Off))?;
                self.handler = None;
            }
        }
        Ok(())
    }

    /// A `KVM_EXIT_DEBUG` at `pc`.
    pub fn on_debug(
        &mut self,
        vcpu: &dyn VcpuState,
        mem: &GuestMemory,
        pc: u64,
        stats: &FaultStats,
    ) -> Result<DebugOutcome, SyscallAssistError> {
        if self.stepping {
            self.arm(vcpu, mem, stats)?;
            return Ok(DebugOutcome::Rearmed);
        }
        let Some(handler) = self.handler else {
            return Ok(DebugOutcome::NotOurs);
        };
        if pc != handler {
            self.arm(vcpu, mem, stats)?;
            return Ok(DebugOutcome::Moved);
        }
        let mut regs = kvm("KVM_GET_REGS", vcpu.regs())?;
        let mut sregs = kvm("KVM_GET_SREGS", vcpu.sregs())?;
        let mut raw = [0u8; 48];
        if !read_virt(vcpu, mem, regs.rsp, &mut raw) {
            return Err(SyscallAssistError::Frame { rsp: regs.rsp });
        }
        let w = |i: usize| u64::from_le_bytes(raw[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let frame = PfFrame {
            error_code: w(0),
            rip: w(1),
            cs: w(2),
            rflags: w(3),
            rsp: w(4),
            ss: w(5),
        };
        if is_half_done_syscall(self.lstar, sregs.cr2, &frame) {
            enter_syscall(&mut regs, &mut sregs, self.kernel_cs, self.lstar, &frame);
            kvm("KVM_SET_SREGS", vcpu.set_sregs(&sregs))?;
            kvm("KVM_SET_REGS", vcpu.set_regs(&regs))?;
            self.last_resume = None;
            stats.add(AssistKind::Syscall, 1);
            return Ok(DebugOutcome::Syscall);
        }
        let mut code = [0u8; PROLOGUE_BYTES];
        if read_virt(vcpu, mem, handler, &mut code) {
            let (len, clear) = prologue(&code);
            if len > 0 {
                regs.rip = handler + len as u64;
                regs.rflags &= !clear;
                kvm("KVM_SET_REGS", vcpu.set_regs(&regs))?;
                stats.add(AssistKind::PfSkip, 1);
                return Ok(DebugOutcome::Skipped);
            }
        }
        if self.pass == PassThrough::ResumeFlag {
            let this = (regs.rsp, sregs.cr2, frame);
            if self.last_resume == Some(this) {
                log::warn!(
                    "vCPU {}: the host ignores RFLAGS.RF at a breakpoint: stepping past #PFs instead (two exits each)",
                    self.vcpu
                );
                self.pass = PassThrough::SingleStep;
            } else {
                regs.rflags |= RFLAGS_RF;
                kvm("KVM_SET_REGS", vcpu.set_regs(&regs))?;
                self.last_resume = Some(this);
                stats.add(AssistKind::PfResume, 1);
                return Ok(DebugOutcome::Resumed);
            }
        }
        kvm(
            "KVM_SET_GUEST_DEBUG",
            vcpu.set_debug(GuestDebug::SingleStep),
        )?;
        self.stepping = true;
        stats.add(AssistKind::PfStep, 1);
        Ok(DebugOutcome::Stepping)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::{Cell, RefCell};

    use crate::fault::stats::AssistKind;

    const RAM: u64 = 1 << 20;
    const LSTAR: u64 = 0xffff_ffff_8100_0000;
    const HANDLER: u64 = 0xffff_ffff_8100_1230;
    const IDT: u64 = 0x2000;
    const STACK: u64 = 0x8000 - 48;
    /// Guest-virtual kernel addresses map to `gva & 0xfffff` here.
    fn phys(gva: u64) -> u64 {
        gva & (RAM - 1)
    }

    struct Fake {
        regs: RefCell<kvm_regs>,
        sregs: RefCell<kvm_sregs>,
        lstar: Cell<u64>,
        debug: Cell<GuestDebug>,
    }

    impl VcpuState for Fake {
        fn regs(&self) -> Result<kvm_regs, kvm_ioctls::Error> {
            Ok(*self.regs.borrow())
        }
        fn set_regs(&self, r: &kvm_regs) -> Result<(), kvm_ioctls::Error> {
            *self.regs.borrow_mut() = *r;
            Ok(())
        }
        fn sregs(&self) -> Result<kvm_sregs, kvm_ioctls::Error> {
            Ok(*self.sregs.borrow())
        }
        fn set_sregs(&self, s: &kvm_sregs) -> Result<(), kvm_ioctls::Error> {
            *self.sregs.borrow_mut() = *s;
            Ok(())
        }
        fn translate(&self, gva: u64) -> Option<u64> {
            Some(phys(gva))
        }
        fn inject_exception(&self, _: u8) -> Result<(), kvm_ioctls::Error> {
            Ok(())
        }
        fn msr(&self, index: u32) -> Result<u64, kvm_ioctls::Error> {
            match index {
                // STAR: user CS base 0x23 (bits 63..48), kernel CS 0x10.
                MSR_STAR => Ok(0x0023_0010_0000_0000),
                MSR_LSTAR => Ok(self.lstar.get()),
                _ => Err(kvm_ioctls::Error::new(libc::EINVAL)),
            }
        }
        fn set_msr(&self, index: u32, v: u64) -> Result<(), kvm_ioctls::Error> {
            assert_eq!(index, MSR_LSTAR);
            self.lstar.set(v);
            Ok(())
        }
        fn set_debug(&self, d: GuestDebug) -> Result<(), kvm_ioctls::Error> {
            self.debug.set(d);
            Ok(())
        }
    }

    fn setup() -> (Fake, GuestMemory) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
        // IDT gate 14: present interrupt gate to HANDLER.
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&(HANDLER as u16).to_le_bytes());
        g[2..4].copy_from_slice(&0x10u16.to_le_bytes());
        g[5] = 0x8e;
        g[6..8].copy_from_slice(&((HANDLER >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((HANDLER >> 32) as u32).to_le_bytes());
        mem.write_slice(&g, GuestAddress(IDT + 14 * 16)).unwrap();
        let mut sregs = kvm_sregs::default();
        sregs.idt.base = IDT;
        sregs.idt.limit = 256 * 16 - 1;
        let fake = Fake {
            regs: RefCell::new(kvm_regs::default()),
            sregs: RefCell::new(sregs),
            lstar: Cell::new(0),
            debug: Cell::new(GuestDebug::Off),
        };
        (fake, mem)
    }

    /// The state a PVM host leaves at the #PF handler: the frame at RSP,
    /// CR2, RIP at the handler.
    fn at_pf(fake: &Fake, mem: &GuestMemory, cr2: u64, f: PfFrame) {
        let words = [f.error_code, f.rip, f.cs, f.rflags, f.rsp, f.ss];
        for (i, w) in words.iter().enumerate() {
            mem.write_obj(*w, GuestAddress(phys(STACK) + 8 * i as u64))
                .unwrap();
        }
        let mut r = fake.regs.borrow_mut();
        r.rip = HANDLER;
        r.rsp = STACK;
        r.rcx = 0x40_1234; // SYSCALL's return address
        r.r11 = 0x246; // SYSCALL's saved RFLAGS
        r.rflags = 0x2;
        fake.sregs.borrow_mut().cr2 = cr2;
    }

    fn syscall_frame() -> PfFrame {
        PfFrame {
            error_code: 0x15,
            rip: LSTAR,
            cs: 0x33,
            rflags: 0x2, // masked by SFMASK: IF clear
            rsp: 0x7fff_f000,
            ss: 0x2b,
        }
    }

    /// The assist after the guest's LSTAR write (breakpoint armed).
    fn armed(fake: &Fake, mem: &GuestMemory) -> (FaultStats, SyscallAssist) {
        let stats = FaultStats::default();
        let mut a = SyscallAssist::new(0);
        a.on_lstar_write(fake, mem, LSTAR, &stats).unwrap();
        (stats, a)
    }

    /// An ordinary user page fault (elsewhere than LSTAR, IF set).
    fn user_fault_frame() -> PfFrame {
        PfFrame {
            rip: 0x40_1000,
            rflags: 0x246,
            ..syscall_frame()
        }
    }

    #[test]
    fn lstar_write_is_performed_and_arms_the_pf_handler() {
        let (fake, mem) = setup();
        let (stats, a) = armed(&fake, &mem);
        assert_eq!(fake.lstar.get(), LSTAR);
        assert_eq!(fake.debug.get(), GuestDebug::Breakpoint(HANDLER));
        assert_eq!(a.handler(), Some(HANDLER));
        assert_eq!(stats.get(AssistKind::LstarWrite), 1);
        assert_eq!(stats.get(AssistKind::Arm), 1);
    }

    #[test]
    fn no_gate_no_breakpoint() {
        let (fake, mem) = setup();
        fake.sregs.borrow_mut().idt.limit = 14 * 16 - 1; // gate 14 outside
        let (stats, mut a) = armed(&fake, &mem);
        assert_eq!(fake.debug.get(), GuestDebug::Off);
        assert_eq!(a.handler(), None);
        assert_eq!(
            a.on_debug(&fake, &mem, HANDLER, &stats).unwrap(),
            DebugOutcome::NotOurs
        );
    }

    #[test]
    fn half_done_syscall_enters_lstar_at_cpl0() {
        let (fake, mem) = setup();
        let (stats, mut a) = armed(&fake, &mem);
        let f = syscall_frame();
        at_pf(&fake, &mem, LSTAR, f);
        assert_eq!(
            a.on_debug(&fake, &mem, HANDLER, &stats).unwrap(),
            DebugOutcome::Syscall
        );
        let r = *fake.regs.borrow();
        let s = *fake.sregs.borrow();
        assert_eq!(r.rip, LSTAR);
        assert_eq!(r.rsp, f.rsp, "the user stack, as SYSCALL leaves it");
        assert_eq!(r.rflags, f.rflags);
        assert_eq!((r.rcx, r.r11), (0x40_1234, 0x246), "RCX/R11 untouched");
        assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (0x10, 0, 1));
        assert_eq!((s.ss.selector, s.ss.dpl, s.ss.db), (0x18, 0, 1));
        assert_eq!(stats.get(AssistKind::Syscall), 1);
    }

    /// The handler's entry as Linux 6.12 has it: endbr64, three NOPs (an
    /// unpatched clac), cld, call error_entry.
    const LINUX_ENTRY: [u8; 12] = [
        0xf3, 0x0f, 0x1e, 0xfa, 0x90, 0x90, 0x90, 0xfc, 0xe8, 0xd3, 0x03, 0x00,
    ];

    #[test]
    fn prologues() {
        assert_eq!(prologue(&LINUX_ENTRY), (8, RFLAGS_DF));
        // Patched alternatives: a 3-byte NOP or a real clac.
        assert_eq!(
            prologue(&[0xf3, 0x0f, 0x1e, 0xfa, 0x0f, 0x1f, 0x00, 0xfc, 0xe8]),
            (8, RFLAGS_DF)
        );
        assert_eq!(
            prologue(&[0x0f, 0x01, 0xca, 0xfc, 0x57]),
            (4, RFLAGS_DF | RFLAGS_AC)
        );
        // Long NOPs: disp8, SIB+disp8, SIB+disp32 with 66 and 2e prefixes.
        assert_eq!(prologue(&[0x0f, 0x1f, 0x40, 0x00, 0x57]).0, 4);
        assert_eq!(prologue(&[0x0f, 0x1f, 0x44, 0x00, 0x00, 0x57]).0, 5);
        assert_eq!(
            prologue(&[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0, 0x57]).0,
            10
        );
        assert_eq!(prologue(&[0x66, 0x90, 0x57]).0, 2);
        // Anything else stops it: push, a call, `0f 1f /1` (not a NOP), a
        // NOP cut off by the end of what was read.
        assert_eq!(prologue(&[0x57, 0x90]).0, 0);
        assert_eq!(prologue(&[0xe8, 0, 0, 0, 0]).0, 0);
        assert_eq!(prologue(&[0x0f, 0x1f, 0x08]).0, 0);
        assert_eq!(prologue(&[0x90, 0x0f, 0x1f, 0x44, 0x00]).0, 1);
    }

    #[test]
    fn ordinary_faults_skip_the_handlers_prologue() {
        let (fake, mem) = setup();
        mem.write_slice(&LINUX_ENTRY, GuestAddress(phys(HANDLER)))
            .unwrap();
        let (stats, mut a) = armed(&fake, &mem);
        let f = user_fault_frame();
        at_pf(&fake, &mem, 0x60_0000, f);
        fake.regs.borrow_mut().rflags = 0x2 | RFLAGS_DF;
        assert_eq!(
            a.on_debug(&fake, &mem, HANDLER, &stats).unwrap(),
            DebugOutcome::Skipped
        );
        let r = *fake.regs.borrow();
        assert_eq!(r.rip, HANDLER + 8, "at the call, past endbr64/nops/cld");
        assert_eq!(r.rflags & RFLAGS_DF, 0, "cld performed");
        assert_eq!(fake.debug.get(), GuestDebug::Breakpoint(HANDLER));
        // A SYSCALL is still a SYSCALL.
        at_pf(&fake, &mem, LSTAR, syscall_frame());
        assert_eq!(
            a.on_debug(&fake, &mem, HANDLER, &stats).unwrap(),
            DebugOutcome::Syscall
        );
        assert_eq!(stats.get(AssistKind::PfSkip), 1);
    }

    #[test]
    fn ordinary_faults_and_user_jumps_resume_with_rf() {
        let (fake, mem) = setup();
        let (stats, mut a) = armed(&fake, &mem);
        // A user page fault elsewhere.
        let f = user_fault_frame();
        at_pf(&fake, &mem, 0x60_0000, f);
        assert_eq!(
            a.on_debug(&fake, &mem, HANDLER, &stats).unwrap(),
            DebugOutcome::Resumed
        );
        assert_ne!(fake.regs.borrow().rflags & RFLAGS_RF, 0);
        assert_eq!(fake.regs.borrow().rip, HANDLER, "the handler runs");
        // A user `jmp LSTAR`: same addresses, but IF set. Not a SYSCALL.
        let mut j = syscall_frame();
        j.rflags = 0x246;
        at_pf(&fake, &mem, LSTAR, j);
        assert_eq!(
            a.on_debug(&fake, &mem, HANDLER, &stats).unwrap(),
            DebugOutcome::Resumed
        );
        assert_eq!(fake.sregs.borrow().cs.dpl, 0, "fake default untouched");
        assert_eq!(stats.get(AssistKind::Syscall), 0);
        assert_eq!(stats.get(AssistKind::PfResume), 2);
    }

    #[test]
    fn a_host_ignoring_rf_falls_back_to_single_steps() {
        let (fake, mem) = setup();
        let (stats, mut a) = armed(&fake, &mem);
        let f = user_fault_frame();
        at_pf(&fake, &mem, 0x60_0000, f);
        assert_eq!(
            a.on_debug(&fake, &mem, HANDLER, &stats).unwrap(),
            DebugOutcome::Resumed
        );
        // The same fault at the breakpoint again: RF was ignored.
        at_pf(&fake, &mem, 0x60_0000, f);
        assert_eq!(
            a.on_debug(&fake, &mem, HANDLER, &stats).unwrap(),
            DebugOutcome::Stepping
        );
        assert_eq!(fake.debug.get(), GuestDebug::SingleStep);
        assert_eq!(a.pass_through(), PassThrough::SingleStep);
        // The step ends anywhere: breakpoint back on.
        assert_eq!(
            a.on_debug(&fake, &mem, HANDLER + 4, &stats).unwrap(),
            DebugOutcome::Rearmed
        );
        assert_eq!(fake.debug.get(), GuestDebug::Breakpoint(HANDLER));
        // A SYSCALL still works in stepping mode.
        at_pf(&fake, &mem, LSTAR, syscall_frame());
        assert_eq!(
            a.on_debug(&fake, &mem, HANDLER, &stats).unwrap(),
            DebugOutcome::Syscall
        );
    }

    #[test]
    fn a_moved_idt_is_followed() {
        let (fake, mem) = setup();
        let (stats, mut a) = armed(&fake, &mem);
        // The guest loads another IDT whose gate 14 points elsewhere; the
        // old breakpoint fires at some other address.
        let new_idt = 0x4000;
        let mut g = [0u8; 16];
        mem.read_slice(&mut g, GuestAddress(IDT + 14 * 16)).unwrap();
        g[0..2].copy_from_slice(&0x5678u16.to_le_bytes());
        mem.write_slice(&g, GuestAddress(new_idt + 14 * 16))
            .unwrap();
        fake.sregs.borrow_mut().idt.base = new_idt;
        assert_eq!(
            a.on_debug(&fake, &mem, 0x1111, &stats).unwrap(),
            DebugOutcome::Moved
        );
        assert_eq!(a.handler(), Some((HANDLER & !0xffff) | 0x5678));
    }

    #[test]
    fn armed_only_for_linux_on_pvm() {
        use SyscallAssistMode::*;
        for mode in [Auto, On, Off] {
            assert!(
                !wanted(mode, KvmFlavor::Hardware, true, false),
                "never on hardware KVM"
            );
            assert!(!wanted(mode, KvmFlavor::Pvm, false, false), "test guest");
        }
        assert!(wanted(Auto, KvmFlavor::Pvm, true, false));
        assert!(
            !wanted(Auto, KvmFlavor::Pvm, true, true),
            "the kernel does it"
        );
        assert!(wanted(On, KvmFlavor::Pvm, true, true));
        assert!(!wanted(Off, KvmFlavor::Pvm, true, false));
    }

    #[test]
    fn gate_decoding() {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&0x1230u16.to_le_bytes());
        g[6..8].copy_from_slice(&0x8100u16.to_le_bytes());
        g[8..12].copy_from_slice(&0xffff_ffffu32.to_le_bytes());
        g[5] = 0x8e;
        assert_eq!(decode_gate(&g), Some(0xffff_ffff_8100_1230));
        g[5] = 0x8f; // trap gate
        assert!(decode_gate(&g).is_some());
        g[5] = 0x0e; // not present
        assert_eq!(decode_gate(&g), None);
        g[5] = 0x85; // task gate
        assert_eq!(decode_gate(&g), None);
    }
}
