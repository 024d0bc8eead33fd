//! Where memslots are registered: KVM in the product, nothing in unit tests
//! that exercise the memory manager and fault engine without /dev/kvm.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;

/// `KVM_SET_USER_MEMORY_REGION`, as the memory manager uses it.
pub trait KvmSlots: Send + Sync {
    /// Register `[gpa, gpa+size)` backed by host memory at `hva` as `slot`;
    /// `size == 0` deletes the slot.
    ///
    /// The caller ([`super::MemoryManager`]) keeps the mapping at `hva`
    /// alive until after the slot is deleted.
    fn set_region(&self, slot: u32, gpa: u64, size: u64, hva: u64)
        -> Result<(), kvm_ioctls::Error>;
}

impl KvmSlots for VmFd {
    fn set_region(
        &self,
        slot: u32,
        gpa: u64,
        size: u64,
        hva: u64,
    ) -> Result<(), kvm_ioctls::Error> {
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: size,
            userspace_addr: hva,
        };
        // SAFETY: the memory manager owns the mapping at `hva` (through the
        // slot's backing) and deletes the KVM slot before the mapping can be
        // unmapped, so KVM never sees a dangling address.
        unsafe { self.set_user_memory_region(r) }
    }
}

/// No hypervisor: for tests of memory and faults without /dev/kvm.
pub struct NoKvm;

impl KvmSlots for NoKvm {
    fn set_region(&self, _: u32, _: u64, _: u64, _: u64) -> Result<(), kvm_ioctls::Error> {
        Ok(())
    }
}
