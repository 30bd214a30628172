"""The control socket's server: a running `xenblk-vhost run` answers questions over a unix socket.

Wire format, default paths and the client: control_protocol.py. The socket is
created mode 0600 (bound under a temporary name, chmod-ed, then renamed
into place, so it is never reachable with looser permissions). A socket
left by a daemon that died is replaced; one that a live daemon answers
on is not (ControlSocketBusy). On exit the socket is removed if it is
still ours.

    control = ControlSocket(path)                # bound now: errors come out here
    nursery.start_soon(control.serve, handlers)  # {"stats": async (request) -> dict, ...}
    ...; control.close()                         # after the serving task ended

A handler gets the request object (its `command` and whatever else the
client sent: target, timeout...) and returns the reply's payload, or raises
CommandRefused (the reply's error, exit status and problems). A payload may
be a ReplyThen: its `then` runs once the reply is sent (or the client is
gone): what ends the daemon (an upgrade's hand-over) must not cut its own
reply short. Nothing a
client sends, and no handler's failure, ends the serving task: a request
that does not parse is answered with why (parse_request is total), a
handler's unexpected exception is logged and answered "internal error",
a client that leaves is its own loss. Clients are served concurrently: a
`pause` waiting for in-flight requests does not hold up `list`. At most
MAX_CLIENTS at once (each costs an fd, and the process's fds are shared
with the guests' event channels and grant mappings): one past the bound is
answered BUSY_REPLY at once and closed, before its request is read, so the
client (control_protocol.request_control) may simply ask again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Collection, Mapping

import trio

from ..control_protocol import ControlError

log = logging.getLogger(__name__)

MAX_REQUEST = 4096
MAX_CLIENTS = 16  # served at once; more are turned away (BUSY_REPLY), not queued behind a slow pause
REQUEST_TIMEOUT = 5.0  # a client that says nothing for this long is dropped
_SHOWN_NAME = 60  # an unknown command's name is echoed this long at most

Handler = Callable[[dict], Awaitable[dict]]
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


BUSY_REPLY = (json.dumps({"ok": False, "busy": True, "exit": 1,
                          "error": f"the daemon is serving {MAX_CLIENTS} control clients already; try again"})
              .encode() + b"\n")


def _turn_away(stream: trio.SocketStream) -> None:
    """Answer BUSY_REPLY and close, without a task: a fresh socket's send buffer is empty, so the
    non-blocking write of one short line does not wait; if it fails, the client sees a closed socket."""
    try:
        os.write(stream.socket.fileno(), BUSY_REPLY)
    except OSError:
        pass
    stream.socket.close()


def _remove_if_ours(path: str, inode: int) -> None:
    try:
        if os.stat(path).st_ino == inode:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log.warning("could not remove the control socket %s: %s", path, e.strerror)


class ReplyThen(dict):
    """A handler's payload, and what to do once it is sent (or could not be)."""

    def __init__(self, payload: Mapping, then: Callable[[], None]) -> None:
        super().__init__(payload)
        self.then = then


class BadRequest(ValueError):
    """A request line we cannot act on; str() is the reply's `error`."""


