"""Device: one backend dir's xenbus life, against the simulated xenstored and a real file.

No hypervisor here: these cases end before any ring is mapped (probe,
errors, teardown races); the end-to-end tests (test_e2e_*.py) connect.
"""

from __future__ import annotations

import errno
import logging
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

from e2e_support.fixtures import disk_image, read_text, state_is, tree, wait_node
from xenblk_vhost.backend.xenbus.device import Device, DeviceId, ToolstackNodes, _Wakeup, effective_disk, next_tick
from xenblk_vhost.backend.xenbus.guest_warnings import GuestWarnings
from xenblk_vhost.config import DiskConfig
from xenblk_vhost.sim import toolstack
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.xenstored import serve_xenstored
from xenblk_vhost.xen.xenbus import XenbusState
from xenblk_vhost.xen.xenstore import open_xenstore

DOMID = 5


@asynccontextmanager
async def xenstore(tmp_path: Path):
    sock = str(tmp_path / "xs.sock")
    async with serve_xenstored(sock):
        async with open_xenstore(sock) as xs:
            await toolstack.create_dom0_nodes(xs)
            await toolstack.create_domain_nodes(xs, DOMID, "guest")
            yield xs


def disk(path, **kw) -> DiskConfig:
    return DiskConfig(vdev=51712, driver="io_uring", path=str(path), **kw)


def device_for(xs, vbd, resolved, **kw) -> Device:
    async def resolve():
        return resolved

    did = DeviceId(0, vbd.kind.value, vbd.domid, vbd.devid)
    return Device(xs, None, did, resolve, warnings=GuestWarnings(logging.getLogger("test.guest")), **kw)


async def test_probe_publishes_the_features_with_initwait_in_one_transaction(tmp_path):
    img = disk_image(tmp_path)
    async with xenstore(tmp_path) as xs:
        vbd = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target=str(img)))
        seen_at_initwait = {}

        async def frontend_view() -> None:
            # What a frontend reads the moment it sees InitWait.
            async with xs.watch(f"{vbd.backend}/state") as events:
                async for _ in events:
                    if await read_text(xs, f"{vbd.backend}/state") == "2":
                        seen_at_initwait.update(await tree(xs, vbd.backend))
                        return

        device = device_for(xs, vbd, disk(img, queues=3, ring_page_order=1, max_indirect_segments=32,
                                          data_path="map"))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(device.run)
                await frontend_view()
                assert device.state is XenbusState.INIT_WAIT
                nursery.cancel_scope.cancel()
        assert {k: seen_at_initwait.get(k) for k in ("multi-queue-max-queues", "max-ring-page-order",
                                                      "feature-max-indirect-segments", "feature-persistent")} == \
            {"multi-queue-max-queues": "3", "max-ring-page-order": "1", "feature-max-indirect-segments": "32",
             "feature-persistent": "1"}
        assert device.vbd is None  # the storage was closed on the way out


async def test_no_configured_disk_is_reported_as_xenbus_dev_fatal_does(tmp_path):
    async with xenstore(tmp_path) as xs:
        vbd = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvdq", target="/dev/whatever"))
        device = device_for(xs, vbd, None)
        async with trio.open_nursery() as nursery:
            await nursery.start(device.run)
            assert await read_text(xs, f"{vbd.backend}/state") == "5"
            error_path = f"/local/domain/0/error/backend/vbd/{DOMID}/{vbd.devid}/error"
            report = f"{errno.ENODEV} no disk configured for this domain as xvdq (device {vbd.devid})"
            assert await read_text(xs, error_path) == report
            assert await read_text(xs, f"{vbd.backend}/error") == report  # where the frontend can read it
            # The frontend follows to Closed; the device stays (online=1) and says Closed.
            await xs.write(f"{vbd.frontend}/state", "6")
            await wait_node(xs, f"{vbd.backend}/state", state_is(6))
            # xl block-detach: online=0 while Closed -> forgotten; libxl removes the nodes.
            assert await toolstack.detach_vbd(xs, vbd, timeout=5) is toolstack.DetachOutcome.CLOSED
        # run() returned by itself (the nursery closed without cancelling it); the report went with the
        # device, and so did the dirs it had made under error/.
        assert await tree(xs, "/local/domain/0/error") == {}


async def test_storage_that_cannot_be_opened_is_reported(tmp_path):
    img = disk_image(tmp_path)
    async with xenstore(tmp_path) as xs:
        vbd = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target=str(img)))
        img.unlink()  # validated when the config was loaded, gone by the time the guest starts
        device = device_for(xs, vbd, disk(img))
        async with trio.open_nursery() as nursery:
            await nursery.start(device.run)
            error = await read_text(xs, f"/local/domain/0/error/backend/vbd/{DOMID}/{vbd.devid}/error")
            assert error.startswith(f"{errno.ENOENT} creating vbd structure: ")
            assert await read_text(xs, f"{vbd.backend}/state") == "5"
            nursery.cancel_scope.cancel()


