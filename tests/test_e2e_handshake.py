"""End to end: the reference blkfront (guest process) <-> the real backend <-> a file.

The handshake as libxl and Linux blkfront drive it, the node set the
backend publishes compared with Linux blkback's, data verified through the
frontend and in the file itself, a frontend reconnect, and an online resize
the frontend sees without reconnecting.
"""

from __future__ import annotations

import os

import pytest

from e2e_support.fixtures import MiB, backend_service, disk_image, domain_config, state_is, tree, wait_node
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.blkif.constants import SECTOR_SIZE, VDISK_READONLY
from xenblk_vhost.sim.guest import pattern
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world

# What the toolstack writes (libxl device_disk_add), what Linux blkback adds
# before InitWait (xen_blkbk_probe) and at Connected (connect(), discard on).
# The hotplug script's nodes (physical-device, hotplug-status) are not ours.
LIBXL_KEYS = {"frontend", "params", "script", "frontend-id", "online", "removable", "bootable", "state", "dev",
              "type", "mode", "device-type", "discard-enable", "specification"}
BLKBACK_PROBE_KEYS = {"feature-max-indirect-segments", "multi-queue-max-queues", "max-ring-page-order"}
BLKBACK_CONNECT_KEYS = {"feature-flush-cache", "discard-granularity", "discard-alignment", "discard-secure",
                        "feature-discard", "feature-barrier", "feature-persistent", "sectors", "info",
                        "sector-size", "physical-sector-size"}


async def test_handshake_publishes_blkbacks_nodes_and_serves_verified_data(tmp_path):
    img = disk_image(tmp_path, size=32 * MiB)
    cfg = domain_config(tmp_path, "web1", [f"vdev: xvda, driver: io_uring, path: {img}, queues: 2, "
                                           "ring_page_order: 2, max_indirect_segments: 64"])
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("web1", domain_type="pv")
        async with backend_service(world, [cfg]):
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img), domain_type="pv"))
            # Before the frontend does anything: the probe keys and InitWait.
            before = await tree(world.xs, vbd.backend)
            assert before["state"] == "2"
            # (feature-persistent already at probe, as we offer it: blkback writes it at connect)
            assert set(before) == LIBXL_KEYS | BLKBACK_PROBE_KEYS | {"feature-persistent"}
            assert (before["multi-queue-max-queues"], before["max-ring-page-order"],
                    before["feature-max-indirect-segments"]) == ("2", "2", "64")

            async with frontend_agent(world, guest.domid, vbd.devid, max_queues=4, max_ring_page_order=4,
                                      max_indirect_segments=128) as fe:
                info = await fe.call("connect")
                nodes = await tree(world.xs, vbd.backend)
                assert set(nodes) == LIBXL_KEYS | BLKBACK_PROBE_KEYS | BLKBACK_CONNECT_KEYS
                assert nodes["state"] == "4"
                assert nodes["sectors"] == str(32 * MiB // SECTOR_SIZE)
                assert (nodes["info"], nodes["sector-size"]) == ("0", "512")
                physical = int(nodes["physical-sector-size"])  # the file system's preferred I/O size
                assert physical >= 512 and physical & (physical - 1) == 0
                assert (nodes["feature-flush-cache"], nodes["feature-barrier"], nodes["feature-discard"],
                        nodes["feature-persistent"]) == ("1", "1", "1", "1")  # (by default, on the copy path too)
                neg = info["negotiated"]
                # The frontend took what we offered, no more.
                assert (neg["nr_rings"], neg["ring_page_order"], neg["max_indirect_segments"]) == (2, 2, 64)
                assert info["sectors"] == 32 * MiB // SECTOR_SIZE

                # Data, through the rings: a multi-page indirect write and a read back.
                await fe.call("write", sector=2048, sectors=256, seed=7)
                await fe.call("flush")
                assert (await fe.call("verify", sector=2048, sectors=256, seed=7))["equal"]
                # ... and in the file itself, where the frontend said.
                with open(img, "rb") as f:
                    f.seek(2048 * SECTOR_SIZE)
                    assert f.read(256 * SECTOR_SIZE) == pattern(7, 256 * SECTOR_SIZE)
                await fe.call("discard", sector=0, sectors=8)
                closed = await fe.call("close")
                assert closed["errors"] == []  # every grant and page given back, every request answered
            assert (await tree(world.xs, vbd.backend))["state"] == "6"


@pytest.mark.parametrize("protocol", ["x86_32-abi", None])
async def test_32bit_and_unspecified_protocols_are_served(tmp_path, protocol):
    """No `protocol` key means blkback's x86 default, the 32-bit ABI; a frontend
    that writes none must also speak it (the reference frontend does)."""
    img = disk_image(tmp_path)
    cfg = domain_config(tmp_path, "old", [f"vdev: xvdb, driver: io_uring, path: {img}"])
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("old")
        async with backend_service(world, [cfg]):
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvdb", target=str(img)))
            async with frontend_agent(world, guest.domid, vbd.devid, protocol=protocol, max_queues=1) as fe:
                await fe.call("connect")
                await fe.call("write", sector=8, sectors=24, seed=3)
                assert (await fe.call("verify", sector=8, sectors=24, seed=3))["equal"]
                assert (await fe.call("close"))["errors"] == []


async def test_frontend_reconnect_is_served_again_with_the_data_kept(tmp_path):
    img = disk_image(tmp_path)
    cfg = domain_config(tmp_path, "kexec", [f"vdev: xvda, driver: io_uring, path: {img}"])
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("kexec")
        async with backend_service(world, [cfg]) as service:
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img)))
            async with frontend_agent(world, guest.domid, vbd.devid) as fe:
                await fe.call("connect")
                await fe.call("write", sector=100, sectors=16, seed=11)
                assert (await fe.call("close"))["errors"] == []
                assert (await tree(world.xs, vbd.backend))["state"] == "6"
                [device] = service.devices.values()
                assert not device.vbd.serving  # rings released while Closed

                # Closed -> Initialising: blkback answers InitWait, then serves again.
                info = await fe.call("reconnect")
                assert info["sectors"] > 0
                assert (await fe.call("verify", sector=100, sectors=16, seed=11))["equal"]
                assert (await fe.call("report"))["connections"] == 2
                assert (await fe.call("close"))["errors"] == []


