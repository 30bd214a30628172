"""`ctl` in process: which daemon it asks (control*.sock, by domain), and the daemon side's rules that an
end-to-end run cannot force (a pause that does not drain in time leaves nothing paused)."""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field

import pytest
import trio

from xenblk_vhost.backend.xenbus.device import DeviceId
from xenblk_vhost.cli import main
from xenblk_vhost.config import DiskConfig, DomainConfig
from xenblk_vhost.observability import ctl_command
from xenblk_vhost.observability.control_commands import ControlCommands
from xenblk_vhost.observability.control_socket import CommandRefused, ControlSocket
from xenblk_vhost.xen.xenbus import XenbusState


@dataclass
class FakeDevice:
    domain: str
    hang: bool = False
    paused: bool = False
    vbd: object = None
    connection: object = None
    last_error: object = None
    state: XenbusState = XenbusState.CONNECTED
    pauses: list = field(default_factory=list)

    async def pause(self) -> None:
        self.paused = True
        try:
            if self.hang:
                await trio.sleep_forever()  # in-flight requests that never finish
        except BaseException:
            self.paused = False
            raise

    async def resume(self) -> None:
        self.paused = False


class FakeService:
    def __init__(self, name: str, devices: dict) -> None:
        self.configs = [DomainConfig(source=f"/etc/xenblk-vhost/{name}.yaml", name=name, domid=None,
                                     disks=tuple(DiskConfig(vdev=d.devid, driver="io_uring", path=f"/{d.devid}.img")
                                                 for d in devices))]
        self.devices = devices
        self.labels = {did: name for did in devices}
        self.last_errors: dict = {}

    async def domain_ids(self) -> dict:
        return {self.configs[0].name: 5}


def vbd(devid: int) -> DeviceId:
    return DeviceId(0, "vbd", 5, devid)


async def test_a_pause_that_does_not_drain_in_time_leaves_every_disk_resumed():
    quick, stuck = FakeDevice("web1"), FakeDevice("web1", hang=True)
    commands = ControlCommands(FakeService("web1", {vbd(51712): quick, vbd(51728): stuck}))
    with pytest.raises(CommandRefused) as refused:
        await commands.pause({"command": "pause", "target": "web1", "timeout": 0.2})
    assert refused.value.message == ("web1: not paused: xvdb (0 in flight) still had requests in the storage after "
                                     "0.2 s; every disk resumed")
    assert not quick.paused and not stuck.paused
    reply = await commands.pause({"command": "pause", "target": "web1/xvda"})
    assert quick.paused and reply["disks"][0]["paused"]


@pytest.mark.parametrize("request_fields, message, status", [
    ({"target": "web1", "timeout": -1}, "timeout must be a number of seconds", 2),
    ({"target": "web1", "timeout": True}, "timeout must be a number of seconds", 2),
    ({"target": ["web1"]}, "name a domain", 2),
    ({"target": "web1/bogus"}, "web1/bogus: ", 2),
    ({"target": "web1/xvdc"}, "web1 has no disk xvdc (configured: xvda)", 1),
    ({"target": "nobody"}, "'nobody' is not configured in this daemon (configured: web1)", 1),
    # str.isdigit() holds for "²" and int() refuses it: a ValueError, answered "internal error"
    # (found by the control fuzz target)
    ({"target": "\u00b2"}, "'\u00b2' is not configured in this daemon (configured: web1)", 1),
])
async def test_bad_targets_and_timeouts_are_refused_with_a_reason(request_fields, message, status):
    commands = ControlCommands(FakeService("web1", {vbd(51712): FakeDevice("web1")}))
    with pytest.raises(CommandRefused) as refused:
        await commands.pause({"command": "pause", **request_fields})
    assert message in refused.value.message and refused.value.exit_status == status


@pytest.fixture
def two_daemons(tmp_path, monkeypatch):
    """control-web1.sock and control-db1.sock in a directory ctl takes for /run/xenblk-vhost."""
    monkeypatch.setattr(ctl_command, "default_control_dir", lambda: str(tmp_path))
    services = {name: FakeService(name, {vbd(51712): FakeDevice(name)}) for name in ("web1", "db1")}
    return tmp_path, services


