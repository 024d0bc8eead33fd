//! A `KVM_RUN` exit, decoded into a type of our own so that exit handling
//! can be driven without KVM (unit tests synthesise exits).

use kvm_bindings::{kvm_run, KVM_EXIT_DIRTY_RING_FULL, KVM_INTERNAL_ERROR_EMULATION};
use kvm_ioctls::VcpuExit;

use crate::fault::stats::ExitKind;

/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// What the vCPU exited for.
#[derive(Debug)]
pub enum Exit<'a> {
    IoIn {
        port: u16,
        data: &'a mut [u8],
    },
    IoOut {
        port: u16,
        data: &'a [u8],
    },
    MmioRead {
        gpa: u64,
        data: &'a mut [u8],
    },
    MmioWrite {
        gpa: u64,
        data: &'a [u8],
    },
    /// `KVM_EXIT_MEMORY_FAULT`.
    MemoryFault {
        gpa: u64,
    },
    Hlt,
    /// Triple fault.
    Shutdown,
    SystemEvent(u32),
    /// `KVM_EXIT_INTERNAL_ERROR` / `KVM_INTERNAL_ERROR_EMULATION`, with the
    /// instruction bytes when the kernel supplies them.
    Emulation {
        insn: Option<Vec<u8>>,
    },
    /// Any other internal error.
    Internal {
        suberror: u32,
        data: Vec<u64>,
    },
    FailEntry {
        reason: u64,
        cpu: u32,
    },
    /// Interrupted (a kick, `immediate_exit`).
    Intr,
    /// `KVM_EXIT_DEBUG`: a guest-debug breakpoint hit (`pc`) or a single
    /// step (the SYSCALL assist's).
    Debug {
        pc: u64,
        dr6: u64,
    },
    /// `KVM_EXIT_X86_WRMSR`: a write the MSR filter sends to the VMM. The
    /// write has not happened; `error = 1` makes it raise #GP instead.
    WrMsr {
        index: u32,
        data: u64,
        error: &'a mut u8,
    },
    /// `KVM_EXIT_DIRTY_RING_FULL`: this vCPU's dirty ring must be harvested
    /// before it may run again.
    DirtyRingFull,
    /// An exit this VMM does not handle.
    Unhandled(String),
    /// `KVM_RUN` itself failed.
    Failed {
        errno: i32,
    },
}

impl Exit<'_> {
    pub fn kind(&self) -> ExitKind {
        match self {
            Exit::IoIn { .. } | Exit::IoOut { .. } => ExitKind::Io,
            Exit::MmioRead { .. } | Exit::MmioWrite { .. } => ExitKind::Mmio,
            Exit::Hlt => ExitKind::Hlt,
            Exit::Shutdown => ExitKind::Shutdown,
            Exit::Emulation { .. } | Exit::Internal { .. } => ExitKind::InternalError,
            Exit::MemoryFault { .. } => ExitKind::MemoryFault,
            Exit::SystemEvent(_) => ExitKind::SystemEvent,
            Exit::Intr => ExitKind::Intr,
            Exit::Debug { .. } => ExitKind::Debug,
            Exit::WrMsr { .. } => ExitKind::Msr,
            Exit::DirtyRingFull => ExitKind::DirtyRingFull,
            Exit::Failed { errno } if *errno == libc::EINTR || *errno == libc::EAGAIN => {
                ExitKind::Intr
            }
            _ => ExitKind::Other,
        }
    }
}

