#!/usr/bin/env bash
# The main job for a newcomer: `twinvol demo` runs two nodes on this machine (127.0.0.1 and
# 127.0.0.2), each with its own file-backed volume mirrored synchronously to the other, and the
# lab cloud provider; it writes through NBD, kills the active node, shows the standby fence it
# and take over (with the cloud plan it would apply), verifies every acknowledged write on the
# standby's own copy, brings the old node back, resyncs it, compares both copies and prints a
# report with timings.
# Arguments are passed to `twinvol demo` (e.g. --runs 20). `--once` is accepted for CI.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinvol-target}"
cargo build --quiet --bin twinvol
bin="$CARGO_TARGET_DIR/debug/twinvol"
args=()
for a in "$@"; do [ "$a" = "--once" ] || args+=("$a"); done
work="${TWINVOL_DEMO_DIR:-/var/tmp/twinvol-demo}"
rm -rf "$work"
exec "$bin" demo --dir "$work" "${args[@]}"
