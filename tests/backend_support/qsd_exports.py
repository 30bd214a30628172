"""qemu-storage-daemon exports the backend tests need beyond storage_support's plain ones.

Built on storage_support.qsd.StorageDaemon: a plain file export, with
export options appended to its --export argument (the helper has no
parameter for them), or with the file behind a blkdebug node that injects
errors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from storage_support.qsd import StorageDaemon, VhostUserExport


def _sparse(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


@contextlib.contextmanager
def four_k_sector_export(workdir: Path, size: int) -> Iterator[VhostUserExport]:
    """A raw file exported with 4 KiB logical blocks (vhost-user-blk logical-block-size)."""
    daemon = StorageDaemon(workdir)
    export = daemon.add_file_export("disk4k", size=size, num_queues=1)
    assert daemon._args[-2] == "--export"
    daemon._args[-1] += ",logical-block-size=4096"
    daemon.start()
    try:
        yield export
    finally:
        daemon.stop()


@contextlib.contextmanager
def daemon_with_file(
    workdir: Path, size: int, *, num_queues: int = 2
) -> Iterator[tuple[StorageDaemon, VhostUserExport]]:
    """A started daemon exporting one raw file; the caller may kill it."""
    daemon = StorageDaemon(workdir)
    export = daemon.add_file_export("disk", size=size, num_queues=num_queues)
    daemon.start()
    try:
        yield daemon, export
    finally:
        daemon.stop()


@contextlib.contextmanager
def failing_sector_export(workdir: Path, size: int, sector: int) -> Iterator[VhostUserExport]:
    """A raw file behind blkdebug: every read or write touching `sector` (512-byte units) fails with EIO."""
    daemon = StorageDaemon(workdir)
    image = _sparse(daemon.workdir / "failing.img", size)
    node = "failing-dbg"
    daemon._args += [
        "--blockdev", f"driver=file,node-name=failing-file,filename={image}",
        "--blockdev", (f"driver=blkdebug,node-name={node},image=failing-file,"
                       f"inject-error.0.event=read_aio,inject-error.0.errno=5,inject-error.0.sector={sector},"
                       f"inject-error.0.once=off,"
                       f"inject-error.1.event=pwritev,inject-error.1.errno=5,inject-error.1.sector={sector},"
                       f"inject-error.1.once=off"),
    ]
    export = daemon._add_export("failing", node, size, image, 1, True)
    daemon.start()
    try:
        yield export
    finally:
        daemon.stop()
