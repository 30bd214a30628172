"""A qemu-storage-daemon exporting one raw file over vhost-user-blk, for as long as a block runs.

    async with vhost_user_export(image, workdir, num_queues=2) as export:
        export.socket     # libblkio virtio-blk-vhost-user `path`
    # daemon stopped (SIGTERM, then SIGKILL), its sockets gone with workdir

Ready means serving, not just started: the export's socket file exists from
bind(), before listen(), so a client connecting then is refused. The
daemon creates every export before its main loop answers QMP, so a QMP
`query-block-exports` that lists ours means the socket is listening.
The daemon's output goes to workdir/qsd.log; a failure quotes its tail.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from ..sim.processes import HelperProcessError, helper_process

QSD_BINARY = "qemu-storage-daemon"
READY_TIMEOUT = 15.0
_POLL = 0.02


class StorageDaemonError(RuntimeError):
    pass


@dataclass(frozen=True)
class VhostUserExport:
    socket: Path
    image: Path
    num_queues: int
    pid: int


def qemu_option_value(text: str) -> str:
    """A value inside a QEMU `key=value,...` option: commas are doubled."""
    return text.replace(",", ",,")


def qsd_argv(image: Path, sock: Path, qmp: Path, *, num_queues: int, export_id: str = "disk",
             discard: str = "unmap", writable: bool = True, binary: str = QSD_BINARY) -> list[str]:
    node = f"{export_id}-file"
    # --chardev must precede the --monitor that names it (options are processed in order).
    return [binary,
            "--chardev", f"socket,id=qmp0,path={qemu_option_value(str(qmp))},server=on,wait=off",
            "--monitor", "chardev=qmp0",
            "--blockdev", f"driver=file,node-name={node},filename={qemu_option_value(str(image))},"
                          f"discard={discard},aio=threads",
            "--export", f"type=vhost-user-blk,id={export_id},node-name={node},addr.type=unix,"
                        f"addr.path={qemu_option_value(str(sock))},writable={'on' if writable else 'off'},"
                        f"num-queues={num_queues}"]


async def qmp_command(qmp_socket: Path, command: str, **arguments) -> Any:
    """One QMP command on a fresh connection; its "return" value."""
    stream = await trio.open_unix_socket(os.fspath(qmp_socket))
    async with stream:
        buf = bytearray()

        async def reply() -> dict:
            while True:  # next message that is not an asynchronous event
                while b"\n" not in buf:
                    chunk = await stream.receive_some(65536)
                    if not chunk:
                        raise StorageDaemonError("QMP connection closed")
                    buf.extend(chunk)
                line, _, rest = bytes(buf).partition(b"\n")
                buf[:] = rest
                msg = json.loads(line)
                if "event" not in msg:
                    return msg

        await reply()  # the greeting
        for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
            await stream.send_all(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
            answer = await reply()
            if "error" in answer:
                raise StorageDaemonError(f"QMP {cmd}: {answer['error'].get('desc', answer['error'])}")
        return answer.get("return")


def _log_tail(log: Path, lines: int = 5) -> str:
    try:
        return " | ".join(log.read_text(errors="replace").strip().splitlines()[-lines:]) or "(no output)"
    except OSError:
        return "(no log)"


@asynccontextmanager
async def vhost_user_export(image: Path, workdir: Path, *, num_queues: int, discard: str = "unmap",
                            writable: bool = True, ready_timeout: float = READY_TIMEOUT,
                            binary: str = QSD_BINARY) -> AsyncIterator[VhostUserExport]:
    if shutil.which(binary) is None:
        raise StorageDaemonError(f"{binary} not found: install it (Debian: apt-get install qemu-system-common)")
    workdir = Path(workdir)
    # Short names: a unix socket's path must fit in 108 bytes.
    sock, qmp, log = workdir / "vu.sock", workdir / "qmp.sock", workdir / "qsd.log"
    argv = qsd_argv(Path(image), sock, qmp, num_queues=num_queues, discard=discard, writable=writable,
                    binary=binary)
    with open(log, "wb") as log_file:
        try:
            async with helper_process(argv, name="qemu-storage-daemon", collect_stdout=False,
                                      stdout_file=log_file, stderr_file=log_file) as qsd:
                await _wait_serving(qsd, qmp, sock, "disk", ready_timeout, log)
                yield VhostUserExport(sock, Path(image), num_queues, qsd.pid)
        except HelperProcessError as e:
            raise StorageDaemonError(f"{e}; log: {_log_tail(log)}") from e


async def _wait_serving(qsd, qmp: Path, sock: Path, export_id: str, timeout: float, log: Path) -> None:
    with trio.move_on_after(timeout):
        while True:
            if qsd.proc.returncode is not None:
                raise StorageDaemonError(f"qemu-storage-daemon exited with status {qsd.proc.returncode}: "
                                         f"{_log_tail(log)}")
            if qmp.exists() and sock.exists():
                try:
                    exports = await qmp_command(qmp, "query-block-exports")
                    if any(e.get("id") == export_id for e in exports):
                        return
                except (OSError, StorageDaemonError, ValueError):
                    pass  # QMP not answering yet
            await trio.sleep(_POLL)
    raise StorageDaemonError(f"qemu-storage-daemon was not serving {sock} within {timeout:g} s: {_log_tail(log)}")
