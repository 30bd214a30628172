#!/bin/sh
# libxl hotplug script for a vbd served by a running `xenblk-vhost run`
# (backendtype=phy with kernel xen-blkback not loaded), named in the xl disk
# line as script=/mnt/rig/dom0/xenblk_hotplug.sh. It logs every call to
# /run/xenblk-rig/hotplug.log for the scenarios to count, then hands over to
# the script operators install (`xenblk-vhost install-hotplug`, README's
# `script=block-xenblk-vhost`), so the real thing is what libxl runs here.
#   $1 = add | remove; XENBUS_PATH = backend/vbd/<domid>/<devid>
PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /run/xenblk-rig
echo "$(cut -d' ' -f1 /proc/uptime) $1 $XENBUS_PATH params=$(xenstore-read "$XENBUS_PATH/params" 2>/dev/null)" \
  >> /run/xenblk-rig/hotplug.log
exec /etc/xen/scripts/block-xenblk-vhost "$@"
