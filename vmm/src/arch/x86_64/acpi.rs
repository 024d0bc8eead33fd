//! ACPI tables for a Linux guest, built with the rust-vmm `acpi_tables`
//! crate: RSDP (revision 2) at 0xe0000, where Linux scans for it, then DSDT,
//! FADT, MADT and XSDT above it, all inside the legacy hole that the e820
//! map reports reserved ([`e820::EBDA_START`]..[`e820::LEGACY_HOLE_END`]).
//!
//! The FADT is *hardware-reduced* (HW_REDUCED_ACPI), as in Firecracker and
//! Cloud Hypervisor. A full FADT needs PM1a event/control register blocks:
//! ACPICA treats them as required and, finding them at address 0, fails
//! `acpi_enable_subsystem` (fixed-event setup writes the PM1 enable
//! register), so Linux would switch its ACPI interpreter off. This VMM has
//! no PM1/GPE/PM-timer device to offer. In hardware-reduced mode Linux needs
//! none of them and no SCI; consequences for the guest:
//! - it routes every IRQ through the IOAPIC (MADT below) and leaves the
//!   8259 PIC alone (`null_legacy_pic`), so ISA IRQs are identity-mapped
//!   GSIs: COM1 is GSI 4, as KVM's default routing delivers it;
//! - it does not use the PIT as its clock-event device (LAPIC timer);
//! - reset: the FADT's reset register is the i8042 command port (write
//!   0xFE to port 0x64), so both `reboot=a` (the default) and `reboot=k`
//!   reach the VMM's i8042 reset;
//! - power-off: the FADT's sleep control and status registers are the I/O
//!   ports of the VMM's ACPI sleep device (`vmm_devices::acpi_power`, the
//!   same numbers: `vm.rs` checks) and the DSDT has `\_S5_`, so Linux
//!   registers its ACPI power-off handler and `poweroff` ends the VM;
//! - COM1 is described in the DSDT (PNP0501, I/O 0x3f8-0x3ff, IRQ 4) and is
//!   also found by the 8250 driver's legacy port probe.
//!
//! No IRQ0 -> GSI2 interrupt source override is listed by default: KVM's
//! default GSI routing (which this VMM keeps) sends the in-kernel PIT's IRQ
//! 0 to IOAPIC pin 0, so an override to GSI 2 would point the kernel at a
//! pin nothing drives. A VMM that installs QEMU-style routing (GSI 0 ->
//! pin 2) adds [`IrqOverride::PIT_TO_GSI2`] through [`AcpiConfig`].

use acpi_tables::aml;
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress};

use super::e820;
use super::layout::MmioDeviceInfo;
use crate::memory::GuestMemory;

/// Where the RSDP goes: the start of the BIOS area Linux scans.
pub const RSDP_ADDR: u64 = 0xe_0000;
/// End of the area the tables may use (exclusive).
pub const ACPI_END: u64 = e820::LEGACY_HOLE_END;
// The tables must sit where the e820 map says "reserved".
const _: () = assert!(RSDP_ADDR >= e820::EBDA_START && ACPI_END <= e820::LEGACY_HOLE_END);
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const IOAPIC_ID: u8 = 0;
/// Most vCPUs the MADT can list: xAPIC ids are 8-bit and 0xff is broadcast.
pub const MAX_VCPUS: usize = 255;

pub const OEM_ID: [u8; 6] = *b"RSVMM ";
const OEM_REVISION: u32 = 1;
/// MADT flag: the machine also has dual 8259 PICs (KVM's irqchip does).
const MADT_PCAT_COMPAT: u32 = 1;
/// IA-PC boot architecture flags (FADT `iapc_boot_arch`): no VGA, no MSI
/// (no PCI). The CMOS RTC is there (`IAPC_CMOS_RTC_NOT_PRESENT`, bit 5,
/// stays clear: the VMM emulates one at [`CMOS_RTC_PORT`]). The "8042" bit
/// is left clear so Linux skips probing a keyboard; the reset port works
/// anyway.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
const IAPC_MSI_NOT_SUPPORTED: u16 = 1 << 3;
/// Where the CMOS RTC's index and data ports are (the PC's).
pub const CMOS_RTC_PORT: u64 = 0x70;
/// The i8042 command port and its CPU-reset command.
pub const RESET_PORT: u64 = 0x64;
pub const RESET_VALUE: u8 = 0xfe;
/// COM1, as the VMM's serial device sits.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// The ACPI sleep device's registers (control; status is the next port)
/// and the sleep type `\_S5_` names: the devices layer's numbers, which
/// this layer may not import (a `vm.rs` test holds them equal).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const SLEEP_STATUS_PORT: u16 = SLEEP_CONTROL_PORT + 1;
pub const S5_SLEEP_TYPE: u8 = 5;

