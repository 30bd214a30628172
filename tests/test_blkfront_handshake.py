"""The reference frontend's xenbus handshake, node by node, against Linux blkfront.

What Linux xen-blkfront writes (talk_to_blkback, drivers/block/xen-blkfront.c
6.x), in one transaction before switching to Initialised:
    ring-page-order            only when more than one ring page
    ring-ref | ring-ref<i>     per ring, at the top for one queue,
    event-channel              under queue-<n>/ for several
    multi-queue-num-queues     only for several queues
    protocol                   XEN_IO_PROTO_ABI_NATIVE ("x86_64-abi" on x86_64)
    feature-persistent         the module parameter (default 1)
and then state 3, later 4; on close 5 and 6. The toolstack's frontend nodes
(backend, backend-id, state, virtual-device, device-type, trusted) stay.
Frontend and mini backend run in this process here; the hypervisor does not.
"""

import pytest
import trio
import trio.testing

from sim_support.fixtures import frontend, guest_view, mini_backend, new_vbd
from xenblk_vhost.blkif.constants import OP_FLUSH_DISKCACHE, OP_WRITE_BARRIER
from xenblk_vhost.sim.blkfront import open_blkfront
from xenblk_vhost.sim.blkfront_config import BlkfrontOptions
from xenblk_vhost.sim.blkfront_workload import check_pattern, write_pattern
from xenblk_vhost.sim.blkfront_xenbus import HandshakeError
from xenblk_vhost.sim.grant_table import GTF_permit_access, GTF_readonly, GTF_type_mask
from xenblk_vhost.sim.toolstack import DetachOutcome
from xenblk_vhost.sim.world import open_world

TOOLSTACK_NODES = {"backend-id": "0", "virtual-device": "51712", "device-type": "disk", "trusted": "1"}


@pytest.fixture
async def world(tmp_path):
    async with open_world(tmp_path / "w") as w:
        yield w


async def nodes_below(xs, path):
    out = {}

    async def walk(p, rel):
        for name in await xs.directory(p):
            out[rel + name] = (await xs.read(f"{p}/{name}")).decode()
            await walk(f"{p}/{name}", f"{rel}{name}/")

    await walk(path, "")
    return out


class StateRecorder:
    """One entry per watch event on a state node (the registration's first,
    then one per write or removal), holding the value read when the event
    was handled: a slow reader may see a later value, never an earlier one,
    so the count of entries is exact and the values are in order."""

    def __init__(self, xs, path):
        self.xs, self.path, self.values = xs, path, []

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED):
        async with self.xs.watch(self.path) as events:
            task_status.started()
            async for _ in events:
                self.values.append((await self.xs.read(self.path)).decode()
                                   if await self.xs.exists(self.path) else None)

    def check(self, writes: list[str | None]):
        """The node was written exactly `writes` (after its value at registration)."""
        assert len(self.values) == 1 + len(writes), self.values
        assert self.values[-1] == writes[-1], self.values
        seen = [int(v) for v in self.values if v is not None]
        assert seen == sorted(seen) and set(seen) <= {int(v) for v in writes if v is not None} | {1}, self.values


async def test_one_queue_one_page_writes_what_linux_writes(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, max_queues=1, max_ring_page_order=0) as be:
        async with guest_view(world, domid) as (guest, xs):
            async with open_blkfront(xs, guest, vbd.devid) as front:
                nodes = await nodes_below(world.xs, vbd.frontend)
                [ring] = front.ring_nodes()
                assert nodes == dict(TOOLSTACK_NODES, backend=vbd.backend, state="4",
                                     **{"ring-ref": str(ring.refs[0]), "event-channel": str(ring.event_channel),
                                        "protocol": "x86_64-abi", "feature-persistent": "1"})
                # The ring page is granted read-write to the backend domain, which maps it.
                entry = guest.grant_entry(ring.refs[0])
                assert entry.flags & GTF_type_mask == GTF_permit_access and not entry.flags & GTF_readonly
                assert entry.domid == 0
                assert guest.port_status(ring.event_channel)["state"] == "interdomain"
    assert be.frontend_seen == [{"order": 0, "queues": 1, "protocol": "x86_64-abi", "persistent": "1"}]


