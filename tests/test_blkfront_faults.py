"""The reference frontend catches the backend bugs it exists to catch.

Each test makes the mini backend misbehave in one way (sim_support
mini_backend.Faults) and checks the frontend's verdict: the request
fails, the ring is disabled, and `errors` says what happened, in Linux
blkfront's words where it has some.
"""

import pytest
import trio

from sim_support.fixtures import Faults, frontend, mini_backend, new_vbd
from xenblk_vhost.sim.blkfront_config import BlkfrontOptions
from xenblk_vhost.sim.blkfront_ring import RingBroken
from xenblk_vhost.sim.blkfront_workload import Workload, check_pattern, run_workload, write_pattern
from xenblk_vhost.sim.world import open_world

ONE_QUEUE = BlkfrontOptions(max_queues=1, feature_persistent=False)


@pytest.fixture
async def world(tmp_path):
    async with open_world(tmp_path / "w") as w:
        yield w


@pytest.mark.parametrize("fault, message", [
    ("keep_mapped", "has not unmapped grant"),
    ("wrong_op", "wrong operation (2 instead of 1)"),
    ("unknown_id", "response has incorrect id (57005)"),
    ("bogus_rsp_prod", "illegal number of responses"),
])
async def test_a_bad_answer_disables_the_ring(world, fault, message):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, faults=Faults(**{fault: True})):
        async with frontend(world, domid, vbd, ONE_QUEUE) as front:
            with pytest.raises(RingBroken):
                await front.write(0, b"w" * 4096)
            with pytest.raises(RingBroken):  # and stays disabled
                await front.read(0, 8)
            assert any(message in e for e in front.errors), front.errors


async def test_an_answer_to_an_answered_request_is_caught(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, faults=Faults(duplicate_response=True)):
        async with frontend(world, domid, vbd, ONE_QUEUE) as front:
            await front.write(0, b"1" * 512)  # answered correctly
            with pytest.raises(RingBroken):
                await front.write(8, b"2" * 512)  # answered with the first one's id
            assert any("references no pending request" in e for e in front.errors), front.errors


async def test_closing_with_requests_unanswered_is_caught(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, faults=Faults(never_answer=True)) as be:
        async with frontend(world, domid, vbd, ONE_QUEUE) as front:
            failures = []

            async def write():
                try:
                    await front.write(0, b"x" * 4096)
                except RingBroken as exc:
                    failures.append(exc)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                with trio.fail_after(10):
                    while be.stats.requests == 0:
                        await trio.sleep(0.01)
                await front.close()
            assert len(failures) == 1
            assert any("closed with 1 request(s) unanswered" in e for e in front.errors), front.errors


async def test_a_ring_left_mapped_after_closed_is_caught(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, faults=Faults(keep_ring_mapped=True)):
        async with frontend(world, domid, vbd, ONE_QUEUE) as front:
            await front.write(0, b"r" * 512)
            [ring] = front.ring_nodes()
            await front.close()
            assert front.errors == [f"ring page gref {ring.refs[0]} still mapped after the backend closed"]


async def test_wrong_data_fails_the_workload(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, faults=Faults(corrupt_reads=True)):
        async with frontend(world, domid, vbd, ONE_QUEUE) as front:
            result = await run_workload(front, Workload(requests=60, depth=4, mix=(("write", 1), ("read", 1))))
            await write_pattern(front, 100, 16, seed=7)
            # The mini backend flips the first byte of every segment it reads into.
            assert await check_pattern(front, 100, 16, seed=7, first_sect=4) == [100, 104, 112]
    assert not result.ok and result.mismatches
    assert front.errors == []  # the protocol was fine: only the data was wrong


async def test_a_well_behaved_persistent_backend_leaves_nothing_behind(world):
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, persistent=True):
        async with frontend(world, domid, vbd) as front:
            result = await run_workload(front, Workload(requests=200, depth=8, max_sectors=128))
            assert sum(r.pool.persistent_count for r in front.rings) > 0  # the backend holds grants now
        assert result.ok and result.requests == 200
    # At Closed every persistent grant and ring page was released and taken back.
    assert front.errors == [] and front.state == 6


async def test_a_stalled_workload_names_the_requests_never_answered(world):
    # The crash campaign's diagnosis: a backend that takes requests and answers none ends the
    # workload after stall_s (not at the caller's timeout) with each outstanding request's id,
    # op, sector and ring position, oldest first.
    domid, vbd = await new_vbd(world)
    async with mini_backend(world, vbd, faults=Faults(never_answer=True)) as be:
        async with frontend(world, domid, vbd, ONE_QUEUE) as front:
            with trio.fail_after(10):
                result = await run_workload(front, Workload(requests=50, depth=3, mix=(("write", 1),),
                                                            stall_s=0.5))
            assert be.stats.requests == 3
            [ring] = result.stall["rings"]
            await front.close()
    assert not result.ok and result.stall["seconds"] >= 0.5 and result.requests == 0
    assert sorted(q["id"] for q in ring["requests"]) == [0, 1, 2]
    assert sorted(q["position"] for q in ring["requests"]) == [0, 1, 2]
    assert {q["op"] for q in ring["requests"]} == {1} and all(q["nr_sectors"] > 0 for q in ring["requests"])
    assert ring["req_prod"] == 3 and ring["rsp_prod"] == 0 and ring["rsp_cons"] == 0
    assert result.errors[0].startswith("stalled: "), result.errors
