//! The boot GDT and the `kvm_segment`s that mirror it.

use kvm_bindings::kvm_segment;

/// Build a GDT descriptor from access/flags (`0xF0FF` mask as in the SDM:
/// bits 15..12 = G, D/B, L, AVL; bits 7..0 = P, DPL, S, type), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The boot GDT: null, null, code64 (0x10), data (0x18), TSS (0x20).
pub const BOOT_GDT: [u64; 5] = [
    0,
    0,
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code, present, DPL0, G
    gdt_entry(0xc093, 0, 0xfffff), // data, present, DPL0, D/B, G
    gdt_entry(0x808b, 0, 0xfffff), // busy 64-bit TSS
];
pub const CODE_SELECTOR: u16 = 0x10;
pub const DATA_SELECTOR: u16 = 0x18;
pub const TSS_SELECTOR: u16 = 0x20;

/// The `kvm_segment` for the descriptor at `BOOT_GDT[selector >> 3]`.
pub fn segment(selector: u16) -> kvm_segment {
    let e = BOOT_GDT[usize::from(selector >> 3)];
    let base = ((e >> 16) & 0xff_ffff) | ((e >> 32) & 0xff00_0000);
    let limit_raw = ((e & 0xffff) | ((e >> 32) & 0xf_0000)) as u32;
    let g = ((e >> 55) & 1) as u8;
    kvm_segment {
        base,
        // The limit in a kvm_segment is in bytes.
        limit: if g == 1 {
            (limit_raw << 12) | 0xfff
        } else {
            limit_raw
        },
        selector,
        type_: ((e >> 40) & 0xf) as u8,
        present: ((e >> 47) & 1) as u8,
        dpl: ((e >> 45) & 3) as u8,
        db: ((e >> 54) & 1) as u8,
        s: ((e >> 44) & 1) as u8,
        l: ((e >> 53) & 1) as u8,
        g,
        avl: ((e >> 52) & 1) as u8,
        unusable: u8::from(((e >> 47) & 1) == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_match_the_linux_boot_gdt() {
        // The values Linux's own boot code and KVM selftests use.
        assert_eq!(BOOT_GDT[2], 0x00af_9b00_0000_ffff);
        assert_eq!(BOOT_GDT[3], 0x00cf_9300_0000_ffff);
        let cs = segment(CODE_SELECTOR);
        assert_eq!(
            (cs.l, cs.db, cs.type_, cs.s, cs.present, cs.dpl),
            (1, 0, 0xb, 1, 1, 0)
        );
        assert_eq!(cs.limit, 0xffff_ffff);
        let ds = segment(DATA_SELECTOR);
        assert_eq!((ds.l, ds.db, ds.type_, ds.s), (0, 1, 3, 1));
        let tr = segment(TSS_SELECTOR);
        assert_eq!((tr.type_, tr.s, tr.present), (0xb, 0, 1));
    }
}
