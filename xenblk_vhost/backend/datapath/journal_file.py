"""Where a ring's journal lives: an mmap'd file that outlives the process.

Default directory /run/xenblk-vhost/journal (tmpfs: memory, gone at reboot,
as the guests' rings are; nothing is fsynced, nothing needs to be: a killed
process loses none of its stores to a shared mapping). One file per ring of
a connected vbd, named after the frontend domain and the disk:
<domid>-<vdev>-ring<N>.journal. The directory is configurable
(`run --journal-dir`, the XENBLK_VHOST_JOURNAL_DIR environment variable);
`run --no-journal` serves without one.

A file is created when a connection starts with no journal to take over,
found by the next process that serves the same ring, and removed when the
connection ends in order (the frontend closed: nothing is in flight).
"""

from __future__ import annotations

import logging
import mmap
import os
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_JOURNAL_DIR = "/run/xenblk-vhost/journal"
ENV_JOURNAL_DIR = "XENBLK_VHOST_JOURNAL_DIR"


def default_journal_dir() -> Path:
    return Path(os.environ.get(ENV_JOURNAL_DIR) or DEFAULT_JOURNAL_DIR)


def journal_name(frontend_domid: int, vdev: str, ring: int) -> str:
    return f"{frontend_domid}-{vdev}-ring{ring}.journal"


class JournalFile:
    """An open journal file and its shared mapping (`buffer`)."""

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self._fd = fd
        self._mm: mmap.mmap | None = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.size = size

    @property
    def buffer(self) -> mmap.mmap:
        assert self._mm is not None, "journal file closed"
        return self._mm

    @classmethod
    def open_existing(cls, path: Path) -> JournalFile | None:
        """The file at path, mapped whole; None if there is none (or it is empty)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                os.close(fd)
                return None
            return cls(path, fd, size)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def create(cls, path: Path, size: int) -> JournalFile:
        """A new zero-filled file of `size` bytes (any old one replaced)."""
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".new")
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            os.ftruncate(fd, size)  # sparse: pages are allocated as frames are written
            os.replace(tmp, path)
            return cls(path, fd, size)
        except BaseException:
            os.close(fd)
            raise

    def is_at(self, path: Path) -> bool:
        """Whether path still names this file (not removed, nor replaced by a new connection's)."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        mine = os.fstat(self._fd)
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def touch(self) -> None:
        """Read one byte of every page: the mapping's page faults taken now (before a takeover, while
        the previous process still serves), not when the journal is read in the guests' pause (a fault
        costs milliseconds in a PV domain under emulation: ~2 s for a ring's journal on the rig)."""
        bytes(memoryview(self.buffer)[::mmap.PAGESIZE])

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                # a view is still exported (a journal object not yet collected):
                # the mapping goes with it; the fd can go now.
                pass
            self._mm = None
            os.close(self._fd)

    def remove(self) -> None:
        """Close and delete: the connection ended with nothing in flight."""
        self.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
