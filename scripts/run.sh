#!/usr/bin/env bash
# Install what the build needs, then run the embedded default guest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release -p vmm-cli -- run "$@"
