#!/usr/bin/env bash
# Run every test: unit tests, loom model tests of the memslot protocol, and
# integration tests that boot guests on the machine's real /dev/kvm (test
# guests, and Debian's cloud kernel). Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Linux guest images from Debian packages (the cloud kernel and an
# initramfs); the optional microVM kernel build is skipped here.
SKIP_MICRO=1 guest-images/build.sh >/dev/null
cargo build --release -p vmm
cargo test --workspace --release "$@"
# The memslot install protocol under loom (its own target dir: --cfg loom
# rebuilds every dependency).
CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" \
  cargo test --release -p vmm --lib loom_tests -- --test-threads=1
