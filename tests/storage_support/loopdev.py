"""A loop block device over a file, for testing io_uring on a real block device.

Needs root and /dev/loop-control (both present on the project's test
machine); `losetup` comes from util-linux.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path


class LoopDeviceUnavailable(RuntimeError):
    pass


def loop_devices_usable() -> str | None:
    """None if we can attach loop devices here, else why not."""
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("losetup") is None:
        return "losetup not installed"
    if not os.path.exists("/dev/loop-control"):
        return "no /dev/loop-control"
    return None


@contextlib.contextmanager
def loop_device(backing: Path) -> Iterator[Path]:
    """Attach `backing` to a free loop device; detach on exit."""
    why = loop_devices_usable()
    if why:
        raise LoopDeviceUnavailable(why)
    out = subprocess.run(["losetup", "--find", "--show", os.fspath(backing)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise LoopDeviceUnavailable(f"losetup failed: {out.stderr.strip()}")
    dev = Path(out.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "--detach", os.fspath(dev)], check=True)


def refresh_loop_size(dev: Path) -> None:
    """Make the loop device pick up its backing file's new size (losetup -c)."""
    subprocess.run(["losetup", "--set-capacity", os.fspath(dev)], check=True)
