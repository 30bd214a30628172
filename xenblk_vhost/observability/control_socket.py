"""The control socket's server: a running `xenblk-vhost run` answers questions over a unix socket.

Wire format, default paths and the client: control_protocol.py. The socket is
created mode 0600 (bound under a temporary name, chmod-ed, then renamed
into place, so it is never reachable with looser permissions). A socket
left by a daemon that died is replaced; one that a live daemon answers
on is not (ControlSocketBusy). On exit the socket is removed if it is
still ours.

    control = ControlSocket(path)                # bound now: errors come out here
    nursery.start_soon(control.serve, {"stats": snapshot})
    ...; control.close()                         # after the serving task ended
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Callable, Mapping

import trio

from ..control_protocol import ControlError

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
REQUEST_TIMEOUT = 5.0  # a client that says nothing for this long is dropped
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL


class ControlSocketBusy(ControlError):
    """A live daemon already answers on the path."""


def _probe(path: str) -> bool:
    """Whether something accepts connections on the unix socket at path."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
            return True
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as e:
            if e.errno == errno.EAGAIN:  # backlog full: alive and busy
                return True
            return False


def bind_control_socket(path: str) -> tuple[socket.socket, int]:
    """A listening socket at path, mode 0600; (socket, inode) so that the caller removes only its own."""
    if len(os.fsencode(path)) + 16 > _MAX_UNIX_PATH:
        raise ControlError(f"control socket path too long for a unix socket ({len(path)} bytes): {path}")
    directory = os.path.dirname(path) or "."
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as e:
        raise ControlError(f"cannot create {directory} for the control socket: {e.strerror}") from e
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{path} exists and is not a socket; refusing to replace it")
        if _probe(path):
            raise ControlSocketBusy(f"another xenblk-vhost answers on {path}; give this one its own "
                                    f"--control PATH")
    temporary = f"{path}.{os.getpid()}.tmp"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        sock.bind(temporary)
        os.chmod(temporary, 0o600)
        sock.listen(16)
        os.rename(temporary, path)  # atomic: replaces a stale socket, never exposes a 0644 one
        inode = os.stat(path).st_ino
    except OSError as e:
        sock.close()
        try:
            os.unlink(temporary)
        except FileNotFoundError:
            pass
        raise ControlError(f"cannot listen on {path}: {e.strerror or e}") from e
    return sock, inode


def _remove_if_ours(path: str, inode: int) -> None:
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove the control socket %s: %s", path, e.strerror)


def answer(request: bytes, handlers: Mapping[str, Callable[[], dict]]) -> dict:
    """The reply to one request line."""
    try:
        message = json.loads(request)
    except ValueError:
        return {"ok": False, "error": "not JSON: send one line such as {\"command\": \"stats\"}"}
    command = message.get("command") if isinstance(message, dict) else None
    if not isinstance(command, str) or command not in handlers:
        return {"ok": False, "error": f"unknown command {command!r} (known: {', '.join(sorted(handlers))})"}
    return {"ok": True, command: handlers[command]()}


async def _read_line(stream: trio.abc.Stream) -> bytes | None:
    buf = bytearray()
    while b"\n" not in buf:
        if len(buf) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(MAX_REQUEST)
        if not chunk:
            break
        buf += chunk
    return bytes(buf).split(b"\n", 1)[0]


async def _serve_client(stream: trio.abc.Stream, handlers) -> None:
    async with stream:
        with trio.move_on_after(REQUEST_TIMEOUT):
            line = await _read_line(stream)
            if line is None:
                reply = {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
            elif not line.strip():
                return
            else:
                reply = answer(line, handlers)
            try:
                await stream.send_all(json.dumps(reply).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the client left: its loss


class ControlSocket:
    """A bound control socket: serve() it in a task, close() it when done (removes the file if ours)."""

    def __init__(self, path: str) -> None:
        self.path = path
        raw, self._inode = bind_control_socket(path)
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
        self._closed = False

    async def serve(self, handlers: Mapping[str, Callable[[], dict]]) -> None:
        """Answer clients until cancelled."""
        log.info("control socket: %s", self.path)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await self._listener.accept()
                except OSError as e:  # EMFILE and friends: do not spin, do not die
                    log.warning("control socket: accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(_serve_client, stream, handlers)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._listener.socket.close()
            _remove_if_ours(self.path, self._inode)
