"""The datapath end to end: a frontend on the simulated hypervisor, a Vbd, io_uring on a real file.

Every combination of data path (copy, map, map with persistent grants) and
ABI (64-bit, 32-bit) runs a randomized workload of reads, writes (1..11
segments with partial pages), indirect reads and writes, flushes and
barriers with and without data, and discards, on a 1-page ring with one
queue and on 16-page rings with two queues; every read is checked against a
model of the disk, and at the end the backing file must equal the model
byte for byte, and every grant must be revocable.
"""

from __future__ import annotations

import os
import zlib
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from backend_support.frontend import TestFrontend
from backend_support.harness import (
    DISK_SIZE,
    connected,
    count_tasks,
    disk_config,
    make_disk_file,
    make_vbd,
    open_fds,
    read_back,
)
from backend_support.qsd_exports import daemon_with_file
from backend_support.workload import Workload
from xenblk_vhost.backend.datapath.copy_path import SMALL_BUFFER, plan_bounce
from xenblk_vhost.backend.datapath.storage_ops import split_extents
from xenblk_vhost.backend.datapath.vbd import Vbd, VbdConnectError, open_storage
from xenblk_vhost.backend.features import derive_features
from xenblk_vhost.blkif.abi import Abi
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_OKAY
from xenblk_vhost.sim.guest import Guest
from xenblk_vhost.storage import StorageLimits

# XENBLK_TEST_SEED varies the random workloads (e.g. to hunt for rare failures).
SEED_SALT = os.environ.get("XENBLK_TEST_SEED", "")

PATHS = [("copy", False), ("copy", True), ("map", False), ("map", True)]

# The storages and the data paths each can use: io_uring on a file takes all of them; a
# qemu-storage-daemon over vhost-user-blk only the copy path (its buffers must be shared memory),
# with persistent grants (the engine's memcpy) as by default.
TARGETS = [("file", "copy", False), ("file", "copy", True), ("file", "map", False), ("file", "map", True),
           ("qsd", "copy", True)]


@contextmanager
def storage_target(kind: str, workdir: Path, queues: int):
    """(path for the disk config, its driver, the file holding the disk's bytes)."""
    if kind == "file":
        path = make_disk_file(workdir / "disk.img")
        yield path, "io_uring", path
        return
    with daemon_with_file(workdir / "qsd", DISK_SIZE, num_queues=queues) as (_daemon, export):
        make_disk_file(export.image)
        yield export.socket, "virtio-blk-vhost-user", export.image


@pytest.mark.parametrize("target,data_path,persistent", TARGETS,
                         ids=["file-copy", "file-copy-persistent", "file-map", "file-map-persistent",
                              "qsd-copy-persistent"])
@pytest.mark.parametrize("abi", [Abi.NATIVE, Abi.X86_32], ids=["x86_64", "x86_32"])
@pytest.mark.parametrize("order,nrings,indirect", [(0, 1, False), (4, 4, True)],
                         ids=["order0-1ring-direct", "order4-4rings-indirect"])
async def test_random_workload_matches_model_and_file(tmp_path, platform, guest, target, data_path, persistent,
                                                      abi, order, nrings, indirect):
    """Every op (read, write, flush, barrier, discard, and indirect where offered) byte for byte
    against a model and the storage's own file, for each storage, data path, ABI and ring shape."""
    with storage_target(target, tmp_path, nrings) as (path, driver, image):
        model = bytearray(image.read_bytes())
        vbd = make_vbd(path, driver=driver, queues=nrings, data_path=data_path, persistent_grants=persistent,
                       max_indirect_segments=256 if indirect else 0)
        assert (vbd.features.max_indirect_segments > 0) is indirect
        front = TestFrontend(guest, abi, order=order, nrings=nrings, persistent=persistent)
        seed = zlib.crc32(f"{target}{data_path}{persistent}{abi.value}{order}{SEED_SALT}".encode())
        work = Workload(front, model, seed=seed, persistent=persistent, indirect_max=40 if indirect else 0)
        per_round = 8 if order else 6
        try:
            async with connected(vbd, front, platform):
                for _round in range(6):
                    async with trio.open_nursery() as n:  # the rings run concurrently
                        for ring in range(nrings):
                            n.start_soon(work.round, ring, per_round, (ring, nrings))
                stats = vbd.stats()
            assert read_back(image, 0, DISK_SIZE) == model
            work.pool.revoke_all()  # persistent grants are unmapped at disconnect
            for r in front.rings:
                assert all(guest.end_access(ref) for ref in r.refs), "ring pages still mapped"
            total = stats["total"]
            assert total["errors"] == 0 and total["in_flight"] == 0
            assert total["rd_req"] + total["wr_req"] + total["f_req"] + total["ds_req"] == 6 * nrings * per_round
            assert len(stats["rings"]) == nrings
            assert all(r["rd_req"] + r["wr_req"] > 0 for r in stats["rings"]), "a ring carried no data"
            kinds = ("read", "write", "flush", "barrier", "discard") + (("indirect",) if indirect else ())
            for kind in kinds:
                assert any(k.startswith(kind) for k in work.counts), f"workload never sent a {kind}"
            if not indirect:
                assert not any(k.startswith("indirect") for k in work.counts)
        finally:
            front.close()
            vbd.close()


