#!/usr/bin/env bash
# Install what the build needs, then run the embedded default guest.
set -euo pipefail
set -E
trap '__st=$?; if [ "$BASHPID" = "$$" ]; then printf "%s: line %s: \"%s\" failed (status %s)\n" "${BASH_SOURCE[0]##*/}" "$LINENO" "$BASH_COMMAND" "$__st" >&2; fi' ERR
cd "$(dirname "$0")/.."
scripts/setup.sh
exec cargo run --release -p vmm-cli -- run "$@"