#[derive(Debug, Error)]
pub enum AcpiError {
    #[error("the MADT can list 1 to {MAX_VCPUS} vCPUs (8-bit xAPIC ids, 0xff is broadcast); asked for {0}")]
    VcpuCount(usize),
    #[error("the ACPI tables need [{RSDP_ADDR:#x}..{end:#x}), past the end of the reserved BIOS area at {ACPI_END:#x}")]
    TooLarge { end: u64 },
    #[error("writing the ACPI {table} table to guest memory at {addr:#x} failed: {source}")]
    GuestMemory {
        table: &'static str,
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
}

/// Interrupt polarity in a MADT interrupt source override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Polarity {
    BusDefault = 0,
    ActiveHigh = 1,
    ActiveLow = 3,
}

/// Trigger mode in a MADT interrupt source override.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerMode {
    BusDefault = 0,
    Edge = 1,
    Level = 3,
}

/// A MADT interrupt source override: ISA `irq` arrives at `gsi`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IrqOverride {
    pub irq: u8,
    pub gsi: u32,
    pub polarity: Polarity,
    pub trigger: TriggerMode,
}

impl IrqOverride {
    /// The PC convention: the PIT's IRQ 0 on IOAPIC pin 2, edge-triggered.
    pub const PIT_TO_GSI2: IrqOverride = IrqOverride {
        irq: 0,
        gsi: 2,
        polarity: Polarity::BusDefault,
        trigger: TriggerMode::Edge,
    };

    /// The MADT entry (type 2, 10 bytes), bus 0 = ISA.
    fn bytes(&self) -> [u8; 10] {
        let flags = (self.polarity as u16) | (self.trigger as u16) << 2;
        let mut b = [0u8; 10];
        b[0] = 2;
        b[1] = 10;
        b[2] = 0;
        b[3] = self.irq;
        b[4..8].copy_from_slice(&self.gsi.to_le_bytes());
        b[8..10].copy_from_slice(&flags.to_le_bytes());
        b
    }
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiConfig {
    pub vcpus: usize,
    pub overrides: Vec<IrqOverride>,
    /// virtio-mmio devices, each a `LNRO0005` device in the DSDT.
    pub virtio: Vec<MmioDeviceInfo>,
}

impl AcpiConfig {
    pub fn new(vcpus: usize) -> Self {
        AcpiConfig {
            vcpus,
            overrides: Vec::new(),
            virtio: Vec::new(),
        }
    }
}

/// Where each table went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AcpiLayout {
    pub rsdp: u64,
    pub dsdt: u64,
    pub fadt: u64,
    pub madt: u64,
    pub xsdt: u64,
    /// First byte past the last table.
    pub end: u64,
}

/// Write the tables for `vcpus` vCPUs and the virtio-mmio `devices`;
/// returns the RSDP's address.
pub fn setup_acpi(
    mem: &GuestMemory,
    vcpus: usize,
    devices: &[MmioDeviceInfo],
) -> Result<u64, AcpiError> {
    let config = AcpiConfig {
        virtio: devices.to_vec(),
        ..AcpiConfig::new(vcpus)
    };
    setup_acpi_with(mem, &config).map(|l| l.rsdp)
}

/// Write the tables described by `config`.
pub fn setup_acpi_with(mem: &GuestMemory, config: &AcpiConfig) -> Result<AcpiLayout, AcpiError> {
    if config.vcpus == 0 || config.vcpus > MAX_VCPUS {
        return Err(AcpiError::VcpuCount(config.vcpus));
    }
    let mut w = Writer {
        mem,
        next: RSDP_ADDR + 64,
    };
    let dsdt = w.place("DSDT", &dsdt(&config.virtio))?;
    let fadt = w.place("FADT", &fadt(dsdt))?;
    let madt = w.place("MADT", &madt(config))?;
    let xsdt = w.place("XSDT", &xsdt(&[fadt, madt]))?;
    let end = w.next;
    w.write("RSDP", RSDP_ADDR, &bytes_of(&Rsdp::new(OEM_ID, xsdt)))?;
    Ok(AcpiLayout {
        rsdp: RSDP_ADDR,
        dsdt,
        fadt,
        madt,
        xsdt,
        end,
    })
}

