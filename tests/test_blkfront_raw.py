"""The raw ring interface hostile tests use: arbitrary bytes and indices go
out, whatever the backend answers comes back.

The backend here is the mini backend, whose refusals come from the blkif
decoder (xenblk_vhost.blkif.decode): these tests check that the raw
interface delivers exactly what it is given, and reads back exactly what
is answered.
"""

import struct

import pytest
import trio

from sim_support.fixtures import Faults, frontend, mini_backend, new_vbd
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_EOPNOTSUPP, RSP_ERROR, RSP_OKAY
from xenblk_vhost.sim.blkfront_config import BlkfrontOptions
from xenblk_vhost.sim.world import open_world


@pytest.fixture
async def world(tmp_path):
    async with open_world(tmp_path / "w") as w:
        yield w


@pytest.mark.parametrize("protocol", ["x86_64-abi", "x86_32-abi"])
async def test_raw_requests_get_their_own_answers(world, protocol):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd) as be:
        async with frontend(world, domid, vbd, BlkfrontOptions(max_queues=1, protocol=protocol)) as front:
            async with front.raw_ring(0) as raw:
                page = raw.grant_page(readonly=True, data=b"\x11" * 4096)
                slots = []
                for id_, op, segs in [
                    (7, OP_WRITE, [(page.gref, 0, 7)]),   # fine: sectors 0..7 of the page
                    (8, OP_READ, [(page.gref, 0, 9)]),    # last_sect 9 >= 8
                    (9, OP_READ, [(page.gref, 5, 2)]),    # first_sect > last_sect
                ]:
                    buf = bytearray(raw.entry_size)
                    raw.encoder.rw(buf, 0, op, id_, 0, segs)
                    slots.append(bytes(buf))
                other = bytearray(raw.entry_size)
                raw.encoder.other(other, 0, 99, 10)  # an operation nobody knows
                slots.append(bytes(other))
                first = raw.queue(slots)
                assert raw.publish()  # the backend sleeps with req_event = req_prod + 1: it wants a kick
                raw.notify()
                answers = await raw.responses(count=4, timeout=10)
                assert [(r.id, r.op, r.status) for r in answers] == [
                    (7, OP_WRITE, RSP_OKAY), (8, OP_READ, RSP_ERROR), (9, OP_READ, RSP_ERROR),
                    (10, 99, RSP_EOPNOTSUPP)]
                assert raw.req_prod == first + 4 and raw.rsp_prod == first + 4
            # The ring was resynchronised: ordinary I/O carries on, and the raw write landed.
            assert await front.read(0, 8) == b"\x11" * 4096
            assert front.errors == []
    assert be.stats.requests == 5


async def test_a_bogus_req_prod_goes_out_as_is(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd) as be:
        async with frontend(world, domid, vbd, BlkfrontOptions(max_queues=1)) as front:
            async with front.raw_ring(0) as raw:
                raw.set_req_prod(raw.req_prod + 1000)  # more requests than the ring holds
                assert struct.unpack_from("<I", raw.view, 0)[0] == 1000
                raw.notify()
                # The backend must halt this ring (blkback: "Frontend provided bogus
                # ring requests"), so nothing comes back.
                assert await raw.responses(count=1, timeout=0.5) == []
    assert be.stats.requests == 0


async def test_raw_ring_refuses_a_ring_with_requests_in_flight(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, faults=Faults(never_answer=True)):
        async with frontend(world, domid, vbd, BlkfrontOptions(max_queues=1, state_timeout=3)) as front:
            async with trio.open_nursery() as nursery:
                async def stuck():
                    try:
                        await front.write(0, b"s" * 512)
                    except Exception:
                        pass

                nursery.start_soon(stuck)
                with trio.fail_after(5):
                    while front.rings[0].in_flight == 0:
                        await trio.sleep(0.01)
                with pytest.raises(RuntimeError, match="in flight"):
                    async with front.raw_ring(0):
                        pass
                await front.close()


async def test_raw_ring_twice_in_a_row_without_a_checkpoint(world):
    """raw_ring restarts the ring's reaper on exit; entering again at once must
    wait for that reaper to end, or it and the raw user both wait on the event
    channel (trio.BusyResourceError: the hostile campaign hit this)."""
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd):
        async with frontend(world, domid, vbd, BlkfrontOptions(max_queues=1)) as front:
            for round_ in range(3):
                async with front.raw_ring(0) as raw:
                    page = raw.grant_page(readonly=True, data=bytes([round_]) * 4096)
                    buf = bytearray(raw.entry_size)
                    raw.encoder.rw(buf, 0, OP_WRITE, 40 + round_, 0, [(page.gref, 0, 7)])
                    raw.queue([bytes(buf)])
                    raw.publish()
                    raw.notify()
                    [answer] = await raw.responses(count=1, timeout=10)
                    assert (answer.id, answer.status) == (40 + round_, RSP_OKAY)
            assert await front.read(0, 8) == b"\x02" * 4096
