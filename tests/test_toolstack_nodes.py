"""The toolstack writes what libxl writes: nodes, values, permissions, teardown.

The expected node sets below are transcribed from libxl (xen c447b7308b):
libxl_disk.c:383-504 (device_disk_add), libxl_device.c:148-297
(libxl__device_generic_add), libxl_create.c:795-923 (libxl__domain_make).
They run against the simulated xenstored, whose permission checks are the
C xenstored's, and the guest-side checks connect as the guest domain.
"""

import errno

import pytest
import trio
import trio.testing

from xenblk_vhost.sim import toolstack
from xenblk_vhost.sim.toolstack import BackendKind, DetachOutcome, VbdConfig
from xenblk_vhost.sim.xenstore_guest import open_guest_xenstore
from xenblk_vhost.xen.interfaces import Permission, XenStoreError
from xenblk_vhost.xen.xenstore import open_xenstore

DOMID = 5
XVDA = 51712


def perm(text):
    return Permission.decode(text)


@pytest.fixture
async def xs(xenstored):
    async with open_xenstore(xenstored.socket_path) as client:
        await toolstack.create_dom0_nodes(client)
        await toolstack.create_domain_nodes(client, DOMID, "guest5", uuid="00000000-0000-0000-0000-000000000005")
        yield client


async def values_below(xs, path):
    """{relative path: value} of every node below path (not path itself)."""
    out = {}

    async def walk(p, rel):
        for name in await xs.directory(p):
            child, crel = f"{p}/{name}", f"{rel}{name}"
            out[crel] = (await xs.read(child)).decode()
            await walk(child, crel + "/")

    await walk(path, "")
    return out


async def perms_below(xs, path):
    out = {"": [p.encode() for p in await xs.get_perms(path)]}
    for rel in await values_below(xs, path):
        out[rel] = [p.encode() for p in await xs.get_perms(f"{path}/{rel}")]
    return out


async def test_phy_vbd_nodes_are_libxls(xs):
    paths = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target="/srv/disk.img"))
    assert paths.frontend == "/local/domain/5/device/vbd/51712"
    assert paths.backend == "/local/domain/0/backend/vbd/5/51712"
    assert paths.libxl == "/libxl/5/device/vbd/51712"
    backend = {
        "frontend": paths.frontend, "params": "/srv/disk.img", "script": "/etc/xen/scripts/block",
        "frontend-id": "5", "online": "1", "removable": "0", "bootable": "1", "state": "1",
        "dev": "xvda", "type": "phy", "mode": "w", "device-type": "disk", "discard-enable": "1",
        "specification": "xen",
    }
    assert await values_below(xs, paths.backend) == backend
    assert await values_below(xs, paths.frontend) == {
        "backend": paths.backend, "backend-id": "0", "state": "1", "virtual-device": "51712",
        "device-type": "disk", "trusted": "1",
    }
    libxl_copy = dict(backend, backend=paths.backend)
    assert await values_below(xs, paths.libxl) == libxl_copy
    # Frontend: owned by the guest, readable by the backend domain, on every node.
    assert set(map(tuple, (await perms_below(xs, paths.frontend)).values())) == {("n5", "r0")}
    # Backend: owned by the backend domain, readable by the guest; nodes inherit.
    assert set(map(tuple, (await perms_below(xs, paths.backend)).values())) == {("n0", "r5")}


async def test_readonly_cdrom_pv_tap_and_qdisk_variants(xs):
    ro = VbdConfig(vdev="xvdb", target="/srv/ro.iso", readwrite=False, is_cdrom=True, removable=True,
                   trusted=False, direct_io_safe=True, domain_type="pv", native_protocol="x86_32-abi")
    paths = await toolstack.add_vbd(xs, DOMID, ro)
    be = await values_below(xs, paths.backend)
    assert (be["mode"], be["device-type"], be["removable"], be["discard-enable"], be["direct-io-safe"]) == (
        "r", "cdrom", "1", "0", "1")
    fe = await values_below(xs, paths.frontend)
    assert (fe["trusted"], fe["device-type"], fe["protocol"]) == ("0", "cdrom", "x86_32-abi")

    tap = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvdc", target="/srv/t.img", kind=BackendKind.VBD3))
    assert tap.backend == "/local/domain/0/backend/vbd3/5/51744"
    be = await values_below(xs, tap.backend)
    assert (be["params"], be["script"], be["type"]) == ("aio:/srv/t.img", "/etc/xen/scripts/block-tap", "vbd3")

    qd = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvdd", target="/srv/q.qcow2", kind="qdisk",
                                                       format="qcow2", discard_enable=False))
    be = await values_below(xs, qd.backend)
    assert (be["params"], be["type"], be["discard-enable"]) == ("qcow2:/srv/q.qcow2", "qdisk", "0")
    assert "script" not in be
    # The frontend dir is device/vbd whatever the backend kind.
    assert qd.frontend == "/local/domain/5/device/vbd/51760"


