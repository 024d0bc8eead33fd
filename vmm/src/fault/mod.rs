//! The stage-2 fault engine: guest RAM left unpopulated under userfaultfd and
//! filled on first touch, on the faulting vCPU thread (`vcpu` mode) or by
//! handler threads (`handler` mode). See docs/FAULT-PATH.md.

pub mod engine;
pub mod handler;
pub mod sigbus;
pub mod stats;
mod uffd;

pub use engine::{Access, FaultCtx, FaultEngine, FaultError, Resolved};
pub use stats::{FaultKind, FaultSnapshot, FaultStats};
