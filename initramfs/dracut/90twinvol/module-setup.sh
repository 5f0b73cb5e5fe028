#!/bin/bash
# dracut module "twinvol": carry twinvol into the initramfs when early attach is configured.
# Installed to /usr/lib/dracut/modules.d/90twinvol/module-setup.sh; dracut sources it.
# shellcheck disable=SC2154 # $initdir and $moddir are set by dracut

# Included only when /etc/twinvol/initramfs.conf lists a volume (or when asked for by name).
# TWINVOL_INITRAMFS_CONF: override for tests only.
check() {
    local conf="${TWINVOL_INITRAMFS_CONF:-/etc/twinvol/initramfs.conf}"
    [ -r "$conf" ] || return 255
    grep -q '^[[:space:]]*[^#[:space:]]' "$conf" || return 255
    require_binaries /usr/bin/twinvol || return 1
    return 0
}

depends() {
    echo udev-rules
    return 0
}

installkernel() {
    instmods nbd
}

install() {
    inst_binary /usr/bin/twinvol
    inst_script /usr/lib/twinvol/twinvol-early-attach
    inst_script /usr/lib/twinvol/twinvol-udev-name
    inst_simple /etc/twinvol/initramfs.conf
    [ -r /etc/twinvol/twinvol.toml ] && inst_simple /etc/twinvol/twinvol.toml
    [ -r /usr/lib/modprobe.d/twinvol-nbd.conf ] && inst_simple /usr/lib/modprobe.d/twinvol-nbd.conf
    inst_rules /usr/lib/udev/rules.d/99-twinvol.rules
    inst_multiple head sleep
    # pre-trigger: udev runs, the root device has not been waited for yet.
    inst_hook pre-trigger 90 "$moddir/twinvol-early-attach-hook.sh"
}
