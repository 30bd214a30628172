"""The copy path's compiled lane (backend/datapath/copy_lane.py, native/lane_kernel.c, blkio_calls.c's
xb_queue_lane) makes the reference path's decisions.

The reference: CopyBatch.add_sector_ranges for the grant copies of a request's segments, one
Queue.read/write per request, on the Request objects the intake built. The lane works from what it
stashed of the intake's records and the private copy instead, so:
  * random and hostile ring slots (test_native_intake's batches, all three ABIs) parsed by the compiled
    intake: every plain request stashed gives the table entry its Request says, and packing the table
    gives the kernel the very bytes the reference packing gives it, in either direction;
  * hostile table entries (random bytes: a stale or corrupted table) are refused by the packer and by
    the queueing call (nothing queued), never turned into a grant copy or a storage request;
  * the queueing call on a real io_uring queue makes the reference's storage requests (same tags,
    same data moved);
  * end to end on the simulated hypervisor, a mixed workload with hostile requests (bad segments,
    read-only pages for reads, revoked grants, out-of-range sectors, unknown ops) served with the lane
    and without it: the same responses, the same storage requests, the same disk and guest pages.
"""

from __future__ import annotations

import random
import struct
from array import array

import pytest
import trio
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_native_intake import batch_st, slot_st
from test_native_journal import _pair, _same

from backend_support.frontend import TestFrontend
from backend_support.harness import connected, make_disk_file, make_vbd, read_back
from xenblk_vhost import native
from xenblk_vhost.backend.datapath import copy_lane as copy_lane_mod
from xenblk_vhost.backend.datapath.copy_lane import LANE_ENV, CopyLane
from xenblk_vhost.backend.datapath.copy_path import SMALL_BUFFER, CopyDataPath
from xenblk_vhost.backend.datapath.journal import JournalGeometry
from xenblk_vhost.backend.datapath.journal_compiled import make_compiled_answers
from xenblk_vhost.backend.datapath.ring_engine import ENGINE_ENV
from xenblk_vhost.backend.datapath.ring_worker import RingWorker
from xenblk_vhost.backend.datapath.stats import LATENCY_BOUNDS, LatencyHistogram
from xenblk_vhost.blkif.abi import Abi, layout
from xenblk_vhost.blkif.constants import OP_FLUSH_DISKCACHE, OP_READ, OP_WRITE
from xenblk_vhost.blkif.encode import RequestEncoder
from xenblk_vhost.blkif.request import Request
from xenblk_vhost.blkif.ring import BackRing, ring_bytes
from xenblk_vhost.blkif.validate import RequestLimits
from xenblk_vhost.native.intake import CompiledIntake
from xenblk_vhost.storage import Queue, StorageDevice
from xenblk_vhost.xen.gntdev import SEGMENT_SIZE, CopyBatch

NSLOTS = 64
BASE = 0x7F00_0000_0000
ENTRY = 128  # bytes of a table entry (struct xk_lane_slot): the plain request's 104, then a held one's fields


def lane() -> CopyLane:
    made = CopyLane.make(NSLOTS, SMALL_BUFFER, BASE)
    assert made is not None, "the compiled kernels must build in the test environment"
    return made


def table_bytes(ln: CopyLane) -> memoryview:
    return ln._ffi.buffer(ln._table)  # type: ignore[attr-defined]


def plain(item) -> bool:
    return type(item) is Request and item.op in (OP_READ, OP_WRITE) and type(item.segments) is tuple \
        and bool(item.segments)


def packed(batch: CopyBatch) -> bytes:
    return bytes(batch._bytes[: batch.count * SEGMENT_SIZE])


def test_both_modules_agree_on_the_table_layout():
    ln = lane()
    assert ln._lib.xk_lane_slot_size() == native.load_blkio().lib.xb_lane_slot_size() == ENTRY
    assert ln._ffi.sizeof("struct xk_lane_slot") == ENTRY


LIMITS = RequestLimits(sectors=1 << 30, logical_block_size=512, read_only=False, max_indirect_segments=0,
                       flush_enabled=True, barrier_enabled=True, discard_enabled=True)