async def test_adding_the_same_device_twice_is_refused(xs):
    cfg = VbdConfig(vdev="xvda", target="/srv/disk.img")
    await toolstack.add_vbd(xs, DOMID, cfg)
    with pytest.raises(toolstack.DeviceExists):
        await toolstack.add_vbd(xs, DOMID, cfg)


async def test_guest_sees_what_the_permissions_allow(xs, xenstored):
    paths = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target="/srv/disk.img"))
    async with open_guest_xenstore(DOMID, xenstored.socket_path) as guest:
        assert await guest.read(f"{paths.backend}/params") == b"/srv/disk.img"
        await guest.write(f"{paths.frontend}/state", "3")
        await guest.write(f"{paths.frontend}/ring-ref", "8")  # new nodes in its own dir
        for forbidden in (f"{paths.backend}/state", f"{paths.backend}/new"):
            with pytest.raises(XenStoreError) as e:
                await guest.write(forbidden, "4")
            assert e.value.errno == errno.EACCES
        with pytest.raises(XenStoreError) as e:
            await guest.read(f"{paths.libxl}/params")
        assert e.value.errno == errno.EACCES
        with pytest.raises(XenStoreError) as e:
            await guest.write("/local/domain/5/name", "evil")
        assert e.value.errno == errno.EACCES
        await guest.write("/local/domain/5/control/shutdown", "poweroff")
        await guest.write("/local/domain/5/data/anything", "x")
    # and dom0 (the backend here) reads what the guest wrote
    assert await xs.read(f"{paths.frontend}/ring-ref") == b"8"


async def test_domain_nodes_and_permissions(xs):
    dom = "/local/domain/5"
    assert [p.encode() for p in await xs.get_perms(dom)] == ["n0", "r5"]
    assert [p.encode() for p in await xs.get_perms("/libxl/5")] == ["n0"]
    assert await xs.read(f"{dom}/vm") == b"/vm/00000000-0000-0000-0000-000000000005"
    assert await xs.read("/vm/00000000-0000-0000-0000-000000000005/name") == b"guest5"
    assert await xs.read(f"{dom}/name") == b"guest5"
    assert await xs.read(f"{dom}/domid") == b"5"
    assert await xs.read("/libxl/5/type") == b"pvh"
    owned_by_guest = ["control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                      "control/feature-suspend", "control/sysrq", "data", "drivers", "feature",
                      "attr", "error", "device/suspend/event-channel"]
    for node in owned_by_guest:
        assert [p.encode() for p in await xs.get_perms(f"{dom}/{node}")] == ["n5"], node
    for node in ("cpu", "memory", "device", "control"):
        assert [p.encode() for p in await xs.get_perms(f"{dom}/{node}")] == ["n0", "r5"], node
    assert await xs.read("/local/domain/0/name") == b"Domain-0"
    assert await xs.is_domain_introduced(DOMID)


async def fake_backend(xs, paths, *, answer_closing=True, seen=None):
    """Answers InitWait at once and Closed when libxl writes Closing."""
    await xs.write(f"{paths.backend}/state", "2")
    async with xs.watch(f"{paths.backend}/state") as events:
        async for _ in events:
            state = await toolstack.read_or_none(xs, f"{paths.backend}/state")
            if state == "5":
                if seen is not None:
                    seen.append(await xs.read(f"{paths.backend}/online"))
                if answer_closing:
                    await xs.write(f"{paths.backend}/state", "6")
            if state is None:
                return


