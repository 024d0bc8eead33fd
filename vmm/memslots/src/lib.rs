//! The memslot table and the protocol by which a fault installs a page while
//! memslots change (docs/FAULT-PATH.md).
//!
//! - [`Memslots`]: the published table (lock-free snapshots), its generation
//!   and the slots lock; [`SlotsLocked`] is the proof of holding it.
//! - [`Memslot`]: one slot, its install lock ([`Memslot::map_trylock`],
//!   [`Memslot::map_lock`]), its discarded-page and plugged-block bitmaps.
//! - [`resolve`]: the one fault driver (snapshot → lookup → prepare with no
//!   lock → `map_trylock` → install | bail → retry under the slots lock with
//!   `map_lock`), generic over an [`Installer`]. The VMM installs with
//!   userfaultfd; the loom models (`src/model.rs`) install into a model page
//!   table and run this same driver, so removing a check here fails a model.
//!
//! The invariants (I1–I6) are named where they are enforced.
//!
//! This crate holds no KVM or mmap state, so loom can model all of it:
//! `RUSTFLAGS="--cfg loom" cargo test --release -p memslots`.

mod bitmap;
mod driver;
mod slot;
pub mod sync;
mod table;

#[cfg(all(test, loom))]
mod model;

pub use bitmap::PageBitmap;
pub use driver::{
    resolve, Content, Install, Installer, Outcome, Path, Resolution, ResolveError, MAX_AGAIN,
};
pub use slot::{Bail, ExclusiveGuard, InstallGuard, Memslot};
pub use table::{MemslotTable, Memslots, SlotsLocked};

/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;
