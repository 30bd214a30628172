"""The confinement rule (issue 10): an exception in one long-lived task, from a peer's input or our
own bug, is logged and confined to that peer or device; the service goes on serving the others.

Per surface: a ring (an exception inside one guest's ring worker: that device is failed cleanly,
EIO and Closing, the other guest's disk keeps serving verified data); the device task and the
control socket and metrics endpoint have theirs in test_service.py, test_stats_units.py and
test_metrics_units.py; a reload in test_daemon_reload_units.py.
"""

from __future__ import annotations

import errno

import trio

from e2e_support.fixtures import backend_service, disk_image, domain_config, read_text, state_is, wait_node
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.backend.datapath.ring_worker import RingWorker
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world

MiB = 1 << 20


async def test_an_exception_in_one_guests_ring_fails_that_device_only(tmp_path, monkeypatch, caplog):
    img_a, img_b = disk_image(tmp_path, "a.img", size=8 * MiB), disk_image(tmp_path, "b.img", size=8 * MiB)
    cfgs = [domain_config(tmp_path, "a", [f"vdev: xvda, driver: io_uring, path: {img_a}, queues: 1"]),
            domain_config(tmp_path, "b", [f"vdev: xvda, driver: io_uring, path: {img_b}, queues: 1"])]
    async with open_world(tmp_path / "w") as world:
        guest_a = await world.create_guest("a")
        guest_b = await world.create_guest("b")
        # (every way a request is taken counts it there: the reference path, the held path, the engine)
        count_dispatched = RingWorker._count_dispatched

        def failing_for_a(self, *args):
            if self.policy.frontend_domid == guest_a.domid:
                raise RuntimeError("injected: a bug met by guest a's request")
            return count_dispatched(self, *args)

        monkeypatch.setattr(RingWorker, "_count_dispatched", failing_for_a)
        async with backend_service(world, cfgs) as service:
            vbd_a = await world.attach_vbd(guest_a.domid, VbdConfig(vdev="xvda", target=str(img_a)))
            vbd_b = await world.attach_vbd(guest_b.domid, VbdConfig(vdev="xvda", target=str(img_b)))
            async with frontend_agent(world, guest_b.domid, vbd_b.devid) as fe_b, \
                    frontend_agent(world, guest_a.domid, vbd_a.devid) as fe_a:
                await fe_b.call("connect")
                await fe_a.call("connect")
                async with trio.open_nursery() as n:
                    # guest a's first request meets the injected failure: its write is never answered
                    n.start_soon(_call_ignoring_failure, fe_a, "write")
                    error = await wait_node(world.xs, f"{vbd_a.backend}/error", lambda v: v is not None)
                    assert error.startswith(f"{errno.EIO} serving the rings: injected"), error
                    await wait_node(world.xs, f"{vbd_a.backend}/state", state_is(5))  # Closing
                    n.cancel_scope.cancel()
                # guest b is served on, with its data intact
                await fe_b.call("write", sector=0, sectors=64, seed=9)
                assert (await fe_b.call("verify", sector=0, sectors=64, seed=9))["equal"]
                assert await read_text(world.xs, f"{vbd_b.backend}/state") == "4"
                assert any(d.frontend_domid == guest_b.domid for d in service.devices)
                assert (await fe_b.call("close"))["errors"] == []
        assert any("datapath failed: injected" in r.getMessage() for r in caplog.records)


async def _call_ignoring_failure(fe, cmd: str) -> None:
    try:
        await fe.call(cmd, sector=0, sectors=8, seed=1, timeout=60)
    except Exception:
        pass  # the device was failed under it: what the guest sees is the test's subject, not this
