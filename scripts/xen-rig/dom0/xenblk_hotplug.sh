#!/bin/sh
# libxl hotplug script for a vbd served by a running `xenblk-vhost run`
# (backendtype=phy with kernel xen-blkback not loaded), named in the xl disk
# line as script=/mnt/rig/dom0/xenblk_hotplug.sh. The YAML file decides which
# storage serves the disk, so there is nothing to set up: tell libxl the
# device is ready, as /etc/xen/scripts/block does once it has written
# physical-device (which only kernel blkback reads).
#   $1 = add | remove; XENBUS_PATH = /local/domain/0/backend/vbd/<domid>/<devid>
# Every call is logged to /run/xenblk-rig/hotplug.log for the scenarios to check.
PATH=/usr/lib/xen-4.17/bin:/usr/sbin:/usr/bin:/sbin:/bin
mkdir -p /run/xenblk-rig
echo "$(cut -d' ' -f1 /proc/uptime) $1 $XENBUS_PATH params=$(xenstore-read "$XENBUS_PATH/params" 2>/dev/null)" \
  >> /run/xenblk-rig/hotplug.log
case "$1" in
  add) exec xenstore-write "$XENBUS_PATH/hotplug-status" connected;;
  remove) exit 0;;
  *) echo "xenblk_hotplug.sh: unknown action '$1'" >&2; exit 1;;
esac
