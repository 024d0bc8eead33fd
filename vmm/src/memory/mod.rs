//! Guest memory: boot-time RAM ([`GuestRam`]), the memslot table and its
//! install protocol ([`slots`]), and run-time changes ([`MemoryManager`]).

#[cfg(not(loom))]
mod manager;
#[cfg(not(loom))]
mod ram;
pub mod slots;
#[cfg(not(loom))]
mod source;

#[cfg(not(loom))]
pub use manager::{resident_pages, MemError, MemoryManager, Slot, SlotBacking};
#[cfg(not(loom))]
pub use ram::{GuestMemory, GuestRam, MemoryError, RamRange};
#[cfg(not(loom))]
pub use source::{ImageFile, PageSource, SourceError};
