"""The storage the benchmarks run against, set up and torn down in one place.

    file  io_uring on a file in the page cache (warmed before each run)
    null  qemu-storage-daemon's null-co exported over vhost-user-blk
          (requests complete without touching data: the request rate of
          the path itself)

    with open_targets(["file", "null"], workdir, queues=2) as targets:
        targets["file"].driver, .path, .size, .prepare(), .cpu_seconds()
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the qemu-storage-daemon helper lives with the tests

from storage_support.qsd import StorageDaemon  # noqa: E402

FILE_SIZE = 256 << 20
NULL_SIZE = 1 << 30
LABELS = {"file": "page-cache file, io_uring", "null": "qemu-storage-daemon null-co, vhost-user"}


def make_file(path: Path, size: int) -> None:
    """A file of `size` bytes of incompressible data (kept if it already has that size)."""
    if path.exists() and path.stat().st_size == size:
        return
    chunk = os.urandom(1 << 20)
    with open(path, "wb") as f:
        for i in range(size >> 20):
            f.write(chunk[i % 251:] + chunk[:i % 251])  # no two MiB alike


def warm(path: Path) -> None:
    """Read the whole file, so that it is in the page cache (the VM may evict it between runs)."""
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


@dataclass
class Target:
    name: str
    driver: str
    path: str
    size: int
    daemon: StorageDaemon | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return LABELS[self.name]

    def prepare(self) -> None:
        """Before each run: the file back in the page cache."""
        if self.name == "file":
            warm(Path(self.path))

    def cpu_seconds(self) -> float | None:
        """CPU time the storage daemon has used so far (None: no daemon, the I/O runs in the caller)."""
        if self.daemon is None or self.daemon.process is None:
            return None
        return process_cpu_seconds(self.daemon.process.pid)


def process_cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a process, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def open_targets(names, workdir: Path, *, queues: int = 1, file_size: int = FILE_SIZE) -> Iterator[dict[str, Target]]:
    """The named targets, ready; the storage daemon stopped on the way out."""
    unknown = set(names) - set(LABELS)
    if unknown:
        raise ValueError(f"unknown target(s) {', '.join(sorted(unknown))} (have: {', '.join(LABELS)})")
    targets: dict[str, Target] = {}
    daemon = None
    try:
        if "file" in names:
            img = workdir / "bench.img"
            make_file(img, file_size)
            targets["file"] = Target("file", "io_uring", str(img), file_size)
        if "null" in names:
            daemon = StorageDaemon(workdir / "qsd")
            export = daemon.add_null_export("null", size=NULL_SIZE, num_queues=queues)
            daemon.start()
            targets["null"] = Target("null", "virtio-blk-vhost-user", str(export.socket), NULL_SIZE, daemon)
        yield {n: targets[n] for n in names}
    finally:
        if daemon is not None:
            daemon.stop()
