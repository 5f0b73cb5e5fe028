#!/usr/bin/env bash
# The whole test suite: installs every prerequisite (idempotent), then builds and runs all tests.
# Usage (as root, on Debian 12 with Rust): bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/test-deps.sh

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinvol-target}"
export CARGO_TERM_COLOR=never
# Never reach a real AWS endpoint or the instance metadata service from tests.
export AWS_EC2_METADATA_DISABLED=true

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo test (unit, integration, benches in test mode)"
cargo test --all-targets
echo "== cargo test --doc"
cargo test --doc
echo "== kernel NBD attach: opt-in (TWINVOL_KERNEL_NBD=1); this kernel has no nbd module, see docs/KERNEL.md"