async def test_a_device_detached_before_its_probe_is_not_brought_back(tmp_path):
    """libxl wrote online=0 and Closing before we looked: no InitWait over it; when
    the forced removal takes the frontend away, Closed, as xenbus_dev_remove does."""
    img = disk_image(tmp_path)
    async with xenstore(tmp_path) as xs:
        vbd = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target=str(img)))
        await xs.write(f"{vbd.backend}/online", "0")
        await xs.write(f"{vbd.backend}/state", "5")
        device = device_for(xs, vbd, disk(img))
        async with trio.open_nursery() as nursery:
            await nursery.start(device.run)
            assert await read_text(xs, f"{vbd.backend}/state") == "5"
            assert await read_text(xs, f"{vbd.backend}/multi-queue-max-queues") is None
            await xs.rm(vbd.frontend)
            await wait_node(xs, f"{vbd.backend}/state", state_is(6))


async def test_removed_backend_dir_ends_the_device_without_writing_anything_back(tmp_path):
    img = disk_image(tmp_path)
    async with xenstore(tmp_path) as xs:
        vbd = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target=str(img)))
        device = device_for(xs, vbd, disk(img))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(device.run)
                await xs.rm(vbd.backend)
        assert await tree(xs, vbd.backend) == {}  # no node re-created by a late write
        assert device.vbd is None


@pytest.mark.parametrize("garbage", ["banana", "", "99"])
async def test_an_unreadable_frontend_state_is_unknown_and_the_device_goes(tmp_path, garbage):
    """xenbus_read_driver_state: what does not parse is Unknown: blkback unregisters."""
    img = disk_image(tmp_path)
    async with xenstore(tmp_path) as xs:
        vbd = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target=str(img)))
        device = device_for(xs, vbd, disk(img))
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(device.run)
                await xs.write(f"{vbd.frontend}/state", garbage)
        assert device.vbd is None and device.state is XenbusState.INIT_WAIT


def test_effective_disk_mode_and_discard_enable():
    base = DiskConfig(vdev=51712, driver="io_uring", path="/x")
    rw = ToolstackNodes("/fe", 5, "", "w", cdrom=False, discard_enable=True)
    assert effective_disk(base, rw) is base
    ro = effective_disk(base, ToolstackNodes("/fe", 5, "", "r", cdrom=False, discard_enable=True))
    assert ro.readonly and ro.discard
    assert effective_disk(base.__class__(**{**base.__dict__, "readonly": True}), rw).readonly  # config wins
    no_discard = effective_disk(base, ToolstackNodes("/fe", 5, "", "w", cdrom=False, discard_enable=False))
    assert not no_discard.discard and not no_discard.readonly
    assert not effective_disk(base.__class__(**{**base.__dict__, "discard": False}), rw).discard


def test_resize_polls_tick_on_multiples_of_their_interval():
    assert next_tick(0.0, 1.0) == 1.0
    assert next_tick(0.999, 1.0) == 1.0
    assert next_tick(1.0, 1.0) == 2.0  # (after now: never a tick of zero length)
    assert next_tick(7.3, 0.5) == 7.5


async def test_devices_started_apart_poll_on_the_same_ticks(autojump_clock):
    """Two control loops that started 0.3 s apart wake on the same instants of trio's clock: the service's
    loop wakes once a tick for all its devices, not once per device."""
    woke: dict[str, list[float]] = {"a": [], "b": []}

    async def poller(name: str) -> None:
        wakeup = _Wakeup()
        for _ in range(3):
            assert not await wakeup.wait_until(next_tick(trio.current_time(), 1.0))
            woke[name].append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(poller, "a")
        await trio.sleep(0.3)
        nursery.start_soon(poller, "b")
    assert woke["a"] == woke["b"] == [1.0, 2.0, 3.0]


async def test_a_set_wakes_the_poll_before_its_tick(autojump_clock):
    wakeup = _Wakeup()

    async def later() -> None:
        await trio.sleep(0.25)
        wakeup.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(later)
        assert await wakeup.wait_until(next_tick(trio.current_time(), 1.0))
        assert trio.current_time() == 0.25


def test_a_connections_end_logs_what_it_served_and_the_engines_kernel_calls(caplog):
    """One line per connection: the requests by kind, the engine's share, and its kernel calls per request it
    took (what each costs a PV dom0); none taken: 0.00, no division by zero; the persistent grants mapped."""
    from types import SimpleNamespace
    totals = {"rd_req": 6, "wr_req": 4, "f_req": 1, "ds_req": 0, "errors": 0, "engine_req": 8, "poll_req": 7,
              "poll_returns": 2, "engine_syscalls": 44, "engine_sleeps": 9, "persistent_grants": 35,
              "copy_segs_mapped": 30, "copy_segs_xen": 6}
    with caplog.at_level(logging.INFO, logger="xenblk_vhost.backend.xenbus.device"):
        Device._log_served(SimpleNamespace(name="d5/51712"), totals)
        Device._log_served(SimpleNamespace(name="d6/51712"), {k: 0 for k in totals})
    first, second = (r.getMessage() for r in caplog.records)
    assert "served 11 requests (6 reads, 4 writes, 1 flushes, 0 discards; 0 errors)" in first
    assert "took 8 of them, 7 in its own poll" in first
    assert first.endswith("it made 44 kernel calls (5.50 a request), 9 of them sleeps; 35 persistent grants mapped, "
                          "30 of its 36 grant-copy segments copied from them")
    assert second.endswith("it made 0 kernel calls (0.00 a request), 0 of them sleeps; 0 persistent grants mapped, "
                           "0 of its 0 grant-copy segments copied from them")
