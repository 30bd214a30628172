"""The shipped unit (deploy/systemd/xenblk-vhost@.service) under a real systemd and journald
(tests/systemd_support/sandbox.py), serving a simulated guest.

What only systemd itself can show:
  - Type=notify: active once READY=1, `systemctl status`'s STATUS= line follows the disks;
  - journald: records at their priority (an error is 3, not 6), with DOMAIN= and VDEV= fields;
  - `systemctl reload` (ExecReload = ctl reload) fails on a bad file and leaves the daemon serving;
  - WatchdogSec: a daemon whose event loop is wedged (here by a storage daemon that accepts its
    connection and never answers: libblkio's connect blocks) is killed (SIGABRT: faulthandler's
    stack in the journal) and started again; the new one takes the guest's other disk over;
  - RestartPreventExitStatus=2: an instance whose file does not validate is not restarted.

The unit is used as shipped except for a drop-in with what the sandbox needs: ExecStart pointed at
this checkout's venv, the test's files and the simulator (--sim, --xenstore); ProtectHome=no (the
venv's interpreter is under /root), PrivateTmp=no (the simulator's sockets and the images are in the
test's /tmp directory), ReadWritePaths= that directory, WatchdogSec=3s (seconds, not half a minute).
"""

from __future__ import annotations

import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import trio

from e2e_support.fixtures import disk_image, state_is, wait_node, write_config
from e2e_support.frontend_agent import frontend_agent
from systemd_support.sandbox import available, systemd_sandbox
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "xenblk-vhost@.service"
XENBLK_VHOST = str(Path(sys.executable).parent / "xenblk-vhost")

pytestmark = pytest.mark.skipif(available() is not None, reason=f"systemd sandbox: {available()}")


def unit_line(key: str) -> str:
    [line] = [raw for raw in UNIT.read_text().splitlines() if raw.startswith(f"{key}=")]
    return line.split("=", 1)[1]


def drop_in(scratch: Path, world) -> str:
    exec_start = (unit_line("ExecStart").replace("/usr/local/bin/xenblk-vhost", XENBLK_VHOST)
                  .replace("/etc/xenblk-vhost/", f"{scratch}/etc/")
                  + f" --xenstore {world.xenstore_path} --sim {world.hypervisor_path}")
    return f"""[Unit]
AssertPathExists=
[Service]
ExecStart=
ExecStart={exec_start}
ExecReload=
ExecReload={unit_line("ExecReload").replace("/usr/local/bin/xenblk-vhost", XENBLK_VHOST)}
ProtectHome=no
PrivateTmp=no
ReadWritePaths={scratch}
WatchdogSec=3s
"""


