#!/usr/bin/env bash
# The randomized fault harness (tests/nemesis.rs): N fault schedules drawn from a seed, two
# daemons in network namespaces, a client logging every acknowledged write, a checker after each
# schedule. Needs root, iproute2, nftables and fusepy (scripts/test-deps.sh installs them).
# Usage: bash scripts/nemesis.sh [--schedules N] [--seed S]   (schedule i uses seed S + i)
set -euo pipefail
cd "$(dirname "$0")/.."
schedules=20
seed=1
while [ $# -gt 0 ]; do
  case "$1" in
    --schedules) schedules="$2"; shift 2 ;;
    --seed) seed="$2"; shift 2 ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "nemesis.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinvol-target}"
export AWS_EC2_METADATA_DISABLED=true
NEMESIS_SCHEDULES="$schedules" NEMESIS_SEED="$seed" cargo test --test nemesis -- --nocapture
