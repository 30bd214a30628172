"""End to end: a hostile frontend's transport nodes, while another guest is served.

The hostile guest writes its frontend nodes itself (through its own,
unprivileged xenstore connection) and switches to Initialised; each bad
value must end with blkback's error report ("<errno> <message>" in
/local/domain/0/error/backend/vbd/<domid>/<devid>/error, and in the backend
dir's `error`) and the device in Closing, the guest able to close and try again, nothing leaked, the log
not flooded, and the other guest's disk served throughout.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NamedTuple

import trio

from e2e_support.fixtures import backend_service, disk_image, domain_config, read_text, state_is, wait_node
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.backend.xenbus.guest_warnings import GuestWarnings
from xenblk_vhost.sim.blkfront import open_blkfront
from xenblk_vhost.sim.blkfront_config import BlkfrontOptions
from xenblk_vhost.sim.guest import Guest
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world
from xenblk_vhost.sim.xenstore_guest import open_guest_xenstore

TRANSPORT_KEYS = ("protocol", "feature-persistent", "multi-queue-num-queues", "ring-page-order", "ring-ref",
                  "ring-ref0", "event-channel", "queue-0", "queue-1")

# (nodes the guest writes, the error node's expected text). The backend offers
# 4 queues and ring order 4 (the config's defaults) and no persistent grants.
HOSTILE = [
    ({"ring-ref": "banana", "event-channel": "7"},
     f"{errno.EINVAL} reading {{fe}}/ring-ref: 'banana' is not an unsigned integer"),
    ({"ring-ref": "-1", "event-channel": "7"},
     f"{errno.EINVAL} reading {{fe}}/ring-ref: '-1' is not an unsigned integer"),
    ({"ring-ref": "4294967296", "event-channel": "7"},
     f"{errno.EINVAL} reading {{fe}}/ring-ref: 4294967296 is out of range (max 4294967295)"),
    ({"ring-ref": "9", "event-channel": "0"},
     f"{errno.EINVAL} reading {{fe}}/event-channel: port 0 is never valid"),
    ({"ring-ref": "9"}, f"{errno.EINVAL} reading {{fe}}/event-channel: missing"),
    ({"multi-queue-num-queues": "5", "queue-0/ring-ref": "9", "queue-0/event-channel": "7"},
     f"{errno.ENOSYS} guest requested 5 queues, exceeding the maximum of 4."),
    ({"multi-queue-num-queues": "0", "ring-ref": "9", "event-channel": "7"},
     f"{errno.ENOSYS} guest requested 0 queues, exceeding the maximum of 4."),
    ({"ring-page-order": "5", "ring-ref0": "9", "event-channel": "7"},
     f"{errno.EINVAL} requested ring page order 5 exceed max:4"),
    ({"protocol": "arm-abi", "ring-ref": "9", "event-channel": "7"},
     f"{errno.ENOSYS} unknown fe protocol 'arm-abi'"),
    ({"protocol": "x86_64-abi\nINJECTED LOG LINE", "ring-ref": "9", "event-channel": "7"},
     f"{errno.ENOSYS} unknown fe protocol 'x86_64-abi\\nINJECTED LOG LINE'"),
    ({"multi-queue-num-queues": "2", "queue-0/ring-ref": "9", "queue-0/event-channel": "7",
      "queue-1/event-channel": "8"},
     f"{errno.EINVAL} reading {{fe}}/queue-1/ring-ref: missing"),
    # Fewer ring refs than the order says.
    ({"ring-page-order": "2", "ring-ref0": "9", "ring-ref1": "10", "ring-ref2": "11", "event-channel": "7"},
     f"{errno.EINVAL} reading {{fe}}/ring-ref3: missing"),
    ({"ring-ref": "9", "event-channel": "4294967296"},
     f"{errno.EINVAL} reading {{fe}}/event-channel: 4294967296 is out of range (max 131071)"),
    ({"multi-queue-num-queues": "99999999999999999999", "ring-ref": "9", "event-channel": "7"},
     f"{errno.EINVAL} reading {{fe}}/multi-queue-num-queues: "),
    # Well-formed, but ref 9 was never granted to us: the map fails in the hypervisor.
    ({"ring-ref": "9", "event-channel": "7"}, f"{errno.EINVAL} mapping ring-ref port 7: "),
]


class TwoGuests(NamedTuple):
    world: Any
    service: Any
    mallory: Any
    alice: Any
    bad: Any  # mallory's vbd (the hostile frontend's)
    good: Any  # alice's vbd, served throughout


@asynccontextmanager
async def mallory_and_alice(tmp_path, **service_kw) -> AsyncIterator[TwoGuests]:
    """One service, two guests with an io_uring disk xvda each: mallory (hostile) and alice."""
    bad_img, good_img = disk_image(tmp_path, "bad.img"), disk_image(tmp_path, "good.img")
    configs = [domain_config(tmp_path, "mallory", [f"vdev: xvda, driver: io_uring, path: {bad_img}"]),
               domain_config(tmp_path, "alice", [f"vdev: xvda, driver: io_uring, path: {good_img}"])]
    async with open_world(tmp_path / "w") as world:
        mallory = await world.create_guest("mallory")
        alice = await world.create_guest("alice")
        async with backend_service(world, configs, **service_kw) as service:
            bad = await world.attach_vbd(mallory.domid, VbdConfig(vdev="xvda", target=str(bad_img)))
            good = await world.attach_vbd(alice.domid, VbdConfig(vdev="xvda", target=str(good_img)))
            yield TwoGuests(world, service, mallory, alice, bad, good)


async def cycle_to_initwait(gxs, fe: str, be: str, dom0) -> None:
    """The guest closes after the failure and starts over, as blkfront would."""
    await gxs.write(f"{fe}/state", "6")
    await wait_node(dom0, f"{be}/state", state_is(6))
    for key in TRANSPORT_KEYS:
        await gxs.rm(f"{fe}/{key}")
    await gxs.write(f"{fe}/state", "1")
    await wait_node(dom0, f"{be}/state", state_is(2))


async def test_hostile_transport_nodes_are_refused_with_blkbacks_errors_while_others_are_served(tmp_path, caplog):
    frozen = 0.0  # the rate limiter's clock does not move: only the burst gets through
    warnings = GuestWarnings(logging.getLogger("test.guest"), burst=3, clock=lambda: frozen)
    caplog.set_level(logging.WARNING, logger="test.guest")
    async with mallory_and_alice(tmp_path, warnings=warnings) as (world, service, mallory, alice, bad, good):
        error_node = f"/local/domain/0/error/backend/vbd/{mallory.domid}/{bad.devid}/error"
        async with frontend_agent(world, alice.domid, good.devid) as alice_fe:
            await alice_fe.call("connect")
            async with open_guest_xenstore(mallory.domid, world.xenstore_path) as gxs:
                for nodes, expected in HOSTILE:
                    for key, value in nodes.items():
                        await gxs.write(f"{bad.frontend}/{key}", value)
                    await gxs.write(f"{bad.frontend}/state", "3")
                    await wait_node(world.xs, f"{bad.backend}/state", state_is(5))
                    text = await read_text(world.xs, error_node)
                    assert text.startswith(expected.format(fe=bad.frontend)), (nodes, text)
                    assert await read_text(world.xs, f"{bad.backend}/error") == text
                    # The other guest keeps its disk through all of it.
                    await alice_fe.call("write", sector=64, sectors=8, seed=len(text))
                    assert (await alice_fe.call("verify", sector=64, sectors=8, seed=len(text)))["equal"]
                    await cycle_to_initwait(gxs, bad.frontend, bad.backend, world.xs)
                    # A new attempt starts with a clean slate.
                    assert await read_text(world.xs, f"{bad.backend}/error") is None
                    assert await read_text(world.xs, error_node) is None

                # A state no frontend may be in: fatal, as blkback's default case.
                await gxs.write(f"{bad.frontend}/state", "7")
                await wait_node(world.xs, f"{bad.backend}/state", state_is(5))
                assert await read_text(world.xs, error_node) == f"{errno.EINVAL} saw state 7 at frontend"

            [device] = [d for d in service.devices.values() if d.id.frontend_domid == mallory.domid]
            assert device.vbd is not None and not device.vbd.serving  # no ring left half set up
            assert (await alice_fe.call("close"))["errors"] == []

    guest_lines = [r.getMessage() for r in caplog.records if r.name == "test.guest"]
    assert len(guest_lines) == 3  # 13 failures, a burst of 3 lines, the rest counted
    assert warnings.suppressed(mallory.domid) == len(HOSTILE) + 1 - 3
    assert all("\n" not in line for line in guest_lines)  # the guest's bytes cannot forge log lines


async def test_state_flapping_and_a_second_connected_leave_the_ring_and_the_neighbour_alone(tmp_path):
    """A connected guest that rewrites its state (Connected again, Initialised,
    Initialising, a burst of flapping) and scribbles over its ring nodes while
    connected: blkback ignores all of it (frontend_changed: Initialised or
    Connected while Connected is no news; Initialising only counts when the
    backend is Closed; the ring nodes are read once, at connect). The ring
    keeps serving, nothing more is mapped, and the other guest is served."""
    async with mallory_and_alice(tmp_path) as (world, service, mallory, alice, bad, good):
        gntdev = service._platform.gntdev
        guest = Guest.attach(world.hypervisor_path, mallory.domid)
        try:
            async with frontend_agent(world, alice.domid, good.devid) as alice_fe, \
                    open_guest_xenstore(mallory.domid, world.xenstore_path) as gxs, \
                    open_blkfront(gxs, guest, bad.devid, BlkfrontOptions(max_queues=1)) as front:
                await alice_fe.call("connect")
                [device] = [d for d in service.devices.values() if d.id.frontend_domid == mallory.domid]

                def ring_maps() -> int:
                    """Mallory's pages mapped, her persistent grants aside (her data pages, kept mapped)."""
                    kept = device.vbd.stats()["total"]["persistent_grants"] if device.vbd is not None else 0
                    return sum(1 for m in gntdev._maps if m.domid == mallory.domid) - kept

                maps = ring_maps()
                await front.write(0, b"a" * 4096)
                fe = bad.frontend
                sequences = [["4"], ["3", "4"], ["1", "4"], ["3", "1", "3", "4", "3", "4"]]
                for n, states in enumerate(sequences):
                    for state in states:
                        await gxs.write(f"{fe}/state", state)
                    await gxs.write(f"{fe}/ring-ref", "9")  # no longer what is mapped
                    await gxs.write(f"{fe}/event-channel", "1")
                    await trio.sleep(0.2)  # let the backend see every write
                    assert await read_text(world.xs, f"{bad.backend}/state") == "4"
                    data = bytes([n]) * 4096
                    await front.write(8, data)
                    assert await front.read(8, 8) == data
                    await alice_fe.call("write", sector=64, sectors=8, seed=n)
                    assert (await alice_fe.call("verify", sector=64, sectors=8, seed=n))["equal"]
                    assert ring_maps() == maps
                assert front.errors == []
                assert (await alice_fe.call("close"))["errors"] == []
        finally:
            guest.close()


