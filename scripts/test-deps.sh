#!/usr/bin/env bash
# Installs everything the test suite needs on a fresh Debian 12 machine with Rust (idempotent).
# System packages from Debian; Python tools (moto, prometheus_client) into a virtualenv outside the checkout.
set -euo pipefail

# systemd: systemd-analyze verify; udev: udevadm test; shellcheck; debootstrap + dpkg-dev: the .deb
# test (cargo-deb runs dpkg-shlibdeps) and its install into a chroot.
APT_PACKAGES=(nbdkit libnbd-bin fio nftables qemu-utils iproute2 e2fsprogs fuse3 python3-venv curl openssl ca-certificates
  systemd udev shellcheck debootstrap dpkg-dev libfuse2)
VENV="${TWINVOL_VENV:-$HOME/.cache/twinvol-venv}"

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "test-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "test-deps: creating virtualenv $VENV"
  python3 -m venv "$VENV"
fi
# prometheus_client: its OpenMetrics parser checks the /metrics text (tests/ops_daemon.rs, tests/ops_status.rs).
# fusepy (over libfuse2): tests/support/faultyfs.py, the file system that fails writes, reads or
# fsync on command (disk-error tests).
if ! "$VENV/bin/python" -c 'import moto, flask, prometheus_client.openmetrics.parser, fuse' >/dev/null 2>&1; then
  echo "test-deps: installing moto[server], prometheus_client and fusepy into $VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check 'moto[server]>=5,<6' 'prometheus_client>=0.20,<1' 'fusepy==3.0.1'
fi
# cargo-deb builds the .deb in tests/packaging.rs (into ~/.cargo/bin; pinned: tests pack the dev profile).
if ! command -v cargo-deb >/dev/null 2>&1 && [ ! -x "$HOME/.cargo/bin/cargo-deb" ]; then
  echo "test-deps: installing cargo-deb"
  cargo install cargo-deb --version 3.8.0 --locked --quiet
fi
echo "test-deps: ok"
