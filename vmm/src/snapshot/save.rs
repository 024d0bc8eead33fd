//! Taking a snapshot of a running VM.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::Serialize;
use vmm_snapshot::{BaseRef, MemoryFile, SnapshotWriter};

use super::{
    vcpu_section, DevicesSnapshot, SnapshotError, VcpuSnapshot, VmRecord, VmSnapshot, DEVICES,
    MEMORY, MEMORY_BASE, VM,
};
use crate::devices::lock;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::balloon::Balloon;
use crate::devices::virtio::mem::VirtioMem;
use crate::devices::virtio::mmio::MmioTransport;
use crate::exit::VmExit;
use crate::memory::{MemoryManager, RamRange};
use crate::vcpu::pause::Pause;

/// How long the vCPUs get to stop at an exit.
pub(super) const PAUSE_LIMIT: Duration = Duration::from_secs(10);

/// What a snapshot took.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotSummary {
    pub dir: PathBuf,
    /// How long the guest was stopped.
    pub paused_ms: f64,
    pub total_ms: f64,
    /// Guest RAM in the memory file (holes included).
    pub memory_bytes: u64,
    /// Pages written (the rest are holes).
    pub data_bytes: u64,
    /// The VM runs on (else it stays paused until resumed).
    pub resumed: bool,
    /// A diff snapshot: the snapshot it is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
}

/// The snapshot a diff is taken on: the VM's last one, taken or restored
/// from. What changed in guest RAM is tracked from that moment.
#[derive(Debug, Clone)]
pub struct Base {
    /// Its directory (absolute).
    pub dir: PathBuf,
    pub memory: MemoryFile,
    /// Its RAM, slot by slot.
    pub ram: Vec<RamRange>,
}

impl Base {
    /// `dir` as a path from `cwd` if relative (resolved here, with no
    /// system call: the control thread may not make the ones
    /// `canonicalize` does).
    pub fn new(
        cwd: &Path,
        dir: &Path,
        memory: MemoryFile,
        layout: &[crate::memory::snapshot::SlotImage],
    ) -> Self {
        Self {
            dir: cwd.join(dir),
            memory,
            ram: layout
                .iter()
                .map(|s| RamRange {
                    gpa: s.gpa,
                    size: s.size,
                })
                .collect(),
        }
    }
}

fn kvm<T>(what: &'static str, r: Result<T, kvm_ioctls::Error>) -> Result<T, SnapshotError> {
    r.map_err(|source| SnapshotError::Kvm { what, source })
}

/// Everything a snapshot reads; built with the VM.
pub struct Snapshotter {
    pub pause: Arc<Pause>,
    pub exit: Arc<VmExit>,
    pub vm_fd: Arc<VmFd>,
    pub memory: Arc<MemoryManager>,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub signal: Arc<AtomicU32>,
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub balloon: Option<Arc<Mutex<Balloon>>>,
    pub mem: Option<Arc<Mutex<VirtioMem>>>,
    pub record: VmRecord,
    /// One snapshot at a time.
    pub busy: Mutex<()>,
    /// What a diff is taken on (none until a snapshot is taken or
    /// restored, and after a failed one).
    pub base: Mutex<Option<Base>>,
    /// The VMM's working directory, where a relative `dir` is.
    pub cwd: PathBuf,
}

impl Snapshotter {
    /// Save the VM into `dir` (which must not exist). The guest is stopped
    /// while its state and memory are written, then runs on unless
    /// `resume` is false (then [`Pause::resume`] lets it go). Any failure
    /// leaves no snapshot and the VM running. `diff`: only the pages
    /// changed since the last snapshot, which becomes this one's base.
    pub fn snapshot(
        &self,
        dir: &Path,
        resume: bool,
        diff: bool,
    ) -> Result<SnapshotSummary, SnapshotError> {
        let _one = self.busy.try_lock().map_err(|_| SnapshotError::Busy)?;
        let t0 = Instant::now();
        let base = match diff {
            true => Some(lock(&self.base).clone().ok_or(SnapshotError::NoBase)?),
            false => None,
        };
        let mut w = SnapshotWriter::create(dir)?;
        if let Some(b) = &base {
            w.set_base(BaseRef {
                dir: b.dir.clone(),
                memory: b.memory,
            });
        }
        let vcpus = self.pause.pause(true, &self.exit, PAUSE_LIMIT)?;
        // From here what changed since the base is being consumed: unless
        // this snapshot lands, the next diff has no base.
        lock(&self.base).take();
        let taken = self.save_paused(&mut w, &vcpus, base.as_ref());
        let paused = t0.elapsed();
        let resumed = resume || taken.is_err();
        if resumed {
            let _ = self.pause.resume();
        }
        let (memory, layout) = taken?;
        w.commit(self.record_now(&vcpus), memory)?;
        if self.memory.tracks_dirty() {
            *lock(&self.base) = Some(Base::new(&self.cwd, dir, memory, &layout));
        }
        log::info!(
            "snapshot {}{}: guest stopped {:.1} ms, {} MiB written",
            dir.display(),
            base.as_ref()
                .map(|b| format!(" (diff on {})", b.dir.display()))
                .unwrap_or_default(),
            paused.as_secs_f64() * 1e3,
            memory.data_bytes >> 20
        );
        Ok(SnapshotSummary {
            dir: dir.to_path_buf(),
            paused_ms: paused.as_secs_f64() * 1e3,
            total_ms: t0.elapsed().as_secs_f64() * 1e3,
            memory_bytes: memory.bytes,
            data_bytes: memory.data_bytes,
            resumed,
            base: base.map(|b| b.dir),
        })
    }

