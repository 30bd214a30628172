"""End to end: `xenblk-vhost run --sim` as a process, with signals.

Config errors refuse to start (exit 2, `check`'s messages); SIGTERM while a
guest is busy answers what is in flight and exits 0, leaving the guest's
device Connected; a backend started afterwards takes the device over and
the guest's I/O resumes with its data intact; SIGHUP reloads the files.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import trio

from e2e_support.fixtures import disk_image, read_text, state_is, tree, wait_node, write_config
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world


def run_argv(world, *configs) -> list[str]:
    """`xenblk-vhost run --sim`, its log (stderr) merged into stdout, which the world collects."""
    argv = [sys.executable, "-m", "xenblk_vhost", "run", *map(str, configs),
            "--xenstore", world.xenstore_path, "--sim", world.hypervisor_path]
    return ["sh", "-c", 'exec "$@" 2>&1', "sh", *argv]


def test_run_refuses_a_bad_config_with_checks_messages(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: {name: b}\ndisks:\n  - {vdev: xvda, driver: io_uring, path: /none, queues: 0}\n")
    run = subprocess.run([sys.executable, "-m", "xenblk_vhost", "run", str(bad), "--sim", "/nonexistent"],
                         capture_output=True, text=True, timeout=60)
    check = subprocess.run([sys.executable, "-m", "xenblk_vhost", "check", str(bad)],
                           capture_output=True, text=True, timeout=60)
    assert run.returncode == check.returncode == 2
    assert run.stderr == check.stderr != ""
    assert run.stdout == ""  # never got to "ready"


def test_run_without_a_hypervisor_says_so_in_one_line_and_exits_2(tmp_path):
    """This machine is no dom0 (tests/test_startup_errors.py fakes the other cases)."""
    img = disk_image(tmp_path)
    good = write_config(tmp_path, "g", [f"vdev: xvda, driver: io_uring, path: {img}"])
    run = subprocess.run([sys.executable, "-m", "xenblk_vhost", "run", str(good), "--xenstore", str(tmp_path / "no")],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.startswith("xenblk-vhost run: not running on Xen (") and run.stderr.count("\n") == 1


async def test_sigterm_drains_and_a_new_backend_takes_the_busy_guest_over(tmp_path):
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "busy", [f"vdev: xvda, driver: io_uring, path: {img}"])
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("busy")
        first = await world.start_process(run_argv(world, cfg), name="backend-1")
        vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img)))
        async with frontend_agent(world, guest.domid, vbd.devid) as fe:
            await fe.call("connect")
            await fe.call("write", sector=0, sectors=128, seed=21)
            result = {}

            async def busy_guest() -> None:
                result.update(await fe.call("workloads", devs=[vbd.devid], requests=10000, depth=16, timeout=120))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(busy_guest)
                await trio.sleep(0.3)  # the workload (some seconds long) is under way
                first.proc.send_signal(signal.SIGTERM)
                assert await first.wait(30) == 0
                assert not result  # stopped mid-workload: what remains is the second backend's
                # The guest's device is left Connected: it waits, it does not lose its disk.
                assert (await read_text(world.xs, f"{vbd.backend}/state")) == "4"
                second = await world.start_process(run_argv(world, cfg), name="backend-2")
            load = result[str(vbd.devid)]
            # Nothing lost across the switch: every request answered once, every byte verified.
            assert load["ok"] and load["requests"] == 10000 and not load["mismatches"], load
            assert (await fe.call("report"))["errors"] == []
            assert (await fe.call("close"))["errors"] == []
        second.proc.send_signal(signal.SIGINT)
        assert await second.wait(30) == 0
        assert any(f"vbd-{guest.domid}-{vbd.devid}: taking over a device found in state CONNECTED" in line
                   for line in second.lines), second.lines
        # How long the guest waited on the start-up, for the operator (and scripts/bench_startup.py).
        assert any("serving " in line and " s after exec (interpreter and imports " in line
                   and "devices found and watched " in line for line in second.lines), second.lines


async def test_sighup_reloads_the_configuration(tmp_path):
    img_a, img_b = disk_image(tmp_path, "a.img"), disk_image(tmp_path, "b.img")
    cfg = write_config(tmp_path, "grower", [f"vdev: xvda, driver: io_uring, path: {img_a}"])
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("grower")
        backend = await world.start_process(run_argv(world, cfg), name="backend")
        # xvdb is not configured yet: the device is refused with an error report.
        b = await world.add_vbd(guest.domid, VbdConfig(vdev="xvdb", target=str(img_b)))
        await wait_node(world.xs, f"{b.backend}/state", state_is(5))
        error = f"/local/domain/0/error/backend/vbd/{guest.domid}/{b.devid}/error"
        assert "no disk configured" in await read_text(world.xs, error)
        await world.detach_vbd(b, timeout=1.0)

        # A broken file is refused and the running configuration kept: xvda is still served.
        cfg.write_text("domain: {name: grower}\ndisks: []\n")
        backend.proc.send_signal(signal.SIGHUP)
        await backend.wait_line(lambda line: "reload refused" in line and "disks: must be a non-empty list" in line, 10)
        a = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img_a)))
        await world.detach_vbd(a, timeout=1.0)
        # A good one with xvdb is taken.
        write_config(tmp_path, "grower", [f"vdev: xvda, driver: io_uring, path: {img_a}",
                                          f"vdev: xvdb, driver: io_uring, path: {img_b}"])
        backend.proc.send_signal(signal.SIGHUP)
        await backend.wait_line(lambda line: "configuration reloaded: 1 domain(s)" in line, 10)
        b = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvdb", target=str(img_b)))
        async with frontend_agent(world, guest.domid, b.devid) as fe:
            await fe.call("connect")
            await fe.call("write", sector=0, sectors=8, seed=4)
            assert (await fe.call("verify", sector=0, sectors=8, seed=4))["equal"]
            assert (await fe.call("close"))["errors"] == []
        backend.proc.send_signal(signal.SIGTERM)
        assert await backend.wait(30) == 0
        assert await tree(world.xs, f"/local/domain/0/error/backend/vbd/{guest.domid}/{b.devid}") == {}
