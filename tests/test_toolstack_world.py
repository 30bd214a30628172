"""The simulated host (sim/world.py) starts, runs a guest's life, and leaves nothing behind."""

import sys

import pytest
import trio

from sim_support.fixtures import mini_backend, new_vbd
from xenblk_vhost.sim.hypercall import Hypercalls
from xenblk_vhost.sim.toolstack import DetachOutcome
from xenblk_vhost.sim.world import open_world


@pytest.mark.parametrize("xenstored", ["inprocess", "process"])
async def test_a_guest_lifecycle(tmp_path, xenstored):
    async with open_world(tmp_path / "w", xenstored=xenstored) as world:
        domid, vbd = await new_vbd(world)
        assert await world.xs.read(f"/local/domain/{domid}/name") == b"guest-xvda"
        assert await world.xs.is_domain_introduced(domid)
        hc = Hypercalls(world.hypervisor_path)
        try:
            assert domid in hc.call("list_domains")[0]["domains"]
            async with world.xs.watch("@releaseDomain") as released:
                await released.__anext__()  # the registration's own fire
                async with mini_backend(world, vbd):
                    outcomes = await world.destroy_guest(domid, timeout=10)
                with trio.fail_after(10):
                    await released.__anext__()
            assert outcomes == {vbd.devid: DetachOutcome.CLOSED}
            assert domid not in hc.call("list_domains")[0]["domains"]
        finally:
            hc.close()
        for path in (f"/local/domain/{domid}", vbd.backend, f"/libxl/{domid}"):
            assert not await world.xs.exists(path)
        assert not await world.xs.is_domain_introduced(domid)


async def test_children_are_stopped_when_the_world_ends(tmp_path):
    async with open_world(tmp_path / "w") as world:
        sleeper = await world.start_process(
            [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(600)"], name="sleeper")
        assert sleeper.proc.returncode is None
    assert sleeper.proc.returncode is not None  # terminated, not left behind


async def test_a_child_that_dies_before_ready_is_reported(tmp_path):
    async with open_world(tmp_path / "w") as world:
        with pytest.raises(RuntimeError, match="exited"):
            await world.start_process([sys.executable, "-c", "print('oops')"], name="dies")
