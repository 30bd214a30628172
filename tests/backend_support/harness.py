"""Setting up a Vbd against the simulated hypervisor, and checking it left nothing behind.

    with running_hypervisor(sock):                       # its own process
        platform = open_sim(sock)
        guest = Guest.create(sock, pages=...)
        front = TestFrontend(guest, ...)
        vbd = make_vbd(tmp_path, data_path="copy")       # io_uring on a patterned file
        async with connected(vbd, front, platform):
            ...
        assert_released(...)
"""

from __future__ import annotations

import gc
import hashlib
import os
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from storage_support.patterns import pattern_range
from xenblk_vhost.backend.datapath.vbd import Vbd
from xenblk_vhost.config import DiskConfig

DISK_SIZE = 4 << 20
XVDA = 51712


def make_disk_file(path: Path, size: int = DISK_SIZE, seed: int = 7) -> Path:
    """A file whose every 4 KiB block has distinct content (so misplaced data shows)."""
    with open(path, "wb") as f:
        f.write(pattern_range(0, size // 4096, seed=seed))
    return path


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def read_back(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def disk_config(path: Path | str, **kw) -> DiskConfig:
    kw.setdefault("driver", "io_uring")
    kw.setdefault("queues", 2)
    kw.setdefault("memory", 8 << 20)
    return DiskConfig(vdev=XVDA, path=str(path), **kw)


def make_vbd(path: Path | str, **kw) -> Vbd:
    vbd_kw = {k: kw.pop(k) for k in ("storage_timeout", "drain_timeout", "max_persistent_grants",
                                        "persistent_trim_interval", "shape", "reconnect",
                                        "journal_dir")
              if k in kw}
    return Vbd.open(disk_config(path, **kw), **vbd_kw)


@asynccontextmanager
async def connected(vbd: Vbd, front, platform):
    """Serve the frontend for the duration of the block, then disconnect cleanly."""
    async with trio.open_nursery() as nursery:
        await nursery.start(vbd.serve, front.spec(), platform)
        try:
            yield
        finally:
            with trio.fail_after(20):
                await vbd.disconnect()


def open_fds() -> set[int]:
    gc.collect()  # an earlier test's garbage holding an fd must not close it between two counts
    return {int(x) for x in os.listdir("/proc/self/fd")}


def count_tasks() -> int:
    """Every trio task alive in this run."""
    def walk(task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())