@st.composite
def plain_batch_st(draw):
    """Mostly valid READs and WRITEs of 1..11 segments (the lane's requests), among hostile slots."""
    abi = draw(st.sampled_from(list(Abi)))
    enc = RequestEncoder(abi)
    entry = layout(abi).entry_size
    slots = []
    for _ in range(draw(st.integers(0, 40))):
        if draw(st.integers(0, 5)) == 0:
            slots.append(draw(slot_st(abi)))
            continue
        buf = bytearray(entry)
        segs = [(draw(st.integers(0, 2**32 - 1)), f, draw(st.integers(f, 7)))
                for f in draw(st.lists(st.integers(0, 7), min_size=1, max_size=11))]
        enc.rw(buf, 0, draw(st.sampled_from([OP_READ, OP_WRITE])), draw(st.integers(0, 2**64 - 1)),
               draw(st.integers(0, (1 << 30) - 100)), segs)
        slots.append(bytes(buf))
    return abi, LIMITS, slots


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(batch_st(), plain_batch_st()), st.randoms(use_true_random=False), st.integers(0, 0xFFFF))
def test_stash_and_pack_make_the_reference_copies(case, rnd, domid):
    abi, limits, slots = case
    intake = CompiledIntake(abi, limits)
    raw = b"".join(slots)
    items = intake.parse(raw, len(slots))
    # The whole-batch test: None exactly when every slot is plain (then its records are the Requests')
    whole = intake.parse_unless_plain(raw, len(slots))
    if items and all(plain(item) for item in items):
        event("all plain")
        assert whole is None
        assert [(op, nseg, id_, sector, nr) for op, nseg, id_, sector, nr in intake.plain_records(len(items))] == \
            [(r.op, len(r.segments), r.id, r.sector, r.nr_sectors) for r in items]
        assert intake.build_last(raw, len(items)) == items
    else:
        assert whole == items
    ln = lane()
    free = list(range(NSLOTS))
    rnd.shuffle(free)
    slot_of = array("i", [-1]) * len(items)
    mine = {}  # slot -> its Request
    for i, item in enumerate(items):
        if plain(item):
            slot_of[i] = free.pop()
            mine[slot_of[i]] = item
    if items:  # (the ring worker stashes only batches that have a plain request)
        assert ln.stash(intake, raw, len(items), slot_of) is True
    tb = table_bytes(ln)
    for s, item in mine.items():
        sector, nbytes, nseg, op = struct.unpack_from("<QIHB", tb, ENTRY * s)
        assert (sector, nbytes, nseg, op) == (item.sector, item.nr_sectors * 512, len(item.segments), item.op)
        segs = [struct.unpack_from("<IBB", tb, ENTRY * s + 16 + 8 * k) for k in range(nseg)]
        assert segs == list(item.segments)

    class Owner:
        def __init__(self, index, segments):
            self.index, self.segments = index, segments

    if any(len(item.segments) > 1 for item in mine.values()):
        event("several segments")
    for to_guest in (False, True):
        order = list(mine)
        rnd.shuffle(order)
        owners = [Owner(s, mine[s].segments) for s in order]
        ref, got = CopyBatch(), CopyBatch(capacity=1)  # (got grows in pack)
        ref.add_range(to_guest, domid, 5, 0, 0x1000, 512, "other")  # what came before in the batch stays
        got.add_range(to_guest, domid, 5, 0, 0x1000, 512, "other")
        for o in owners:
            ref.add_sector_ranges(to_guest, domid, o.segments, BASE + o.index * SMALL_BUFFER, o)
        assert ln.pack(got, owners, to_guest, domid) is True
        assert got.refused is None and ref.refused is None  # the intake let no bad segment through
        assert packed(got) == packed(ref) and got.owners == ref.owners


def test_a_slot_that_is_not_a_plain_request_is_refused_by_stash():
    abi = Abi.NATIVE
    intake = CompiledIntake(abi, LIMITS)
    enc = RequestEncoder(abi)
    entry = intake.entry_size
    buf = bytearray(3 * entry)
    enc.rw(buf, 0, OP_READ, 1, 8, [(7, 0, 7)])
    enc.rw(buf, entry, OP_FLUSH_DISKCACHE, 2, 0, [])
    enc.rw(buf, 2 * entry, OP_WRITE, 3, 16, [(8, 0, 7)] * 11)
    raw = bytes(buf)
    items = intake.parse(raw, 3)
    ln = lane()
    assert ln.stash(intake, raw, 3, array("i", [4, -1, 5])) is True
    assert ln.stash(intake, raw, 3, array("i", [4, 6, 5])) is False  # a flush is not for the lane
    assert ln.stash(intake, raw, 3, array("i", [NSLOTS, -1, -1])) is False  # no such slot
    assert ln.stash(intake, raw, 2, array("i", [4, -1, -1])) is False  # records of another parse
    assert plain(items[0]) and plain(items[2]) and not plain(items[1])


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=104 * 4, max_size=104 * 4), st.lists(st.integers(0, 3), min_size=1, max_size=8),
       st.booleans())
def test_hostile_table_entries_are_refused_never_packed_wrong(noise, order, to_guest):
    """A table entry the lane did not stash (random bytes): the packer packs it only if every field
    is one a stash could have written, and then exactly as the reference packs those segments."""
    ln = lane()
    tb = table_bytes(ln)
    for s in range(4):  # (the held fields after the 104 bytes stay zero: the packer never reads them)
        tb[ENTRY * s: ENTRY * s + 104] = noise[104 * s: 104 * s + 104]
    valid = True
    refs = []
    for s in order:
        nseg = noise[104 * s + 12]
        segs = [struct.unpack_from("<IBB", noise, 104 * s + 16 + 8 * k) for k in range(min(nseg, 11))]
        if not 1 <= nseg <= 11 or any(last >= 8 or first > last for _, first, last in segs):
            valid = False
        refs.append(segs)

    class Owner:
        def __init__(self, index, segments):
            self.index, self.segments = index, segments

    owners = [Owner(s, tuple(segs)) for s, segs in zip(order, refs)]
    got = CopyBatch()
    ok = ln.pack(got, owners, to_guest, 1)
    assert ok is valid
    if ok:
        ref = CopyBatch()
        for o in owners:
            ref.add_sector_ranges(to_guest, 1, o.segments, BASE + o.index * SMALL_BUFFER, o)
        assert packed(got) == packed(ref) and got.owners == ref.owners
    else:
        assert got.count == 0 and got.owners == []


