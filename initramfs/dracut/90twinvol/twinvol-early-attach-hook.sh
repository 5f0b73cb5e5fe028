#!/bin/sh
# dracut pre-trigger hook (sourced by dracut): attach the volumes of /etc/twinvol/initramfs.conf.
# Installed to /usr/lib/dracut/modules.d/90twinvol/twinvol-early-attach-hook.sh.
if [ -x /usr/lib/twinvol/twinvol-early-attach ]; then
    /usr/lib/twinvol/twinvol-early-attach || echo "twinvol: early attach failed (boot continues)" >&2
fi