    /// With every vCPU parked: hold every virtio device still (its
    /// transport's lock, which its queue processing takes), save them,
    /// the VM's in-kernel state, the vCPUs, and guest RAM (all of it, or
    /// what changed since `base`). Tracking what changes starts (again)
    /// here, with everything still.
    fn save_paused(
        &self,
        w: &mut SnapshotWriter,
        vcpus: &[VcpuSnapshot],
        base: Option<&Base>,
    ) -> Result<(MemoryFile, Vec<crate::memory::snapshot::SlotImage>), SnapshotError> {
        let transports: Vec<_> = self.transports.iter().map(|t| lock(t)).collect();
        let devices = self.save_devices(&transports);
        w.section(VM, &self.save_vm()?)?;
        w.section(DEVICES, &devices)?;
        for (i, v) in vcpus.iter().enumerate() {
            w.section(&vcpu_section(i), v)?;
        }
        let total = self.memory.snapshot().slots.iter().map(|s| s.size).sum();
        let mut mw = w.memory(total)?;
        let mut sink = |off, bytes: &[u8]| mw.write_at(off, bytes);
        let layout = match base {
            None => {
                let layout = self
                    .memory
                    .save_pages(&mut sink)
                    .map_err(|e| SnapshotError::Memory(e.to_string()))?;
                if let Err(e) = self.memory.track_dirty() {
                    log::warn!("guest RAM changes are not tracked ({e}): a diff snapshot cannot follow this one");
                }
                layout
            }
            Some(b) => {
                let (layout, pages) = self
                    .memory
                    .save_diff(&mut sink, &b.ram)
                    .map_err(|e| SnapshotError::Memory(e.to_string()))?;
                w.section(MEMORY_BASE, &pages)?;
                layout
            }
        };
        w.section(MEMORY, &layout)?;
        drop(transports);
        Ok((mw.finish()?, layout))
    }

    /// The devices, with every virtio transport held (`transports`: their
    /// locks).
    pub(super) fn save_devices(
        &self,
        transports: &[std::sync::MutexGuard<'_, MmioTransport>],
    ) -> DevicesSnapshot {
        DevicesSnapshot {
            serial: lock(&self.serial).save(),
            signal: self.signal.load(Ordering::Acquire),
            transports: transports.iter().map(|t| t.save()).collect(),
            balloon: self.balloon.as_ref().map(|b| lock(b).save()),
            mem: self.mem.as_ref().map(|m| lock(m).save()),
        }
    }

    /// The manifest's record of the VM: vCPU 0's CPUID, the time.
    pub(super) fn record_now(&self, vcpus: &[VcpuSnapshot]) -> VmRecord {
        let mut record = self.record.clone();
        record.cpuid = vcpus.first().map(|v| v.cpuid.clone()).unwrap_or_default();
        record.created_unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        record
    }

    pub(super) fn save_vm(&self) -> Result<VmSnapshot, SnapshotError> {
        let chip = |id| -> Result<kvm_irqchip, SnapshotError> {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            kvm("KVM_GET_IRQCHIP", self.vm_fd.get_irqchip(&mut c))?;
            Ok(c)
        };
        Ok(VmSnapshot {
            clock: kvm("KVM_GET_CLOCK", self.vm_fd.get_clock())?,
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
            pit: kvm("KVM_GET_PIT2", self.vm_fd.get_pit2())?,
        })
    }
}
