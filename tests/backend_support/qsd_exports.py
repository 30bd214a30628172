"""qemu-storage-daemon exports the backend tests need beyond storage_support's plain ones.

Built on storage_support.qsd.StorageDaemon: a plain file export, with
export options appended to its --export argument (the helper has no
parameter for them), or with the file behind a blkdebug node that injects
errors (blkdebug_export: rules per operation and sector).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
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
    """A raw file behind blkdebug: every read and every write touching `sector` (512-byte units) fails with EIO."""
    with blkdebug_export(workdir, size, [InjectError("read", sector), InjectError("write", sector)]) as (_d, export):
        yield export


# blkdebug emits no event of its own on a read or write: a format driver above it does, on its
# file child (raw: read_aio, write_aio), and the block layer emits flush_to_disk on a flush. A
# rule becomes active at its event, then fails the requests of its iotype that touch its sector.
_BLKDEBUG_EVENT = {"read": "read_aio", "write": "write_aio", "flush": "flush_to_disk"}


@dataclass(frozen=True)
class InjectError:
    """One blkdebug inject-error rule: `iotype` requests (read, write, flush) touching `sector`
    (512-byte units; None: any) fail with `errno`, every time or only the first time (`once`)."""

    iotype: str
    sector: int | None = None
    errno: int = 5  # EIO
    once: bool = False

    def options(self, i: int) -> list[str]:
        out = [f"inject-error.{i}.event={_BLKDEBUG_EVENT[self.iotype]}", f"inject-error.{i}.iotype={self.iotype}",
               f"inject-error.{i}.errno={self.errno}", f"inject-error.{i}.once={'on' if self.once else 'off'}"]
        if self.sector is not None:
            out.append(f"inject-error.{i}.sector={self.sector}")
        return out


@contextlib.contextmanager
def blkdebug_export(workdir: Path, size: int, rules: list[InjectError], *,
                    image: Path | None = None) -> Iterator[tuple[StorageDaemon, VhostUserExport]]:
    """A raw file behind blkdebug (its rules) behind a raw format node, exported over vhost-user."""
    daemon = StorageDaemon(workdir)
    image = image if image is not None else _sparse(daemon.workdir / "blkdebug.img", size)
    options = [opt for i, rule in enumerate(rules) for opt in rule.options(i)]
    daemon._args += [
        "--blockdev", f"driver=file,node-name=dbg-file,filename={image}",
        "--blockdev", ",".join(["driver=blkdebug,node-name=dbg,image=dbg-file", *options]),
        "--blockdev", "driver=raw,node-name=dbg-raw,file=dbg",
    ]
    export = daemon._add_export("dbg", "dbg-raw", size, image, 1, True)
    daemon.start()
    try:
        yield daemon, export
    finally:
        daemon.stop()
