//! What a restore reads from a snapshot directory before any KVM object
//! exists: the manifest (JSON), each state section (bincode), the memory
//! layout and its checks, a diff's layout laid over its base's, a
//! recorded working set. Any bytes give a value
//! or an error naming the section (no panic, no unbounded allocation).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::memory::snapshot::{check_layout, layer, BasePages, SlotImage};
use vmm::snapshot::{DevicesSnapshot, VcpuSnapshot, VmRecord, VmSnapshot};

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else {
        return;
    };
    let path = std::path::Path::new("manifest.json");
    match which % 7 {
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
        5 => {
            // A diff over its base: both layouts checked first, as a
            // restore checks them.
            type Diff = (Vec<SlotImage>, Vec<SlotImage>, BasePages);
            if let Ok((mut top, below, pages)) = vmm_snapshot::decode::<Diff>("memory-base", bytes)
            {
                if check_layout(&top, 1 << 28).is_ok() && check_layout(&below, 1 << 28).is_ok() {
                    let _ = layer(&mut top, &pages, &below);
                }
            }
        }
        _ => {
            let _ = vmm_snapshot::decode::<Vec<(u64, u64)>>("working-set", bytes);
        }
    }
});
