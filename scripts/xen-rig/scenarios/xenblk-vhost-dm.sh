# rig-timeout: 300
# Our backend on libxl's PV device-model route: a `backendtype=qdisk` disk
# with device_model_override = the xenblk-vhost console script, which libxl
# execs with QEMU's arguments (it answers libxl's QMP and serves
# backend/qdisk) and device_model_args_pv naming the YAML. The disk uses the
# grant-copy data path (the default) with persistent grants (the default since
# step 22: the ring engine copies the mapped pages itself): feature-persistent
# is offered as 1 and the guest must say "persistent grants: enabled" (and
# bounce its data through them), with indirect descriptors. The guest is
# blkback-reference's ref-default (1 vCPU, one-page ring) and must negotiate
# what that one did, persistent grants included.
# Then: the device model is gone with the guest, and dom0 finds the guest's
# ext4 clean in the file.
. "$RIG_DOM0/xenblk_lib.sh"

NAME=xbv-dm
IMG=$XB_DIR/xbv-dm.img CFG=$XB_DIR/xbv-dm.yaml
mkdisk "$IMG" 64
xb_yaml "$CFG" $NAME \
  "{vdev: xvda, driver: io_uring, path: $IMG, direct: true, data_path: copy, persistent_grants: true, queues: 2, ring_page_order: 4, max_indirect_segments: 256}"
DM=$RIG_VENV/bin/xenblk-vhost
[ -x "$DM" ] || fail "$DM missing"

SAME=(persistent_grants bounce_buffer backend_persistent indirect_descriptors backend_max_indirect_segments
      segments_per_request flush discard ring_order
      backend_max_ring_order queues backend_max_queues guest_hw_queues sectors sector_size protocol)
run_guest $NAME --disk "format=raw,vdev=xvda,access=rw,backendtype=qdisk,target=$IMG" \
  --cfg "device_model_override=\"$DM\"" --cfg "device_model_args_pv=[ \"--config=$CFG\" ]" \
  --expect xs.be.type=qdisk \
  --expect neg.persistent_grants=enabled --expect neg.backend_persistent=1 --expect neg.bounce_buffer=enabled \
  --expect neg.indirect_descriptors=enabled --expect neg.backend_max_indirect_segments=256 \
  --expect neg.segments_per_request=32 --expect "neg.flush=flush diskcache: enabled" \
  --expect neg.discard=supported --expect neg.sectors=131072 --expect ro=0 --expect neg.protocol=x86_64-abi \
  --expect neg.ring_order=0 --expect neg.backend_max_ring_order=4 \
  --expect neg.queues=1 --expect neg.backend_max_queues=2 --expect neg.guest_hw_queues=1
xb_compare_blkback $NAME ref-default "${SAME[@]}"

# The device model: started by libxl (its log is libxl's qemu-dm log), served
# this domain, and exited with it.
DMLOG=/var/log/xen/qemu-dm-$NAME.log
cp "$DMLOG" "$OUT/" 2>/dev/null || fail "no device model log $DMLOG: libxl never started xenblk-vhost"
grep -q "as the device model of domain" "$DMLOG" || fail "the device model log does not show xenblk-vhost starting"
grep -q "device model for domain .* running" "$DMLOG" || fail "the device model never announced running"
grep -Eq "the connection served .*; [1-9][0-9]* persistent grants mapped" "$DMLOG" \
  || fail "no persistent grant was mapped: the ring engine copied everything through Xen"
grep -qE "qdisk-[0-9]+-51712: .*Connected" "$DMLOG" || fail "the device model log shows no qdisk device reaching Connected"
xb_log_clean "$DMLOG" "device model"
i=0
while pgrep -f -- "-xen-domid .*-name $NAME( |$)" > /dev/null; do
  sleep 0.5; i=$((i + 1))
  [ $i -lt 20 ] || { pgrep -af -- "-xen-domid"; fail "the device model is still running 10 s after its guest died"; }
done
xenstore-ls /local/domain/0/device-model 2>/dev/null | grep -q . \
  && { xenstore-ls -f /local/domain/0/device-model; fail "device-model/ entries left behind"; }
note "ok: device model started by libxl, served qdisk, gone with the guest"

e2fsck -f -n "$IMG" > "$OUT/dom0-fsck.log" 2>&1 || fail "dom0 e2fsck -fn of the guest's filesystem failed"
debugfs -R 'ls /' "$IMG" 2>/dev/null | grep -q file6 || fail "file6 missing in the guest's filesystem, seen from dom0"
note "ok: dom0 sees a clean ext4 with the guest's files"