struct Writer<'a> {
    mem: &'a GuestMemory,
    next: u64,
}

impl Writer<'_> {
    /// Put `table` at the next 16-byte boundary.
    fn place(&mut self, table: &'static str, bytes: &[u8]) -> Result<u64, AcpiError> {
        let addr = self.next.next_multiple_of(16);
        let end = addr + bytes.len() as u64;
        if end > ACPI_END {
            return Err(AcpiError::TooLarge { end });
        }
        self.write(table, addr, bytes)?;
        self.next = end;
        Ok(addr)
    }

    fn write(&self, table: &'static str, addr: u64, bytes: &[u8]) -> Result<(), AcpiError> {
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::GuestMemory {
                table,
                addr,
                source,
            })
    }
}

fn bytes_of(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn table_id(sig: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"RSVM    ";
    id[4..].copy_from_slice(sig);
    id
}

/// DSDT: COM1 and the virtio-mmio devices under \_SB.
fn dsdt(virtio: &[MmioDeviceInfo]) -> Vec<u8> {
    let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
    let uid = aml::Name::new("_UID".into(), &aml::ZERO);
    let io = aml::IO::new(COM1_PORT, COM1_PORT, 1, 8);
    // Extended interrupt descriptor: consumer, edge, active-high, exclusive.
    let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
    let crs_template = aml::ResourceTemplate::new(vec![&io, &irq]);
    let crs = aml::Name::new("_CRS".into(), &crs_template);
    let com1 = aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    let devices: Vec<RawAml> = virtio
        .iter()
        .enumerate()
        .map(|(i, d)| virtio_device(i, d))
        .collect();
    // Sleep type for S5 (soft off), as written to the sleep control register.
    let s5 = aml::Name::new("_S5_".into(), &aml::Package::new(vec![&S5_SLEEP_TYPE]));
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(devices.iter().map(|d| d as &dyn Aml));
    let sb = aml::Scope::new("\\_SB_".into(), children);
    // Revision 2: 64-bit AML integers.
    let mut t = Sdt::new(*b"DSDT", 36, 2, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    t.append_slice(&bytes_of(&s5));
    t.append_slice(&bytes_of(&sb));
    t.as_slice().to_vec()
}

/// A virtio-mmio device as Linux's `virtio_mmio` ACPI binding expects it
/// (`LNRO0005`, one fixed memory window, one interrupt), as Firecracker
/// describes its devices.
fn virtio_device(index: usize, d: &MmioDeviceInfo) -> RawAml {
    let name = format!("V{index:03X}");
    let hid = aml::Name::new("_HID".into(), &"LNRO0005");
    let uid = aml::Name::new("_UID".into(), &(index as u64));
    let mem = aml::Memory32Fixed::new(true, d.base as u32, d.len as u32);
    let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
    let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&mem, &irq]));
    // `aml::Device` borrows its children: encode it here.
    RawAml(bytes_of(&aml::Device::new(
        name.as_str().into(),
        vec![&hid, &uid, &crs],
    )))
}

/// AML already encoded.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        for b in &self.0 {
            sink.byte(*b);
        }
    }
}

/// FADT: hardware-reduced, DSDT through X_DSDT, reset via the i8042 port.
fn fadt(dsdt: u64) -> Vec<u8> {
    let mut b = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt)
        .preferred_pm_profile(PmProfile::EnterpriseServer)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    b.reset_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        RESET_PORT,
    );
    b.reset_value = RESET_VALUE;
    let sleep_reg = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            u64::from(port),
        )
    };
    b.sleep_control_reg = sleep_reg(SLEEP_CONTROL_PORT);
    b.sleep_status_reg = sleep_reg(SLEEP_STATUS_PORT);
    b.iapc_boot_arch = (IAPC_VGA_NOT_PRESENT | IAPC_MSI_NOT_SUPPORTED).into();
    bytes_of(&b.finalize())
}

