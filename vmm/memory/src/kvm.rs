//! Where memslots are registered: KVM in the product, nothing in unit tests
//! that exercise the memory manager and fault engine without /dev/kvm.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

/// `KVM_SET_USER_MEMORY_REGION` and `KVM_GET_DIRTY_LOG`, as the memory
/// manager uses them.
pub trait KvmSlots: Send + Sync {
    /// Register `[gpa, gpa+size)` backed by host memory at `hva` as `slot`;
    /// `size == 0` deletes the slot. `log_dirty`: KVM records every page
    /// the guest writes (registering an existing slot again with another
    /// flag turns the log on or off).
    ///
    /// The caller ([`super::MemoryManager`]) keeps the mapping at `hva`
    /// alive until after the slot is deleted.
    fn set_region(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        hva: u64,
        log_dirty: bool,
    ) -> Result<(), kvm_ioctls::Error>;

    /// The pages of `slot` (`size` bytes) the guest wrote since the last
    /// call (one bit per page), and the log cleared.
    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, kvm_ioctls::Error>;

    /// How the log is kept and what keeping it cost so far.
    fn dirty_log_stats(&self) -> DirtyLogStats {
        DirtyLogStats::default()
    }
}

/// How KVM's dirty log is kept and its counters since the VM began.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DirtyLogStats {
    /// `bitmap` or `ring:ENTRIES`.
    pub kind: String,
    /// Ring entries harvested.
    pub ring_entries: u64,
    /// Harvests by a vCPU whose ring was full (`KVM_EXIT_DIRTY_RING_FULL`).
    pub ring_full: u64,
    /// Times the host wrote past a ring (every page then counted as
    /// written once).
    pub ring_lost: u64,
    /// Time spent reading the log (`KVM_GET_DIRTY_LOG`, or harvesting and
    /// `KVM_RESET_DIRTY_RINGS`) for its readers, in nanoseconds (the
    /// memory manager's; vCPU harvests not included).
    pub read_ns: u64,
}

impl KvmSlots for VmFd {
    fn set_region(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        hva: u64,
        log_dirty: bool,
    ) -> Result<(), kvm_ioctls::Error> {
        let r = kvm_userspace_memory_region {
            slot,
            flags: if log_dirty {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        };
        // SAFETY: the memory manager owns the mapping at `hva` (through the
        // slot's backing) and deletes the KVM slot before the mapping can be
        // unmapped, so KVM never sees a dangling address.
        unsafe { self.set_user_memory_region(r) }
    }

    fn dirty_log(&self, slot: u32, size: u64) -> Result<Vec<u64>, kvm_ioctls::Error> {
        self.get_dirty_log(slot, size as usize)
    }

    fn dirty_log_stats(&self) -> DirtyLogStats {
        DirtyLogStats {
            kind: "bitmap".into(),
            ..Default::default()
        }
    }
}

/// No hypervisor: for tests of memory and faults without /dev/kvm. The
/// guest writes nothing of its own (its log is always empty).
pub struct NoKvm;

impl KvmSlots for NoKvm {
    fn set_region(&self, _: u32, _: u64, _: u64, _: u64, _: bool) -> Result<(), kvm_ioctls::Error> {
        Ok(())
    }

    fn dirty_log(&self, _: u32, size: u64) -> Result<Vec<u64>, kvm_ioctls::Error> {
        Ok(vec![0; size.div_ceil(super::PAGE_SIZE * 64) as usize])
    }
}
