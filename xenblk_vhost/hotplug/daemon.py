"""Ask the running daemons, through their control sockets, which one serves a device.

xenstore shows that *a* backend took the device, and what it advertised;
a daemon's control socket (`run --control`, control_protocol.py) says
exactly which storage it serves it from. The script asks every control
socket in /run/xenblk-vhost named control*.sock (control_protocol's
control_sockets(), which `xenblk-vhost ctl` uses too): the default one
(control.sock) and those of systemd instances
(deploy/systemd/xenblk-vhost@.service: control-<instance>.sock). A daemon
that does not answer is skipped: a daemon run with `--control none` is
still checked through xenstore.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import trio

from ..control_protocol import SYSTEM_CONTROL_DIR, ControlError, control_sockets, request_control
from .target import BackendDevice

CONTROL_DIR = Path(SYSTEM_CONTROL_DIR)
ASK_TIMEOUT = 5.0


@dataclass(frozen=True)
class ServedBy:
    control: str  # the socket that answered
    driver: str | None
    path: str | None
    state: str


async def find_daemon(device: BackendDevice, directory: Path = CONTROL_DIR) -> tuple[ServedBy | None, list[str]]:
    """The daemon serving the device, if one answers for it; and the sockets that did not answer, with why."""

    silent = []
    for path in control_sockets(directory):
        try:
            snapshot = await trio.to_thread.run_sync(functools.partial(request_control, path, "stats",
                                                                       timeout=ASK_TIMEOUT))
        except ControlError as e:
            silent.append(str(e))
            continue
        for vbd in snapshot.get("vbds", []):
            if (vbd.get("kind"), vbd.get("domid"), vbd.get("devid")) == (device.kind, device.frontend_domid,
                                                                         device.devid):
                return ServedBy(path, vbd.get("driver"), vbd.get("path"), str(vbd.get("state"))), silent
    return None, silent