/// MADT: the LAPIC address, one enabled Processor Local APIC per vCPU
/// (APIC id = UID = index), the IOAPIC, and the overrides.
fn madt(config: &AcpiConfig) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, table_id(b"APIC"), OEM_REVISION);
    t.write_u32(36, LAPIC_ADDR);
    t.write_u32(40, MADT_PCAT_COMPAT);
    for i in 0..config.vcpus {
        let id = i as u8;
        t.append_slice(&bytes_of(&ProcessorLocalApic::new(
            id,
            id,
            EnabledStatus::Enabled,
        )));
    }
    t.append_slice(&bytes_of(&IoApic::new(IOAPIC_ID, IOAPIC_ADDR, 0)));
    for o in &config.overrides {
        t.append_slice(&o.bytes());
    }
    t.as_slice().to_vec()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut x = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    for &e in entries {
        x.add_entry(e);
    }
    bytes_of(&x)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap()
    }

    fn read(mem: &GuestMemory, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn u16_at(b: &[u8], o: usize) -> u16 {
        u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], o: usize) -> u32 {
        u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], o: usize) -> u64 {
        u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
    }

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    /// A whole table (header length) read back from guest memory, checked.
    fn table(mem: &GuestMemory, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let hdr = read(mem, addr, 36);
        assert_eq!(&hdr[..4], sig, "signature at {addr:#x}");
        let t = read(mem, addr, u32_at(&hdr, 4) as usize);
        assert_eq!(sum(&t), 0, "{} checksum", String::from_utf8_lossy(sig));
        assert_eq!(&t[10..16], &OEM_ID);
        t
    }

    /// The MADT's entries as (type, bytes).
    fn madt_entries(t: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut out = Vec::new();
        let mut p = 44;
        while p < t.len() {
            let len = t[p + 1] as usize;
            assert!(len >= 2 && p + len <= t.len(), "bad MADT entry at {p}");
            out.push((t[p], t[p..p + len].to_vec()));
            p += len;
        }
        out
    }

    #[test]
    fn rsdp_is_at_0xe0000_with_both_checksums() {
        let m = mem();
        let rsdp = setup_acpi(&m, 2, &[]).unwrap();
        assert_eq!(rsdp, 0xe0000);
        let r = read(&m, rsdp, 36);
        assert_eq!(&r[..8], b"RSD PTR ");
        assert_eq!(sum(&r[..20]), 0, "RSDP checksum (first 20 bytes)");
        assert_eq!(sum(&r), 0, "RSDP extended checksum");
        assert_eq!(r[15], 2, "revision");
        assert_eq!(u32_at(&r, 20), 36, "length");
        assert_eq!(rsdp % 16, 0, "Linux scans 16-byte boundaries");
    }

    #[test]
    fn tables_chain_and_checksum() {
        let m = mem();
        let l = setup_acpi_with(&m, &AcpiConfig::new(4)).unwrap();
        let r = read(&m, l.rsdp, 36);
        let xsdt_addr = u64_at(&r, 24);
        assert_eq!(xsdt_addr, l.xsdt);
        let xsdt = table(&m, xsdt_addr, b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(&xsdt, o))
            .collect();
        assert_eq!(entries, vec![l.fadt, l.madt]);
        let fadt = table(&m, entries[0], b"FACP");
        let madt = table(&m, entries[1], b"APIC");
        assert!(!madt.is_empty());
        // FADT -> DSDT through X_DSDT (offset 140); the 32-bit field is 0.
        assert_eq!(u32_at(&fadt, 40), 0);
        assert_eq!(u64_at(&fadt, 140), l.dsdt);
        let dsdt = table(&m, l.dsdt, b"DSDT");
        assert!(dsdt.len() > 36);
        // Every table sits inside the reserved legacy hole, above the RSDP.
        for a in [l.dsdt, l.fadt, l.madt, l.xsdt] {
            assert!(a > RSDP_ADDR + 36 && a < ACPI_END);
        }
        assert!(l.end <= ACPI_END);
    }

    #[test]
    fn fadt_is_hardware_reduced_with_an_i8042_reset_and_s5() {
        let m = mem();
        let l = setup_acpi_with(&m, &AcpiConfig::new(1)).unwrap();
        let f = table(&m, l.fadt, b"FACP");
        assert_eq!(f.len(), 276, "ACPI 6.x FADT");
        assert_eq!(f[8], 6, "major version");
        let flags = u32_at(&f, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // RESET_REG: GAS at 116 = system I/O, 8 bits, port 0x64; value 0xFE.
        assert_eq!(f[116], 1);
        assert_eq!(f[117], 8);
        assert_eq!(u64_at(&f, 120), 0x64);
        assert_eq!(f[128], 0xfe);
        // SLEEP_CONTROL_REG (244) and SLEEP_STATUS_REG (256): 8-bit system
        // I/O at the power device's ports.
        for (at, port) in [(244, 0x600u64), (256, 0x601)] {
            assert_eq!(f[at], 1);
            assert_eq!(f[at + 1], 8);
            assert_eq!(u64_at(&f, at + 4), port);
        }
        let dsdt = table(&m, l.dsdt, b"DSDT");
        assert!(
            dsdt.windows(4).any(|w| w == b"_S5_"),
            "the DSDT names the S5 sleep type"
        );
        let boot_arch = u16_at(&f, 109);
        assert_eq!(boot_arch & (1 << 1), 0, "8042 flag left clear");
        assert_eq!(boot_arch & (1 << 5), 0, "a CMOS RTC is present");
    }

    #[test]
    fn madt_lists_every_vcpu_and_the_ioapic() {
        for n in [1usize, 2, 8, 255] {
            let m = mem();
            let l = setup_acpi_with(&m, &AcpiConfig::new(n)).unwrap();
            let t = table(&m, l.madt, b"APIC");
            assert_eq!(u32_at(&t, 36), 0xfee0_0000, "local APIC address");
            assert_eq!(u32_at(&t, 40) & 1, 1, "PCAT_COMPAT");
            let entries = madt_entries(&t);
            let lapics: Vec<&Vec<u8>> = entries
                .iter()
                .filter(|(k, _)| *k == 0)
                .map(|(_, b)| b)
                .collect();
            assert_eq!(lapics.len(), n);
            for (i, e) in lapics.iter().enumerate() {
                assert_eq!(e.len(), 8);
                assert_eq!(e[2] as usize, i, "ACPI processor UID");
                assert_eq!(e[3] as usize, i, "APIC id");
                assert_eq!(u32_at(e, 4), 1, "enabled");
            }
            let ioapics: Vec<&Vec<u8>> = entries
                .iter()
                .filter(|(k, _)| *k == 1)
                .map(|(_, b)| b)
                .collect();
            assert_eq!(ioapics.len(), 1);
            let io = ioapics[0];
            assert_eq!(io[2], 0, "IOAPIC id");
            assert_eq!(u32_at(io, 4), 0xfec0_0000);
            assert_eq!(u32_at(io, 8), 0, "GSI base");
            assert!(
                entries.iter().all(|(k, _)| *k != 2),
                "no overrides by default"
            );
        }
    }

    #[test]
    fn interrupt_source_overrides_are_encoded() {
        let m = mem();
        let cfg = AcpiConfig {
            vcpus: 2,
            virtio: vec![],
            overrides: vec![
                IrqOverride::PIT_TO_GSI2,
                IrqOverride {
                    irq: 9,
                    gsi: 9,
                    polarity: Polarity::ActiveHigh,
                    trigger: TriggerMode::Level,
                },
            ],
        };
        let l = setup_acpi_with(&m, &cfg).unwrap();
        let t = table(&m, l.madt, b"APIC");
        let isos: Vec<Vec<u8>> = madt_entries(&t)
            .into_iter()
            .filter(|(k, _)| *k == 2)
            .map(|(_, b)| b)
            .collect();
        assert_eq!(
            isos,
            vec![
                vec![2, 10, 0, 0, 2, 0, 0, 0, 0x04, 0x00],
                vec![2, 10, 0, 9, 9, 0, 0, 0, 0x0d, 0x00],
            ]
        );
    }

    #[test]
    fn dsdt_describes_com1() {
        let m = mem();
        let l = setup_acpi_with(&m, &AcpiConfig::new(1)).unwrap();
        let d = table(&m, l.dsdt, b"DSDT");
        let body = &d[36..];
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_SB_") && has(b"COM1") && has(b"_HID") && has(b"_CRS"));
        // EISAID("PNP0501") as a DWordConst.
        assert!(has(&[0x0c, 0x41, 0xd0, 0x05, 0x01]));
        // IO(Decode16, 0x3f8, 0x3f8, 1, 8).
        assert!(has(&[0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]));
        // Interrupt(ResourceConsumer, Edge, ActiveHigh, Exclusive) {4}.
        assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 0x04, 0x00, 0x00, 0x00]));
    }

    #[test]
    fn vcpu_count_is_checked() {
        let m = mem();
        assert!(matches!(
            setup_acpi(&m, 0, &[]),
            Err(AcpiError::VcpuCount(0))
        ));
        let e = setup_acpi(&m, 256, &[]).unwrap_err();
        assert!(matches!(e, AcpiError::VcpuCount(256)), "{e}");
    }

    #[test]
    fn memory_without_the_bios_area_is_an_error() {
        let m = GuestMemory::from_ranges(&[(GuestAddress(0), 0x8_0000)]).unwrap();
        let e = setup_acpi(&m, 1, &[]).unwrap_err();
        assert!(matches!(e, AcpiError::GuestMemory { .. }), "{e}");
    }
}
