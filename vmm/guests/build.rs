//! Builds the freestanding test guests in `guest-images/` with the system
//! gcc/binutils into this crate's OUT_DIR and tells the crate where they are
//! (`VMM_GUEST_DIR`).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let src = manifest.join("../../guest-images");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("guests");
    // Cargo scans a directory named here recursively for changes.
    println!("cargo:rerun-if-changed={}", src.display());
    let status = Command::new("make")
        .arg("-s")
        .arg("-C")
        .arg(&src)
        .arg(format!("OUT={}", out.display()))
        .status()
        .expect("running make for guest-images (needs make and gcc)");
    assert!(status.success(), "building guest-images failed");
    println!("cargo:rustc-env=VMM_GUEST_DIR={}", out.display());
}
