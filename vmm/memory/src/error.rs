//! The one error type of guest-memory management.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum MemError {
    #[error("GPA range [{gpa:#x}..{end:#x}) is not page aligned, empty or wraps")]
    Unaligned { gpa: u64, end: u64 },
    #[error("GPA range [{gpa:#x}..{end:#x}) overlaps an existing memslot")]
    Overlap { gpa: u64, end: u64 },
    #[error("no memslot starts at GPA {0:#x}")]
    NoSuchSlot(u64),
    #[error("GPA range [{gpa:#x}..{end:#x}) is not inside one memslot")]
    NotInOneSlot { gpa: u64, end: u64 },
    #[error("GPA range [{gpa:#x}..{end:#x}) is not a whole number of blocks of a block slot")]
    NotBlocks { gpa: u64, end: u64 },
    #[error("no free KVM memslot (limit {0})")]
    NoFreeSlot(usize),
    #[error("cannot map {size} bytes of guest RAM for GPA {gpa:#x}: {source}")]
    Mmap {
        gpa: u64,
        size: u64,
        source: vm_memory::mmap::MmapRegionError,
    },
    #[error("guest RAM ranges overlap, are unsorted or overflow: {0}")]
    Layout(vm_memory::GuestRegionCollectionError),
    #[error(
        "KVM_SET_USER_MEMORY_REGION slot {slot} (GPA {gpa:#x}, {size} bytes) failed: {source}"
    )]
    Kvm {
        slot: u32,
        gpa: u64,
        size: u64,
        source: kvm_ioctls::Error,
    },
    #[error("reading the dirty log of slot {slot} (GPA {gpa:#x}) failed: {source}")]
    DirtyLog {
        slot: u32,
        gpa: u64,
        source: kvm_ioctls::Error,
    },
    #[error("userfaultfd {what} failed: {source}")]
    Uffd {
        what: &'static str,
        source: userfaultfd::Error,
    },
    #[error("userfaultfd is already attached to guest memory")]
    UffdAttached,
    #[error("madvise({what}) on [{hva:#x}+{len:#x}] failed: {source}")]
    Madvise {
        what: &'static str,
        hva: u64,
        len: u64,
        source: std::io::Error,
    },
    #[error("{0}")]
    HugePages(String),
}
