//! The freestanding test guests of `guest-images/` (C and assembly, built by
//! this crate's build script with the system gcc): their ELF images for
//! whoever embeds one (the `vmm` binary's default guest, the benchmarks and
//! `vmm stress`) and their directory for tests that boot them by path.
//! Not part of the product library: a VM is built from any image.

use std::path::PathBuf;

/// Where the built guests are (`<name>.elf`).
pub const DIR: &str = env!("VMM_GUEST_DIR");

/// The path of test guest `name` (e.g. `touch`).
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(DIR).join(format!("{name}.elf"))
}

/// The default guest (`guest-images/demo`): several vCPUs touch memory and
/// print a summary.
pub static DEMO: &[u8] = include_bytes!(concat!(env!("VMM_GUEST_DIR"), "/demo.elf"));

/// The memory stress guest (`guest-images/memstress`), used by benchmarks.
pub static MEMSTRESS: &[u8] = include_bytes!(concat!(env!("VMM_GUEST_DIR"), "/memstress.elf"));

/// The churn guest (`guest-images/memchurn`), used by benchmarks and `vmm
/// stress`.
pub static MEMCHURN: &[u8] = include_bytes!(concat!(env!("VMM_GUEST_DIR"), "/memchurn.elf"));

/// The restore benchmark's guest (`guest-images/wset`): populates its RAM,
/// waits for the host's signal, then touches a working set.
pub static WSET: &[u8] = include_bytes!(concat!(env!("VMM_GUEST_DIR"), "/wset.elf"));