async def test_two_queues_four_pages(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, max_queues=4, max_ring_page_order=4) as be:
        async with frontend(world, domid, vbd, BlkfrontOptions(max_queues=2, max_ring_page_order=2)) as front:
            nodes = await nodes_below(world.xs, vbd.frontend)
            expected = dict(TOOLSTACK_NODES, backend=vbd.backend, state="4", protocol="x86_64-abi",
                            **{"feature-persistent": "1", "ring-page-order": "2", "multi-queue-num-queues": "2"})
            for q, ring in enumerate(front.ring_nodes()):
                assert len(ring.refs) == 4
                expected[f"queue-{q}"] = ""
                expected.update({f"queue-{q}/ring-ref{i}": str(ref) for i, ref in enumerate(ring.refs)})
                expected[f"queue-{q}/event-channel"] = str(ring.event_channel)
            assert nodes == expected
            assert [r.size for r in front.rings] == [128, 128]  # 4 pages of 112-byte slots
            data = bytes(range(256)) * 16
            for q in range(2):
                await front.write(8 * q, data, queue=q)
                assert await front.read(8 * q, 8, queue=q) == data
                await write_pattern(front, 64, 200, seed=q, queue=q)  # 25 pages: indirect
                assert await check_pattern(front, 64, 200, seed=q, queue=1 - q) == []
    assert be.frontend_seen == [{"order": 2, "queues": 2, "protocol": "x86_64-abi", "persistent": "1"}]
    assert be.stats.connections == 1


@pytest.mark.parametrize("ours, theirs, expect", [
    ((3, 4), (1, 2), (1, 2)),      # the backend's limits win
    ((0, 4), (4, 4), (0, 4)),      # blkfront's default: one page
    ((2, 1), (4, 8), (2, 1)),      # our limits win
    ((2, 4), (None, None), (0, 1)),  # an old backend: no keys, one page, one queue
])
async def test_ring_order_and_queues_are_the_minimum(world, ours, theirs, expect):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, max_ring_page_order=theirs[0], max_queues=theirs[1]):
        opts = BlkfrontOptions(max_ring_page_order=ours[0], max_queues=ours[1])
        async with frontend(world, domid, vbd, opts) as front:
            assert (front.negotiated.ring_page_order, front.negotiated.nr_rings) == expect
            nodes = await nodes_below(world.xs, vbd.frontend)
            assert ("ring-page-order" in nodes) == (expect[0] > 0)
            assert ("multi-queue-num-queues" in nodes) == (expect[1] > 1)
            assert ("ring-ref" in nodes) == (expect == (0, 1))


@pytest.mark.parametrize("protocol, backend_reads", [(None, None), ("x86_32-abi", "x86_32-abi")])
async def test_32_bit_abi_and_no_protocol_key(world, protocol, backend_reads):
    """No key: blkback assumes x86_32, so the frontend must lay out 32-bit requests."""
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd) as be:
        async with frontend(world, domid, vbd, BlkfrontOptions(protocol=protocol, max_queues=1)) as front:
            nodes = await nodes_below(world.xs, vbd.frontend)
            assert nodes.get("protocol") == backend_reads
            assert front.rings[0].entry_size == 108 and front.rings[0].size == 32
            data = b"\x5a" * 512 + b"\xa5" * 512 * 15
            await front.write(100, data, first_sect=3)  # 16 sectors from sector 3 of a page: 3 segments
            assert await front.read(100, 16) == data
            await front.flush()
            await front.discard(100, 8)
            assert await front.read(100, 8) == bytes(4096)
    assert be.frontend_seen[0]["protocol"] == backend_reads
    assert be.stats.errors == 0


async def test_state_sequence_connect_and_close(world):
    domid, vbd = await new_vbd(world)
    fe_states = StateRecorder(world.xs, f"{vbd.frontend}/state")
    be_states = StateRecorder(world.xs, f"{vbd.backend}/state")
    async with trio.open_nursery() as nursery:
        await nursery.start(fe_states.run)
        await nursery.start(be_states.run)
        async with mini_backend(world, vbd):
            async with frontend(world, domid, vbd) as front:
                assert front.state == 4
            assert front.errors == []
            await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    fe_states.check(["3", "4", "5", "6"])
    be_states.check(["2", "4", "5", "6"])


