//! Guest memory: boot-time RAM ([`GuestRam`]), the memslot table and its
//! install protocol ([`slots`]), and run-time changes ([`MemoryManager`]).

mod manager;
mod ram;
pub mod slots;
mod source;

pub use manager::{resident_pages, MemError, MemoryManager, Slot, SlotBacking};
pub use ram::{GuestMemory, GuestRam, MemoryError, RamRange};
pub use source::{ImageFile, PageSource, SourceError};