@pytest.fixture
def roomy_guest(hv_socket):
    """A guest with room for every data path's pages in turn (its frames are not given back between them)."""
    g = Guest.create(hv_socket, pages=2048, grant_frames=8)
    yield g
    g.close()


async def test_nothing_left_behind_after_disconnect(tmp_path, platform, roomy_guest):
    """No task, fd, memory region or grant mapping survives a connection.

    A first connection warms up what legitimately outlives it (the simulated
    gntdev's view of the guest's memory, libblkio's queue fds live with the
    storage); from then on every connect/disconnect cycle must give back
    exactly the fds it took.
    """
    guest = roomy_guest
    path = make_disk_file(tmp_path / "disk.img")
    tasks_before = count_tasks()
    for data_path, persistent in PATHS:
        vbd = make_vbd(path, data_path=data_path, persistent_grants=persistent)
        regions_before = len(list(vbd.storage.blkio.mem_regions))
        front = TestFrontend(guest, order=2, nrings=2, persistent=persistent)
        work = Workload(front, bytearray(path.read_bytes()), seed=5, persistent=persistent, indirect_max=20)
        fds = None
        for cycle in range(2):
            async with connected(vbd, front, platform):
                assert count_tasks() > tasks_before
                if data_path == "copy":
                    assert len(list(vbd.storage.blkio.mem_regions)) == regions_before + 2  # one per ring
                await work.round(0, 4)
                await work.round(1, 4)
            assert count_tasks() == tasks_before
            assert len(list(vbd.storage.blkio.mem_regions)) == regions_before
            if fds is None:
                fds = open_fds()
            assert open_fds() == fds, f"cycle {cycle}: fds differ"
            work.pool.revoke_all()
            for r in front.rings:  # the ring is unmapped; a reconnecting frontend grants it anew
                assert r.revoke_and_regrant(guest), "ring pages still mapped"
            work.pool = type(work.pool)(front, persistent)
        front.close()
        vbd.close()
        path.write_bytes(bytes(work.model))  # keep the file in step for the next data path


async def test_reconnect_serves_again(tmp_path, platform, guest):
    """A frontend may disconnect and connect again (e.g. after kexec) to the same Vbd."""
    path = make_disk_file(tmp_path / "disk.img")
    model = bytearray(path.read_bytes())
    vbd = make_vbd(path, data_path="copy")
    try:
        for attempt in range(3):
            front = TestFrontend(guest, order=0, nrings=1)
            work = Workload(front, model, seed=attempt)
            async with connected(vbd, front, platform):
                await work.round(0, 6)
            front.close()
        assert read_back(path, 0, DISK_SIZE) == model
    finally:
        vbd.close()


async def test_bad_connection_specs_are_refused_and_leave_nothing(tmp_path, platform, guest):
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1, ring_page_order=1, persistent_grants=False)
    try:
        too_many = TestFrontend(guest, nrings=2)
        too_big = TestFrontend(guest, order=2)
        persistent_not_offered = TestFrontend(guest, persistent=True)
        front = TestFrontend(guest)
        with pytest.raises(VbdConnectError, match="cannot map ring"):  # a ref never granted
            spec = front.spec()
            await vbd.serve(spec.__class__(spec.frontend_domid, spec.abi, False,
                                           (spec.rings[0].__class__(0, (3999,), spec.rings[0].event_channel),)),
                            platform)
        fds = open_fds()  # from here on (the sim gntdev has looked at the guest's memory)
        for bad in (too_many, too_big, persistent_not_offered):
            with pytest.raises(VbdConnectError):
                await vbd.serve(bad.spec(), platform)
        # an unbindable port: the ring mapping is released again
        spec = front.spec()
        bad = spec.__class__(spec.frontend_domid, spec.abi, False,
                             (spec.rings[0].__class__(0, spec.rings[0].ring_refs, 4000),))
        with pytest.raises(VbdConnectError, match="event channel"):
            await vbd.serve(bad, platform)
        assert all(guest.end_access(ref) for ref in front.rings[0].refs)
        assert not vbd.serving
        assert open_fds() == fds
        for f in (too_many, too_big, persistent_not_offered, front):
            f.close()
    finally:
        vbd.close()