async def test_online_resize_reaches_the_frontend_without_reconnecting(tmp_path):
    img = disk_image(tmp_path, size=8 * MiB)
    cfg = domain_config(tmp_path, "grow", [f"vdev: xvda, driver: io_uring, path: {img}"])
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("grow")
        async with backend_service(world, [cfg], resize_interval=0.2):
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img)))
            async with frontend_agent(world, guest.domid, vbd.devid) as fe:
                await fe.call("connect")
                os.truncate(img, 12 * MiB)
                resized = await fe.call("wait_resize", timeout=10)
                assert resized == {"sectors": 12 * MiB // SECTOR_SIZE, "resizes": 1}
                assert (await fe.call("report"))["connections"] == 1  # same connection
                # The new sectors are usable: validation follows the new size.
                last = 12 * MiB // SECTOR_SIZE - 8
                await fe.call("write", sector=last, sectors=8, seed=5)
                assert (await fe.call("verify", sector=last, sectors=8, seed=5))["equal"]
                assert (await fe.call("close"))["errors"] == []


async def test_readonly_mode_and_config_readonly_both_give_a_readonly_disk(tmp_path):
    img = disk_image(tmp_path)
    other = disk_image(tmp_path, "other.img")
    cfg = domain_config(tmp_path, "ro", [f"vdev: xvda, driver: io_uring, path: {img}",
                                         f"vdev: xvdb, driver: io_uring, path: {other}, readonly: true"])
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("ro")
        async with backend_service(world, [cfg]):
            # libxl access=ro: mode=r (and discard-enable=0, libxl's default for ro)
            a = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img), readwrite=False))
            b = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvdb", target=str(other)))
            for vbd in (a, b):
                async with frontend_agent(world, guest.domid, vbd.devid) as fe:
                    info = await fe.call("connect")
                    assert info["disk"]["info"] & VDISK_READONLY
                    nodes = await tree(world.xs, vbd.backend)
                    if vbd is a:  # the toolstack disabled discard: blkback writes no discard key at all
                        assert not {"feature-discard", "discard-granularity"} & set(nodes)
                    else:
                        assert nodes["feature-discard"] == "0"
                    with pytest.raises(Exception, match="status -1"):
                        await fe.call("write", sector=0, sectors=8, seed=1)
                    assert (await fe.call("close"))["errors"] == []
            await wait_node(world.xs, f"{b.backend}/state", state_is(6))
