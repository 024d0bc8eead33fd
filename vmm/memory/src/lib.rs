//! Guest memory: [`MemoryManager`], the one owner of guest RAM (host
//! mappings, KVM memslots, userfaultfd registration, and the guest-memory
//! view loaders and devices use), and the page sources it fills pages from.
//! The memslot table and its install protocol live in the `memslots` crate.

mod error;
pub mod hugetlb;
mod kvm;
mod manager;
pub mod migrate;
mod partial;
pub mod ring;
pub mod snapshot;
mod source;

pub use error::MemError;
pub use kvm::{DirtyLogStats, KvmSlots, NoKvm};
pub use manager::{
    MemStat, MemoryManager, MemoryStats, NewSlot, Slot, SlotBacking, MEMORY_METRICS,
};
pub use memslots::PAGE_SIZE;
pub use source::{Arrival, ImageFile, PageSource, Redirect, SourceError};

/// The guest-memory view used by loaders and devices (a snapshot of it).
/// Every write through it marks its pages in the region's bitmap: the
/// pages the VMM itself changed, which KVM's dirty log cannot see (a diff
/// snapshot takes both).
pub type GuestMemory = vm_memory::GuestMemoryMmap<AtomicBitmap>;
pub use vm_memory::bitmap::AtomicBitmap;

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

/// Count resident pages of a host mapping with mincore(2) (0 if the range
/// is not mapped).
pub fn resident_pages(hva: u64, size: u64) -> u64 {
    let pages = size.div_ceil(PAGE_SIZE) as usize;
    let mut vec = vec![0u8; pages];
    // SAFETY: `vec` has one byte per page of the range; mincore only reads
    // page-table state and fails cleanly (ENOMEM) on unmapped ranges.
    let r = unsafe { libc::mincore(hva as *mut libc::c_void, size as usize, vec.as_mut_ptr()) };
    if r != 0 {
        return 0;
    }
    vec.iter().filter(|b| *b & 1 != 0).count() as u64
}
