//! Reading a snapshot back: every section is read, checked and decoded, and
//! the snapshot checked against this host, before any KVM object exists;
//! then the VM's in-kernel state and its devices are put back into a VM
//! the vm layer built (`vm::restore`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::CpuId;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vmm_snapshot::SnapshotReader;

use super::{
    vcpu_section, DevicesSnapshot, VcpuSnapshot, VmRecord, VmSnapshot, DEVICES, MEMORY,
    MEMORY_BASE, VM,
};
use crate::config::{Prefetch, VmConfig};
use crate::devices::lock;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mem::VirtioMem;
use crate::devices::virtio::mmio::MmioTransport;
use crate::fault::prefetch::{coalesce, Plan};
use crate::host::KvmFlavor;
use crate::memory::snapshot::{check_layout, layer, BasePages, SlotImage};
use crate::memory::{ImageFile, SourceError, PAGE_SIZE};
use crate::vcpu::state::{CpuidEntry, StateError};

/// The working set a restore records, beside the snapshot's files.
pub const WORKING_SET: &str = "working-set";

#[derive(Debug, Error)]
pub enum RestoreError {
    #[error(transparent)]
    Format(#[from] vmm_snapshot::SnapshotError),
    #[error("the snapshot was taken on {saved}; this host is {here} (a snapshot restores on the kind of host that took it)")]
    Host { saved: String, here: String },
    #[error("manifest: {saved} vCPUs, more than this host allows ({max})")]
    TooManyVcpus { saved: usize, max: usize },
    #[error("section {section}: {why}")]
    Inconsistent { section: String, why: String },
    #[error("section {section}: CPUID leaf {function:#x} index {index} {reg} has bits {bits:#x} this host's KVM does not offer")]
    Cpuid {
        section: String,
        function: u32,
        index: u32,
        reg: &'static str,
        bits: u32,
    },
    #[error("section {section}: CPUID leaf {function:#x} index {index} is not one this host's KVM offers")]
    CpuidLeaf {
        section: String,
        function: u32,
        index: u32,
    },
    #[error("restoring section {section}: {what} failed: {source}")]
    Kvm {
        section: &'static str,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("restoring section vcpu{vcpu}: {error}")]
    Vcpu { vcpu: usize, error: StateError },
    #[error("restoring section devices: {0}")]
    Device(String),
    #[error("restoring section memory: {0}")]
    Memory(#[from] crate::memory::snapshot::RestoreError),
    #[error("{0}")]
    Options(String),
    #[error("working set {path}: {why}")]
    WorkingSet { path: String, why: String },
    #[error("the base of {diff}, {base}: {why}")]
    Base {
        diff: PathBuf,
        base: PathBuf,
        why: String,
    },
    #[error(transparent)]
    Image(#[from] SourceError),
}

/// Most diffs one restore stacks (a bound on a chain of bases, and on a
/// cycle of them).
const MAX_LAYERS: usize = 64;

/// A snapshot read and checked (or a migration received): everything a
/// restore needs, decoded.
pub struct Loaded {
    /// The snapshot directory (none for a migration).
    pub reader: Option<SnapshotReader<VmRecord>>,
    pub record: VmRecord,
    /// The memory file as the manifest gives it.
    pub memory: vmm_snapshot::MemoryFile,
    pub vm: VmSnapshot,
    pub devices: DevicesSnapshot,
    pub vcpus: Vec<VcpuSnapshot>,
    /// Guest RAM's layout; for a diff, with its bases' pages in it.
    pub layout: Vec<SlotImage>,
    /// The memory file; for a diff, reading each page from the layer
    /// that has it.
    pub image: Arc<ImageFile>,
    /// A diff's bases, farthest first (each checked as `reader` is).
    pub bases: Vec<SnapshotReader<VmRecord>>,
}

impl Loaded {
    /// Open `dir`, check every section, decode them and check the snapshot
    /// against this host (its kind, vCPU limit and CPUID).
    pub fn open(
        dir: &Path,
        flavor: KvmFlavor,
        max_vcpus: usize,
        supported: &CpuId,
    ) -> Result<Self, RestoreError> {
        let reader = SnapshotReader::<VmRecord>::open(dir)?;
        let record = &reader.manifest.info;
        check_record(record, flavor, max_vcpus, supported)?;
        let vcpus: Vec<VcpuSnapshot> = (0..record.vcpus)
            .map(|i| reader.section(&vcpu_section(i)))
            .collect::<Result<_, _>>()?;
        let layout = checked_layout(&reader)?;
        let mut bases = Vec::new();
        let (layout, image) = layered(&reader, layout, &mut bases, 0)?;
        let loaded = Self {
            vm: reader.section(VM)?,
            devices: reader.section(DEVICES)?,
            vcpus,
            layout,
            image,
            bases,
            record: reader.manifest.info.clone(),
            memory: reader.manifest.memory,
            reader: Some(reader),
        };
        loaded.check(flavor, max_vcpus, supported)?;
        Ok(loaded)
    }

    /// Check the VM against this host: its kind, vCPU limit and CPUID.
    pub fn check(
        &self,
        flavor: KvmFlavor,
        max_vcpus: usize,
        supported: &CpuId,
    ) -> Result<(), RestoreError> {
        let record = &self.record;
        check_record(record, flavor, max_vcpus, supported)?;
        if self.vcpus.len() != record.vcpus {
            return Err(RestoreError::Inconsistent {
                section: "manifest".into(),
                why: format!("{} vCPUs, {} vCPU states", record.vcpus, self.vcpus.len()),
            });
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            check_cpuid(&vcpu_section(i), &v.cpuid, supported)?;
        }
        Ok(())
    }

    /// Check every memory file's checksum: the snapshot's and its bases'.
    pub fn verify_memory(&self) -> Result<(), RestoreError> {
        if let Some(r) = &self.reader {
            r.verify_memory()?;
        }
        for b in &self.bases {
            b.verify_memory()?;
        }
        Ok(())
    }

    pub fn record(&self) -> &VmRecord {
        &self.record
    }

    /// `base` (the restoring command's options) with the saved VM's shape:
    /// its RAM, vCPUs, devices and command line.
    pub fn config(&self, base: &VmConfig) -> VmConfig {
        let saved = &self.record().config;
        VmConfig {
            mem_size: saved.mem_size,
            vcpus: saved.vcpus,
            cmdline: saved.cmdline.clone(),
            balloon: saved.balloon,
            hotplug: saved.hotplug,
            syscall_assist: saved.syscall_assist,
            initrd: None,
            mem_source: None,
            mem_hugepages: false,
            ..base.clone()
        }
    }

    /// What the prefetch thread goes through: the recorded working set
    /// (sorted into runs), then for `all` every page the file holds.
    pub fn plan(&self, prefetch: Prefetch) -> Result<Plan, RestoreError> {
        Ok(match prefetch {
            Prefetch::None => Plan::default(),
            Prefetch::WorkingSet => Plan {
                working_set: coalesce(self.working_set()?),
                rest: Vec::new(),
            },
            Prefetch::All => Plan {
                working_set: Vec::new(),
                rest: data_runs(&self.layout),
            },
        })
    }

    /// The recorded working set (`--record-working-set` of an earlier
    /// restore): runs of (gpa, pages) in touch order.
    pub fn working_set(&self) -> Result<Vec<(u64, u64)>, RestoreError> {
        let Some(reader) = &self.reader else {
            return Err(RestoreError::WorkingSet {
                path: WORKING_SET.into(),
                why: "a migrated VM has no snapshot directory".into(),
            });
        };
        let path = reader.dir().join(WORKING_SET);
        let bad = |why: String| RestoreError::WorkingSet {
            path: path.display().to_string(),
            why,
        };
        let runs: Vec<(u64, u64)> = vmm_snapshot::read_sidecar(&path).map_err(|e| {
            bad(format!(
                "{e} (record one with `vmm restore --record-working-set`)"
            ))
        })?;
        let inside = |gpa: u64, pages: u64| {
            self.layout.iter().any(|s| {
                gpa >= s.gpa
                    && pages
                        .checked_mul(PAGE_SIZE)
                        .and_then(|b| b.checked_add(gpa))
                        .is_some_and(|end| end <= s.gpa + s.size)
            })
        };
        if let Some((g, n)) = runs
            .iter()
            .find(|(g, n)| *n == 0 || g % PAGE_SIZE != 0 || !inside(*g, *n))
        {
            return Err(bad(format!(
                "run at {g:#x} of {n} pages is not inside the snapshot's RAM"
            )));
        }
        Ok(runs)
    }
}

/// The memory layout a snapshot in `dir` holds (its `memory` section,
/// checked).
pub fn memory_layout(dir: &Path) -> Result<Vec<SlotImage>, RestoreError> {
    Ok(SnapshotReader::<VmRecord>::open(dir)?.section(MEMORY)?)
}

/// Every run of pages the memory file holds, in file order.
fn data_runs(layout: &[SlotImage]) -> Vec<(u64, u64)> {
    layout
        .iter()
        .flat_map(|s| {
            s.data_runs(u64::MAX)
                .map(move |(p, n)| (s.gpa + p * PAGE_SIZE, n))
        })
        .collect()
}

/// CPUID feature registers a restored guest may rely on: each bit it was
/// given must be one this host's KVM offers. (Leaf, index, register.)
const FEATURE_REGS: &[(u32, u32, &str)] = &[
    (1, 0, "ecx"),
    (1, 0, "edx"),
    (7, 0, "ebx"),
    (7, 0, "ecx"),
    (7, 0, "edx"),
    (0xd, 1, "eax"),
    (0x8000_0001, 0, "ecx"),
    (0x8000_0001, 0, "edx"),
];

/// Bits not offered by KVM but set from guest state (OSXSAVE, OSPKE) or
/// by the VMM itself for any host (HYPERVISOR, and HTT for a VM of several
/// vCPUs: `arch::x86_64::cpuid`): never "missing" on a host.
fn dynamic_bits(function: u32, reg: &str) -> u32 {
    match (function, reg) {
        (1, "ecx") => (1 << 27) | (1 << 31),
        (1, "edx") => 1 << 28,
        (7, "ecx") => 1 << 4,
        _ => 0,
    }
}

fn reg(e: &CpuidEntry, name: &str) -> u32 {
    match name {
        "eax" => e.eax,
        "ebx" => e.ebx,
        "ecx" => e.ecx,
        _ => e.edx,
    }
}

/// The CPUID `entries` (a section's) against what the host supports.
pub fn check_cpuid(
    section: &str,
    entries: &[CpuidEntry],
    supported: &CpuId,
) -> Result<(), RestoreError> {
    let host = crate::vcpu::state::cpuid_entries(supported);
    for &(function, index, name) in FEATURE_REGS {
        let Some(saved) = entries
            .iter()
            .find(|e| e.function == function && e.index == index)
        else {
            continue;
        };
        let Some(here) = host
            .iter()
            .find(|e| e.function == function && e.index == index)
        else {
            return Err(RestoreError::CpuidLeaf {
                section: section.to_string(),
                function,
                index,
            });
        };
        let missing = reg(saved, name) & !reg(here, name) & !dynamic_bits(function, name);
        if missing != 0 {
            return Err(RestoreError::Cpuid {
                section: section.to_string(),
                function,
                index,
                reg: name,
                bits: missing,
            });
        }
    }
    Ok(())
}

/// The in-kernel PIC pair, IOAPIC and PIT (after the vCPUs exist; before
/// their LAPICs are set).
pub fn restore_irqchips(vm_fd: &VmFd, s: &VmSnapshot) -> Result<(), RestoreError> {
    let kvm = |what, r: Result<(), kvm_ioctls::Error>| {
        r.map_err(|source| RestoreError::Kvm {
            section: VM,
            what,
            source,
        })
    };
    kvm(
        "KVM_SET_IRQCHIP (PIC master)",
        vm_fd.set_irqchip(&s.pic_master),
    )?;
    kvm(
        "KVM_SET_IRQCHIP (PIC slave)",
        vm_fd.set_irqchip(&s.pic_slave),
    )?;
    kvm("KVM_SET_IRQCHIP (IOAPIC)", vm_fd.set_irqchip(&s.ioapic))?;
    kvm("KVM_SET_PIT2", vm_fd.set_pit2(&s.pit))
}

/// kvmclock, last (the guest's clock goes on from where it was saved).
pub fn restore_clock(vm_fd: &VmFd, s: &VmSnapshot) -> Result<(), RestoreError> {
    let mut clock = s.clock;
    // Only the time itself: flags describe the saving host's clock
    // (KVM_SET_CLOCK takes KVM_CLOCK_REALTIME only, which would move it).
    clock.flags = 0;
    vm_fd.set_clock(&clock).map_err(|source| RestoreError::Kvm {
        section: VM,
        what: "KVM_SET_CLOCK",
        source,
    })
}

/// The devices a restored VM has, built from the saved configuration.
pub struct RestoredDevices<'a> {
    pub serial: &'a Arc<Mutex<SerialDevice>>,
    pub signal: &'a AtomicU32,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub balloon: Option<&'a Arc<Mutex<Balloon>>>,
    pub mem: Option<&'a Arc<Mutex<VirtioMem>>>,
}

impl RestoredDevices<'_> {
    /// Put every device's saved state back (devices first, then their
    /// transports: a transport that was active activates its device).
    pub fn restore(&self, s: &DevicesSnapshot) -> Result<(), RestoreError> {
        let bad = |why: String| RestoreError::Device(why);
        lock(self.serial)
            .restore(&s.serial)
            .map_err(|e| bad(format!("serial: {e}")))?;
        self.signal.store(s.signal, Ordering::Release);
        match (self.balloon, &s.balloon) {
            (Some(d), Some(saved)) => lock(d).restore(saved).map_err(|e| bad(e.to_string()))?,
            (None, None) => {}
            _ => {
                return Err(bad(
                    "the balloon is in the snapshot or the VM, not both".into()
                ))
            }
        }
        match (self.mem, &s.mem) {
            (Some(d), Some(saved)) => lock(d).restore(saved).map_err(|e| bad(e.to_string()))?,
            (None, None) => {}
            _ => {
                return Err(bad(
                    "virtio-mem is in the snapshot or the VM, not both".into()
                ))
            }
        }
        if self.transports.len() != s.transports.len() {
            return Err(bad(format!(
                "{} virtio transports saved, {} built",
                s.transports.len(),
                self.transports.len()
            )));
        }
        for (i, (t, saved)) in self.transports.iter().zip(&s.transports).enumerate() {
            lock(t)
                .restore(saved)
                .map_err(|e| bad(format!("virtio transport {i}: {e}")))?;
        }
        Ok(())
    }
}

/// A snapshot's memory layout, checked (`check_layout`) against its
/// memory file before anything is laid over it.
fn checked_layout(reader: &SnapshotReader<VmRecord>) -> Result<Vec<SlotImage>, RestoreError> {
    let layout: Vec<SlotImage> = reader.section(MEMORY)?;
    check_layout(&layout, reader.manifest.memory.bytes)?;
    let total: u64 = layout.iter().map(|s| s.size).sum();
    if total != reader.manifest.memory.bytes {
        return Err(RestoreError::Inconsistent {
            section: MEMORY.to_string(),
            why: format!(
                "slots of {total} bytes, the memory file has {}",
                reader.manifest.memory.bytes
            ),
        });
    }
    Ok(layout)
}

/// The layout and memory image of `reader`'s snapshot: for a diff, laid
/// over its base's (recursively; each base opened and checked, and pushed
/// onto `bases`). A base must be the very snapshot the diff was taken on
/// (its memory file's size and checksum) of the same VM.
fn layered(
    reader: &SnapshotReader<VmRecord>,
    mut layout: Vec<SlotImage>,
    bases: &mut Vec<SnapshotReader<VmRecord>>,
    depth: usize,
) -> Result<(Vec<SlotImage>, Arc<ImageFile>), RestoreError> {
    let path = reader.memory_path();
    let len = reader.manifest.memory.bytes;
    let Some(base) = &reader.manifest.base else {
        return Ok((layout, ImageFile::open(&path, len)?));
    };
    let bad = |why: String| RestoreError::Base {
        diff: reader.dir().to_path_buf(),
        base: base.dir.clone(),
        why,
    };
    if depth >= MAX_LAYERS {
        return Err(bad(format!("more than {MAX_LAYERS} diffs on one another")));
    }
    let below = SnapshotReader::<VmRecord>::open(&base.dir).map_err(|e| bad(e.to_string()))?;
    if below.manifest.memory != base.memory {
        return Err(bad(format!(
            "its memory file is not the one the diff was taken on (checksum {:#010x}, {} bytes of data; the diff expects {:#010x}, {} bytes): it was replaced",
            below.manifest.memory.crc32,
            below.manifest.memory.data_bytes,
            base.memory.crc32,
            base.memory.data_bytes
        )));
    }
    let (mine, theirs) = (&reader.manifest.info, &below.manifest.info);
    if mine.host != theirs.host || mine.config != theirs.config {
        return Err(bad("it is a snapshot of another VM".into()));
    }
    let below_layout = checked_layout(&below).map_err(|e| bad(e.to_string()))?;
    let base_pages: BasePages = reader.section(MEMORY_BASE)?;
    let (below_layout, below_image) = layered(&below, below_layout, bases, depth + 1)?;
    bases.push(below);
    let redirects = layer(&mut layout, &base_pages, &below_layout)?;
    Ok((
        layout,
        ImageFile::open_over(&path, len, below_image, redirects)?,
    ))
}

/// The manifest's record against this host: its kind, vCPU limit, CPUID.
fn check_record(
    record: &VmRecord,
    flavor: KvmFlavor,
    max_vcpus: usize,
    supported: &CpuId,
) -> Result<(), RestoreError> {
    if record.host != flavor.tag() {
        return Err(RestoreError::Host {
            saved: record.host.clone(),
            here: flavor.tag().to_string(),
        });
    }
    if record.vcpus > max_vcpus {
        return Err(RestoreError::TooManyVcpus {
            saved: record.vcpus,
            max: max_vcpus,
        });
    }
    let inconsistent = |section: &str, why: String| RestoreError::Inconsistent {
        section: section.to_string(),
        why,
    };
    if record.vcpus == 0 || record.vcpus != record.config.vcpus {
        return Err(inconsistent(
            "manifest",
            format!(
                "{} vCPUs, its configuration says {}",
                record.vcpus, record.config.vcpus
            ),
        ));
    }
    check_cpuid("manifest", &record.cpuid, supported)
}