async def test_features_read_at_connect(world):
    domid, vbd = await new_vbd(world)
    features = {"feature-barrier": "1", "feature-discard": "1", "discard-granularity": "8192",
                "discard-alignment": "4096", "discard-secure": "1"}
    async with mini_backend(world, vbd, features=features, persistent=True, max_indirect_segments=256) as be:
        async with frontend(world, domid, vbd, BlkfrontOptions(max_indirect_segments=64, max_queues=1)) as front:
            n = front.negotiated
            assert (n.flush_op, n.feature_discard, n.discard_granularity, n.discard_alignment, n.discard_secure) == (
                OP_WRITE_BARRIER, True, 8192, 4096, True)
            assert n.persistent and n.max_indirect_segments == 64
            assert (front.disk.sectors, front.disk.sector_size, front.disk.physical_sector_size) == (16384, 512, 4096)
            await front.flush()  # only barriers offered: the flush goes as WRITE_BARRIER
            await front.discard(0, 16, secure=True)
            data = bytes(range(256)) * 16 * 64  # 64 pages: one indirect request
            await front.write(0, data)
            assert await front.read(0, 512) == data
            assert front.rings[0].stats.indirect == 2
            assert be.stats.by_op.get(OP_WRITE_BARRIER) == 1 and be.stats.secure_discards == 1


async def test_flush_cache_overrides_barrier_and_no_features_means_none(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, features={"feature-barrier": "1", "feature-flush-cache": "1"}) as be:
        async with frontend(world, domid, vbd) as front:
            assert front.negotiated.flush_op == OP_FLUSH_DISKCACHE
            await front.flush()
    assert be.stats.by_op == {OP_FLUSH_DISKCACHE: 1}
    domid, vbd = await new_vbd(world, vdev="xvdb")
    async with mini_backend(world, vbd, features={}, max_indirect_segments=None):
        async with frontend(world, domid, vbd, BlkfrontOptions(max_queues=1)) as front:
            n = front.negotiated
            assert (n.flush_op, n.feature_discard, n.persistent, n.max_indirect_segments) == (None, False, False, 0)
            with pytest.raises(RuntimeError):
                await front.flush()
            # 32 pages without indirect descriptors: split into requests of 11 segments at most.
            await front.read(0, 256)
            assert front.rings[0].stats.requests == 3 and front.rings[0].stats.indirect == 0


@pytest.mark.parametrize("ours, theirs, expect", [(32, 256, 32), (8, 256, 0), (64, 16, 16), (32, 11, 0)])
async def test_indirect_segments_are_clamped(world, ours, theirs, expect):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, max_indirect_segments=theirs):
        async with frontend(world, domid, vbd, BlkfrontOptions(max_indirect_segments=ours, max_queues=1)) as front:
            assert front.negotiated.max_indirect_segments == expect
            data = bytes(range(256)) * 16 * 40  # 40 pages
            await front.write(0, data)
            assert await front.read(0, 320) == data


@pytest.mark.parametrize("ours, backend_offers, negotiated", [(True, True, True), (False, True, False),
                                                              (True, False, False)])
async def test_persistent_grants_negotiation_and_reuse(world, ours, backend_offers, negotiated):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, persistent=backend_offers) as be:
        async with frontend(world, domid, vbd, BlkfrontOptions(feature_persistent=ours, max_queues=1)) as front:
            assert front.negotiated.persistent == negotiated
            for i in range(20):
                await front.write(8 * i, bytes([i]) * 4096)
                assert await front.read(8 * i, 8) == bytes([i]) * 4096
            summary = front.rings[0].summary()
            if negotiated:
                # The backend keeps its maps, so the same few pages serve all 40 requests.
                assert summary["grants_issued"] == summary["pages"] == summary["persistent_grants"] <= 2
            else:
                assert summary["grants_issued"] == 40 and summary["persistent_grants"] == 0
        assert front.errors == []
    assert be.frontend_seen[0]["persistent"] == ("1" if ours else "0")


async def test_online_resize_is_seen(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, sectors=8192) as be:
        async with frontend(world, domid, vbd) as front:
            assert front.sectors == 8192
            async with trio.open_nursery() as nursery:
                nursery.start_soon(be.resize, 16384)
                with trio.fail_after(10):
                    assert await front.wait_resize() == 16384
            assert (front.sectors, front.resizes) == (16384, 1)
            await front.write(16000, b"\1" * 512)  # beyond the old end
            assert await front.read(16000, 1) == b"\1" * 512


async def test_toolstack_detach_closes_the_frontend(world):
    domid, vbd = await new_vbd(world)
    fe_states = StateRecorder(world.xs, f"{vbd.frontend}/state")
    async with trio.open_nursery() as nursery:
        await nursery.start(fe_states.run)
        async with mini_backend(world, vbd):
            async with frontend(world, domid, vbd) as front:
                await front.write(0, b"x" * 512)
                assert await world.detach_vbd(vbd, timeout=10) is DetachOutcome.CLOSED
                assert front.state == 6 and front.rings == []
            assert front.errors == []
        nursery.cancel_scope.cancel()
    # blkfront_closing goes from Connected straight to Closed; then the node is removed.
    fe_states.check(["3", "4", "6", None])
    assert "5" not in fe_states.values
    assert not await world.xs.exists(vbd.backend)