def _limits(**kw) -> StorageLimits:
    base = dict(driver="io_uring", read_only=False, request_alignment=1, logical_block_size=512,
                physical_block_size=4096, optimal_io_size=0, buf_alignment=1, max_transfer=0,
                max_segments=1024, max_segment_len=0, needs_mem_regions=False, needs_mem_region_fd=False,
                mem_region_alignment=1, max_mem_regions=0, max_queues=4, can_add_queues=True, can_grow=True,
                flush_needed=True, supports_fua_natively=False, supports_discard=False, discard_alignment=0,
                discard_alignment_offset=0, max_discard_len=0, supports_write_zeroes=True,
                max_write_zeroes_len=0)
    base.update(kw)
    return StorageLimits(**base)


def test_features_follow_config_and_storage(tmp_path):
    cfg = disk_config(tmp_path / "x.img", max_indirect_segments=256, memory=64 << 20)
    f = derive_features(cfg, _limits(), capacity=1 << 30, num_queues=2)
    assert (f.sectors, f.sector_size, f.physical_sector_size) == (2 << 20, 512, 4096)
    assert f.flush and f.barrier and not f.discard_secure
    assert f.discard and f.discard_by_write_zeroes and f.discard_granularity == 512
    # (persistent grants by default, on the copy path too: its engine copies the mapped pages itself)
    assert f.max_indirect_segments == 256 and f.max_queues == 2 and f.persistent and f.data_path == "copy"
    assert f.connect_nodes()["feature-persistent"] == "1"
    off = disk_config(tmp_path / "x.img", persistent_grants=False)
    assert derive_features(off, _limits(), capacity=1 << 30, num_queues=1).connect_nodes()["feature-persistent"] == "0"
    assert f.probe_nodes() == {"feature-max-indirect-segments": "256", "multi-queue-max-queues": "2",
                               "max-ring-page-order": "4"}
    # vhost-user-like storage: real discard with its granularity, indirect bounded by max-segments
    vu = _limits(driver="virtio-blk-vhost-user", request_alignment=512, max_segments=126,
                 supports_discard=True, discard_alignment=4096, discard_alignment_offset=512,
                 max_discard_len=16 << 20, needs_mem_regions=True)
    f = derive_features(cfg, vu, capacity=1 << 30, num_queues=1)
    assert f.discard and not f.discard_by_write_zeroes
    assert (f.discard_granularity, f.discard_alignment, f.max_indirect_segments) == (4096, 512, 126)
    nodes = f.connect_nodes()
    assert nodes["discard-granularity"] == "4096" and nodes["discard-secure"] == "0"
    # max-transfer, bounce memory and the read-only storage
    f = derive_features(cfg, _limits(max_transfer=64 << 10), capacity=1 << 30, num_queues=1)
    assert f.max_indirect_segments == 16
    small = disk_config(tmp_path / "x.img", memory=1 << 20)
    assert derive_features(small, _limits(), capacity=1 << 30, num_queues=1).max_indirect_segments == 128
    assert derive_features(cfg, _limits(max_transfer=32 << 10), capacity=1 << 30,
                           num_queues=1).max_indirect_segments == 0  # 8 segments: no point in indirect
    ro = derive_features(cfg, _limits(read_only=True), capacity=1 << 30, num_queues=1)
    assert ro.read_only and not ro.discard and ro.info == 4 and "discard-granularity" not in ro.connect_nodes()
    mapped = disk_config(tmp_path / "x.img", data_path="map", persistent_grants=True, memory=1 << 20)
    f = derive_features(mapped, _limits(), capacity=1 << 30, num_queues=1)
    assert f.persistent and f.max_indirect_segments == 256  # no bounce memory on the map path
    assert f.request_limits(100).sectors == 100 and f.request_limits().max_indirect_segments == 256
    # storage that needs registered memory cannot take grant-mapped pages: copy, whatever the config
    f = derive_features(mapped, vu, capacity=1 << 30, num_queues=1)
    assert f.data_path == "copy" and f.persistent and f.max_indirect_segments == 126


