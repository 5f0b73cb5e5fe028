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
echo "== cargo clippy (lints in Cargo.toml; warnings are errors)"
cargo clippy --all-targets -- -D warnings
echo "== cargo test (unit, integration, benches in test mode)"
cargo test --all-targets
echo "== cargo test --doc"
cargo test --doc
echo "== kernel NBD attach: opt-in (TWINVOL_KERNEL_NBD=1); this kernel has no nbd module, see docs/KERNEL.md"
echo "== benches/mirror_fio_netns.sh smoke run (node b in a namespace via RUN_B; figures not asserted)"
smoke=$(mktemp -d /var/tmp/twinvol-smoke-XXXX)
out=$(TWINVOL="$CARGO_TARGET_DIR/debug/twinvol" SIZE=300M JOBS=4k-randwrite-qd32 MODES=sync \
  bash benches/mirror_fio_netns.sh "$smoke/a.img" "$smoke/b.img" 1)
rm -rf "$smoke"
echo "$out"
echo "$out" | grep -q '^| sync mirror | 4k-randwrite-qd32 | .* | \*\*' \
  || { echo "mirror_fio_netns.sh printed no sync ratio" >&2; exit 1; }
echo "$out" | grep -Eq '^# sync: Data bytes sent [1-9]' \
  || { echo "mirror_fio_netns.sh: node a sent no Data to node b" >&2; exit 1; }
echo "== benches/mirror_ab.sh smoke run (one pair of two names for one binary; figures not asserted)"
smoke=$(mktemp -d /var/tmp/twinvol-smoke-XXXX)
ln -s "$CARGO_TARGET_DIR/debug/twinvol" "$smoke/twinvol-a"
ln -s "$CARGO_TARGET_DIR/debug/twinvol" "$smoke/twinvol-b"
out=$(PAIRS=1 SIZE=300M JOBS=4k-randwrite-qd32 MODES=sync OUT="$smoke/runs" \
  bash benches/mirror_ab.sh "$smoke/twinvol-a" "$smoke/twinvol-b" "$smoke/a.img" "$smoke/b.img" \
  127.0.0.1:7793 127.0.0.2:7794 1)
rm -rf "$smoke"
echo "$out"
for v in A B; do
  echo "$out" | grep -q "^| sync mirror | 4k-randwrite-qd32 | $v | .* | \*\*" \
    || { echo "mirror_ab.sh printed no median ratio for binary $v" >&2; exit 1; }
done