class CommandRefused(Exception):
    """A handler's refusal: `message` for the operator, the exit status the client should give,
    `problems` (lines, e.g. FILE:LINE: key: reason) to print."""

    def __init__(self, message: str, *, exit_status: int = 1, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exit_status = exit_status
        self.problems = problems or []

    def reply(self) -> dict:
        reply: dict = {"ok": False, "error": self.message, "exit": self.exit_status}
        if self.problems:
            reply["problems"] = self.problems
        return reply


def parse_request(request: bytes, known: Collection[str]) -> dict:
    """The request object one line holds (its `command` one of `known`), or BadRequest saying why not.

    Total: the line comes from any local client, so nothing in it may raise
    anything else (deep nesting, odd types, bytes that are not UTF-8).
    """
    usage = 'send one line such as {"command": "stats"}'
    try:
        message = json.loads(request)
    except RecursionError:  # the decoder's own depth guard: nothing is left half-done
        raise BadRequest(f"nested too deeply: {usage}") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, int()'s digit limit
        raise BadRequest(f"not JSON: {usage}") from None
    if not isinstance(message, dict) or "command" not in message:
        raise BadRequest(f"not a request: {usage}")
    command = message["command"]
    if not isinstance(command, str):
        raise BadRequest(f"'command' must be a string: {usage}")
    if command not in known:
        shown = repr(command)
        shown = shown if len(shown) <= _SHOWN_NAME else shown[:_SHOWN_NAME] + "..."
        raise BadRequest(f"unknown command {shown} (known: {', '.join(sorted(known))})")
    return message


async def answer(request: bytes, handlers: Mapping[str, Handler]) -> dict:
    """The reply to one request line. A handler's failure is logged and answered, never raised."""
    try:
        message = parse_request(request, handlers)
    except BadRequest as e:
        return {"ok": False, "error": str(e)}
    command = message["command"]
    try:
        payload = await handlers[command](message)
        if isinstance(payload, ReplyThen):
            return ReplyThen({"ok": True, command: dict(payload)}, payload.then)
        return {"ok": True, command: payload}
    except CommandRefused as e:
        return e.reply()
    except Exception:
        log.exception("control socket: answering %r failed", command)
        return {"ok": False, "error": f"internal error answering {command!r} (see the daemon's log)"}


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


async def _serve_client(stream: trio.abc.Stream, handlers: Mapping[str, Handler]) -> None:
    """One client. Whatever goes wrong stays with this client: logged, connection closed."""
    reply: dict = {}
    try:
        async with stream:
            with trio.move_on_after(REQUEST_TIMEOUT):
                line = await _read_line(stream)
            if line is None:
                reply = {"ok": False, "error": f"request longer than {MAX_REQUEST} bytes"}
            elif not line.strip():
                return
            else:
                # Not under the read deadline: pause and detach take their own time (each
                # bounded by its own timeout; the client's bounds how long it waits).
                reply = await answer(line, handlers)
            with trio.move_on_after(REQUEST_TIMEOUT):
                await stream.send_all(json.dumps(reply).encode() + b"\n")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client left: its loss
    except Exception:
        log.exception("control socket: a client's request failed; the daemon goes on")
    finally:
        if isinstance(reply, ReplyThen):
            reply.then()


class ControlSocket:
    """A bound control socket: serve() it in a task, close() it when done (removes the file if ours)."""

    def __init__(self, path: str) -> None:
        self.path = path
        raw, self._inode = bind_control_socket(path)
        self._listener = trio.SocketListener(trio.socket.from_stdlib_socket(raw))
        self._closed = False
        self._clients = 0
        self._turned_away = 0  # since the bound was last reached: logged once per busy spell

    async def serve(self, handlers: Mapping[str, Handler]) -> None:
        """Answer clients until cancelled."""
        log.info("control socket: %s", self.path)

        async def serve_counted(stream: trio.SocketStream) -> None:
            try:
                await _serve_client(stream, handlers)
            finally:
                self._clients -= 1
                if self._turned_away and self._clients < MAX_CLIENTS:
                    log.info("control socket: serving again; %d client(s) were turned away while busy",
                             self._turned_away)
                    self._turned_away = 0

        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await self._listener.accept()
                except OSError as e:  # EMFILE and friends: do not spin, do not die
                    log.warning("control socket: accept failed: %s", e)
                    await trio.sleep(0.1)
                    continue
                if self._clients >= MAX_CLIENTS:
                    if not self._turned_away:
                        log.warning("control socket: %d clients are being served; turning more away",
                                    MAX_CLIENTS)
                    self._turned_away += 1
                    _turn_away(stream)
                    continue
                self._clients += 1
                nursery.start_soon(serve_counted, stream)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._listener.socket.close()
            _remove_if_ours(self.path, self._inode)
