#!/bin/sh
# bake.sh [--deb FILE] [--keep-config]: prepare this machine to become a twinvol AMI.
# Installed as /usr/lib/twinvol/bake-ami.sh; run as root on the build instance (Packer's shell
# provisioner runs it, see twinvol.pkr.hcl), last, just before the image is taken.
#
# Installs the .deb if given (enables nothing), then clears per-instance state so that two
# instances launched from the image, or restored from copies in another region, start clean:
#   /var/lib/twinvol/*          roles, generation identifiers, bitmaps of this node
#   /run/twinvol/*              sockets
#   /etc/twinvol/attach/*.env   kernel device choices of this node
#   /etc/twinvol/twinvol.toml and *.key   node identity and pre-shared key (unless --keep-config)
#   /etc/machine-id, SSH host keys, cloud-init instance state, the journal
# docs/OPERATIONS.md ("Building an AMI", "Disaster recovery in another region").
set -eu

deb=""
keep_config=no
while [ $# -gt 0 ]; do
  case "$1" in
    --deb) deb="${2:?--deb needs a file}"; shift 2 ;;
    --keep-config) keep_config=yes; shift ;;
    *) echo "usage: bake.sh [--deb FILE] [--keep-config]" >&2; exit 2 ;;
  esac
done

say() { echo "bake: $*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "run as root"
  exit 1
fi

if [ -n "$deb" ]; then
  [ -r "$deb" ] || { say "cannot read $deb"; exit 1; }
  say "installing $deb"
  if ! dpkg -i "$deb"; then
    say "resolving dependencies with apt-get"
    DEBIAN_FRONTEND=noninteractive apt-get install -f -y
  fi
fi
command -v twinvol >/dev/null 2>&1 || { say "twinvol is not installed: pass --deb FILE"; exit 1; }
twinvol --version >&2

# twinvol's per-instance state.
if [ -d /var/lib/twinvol ]; then
  find /var/lib/twinvol -mindepth 1 -delete
fi
if [ -d /run/twinvol ]; then
  find /run/twinvol -mindepth 1 -delete
fi
rm -f /etc/twinvol/attach/*.env
if [ "$keep_config" = no ]; then
  rm -f /etc/twinvol/twinvol.toml /etc/twinvol/*.key
fi

# The machine's identity: regenerated at first boot.
if [ -e /etc/machine-id ]; then
  : >/etc/machine-id
fi
rm -f /var/lib/dbus/machine-id
rm -f /etc/ssh/ssh_host_*
if command -v cloud-init >/dev/null 2>&1; then
  cloud-init clean --logs || say "cloud-init clean failed; continuing"
else
  rm -rf /var/lib/cloud/instances /var/lib/cloud/instance
fi
if [ -d /var/log/journal ]; then
  find /var/log/journal -mindepth 1 -delete
fi
say "done: per-instance state cleared (config kept: $keep_config)"
