//! What a restore reads from a snapshot directory before any KVM object
//! exists: the manifest (JSON), each state section (bincode), the memory
//! layout and its checks, a recorded working set. Any bytes give a value
//! or an error naming the section (no panic, no unbounded allocation).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::memory::snapshot::{check_layout, SlotImage};
use vmm::snapshot::{DevicesSnapshot, VcpuSnapshot, VmRecord, VmSnapshot};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let path = std::path::Path::new("manifest.json");
    match which % 6 {
        0 => {
            let _ = vmm_snapshot::Manifest::<VmRecord>::parse(bytes, path);
        }
        1 => {
            let _ = vmm_snapshot::decode::<VcpuSnapshot>("vcpu0", bytes);
        }
        2 => {
            let _ = vmm_snapshot::decode::<DevicesSnapshot>("devices", bytes);
        }
        3 => {
            let _ = vmm_snapshot::decode::<VmSnapshot>("vm", bytes);
        }
        4 => {
            if let Ok(layout) = vmm_snapshot::decode::<Vec<SlotImage>>("memory", bytes) {
                // What a restore does with a layout: check it, and only a
                // layout that passed is used.
                if check_layout(&layout, 1 << 32).is_ok() {
                    for s in &layout {
                        let _ = (s.data_pages(), s.table_pages(), s.user_pages());
                        let _ = s.data_runs(256).count();
                    }
                }
            }
        }
        _ => {
            let _ = vmm_snapshot::decode::<Vec<(u64, u64)>>("working-set", bytes);
        }
    }
});
