"""A real qemu-storage-daemon serving vhost-user-blk exports, for tests.

    with StorageDaemon(workdir) as d:
        disk = d.add_file_export("disk", size=16 << 20, num_queues=2, discard="unmap")
        d.start()
        ...  # libblkio: virtio-blk-vhost-user, path=disk.socket
        d.qmp("block_resize", node_name="disk-file", size=32 << 20)

Plain subprocess + a small synchronous QMP client: usable from sync tests,
trio tests and benchmarks alike. Everything lives under `workdir` (the
unix sockets, images, the daemon's log).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

QSD_BINARY = "qemu-storage-daemon"


class StorageDaemonError(RuntimeError):
    pass


@dataclass
class VhostUserExport:
    name: str
    socket: Path  # the vhost-user unix socket (libblkio "path")
    node_name: str  # the exported block node, for QMP commands
    size: int
    image: Path | None  # raw backing file, None for null-co
    num_queues: int
    writable: bool = True


class StorageDaemon:
    def __init__(self, workdir: Path) -> None:
        if shutil.which(QSD_BINARY) is None:
            raise StorageDaemonError(f"{QSD_BINARY} not found (Debian: qemu-system-common)")
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_socket = self.workdir / "qsd-qmp.sock"
        self.log_path = self.workdir / "qsd.log"
        self.exports: dict[str, VhostUserExport] = {}
        self._args: list[str] = []
        self.process: subprocess.Popen | None = None

    # ---- configuration (before start) ----

    def add_file_export(self, name: str, *, size: int = 16 << 20, image: Path | None = None,
                        num_queues: int = 2, discard: str = "unmap", writable: bool = True,
                        aio: str = "threads") -> VhostUserExport:
        """Export a raw file (created sparse with `size` if `image` does not exist)."""
        image = Path(image) if image else self.workdir / f"{name}.img"
        if not image.exists():
            with open(image, "wb") as f:
                f.truncate(size)
        size = image.stat().st_size
        node = f"{name}-file"
        self._args += ["--blockdev", f"driver=file,node-name={node},filename={image},discard={discard},aio={aio}"]
        return self._add_export(name, node, size, image, num_queues, writable)

    def add_null_export(self, name: str, *, size: int = 1 << 30, num_queues: int = 1) -> VhostUserExport:
        """Export null-co: requests complete without touching data (pure request-rate benchmarks)."""
        node = f"{name}-null"
        self._args += ["--blockdev", f"driver=null-co,node-name={node},size={size}"]
        return self._add_export(name, node, size, None, num_queues, True)

    def add_nbd_export(self, name: str, *, nbd_socket: Path, size: int, num_queues: int = 2) -> VhostUserExport:
        """Export what an NBD server on a unix socket serves (e.g. slow_nbd.py: out-of-order completions)."""
        node = f"{name}-nbd"
        # reconnect-delay: a dropped NBD connection is made again, requests wait for it rather than fail.
        self._args += ["--blockdev", f"driver=nbd,node-name={node},server.type=unix,server.path={nbd_socket},"
                       "reconnect-delay=5"]
        return self._add_export(name, node, size, None, num_queues, True)

    def add_second_export(self, name: str, of: VhostUserExport) -> VhostUserExport:
        """The node another export serves, exported again on its own socket (a disk's handover_path)."""
        return self._add_export(name, of.node_name, of.size, of.image, of.num_queues, of.writable)

    def _add_export(self, name, node, size, image, num_queues, writable) -> VhostUserExport:
        if self.process is not None:
            raise StorageDaemonError("add exports before start()")
        sock = self.workdir / f"{name}.sock"
        self._args += ["--export", f"type=vhost-user-blk,id={name},node-name={node},addr.type=unix,"
                       f"addr.path={sock},writable={'on' if writable else 'off'},num-queues={num_queues}"]
        export = VhostUserExport(name, sock, node, size, image, num_queues, writable)
        self.exports[name] = export
        return export

    # ---- lifecycle ----

    def start(self, timeout: float = 10.0) -> None:
        """Start the daemon and wait until every export's socket (and QMP) exists."""
        # --chardev must precede --monitor chardev=... (qsd processes options in order).
        argv = [QSD_BINARY,
                "--chardev", f"socket,id=qmp0,path={self.qmp_socket},server=on,wait=off",
                "--monitor", "chardev=qmp0", *self._args]
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        wanted = [self.qmp_socket] + [e.socket for e in self.exports.values()]
        while not all(p.exists() for p in wanted):
            if self.process.poll() is not None:
                raise StorageDaemonError(f"qemu-storage-daemon exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise StorageDaemonError(f"qemu-storage-daemon sockets did not appear within {timeout} s: {self.log()}")
            time.sleep(0.01)
        # A socket file exists from bind(), before listen(): connecting then is
        # refused. qsd creates every export before its main loop serves QMP, so
        # a QMP answer listing all exports means every socket is listening.
        while True:
            try:
                listed = {e["id"] for e in self.qmp("query-block-exports")}
                if listed >= set(self.exports):
                    return
            except (OSError, StorageDaemonError):  # refused, or QMP not up yet
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise StorageDaemonError(f"qemu-storage-daemon exports not ready within {timeout} s: {self.log()}")
            time.sleep(0.01)

    def restart(self, timeout: float = 10.0) -> None:
        """Start the same daemon again after it died (kill()): same exports, same sockets."""
        assert self.process is not None and self.process.poll() is not None, "restart() after the daemon died"
        self._log.close()
        for path in [self.qmp_socket] + [e.socket for e in self.exports.values()]:
            path.unlink(missing_ok=True)  # its stale sockets: start() waits for new ones
        self.process = None
        self.start(timeout)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def freeze(self, timeout: float = 10.0) -> None:
        """SIGSTOP and wait until every thread is stopped: from then on nothing is served."""
        os.kill(self.pid, signal.SIGSTOP)
        deadline = time.monotonic() + timeout
        while not self._all_threads_stopped():
            if time.monotonic() > deadline:
                raise StorageDaemonError(f"qemu-storage-daemon did not stop within {timeout} s")
            time.sleep(0.001)

    def thaw(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def _all_threads_stopped(self) -> bool:
        task_dir = Path(f"/proc/{self.pid}/task")
        for stat in task_dir.glob("*/stat"):
            try:
                state = stat.read_text().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue  # thread gone
            if state not in ("T", "t"):
                return False
        return True

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send `sig` and reap the daemon; return its exit status (negative: signal)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM and wait; raise if it does not exit in time (then SIGKILL it). Idempotent."""
        if self.process is None:
            return None
        try:
            if self.process.poll() is None:
                self.process.terminate()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
                    raise StorageDaemonError(
                        f"qemu-storage-daemon ignored SIGTERM for {timeout} s: {self.log()}") from None
            return self.process.returncode
        finally:
            self._log.close()

    def __enter__(self) -> StorageDaemon:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- QMP ----

    def qmp(self, command: str, **arguments) -> object:
        """Run one QMP command on a fresh connection; return its "return" value.

        Argument names use '_' for '-' (node_name -> node-name)."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(os.fspath(self.qmp_socket))
            stream = s.makefile("rwb")
            _read_reply(stream)  # greeting
            for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
                msg = {"execute": cmd, "arguments": {k.replace("_", "-"): v for k, v in args.items()}}
                stream.write(json.dumps(msg).encode() + b"\n")
                stream.flush()
                reply = _read_reply(stream)
                if "error" in reply:
                    raise StorageDaemonError(f"QMP {cmd}: {reply['error']}")
            return reply.get("return")


    def reexport(self, name: str, timeout: float = 10.0) -> None:
        """Delete export `name` (dropping its client) and add it again, same settings.

        The new export reads its virtio config (capacity...) afresh: QEMU
        7.2's vhost-user-blk export does not update it on block_resize.
        """
        e = self.exports[name]
        self.qmp("block-export-del", id=name, mode="hard")
        deadline = time.monotonic() + timeout
        while any(x["id"] == name for x in self.qmp("query-block-exports")):
            if time.monotonic() > deadline:
                raise StorageDaemonError(f"export {name} not deleted within {timeout} s")
            time.sleep(0.01)
        self.qmp("block-export-add", type="vhost-user-blk", id=name, node_name=e.node_name,
                 writable=e.writable, num_queues=e.num_queues,
                 addr={"type": "unix", "path": os.fspath(e.socket)})


def _read_reply(stream) -> dict:
    """Next non-event QMP message."""
    while True:
        line = stream.readline()
        if not line:
            raise StorageDaemonError("QMP connection closed")
        msg = json.loads(line)
        if "event" not in msg:
            return msg
