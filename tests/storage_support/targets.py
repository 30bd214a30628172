"""Storage targets for parametrized tests: one StorageDevice plus the file behind it.

    @pytest.fixture(params=TARGET_NAMES)
    def target(request, tmp_path): yield from open_target(request, tmp_path)

Every target has a backing file we can read directly (the reference the
data is compared with):
  file         io_uring on a regular file, page cache
  file-direct  io_uring on a regular file, O_DIRECT (aligned region buffers)
  loop         io_uring on a loop block device over a file
  vhost-user   virtio-blk-vhost-user to qemu-storage-daemon exporting a file
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from xenblk_vhost.storage import StorageDevice

from .loopdev import loop_device

TARGET_NAMES = ["file", "file-direct", "loop", "vhost-user"]
TARGET_SIZE = 16 << 20


@dataclass
class Target:
    name: str
    device: StorageDevice
    backing: Path  # read it directly to check what the device wrote


def _sparse_file(path: Path, size: int = TARGET_SIZE) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def open_target(request, tmp_path: Path, num_queues: int = 1) -> Iterator[Target]:
    """Generator for a fixture parametrized with TARGET_NAMES (request.param)."""
    name = request.param
    with contextlib.ExitStack() as stack:
        if name in ("file", "file-direct"):
            backing = _sparse_file(tmp_path / "disk.img")
            props = {"path": str(backing), "direct": name == "file-direct"}
            dev = StorageDevice.open("io_uring", props, num_queues)
        elif name == "loop":
            backing = _sparse_file(tmp_path / "loop.img")
            blockdev = stack.enter_context(loop_device(backing))
            dev = StorageDevice.open("io_uring", {"path": str(blockdev)}, num_queues)
        elif name == "vhost-user":
            export = request.getfixturevalue("vhost_user_disk")
            backing = export.image
            dev = StorageDevice.open("virtio-blk-vhost-user", {"path": str(export.socket)}, num_queues)
        else:
            raise ValueError(name)
        stack.callback(dev.close)
        yield Target(name, dev, backing)