/// Decode what `KVM_RUN` returned. `run` is the vCPU's `kvm_run`, read only
/// for the exits whose data `kvm-ioctls` does not decode.
///
/// # Safety
/// `run` must be the `kvm_run` mapping of the vCPU that produced `r`.
pub unsafe fn decode<'a>(
    r: Result<VcpuExit<'a>, kvm_ioctls::Error>,
    run: *const kvm_run,
) -> Exit<'a> {
    match r {
        Ok(VcpuExit::IoIn(port, data)) => Exit::IoIn { port, data },
        Ok(VcpuExit::IoOut(port, data)) => Exit::IoOut { port, data },
        Ok(VcpuExit::MmioRead(gpa, data)) => Exit::MmioRead { gpa, data },
        Ok(VcpuExit::MmioWrite(gpa, data)) => Exit::MmioWrite { gpa, data },
        Ok(VcpuExit::MemoryFault { gpa, .. }) => Exit::MemoryFault { gpa },
        Ok(VcpuExit::Hlt) => Exit::Hlt,
        Ok(VcpuExit::Shutdown) => Exit::Shutdown,
        Ok(VcpuExit::SystemEvent(kind, _)) => Exit::SystemEvent(kind),
        Ok(VcpuExit::InternalError) => {
            // SAFETY: `run` is this vCPU's kvm_run mapping, valid while the
            // vCPU fd lives; for KVM_EXIT_INTERNAL_ERROR the union member is
            // `internal`.
            let internal = unsafe { (*run).__bindgen_anon_1.internal };
            let n = (internal.ndata as usize).min(internal.data.len());
            if internal.suberror == KVM_INTERNAL_ERROR_EMULATION {
                Exit::Emulation {
                    insn: insn_bytes(&internal.data[..n]),
                }
            } else {
                Exit::Internal {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                }
            }
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => Exit::FailEntry { reason, cpu },
        Ok(VcpuExit::Intr) => Exit::Intr,
        Ok(VcpuExit::Debug(d)) => Exit::Debug {
            pc: d.pc,
            dr6: d.dr6,
        },
        Ok(VcpuExit::X86Wrmsr(w)) => Exit::WrMsr {
            index: w.index,
            data: w.data,
            error: w.error,
        },
        Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => Exit::DirtyRingFull,
        Ok(other) => Exit::Unhandled(format!("{other:?}")),
        Err(e) => Exit::Failed { errno: e.errno() },
    }
}

/// Untie an exit from the borrow of the vCPU fd that produced it, so that
/// exit handling can use the fd's register ioctls while holding the exit.
///
/// # Safety
/// The exit's data slices point into the vCPU's `kvm_run` mapping: the
/// caller must drop the exit before the next `KVM_RUN` and before the vCPU
/// fd is closed.
pub unsafe fn detach<'r>(e: Exit<'_>) -> Exit<'r> {
    // SAFETY: only the lifetime parameter changes; the caller upholds it.
    unsafe { std::mem::transmute::<Exit<'_>, Exit<'r>>(e) }
}

/// Instruction bytes of an emulation failure, when the kernel supplies them
/// (`KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`: data[0] = flags,
/// then a size byte and up to 15 bytes).
pub fn insn_bytes(data: &[u64]) -> Option<Vec<u8>> {
    if data.len() < 2 {
        return None;
    }
    let raw: Vec<u8> = data[1..].iter().flat_map(|d| d.to_le_bytes()).collect();
    let len = usize::from(raw[0]).min(MAX_INSN_LEN).min(raw.len() - 1);
    (len > 0).then(|| raw[1..1 + len].to_vec())
}

pub fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instruction_bytes_follow_a_size_byte() {
        // flags, then size 3 and bytes 0f 01 ca.
        let data = [1u64, u64::from_le_bytes([3, 0x0f, 0x01, 0xca, 0, 0, 0, 0])];
        assert_eq!(insn_bytes(&data), Some(vec![0x0f, 0x01, 0xca]));
        assert_eq!(insn_bytes(&data[..1]), None);
        let empty = [1u64, 0];
        assert_eq!(insn_bytes(&empty), None);
        // A size byte past what fits is clamped, never out of bounds.
        let big = [1u64, u64::from_le_bytes([200, 1, 2, 3, 4, 5, 6, 7])];
        assert_eq!(insn_bytes(&big).unwrap().len(), 7);
        assert_eq!(hex(&[0xcc, 0x0f]), "cc 0f");
    }
}
