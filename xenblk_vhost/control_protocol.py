"""Talking to a running daemon over its control socket: where it is, the wire format, the client.

Wire format: the client sends one JSON object on one line, the server
answers one JSON object on one line and closes:

    -> {"command": "stats"}
    <- {"ok": true, "stats": {...observability/snapshot.py...}}
    -> {"command": "pause", "target": "web1/xvda", "timeout": 30}
    <- {"ok": true, "pause": {"disks": [...]}}
    <- {"ok": false, "error": "web9 is not configured here (configured: web1)", "exit": 1}
    <- {"ok": false, "error": "reload refused ...", "exit": 2, "problems": ["web1.yaml:4: ..."]}

Commands (observability/control_commands.py answers them): stats, list,
status, pause, resume, detach, reload. A refusal may carry `exit` (the
status the command line should exit with) and `problems` (lines to print).
A daemon already serving its maximum of clients answers `"busy": true`
(before reading the request) and closes; request_control asks again.

Where: `run --control PATH`; by default /run/xenblk-vhost/control.sock for
root, $XDG_RUNTIME_DIR/xenblk-vhost/control.sock otherwise. The systemd
unit gives each instance its own, control-<instance>.sock; clients that are
given no path look at every control*.sock in that directory
(control_sockets()), as the hotplug script does.

    reply = request_control(path, "stats")       # blocking client: `xenblk-vhost ctl`, the hotplug script

The server is observability/control_socket.py. This module imports nothing
of ours, so the hotplug script can ask a daemon without loading the service.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Mapping
from pathlib import Path

SYSTEM_CONTROL_DIR = "/run/xenblk-vhost"
SYSTEM_CONTROL_PATH = f"{SYSTEM_CONTROL_DIR}/control.sock"
_RELATIVE_DIR = "xenblk-vhost"
CLIENT_TIMEOUT = 10.0
_BUSY_RETRY_FIRST = 0.05  # s; doubling to _BUSY_RETRY_MAX while the daemon answers "busy"
_BUSY_RETRY_MAX = 0.5
MAX_REPLY = 16 << 20  # a daemon serving hundreds of disks answers `status` in well under this


class ControlError(Exception):
    """Why the control socket cannot be used, in words for the operator."""


class ControlRefused(ControlError):
    """The daemon answered and refused: its reply (error, and maybe exit and problems) in `reply`."""

    def __init__(self, path: str, reply: Mapping) -> None:
        self.reply = dict(reply)
        super().__init__(f"{path}: {reply.get('error', 'request refused')}")

    @property
    def exit_status(self) -> int | None:
        status = self.reply.get("exit")
        return status if isinstance(status, int) and not isinstance(status, bool) else None

    @property
    def problems(self) -> list[str]:
        problems = self.reply.get("problems")
        return [str(p) for p in problems] if isinstance(problems, list) else []


def default_control_dir(euid: int | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """/run/xenblk-vhost for root, else $XDG_RUNTIME_DIR/xenblk-vhost; None if neither applies."""
    euid = os.geteuid() if euid is None else euid
    environ = os.environ if environ is None else environ
    if euid == 0:
        return SYSTEM_CONTROL_DIR
    runtime = environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, _RELATIVE_DIR) if runtime else None


def default_control_path(euid: int | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """control.sock in default_control_dir(); None if there is no such directory for this user."""
    directory = default_control_dir(euid, environ)
    return os.path.join(directory, "control.sock") if directory else None


def control_sockets(directory: str | os.PathLike) -> list[str]:
    """Every control*.sock socket in the directory, sorted: the default one (control.sock) and
    the systemd instances' (control-<instance>.sock). Other sockets there (vhost-user exports
    in vhost-user/, qemu-storage-daemon's monitors, *.qmp) are never spoken to."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        if not (name.startswith("control") and name.endswith(".sock")):
            continue
        path = Path(directory) / name
        try:
            if stat.S_ISSOCK(path.stat().st_mode):
                found.append(str(path))
        except OSError:
            continue
    return found


def request_control(path: str, command: str, *, timeout: float = CLIENT_TIMEOUT,
                    fields: Mapping[str, object] | None = None) -> dict:
    """Ask the daemon at path; the reply's payload. ControlRefused if it said no, ControlError
    with a clear reason if it could not be asked. `timeout`: how long this client waits;
    `fields` go into the request (target, and the daemon's own timeout for pause and detach).
    A daemon serving its maximum of clients answers "busy" before reading the request (so
    nothing was done): this client asks again, with backoff, until `timeout` runs out."""
    request = json.dumps({**(fields or {}), "command": command}).encode() + b"\n"
    deadline = time.monotonic() + timeout
    pause = _BUSY_RETRY_FIRST
    while True:
        reply = _ask_once(path, request, timeout)
        left = deadline - time.monotonic()
        if reply.get("busy") is not True or left <= pause:
            break
        time.sleep(pause)
        timeout = left - pause
        pause = min(pause * 2, _BUSY_RETRY_MAX)
    if not reply.get("ok"):
        raise ControlRefused(path, reply)
    if command not in reply:
        raise ControlError(f"{path} answered without the {command!r} it was asked for (an older daemon?)")
    return reply[command]


def _ask_once(path: str, request: bytes, timeout: float) -> dict:
    """One connection: the request sent, the reply object read (ControlError if there is none)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(f"no control socket at {path}: is `xenblk-vhost run` running? "
                               f"(it listens there unless started with another --control)") from None
        except ConnectionRefusedError:
            raise ControlError(f"nothing is listening on {path} (the daemon that made it has exited)") from None
        except PermissionError:
            raise ControlError(f"permission denied on {path}: the control socket is mode 0600, "
                               f"ask as the daemon's user") from None
        except OSError as e:
            raise ControlError(f"cannot connect to {path}: {e.strerror or e}") from None
        buf = b""
        unsent: OSError | None = None
        try:
            try:
                sock.sendall(request)
            except (BrokenPipeError, ConnectionResetError) as e:
                # A busy daemon may answer and close before our request is out: its reply is
                # still there to read.
                unsent = e
            while not buf.endswith(b"\n") and len(buf) <= MAX_REPLY:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise ControlError(f"no answer from {path} within {timeout:g} s") from None
        except OSError as e:
            if not buf.endswith(b"\n"):
                raise ControlError(f"{path}: {e.strerror or e}") from None
        if unsent is not None and not buf:
            raise ControlError(f"{path}: {unsent.strerror or unsent}")
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"{path} answered something that is not JSON: {buf[:80]!r}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path} answered something that is not a reply: {buf[:80]!r}")
    return reply
