"""Memory regions: libblkio-allocated ones and the caller's own memfd mapping."""

from __future__ import annotations

import mmap
import os

import pytest

from storage_support.patterns import pattern_range, read_file
from xenblk_vhost.storage import BlkioError, IovecArray, StorageDevice, address_of

BS = 4096
TIMEOUT = 10.0


@pytest.fixture
def vu_device(vhost_user_disk):
    with StorageDevice.open("virtio-blk-vhost-user", {"path": str(vhost_user_disk.socket)}) as dev:
        yield dev


def test_allocated_region_is_a_mapped_memfd(vu_device):
    region = vu_device.alloc_mem_region(64 * 1024)
    assert region.owned and region.length >= 64 * 1024
    assert region.fd >= 0 and os.readlink(f"/proc/self/fd/{region.fd}").startswith("/memfd:")
    assert region.addr % vu_device.limits.mem_region_alignment == 0
    # the view and the memfd are the same memory
    region.view[:BS] = pattern_range(0, 1)
    assert os.pread(region.fd, BS, region.fd_offset) == pattern_range(0, 1)
    assert region.address(BS) == region.addr + BS
    with pytest.raises(ValueError):
        region.address(region.length + 1)
    vu_device.release_mem_region(region)
    assert region.released
    with pytest.raises(ValueError):
        _ = region.view
    with pytest.raises(ValueError):
        vu_device.release_mem_region(region)  # not ours any more


def test_callers_memfd_region_serves_vhost_user_io(vu_device, vhost_user_disk):
    """The simulator's guest memory is a memfd: map it and do I/O straight into it."""
    size = 32 * BS
    fd = os.memfd_create("guest-ram")
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as ram:
            region = vu_device.map_mem_region(address_of(ram), size, fd, 0)
            assert not region.owned
            ram[0 : 8 * BS] = pattern_range(0, 8, seed=11)
            q = vu_device.queues[0]
            iov = IovecArray(2)  # gather two 4-block pieces of guest RAM, swapped
            iov.set(0, region.address(4 * BS), 4 * BS)
            iov.set(1, region.address(0), 4 * BS)
            q.writev(512 * BS, iov.address(0), 2, 1)
            q.flush(2)
            assert sorted(q.do_io(2, timeout=TIMEOUT)) == [(1, 0), (2, 0)]
            expected = pattern_range(4, 4, seed=11) + pattern_range(0, 4, seed=11)
            assert read_file(vhost_user_disk.image, 512 * BS, 8 * BS) == expected
            q.read(512 * BS, region.address(16 * BS), 8 * BS, 3)
            assert q.do_io(1, timeout=TIMEOUT) == [(3, 0)]
            # the data is in the memfd itself, as the server wrote it there
            assert os.pread(fd, 8 * BS, 16 * BS) == expected
            vu_device.release_mem_region(region)  # unmapped before the mmap goes away
    finally:
        os.close(fd)


def test_region_without_fd_is_refused_when_fd_is_needed(vu_device):
    assert vu_device.limits.needs_mem_region_fd
    buf = mmap.mmap(-1, BS)
    try:
        with pytest.raises(BlkioError) as err:
            vu_device.map_mem_region(address_of(buf), BS, -1)
        assert err.value.errno > 0 and err.value.message
    finally:
        buf.close()


def test_regions_are_gone_after_close(vhost_user_disk):
    dev = StorageDevice.open("virtio-blk-vhost-user", {"path": str(vhost_user_disk.socket)})
    regions = [dev.alloc_mem_region(BS) for _ in range(4)]
    dev.close()
    assert all(r.released for r in regions)
