#!/usr/bin/env bash
# debian-chroot.sh DIR: make DIR a minimal Debian 12 (bookworm) root for install tests, once.
# Reuses DIR when it is already complete (CI keeps ~/.cache/twinvol-chroot between runs).
# The mirror is the one apt on this machine uses (deb.debian.org unless TWINVOL_DEBIAN_MIRROR).
set -euo pipefail

dir="${1:?usage: debian-chroot.sh DIR}"
mirror="${TWINVOL_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
stamp="$dir/.twinvol-chroot-complete"

if [ -e "$stamp" ]; then
  exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap is missing: run scripts/test-deps.sh" >&2; exit 1; }

# Build beside the target and rename at the end: an interrupted run never leaves a half root.
tmp="$dir.partial"
rm -rf "$tmp"
mkdir -p "$(dirname "$dir")"
echo "debian-chroot: debootstrap bookworm into $dir (first run only)" >&2
debootstrap --variant=minbase --include=systemd bookworm "$tmp" "$mirror" >"$tmp.log" 2>&1 || {
  echo "debian-chroot: debootstrap failed, last lines of $tmp.log:" >&2
  tail -n 20 "$tmp.log" >&2
  exit 1
}
rm -rf "$dir"
mv "$tmp" "$dir"
touch "$stamp"
