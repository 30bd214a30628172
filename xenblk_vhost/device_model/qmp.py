"""QMP as far as libxl asks it of a PV device model: greeting, capabilities, status, cont, quit.

    state = DeviceModelState(paused=args.paused)   # "prelaunch" until cont with -S, else "running"
    listener, created = open_qmp_listener(args)    # libxl's pre-opened fd, or our socket at its path
    await nursery.start(serve_qmp, listener, state)

Messages end with "\\r\\n"; every libxl command opens a new connection.
At most MAX_QMP_CLIENTS connections are served at once (each costs an fd,
shared with the guests' event channels and grant mappings); the next ones
wait in the listen backlog, as they would for QEMU's monitor, which serves
one client at a time. A client that sends nothing, or reads nothing, for
QMP_IDLE_TIMEOUT is cut off, so that no peer keeps a slot from libxl.
"""

from __future__ import annotations

import codecs
import enum
import json
import logging
import os
import socket as stdlib_socket

import trio

from .. import __version__
from .qemu_args import QemuArgs

log = logging.getLogger(__name__)

# What we claim to be: libxl only compares versions for HVM cd-rom changes
# (>= 2.8); Debian 12's QEMU is 7.2.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
MAX_QMP_BUFFER = 1 << 20
MAX_QMP_CLIENTS = 8  # libxl opens one connection per command, and waits for each
QMP_IDLE_TIMEOUT = 60.0  # s; libxl's exchanges are a few messages back to back


class DeviceModelState:
    """What QMP reports and changes: the run state, and when to quit."""

    def __init__(self, paused: bool) -> None:
        self.status = "prelaunch" if paused else "running"
        self.quit = trio.Event()
        self.running = trio.Event()
        if not paused:
            self.running.set()

    def cont(self) -> None:
        self.status = "running"
        self.running.set()


def qmp_greeting() -> dict:
    return {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": f" (xenblk-vhost {__version__})"},
                    "capabilities": []}}


