"""virtio-blk-vhost-user against a real qemu-storage-daemon: what is specific to it."""

from __future__ import annotations

import errno
import os
import signal

import pytest
import trio

from storage_support.patterns import pattern_range, read_file
from xenblk_vhost.storage import BlkioError, StorageDevice

BS = 4096
DEADLINE = 20


def _open(export, num_queues=1) -> StorageDevice:
    return StorageDevice.open("virtio-blk-vhost-user", {"path": str(export.socket)}, num_queues)


def test_limits_reported_by_qsd(vhost_user_disk):
    with _open(vhost_user_disk, 2) as dev:
        lim = dev.limits
        assert dev.capacity == vhost_user_disk.size == os.stat(vhost_user_disk.image).st_size
        assert lim.needs_mem_regions and lim.needs_mem_region_fd
        assert lim.max_queues == vhost_user_disk.num_queues == 2
        assert lim.can_add_queues is False
        assert lim.logical_block_size == lim.request_alignment == 512
        assert lim.max_segments == 126  # qsd 7.2's seg_max (queue size 128 - 2)
        assert lim.supports_discard and lim.max_discard_len > 0
        assert lim.supports_write_zeroes and lim.max_write_zeroes_len > 0
        assert lim.can_grow is False


def test_discard_punches_a_hole_in_the_backing_file(vhost_user_disk):
    """qsd exports with discard=unmap: the file loses the blocks and reads back zeroes."""
    image = vhost_user_disk.image
    with _open(vhost_user_disk) as dev:
        q = dev.queues[0]
        region = dev.alloc_mem_region(256 * BS)
        region.view[:] = pattern_range(0, 256, seed=9)
        q.write(0, region.addr, 256 * BS, 1)
        q.flush(2)
        assert sorted(q.do_io(2, timeout=DEADLINE)) == [(1, 0), (2, 0)]
        os.sync()
        allocated_before = os.stat(image).st_blocks * 512
        q.discard(64 * BS, 128 * BS, 3)
        assert q.do_io(1, timeout=DEADLINE) == [(3, 0)]
        q.flush(4)
        assert q.do_io(1, timeout=DEADLINE) == [(4, 0)]
        os.sync()
        assert os.stat(image).st_blocks * 512 <= allocated_before - 128 * BS
        data = read_file(image, 0, 256 * BS)
        assert data[: 64 * BS] == pattern_range(0, 64, seed=9)
        assert data[64 * BS : 192 * BS] == bytes(128 * BS)
        assert data[192 * BS :] == pattern_range(192, 64, seed=9)


def test_resize_is_seen_after_reopen(qsd, vhost_user_disk):
    """The size is read at connect. QEMU 7.2's export does not even update its own
    config on block_resize, so the export is re-created (dropping our connection)
    before reopen() connects again and sees the new size."""
    dev = _open(vhost_user_disk)
    try:
        old = dev.capacity
        qsd.qmp("block_resize", node_name=vhost_user_disk.node_name, size=2 * old)
        assert os.stat(vhost_user_disk.image).st_size == 2 * old  # the server did resize the file
        assert dev.capacity == old
        qsd.reexport("disk")
        dev = dev.reopen()
        assert dev.capacity == 2 * old
        region = dev.alloc_mem_region(BS)
        dev.queues[0].read(2 * old - BS, region.addr, BS, 1)  # the new last block is reachable
        assert dev.queues[0].do_io(1, timeout=DEADLINE) == [(1, 0)]
    finally:
        dev.close()


def test_out_of_range_read_is_eio(vhost_user_disk):
    with _open(vhost_user_disk) as dev:
        q = dev.queues[0]
        region = dev.alloc_mem_region(BS)
        q.read(dev.capacity, region.addr, BS, 1)
        assert q.do_io(1, timeout=DEADLINE) == [(1, -errno.EIO)]


def test_no_server_on_the_socket(tmp_path):
    with pytest.raises(BlkioError) as err:
        StorageDevice.open("virtio-blk-vhost-user", {"path": str(tmp_path / "nobody.sock")})
    assert err.value.errno > 0 and err.value.message
    assert err.value.operation == "blkio_connect(virtio-blk-vhost-user)"


async def test_daemon_killed_mid_run(qsd, vhost_user_disk):
    """A vanished server never completes requests: we time out with ETIME, never hang."""
    with _open(vhost_user_disk) as dev:
        q = dev.queues[0]
        region = dev.alloc_mem_region(32 * BS)
        with trio.fail_after(DEADLINE):
            for _round in range(3):  # the daemon is serving...
                for i in range(32):
                    q.read(i * BS, region.address(i * BS), BS, i)
                got = 0
                while got < 32:
                    got += len(await q.wait_io(timeout=DEADLINE))
            qsd.freeze()  # frozen, so the next requests stay in flight...
            for i in range(32):
                q.read(i * BS, region.address(i * BS), BS, 100 + i)
            q.submit()
            assert qsd.kill() == -signal.SIGKILL  # ...when it dies
            assert q.do_io(0) == []
            with pytest.raises(BlkioError) as err:
                q.do_io(32, timeout=0.5)
            assert err.value.errno == errno.ETIME
            with pytest.raises(BlkioError) as err:
                await q.wait_io(timeout=0.5)
            assert err.value.errno == errno.ETIME
        # more requests on the dead connection: still no hang, still ETIME
        q.read(0, region.addr, BS, 999)
        with pytest.raises(BlkioError) as err:
            q.do_io(1, timeout=0.2)
        assert err.value.errno == errno.ETIME
    assert dev.closed
