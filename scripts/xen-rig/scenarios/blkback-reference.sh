# rig-timeout: 420
# The guest workload against the kernel's own xen-blkback on a file-backed loop
# device: the reference that our backend's scenarios are compared with.
# Two guests: Linux blkfront's defaults (1 vCPU, one-page ring), then 2 vCPUs
# with xen_blkfront.max_ring_page_order=4 (multi-queue, multi-page ring).
# Results: $OUT/results.json (negotiated features per guest, every check).

modprobe xen-blkback || fail "modprobe xen-blkback failed"
DISK=/var/lib/xenblk-rig/blkback-ref.img

guest() {  # name vcpus cmdline expects...
  local name=$1 vcpus=$2 cmdline=$3; shift 3
  LOOP=$(mkloop "$DISK" 64) || fail "losetup failed"
  run_guest "$name" --disk "phy:$LOOP,xvda,w" --vcpus "$vcpus" --cmdline "$cmdline" "$@"
  # dom0's own view: the filesystem the guest made really is on the disk file.
  e2fsck -f -n "$LOOP" > "$OUT/$name.dom0-fsck.log" 2>&1 || fail "$name: dom0 e2fsck -fn of the guest's disk failed"
  debugfs -R 'ls /' "$LOOP" 2>/dev/null | grep -q file6 || fail "$name: file6 missing in the guest's filesystem, seen from dom0"
  note "ok: $name: dom0 sees a clean ext4 with the guest's files"
  losetup -d "$LOOP"
}

# What kernel blkback (6.1) offers on a loop device over ext4, and what Linux
# blkfront takes by default.
COMMON=(--expect neg.persistent_grants=enabled --expect neg.indirect_descriptors=enabled
        --expect neg.backend_max_indirect_segments=256 --expect neg.segments_per_request=32
        --expect "neg.flush=flush diskcache: enabled" --expect neg.discard=supported
        --expect neg.discard_granularity=4096 --expect neg.sectors=131072 --expect ro=0
        --expect neg.backend_max_ring_order=4 --expect neg.protocol=x86_64-abi)
guest ref-default 1 "" "${COMMON[@]}" --expect neg.ring_order=0 --expect neg.queues=1 --expect neg.guest_hw_queues=1
guest ref-mq 2 "xen_blkfront.max_ring_page_order=4" "${COMMON[@]}" \
  --expect neg.ring_order=4 --expect neg.queues=2 --expect neg.guest_hw_queues=2 --expect param.max_ring_page_order=4
rmmod xen-blkback || fail "rmmod xen-blkback failed after the guests were gone (device still held?)"
python3 -c "import json,sys; print(json.dumps({k: v['negotiated'] for k, v in json.load(open(sys.argv[1])).items()}, indent=1))" "$OUT/results.json"