def qmp_answer(command: dict, negotiated: bool, state: DeviceModelState) -> tuple[dict, bool]:
    """The reply to one QMP command, and whether capabilities are negotiated after it."""
    execute = command.get("execute")
    reply: dict
    if not isinstance(execute, str):
        reply = {"error": {"class": "GenericError", "desc": "QMP input must be a command ('execute' missing)"}}
    elif execute == "qmp_capabilities":
        if negotiated:
            reply = {"error": {"class": "CommandNotFound",
                               "desc": "Capabilities negotiation is already complete, command ignored"}}
        else:
            reply, negotiated = {"return": {}}, True
    elif not negotiated:
        reply = {"error": {"class": "CommandNotFound",
                           "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    elif execute == "query-chardev":
        reply = {"return": []}  # no serial ptys: libxl then writes no serial/<n>/tty
    elif execute == "query-status":
        reply = {"return": {"status": state.status, "singlestep": False, "running": state.status == "running"}}
    elif execute == "cont":
        state.cont()
        reply = {"return": {}}
    elif execute == "stop":
        reply = {"return": {}}  # nothing to pause: the rings are the guest's, not ours
    elif execute == "query-vnc":
        reply = {"return": {"enabled": False}}
    elif execute == "query-version":
        reply = {"return": qmp_greeting()["QMP"]["version"]}
    elif execute == "query-command-line-options":
        reply = {"return": []}
    elif execute == "quit":
        state.quit.set()
        reply = {"return": {}}
    else:
        reply = {"error": {"class": "CommandNotFound", "desc": f"The command {execute} has not been found"}}
    if "id" in command:
        reply["id"] = command["id"]
    return reply, negotiated


async def _send(stream: trio.abc.SendStream, obj: dict) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\r\n")


class Unparsable(enum.Enum):
    """What the splitter yields in place of a text that must not be parsed."""

    BAD_TOKEN = "a run of characters outside any object or array"
    TOO_DEEP = "a text nested deeper than JsonStreamSplitter.MAX_NESTING"


class JsonStreamSplitter:
    """Cuts a QMP byte stream into top-level JSON texts, keeping its state between reads.

    As QEMU's json-streamer: track brace/bracket nesting (outside strings) and cut where it
    returns to zero; a run of characters outside any object or array is a bad token, reported
    as BAD_TOKEN (one per run) so the caller answers a parse error and goes on. The state (UTF-8
    decoder, nesting, string and escape, a bad run in progress, the text so far) lives here, so
    how the transport cuts the stream changes nothing, and each byte is looked at once (the
    stream is not rescanned from the start of a text at every read).

    A text nested deeper than MAX_NESTING is still consumed whole but comes out as TOO_DEEP:
    the caller refuses it without parsing (json's decoder would recurse that deep, and echoing
    its `id` back would recurse again).
    """

    MAX_NESTING = 64  # QEMU allows 1024; libxl's commands nest 3 deep

    def __init__(self) -> None:
        self._decode = codecs.getincrementaldecoder("utf-8")("replace").decode
        self._parts: list[str] = []  # the current text, from its opening bracket
        self._buffered = 0
        self._depth = 0
        self._deepest = 0
        self._in_string = False
        self._escaped = False
        self._in_bad_run = False

    @property
    def buffered(self) -> int:
        """Characters held of a text not yet complete."""
        return self._buffered

    @property
    def rest(self) -> str:
        return "".join(self._parts)

    def feed(self, data: bytes | bytearray) -> list[str | Unparsable]:
        return self.feed_text(self._decode(data))

    def finish(self) -> list[str | Unparsable]:
        """At the end of the stream: the bytes of a character the client never finished are one."""
        return self.feed_text(self._decode(b"", True))

    def feed_text(self, buf: str) -> list[str | Unparsable]:
        texts: list[str | Unparsable] = []
        depth, deepest = self._depth, self._deepest
        in_string, escaped, bad_run = self._in_string, self._escaped, self._in_bad_run
        start = 0 if depth else -1
        for i, ch in enumerate(buf):
            if depth == 0:
                if ch == "{" or ch == "[":
                    depth = deepest = 1
                    start = i
                    bad_run = False
                elif ch.isspace():
                    bad_run = False
                elif not bad_run:
                    bad_run = True
                    texts.append(Unparsable.BAD_TOKEN)
                continue
            if in_string:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_string = False
            elif ch == '"':
                in_string = True
            elif ch == "{" or ch == "[":
                depth += 1
                if depth > deepest:
                    deepest = depth
            elif ch == "}" or ch == "]":
                depth -= 1
                if depth == 0:
                    self._parts.append(buf[start:i + 1])
                    text = "".join(self._parts)
                    self._parts.clear()
                    self._buffered = 0
                    texts.append(Unparsable.TOO_DEEP if deepest > self.MAX_NESTING else text)
        if depth:
            piece = buf[start:]
            self._parts.append(piece)
            self._buffered += len(piece)
        self._depth, self._deepest = depth, deepest
        self._in_string, self._escaped, self._in_bad_run = in_string, escaped, bad_run
        return texts


_PARSE_ERROR = {"error": {"class": "GenericError", "desc": "JSON parse error"}}
_TOO_DEEP = {"error": {"class": "GenericError", "desc": "JSON nesting depth limit exceeded"}}
_NOT_AN_OBJECT = {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}


def parse_command(text: str | Unparsable) -> dict:
    """One item the splitter cut out -> the command object, or the error reply to send instead.

    Total: whatever the client sent, the result is a dict: a command, or one of the three
    error replies above (is_error_reply tells them apart).
    """
    if text is Unparsable.BAD_TOKEN:
        return _PARSE_ERROR
    if text is Unparsable.TOO_DEEP:
        return _TOO_DEEP
    try:
        command = json.loads(text)
    except RecursionError:  # not reached below MAX_NESTING; kept so that no input can end the server
        return _TOO_DEEP
    except ValueError:  # JSONDecodeError, and int()'s 4,300-digit limit (a plain ValueError)
        return _PARSE_ERROR
    if not isinstance(command, dict):
        return _NOT_AN_OBJECT
    return command


def is_error_reply(command: dict) -> bool:
    return command is _PARSE_ERROR or command is _TOO_DEEP or command is _NOT_AN_OBJECT


async def serve_qmp_connection(stream: trio.abc.Stream, state: DeviceModelState) -> None:
    """One QMP client: greeting, then one reply per command, until it hangs up (or idles)."""
    splitter = JsonStreamSplitter()
    negotiated = False
    async with stream:
        try:
            with trio.move_on_after(QMP_IDLE_TIMEOUT) as idle:
                await _send(stream, qmp_greeting())
            while not idle.cancelled_caught:
                with trio.move_on_after(QMP_IDLE_TIMEOUT) as idle:
                    data = await stream.receive_some(65536)
                    for text in splitter.feed(data) if data else splitter.finish():
                        command = parse_command(text)
                        if is_error_reply(command):
                            await _send(stream, command)
                            continue
                        reply, negotiated = qmp_answer(command, negotiated, state)
                        log.debug("QMP %s -> %s", command.get("execute"), reply)
                        await _send(stream, reply)
                    if not data:
                        return
                    if splitter.buffered > MAX_QMP_BUFFER:
                        log.warning("QMP client sent more than %d bytes without a complete command; closing",
                                    MAX_QMP_BUFFER)
                        return
            log.warning("QMP client idle (nothing sent or read) for %g s; closing", QMP_IDLE_TIMEOUT)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def _serve_confined(stream: trio.abc.Stream, state: DeviceModelState) -> None:
    """One connection, whatever it raises kept to it: logged, the connection closed, the server goes on."""
    try:
        await serve_qmp_connection(stream, state)
    except Exception:
        log.exception("QMP: a client's connection failed; the device model goes on")


async def serve_qmp(listener: trio.abc.Listener, state: DeviceModelState, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    slots = trio.Semaphore(MAX_QMP_CLIENTS)

    async def serve_client(stream: trio.abc.Stream) -> None:
        try:
            await _serve_confined(stream, state)
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            await slots.acquire()  # accept only with a free slot: the rest wait in the backlog
            try:
                stream = await listener.accept()
            except OSError as e:  # EMFILE and friends: do not spin, do not die
                slots.release()
                log.warning("QMP: accept failed: %s", e)
                await trio.sleep(0.1)
                continue
            except BaseException:
                slots.release()
                raise
            nursery.start_soon(serve_client, stream)


def open_qmp_listener(args: QemuArgs) -> tuple[trio.SocketListener | None, str | None]:
    """The libxl-cmd monitor socket: libxl's pre-opened fd, or our own at its path
    (a stale file from a previous run is replaced, as QEMU does). None when
    there is no such monitor: `xl devd` starts a driver domain's qdisk backend
    with `-monitor /dev/null` and only waits for "running"."""
    if args.qmp_fd is not None:
        sock = stdlib_socket.socket(fileno=args.qmp_fd)
        sock.setblocking(False)
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), None
    if args.qmp_path is None:
        return None, None
    try:
        os.unlink(args.qmp_path)
    except FileNotFoundError:
        pass
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        sock.bind(args.qmp_path)
        sock.listen(8)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), args.qmp_path
