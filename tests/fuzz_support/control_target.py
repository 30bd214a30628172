"""Fuzz target: one control socket request line, parsed and answered by the daemon's real handlers.

The handlers (observability/control_commands.py: list, status, pause, resume, detach, reload) run
over a stand-in service with two configured domains (by name and by domid) and three attached
disks whose pause/resume/detach complete at once; `stats` is a stand-in (its snapshot reads no
request field).

Properties:
  - parse_request raises only BadRequest, and what it returns is a dict whose `command` is a known name;
  - answer() never raises, whatever the line holds and whatever the handlers do with its fields;
  - the reply is a JSON-serialisable dict with a boolean `ok`: on success the command's payload under
    its name, on refusal an `error` string (and `exit` 1 or 2 when a handler refused);
  - no input makes a handler fail unexpectedly (answered "internal error"): a bad field is a refusal.
"""

from __future__ import annotations

import json

import trio

from xenblk_vhost.backend.xenbus.device import DeviceId
from xenblk_vhost.config import DiskConfig, DomainConfig
from xenblk_vhost.observability.control_commands import ControlCommands
from xenblk_vhost.observability.control_socket import BadRequest, answer, parse_request
from xenblk_vhost.xen.xenbus import XenbusState


class _Device:
    def __init__(self) -> None:
        self.paused = False
        self.vbd = None
        self.connection = None
        self.last_error = None
        self.state = XenbusState.CONNECTED

    async def pause(self) -> None:
        self.paused = True

    async def resume(self) -> None:
        self.paused = False

    async def detach(self) -> None:
        self.state = XenbusState.CLOSED


class _Service:
    def __init__(self) -> None:
        disks = (DiskConfig(vdev=51712, driver="io_uring", path="/a.img"),
                 DiskConfig(vdev=51728, driver="io_uring", path="/b.img"))
        self.configs = [DomainConfig(source="/etc/xenblk-vhost/web1.yaml", name="web1", domid=None, disks=disks),
                        DomainConfig(source="/etc/xenblk-vhost/9.yaml", name=None, domid=9, disks=disks[:1])]
        self.devices = {DeviceId(0, "vbd", 5, 51712): _Device(), DeviceId(0, "vbd", 5, 51728): _Device(),
                        DeviceId(0, "vbd", 9, 51712): _Device()}
        self.labels = {did: ("web1" if did.frontend_domid == 5 else "9") for did in self.devices}
        self.last_errors: dict = {}

    async def domain_ids(self) -> dict:
        return {"web1": 5}


async def _reload() -> list[str]:
    return ["web1/xvda: limits.memory 64MiB -> 32MiB"]


async def _stats(request: dict) -> dict:
    return {"vbds": []}


def one_input(data: bytes) -> None:
    line = data.split(b"\n", 1)[0]
    handlers = ControlCommands(_Service(), started=0.0, reload=_reload).handlers()
    handlers["stats"] = _stats
    try:
        message = parse_request(line, handlers)
    except BadRequest:
        pass
    else:
        assert isinstance(message, dict) and message.get("command") in handlers, message
    reply = trio.run(answer, line, handlers)
    assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
    text = json.dumps(reply)
    if reply["ok"]:
        assert len(reply) == 2, reply
    else:
        assert isinstance(reply.get("error"), str), reply
        assert "internal error" not in reply["error"], f"{line!r} made a handler fail: {text[:300]}"
        assert reply.get("exit", 1) in (1, 2), reply


def seeds():
    for request in ({"command": "stats"}, {"command": "list"}, {"command": "status", "target": "web1/xvda"},
                    {"command": "pause", "target": "web1", "timeout": 2.5}, {"command": "resume", "target": "9"},
                    {"command": "detach", "target": "5/51728", "timeout": 1}, {"command": "reload"},
                    {"command": "status", "target": "web1/xvdz"}, {"command": "pause", "target": "7"}):
        yield json.dumps(request).encode() + b"\n"
    yield b'{"command": []}'
    yield b"[" * 3000
