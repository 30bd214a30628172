# rig-timeout: 300
# The disk served by qemu-storage-daemon in dom0 over vhost-user-blk: our
# standalone daemon (phy route, as xenblk-vhost-phy) reaches it through
# libblkio's virtio-blk-vhost-user driver, with 2 vhost-user queues for the
# 2-vCPU guest's 2 rings (grant copy into libblkio's shared memory region:
# the only data path vhost-user allows; with persistent grants, as by default
# since step 22: the ring engine copies between the guest's mapped pages and
# that region itself, Xen only what is not mapped). The guest is blkback-reference's
# ref-mq (2 vCPUs, 16-page ring) and runs the full workload; then the storage
# daemon is stopped and dom0 finds the guest's ext4 clean in its file.
. "$RIG_DOM0/xenblk_lib.sh"

lsmod | grep -q '^xen_blkback' && fail "xen-blkback is loaded: this scenario needs our daemon alone on backend/vbd"
NAME=xbv-vu
IMG=$XB_DIR/xbv-vu.img CFG=$XB_DIR/xbv-vu.yaml SOCK=/run/xenblk-rig/xbv-vu.sock
mkdisk "$IMG" 64
mkdir -p /run/xenblk-rig; rm -f "$SOCK"
qemu-storage-daemon \
  --blockdev "driver=file,node-name=vu-file,filename=$IMG,discard=unmap,cache.direct=on,aio=threads" \
  --export "type=vhost-user-blk,id=vu,node-name=vu-file,addr.type=unix,addr.path=$SOCK,writable=on,num-queues=2" \
  > "$OUT/qsd.log" 2>&1 &
QSD=$!
XB_PID=""
# (set -e holds in traps too: nothing here may fail)
cleanup() { kill "${XB_PID:-none}" "${QSD:-none}" 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 143' TERM
i=0
until [ -S "$SOCK" ]; do
  kill -0 $QSD 2>/dev/null || { cat "$OUT/qsd.log"; fail "qemu-storage-daemon exited"; }
  sleep 0.2; i=$((i + 1)); [ $i -lt 100 ] || fail "no vhost-user socket $SOCK after 20 s"
done
xb_cpu_timeline $QSD "$OUT/cpu-qsd.txt"
note "qemu-storage-daemon pid $QSD exports $IMG on $SOCK (2 queues)"

xb_yaml "$CFG" $NAME \
  "{vdev: xvda, driver: virtio-blk-vhost-user, path: $SOCK, data_path: copy, queues: 2, ring_page_order: 4, max_indirect_segments: 256}"
rm -f /run/xenblk-rig/hotplug.log
xb_start_daemon vu "$CFG"

# Everything the guest negotiated must be what it negotiated with kernel blkback.
SAME=(persistent_grants backend_persistent indirect_descriptors segments_per_request flush discard ring_order
      backend_max_ring_order
      queues backend_max_queues guest_hw_queues sectors sector_size protocol)
run_guest $NAME --disk "$(xb_phy_disk xvda "$CFG")" --vcpus 2 --cmdline "xen_blkfront.max_ring_page_order=4" \
  --expect xs.be.type=phy --expect "xs.be.params=$CFG" \
  --expect neg.persistent_grants=enabled --expect neg.backend_persistent=1 \
  --expect neg.indirect_descriptors=enabled --expect 'neg.backend_max_indirect_segments>=32' \
  --expect neg.segments_per_request=32 --expect "neg.flush=flush diskcache: enabled" \
  --expect neg.discard=supported --expect neg.sectors=131072 --expect ro=0 --expect neg.protocol=x86_64-abi \
  --expect neg.ring_order=4 --expect neg.backend_max_ring_order=4 --expect param.max_ring_page_order=4 \
  --expect neg.queues=2 --expect neg.backend_max_queues=2 --expect neg.guest_hw_queues=2
xb_compare_blkback $NAME ref-mq "${SAME[@]}"
grep -Eq "the connection served .*; [1-9][0-9]* persistent grants mapped" "$XB_LOG" \
  || fail "no persistent grant was mapped: the ring engine copied everything through Xen"
note "cpu since start: xenblk-vhost $(xb_cpu_s $XB_PID)s, qemu-storage-daemon $(xb_cpu_s $QSD)s"
grep -q "virtio-blk-vhost-user $SOCK" "$XB_LOG" || fail "the daemon log does not show the vhost-user disk being opened"
xb_stop_daemon "vhost-user daemon"
kill -TERM $QSD; wait $QSD || true; QSD=""
e2fsck -f -n "$IMG" > "$OUT/dom0-fsck.log" 2>&1 || fail "dom0 e2fsck -fn of the guest's filesystem (written through qemu-storage-daemon) failed"
debugfs -R 'ls /' "$IMG" 2>/dev/null | grep -q file6 || fail "file6 missing in the guest's filesystem, seen from dom0"
note "ok: dom0 sees a clean ext4 with the guest's files in qemu-storage-daemon's image"
