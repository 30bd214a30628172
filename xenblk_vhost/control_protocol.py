"""Talking to a running daemon over its control socket: where it is, the wire format, the client.

Wire format: the client sends one JSON object on one line, the server
answers one JSON object on one line and closes:

    -> {"command": "stats"}
    <- {"ok": true, "stats": {...observability/snapshot.py...}}
    <- {"ok": false, "error": "unknown command 'x' (known: stats)"}

Where: `run --control PATH`; by default /run/xenblk-vhost/control.sock for
root, $XDG_RUNTIME_DIR/xenblk-vhost/control.sock otherwise.

    reply = request_control(path, "stats")       # blocking client: `xenblk-vhost stats`, the hotplug script

The server is observability/control_socket.py. This module imports nothing
of ours, so the hotplug script can ask a daemon without loading the service.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping

SYSTEM_CONTROL_PATH = "/run/xenblk-vhost/control.sock"
_RELATIVE = os.path.join("xenblk-vhost", "control.sock")
CLIENT_TIMEOUT = 10.0


class ControlError(Exception):
    """Why the control socket cannot be used, in words for the operator."""


def default_control_path(euid: int | None = None, environ: Mapping[str, str] | None = None) -> str | None:
    """/run/xenblk-vhost/control.sock for root, else under $XDG_RUNTIME_DIR; None if neither applies."""
    euid = os.geteuid() if euid is None else euid
    environ = os.environ if environ is None else environ
    if euid == 0:
        return SYSTEM_CONTROL_PATH
    runtime = environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, _RELATIVE) if runtime else None


def request_control(path: str, command: str, *, timeout: float = CLIENT_TIMEOUT) -> dict:
    """Ask the daemon at path; the reply's payload. ControlError with a clear reason otherwise."""
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
        try:
            sock.sendall(json.dumps({"command": command}).encode() + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = sock.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        except TimeoutError:
            raise ControlError(f"no answer from {path} within {timeout:g} s") from None
        except OSError as e:
            raise ControlError(f"{path}: {e.strerror or e}") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"{path} answered something that is not JSON: {buf[:80]!r}") from None
    if not reply.get("ok"):
        raise ControlError(f"{path}: {reply.get('error', 'request refused')}")
    return reply[command]
