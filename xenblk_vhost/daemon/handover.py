"""Hand-over without a start-up pause: a new daemon takes the disks over from the running one.

`xenblk-vhost upgrade` (= `ctl upgrade`) asks the running daemon, over its
control socket, to hand over to a fresh exec of itself (the code now
installed). The guests' I/O waits only for the drain of what is in flight
and the new daemon's takeover, never for its interpreter, imports,
configuration or xenstore connection:

    old daemon (serving)                      new daemon (Successor.start: exec'd with the socket)
                                              start-up: imports, files checked, /dev/xen, xenstore,
                                                the datapath's modules loaded; every device's takeover
                                                prepared (nodes read, storage opened where it can be
                                                twice: a file, a vhost-user disk's other export, named
                                                by $XENBLK_VHOST_STORAGE_IN_USE; rings mapped, journals
                                                opened; backend/xenbus/device.py)
                                        <---  {"ready": pid, "startup": ...}      (or {"failed": why}: the
    stop taking requests, drain what is                                            old one keeps serving)
      in flight, unmap, unbind, close the
      storage (the service stopped; the
      guests stay Connected)
    systemd: MAINPID=<new>
    {"released": ..., "drain_s": ...}   --->  binds the event channels, reads the journals, serves
    reply to `upgrade`; exit 0
    (the socket's EOF)                  --->  binds the control socket and metrics, READY=1

The new daemon's process is started by the old one (so it lives in the
same systemd unit and cgroup); `MAINPID=` tells systemd to follow it, and
without WATCHDOG_PID in its environment it pings the watchdog itself.
The event channels are released by the old one before the new one binds them
(a port binds once); ring pages are mapped by both for a moment (a grant may
be); a vhost-user export takes one client, so the new one uses the disk's
other export (handover_path) or, without one, connects after the release. A new daemon that cannot start (a bad file,
a module that fails to import) says why, and the old one keeps serving.
A new daemon that dies after the hand-over is the crash case: systemd
restarts it.

Protocol: one JSON object per line each way on a unix socketpair, the new
daemon's end at the file descriptor named by $XENBLK_VHOST_HANDOVER_FD.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence

import trio

log = logging.getLogger(__name__)

HANDOVER_FD_ENV = "XENBLK_VHOST_HANDOVER_FD"
# The storage the running daemon holds (a JSON list of paths): a vhost-user export serves one client,
# so the new daemon opens a disk's other export (handover_path) before the release, not this one.
STORAGE_IN_USE_ENV = "XENBLK_VHOST_STORAGE_IN_USE"
# How long the new daemon prepares its takeovers (storage opened, rings mapped) before it says it is
# ready anyway (what is not prepared by then is done after the release).
PREPARE_TIMEOUT = 60.0
# The new daemon's whole start-up (30-110 s measured on the TCG rig; a storage check may add to it).
READY_TIMEOUT = 300.0
# How long the new daemon waits for the old one to release everything (its drain is bounded
# per ring by the datapath, the device's release by RELEASE_TIMEOUT).
RELEASE_TIMEOUT = 60.0
# ... and then for it to exit (its control socket and metrics port free).
EXIT_TIMEOUT = 30.0
_MAX_LINE = 1 << 16


class HandoverRefused(Exception):
    """The new daemon could not take over; the running one keeps serving."""


def successor_argv(argv: Sequence[str] | None = None) -> list[str]:
    """The new daemon's command line: this one's, run by the same interpreter as a module (the
    installed code is what runs, whether we were started as the console script or with -m)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return [sys.executable, "-m", "xenblk_vhost", *args]


