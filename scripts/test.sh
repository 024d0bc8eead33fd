#!/usr/bin/env bash
# Run every test: unit tests, and integration tests that boot guests on the
# machine's real /dev/kvm. Installs what it needs first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm
cargo test --workspace --release "$@"
