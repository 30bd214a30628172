"""io_uring on files and on a loop block device: what is specific to it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from storage_support.loopdev import refresh_loop_size
from storage_support.patterns import pattern_range, read_file
from xenblk_vhost.storage import BlkioError, StorageDevice, address_of

BS = 4096
TIMEOUT = 10.0


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(16 << 20)
    return p


def test_limits_on_a_file(image):
    with StorageDevice.open("io_uring", {"path": str(image)}) as buffered:
        lim = buffered.limits
        assert buffered.capacity == os.stat(image).st_size
        assert lim.request_alignment == 1 and lim.logical_block_size == 512
        assert not lim.needs_mem_regions and lim.can_add_queues and lim.can_grow
        assert lim.supports_discard is False  # see test_discard_is_not_supported
    with StorageDevice.open("io_uring", {"path": str(image), "direct": True}) as direct:
        assert direct.limits.request_alignment == 512 and direct.limits.buf_alignment == 512


def test_limits_on_a_block_device(loop_backed_file):
    dev_path, backing = loop_backed_file
    with StorageDevice.open("io_uring", {"path": str(dev_path), "direct": True}) as dev:
        assert dev.capacity == os.stat(backing).st_size
        sysfs = Path("/sys/block") / dev_path.name / "queue"
        assert dev.limits.request_alignment == int((sysfs / "logical_block_size").read_text())
        assert dev.limits.physical_block_size == int((sysfs / "physical_block_size").read_text())
        assert dev.limits.can_grow is False


@pytest.mark.parametrize("kind", ["file", "loop"])
def test_discard_is_not_supported(kind, image, request):
    """libblkio 1.5's io_uring driver fails every discard with EOPNOTSUPP.

    If this starts passing a discard, libblkio grew support: update
    StorageLimits.supports_discard.
    """
    path = image if kind == "file" else request.getfixturevalue("loop_backed_file")[0]
    with StorageDevice.open("io_uring", {"path": str(path)}) as dev:
        q = dev.queues[0]
        region = dev.alloc_mem_region(16 * BS)
        region.view[:] = pattern_range(0, 16, seed=5)
        q.write(0, region.addr, 16 * BS, 1)
        assert q.do_io(1, timeout=TIMEOUT) == [(1, 0)]
        q.discard(0, 16 * BS, 2)
        assert q.do_io(1, timeout=TIMEOUT) == [(2, -errno.EOPNOTSUPP)]
        assert not dev.limits.supports_discard
        q.read(0, region.addr, 16 * BS, 3)
        assert q.do_io(1, timeout=TIMEOUT) == [(3, 0)]
        assert bytes(region.view) == pattern_range(0, 16, seed=5)  # data untouched


def test_capacity_follows_a_growing_file(image):
    with StorageDevice.open("io_uring", {"path": str(image)}) as dev:
        old = dev.capacity
        os.truncate(image, 2 * old)
        assert dev.capacity == 2 * old  # no reopen needed


def test_capacity_follows_a_growing_block_device(loop_backed_file):
    dev_path, backing = loop_backed_file
    with StorageDevice.open("io_uring", {"path": str(dev_path)}) as dev:
        old = dev.capacity
        os.truncate(backing, 2 * old)
        assert dev.capacity == old  # the block device has not changed yet
        refresh_loop_size(dev_path)
        assert dev.capacity == 2 * old


def test_plain_python_buffers_without_regions(image):
    """needs-mem-regions=false: any memory will do, e.g. a bytearray."""
    with StorageDevice.open("io_uring", {"path": str(image)}) as dev:
        q = dev.queues[0]
        src = bytearray(pattern_range(0, 4, seed=6))
        dst = bytearray(4 * BS)
        q.write(0, address_of(src), len(src), 1)
        assert q.do_io(1, timeout=TIMEOUT) == [(1, 0)]
        q.read(0, address_of(dst), len(dst), 2)
        assert q.do_io(1, timeout=TIMEOUT) == [(2, 0)]
        assert dst == src == read_file(image, 0, 4 * BS)


def test_added_queue_works_and_can_be_removed(image):
    with StorageDevice.open("io_uring", {"path": str(image)}) as dev:
        assert dev.limits.can_add_queues
        q1 = dev.add_queue()
        assert q1.index == 1 and len(dev.queues) == 2
        region = dev.alloc_mem_region(BS)
        region.view[:] = pattern_range(7, 1)
        q1.write(7 * BS, region.addr, BS, 70)
        assert q1.do_io(1, timeout=TIMEOUT) == [(70, 0)]
        assert read_file(image, 7 * BS, BS) == pattern_range(7, 1)
        dev.remove_queue(q1)
        assert q1.closed and dev.queues == [dev.blkio.queue(0)]
        with pytest.raises(BlkioError) as err:
            q1.read(0, region.addr, BS, 1)
        assert err.value.errno == errno.EBADF