class _Lines:
    """JSON lines from a trio stream."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = bytearray()

    async def next(self) -> dict | None:
        """The next object, or None at EOF (the peer exited)."""
        while b"\n" not in self._buf:
            if len(self._buf) > _MAX_LINE:
                raise ValueError("hand-over line too long")
            try:
                chunk = await self._stream.receive_some(_MAX_LINE)
            except trio.BrokenResourceError:
                chunk = b""
            if not chunk:
                return None
            self._buf += chunk
        line, _, rest = bytes(self._buf).partition(b"\n")
        self._buf = bytearray(rest)
        value = json.loads(line)
        if not isinstance(value, dict):
            raise ValueError("hand-over message is not an object")
        return value


class Successor:
    """The new daemon, as the running one starts it and hands over to it."""

    def __init__(self, process: trio.Process, stream: trio.SocketStream, hello: dict) -> None:
        self.process = process
        self.pid = process.pid
        self.startup = str(hello.get("startup", ""))
        self._stream = stream

    @classmethod
    async def start(cls, argv: Sequence[str], *, timeout: float = READY_TIMEOUT,
                    storage_in_use: Sequence[str] = ()) -> Successor:
        """Exec the new daemon and wait until it is ready to take over (HandoverRefused if not)."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        env = dict(os.environ)
        env[HANDOVER_FD_ENV] = str(theirs.fileno())
        env[STORAGE_IN_USE_ENV] = json.dumps(list(storage_in_use))
        # systemd's WATCHDOG_PID names us: without it the new daemon pings once it is the main PID.
        env.pop("WATCHDOG_PID", None)
        try:
            process = await trio.lowlevel.open_process(list(argv), pass_fds=(theirs.fileno(),), env=env)
        except OSError as e:
            ours.close()
            raise HandoverRefused(f"cannot start {argv[0]}: {e}") from e
        finally:
            theirs.close()
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
        hello: dict | None = None
        with trio.move_on_after(timeout) as waiting:
            try:
                hello = await _Lines(stream).next()
            except ValueError as e:
                hello = {"failed": f"it spoke no hand-over protocol ({e})"}
        if hello is None or "ready" not in hello:
            reason = (hello or {}).get("failed")
            if waiting.cancelled_caught:
                reason = f"not ready within {timeout:g} s"
            with trio.move_on_after(5.0):  # it exits by itself after a failure or EOF
                await process.wait()
            if process.returncode is None:
                process.kill()  # nothing to lose: it serves nothing yet
            status = await process.wait()
            await stream.aclose()
            raise HandoverRefused(f"the new daemon (pid {process.pid}) did not take over: "
                                  f"{reason or f'it exited with status {status} before it was ready'}")
        return cls(process, stream, hello)

    async def release(self, info: dict) -> None:
        """Everything is released: the new daemon takes the devices over now."""
        await self._stream.send_all(json.dumps({"released": True, **info}).encode() + b"\n")

    async def abandon(self) -> None:
        """The old daemon will not hand over after all (it was stopped meanwhile): end the new one."""
        self.process.kill()
        await self.process.wait()
        await self._stream.aclose()


class Predecessor:
    """The running daemon, as the new one (started with $XENBLK_VHOST_HANDOVER_FD) sees it."""

    def __init__(self, sock: socket.socket, storage_in_use: frozenset[str] | None = None) -> None:
        self._sock = sock
        self._stream: trio.SocketStream | None = None
        self._lines: _Lines | None = None
        self.storage_in_use = storage_in_use  # what the running daemon holds (STORAGE_IN_USE_ENV)

    @classmethod
    def from_environment(cls) -> Predecessor | None:
        text = os.environ.pop(HANDOVER_FD_ENV, None)
        in_use_text = os.environ.pop(STORAGE_IN_USE_ENV, None)
        if not text:
            return None
        # None (not said: an older daemon, or a bad value): nothing exclusive is opened before the release.
        in_use: frozenset[str] | None = None
        try:
            parsed = json.loads(in_use_text) if in_use_text is not None else None
            if isinstance(parsed, list):
                in_use = frozenset(p for p in parsed if isinstance(p, str))
        except ValueError:
            log.warning("%s=%r is not a JSON list: opening the storage after the release", STORAGE_IN_USE_ENV,
                        in_use_text)
        try:
            sock = socket.socket(fileno=int(text))
        except (ValueError, OSError) as e:
            log.error("%s=%r is no hand-over socket (%s): starting as a plain daemon", HANDOVER_FD_ENV, text, e)
            return None
        sock.set_inheritable(False)
        return cls(sock, in_use)

    def _send(self, message: dict) -> None:
        try:
            self._sock.sendall(json.dumps(message).encode() + b"\n")
        except OSError as e:
            log.warning("hand-over: the running daemon is gone (%s)", e)

    def failed(self, reason: str) -> None:
        """We cannot take over: the running daemon keeps serving."""
        self._send({"failed": reason})
        self._sock.close()

    async def ready(self, startup: str) -> dict:
        """Ready: the running daemon drains and releases. What it says once it has ({"released":
        False} if it went away without a word: a crash, and the kernel released what it held)."""
        self._send({"ready": os.getpid(), "startup": startup})
        self._stream = trio.SocketStream(trio.socket.from_stdlib_socket(self._sock))
        self._lines = _Lines(self._stream)
        released: dict | None = None
        with trio.move_on_after(RELEASE_TIMEOUT):
            try:
                released = await self._lines.next()
            except ValueError as e:
                log.warning("hand-over: %s", e)
        if released is None:
            log.warning("hand-over: the running daemon did not say it released the disks; taking them over")
            return {"released": False}
        return released

    async def gone(self) -> bool:
        """Wait for the old daemon to exit (its socket's EOF); False if it is still there after EXIT_TIMEOUT."""
        assert self._lines is not None and self._stream is not None
        with trio.move_on_after(EXIT_TIMEOUT):
            try:
                while await self._lines.next() is not None:
                    pass
            except ValueError:
                pass
            await self._stream.aclose()
            return True
        return False


__all__ = ["HANDOVER_FD_ENV", "PREPARE_TIMEOUT", "STORAGE_IN_USE_ENV", "HandoverRefused", "Predecessor", "Successor",
           "successor_argv"]


