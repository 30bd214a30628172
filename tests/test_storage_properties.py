"""Property access, lifecycle rules and errors, checked against real libblkio (io_uring)."""

from __future__ import annotations

import errno
import gc
import os
from pathlib import Path

import pytest

from xenblk_vhost.storage import Blkio, BlkioError, StorageDevice
from xenblk_vhost.storage.device import CONNECTED_STATE_PROPERTIES


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    with open(p, "wb") as f:
        f.truncate(8 << 20)
    return p


def test_typed_getters_and_setters(image):
    with Blkio("io_uring") as b:
        assert b.get_str("driver") == "io_uring"  # malloc'd by libblkio, freed by us
        b.set_str("path", str(image))
        b.set_bool("direct", True)
        assert b.get_bool("direct") is True
        b.connect()
        assert b.get_str("path") == str(image)
        assert b.get_uint64("capacity") == os.stat(image).st_size
        b.set_int("num-entries", 64)
        assert b.get_int("num-entries") == 64
        assert b.get_str("num-entries") == "64"  # blkio_get_str converts any type
        with pytest.raises(BlkioError) as err:  # a real uint64 property, but read-only
            b.set_uint64("capacity", 1)
        assert (err.value.errno, err.value.message) == (errno.EACCES, "Property is read-only")
        with pytest.raises(BlkioError) as err:  # type checked by libblkio
            b.set_uint64("num-entries", 1)
        assert err.value.errno == errno.ENOTTY
        b.start()
        assert b.get_int("num-queues") == 1


def test_set_str_converts_to_the_property_type(image):
    with Blkio("io_uring") as b:
        b.set("path", str(image))
        b.set("read-only", True)
        b.connect()
        b.set("num-entries", 32)  # int through blkio_set_str
        assert b.get_bool("read-only") is True
        assert b.get_int("num-entries") == 32


def test_wrong_type_is_enotty_with_libblkio_message(image):
    with Blkio("io_uring") as b:
        with pytest.raises(BlkioError) as err:
            b.get_int("driver")
    assert err.value.errno == errno.ENOTTY
    assert err.value.message  # libblkio said something
    assert err.value.operation == "blkio_get_int(driver)"


def test_unknown_property_is_enoent_with_libblkio_message():
    with Blkio("io_uring") as b:
        with pytest.raises(BlkioError) as err:
            b.get_bool("no-such-property")
    assert err.value.errno == errno.ENOENT
    assert "Unknown property name" in err.value.message  # libblkio 1.5's wording
    assert "no-such-property" in str(err.value)


def test_connect_time_property_refused_after_connect(image):
    with Blkio("io_uring") as b:
        b.set("path", str(image))
        b.connect()
        with pytest.raises(BlkioError) as err:
            b.set_bool("direct", True)
    assert err.value.errno > 0 and err.value.message


def test_bogus_path_gives_libblkio_message(tmp_path):
    missing = tmp_path / "does-not-exist.img"
    with pytest.raises(BlkioError) as err:
        StorageDevice.open("io_uring", {"path": str(missing)})
    assert err.value.errno == errno.ENOENT
    assert err.value.operation == "blkio_connect(io_uring)"
    assert err.value.message  # libblkio's text, e.g. "Failed to open file: No such file or directory"


def test_unknown_driver():
    with pytest.raises(BlkioError) as err:
        Blkio("no-such-driver")
    assert err.value.errno > 0 and err.value.message


def test_open_applies_properties_in_the_right_state(image):
    props = {"path": str(image), "read-only": True, "num-entries": 16}
    assert "num-entries" in CONNECTED_STATE_PROPERTIES
    with StorageDevice.open("io_uring", props, num_queues=3) as dev:
        assert dev.blkio.get_int("num-entries") == 16
        assert dev.blkio.get_int("num-queues") == 3
        assert len(dev.queues) == 3
        assert dev.limits.read_only is True


def test_num_queues_is_capped_or_refused(vhost_user_disk):
    props = {"path": str(vhost_user_disk.socket)}
    with StorageDevice.open("virtio-blk-vhost-user", props, num_queues=8) as dev:
        assert len(dev.queues) == 2  # the export's num-queues
    with pytest.raises(BlkioError) as err:
        StorageDevice.open("virtio-blk-vhost-user", props, num_queues=8, strict_queues=True)
    assert err.value.errno == errno.EINVAL


def test_close_is_idempotent_and_retires_everything(image):
    dev = StorageDevice.open("io_uring", {"path": str(image)})
    q = dev.queues[0]
    region = dev.alloc_mem_region(4096)
    dev.close()
    dev.close()
    assert dev.closed and q.closed and region.released
    with pytest.raises(BlkioError) as err:
        q.read(0, region.addr, 4096, 1)
    assert err.value.errno == errno.EBADF
    with pytest.raises(BlkioError):
        q.do_io()
    with pytest.raises(BlkioError):
        dev.blkio.get_uint64("capacity")
    with pytest.raises(ValueError):
        _ = region.view



def _open_fds() -> set[tuple[int, str]]:
    gc.collect()  # an earlier test's garbage holding an fd must not close it between two counts
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            fds.add((int(name), os.readlink(f"/proc/self/fd/{name}")))
        except OSError:
            pass  # the listing's own fd, already closed
    return fds


def test_no_threads_and_nothing_left_open_after_close(image, vhost_user_disk):
    """The kernel's view: libblkio adds no threads, and close() gives back every fd."""
    fds_before = _open_fds()
    threads_before = len(os.listdir("/proc/self/task"))
    devices = [
        StorageDevice.open("io_uring", {"path": str(image)}, num_queues=2),
        StorageDevice.open("io_uring", {"path": str(image), "direct": True}),
        StorageDevice.open("virtio-blk-vhost-user", {"path": str(vhost_user_disk.socket)}, num_queues=2),
    ]
    for dev in devices:
        region = dev.alloc_mem_region(4096)
        for q in dev.queues:
            q.read(0, region.addr, 4096, 1)
            assert q.do_io(1, timeout=10) == [(1, 0)]
            assert q.completion_fd >= 0
    assert len(os.listdir("/proc/self/task")) == threads_before
    assert len(_open_fds()) > len(fds_before)  # the devices did open things...
    for dev in devices:
        dev.close()
    assert _open_fds() == fds_before  # ...and closed all of them


def test_read_only_device_refuses_writes(image):
    with open(image, "r+b") as f:
        f.write(b"\x5a" * 4096)
    with StorageDevice.open("io_uring", {"path": str(image), "read-only": True}) as dev:
        q = dev.queues[0]
        region = dev.alloc_mem_region(4096)
        q.write(0, region.addr, 4096, 1)
        q.write_zeroes(0, 4096, 2)
        q.flush(3)
        q.read(0, region.addr, 4096, 4)
        assert sorted(q.do_io(4, timeout=10)) == [(1, -errno.EBADF), (2, -errno.EBADF), (3, 0), (4, 0)]
        assert bytes(region.view) == b"\x5a" * 4096
    with open(image, "rb") as f:
        assert f.read(4096) == b"\x5a" * 4096
