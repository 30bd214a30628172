"""End to end: the sequences libxl drives (sim/toolstack.py writes what libxl writes).

create + attach (InitWait within LIBXL_INIT_TIMEOUT), detach while the guest
uses the disk (online=0, backend Closing -> frontend closes -> we reach
Closed before LIBXL_DESTROY_TIMEOUT, everything released), detach of a
device whose frontend never answers (libxl forces; we still release),
guest reboot (domain destroyed, a new domid under the same name served
again), and two domains with several disks served at once.
"""

from __future__ import annotations

import trio

from e2e_support.fixtures import MiB, backend_service, disk_image, domain_config, read_text, tree
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.sim.toolstack import DetachOutcome, VbdConfig
from xenblk_vhost.sim.world import open_world


async def wait_no_devices(service, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while service.devices:
            await trio.sleep(0.02)


async def test_detach_while_connected_closes_in_time_and_releases_everything(tmp_path):
    img = disk_image(tmp_path)
    cfg = domain_config(tmp_path, "db", [f"vdev: xvdc, driver: io_uring, path: {img}"])
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("db")
        async with backend_service(world, [cfg]) as service:
            # attach_vbd itself fails unless InitWait comes within libxl's 10 s.
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvdc", target=str(img)))
            async with frontend_agent(world, guest.domid, vbd.devid) as fe:
                await fe.call("connect")
                await fe.call("write", sector=0, sectors=64, seed=2)
                # xl block-detach: online=0, state=5, wait for 6 (else it would force).
                outcome = await world.detach_vbd(vbd)
                assert outcome is DetachOutcome.CLOSED
                closed = await fe.call("wait_closed", timeout=10)
                assert closed["errors"] == []  # no grant, ring page or request left with the backend
            await wait_no_devices(service)
            assert await tree(world.xs, vbd.backend) == {}
            # Nothing of ours left behind in xenstore either: no error report.
            assert await read_text(world.xs, f"/local/domain/0/error/{vbd.backend.split('/', 4)[4]}") is None


async def test_detach_of_an_unresponsive_frontend_is_forced_and_released(tmp_path):
    img = disk_image(tmp_path)
    cfg = domain_config(tmp_path, "hung", [f"vdev: xvda, driver: io_uring, path: {img}"])
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("hung")
        async with backend_service(world, [cfg]) as service:
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img)))
            assert len(service.devices) == 1
            # No frontend ever runs; libxl's forced round removes the frontend
            # dir, and blkback (xenbus_dev_remove) answers Closed to the forced Closing.
            outcome = await world.detach_vbd(vbd, timeout=1.0)
            assert outcome is DetachOutcome.CLOSED  # the forced round ends on our Closed, not its timeout
            await wait_no_devices(service)
            assert await tree(world.xs, vbd.backend) == {}


async def test_guest_reboot_new_domid_same_name_is_served_again(tmp_path):
    img = disk_image(tmp_path)
    cfg = domain_config(tmp_path, "app", [f"vdev: xvda, driver: io_uring, path: {img}"])
    async with open_world(tmp_path / "w") as world:
        async with backend_service(world, [cfg]) as service:
            first = await world.create_guest("app")
            vbd = await world.attach_vbd(first.domid, VbdConfig(vdev="xvda", target=str(img)))
            async with frontend_agent(world, first.domid, vbd.devid) as fe:
                await fe.call("connect")
                await fe.call("write", sector=512, sectors=32, seed=9)
                await fe.call("flush")
                # The guest reboots: xl destroys the domain (devices removed with
                # force: frontend dir first), then creates a new one.
                outcomes = await world.destroy_guest(first.domid)
            assert outcomes == {vbd.devid: DetachOutcome.CLOSED}
            await wait_no_devices(service)

            second = await world.create_guest("app")
            assert second.domid != first.domid
            vbd2 = await world.attach_vbd(second.domid, VbdConfig(vdev="xvda", target=str(img)))
            async with frontend_agent(world, second.domid, vbd2.devid) as fe:
                await fe.call("connect")
                assert (await fe.call("verify", sector=512, sectors=32, seed=9))["equal"]
                assert (await fe.call("close"))["errors"] == []
            [device] = service.devices.values()
            assert device.id.frontend_domid == second.domid


async def test_two_domains_three_disks_served_at_once(tmp_path):
    imgs = [disk_image(tmp_path, f"d{i}.img", size=8 * MiB) for i in range(3)]
    cfg_a = domain_config(tmp_path, "alpha", [f"vdev: xvda, driver: io_uring, path: {imgs[0]}",
                                              f"vdev: xvdb, driver: io_uring, path: {imgs[1]}, data_path: map"])
    cfg_b = domain_config(tmp_path, "beta", [f"vdev: xvda, driver: io_uring, path: {imgs[2]}, queues: 1"])
    async with open_world(tmp_path / "w") as world:
        a = await world.create_guest("alpha")
        b = await world.create_guest("beta")
        async with backend_service(world, [cfg_a, cfg_b]) as service:
            vbds = [await world.attach_vbd(a.domid, VbdConfig(vdev="xvda", target=str(imgs[0]))),
                    await world.attach_vbd(a.domid, VbdConfig(vdev="xvdb", target=str(imgs[1]))),
                    await world.attach_vbd(b.domid, VbdConfig(vdev="xvda", target=str(imgs[2])))]
            assert len(service.devices) == 3
            results = {}

            async def drive(domid: int, vbd_list) -> None:
                # One guest process per domain, driving all its disks at once.
                devs = [v.devid for v in vbd_list]
                async with frontend_agent(world, domid, devs) as fe:
                    for d in devs:
                        results[(domid, d)] = {"connect": await fe.call("connect", dev=d)}
                    loads = await fe.call("workloads", devs=devs, requests=300, depth=8, timeout=120)
                    for d in devs:
                        results[(domid, d)]["workload"] = loads[str(d)]
                        results[(domid, d)]["close"] = await fe.call("close", dev=d)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drive, a.domid, vbds[:2])
                nursery.start_soon(drive, b.domid, vbds[2:])
            for vbd in vbds:
                r = results[(vbd.domid, vbd.devid)]
                assert r["workload"]["ok"] and r["workload"]["requests"] == 300, r
                assert not r["workload"]["mismatches"] and r["close"]["errors"] == []
            # The map path on xvdb, copy elsewhere, each as configured; persistent grants on both (the default).
            assert results[(a.domid, vbds[1].devid)]["connect"]["negotiated"]["persistent"] is True
            assert results[(a.domid, vbds[0].devid)]["connect"]["negotiated"]["persistent"] is True
            assert results[(b.domid, vbds[2].devid)]["connect"]["negotiated"]["nr_rings"] == 1