async def test_online_resize_is_seen_and_applied(tmp_path, platform, guest):
    path = make_disk_file(tmp_path / "disk.img", size=1 << 20)
    vbd = make_vbd(path)
    front = TestFrontend(guest)
    try:
        async with connected(vbd, front, platform):
            end = vbd.sectors
            page = front.data_page(readonly=False)
            front.rw(0, OP_READ, 1, end, [(page.gref, 0, 7)])
            front.push()
            [r] = await front.responses(0, 1)
            assert r.status != RSP_OKAY  # beyond the end
            with open(path, "ab") as f:
                f.truncate(2 << 20)
            assert vbd.current_sectors() == (2 << 20) // 512  # the control side polls this...
            vbd.apply_size(vbd.current_sectors())  # ...publishes it, then applies it
            w = front.data_page(readonly=True, fill=b"grown" * 800)
            front.rw(0, OP_WRITE, 2, end, [(w.gref, 0, 7)])
            front.push()
            [r] = await front.responses(0, 1)
            assert r == (2, OP_WRITE, RSP_OKAY)
        assert read_back(path, end * 512, 4096) == w.bytes()
    finally:
        front.close()
        vbd.close()


def test_open_storage_uses_the_config(tmp_path):
    path = make_disk_file(tmp_path / "disk.img")
    dev = open_storage(disk_config(path, queues=3, readonly=True))
    try:
        assert len(dev.queues) == 3 and dev.limits.read_only
        vbd = Vbd(disk_config(path, queues=3, readonly=True), dev)
        assert vbd.features.read_only and vbd.features.max_queues == 3
        assert vbd.current_sectors() == DISK_SIZE // 512
    finally:
        dev.close()


@given(
    extents=st.lists(st.tuples(st.integers(0, 1 << 40), st.integers(1, 64)), min_size=1, max_size=40),
    max_transfer_blocks=st.integers(0, 40),
    max_segments=st.integers(0, 12),
)
def test_split_extents_keeps_every_byte_in_order_within_the_limits(extents, max_transfer_blocks, max_segments):
    extents = [(addr, n * 512) for addr, n in extents]
    max_transfer = max_transfer_blocks * 512
    parts = split_extents(extents, max_transfer, max_segments)

    def bytes_of(exts):
        return [(a + i) for a, n in exts for i in range(0, n, 512)]

    assert bytes_of([e for p in parts for e in p]) == bytes_of(extents)
    for p in parts:
        assert p
        assert not max_segments or len(p) <= max_segments
        assert not max_transfer or sum(n for _a, n in p) <= max_transfer
        assert all(n % 512 == 0 and n > 0 for _a, n in p)


def test_bounce_memory_plan():
    # small requests only: one 44 KiB buffer per slot, as many slots as fit
    assert plan_bounce(64 << 20, 256, SMALL_BUFFER) == (256, 0)
    assert plan_bounce(1 << 20, 256, SMALL_BUFFER) == ((1 << 20) // SMALL_BUFFER, 0)
    # big indirect requests: at least one large buffer, the rest of the memory after the slots
    slots, large = plan_bounce(64 << 20, 256, 1 << 20)
    assert (
        slots == 256 and large == (64 << 20) // (1 << 20) - 11 and slots * SMALL_BUFFER + large * (1 << 20) <= 64 << 20
    )
    assert plan_bounce(1 << 20, 32, 512 << 10) == (11, 1)


def test_fast_copy_segment_is_an_ordinary_copy_segment():
    from xenblk_vhost.backend.datapath.grant_copy import segment
    from xenblk_vhost.xen.interfaces import CopySegment

    s = segment(True, 3, 77, 512, 0x1000, 1024)
    assert type(s) is CopySegment
    assert s == CopySegment(True, 3, 77, 512, 0x1000, 1024)
    assert (s.to_guest, s.domid, s.gref, s.guest_offset, s.local_addr, s.length) == (True, 3, 77, 512, 0x1000, 1024)