async def test_attach_waits_for_init_wait_and_detach_for_closed(xs):
    seen = []
    async with trio.open_nursery() as nursery:
        cfg = VbdConfig(vdev="xvda", target="/srv/disk.img")
        paths = toolstack.vbd_paths(DOMID, cfg.devid)
        nursery.start_soon(_start_backend_when_added, xs, paths, seen)
        paths = await toolstack.attach_vbd(xs, DOMID, cfg, timeout=5)
        assert await xs.read(f"{paths.backend}/state") == b"2"
        assert await toolstack.detach_vbd(xs, paths, timeout=5) is DetachOutcome.CLOSED
    assert seen == [b"0"]  # online=0 was already written when Closing arrived
    for p in (paths.frontend, paths.backend, paths.libxl):
        assert not await xs.exists(p)
    # Emptied parents go too (libxl__xs_path_cleanup); dom0's own nodes stay.
    assert not await xs.exists("/local/domain/0/backend")
    assert not await xs.exists("/libxl/5/device/vbd")
    assert not await xs.exists("/libxl/5/device")  # mknod left it empty: cleaned up too
    assert await xs.read("/libxl/5/type") == b"pvh"
    assert await xs.read("/local/domain/0/name") == b"Domain-0"


async def _start_backend_when_added(xs, paths, seen):
    async with xs.watch(paths.backend) as events:
        async for _ in events:
            if await xs.exists(f"{paths.backend}/state"):
                break
    await fake_backend(xs, paths, seen=seen)


async def test_attach_times_out_without_a_backend_but_qdisk_does_not_wait(xs):
    with pytest.raises(toolstack.DeviceTimeout):
        await toolstack.attach_vbd(xs, DOMID, VbdConfig(vdev="xvda", target="/x"), timeout=0.2)
    paths = await toolstack.attach_vbd(xs, DOMID, VbdConfig(vdev="xvdb", target="/x", kind="qdisk"), timeout=0.2)
    assert await xs.read(f"{paths.backend}/state") == b"1"


async def test_detach_of_a_silent_backend_is_forced_after_two_timeouts(xs):
    paths = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target="/x"))
    states = []

    async def record():
        async with xs.watch(f"{paths.backend}/state") as events:
            async for _ in events:
                states.append(await toolstack.read_or_none(xs, f"{paths.backend}/state"))
                if states[-1] is None:
                    return

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(record)
            await trio.testing.wait_all_tasks_blocked()
            assert await toolstack.detach_vbd(xs, paths, timeout=0.2) is DetachOutcome.FORCED
    # Four events: the registration's, Closing, Closing again in the forced
    # round, the removal. (Values are read when an event is handled, so a
    # slow reader may see a later value; the events themselves are certain.)
    assert len(states) == 4 and states[0] == "1" and states[1] in ("5", None) and states[-1] is None
    for p in (paths.frontend, paths.backend, paths.libxl):
        assert not await xs.exists(p)


async def test_detach_of_a_closed_backend_does_not_rewrite_state(xs):
    paths = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target="/x"))
    await xs.write(f"{paths.backend}/state", "6")
    assert await toolstack.detach_vbd(xs, paths, timeout=5) is DetachOutcome.CLOSED
    assert not await xs.exists(paths.frontend)


async def test_detach_with_the_backend_gone_cleans_up_the_frontend(xs):
    paths = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target="/x"))
    await xs.rm(paths.backend)
    assert await toolstack.detach_vbd(xs, paths, timeout=5) is DetachOutcome.BACKEND_GONE
    assert not await xs.exists(paths.frontend)
    assert not await xs.exists(paths.libxl)


async def test_destroy_domain_removes_devices_and_domain_trees(xs):
    a = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvda", target="/a"))
    b = await toolstack.add_vbd(xs, DOMID, VbdConfig(vdev="xvdb", target="/b"))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fake_backend, xs, a)
        nursery.start_soon(fake_backend, xs, b)
        await trio.testing.wait_all_tasks_blocked()
        outcomes = await toolstack.destroy_domain(xs, DOMID, timeout=5)
    assert outcomes == {a.devid: DetachOutcome.CLOSED, b.devid: DetachOutcome.CLOSED}
    for p in ("/local/domain/5", "/vm/00000000-0000-0000-0000-000000000005", "/libxl/5", a.backend, b.backend):
        assert not await xs.exists(p), p
