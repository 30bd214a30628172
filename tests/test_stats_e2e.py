"""`xenblk-vhost run --sim --control PATH` and `xenblk-vhost stats`, end to end.

A guest (reference frontend, its own process) does a known sequence of
requests; the counters read over the control socket, by the `stats`
command as a separate process, must be exactly what the guest did, per
operation and in sectors, and grow as the guest goes on.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys

import trio

from e2e_support.fixtures import disk_image, write_config
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.control_protocol import request_control
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world


def run_argv(world, config, *extra) -> list[str]:
    """`xenblk-vhost run --sim`, its log merged into stdout (which the world collects)."""
    argv = [sys.executable, "-m", "xenblk_vhost", "run", str(config), "--xenstore", world.xenstore_path,
            "--sim", world.hypervisor_path, *extra]
    return ["sh", "-c", 'exec "$@" 2>&1', "sh", *argv]


async def stats_cli(*args: str) -> subprocess.CompletedProcess:
    return await trio.run_process([sys.executable, "-m", "xenblk_vhost", "stats", *args],
                                  capture_stdout=True, capture_stderr=True, check=False)


def vbd_of(snapshot: dict, domid: int, devid: int) -> dict:
    [vbd] = [v for v in snapshot["vbds"] if v["domid"] == domid and v["devid"] == devid]
    return vbd


async def test_stats_over_the_control_socket_count_what_the_guest_did(tmp_path):
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "counted", [f"vdev: xvda, driver: io_uring, path: {img}, queues: 2, "
                                             f"data_path: map"])
    control = tmp_path / "ctl" / "control.sock"
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("counted")
        backend = await world.start_process(run_argv(world, cfg, "--control", str(control)), name="backend")
        # Created 0600, before "ready".
        assert stat.S_ISSOCK(os.stat(control).st_mode)
        assert stat.S_IMODE(os.stat(control).st_mode) == 0o600
        vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img)))
        async with frontend_agent(world, guest.domid, vbd.devid, max_queues=2) as fe:
            connected = await fe.call("connect")
            rings = connected["negotiated"]["nr_rings"]
            assert rings == 2
            before = vbd_of(request_control(str(control), "stats"), guest.domid, vbd.devid)
            assert before["state"] == "CONNECTED" and before["serving"] and before["data_path"] == "map"
            assert len(before["rings"]) == rings
            assert before["total"]["rd_req"] == before["total"]["wr_req"] == 0

            # What the guest does: 3 writes of 8 sectors, 2 reads of 8, 1 flush, 1 discard of 16.
            for i in range(3):
                await fe.call("write", sector=64 * i, sectors=8, seed=i)
            for i in range(2):
                assert (await fe.call("verify", sector=64 * i, sectors=8, seed=i))["equal"]
            await fe.call("flush")
            await fe.call("discard", sector=1024, sectors=16)

            result = await stats_cli("--control", str(control), "--json")
            assert result.returncode == 0, result.stderr
            [daemon] = json.loads(result.stdout)["daemons"]
            assert daemon["control"] == str(control)
            after = vbd_of(daemon, guest.domid, vbd.devid)
            assert after["domain"] == "counted"  # the YAML's name: it survives a new domid
            total = after["total"]
            assert (total["wr_req"], total["wr_sect"]) == (3, 24)
            assert (total["rd_req"], total["rd_sect"]) == (2, 16)
            assert (total["f_req"], total["ds_req"], total["errors"], total["in_flight"]) == (1, 1, 0, 0)
            # The vbd's total is its rings' sum; the frontend spread the requests over both rings.
            for key in ("rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect"):
                assert sum(r[key] for r in after["rings"]) == total[key]
            assert all(r["rd_req"] + r["wr_req"] + r["f_req"] + r["ds_req"] > 0 for r in after["rings"])

            # The table shows the same figures.
            table = await stats_cli("--control", str(control))
            assert table.returncode == 0, table.stderr
            text = table.stdout.decode()
            assert f"counted xvda  vbd-{guest.domid}-{vbd.devid}  Connected  io_uring {img}" in text
            total_row = next(line for line in text.splitlines() if line.split()[2:3] == ["total"])
            assert total_row.split()[:2] == ["counted", "xvda"]
            assert total_row.split()[3:10] == ["2", "3", "1", "1", "0", "16", "24"]

            # The counts grow with more I/O: a verified workload's requests all arrive.
            load = (await fe.call("workloads", devs=[vbd.devid], requests=300, depth=8, timeout=120))[str(vbd.devid)]
            assert load["ok"], load
            grown = vbd_of(request_control(str(control), "stats"), guest.domid, vbd.devid)["total"]
            sent = load["by_op"]
            assert grown["wr_req"] - total["wr_req"] == sent["write"]
            assert grown["ds_req"] - total["ds_req"] == sent["discard"]
            assert grown["f_req"] - total["f_req"] == sent["flush"] + sent["barrier"]
            # Reads: the workload's own plus its final read-back of every lane.
            assert grown["rd_req"] - total["rd_req"] >= sent["read"] + 1
            assert grown["errors"] == 0
            assert (await fe.call("close"))["errors"] == []
        backend.proc.send_signal(signal.SIGTERM)
        assert await backend.wait(30) == 0
    assert not control.exists()  # removed on the way out


async def test_a_second_daemon_is_refused_the_same_control_socket(tmp_path):
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "solo", [f"vdev: xvda, driver: io_uring, path: {img}"])
    control = tmp_path / "control.sock"
    async with open_world(tmp_path / "w") as world:
        first = await world.start_process(run_argv(world, cfg, "--control", str(control)), name="first")
        second = await world.start_process(run_argv(world, cfg, "--control", str(control)), name="second",
                                           ready=None)
        assert await second.wait(30) == 1
        assert any("stopped: --control: another xenblk-vhost answers on " + str(control) in line
                   for line in second.lines), second.lines
        # The first one still answers.
        assert request_control(str(control), "stats")["vbds"] == []
        first.proc.send_signal(signal.SIGINT)
        assert await first.wait(30) == 0
    assert not control.exists()
