"""QMP as far as libxl asks it of a PV device model: greeting, capabilities, status, cont, quit.

    state = DeviceModelState(paused=args.paused)   # "prelaunch" until cont with -S, else "running"
    listener, created = open_qmp_listener(args)    # libxl's pre-opened fd, or our socket at its path
    await nursery.start(serve_qmp, listener, state)

Messages end with "\\r\\n"; every libxl command opens a new connection.
"""

from __future__ import annotations

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


def split_json_stream(buf: str) -> tuple[list[str | None], str]:
    """Complete top-level JSON texts in buf, and the incomplete rest.

    As QEMU's json-streamer: track brace/bracket nesting (outside strings) and
    cut where it returns to zero; a character outside any object or array is
    a bad token, reported as None (one per run of them) so the caller answers
    a parse error and goes on.
    """
    texts: list[str | None] = []
    depth = 0
    in_string = escaped = False
    start = 0
    i = 0
    while i < len(buf):
        ch = buf[i]
        if depth == 0:
            if ch in "{[":
                depth, start = 1, i
            elif not ch.isspace():
                while i + 1 < len(buf) and not buf[i + 1].isspace() and buf[i + 1] not in "{[":
                    i += 1
                texts.append(None)
            i += 1
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
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                texts.append(buf[start:i + 1])
        i += 1
    return texts, (buf[start:] if depth else "")


async def serve_qmp_connection(stream: trio.abc.Stream, state: DeviceModelState) -> None:
    """One QMP client: greeting, then one reply per command, until it hangs up."""
    buf = ""
    negotiated = False
    parse_error = {"error": {"class": "GenericError", "desc": "JSON parse error"}}
    async with stream:
        try:
            await _send(stream, qmp_greeting())
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                texts, buf = split_json_stream(buf + data.decode("utf-8", "replace"))
                for text in texts:
                    try:
                        command = json.loads(text) if text is not None else None
                    except json.JSONDecodeError:
                        command = None
                    if command is None:
                        await _send(stream, parse_error)
                        continue
                    if not isinstance(command, dict):
                        await _send(stream, {"error": {"class": "GenericError",
                                                       "desc": "QMP input must be a JSON object"}})
                        continue
                    reply, negotiated = qmp_answer(command, negotiated, state)
                    log.debug("QMP %s -> %s", command.get("execute"), reply)
                    await _send(stream, reply)
                if len(buf) > MAX_QMP_BUFFER:
                    log.warning("QMP client sent more than %d bytes without a complete command; closing",
                                MAX_QMP_BUFFER)
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def serve_qmp(listener: trio.SocketListener, state: DeviceModelState, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            stream = await listener.accept()
            nursery.start_soon(serve_qmp_connection, stream, state)


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