class SilentStorage:
    """A unix socket that accepts vhost-user clients and never says a word (a hung storage daemon)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX)
        self._listener.bind(str(path))
        self._listener.listen(8)
        self._clients: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._clients.append(client)

    def stop(self) -> None:
        """Gone, as a storage daemon that died: clients see their connection close, new ones are
        refused; its socket file stays (a stale one)."""
        self._listener.close()
        for client in self._clients:
            client.close()


async def test_the_unit_under_systemd_notify_journal_reload_watchdog_and_no_restart_on_exit_2():
    scratch = Path(tempfile.mkdtemp(prefix="xv-sd-", dir="/tmp"))  # short: unix socket paths
    (scratch / "etc").mkdir()
    img_a = disk_image(scratch, "a.img")
    disks = [f"vdev: xvda, driver: io_uring, path: {img_a}"]
    yaml_path = write_config(scratch / "etc", "web1", disks)
    (scratch / "etc" / "bad.yaml").write_text("domain: {name: bad}\ndisks: []\n")
    unit = "xenblk-vhost@web1.service"
    silent = None
    try:
        # xenstored in its own process: the sandbox calls below block this thread.
        async with open_world(scratch / "w", xenstored="process") as world:
            units = {"xenblk-vhost@.service": UNIT.read_text().replace("/usr/local/bin/xenblk-vhost", XENBLK_VHOST)}
            with systemd_sandbox(scratch / "sd", units) as sd:
                sd.install("xenblk-vhost@.service.d/sandbox.conf", drop_in(scratch, world))

                # ---- Type=notify: active once ready, STATUS= shown
                done = sd.systemctl("start", unit)
                assert done.returncode == 0, done.stderr + sd.log(unit)
                assert sd.show(unit, "ActiveState") == "active"
                assert sd.show(unit, "StatusText") == "1 domain(s) configured, 0 disk(s) connected"
                first_pid = sd.show(unit, "MainPID")

                guest = await world.create_guest("web1")
                a = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(yaml_path)))
                async with frontend_agent(world, guest.domid, a.devid) as fe:
                    await fe.call("connect")
                    await fe.call("write", sector=0, sectors=8, seed=1)
                    await trio.to_thread.run_sync(sd.wait_for, unit, "StatusText",
                                                  "1 domain(s) configured, 1 disk(s) connected")

                    # ---- journald: priorities and the device's fields
                    c = await world.add_vbd(guest.domid, VbdConfig(vdev="xvdc", target=str(yaml_path)))
                    await wait_node(world.xs, f"{c.backend}/state", state_is(5))
                    entries = sd.journal_until(unit, lambda es: any("no disk configured" in e["MESSAGE"] for e in es),
                                               "SYSLOG_IDENTIFIER=xenblk-vhost")
                    connected = [e for e in entries if "InitWait -> Connected" in e["MESSAGE"]]
                    assert connected and connected[0]["PRIORITY"] == "6"
                    assert (connected[0]["DOMAIN"], connected[0]["VDEV"], connected[0]["DOMID"]) == (
                        "web1", "xvda", str(guest.domid))
                    [refused] = [e for e in entries if "no disk configured" in e["MESSAGE"]]
                    assert (refused["PRIORITY"], refused["DOMAIN"], refused["VDEV"]) == ("3", "web1", "xvdc")
                    assert refused["DEVICE"] == f"vbd-{guest.domid}-{c.devid}"
                    # journalctl's own filters work on them
                    assert sd.journal(unit, "-p", "err", "VDEV=xvdc")
                    await world.detach_vbd(c, timeout=2.0)

                    # ---- the operator's command finds the instance's control socket by itself
                    listing = sd.run([XENBLK_VHOST, "ctl", "list"])
                    assert listing.returncode == 0, listing.stderr
                    assert "/run/xenblk-vhost/control-web1.sock" in listing.stdout
                    assert any(line.split()[:4] == ["web1", str(guest.domid), "xvda", "Connected"]
                               for line in listing.stdout.splitlines())

                    # ---- reload: refused (and says why), then applied
                    yaml_path.write_text("domain: {name: web1}\ndisks: []\n")
                    done = sd.systemctl("reload", unit)
                    assert done.returncode != 0
                    assert sd.show(unit, "ActiveState") == "active"
                    refusal = "disks: must be a non-empty list"
                    sd.journal_until(unit, lambda es: any(refusal in e["MESSAGE"] for e in es))
                    silent = SilentStorage(scratch / "hung.sock")
                    write_config(scratch / "etc", "web1", disks + [
                        f"vdev: xvdb, driver: virtio-blk-vhost-user, path: {silent.path}"])
                    done = sd.systemctl("reload", unit)
                    assert done.returncode == 0, done.stderr + sd.log(unit)

                    # ---- watchdog: a storage daemon that never answers wedges the loop at open
                    await world.add_vbd(guest.domid, VbdConfig(vdev="xvdb", target=str(yaml_path)))
                    await trio.to_thread.run_sync(
                        lambda: sd.wait_for(unit, "NRestarts", lambda v: v.isdigit() and int(v) >= 1, timeout=40))
                    silent.stop()  # the storage daemon dies: the next daemon's open fails at once
                    await trio.to_thread.run_sync(lambda: sd.wait_for(unit, "ActiveState", "active", timeout=40))
                    assert sd.show(unit, "MainPID") != first_pid
                    assert f"{unit}: Watchdog timeout" in sd.manager_log()
                    log = sd.log(unit)  # where the loop was stuck, from faulthandler
                    assert "Fatal Python error: Aborted" in log and "storage/device.py" in log, log
                    # The new daemon took the guest's xvda over: its data is there, I/O goes on.
                    assert (await fe.call("verify", sector=0, sectors=8, seed=1))["equal"]
                    await fe.call("write", sector=64, sectors=8, seed=2)
                    assert (await fe.call("verify", sector=64, sectors=8, seed=2))["equal"]

                # ---- exit 2 (a file that does not validate): not restarted
                done = sd.systemctl("start", "xenblk-vhost@bad.service")
                assert done.returncode != 0
                time.sleep(2)  # far longer than RestartSec=100ms: a restart would have happened
                assert sd.show("xenblk-vhost@bad.service", "NRestarts") == "0"
                assert sd.show("xenblk-vhost@bad.service", "ExecMainStatus") == "2"
                bad = [e for e in sd.journal_until("xenblk-vhost@bad.service",
                                                   lambda es: any("disks: must be" in e["MESSAGE"] for e in es))
                       if "disks: must be" in e["MESSAGE"]]
                assert bad and bad[0]["PRIORITY"] == "3"
                sd.systemctl("stop", unit)
    finally:
        if silent is not None:
            silent.stop()
        shutil.rmtree(scratch, ignore_errors=True)
