"""pytest fixtures for storage tests (a plugin: tests/conftest.py loads it).

qsd:             a started qemu-storage-daemon (under tmp_path) exporting "disk":
                 a 16 MiB raw file, num-queues=2, discard=unmap. Stopped with
                 SIGTERM at teardown, and the test fails if it does not exit 0
                 (unless the test killed it on purpose).
vhost_user_disk: that export (.socket for libblkio's "path", .image the backing file).
loop_backed_file: (loop block device, its 16 MiB backing file), attached with
                 losetup and detached at teardown (needs root, as on the test machine).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from .loopdev import loop_device
from .qsd import StorageDaemon, VhostUserExport

DISK_SIZE = 16 << 20


@pytest.fixture
def qsd(tmp_path: Path) -> Iterator[StorageDaemon]:
    daemon = StorageDaemon(tmp_path / "qsd")
    daemon.add_file_export("disk", size=DISK_SIZE, num_queues=2, discard="unmap")
    daemon.start()
    try:
        yield daemon
    finally:
        killed_by_test = daemon.process.poll() is not None
        rc = daemon.stop()
        if not killed_by_test:
            assert rc == 0, f"qemu-storage-daemon exited with {rc}: {daemon.log()}"


@pytest.fixture
def vhost_user_disk(qsd: StorageDaemon) -> VhostUserExport:
    return qsd.exports["disk"]


@pytest.fixture
def loop_backed_file(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(loop device, its backing file of DISK_SIZE bytes)."""
    backing = tmp_path / "loop-backing.img"
    with open(backing, "wb") as f:
        f.truncate(DISK_SIZE)
    with loop_device(backing) as dev:
        yield dev, backing
