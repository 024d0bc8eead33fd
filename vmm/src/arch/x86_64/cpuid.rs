//! CPUID: start from `KVM_GET_SUPPORTED_CPUID` and normalise it for one vCPU
//! (APIC id, topology: one socket, one thread per core, `n` cores), mark the
//! hypervisor, and hide what the host cannot run for this guest.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use crate::host::KvmFlavor;

/// CPUID.1:ECX.CX16 (`cmpxchg16b`): PVM's emulator cannot run it in guest
/// supervisor mode (it fails emulation, even after the page is present), and
/// this bit, unlike many, is honoured by the host when cleared.
pub const LEAF1_ECX_CX16: u32 = 1 << 13;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
const LEAF1_EDX_HTT: u32 = 1 << 28;

/// What to change beyond topology.
#[derive(Debug, Clone, Copy)]
pub struct CpuidPolicy {
    pub flavor: KvmFlavor,
}

/// Normalise `cpuid` (a copy of the supported set) for vCPU `index` of `count`.
pub fn normalize(cpuid: &mut CpuId, index: usize, count: usize, policy: CpuidPolicy) {
    let apic_id = index as u32;
    let count = count as u32;
    // Bits needed to number `count` cores at the core level of leaf 0xB.
    let core_shift = 32 - (count.max(1) - 1).leading_zeros();
    for e in cpuid.as_mut_slice() {
        normalize_entry(e, apic_id, count, core_shift, policy);
    }
}

fn normalize_entry(
    e: &mut kvm_cpuid_entry2,
    apic_id: u32,
    count: u32,
    core_shift: u32,
    policy: CpuidPolicy,
) {
    match e.function {
        0x1 => {
            // EBX: APIC id (31:24), logical processors per package (23:16),
            // CLFLUSH line size in 8-byte units (15:8).
            e.ebx = (apic_id << 24) | (count.min(255) << 16) | (8 << 8) | (e.ebx & 0xff);
            e.ecx |= LEAF1_ECX_HYPERVISOR;
            if policy.flavor == KvmFlavor::Pvm {
                e.ecx &= !LEAF1_ECX_CX16;
            }
            if count > 1 {
                e.edx |= LEAF1_EDX_HTT;
            } else {
                e.edx &= !LEAF1_EDX_HTT;
            }
        }
        0x4 => {
            // EAX 31:26: cores per package - 1; 25:14: threads sharing this cache - 1.
            let cores = (count.min(64) - 1) & 0x3f;
            let cache_level = (e.eax >> 5) & 0x7;
            let sharing = if cache_level >= 3 {
                count.min(4096) - 1
            } else {
                0
            };
            e.eax = (e.eax & 0x3fff) | (cores << 26) | ((sharing & 0xfff) << 14);
        }
        0xb | 0x1f => {
            // Extended topology: level 0 = SMT (1 thread), level 1 = core.
            e.edx = apic_id;
            match e.index {
                0 => {
                    e.eax = 0;
                    e.ebx = 1;
                    e.ecx = (1 << 8) | e.index;
                }
                1 => {
                    e.eax = core_shift;
                    e.ebx = count;
                    e.ecx = (2 << 8) | e.index;
                }
                _ => {
                    e.eax = 0;
                    e.ebx = 0;
                    e.ecx = e.index;
                }
            }
        }
        _ => {}
    }
}

/// The leaf-1 entry, if present (for tests and diagnostics).
pub fn leaf(cpuid: &CpuId, function: u32, index: u32) -> Option<kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == index)
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CpuId {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ecx: LEAF1_ECX_CX16 | 1,
                ebx: 0xff00_0000,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                ..Default::default()
            },
        ];
        CpuId::from_entries(&entries).unwrap()
    }

    #[test]
    fn apic_id_topology_and_cx16() {
        let mut c = sample();
        normalize(
            &mut c,
            3,
            4,
            CpuidPolicy {
                flavor: KvmFlavor::Pvm,
            },
        );
        let l1 = leaf(&c, 1, 0).unwrap();
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ecx & LEAF1_ECX_CX16, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        let b = leaf(&c, 0xb, 1).unwrap();
        assert_eq!((b.eax, b.ebx, b.edx), (2, 4, 3));

        let mut c = sample();
        normalize(
            &mut c,
            0,
            1,
            CpuidPolicy {
                flavor: KvmFlavor::Hardware,
            },
        );
        assert_ne!(leaf(&c, 1, 0).unwrap().ecx & LEAF1_ECX_CX16, 0);
    }
}
