"""libblkio's per-request calls: the compiled wrappers (native/blkio_calls.c) and cffi's ABI mode give the
same results on every call the datapath makes, and the compiled ones are what a queue uses by default."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from storage_support.patterns import pattern_range
from xenblk_vhost import native
from xenblk_vhost.storage import BlkioError, StorageDevice
from xenblk_vhost.storage.iovec import IovecArray

BS = 4096


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(4 << 20)
    return p


def test_a_queue_uses_the_compiled_calls_unless_the_kernels_are_off(image, monkeypatch):
    with StorageDevice.open("io_uring", {"path": str(image)}) as dev:
        q = dev.queues[0]
        assert q.compiled_calls is True
        assert q.select_calls(compiled=False) is False and q.compiled_calls is False
        assert q.select_calls(compiled=True) is True
    monkeypatch.setattr(native, "enabled", False)
    with StorageDevice.open("io_uring", {"path": str(image)}) as dev:
        assert dev.queues[0].compiled_calls is False


def run_every_call(dev) -> list:
    """Each queueing call once, each checked through do_io; what came back, in order."""
    q = dev.queues[0]
    region = dev.alloc_mem_region(8 * BS)
    iov = IovecArray(4)
    seen = []
    region.view[: 2 * BS] = pattern_range(0, 2, seed=11)
    q.write(0, region.addr, 2 * BS, 1)
    seen.append(q.do_io(1, 8, timeout=10.0))
    region.view[: 2 * BS] = bytes(2 * BS)
    q.read(0, region.addr, 2 * BS, 2)
    seen.append(q.do_io(1, 8, timeout=10.0))
    seen.append(bytes(region.view[: 2 * BS]) == pattern_range(0, 2, seed=11))
    region.view[2 * BS: 4 * BS] = pattern_range(8, 2, seed=12)
    iov.fill(0, [(region.address(3 * BS), BS), (region.address(2 * BS), BS)])
    q.writev(8 * BS, iov.address(0), 2, 3)
    q.submit()  # submitted without reaping, reaped below
    seen.append(q.do_io(1, 8, timeout=10.0))
    iov.fill(2, [(region.address(5 * BS), BS), (region.address(4 * BS), BS)])
    q.readv(8 * BS, iov.address(2), 2, 4)
    seen.append(q.do_io(1, 8, timeout=10.0))
    seen.append(bytes(region.view[4 * BS: 6 * BS]) == bytes(region.view[2 * BS: 4 * BS]))
    q.write_zeroes(0, BS, 5)
    q.flush(6)
    seen.append(sorted(q.do_io(2, 8, timeout=10.0)))
    q.discard(0, BS, 7)  # io_uring in libblkio 1.5: EOPNOTSUPP (test_storage_io_uring says why)
    seen.append(q.do_io(1, 8, timeout=10.0))
    q.read(0, 8, BS, 8)  # into an unmapped address: an error completion (EFAULT), not an exception
    seen.append(q.do_io(1, 8, timeout=10.0))
    seen.append(q.do_io(0, 8))  # nothing left: an empty reap
    with pytest.raises(BlkioError) as e:
        q.do_io(1, 8, timeout=0.05)  # nothing in flight to wait for: libblkio refuses
    seen.append(e.value.errno)
    return seen


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "abi"])
def test_both_flavours_do_the_same(image, compiled):
    with StorageDevice.open("io_uring", {"path": str(image)}) as dev:
        assert dev.queues[0].select_calls(compiled=compiled) is compiled
        seen = run_every_call(dev)
    assert seen[0] == [(1, 0)] and seen[1] == [(2, 0)] and seen[2] is True
    assert seen[3] == [(3, 0)] and seen[4] == [(4, 0)] and seen[5] is True
    assert seen[6] == [(5, 0), (6, 0)]
    assert seen[7] == [(7, -errno.EOPNOTSUPP)]
    assert seen[8] == [(8, -errno.EFAULT)]
    assert seen[9] == []
    assert seen[10] == errno.EINVAL


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "abi"])
def test_a_closed_queue_refuses_every_call(image, compiled):
    dev = StorageDevice.open("io_uring", {"path": str(image)})
    q = dev.queues[0]
    q.select_calls(compiled=compiled)
    dev.close()
    for call in (lambda: q.read(0, 0, BS, 1), lambda: q.flush(1), lambda: q.do_io(0, 1),
                 lambda: q.set_completion_fd_enabled(True), lambda: q.select_calls(compiled=True)):
        with pytest.raises(BlkioError) as e:
            call()
        assert e.value.errno == errno.EBADF