@st.composite
def completions_st(draw):
    """A completion array as libblkio hands it back: mostly the lane's successes (tag bit | slot,
    ret 0), among plain tags (requests queued one by one), errors, slots out of range, and table
    entries that are random bytes (hostile or stale: never stashed)."""
    entries = {}
    comps = []
    for s in draw(st.lists(st.integers(0, NSLOTS + 2), min_size=1, max_size=24, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            entry = draw(st.binary(min_size=104, max_size=104))
        else:
            segs = [(draw(st.integers(0, 2**32 - 1)), f, draw(st.integers(f, 7)))
                    for f in draw(st.lists(st.integers(0, 7), min_size=1, max_size=11))]
            entry = struct.pack("<QIHBx", draw(st.integers(0, 2**40)), 512 * sum(b - a + 1 for _, a, b in segs),
                                len(segs), draw(st.sampled_from([OP_READ, OP_WRITE])))
            entry += b"".join(struct.pack("<IBB2x", *seg) for seg in segs).ljust(88, b"\0")
        entries[s] = entry
        lane_tag = draw(st.integers(0, 11)) != 0
        ret = 0 if draw(st.integers(0, 11)) else draw(st.sampled_from([-5, -28, 1, 4096]))
        comps.append(((0x10000 if lane_tag else 0) | s, ret))
    return entries, comps


def lane_success(entries: dict, tag: int, ret: int) -> bool:
    """The reference's view of a completion the compiled walk may take: a lane request's success
    (the ring worker's _complete: ret >= 0) whose table entry a stash could have written."""
    s = tag & 0xFFFF
    if tag >> 16 != 1 or s >= NSLOTS or ret < 0:
        return False
    _, _, nseg, op = struct.unpack_from("<QIHB", entries[s])
    return 1 <= nseg <= 11 and op <= 1


@settings(max_examples=300, deadline=None)
@given(completions_st(), st.integers(0, 0xFFFF))
def test_the_completion_walk_makes_the_reference_copies_or_refuses(case, domid):
    """complete() takes a batch only when every completion is a lane success, and then gives the
    slots in completion order and the reads' copies back as add_sector_ranges packs them; anything
    else (an error, a request queued another way, a hostile entry): None, the batch untouched."""
    entries, comps = case
    ln = lane()
    tb = table_bytes(ln)
    for s, entry in entries.items():
        if s < NSLOTS:
            tb[ENTRY * s: ENTRY * s + 104] = entry

    class Owner:
        def __init__(self, index):
            self.index = index

    slots = [Owner(i) for i in range(NSLOTS)]
    arr = ln._ffi.new("struct xk_completion[]", len(comps))
    for k, (tag, ret) in enumerate(comps):
        arr[k].user_data, arr[k].ret = tag, ret
    ref, got = CopyBatch(), CopyBatch(capacity=1)
    ref.add_range(True, domid, 5, 0, 0x1000, 512, "other")  # what came before in the batch stays
    got.add_range(True, domid, 5, 0, 0x1000, 512, "other")
    before = packed(got)
    ok = all(lane_success(entries, tag, ret) for tag, ret in comps)
    for tag, _ in comps if ok else ():
        s = tag & 0xFFFF
        _, _, nseg, op = struct.unpack_from("<QIHB", entries[s])
        segs = [struct.unpack_from("<IBB", entries[s], 16 + 8 * k) for k in range(nseg)]
        if op == OP_READ:
            if any(last >= 8 or first > last for _, first, last in segs):
                ok = False  # a hostile READ entry: refused too
                break
            ref.add_sector_ranges(True, domid, segs, BASE + s * SMALL_BUFFER, slots[s])
    event("taken" if ok else "refused")
    ready = ln.complete(got, slots, int(ln._ffi.cast("uintptr_t", arr)), len(comps), domid)
    if ok:
        assert ready == [slots[tag & 0xFFFF] for tag, _ in comps]
        assert packed(got) == packed(ref) and got.owners == ref.owners
    else:
        assert ready is None
        assert packed(got) == before and got.owners == ["other"]


def test_queue_lane_makes_the_reference_storage_requests(tmp_path):
    """On a real io_uring queue: valid entries queue exactly what Queue.read/write would (tags,
    data moved); one bad entry among them and nothing is queued."""
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(range(256)) * (4 << 20 >> 8))
    with StorageDevice.open("io_uring", {"path": str(path)}) as dev:
        q: Queue = dev.queues[0]
        assert q.compiled_calls
        region = dev.alloc_mem_region(8 * SMALL_BUFFER)
        ln = CopyLane.make(8, SMALL_BUFFER, region.addr)
        assert ln is not None
        tb = table_bytes(ln)
        # slot 2: read 2 sectors at sector 8; slot 5: write 4096 bytes at sector 64 (data in its buffer)
        struct.pack_into("<QIHB", tb, ENTRY * 2, 8, 1024, 1, OP_READ)
        struct.pack_into("<QIHB", tb, ENTRY * 5, 64, 4096, 1, OP_WRITE)
        region.view[5 * SMALL_BUFFER: 5 * SMALL_BUFFER + 4096] = b"\xab" * 4096
        assert ln.queue(q, array("H", [5, 2])) is True
        done = []
        while len(done) < 2:
            done += q.do_io(1, 8, timeout=10.0)
        assert sorted(done) == [(ln.tag | 2, 0), (ln.tag | 5, 0)]  # the lane's tags
        assert bytes(region.view[2 * SMALL_BUFFER: 2 * SMALL_BUFFER + 1024]) == (bytes(range(256)) * 4)
        assert read_back(path, 64 * 512, 4096) == b"\xab" * 4096
        struct.pack_into("<QIHB", tb, ENTRY * 3, 0, 512, 0, OP_READ)  # nseg 0: never stashed
        assert ln.queue(q, array("H", [2, 3])) is False
        assert ln.queue(q, array("H", [2, 8])) is False  # no such slot
        struct.pack_into("<QIHB", tb, ENTRY * 3, 0, 512, 1, 7)  # not READ/WRITE
        assert ln.queue(q, array("H", [3])) is False
        assert q.do_io(0, 8) == []  # nothing was queued
        q.select_calls(compiled=False)
        assert ln.queue(q, array("H", [2])) is False  # ABI mode: the caller queues one by one
        dev.release_mem_region(region)


# ---------------------------------------------------------------- end to end, with and without the lane

def record_storage_calls(monkeypatch, log: list, failing=None) -> None:
    """Every READ/WRITE the datapath queues, whichever way: (kind, byte offset, length, tag).
    failing(offset): whether the storage fails that request (its completion's ret made -EIO, as
    libblkio reports a device error), whichever way it was queued and reaped."""
    real_read, real_write, real_lane = Queue.read, Queue.write, Queue.queue_lane
    real_do_io_count = Queue.do_io_count
    start_of: dict = {}  # slot -> byte offset of its storage request in flight

    def read(self, start, addr, length, tag, flags=0):
        log.append(("read", start, length, tag))
        start_of[tag & 0xFFFF] = start
        real_read(self, start, addr, length, tag, flags)

    def write(self, start, addr, length, tag, flags=0):
        log.append(("write", start, length, tag))
        start_of[tag & 0xFFFF] = start
        real_write(self, start, addr, length, tag, flags)

    def queue_lane(self, table, nslots, idx, n, base, stride):
        ok = real_lane(self, table, nslots, idx, n, base, stride)
        if ok:
            from cffi import FFI

            ffi = FFI()
            tb = ffi.buffer(ffi.cast("char *", table), ENTRY * nslots)
            for s in ffi.unpack(ffi.cast("uint16_t *", idx), n):
                sector, nbytes, _nseg, op = struct.unpack_from("<QIHB", tb, ENTRY * s)
                log.append(("write" if op else "read", sector * 512, nbytes, s, "lane"))
                start_of[s] = sector * 512
        return ok

    def flush(self, tag, flags=0, _real=Queue.flush):
        start_of.pop(tag & 0xFFFF, None)  # (never failed: only READs and WRITEs)
        _real(self, tag, flags)

    def do_io_count(self, *args, **kwargs):  # (do_io too: it reaps through this)
        n = real_do_io_count(self, *args, **kwargs)
        view = self._completion_bytes
        for k in range(n if failing is not None else 0):
            tag, ret = struct.unpack_from("=Q8xi", view, 32 * k)
            start = start_of.get(tag & 0xFFFF)
            if ret >= 0 and start is not None and failing(start):
                struct.pack_into("=i", view, 32 * k + 16, -5)
        return n

    monkeypatch.setattr(Queue, "read", read)
    monkeypatch.setattr(Queue, "write", write)
    monkeypatch.setattr(Queue, "queue_lane", queue_lane)
    monkeypatch.setattr(Queue, "do_io_count", do_io_count)
    monkeypatch.setattr(Queue, "flush", flush)


async def serve_hostile_mix(tmp_path, hv_socket, platform, seed: int, journal: bool,
                            serve_wake_fd: int | None = None, indirect: bool = False) -> dict:
    """Rounds of plain reads and writes (1..11 segments, partial pages) mixed with hostile ones and
    a few flushes; what the guest saw and what the storage did. indirect: indirect requests too (1..40
    segments: some in a small buffer, some in a large one), hostile ones among them (a bad segment in
    the indirect page, an indirect page or a data page revoked, a read into a read-only page)."""
    from xenblk_vhost.sim.guest import Guest

    guest = Guest.create(hv_socket, pages=9000 if indirect else 2600)
    path = make_disk_file(tmp_path / "disk.img")
    vbd = make_vbd(path, queues=1, data_path="copy", **({"journal_dir": tmp_path / "journal"} if journal else {}))
    vbd.serve_wake_fd = serve_wake_fd  # (the ring engine's own poll: tests/test_ring_engine.py)
    front = TestFrontend(guest, Abi.NATIVE)
    rng = random.Random(seed)
    sectors = path.stat().st_size // 512
    responses = []
    pages = []
    try:
        async with connected(vbd, front, platform):
            free_large = vbd._resources[0].datapath._free_large
            large_before = len(free_large)
            for _round in range(8):
                sent = 0
                for k in range(rng.randint(1, 24)):
                    id_ = 100 * _round + k
                    kind = rng.choice(["read", "write", "read", "ro-read", "read", "revoked"]  # (odd: the lane's)
                                      if _round % 2 else
                                      ["read", "write", "read", "write", "bad-seg", "ro-read", "revoked",
                                       "beyond", "unknown", "flush", "empty"])
                    ind = indirect and rng.random() < 0.5
                    nseg = rng.randint(1, 40 if ind else 11)
                    segs = []
                    nsect = 0
                    for _ in range(nseg):
                        first = rng.randint(0, 7)
                        last = rng.randint(first, 7)
                        nsect += last - first + 1
                        page = front.data_page(readonly=kind in ("write", "ro-read"),
                                               fill=rng.randbytes(64) * 64)
                        pages.append(page)
                        segs.append([page.gref, first, last])
                    # disjoint per request of a round: completion order must not matter
                    sector = (k * (sectors // 24) + rng.randrange(0, sectors // 24 - 8 * nseg)) // 8 * 8
                    op = OP_WRITE if kind in ("write", "revoked") or rng.random() < 0.3 and kind == "bad-seg" \
                        else OP_READ
                    if kind == "bad-seg":
                        segs[rng.randrange(nseg)][1:] = rng.choice([[3, 2], [0, 8], [9, 9]])
                    elif kind == "revoked":
                        front.end_access(pages[-1])
                    elif kind == "beyond":
                        sector = sectors - rng.randint(0, 4)
                    if ind and kind not in ("unknown", "flush", "empty"):
                        ipages = front.indirect(0, op, id_, sector, [tuple(s) for s in segs])
                        if rng.random() < 0.1:
                            front.end_access(ipages[0])  # its indirect page cannot be copied: an error
                    elif kind == "unknown":
                        front.other(0, rng.choice([4, 7, 9, 200]), id_)
                    elif kind == "flush":
                        front.rw(0, OP_FLUSH_DISKCACHE, id_, 0, [])
                    elif kind == "empty":
                        front.rw(0, op, id_, sector, [])
                    else:
                        front.rw(0, op, id_, sector, [tuple(s) for s in segs])
                    sent += 1
                front.push()
                got = await front.responses(0, sent)
                responses += sorted((r.id, r.op, r.status) for r in got)
            with trio.fail_after(10):
                while vbd.stats()["total"]["in_flight"]:
                    await trio.sleep(0.01)
            assert len(free_large) == large_before, "a large buffer was not given back"
            latency = vbd.stats()["total"]["latency"]
        return {"responses": responses, "disk": path.read_bytes(), "pages": [p.bytes() for p in pages],
                "latency": latency}
    finally:
        front.close()
        vbd.close()
        guest.destroy()


@pytest.mark.parametrize("seed,journal", [(1, False), (2, True), (3, False)])
async def test_with_and_without_the_lane_the_guest_and_the_storage_see_the_same(tmp_path, hv_socket, platform,
                                                                                monkeypatch, seed, journal):
    seen = {}
    for on in (True, False):
        calls: list = []
        with monkeypatch.context() as m:
            m.setenv(LANE_ENV, "1" if on else "0")
            # The lane as the ring worker drives it: the ring engine, which runs the same kernels in one
            # call, has tests/test_ring_engine.py (its storage calls cannot be recorded from Python).
            m.setenv(ENGINE_ENV, "0")
            # some requests fail in the storage (seed 3: none, so that whole reaps take the lane)
            record_storage_calls(m, calls, None if seed == 3 else lambda start: start // 4096 % 13 == 2)
            walked: list = []  # the compiled completion walk's batches: (slots, statuses after the copy out)
            real_finish_lane = CopyDataPath.finish_lane

            def finish_lane(self, *args, _walked=walked, _real=real_finish_lane):
                ready = _real(self, *args)
                _walked.append(None if ready is None else [s.status for s in ready])
                return ready

            m.setattr(CopyDataPath, "finish_lane", finish_lane)
            real_finish_held = CopyDataPath.finish_held

            def finish_held(self, completions, n, _walked=walked, _real=real_finish_held):
                failed = _real(self, completions, n)
                _walked.append(None if failed is None else [int(s in failed) for s in self.lane.ready(n)])
                return failed

            m.setattr(CopyDataPath, "finish_held", finish_held)
            made = []
            real_make = CopyLane.make.__func__  # type: ignore[attr-defined]

            def make(cls, *args, _made=made, _real=real_make):
                ln = _real(cls, *args)
                _made.append(ln)
                return ln

            m.setattr(copy_lane_mod.CopyLane, "make", classmethod(make))
            whole = []  # batches the lane took whole (every request plain)
            real_plain = RingWorker._dispatch_plain

            def dispatch_plain(self, *args, _whole=whole, _real=real_plain):
                _whole.append(args[2])
                return _real(self, *args)

            m.setattr(RingWorker, "_dispatch_plain", dispatch_plain)
            started: list = []  # every slot as _start gets it: what the lane loaded must be what _dispatch loads
            real_start = RingWorker._start

            def start(self, slots, _started=started, _real=real_start):
                _started += [(s.index, s.req_id, s.op, s.sector, s.nr_bytes, tuple(s.segments), s.writes, s.steps,
                              s.jref, s.status) for s in slots]
                return _real(self, slots)

            m.setattr(RingWorker, "_start", start)
            held: list = []  # batches held by the lane: their entries, as _start would have got their slots
            real_hold = CopyLane.hold

            def hold(self, intake, raw, count, slots, first_ref, taken_at, _held=held, _started=started,
                     _real=real_hold):
                counts = _real(self, intake, raw, count, slots, first_ref, taken_at)
                if counts is not None:
                    _held.append(count)
                    for s in slots:
                        t = self._table[s]
                        segs = tuple(struct.iter_unpack("<IBBxx", bytes(self._ffi.buffer(t.segs)[:8 * t.nseg])))
                        _started.append((s, t.id, t.op, t.sector, t.nbytes, segs, bool(t.op), (t.op,), t.jref, 0))
                return counts

            m.setattr(CopyLane, "hold", hold)
            work = tmp_path / ("lane" if on else "reference")
            work.mkdir()
            result = await serve_hostile_mix(work, hv_socket, platform, seed, journal)
            assert made and all((ln is not None) is on for ln in made)
            assert bool(whole) is on, "the lane never took a whole batch"
            assert bool(walked) is on, "the compiled completion walk was never tried"
            assert bool(held) is on, "the lane never held a batch"
            if on and seed == 3:  # no storage error: the walk takes whole reaps, copy-back failures too
                assert any(statuses and any(statuses) for statuses in walked), "no read's copy back failed in it"
            elif on:  # a reap with a storage error goes the reference way
                assert None in walked, "the walk took every reap: were there no storage errors?"
        result["calls"] = sorted(calls, key=lambda c: (c[1], c[0], c[2]))
        result["started"] = sorted(started, key=lambda t: (t[1], t[0]))
        seen[on] = result
    assert any(len(c) == 5 for c in seen[True]["calls"]), "the lane queued nothing"
    assert not any(len(c) == 5 for c in seen[False]["calls"])
    assert any(status for _, _, status in seen[True]["responses"]), "no request failed: not hostile"
    assert any(not status for _, _, status in seen[True]["responses"])
    assert seen[True]["responses"] == seen[False]["responses"]
    assert [c[:3] for c in seen[True]["calls"]] == [c[:3] for c in seen[False]["calls"]]
    assert seen[True]["disk"] == seen[False]["disk"]
    assert [t[1:] for t in seen[True]["started"]] == [t[1:] for t in seen[False]["started"]]
    assert seen[True]["pages"] == seen[False]["pages"]


def test_the_engine_switch_turns_the_lane_off(monkeypatch):
    monkeypatch.setenv(LANE_ENV, "0")
    assert CopyLane.make(4, SMALL_BUFFER, BASE) is None
    monkeypatch.setenv(LANE_ENV, "1")
    monkeypatch.setattr(native, "enabled", False)
    assert CopyLane.make(4, SMALL_BUFFER, BASE) is None
    monkeypatch.setattr(native, "enabled", True)
    assert CopyLane.make(4, SMALL_BUFFER, BASE) is not None
    _ = trio  # (the end-to-end tests above are trio tests)


# ---------------------------------------------------------------- held batches (no Slot filled)

def encode_plain(abi: Abi, reqs: list) -> bytes:
    """Ring slots for (op, id, sector, segments) requests, as a guest writes them."""
    enc = RequestEncoder(abi)
    entry = layout(abi).entry_size
    buf = bytearray(entry * len(reqs))
    for i, (op, id_, sector, segs) in enumerate(reqs):
        enc.rw(buf, i * entry, op, id_, sector, segs)
    return bytes(buf)


@st.composite
def plain_requests_st(draw, min_size=1):
    segs_st = st.lists(st.integers(0, 7), min_size=1, max_size=11).flatmap(
        lambda firsts: st.tuples(*[st.tuples(st.integers(0, 2**32 - 1), st.just(f), st.integers(f, 7))
                                   for f in firsts]))
    return draw(st.lists(st.tuples(st.sampled_from([OP_READ, OP_WRITE]), st.integers(0, 2**64 - 1),
                                   st.integers(0, (1 << 30) - 100), segs_st.map(list)),
                         min_size=min_size, max_size=24))


def held_entries(ln: CopyLane) -> bytes:
    tb = table_bytes(ln)
    return bytes(tb[ENTRY * s + 14] for s in range(NSLOTS))


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Abi)), plain_requests_st(), st.randoms(use_true_random=False),
       st.integers(-1, 1 << 40), st.floats(0, 1e6))
def test_hold_keeps_what_dispatch_plain_loads(abi, reqs, rnd, first_ref, taken_at):
    """hold() keeps in each slot's entry what _dispatch_plain gives the Slot (the Request's id, op,
    sector, bytes and segments, the journal ref, the batch's clock read), counts as _dispatch counts,
    and take_back gives it back; a batch with one request that is not plain, a slot out of range or
    held already: refused, the table untouched."""
    intake = CompiledIntake(abi, LIMITS)
    raw = encode_plain(abi, reqs)
    items = intake.parse(raw, len(reqs))
    assert all(plain(item) for item in items)
    ln = lane()
    slots = array("H", rnd.sample(range(NSLOTS), len(items)))
    before = bytes(table_bytes(ln))
    bad = array("H", slots)
    bad[rnd.randrange(len(bad))] = NSLOTS + rnd.randrange(3)
    assert ln.hold(intake, raw, len(items), bad, first_ref, taken_at) is None
    assert ln.hold(intake, raw, len(items), slots[:-1], first_ref, taken_at) is None  # (one slot per request)
    assert bytes(table_bytes(ln)) == before
    counts = ln.hold(intake, raw, len(items), slots, first_ref, taken_at)
    reads = [r for r in items if r.op == OP_READ]
    writes = [r for r in items if r.op == OP_WRITE]
    assert counts == [len(reads), sum(r.nr_sectors for r in reads), len(writes), sum(r.nr_sectors for r in writes)]
    assert ln.held_slots() == sorted(slots)
    again = array("H", [slots[0]]) + array("H", [s for s in range(NSLOTS) if s not in slots][: len(items) - 1])
    held_before = bytes(table_bytes(ln))
    assert ln.hold(intake, raw, len(items), again, first_ref, taken_at) is None  # slots[0] is held
    assert bytes(table_bytes(ln)) == held_before
    for i, (s, item) in enumerate(zip(slots, items)):
        jref = first_ref + i if first_ref >= 0 else -1
        assert ln.take_back(s) == (item.id, item.op, item.sector, item.nr_sectors * 512, item.segments, taken_at,
                                   jref, -1)  # (-1: its small buffer)
        assert ln.take_back(s) is None  # not held any more
    assert ln.held_slots() == []
    if len(reqs) > 1:  # a flush among them: nothing held
        enc = RequestEncoder(abi)
        mixed = bytearray(raw)
        enc.rw(mixed, layout(abi).entry_size * rnd.randrange(len(reqs)), OP_FLUSH_DISKCACHE, 1, 0, [])
        intake.parse(bytes(mixed), len(reqs))
        before = bytes(table_bytes(ln))
        assert ln.hold(intake, bytes(mixed), len(reqs), slots, first_ref, taken_at) is None
        assert bytes(table_bytes(ln)) == before


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(Abi)), plain_requests_st(), st.randoms(use_true_random=False), st.integers(0, 0xFFFF))
def test_pack_op_packs_the_reference_copies_of_one_op(abi, reqs, rnd, domid):
    """pack_op(op) packs the entries of that op among the slots as add_sector_ranges packs their
    segments, in the slots' order, the owner of each segment its slot index."""
    intake = CompiledIntake(abi, LIMITS)
    raw = encode_plain(abi, reqs)
    items = intake.parse(raw, len(reqs))
    ln = lane()
    slots = array("H", rnd.sample(range(NSLOTS), len(items)))
    assert ln.hold(intake, raw, len(items), slots, -1, 0.0) is not None
    for op in (OP_READ, OP_WRITE):
        to_guest = op == OP_READ
        ref, got = CopyBatch(), CopyBatch(capacity=1)
        for b in (ref, got):
            b.add_range(to_guest, domid, 5, 0, 0x1000, 512, "other")
        for s, item in zip(slots, items):
            if item.op == op:
                ref.add_sector_ranges(to_guest, domid, item.segments, BASE + s * SMALL_BUFFER, s)
        assert ln.pack_op(got, slots, op, to_guest, domid) is True
        assert packed(got) == packed(ref) and got.owners == ref.owners