async def serve_and_run(directory, services, argv, capsys) -> tuple[int, str, str]:
    sockets = [ControlSocket(str(directory / f"control-{name}.sock")) for name in services]
    try:
        async with trio.open_nursery() as nursery:
            for sock, service in zip(sockets, services.values()):
                nursery.start_soon(sock.serve, ControlCommands(service).handlers())
            status = await trio.to_thread.run_sync(main, argv)
            nursery.cancel_scope.cancel()
    finally:
        for sock in sockets:
            sock.close()
    out = capsys.readouterr()
    return status, out.out, out.err


async def test_ctl_finds_the_daemon_configuring_the_domain_among_several(two_daemons, capsys):
    directory, services = two_daemons
    status, out, err = await serve_and_run(directory, services, ["ctl", "pause", "db1/xvda"], capsys)
    assert status == 0 and not [line for line in err.splitlines() if line.startswith("xenblk-vhost ctl:")], err
    assert out.startswith("db1/xvda: paused")
    assert services["db1"].devices[vbd(51712)].paused and not services["web1"].devices[vbd(51712)].paused
    # list asks them all
    status, out, err = await serve_and_run(directory, services, ["ctl", "list", "--json"], capsys)
    assert status == 0
    assert sorted(d["control"] for d in json.loads(out)["daemons"]) == [
        str(directory / "control-db1.sock"), str(directory / "control-web1.sock")]
    # a command for one daemon without a domain to choose it by
    status, out, err = await serve_and_run(directory, services, ["ctl", "reload"], capsys)
    assert status == 2 and "2 daemons answer here" in err and "name a domain or give --control PATH" in err
    status, out, err = await serve_and_run(directory, services, ["ctl", "pause", "web7"], capsys)
    assert status == 1 and "none of the daemons here" in err and "configure 'web7'" in err
    # A dead daemon's socket left behind: named, skipped; the live one is the only candidate.
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(directory / "control-old.sock"))
    stale.close()
    del services["db1"]
    status, out, err = await serve_and_run(directory, services, ["ctl", "reload"], capsys)
    assert status == 1 and "unknown command 'reload'" in err  # reached web1's daemon (which has no reload here)
    assert f"skipped: nothing is listening on {directory / 'control-old.sock'}" in err


def test_ctl_with_no_daemon_says_where_it_looked(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ctl_command, "default_control_dir", lambda: str(tmp_path))
    assert main(["ctl", "list"]) == 1
    assert capsys.readouterr().err == (f"xenblk-vhost ctl: no daemon answers in {tmp_path} (no control*.sock there): "
                                       "is xenblk-vhost running? (systemctl status 'xenblk-vhost@*')\n")


def test_ctl_without_a_command_prints_its_help_and_exits_2(capsys):
    assert main(["ctl"]) == 2
    assert "list" in capsys.readouterr().err


def test_status_and_list_show_the_storage_link():
    from xenblk_vhost.observability.ctl_command import render_list, render_status

    link = {"state": "reconnecting", "losses": 1, "reconnects": 0, "attempts": 3, "retried": 0,
            "last_error": "blkio_connect: Connection refused [ECONNREFUSED]", "away_s": 1.5}
    disk = {"vdev": "xvda", "state": "Connected", "device": "vbd/5/51712", "driver": "virtio-blk-vhost-user",
            "path": "/run/qsd/web1.sock", "configured": True, "rings": 1, "data_path": "copy", "storage": link}
    dom = {"domain": "web1", "domid": 5, "present": True, "config": "/etc/xenblk-vhost.yaml", "disks": [disk]}
    text = render_status(dom)
    assert ("storage link: RECONNECTING for 1.5 s (requests held; 3 failed attempt(s), last: blkio_connect: "
            "Connection refused [ECONNREFUSED]); lost 1 time(s), reconnected 0, 0 request(s) run again") in text
    assert "Connected, storage reconnecting" in render_list([("/run/x.sock", {"pid": 1, "domains": [dom]})])
    disk["storage"] = dict(link, state="connected", reconnects=1, retried=4, away_s=None)
    assert "storage link: connected; lost 1 time(s), reconnected 1, 4 request(s) run again" in render_status(dom)
    assert ", storage" not in render_list([("/run/x.sock", {"pid": 1, "domains": [dom]})])
