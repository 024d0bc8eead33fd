#!/usr/bin/env bash
# Run every check: formatting, clippy (unsafe blocks must say why they are
# sound), unit tests, the loom models of the fault protocol and the planted
# defects they must catch, and the integration tests that boot guests on the
# machine's real /dev/kvm (test guests, the microVM kernel, Debian's cloud
# kernel). Installs what it needs first; arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
step() { printf '\n==> %s\n' "$*"; }

step "setup"
scripts/setup.sh
step "guest images (cached outside the clone after the first build)"
guest-images/build.sh
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --release -- -D warnings
step "unit and integration tests"
cargo build --release -p vmm-cli
cargo test --workspace --release "$@"
step "loom models of the fault protocol (own target dir: --cfg loom rebuilds loom)"
CARGO_TARGET_DIR=target/loom RUSTFLAGS="--cfg loom" RUST_BACKTRACE=0 \
  cargo test --release -p memslots -- --test-threads=1
step "planted defects the loom models must catch"
scripts/mutants.sh
step "planted defects the stress report, unit and migration tests must catch"
scripts/stress-mutants.sh
step "fuzz targets, 30 s each (libFuzzer + ASan, nightly)"
scripts/fuzz.sh 30
