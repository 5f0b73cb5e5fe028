#!/usr/bin/env bash
# The main job for a newcomer. Until the two-node demo lands, it exports a file-backed volume
# over NBD, shows it with real clients, and keeps serving until Ctrl-C (or exits at once with --once).
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/twinvol-target}"

for t in nbdinfo qemu-io; do
  command -v "$t" >/dev/null || { echo "demo: $t missing: apt-get install -y libnbd-bin qemu-utils"; exit 1; }
done
cargo build --quiet --bin twinvol
bin="$CARGO_TARGET_DIR/debug/twinvol"
work="${TWINVOL_DEMO_DIR:-/var/tmp/twinvol-demo}"
mkdir -p "$work"
img="$work/volume.img"
sock="$work/nbd.sock"
[ -f "$img" ] || truncate -s 1G "$img"

"$bin" export "$img" --socket "$sock" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.05; done
uri="nbd+unix:///?socket=$sock"

echo; echo "== nbdinfo $uri"; nbdinfo "$uri"
echo; echo "== qemu-io: write a pattern, read it back"
qemu-io -f raw "$uri" -c 'write -P 0x5a 0 1M' -c 'read -P 0x5a 0 1M' -c 'flush'
echo
echo "twinvol is exporting $img at: $uri"
echo "try:   nbdinfo --map '$uri'    |   nbdcopy '$uri' copy.img    |   qemu-img info '$uri'"
if [ "${1:-}" = "--once" ]; then exit 0; fi
echo "press Ctrl-C to stop (SIGTERM drains in-flight requests and flushes)"
wait $pid