class _Held:
    """What the reference answers and observe() read of a held request (a Slot's fields)."""

    def __init__(self, req_id, op, jref, taken_at):
        self.req_id, self.op, self.jref, self.taken_at, self.status = req_id, op, jref, taken_at, 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from([Abi.X86_64, Abi.X86_32]), plain_requests_st(), st.booleans(), st.integers(0, (1 << 32) - 1),
       st.randoms(use_true_random=False), st.integers(0, 6), st.integers(0, 0xFFFF))
def test_the_held_walk_and_answers_are_the_references(abi, reqs, journal, start, rnd, hostile, domid):
    """complete_held takes a reap only when every completion is a held slot's success (each slot
    once); then the reads' copies back are add_sector_ranges' and answer_held writes the ring and
    the journal byte for byte as record_answers + put_response do, and counts the latency as
    LatencyHistogram.observe does. Anything else (an error, a tag not the lane's, a slot not held or
    twice, a hostile entry): refused, the table untouched. Both ABIs, across the u32 wrap."""
    entry = layout(abi).entry_size
    order = 2
    mems = [bytearray(ring_bytes(order)) for _ in range(2)]
    left = random.Random(start).randbytes(len(mems[0]) - 64)  # what a guest left in the slots
    for mem in mems:
        mem[64:] = left
        struct.pack_into("<IxxxxI", mem, 0, start, start)
    ring_a, ring_b = (BackRing(memoryview(m), abi, order) for m in mems)
    g = JournalGeometry.for_ring(32 << order, entry, 16)
    a, b, ja, jb = _pair(g, start)
    answers = make_compiled_answers(ring_b, jb if journal else None)
    assert answers is not None
    n = len(reqs)
    raw = encode_plain(abi, reqs)
    intake = CompiledIntake(abi, LIMITS)
    items = intake.parse(raw, n)
    first = -1
    if journal:
        first = ja.record_taken(start, raw, n)
        assert jb.record_taken(start, raw, n) == first
    ln = lane()
    slots = array("H", rnd.sample(range(NSLOTS), n))
    taken = [rnd.choice([0.0, 100.0, 100.0 - 3e-5]) for _ in range(2)]
    assert ln.hold(intake, raw, n, slots, first, taken[0]) is not None
    # The reap: some of the held slots, in any order, maybe with something the walk must refuse.
    done = rnd.sample(list(slots), rnd.randint(1, n))
    comps = [(ln.tag | s, 0) for s in done]
    why = None
    if hostile == 1:
        comps[rnd.randrange(len(comps))] = (comps[0][0], rnd.choice([-5, -28]))
        why = "an error"
    elif hostile == 2:
        comps[rnd.randrange(len(comps))] = (done[0], 0)
        why = "not the lane's tag"
    elif hostile == 3:
        comps.insert(rnd.randrange(len(comps) + 1), comps[rnd.randrange(len(comps))])
        why = "a slot twice"
    elif hostile == 4:
        comps.append((ln.tag | rnd.choice([s for s in range(NSLOTS + 2) if s not in slots]), 0))
        why = "not held"
    elif hostile == 5 and any(reqs[list(slots).index(s)][0] == OP_READ for s in done):
        s = next(s for s in done if reqs[list(slots).index(s)][0] == OP_READ)
        table_bytes(ln)[ENTRY * s + 16 + 5] = b"\x08"  # a READ's segment made hostile (last_sect 8)
        why = "a hostile entry"
    arr = ln._ffi.new("struct xk_completion[]", len(comps))
    for k, (tag, ret) in enumerate(comps):
        arr[k].user_data, arr[k].ret = tag, ret
    got = CopyBatch(capacity=1)
    got.add_range(True, domid, 5, 0, 0x1000, 512, "other")
    before, before_packed = bytes(table_bytes(ln)), packed(got)
    ok = ln.complete_held(got, int(ln._ffi.cast("uintptr_t", arr)), len(comps), domid)
    event("refused" if why else "taken")
    if why:
        assert ok is False, why
        assert bytes(table_bytes(ln)) == before and packed(got) == before_packed and got.owners == ["other"]
        return
    assert ok is True
    assert ln.ready(len(done)) == done
    by_slot = dict(zip(slots, zip(items, range(n))))
    ref = CopyBatch()
    ref.add_range(True, domid, 5, 0, 0x1000, 512, "other")
    for s in done:
        item, _ = by_slot[s]
        if item.op == OP_READ:
            ref.add_sector_ranges(True, domid, item.segments, BASE + s * SMALL_BUFFER, s)
    assert packed(got) == packed(ref) and got.owners == ref.owners
    # The answers, at the ring's position: as the reference writes them.
    for ring in (ring_a, ring_b):
        ring.req_cons = (start + n) & 0xFFFFFFFF
    replies = [_Held(by_slot[s][0].id, by_slot[s][0].op, first + by_slot[s][1] if first >= 0 else -1, taken[0])
               for s in done]
    if journal:
        ja.record_answers(replies, ring_a.rsp_prod_pvt)
    for r in replies:
        ring_a.put_response(r.req_id, r.op, r.status)
    now = taken[0] + rnd.choice([0.2, 1.5, 3e-5, *LATENCY_BOUNDS])  # (taken 0.0: exactly on a bound)
    want, have = LatencyHistogram(), LatencyHistogram()
    want.sum = have.sum = 0.5
    want.observe(now, replies)
    answers.answer_held(ln, len(done), now, have)
    assert (have.counts, have.sum) == (want.counts, want.sum)
    assert ring_b.rsp_prod_pvt == ring_a.rsp_prod_pvt and mems[0] == mems[1], "ring pages differ"
    if journal:
        ja.published(ring_a.rsp_prod_pvt)
        jb.published(ring_b.rsp_prod_pvt)
        _same(a, b, ja, jb, "the held answers")
    assert ln.held_slots() == sorted(set(slots) - set(done))  # the answered ones are no longer held
    with pytest.raises(RuntimeError):  # answered already: not walked any more
        answers.answer_held(ln, len(done), now, have)
