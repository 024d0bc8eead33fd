//! Emulation assists for PVM hosts: the host's instruction emulator fails on
//! a few instructions a stock kernel executes in supervisor mode; where the
//! architectural effect is simple, the VMM performs it (each one measured
//! failing on such a host, docs/ARCHITECTURE.md "Emulation assists"):
//! - `int3` -> RIP+1 and inject #BP (the kernel's int3 self-test and text
//!   patching rely on the handler running);
//! - `clac`/`stac` -> clear/set RFLAGS.AC;
//! - `fwait` -> no-op (no pending x87 exceptions: CR0.NE and no unmasked
//!   FPU faults at boot).

use super::regs::VcpuState;
use crate::fault::stats::AssistKind;

const RFLAGS_AC: u64 = 1 << 18;
const BP_VECTOR: u8 = 3;
const INT3: u8 = 0xcc;
const FWAIT: u8 = 0x9b;
/// `0f 01 ca` (clac) and `0f 01 cb` (stac).
const CLAC: [u8; 3] = [0x0f, 0x01, 0xca];
const STAC: [u8; 3] = [0x0f, 0x01, 0xcb];

/// Which assist applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assist {
    Int3,
    Clac,
    Stac,
    Fwait,
}

impl From<Assist> for AssistKind {
    fn from(a: Assist) -> Self {
        match a {
            Assist::Int3 => AssistKind::Int3,
            Assist::Clac => AssistKind::Clac,
            Assist::Stac => AssistKind::Stac,
            Assist::Fwait => AssistKind::Fwait,
        }
    }
}

/// Perform the assist for the failed instruction `insn`, if there is one.
/// `None`: not an instruction this knows, or the vCPU state could not be
/// changed (the caller reports the emulation failure).
pub fn apply(vcpu: &dyn VcpuState, insn: &[u8]) -> Option<Assist> {
    let mut regs = vcpu.regs().ok()?;
    let assist = match insn {
        [INT3, ..] => Assist::Int3,
        [a, b, c, ..] if [*a, *b, *c] == CLAC => Assist::Clac,
        [a, b, c, ..] if [*a, *b, *c] == STAC => Assist::Stac,
        [FWAIT, ..] => Assist::Fwait,
        _ => return None,
    };
    match assist {
        Assist::Int3 | Assist::Fwait => regs.rip += 1,
        Assist::Clac => {
            regs.rflags &= !RFLAGS_AC;
            regs.rip += 3;
        }
        Assist::Stac => {
            regs.rflags |= RFLAGS_AC;
            regs.rip += 3;
        }
    }
    vcpu.set_regs(&regs).ok()?;
    if assist == Assist::Int3 {
        vcpu.inject_exception(BP_VECTOR).ok()?;
    }
    Some(assist)
}
