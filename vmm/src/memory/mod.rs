//! Guest RAM: anonymous host mappings registered with KVM as memslots.

mod ram;

pub use ram::{GuestMemory, GuestRam, MemoryError, RamRange};