class Upgrader:
    """The running daemon's side of `upgrade`: the service run so that it can be stopped alone (the
    control socket answers on through the drain), the new daemon started, everything released to it.

        upgrader = Upgrader(notifier)
        await nursery.start(upgrader.run_service, service)
        payload, then = await upgrader.upgrade()     # HandoverRefused: still serving
        then()                                       # once the operator has the reply: handed_over is set
        await upgrader.handed_over.wait()            # ... and this daemon exits
    """

    def __init__(self, notifier, argv: Sequence[str] | None = None) -> None:
        self._notifier = notifier
        self._argv = successor_argv(argv)
        self._lock = trio.Lock()
        self._service_scope = trio.CancelScope()
        self._service_stopped = trio.Event()
        self.handed_over = trio.Event()
        self.successor_pid: int | None = None
        # Set when the service was stopped but the new daemon vanished before it took over: the
        # guests wait; this daemon exits 1 so that systemd starts one that takes them over.
        self.lost = trio.Event()
        self._service = None
        self._successor: Successor | None = None

    async def run_service(self, service, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._service = service
        try:
            with self._service_scope:
                await service.run(task_status=task_status)
        finally:
            self._service_stopped.set()

    async def upgrade(self) -> tuple[dict, Callable[[], None]]:
        if self._lock.locked() or self.handed_over.is_set() or self.lost.is_set():
            raise HandoverRefused("an upgrade is already under way")
        async with self._lock:
            in_use: list[str] = self._service.storage_in_use() if self._service is not None else []
            successor = await Successor.start(self._argv, storage_in_use=in_use)
            log.info("upgrade: the new daemon (pid %d) is ready (%s); draining every disk for it",
                     successor.pid, successor.startup)
            started, wall = trio.current_time(), time.time()
            # Released once every device has let go of its rings and storage: what is left of the
            # service's end (xenstore reads, watches removed) runs while the new daemon takes over.
            devices: list = self._service.stopping() if self._service is not None else []
            self._service_scope.cancel()
            with trio.move_on_after(RELEASE_TIMEOUT):
                for device in devices:
                    # The datapath's let_go: channels and journals released (mappings and data paths
                    # are freed after it); the device's: its storage closed too, when the next daemon
                    # must open that same storage (a vhost-user export without a second one).
                    vbd_let_go = getattr(device.vbd, "let_go", None) if device.storage_may_stay else None
                    await (vbd_let_go if vbd_let_go is not None else device.let_go).wait()
            if not devices:
                await self._service_stopped.wait()
            drain = trio.current_time() - started
            try:
                await successor.release({"drain_s": drain, "predecessor": os.getpid()})
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                log.error("upgrade: the new daemon (pid %d) went away after the disks were released (%s); "
                          "exiting so that the service manager starts one that takes them over", successor.pid, e)
                self.lost.set()
                raise HandoverRefused(f"the new daemon (pid {successor.pid}) went away during the hand-over; "
                                      f"this daemon exits and its service manager restarts it") from e
            # What this process and its ring workers still do (freeing mappings, data paths, journals;
            # closing the storage and xenstore) must not compete with the new daemon's takeover: on the
            # TCG rig a 1.3 s free beside it stretched the guests' pause from 0.15 to 1.3-2.3 s.
            lower_own_cpu_priority(spare=successor.pid)
            # systemd follows the new process from now on (it is in our cgroup: we started it).
            self._notifier.notify(f"MAINPID={successor.pid}")
            self.successor_pid = successor.pid
            # Kept until this process exits: the socket's EOF is what tells the new daemon we are gone
            # (it binds the control socket then); collected with this frame it would close at once.
            self._successor = successor
            log.info("upgrade: handed over to pid %d after a drain of %.3f s", successor.pid, drain)
            return ({"predecessor": os.getpid(), "successor": successor.pid, "drain_s": round(drain, 4),
                     "handed_over_at": wall, "successor_startup": successor.startup}, self.handed_over.set)


__all__ += ["Upgrader"]

# The weakest CPU share Linux gives a normal thread (nice 19: 1/68 of a nice-0 thread's weight).
RELEASED_NICE = 19


def lower_own_cpu_priority(spare: int | None = None) -> None:
    """Every thread of this process, and of the processes it started (its ring workers, which free
    their own mappings and journals after the release), at nice RELEASED_NICE; on Linux a nice value
    is per thread, so libblkio's and trio's threads are lowered one by one. `spare`: a child left as
    it is with everything it started (the successor, which this process started too). Best effort: a
    thread or process that ended meanwhile, or a refusal, changes nothing else."""
    for pid in [os.getpid(), *_descendants(os.getpid(), spare)]:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{pid}/task")]
        except OSError:
            tids = [pid]
        for tid in tids:
            try:
                os.setpriority(os.PRIO_PROCESS, tid, RELEASED_NICE)
            except OSError:
                pass


def _descendants(pid: int, spare: int | None) -> list[int]:
    """The processes below pid (children first), without spare and what is below it: from each
    thread's /proc children list (Linux's CONFIG_PROC_CHILDREN, which Debian's kernels have)."""
    found: list[int] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        try:
            tids = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{parent}/task/{tid}/children") as f:
                    children = [int(c) for c in f.read().split()]
            except (OSError, ValueError):
                continue
            for child in children:
                if child != spare and child not in found:
                    found.append(child)
                    todo.append(child)
    return found


__all__ += ["lower_own_cpu_priority"]
