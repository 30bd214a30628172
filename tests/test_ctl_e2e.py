"""`xenblk-vhost ctl` end to end: `run --sim --control PATH` serving a guest (reference frontend, its own
process), the ctl command run as a separate process, as an operator would.

list (a domain present and one not, each disk's state, rings, data path, a refused disk's last error),
status (the connection and counters), pause (the guest's I/O stops: nothing reaches the file, nothing
in flight) and resume (its workload then finishes, every byte verified), detach (the backend closes the
disk, the guest sees it go, the storage is released), reload (what changed; a bad file refused with
check's lines and exit 2), --json for each.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys

import trio

from e2e_support.fixtures import disk_image, read_text, state_is, wait_node, write_config
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world


def run_argv(world, control, *configs) -> list[str]:
    argv = [sys.executable, "-m", "xenblk_vhost", "run", *map(str, configs), "--xenstore", world.xenstore_path,
            "--sim", world.hypervisor_path, "--control", str(control)]
    return ["sh", "-c", 'exec "$@" 2>&1', "sh", *argv]


async def ctl(control, *args: str) -> tuple[int, str, str]:
    done = await trio.run_process([sys.executable, "-m", "xenblk_vhost", "ctl", "--control", str(control), *args],
                                  capture_stdout=True, capture_stderr=True, check=False)
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def ctl_json(control, *args: str) -> dict:
    status, out, err = await ctl(control, *args, "--json")
    assert status == 0, err
    return json.loads(out)


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_list_status_pause_resume_detach_reload(tmp_path):
    img_a, img_b = disk_image(tmp_path, "a.img"), disk_image(tmp_path, "b.img")
    web1 = write_config(tmp_path, "web1", [f"vdev: xvda, driver: io_uring, path: {img_a}, queues: 2",
                                           f"vdev: xvdb, driver: io_uring, path: {img_b}"])
    db1 = write_config(tmp_path, "db1", [f"vdev: xvda, driver: io_uring, path: {img_b}, readonly: true"])
    control = tmp_path / "control.sock"
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("web1")
        backend = await world.start_process(run_argv(world, control, web1, db1), name="backend")
        a = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(web1)))
        b = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvdb", target=str(web1)))
        # A disk the file does not have: refused, and its error kept for `list`.
        c = await world.add_vbd(guest.domid, VbdConfig(vdev="xvdc", target=str(web1)))
        await wait_node(world.xs, f"{c.backend}/state", state_is(5))
        await world.detach_vbd(c, timeout=2.0)
        async with frontend_agent(world, guest.domid, [a.devid, b.devid], max_queues=2) as fe:
            await fe.call("connect", dev=a.devid)
            await fe.call("connect", dev=b.devid)

            # ---- list
            [daemon] = (await ctl_json(control, "list"))["daemons"]
            assert daemon["control"] == str(control)
            domains = {d["domain"]: d for d in daemon["domains"]}
            assert (domains["web1"]["present"], domains["web1"]["domid"]) == (True, guest.domid)
            assert (domains["db1"]["present"], domains["db1"]["domid"]) == (False, None)
            disks = {d["vdev"]: d for d in domains["web1"]["disks"]}
            assert (disks["xvda"]["state"], disks["xvda"]["rings"], disks["xvda"]["data_path"]) == ("Connected", 2,
                                                                                                    "copy")
            assert disks["xvdb"]["state"] == "Connected" and disks["xvdb"]["last_error"] is None
            assert "no disk configured for this domain as xvdc" in disks["xvdc"]["last_error"]["message"]
            assert disks["xvdc"]["configured"] is False
            assert [d["state"] for d in domains["db1"]["disks"]] == ["not attached"]
            status, text, _ = await ctl(control, "list")
            assert status == 0
            rows = {tuple(line.split()[:3]): line for line in text.splitlines() if not line.startswith("#")}
            assert rows[("web1", str(guest.domid), "xvda")].split()[3:6] == ["Connected", "2", "copy"]
            assert "domain not running" in rows[("db1", "-", "xvda")]
            assert "no disk configured" in rows[("web1", str(guest.domid), "xvdc")]

            # ---- status
            st = (await ctl_json(control, "status", "web1/xvda"))["domain"]
            [xvda] = st["disks"]
            assert xvda["connection"]["protocol"] == "native" and len(xvda["connection"]["rings"]) == 2
            assert xvda["features"]["max_queues"] == 2 and len(xvda["stats"]["rings"]) == 2
            status, text, _ = await ctl(control, "status", "web1")
            assert status == 0 and f"web1: running as domid {guest.domid}" in text and "connected: protocol" in text

            # ---- pause while the guest is busy, then resume: nothing lost
            result: dict = {}

            async def busy() -> None:
                result.update(await fe.call("workloads", devs=[a.devid], requests=20000, depth=16, timeout=120))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(busy)
                await trio.sleep(0.5)
                status, text, err = await ctl(control, "pause", "web1/xvda")
                assert status == 0, err
                assert text.startswith("web1/xvda: paused (nothing in flight after ")
                snap = (await ctl_json(control, "status", "web1/xvda"))["domain"]["disks"][0]
                assert snap["paused"] and snap["stats"]["total"]["in_flight"] == 0
                before, served = digest(img_a), snap["stats"]["total"]
                await trio.sleep(1.0)
                still = (await ctl_json(control, "status", "web1/xvda"))["domain"]["disks"][0]["stats"]["total"]
                assert (still["rd_req"], still["wr_req"]) == (served["rd_req"], served["wr_req"])
                assert digest(img_a) == before  # a snapshot taken now is consistent
                assert not result  # the guest waits, it got no error
                status, text, _ = await ctl(control, "resume", "web1")
                assert status == 0 and "web1/xvda: resumed\n" in text
            load = result[str(a.devid)]
            assert load["ok"] and load["requests"] == 20000 and not load["mismatches"], load

            # ---- refusals: exit 1 or 2, one line
            assert (await ctl(control, "pause", "web9"))[0] == 1
            assert (await ctl(control, "pause", "db1"))[2] == \
                "xenblk-vhost ctl: no disk of db1 is attached: nothing to pause\n"
            assert (await ctl(control, "detach", "web1"))[0] == 2  # which disk?

            # ---- detach xvdb from the backend's side
            status, text, err = await ctl(control, "detach", "web1/xvdb")
            assert status == 0, err
            assert text.startswith("web1/xvdb: detached: Closed after ") and "storage released" in text
            closed = await fe.call("wait_closed", dev=b.devid)
            assert closed["state"] == 6
            disks = {d["vdev"]: d for d in (await ctl_json(control, "list"))["daemons"][0]["domains"][0]["disks"]}
            assert disks["xvdb"]["state"] == "Closed" and disks["xvdb"]["data_path"] is None  # storage released
            assert await read_text(world.xs, f"{b.backend}/state") == "6"
            assert (await fe.call("close", dev=a.devid))["errors"] == []

        # ---- reload: what changed; a broken file refused, the running configuration kept
        write_config(tmp_path, "web1", [f"vdev: xvda, driver: io_uring, path: {img_a}, queues: 2",
                                        f"vdev: xvdb, driver: io_uring, path: {img_b}",
                                        f"vdev: xvdd, driver: io_uring, path: {img_b}, readonly: true"])
        status, text, err = await ctl(control, "reload")
        assert status == 0, err
        assert text.splitlines() == [f"reloaded {control}: 1 change(s)", "  web1/xvdd: added"]
        web1.write_text("domain: {name: web1}\ndisks: []\n")
        status, text, err = await ctl(control, "reload")
        assert status == 2 and text == ""
        assert err.splitlines() == [
            "xenblk-vhost ctl: reload refused: the files do not validate; the running configuration is kept",
            f"{web1}:2: disks: must be a non-empty list of disks"]
        assert [d["vdev"] for d in (await ctl_json(control, "list"))["daemons"][0]["domains"][0]["disks"]][:3] == [
            "xvda", "xvdb", "xvdd"]
        # The daemon's own log says it too, whoever asked for the reload.
        await backend.wait_line(lambda line: "reload refused, keeping the running configuration" in line
                                and "disks: must be a non-empty list" in line, 10)
        backend.proc.send_signal(signal.SIGTERM)
        assert await backend.wait(30) == 0
    assert any("DOMAIN" not in line for line in backend.lines)  # plain text log: no fields in the lines
