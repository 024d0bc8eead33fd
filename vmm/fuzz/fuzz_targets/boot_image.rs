//! Kernel images as the VMM loads them: bzImage setup header, payload
//! decompression (gzip, xz, lzma, zstd, bzip2, lz4), ELF program headers and
//! notes, initramfs placement, boot_params, e820 and ACPI tables, into a
//! 64 MiB guest. Any input may be refused with an error; none may panic,
//! write outside guest RAM or allocate without bound.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;
use vmm::boot::{load, BootSpec};
use vmm::host::KvmFlavor;
use vmm::memory::{GuestMemory, RamRange};

const MEM: u64 = 64 << 20;

fuzz_target!(|data: &[u8]| {
    static GUEST: OnceLock<GuestMemory> = OnceLock::new();
    let mem = GUEST.get_or_init(|| {
        GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).expect("guest memory")
    });
    // The first two bytes say how much of the rest is an initramfs.
    let (split, rest) = match data {
        [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
        _ => return,
    };
    let (image, initrd) = rest.split_at(rest.len().saturating_sub(split));
    let ram = [RamRange { gpa: 0, size: MEM }];
    let spec = BootSpec {
        image,
        image_name: "fuzz input",
        initrd: (!initrd.is_empty()).then_some(initrd),
        cmdline: "console=ttyS0",
        vcpus: 2,
        flavor: KvmFlavor::Hardware,
        devices: &[],
        memory_hotplug: false,
    };
    let _ = load(mem, &ram, &spec);
});
