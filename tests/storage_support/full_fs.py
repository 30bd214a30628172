"""A small filesystem that can be filled up: ENOSPC for real, nothing mounted in the test's namespace.

    with SmallFilesystem(tmp_path / "mnt", size=1 << 20) as fs:
        img = fs.path / "disk.img"          # a path that reaches into the tmpfs
        ...
        fs.fill()                            # every free block taken: writes into holes get ENOSPC
        fs.free()                            # the filler removed: space is back

A tmpfs with size= is mounted in a mount namespace of its own, held by a
sleeping `unshare` child; this process (and qemu-storage-daemon) reach it
through /proc/<child>/root/<mountpoint>, so the host's mount table never
sees it and nothing needs unmounting: the namespace goes with the child.
Needs root (mount) or unprivileged user namespaces (then unshare -Ur).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

_FILL_CHUNK = 4096


class SmallFilesystemUnavailable(RuntimeError):
    pass


class SmallFilesystem:
    def __init__(self, mountpoint: Path, size: int) -> None:
        if shutil.which("unshare") is None:
            raise SmallFilesystemUnavailable("unshare not installed (util-linux)")
        self.mountpoint = Path(mountpoint).resolve()
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.size = size
        self._child: subprocess.Popen | None = None

    def __enter__(self) -> SmallFilesystem:
        user_ns = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        self._child = subprocess.Popen(
            ["unshare", *user_ns, "--mount", "--propagation", "private", "sh", "-c",
             f"mount -t tmpfs -o size={self.size},mode=0755 xenblk-enospc '{self.mountpoint}' "
             "&& echo ready && exec sleep infinity"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._child.stdout is not None
        if self._child.stdout.readline().strip() != b"ready":
            self._child.kill()
            _out, err = self._child.communicate()
            raise SmallFilesystemUnavailable(f"cannot mount a tmpfs in a mount namespace: {err.decode().strip()}")
        return self

    def __exit__(self, *exc) -> None:
        if self._child is not None:
            self._child.kill()
            self._child.wait()
            self._child = None

    @property
    def path(self) -> Path:
        """The tmpfs, as this process (or a child it starts) reaches it."""
        assert self._child is not None, "use inside `with`"
        return Path(f"/proc/{self._child.pid}/root{self.mountpoint}")

    @property
    def _filler(self) -> Path:
        return self.path / ".filler"

    def fill(self) -> int:
        """Take every free block with a filler file; returns the bytes it took."""
        fd = os.open(self._filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        chunk = b"\xff" * _FILL_CHUNK
        try:
            while True:
                try:
                    os.write(fd, chunk)
                except OSError as e:
                    if e.errno != 28:  # ENOSPC: full
                        raise
                    break
        finally:
            os.close(fd)
        return self._filler.stat().st_size

    def free(self) -> None:
        """Remove the filler: the space it took is free again."""
        self._filler.unlink(missing_ok=True)
