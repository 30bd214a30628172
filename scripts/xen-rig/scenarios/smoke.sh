# rig-timeout: 120
# dom0 is a working Xen host: the devices a userspace backend opens, the
# hypervisor version, a toolstack that answers, and the project's runtime.

for d in gntdev evtchn xenbus privcmd gntalloc; do
  [ -c /dev/xen/$d ] || fail "/dev/xen/$d missing or not a character device ($(ls -l /dev/xen/ 2>&1 | tr '\n' ' '))"
done
note "ok: /dev/xen/{gntdev,evtchn,xenbus,privcmd,gntalloc} present"

assert_eq "hypervisor type" "$(cat /sys/hypervisor/type)" xen
info=$(xl info) || fail "xl info failed"
echo "$info" | grep -E '^(xen_version|xen_caps|nr_cpus|total_memory|free_memory|xen_commandline)'
ver=$(echo "$info" | sed -n 's/^xen_version *: *//p')
case "$ver" in 4.17.*) note "ok: xen_version $ver";; *) fail "xl info reports xen_version '$ver', expected 4.17.x";; esac
xl list | grep -q '^Domain-0 ' || fail "xl list does not show Domain-0"

# xenstored answers reads, writes and removals, and knows dom0's path.
assert_eq "dom0 domain path" "$(xenstore-read /local/domain/0/domid)" 0
xenstore-write /xenblk-rig/smoke "hello $$" || fail "xenstore-write failed"
assert_eq "xenstore round trip" "$(xenstore-read /xenblk-rig/smoke)" "hello $$"
xenstore-rm /xenblk-rig || fail "xenstore-rm failed"
xenstore-read /xenblk-rig/smoke 2>/dev/null && fail "xenstore-rm did not remove the key"
note "ok: xenstored read/write/rm"

# The kernel block backend must not be loaded behind the scenarios' back.
lsmod | grep -q '^xen_blkback' && fail "xen-blkback is loaded although it is blacklisted"
note "ok: xen-blkback not loaded"

# The runtime an operator installed: libblkio, qemu-storage-daemon, the venv
# with the project's dependencies, and the checkout importable from it.
"$RIG_VENV/bin/python" -c '
import ctypes, trio, yaml, cffi, xenblk_vhost
ctypes.CDLL("libblkio.so.1")
print("venv ok: trio", trio.__version__, "cffi", cffi.__version__, "xenblk_vhost from", xenblk_vhost.__file__)
' || fail "dom0 venv cannot import the runtime or the checkout"
case "$("$RIG_VENV/bin/python" -c 'import xenblk_vhost; print(xenblk_vhost.__file__)')" in
  "$RIG_SHARE"/src/*) ;; *) fail "xenblk_vhost is not imported from this run's checkout";;
esac
command -v qemu-storage-daemon >/dev/null || fail "qemu-storage-daemon missing"
xenblk-vhost --help > /dev/null || fail "the xenblk-vhost console script does not run"
note "ok: runtime (libblkio, qemu-storage-daemon, venv, checkout, xenblk-vhost command)"
