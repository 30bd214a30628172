"""Service: which backend dirs get a Device, and that one Device failing leaves the rest.

Against the simulated xenstored with toolstack.py writing what libxl
writes; no hypervisor (no frontend connects here: the devices stop at
InitWait, which is all discovery needs; test_e2e_* connect).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from e2e_support.fixtures import disk_image, domain_config, read_text, state_is, wait_node
from xenblk_vhost.backend.xenbus.device import DeviceId
from xenblk_vhost.backend.xenbus.service import Service
from xenblk_vhost.sim import toolstack
from xenblk_vhost.sim.toolstack import BackendKind, VbdConfig
from xenblk_vhost.sim.xenstored import serve_xenstored
from xenblk_vhost.xen.xenstore import open_xenstore


@asynccontextmanager
async def running_service(tmp_path: Path, configs, **kw):
    sock = str(tmp_path / "xs.sock")
    async with serve_xenstored(sock):
        async with open_xenstore(sock) as xs:
            await toolstack.create_dom0_nodes(xs)
            service = Service(xs, None, configs, **kw)
            async with trio.open_nursery() as nursery:
                yield xs, service, nursery
                nursery.cancel_scope.cancel()


async def start(nursery, service) -> None:
    await nursery.start(service.run)


async def wait_devices(service, n: int, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while len(service.devices) != n:
            await trio.sleep(0.01)


async def test_domains_by_name_and_by_domid_are_served_and_others_left_alone(tmp_path):
    img = disk_image(tmp_path)
    configs = [domain_config(tmp_path, "named", [f"vdev: xvda, driver: io_uring, path: {img}",
                                                 f"vdev: xvdc, driver: io_uring, path: {img}"]),
               domain_config(tmp_path, "7", [f"vdev: xvdb, driver: io_uring, path: {img}"], by="domid")]
    async with running_service(tmp_path, configs) as (xs, service, nursery):
        await toolstack.create_domain_nodes(xs, 3, "named")
        await toolstack.create_domain_nodes(xs, 7, "whatever-name")
        await toolstack.create_domain_nodes(xs, 9, "stranger")
        await start(nursery, service)
        named = await toolstack.attach_vbd(xs, 3, VbdConfig(vdev="xvda", target=str(img)))
        by_id = await toolstack.attach_vbd(xs, 7, VbdConfig(vdev="xvdb", target=str(img)))
        stranger = await toolstack.add_vbd(xs, 9, VbdConfig(vdev="xvda", target=str(img)))
        # vbd3 (backendtype=tap, Xen 4.19) is served too.
        tap = await toolstack.attach_vbd(xs, 3, VbdConfig(vdev="xvdc", target=str(img), kind=BackendKind.VBD3))
        await wait_devices(service, 3)
        assert set(service.devices) == {DeviceId(0, "vbd", 3, named.devid), DeviceId(0, "vbd", 7, by_id.devid),
                                        DeviceId(0, "vbd3", 3, tap.devid)}
        # Not ours: untouched (another backend may serve it).
        assert await read_text(xs, f"{stranger.backend}/state") == "1"
        assert await read_text(xs, f"{stranger.backend}/multi-queue-max-queues") is None


async def test_takeover_of_live_devices_and_no_restart_of_ended_ones(tmp_path):
    img = disk_image(tmp_path)
    configs = [domain_config(tmp_path, "g", [f"vdev: xvda, driver: io_uring, path: {img}",
                                             f"vdev: xvdb, driver: io_uring, path: {img}",
                                             f"vdev: xvdc, driver: io_uring, path: {img}"])]
    async with running_service(tmp_path, configs) as (xs, service, nursery):
        await toolstack.create_domain_nodes(xs, 4, "g")
        live = await toolstack.add_vbd(xs, 4, VbdConfig(vdev="xvda", target=str(img)))
        closing = await toolstack.add_vbd(xs, 4, VbdConfig(vdev="xvdb", target=str(img)))
        await xs.write(f"{live.backend}/state", "4")  # served by a backend that has since stopped
        await xs.write(f"{closing.backend}/state", "5")  # being torn down: not ours to touch
        await start(nursery, service)
        await wait_node(xs, f"{live.backend}/state", state_is(2))  # probed again, InitWait
        assert set(service.devices) == {DeviceId(0, "vbd", 4, live.devid)}
        assert await read_text(xs, f"{closing.backend}/state") == "5"

        # A device that ends (frontend gone) is not restarted while its dir stays...
        await xs.rm(live.frontend)
        await wait_devices(service, 0)
        await xs.write(f"{live.backend}/some-node", "poke")  # events on the dir change nothing
        await xs.write(f"{live.backend}/state", "2")
        await trio.sleep(0.2)
        assert service.devices == {}
        # ...until the toolstack makes it anew (state Initialising).
        await toolstack.destroy_device(xs, live)
        again = await toolstack.attach_vbd(xs, 4, VbdConfig(vdev="xvda", target=str(img)))
        assert again.backend == live.backend
        await wait_devices(service, 1)


async def test_a_failing_device_does_not_take_the_service_down(tmp_path, caplog):
    img = disk_image(tmp_path)
    configs = [domain_config(tmp_path, "a", [f"vdev: xvda, driver: io_uring, path: {img}"]),
               domain_config(tmp_path, "b", [f"vdev: xvda, driver: io_uring, path: {img}"])]
    async with running_service(tmp_path, configs) as (xs, service, nursery):
        await toolstack.create_domain_nodes(xs, 1, "a")
        await toolstack.create_domain_nodes(xs, 2, "b")
        bad = await toolstack.add_vbd(xs, 1, VbdConfig(vdev="xvda", target=str(img)))
        # A frontend path xenstored refuses to watch (a toolstack bug, say): the device task fails.
        await xs.write(f"{bad.backend}/frontend", "not a valid path!")
        await start(nursery, service)
        with trio.fail_after(10):
            while not any(f"vbd-1-{bad.devid}: device task failed" in r.getMessage() for r in caplog.records):
                await trio.sleep(0.01)
        assert service.devices == {}
        good = await toolstack.attach_vbd(xs, 2, VbdConfig(vdev="xvda", target=str(img)))
        assert await read_text(xs, f"{good.backend}/state") == "2"
        assert DeviceId(0, "vbd", 2, good.devid) in service.devices


async def test_reload_picks_up_a_newly_configured_domain(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="xenblk_vhost.backend.xenbus.service")
    img = disk_image(tmp_path)
    first = domain_config(tmp_path, "old", [f"vdev: xvda, driver: io_uring, path: {img}"])
    async with running_service(tmp_path, [first]) as (xs, service, nursery):
        await toolstack.create_domain_nodes(xs, 6, "new")
        await start(nursery, service)
        waiting = await toolstack.add_vbd(xs, 6, VbdConfig(vdev="xvda", target=str(img)))
        await trio.sleep(0.1)
        assert await read_text(xs, f"{waiting.backend}/state") == "1"
        service.reload([first, domain_config(tmp_path, "new", [f"vdev: xvda, driver: io_uring, path: {img}"])])
        await wait_node(xs, f"{waiting.backend}/state", state_is(2))
        assert "configuration reloaded: 2 domain(s)" in caplog.text


async def test_a_driver_domain_serves_its_own_backend_path(tmp_path):
    """Backend domid 0 unless told: here a driver domain, domid 8, writes under its own home."""
    img = disk_image(tmp_path)
    configs = [domain_config(tmp_path, "g", [f"vdev: xvda, driver: io_uring, path: {img}"])]
    async with running_service(tmp_path, configs, backend_domid=8) as (xs, service, nursery):
        await toolstack.create_domain_nodes(xs, 8, "driver-domain")
        await toolstack.create_domain_nodes(xs, 5, "g")
        await start(nursery, service)
        vbd = await toolstack.attach_vbd(xs, 5, VbdConfig(vdev="xvda", target=str(img), backend_domid=8))
        assert vbd.backend.startswith("/local/domain/8/backend/vbd/5/")
        assert set(service.devices) == {DeviceId(8, "vbd", 5, vbd.devid)}