async def test_reconnect_after_close(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd) as be:
        async with frontend(world, domid, vbd) as front:
            await front.write(0, b"a" * 4096)
            await front.close()
            assert front.state == 6 and front.errors == []
            await front.reconnect()
            assert front.state == 4 and front.connections == 2
            assert await front.read(0, 8) == b"a" * 4096  # the disk kept it
            await front.write(8, b"b" * 4096)
        assert front.errors == []
    assert be.stats.connections == 2


async def test_initialised_without_waiting_for_init_wait(world):
    """blkif.h allows it: the frontend uses the defaults (one page, one queue)."""
    domid, vbd = await new_vbd(world)
    async with guest_view(world, domid) as (guest, xs):
        negotiated = []
        done = trio.Event()

        async def run_frontend():
            async with open_blkfront(xs, guest, vbd.devid,
                                     BlkfrontOptions(skip_init_wait=True, max_ring_page_order=2)) as front:
                negotiated.append((front.negotiated.ring_page_order, front.negotiated.nr_rings))
                await front.write(0, b"z" * 512)
                assert await front.read(0, 1) == b"z" * 512
            assert front.errors == []
            done.set()

        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_frontend)
                async with world.xs.watch(f"{vbd.frontend}/state") as events:
                    async for _ in events:
                        if await world.xs.read(f"{vbd.frontend}/state") == b"3":
                            break
                assert await world.xs.read(f"{vbd.backend}/state") == b"1"  # no backend yet
                async with mini_backend(world, vbd):
                    await done.wait()  # the frontend connected, did I/O and closed
        assert negotiated == [(0, 1)]


async def test_a_backend_that_closes_during_the_handshake_fails_it(world):
    domid, vbd = await new_vbd(world)
    await world.xs.write(f"{vbd.backend}/error", "no such file")
    await world.xs.write(f"{vbd.backend}/state", "5")
    async with guest_view(world, domid) as (guest, xs):
        with pytest.raises(HandshakeError, match="backend state 5 while waiting for InitWait.*no such file"):
            async with open_blkfront(xs, guest, vbd.devid, BlkfrontOptions(state_timeout=5)):
                pass


async def test_a_backend_that_gives_up_after_initialised_fails_the_handshake_at_once(world):
    domid, vbd = await new_vbd(world)
    await world.xs.write(f"{vbd.backend}/state", "2")

    async def refuse_the_rings():
        async with world.xs.watch(f"{vbd.frontend}/state") as events:
            async for _ in events:
                if await world.xs.read(f"{vbd.frontend}/state") == b"3":
                    await world.xs.write(f"{vbd.backend}/error", "mapping ring-ref failed")
                    await world.xs.write(f"{vbd.backend}/state", "5")
                    await world.xs.write(f"{vbd.backend}/state", "6")
                    return

    async with guest_view(world, domid) as (guest, xs):
        # The frontend's own state timeout is far away: the failure must not wait for it.
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(refuse_the_rings)
                with pytest.raises(HandshakeError, match="waiting for Connected.*mapping ring-ref failed"):
                    async with open_blkfront(xs, guest, vbd.devid, BlkfrontOptions(state_timeout=60)):
                        pass
        # (Leaving guest_view closes the guest's memory, which fails if the
        # frontend kept any view of it: everything was taken back.)
    assert await world.xs.read(f"{vbd.frontend}/state") == b"6"


async def test_reads_of_every_segment_shape(world):
    """first_sect/last_sect of every request agree with the data (checked by
    contents): each start offset in a page, lengths across page ends."""
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd) as be:
        async with frontend(world, domid, vbd, BlkfrontOptions(max_queues=1)) as front:
            for first in range(8):
                for n in (1, 7, 8, 9, 17):
                    data = bytes([first * 16 + n]) * (n * 512)
                    sector = 64 * first + n
                    await front.write(sector, data, first_sect=first)
                    assert await front.read(sector, n, first_sect=(first + 3) % 8) == data
            assert front.rings[0].stats.requests == 80 and front.errors == []
            assert front.rings[0].summary()["req_prod"] == 80
    assert be.stats.requests == 80 and be.stats.errors == 0
