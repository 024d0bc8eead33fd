#!/usr/bin/env bash
# Run every test: unit tests, loom model tests of the memslot protocol, and
# integration tests that boot guests on the machine's real /dev/kvm.
# Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm
cargo test --workspace --release "$@"
# The memslot install protocol under loom (its own target dir: --cfg loom
# rebuilds every dependency).
CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" \
  cargo test --release -p vmm --lib loom_tests -- --test-threads=1
