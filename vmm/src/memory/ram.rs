//! Guest RAM regions: one anonymous, `MAP_NORESERVE` host mapping per
//! contiguous guest-physical range, each registered with KVM as a memslot.

use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use thiserror::Error;
use vm_memory::{GuestAddress, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

/// The guest-memory view used by loaders and devices.
pub type GuestMemory = vm_memory::GuestMemoryMmap<()>;

#[derive(Debug, Error)]
pub enum MemoryError {
    #[error("cannot map {size} bytes of guest RAM at GPA {gpa:#x}: {source}")]
    Mmap {
        gpa: u64,
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM range at {gpa:#x} of {size} bytes overflows the address space")]
    Overflow { gpa: u64, size: u64 },
    #[error("guest RAM ranges overlap or are unsorted: {0}")]
    Layout(vm_memory::GuestRegionCollectionError),
    #[error(
        "KVM_SET_USER_MEMORY_REGION (slot {slot}, GPA {gpa:#x}, {size} bytes) failed: {source}"
    )]
    SetMemslot {
        slot: u32,
        gpa: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
}

/// A contiguous guest-physical RAM range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RamRange {
    pub gpa: u64,
    pub size: u64,
}

impl RamRange {
    pub fn end(&self) -> u64 {
        self.gpa + self.size
    }
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.end()
    }
}

/// All boot-time guest RAM.
pub struct GuestRam {
    ranges: Vec<RamRange>,
    regions: Vec<Arc<GuestRegionMmap<()>>>,
    mem: GuestMemory,
}

impl GuestRam {
    /// Map anonymous memory for each range (not populated: `MAP_NORESERVE`).
    pub fn new(ranges: &[RamRange]) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(ranges.len());
        for r in ranges {
            let mapping = MmapRegion::<()>::build(
                None,
                r.size as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            )
            .map_err(|source| MemoryError::Mmap {
                gpa: r.gpa,
                size: r.size,
                source,
            })?;
            let region = GuestRegionMmap::new(mapping, GuestAddress(r.gpa)).ok_or(
                MemoryError::Overflow {
                    gpa: r.gpa,
                    size: r.size,
                },
            )?;
            regions.push(Arc::new(region));
        }
        let mem = GuestMemory::from_arc_regions(regions.clone()).map_err(MemoryError::Layout)?;
        Ok(Self {
            ranges: ranges.to_vec(),
            regions,
            mem,
        })
    }

    /// The guest-memory view for loaders and devices.
    pub fn memory(&self) -> &GuestMemory {
        &self.mem
    }

    pub fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.ranges.iter().map(|r| r.size).sum()
    }

    /// Host address of each range, in the order of [`Self::ranges`].
    pub fn host_addrs(&self) -> Vec<u64> {
        self.regions.iter().map(|r| r.as_ptr() as u64).collect()
    }

    /// Each range's guest address and host mapping.
    pub fn mappings(&self) -> Vec<(u64, Arc<MmapRegion<()>>)> {
        self.regions
            .iter()
            .map(|r| (r.start_addr().0, r.get_mmap()))
            .collect()
    }

    /// Register every range with KVM, as slots 0..n.
    pub fn register(&self, vm: &VmFd) -> Result<(), MemoryError> {
        for (slot, region) in self.regions.iter().enumerate() {
            let gpa = region.start_addr().0;
            let size = region.len();
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: 0,
                guest_phys_addr: gpa,
                memory_size: size,
                userspace_addr: region.as_ptr() as u64,
            };
            // SAFETY: the mapping is owned by `self` (kept alive in `regions`)
            // for as long as the VM exists: `Vm` drops vCPUs and the VM fd
            // before `GuestRam`.
            unsafe { vm.set_user_memory_region(r) }.map_err(|source| MemoryError::SetMemslot {
                slot: slot as u32,
                gpa,
                size,
                source,
            })?;
        }
        Ok(())
    }
}