async def test_a_valid_ring_with_a_bogus_event_channel_is_refused_unmapped_and_the_guest_can_retry(tmp_path):
    """The ring page is granted and maps; only the port is wrong: never allocated, allocated for
    another domain (alice), the highest valid number (never allocated), a port already bound.
    Each connect is refused as blkback's connect_ring does (EINVAL, "mapping ring-ref port N",
    Closing), the ring page is unmapped at once (mallory's grant can be ended: no mapping left),
    the other guest is served meanwhile, and the same frontend then connects with a real
    channel and does I/O."""
    async with mallory_and_alice(tmp_path) as (world, service, mallory, alice, bad, good):
        gntdev = service._platform.gntdev
        error_node = f"/local/domain/0/error/backend/vbd/{mallory.domid}/{bad.devid}/error"
        guest = Guest.attach(world.hypervisor_path, mallory.domid)
        try:
            for_alice = guest.alloc_unbound(remote_domid=alice.domid)
            taken = guest.alloc_unbound(remote_domid=0)
            async with frontend_agent(world, alice.domid, good.devid) as alice_fe, \
                    open_guest_xenstore(mallory.domid, world.xenstore_path) as gxs:
                await alice_fe.call("connect")
                [frame] = guest.alloc_pages(1)
                bogus = [(1000, "has no port 1000"),
                         (for_alice.local_port, "is not unbound for domain 0"),
                         (131071, "has no port 131071"),
                         (taken.local_port, "is not unbound for domain 0")]
                for n, (port, why) in enumerate(bogus):
                    if port == taken.local_port:  # bound by someone first: dom0 here, as a second backend
                        service._platform.evtchn.bind_interdomain(mallory.domid, port)
                    ref = guest.grant_access(frame, 0, readonly=False)  # a valid one-page ring
                    await gxs.write(f"{bad.frontend}/ring-ref", str(ref))
                    await gxs.write(f"{bad.frontend}/event-channel", str(port))
                    await gxs.write(f"{bad.frontend}/state", "3")
                    await wait_node(world.xs, f"{bad.backend}/state", state_is(5))
                    text = await read_text(world.xs, error_node)
                    assert text.startswith(f"{errno.EINVAL} mapping ring-ref port {port}: "), text
                    assert "cannot bind event channel" in text and why in text, text
                    assert not [m for m in gntdev._maps if m.domid == mallory.domid]
                    assert guest.end_access(ref)  # nothing of the backend holds the ring page
                    await alice_fe.call("write", sector=64, sectors=8, seed=n)
                    assert (await alice_fe.call("verify", sector=64, sectors=8, seed=n))["equal"]
                    await cycle_to_initwait(gxs, bad.frontend, bad.backend, world.xs)
                guest.free_pages([frame])
                # The guest retries with a port it allocated for us: served.
                async with open_blkfront(gxs, guest, bad.devid, BlkfrontOptions(max_queues=1)) as front:
                    await front.write(0, b"m" * 4096)
                    assert await front.read(0, 8) == b"m" * 4096
                    assert front.errors == []
                assert (await alice_fe.call("close"))["errors"] == []
        finally:
            guest.close()
