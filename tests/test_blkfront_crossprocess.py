"""Issue 3: the reference frontend in one process, a backend in another.

Process A is `python -m xenblk_vhost.sim.blkfront` (a guest kernel's
blkfront: guest memory, grant table and event channels through the
simulated hypervisor, xenstore as the guest domain); process B is the mini
backend (tests/sim_support/mini_backend.py: the sim gntdev/evtchn, the
blkif BackRing, dom0's xenstore); the hypervisor is a third. Every write
carries a pattern that the frontend reads back and compares; the ring
indices start just below 2**32 so they wrap there, and around the ring
hundreds of times.
"""

import pytest

from sim_support.fixtures import mini_backend_argv, new_vbd
from xenblk_vhost.blkif.constants import OP_DISCARD, OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE
from xenblk_vhost.sim.blkfront_config import BlkfrontOptions
from xenblk_vhost.sim.toolstack import DetachOutcome
from xenblk_vhost.sim.world import open_world

NEAR_WRAP = 2**32 - 37


@pytest.fixture
async def world(tmp_path):
    async with open_world(tmp_path / "w") as w:
        yield w


async def run_pair(world, options, *, requests, depth, max_sectors, persistent=False, sectors=32768):
    domid, vbd = await new_vbd(world, pages=4096, grant_frames=32)
    backend = await world.start_process(
        mini_backend_argv(world, vbd, sectors=sectors, persistent=persistent), name="mini-backend")
    front = await world.run_frontend(domid, vbd.devid, options, requests=requests, depth=depth,
                                     max_sectors=max_sectors, timeout=300)
    assert await world.detach_vbd(vbd, timeout=10) is DetachOutcome.CLOSED
    assert await backend.wait(10) == 0
    return front, backend.last_json()


def check_common(front, back, options, requests):
    """What every run must show: verified data, no errors, indices wrapped."""
    assert front["returncode"] == 0, front
    w = front["workload"]
    assert (w["ok"], w["mismatches"], w["errors"], front["front"]["errors"]) == (True, [], [], [])
    assert w["requests"] == requests
    assert w["sectors_verified"] > 0 and w["final_verify_sectors"] > 0
    rings = front["front"]["rings"]
    assert len(rings) == front["front"]["negotiated"]["nr_rings"]
    total = sum(r["requests"] for r in rings)
    assert total >= requests and sum(r["responses"] for r in rings) == total
    for r in rings:
        # The private producer index ended where the count says, past 2**32.
        assert r["req_prod"] == (options.initial_index + r["requests"]) % 2**32
        assert r["rsp_cons"] == r["req_prod"]
    # The backend saw exactly the frontend's requests and failed none.
    assert back["stats"]["requests"] == total and back["stats"]["errors"] == 0
    return rings, w


async def test_ten_thousand_verified_requests_across_processes(world):
    options = BlkfrontOptions(max_queues=2, max_ring_page_order=0, initial_index=NEAR_WRAP)
    front, back = await run_pair(world, options, requests=10_000, depth=32, max_sectors=96)
    rings, w = check_common(front, back, options, 10_000)
    assert [r["size"] for r in rings] == [32, 32]
    for r in rings:
        assert r["requests"] > 100 * r["size"]  # wrapped around the ring over a hundred times
        assert r["req_prod"] < NEAR_WRAP  # and past 2**32
        assert r["indirect"] > 0 and r["max_in_flight"] > 1
    assert all(w["by_op"][op] > 0 for op in ("write", "read", "flush", "discard"))
    by_op = {int(k): v for k, v in back["stats"]["by_op"].items()}
    assert by_op[OP_WRITE] > 1000 and by_op[OP_READ] > 1000
    assert by_op[OP_FLUSH_DISKCACHE] == w["by_op"]["flush"] and by_op[OP_DISCARD] == w["by_op"]["discard"]
    assert back["stats"]["indirect"] == sum(r["indirect"] for r in rings)
    assert back["frontend_seen"] == [{"order": 0, "queues": 2, "protocol": "x86_64-abi", "persistent": "1"}]
    # What the frontend process had written, as Linux blkfront writes it for two queues of one page.
    assert set(front["frontend_nodes"]) == {
        "backend", "backend-id", "state", "virtual-device", "device-type", "trusted", "protocol",
        "feature-persistent", "multi-queue-num-queues", "queue-0", "queue-0/ring-ref", "queue-0/event-channel",
        "queue-1", "queue-1/ring-ref", "queue-1/event-channel"}


@pytest.mark.parametrize("protocol, order, queues, persistent, ring_size", [
    ("x86_64-abi", 0, 1, False, 32),   # 4032 / 112 -> 36 -> 32
    ("x86_32-abi", 2, 2, True, 128),   # 16320 / 108 -> 151 -> 128
    (None, 1, 2, False, 64),           # no protocol key: the x86_32 layout, 8128 / 108 -> 75 -> 64
    ("x86_32-abi", 4, 1, False, 512),  # 65472 / 108 -> 606 -> 512
], ids=["64bit-1page-1q", "32bit-4pages-2q-persistent", "default-2pages-2q", "32bit-16pages-1q"])
async def test_abi_ring_size_and_queue_matrix(world, protocol, order, queues, persistent, ring_size):
    options = BlkfrontOptions(protocol=protocol, max_ring_page_order=order, max_queues=queues,
                              initial_index=NEAR_WRAP)
    front, back = await run_pair(world, options, requests=600, depth=16, max_sectors=96,
                                 persistent=persistent, sectors=4096)
    rings, _ = check_common(front, back, options, 600)
    neg = front["front"]["negotiated"]
    assert (neg["ring_page_order"], neg["nr_rings"], neg["persistent"]) == (order, queues, persistent)
    assert [r["size"] for r in rings] == [ring_size] * queues
    if persistent:
        # Data pages stay granted and are reused (only indirect pages, which
        # the mini backend maps just for the request, are granted again).
        assert all(r["persistent_grants"] > 0 and r["grants_issued"] < r["requests"] for r in rings), rings
    else:
        assert all(r["grants_issued"] >= r["requests"] for r in rings)
    assert back["frontend_seen"][0] == {"order": order, "queues": queues, "protocol": protocol,
                                        "persistent": "1"}

