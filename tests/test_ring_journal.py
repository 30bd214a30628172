"""A ring's journal at connect (backend/datapath/ring_journal.py): made afresh, taken over, or refused."""

from __future__ import annotations

import logging
import struct

from xenblk_vhost.backend.datapath.journal import JournalGeometry
from xenblk_vhost.backend.datapath.ring_journal import attach_journal, ring_identity
from xenblk_vhost.blkif.abi import Abi, layout
from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE, RSP_OKAY
from xenblk_vhost.blkif.encode import RequestEncoder
from xenblk_vhost.blkif.intake import RequestIntake
from xenblk_vhost.blkif.request import IndirectRequest, Request
from xenblk_vhost.blkif.ring import BackRing, FrontRing, ring_bytes
from xenblk_vhost.blkif.validate import RequestLimits

ABI = Abi.NATIVE
ENTRY = layout(ABI).entry_size
LIMITS = RequestLimits(sectors=1 << 20, max_indirect_segments=32)
NAME = "3-xvda-ring0.journal"


def _identity(refs=(8,)) -> bytes:
    return ring_identity(frontend_domid=3, vdev="xvda", ring=0, abi=ABI.value, ring_refs=refs, event_channel=5)


def _geometry() -> JournalGeometry:
    return JournalGeometry.for_ring(8, ENTRY, 32)


def _ring_with_requests(n_plain: int, *, indirect: bool = False):
    mem = bytearray(ring_bytes(0))
    front = FrontRing(memoryview(mem), ABI, 0)
    enc = RequestEncoder(ABI)
    for i in range(n_plain):
        enc.rw(front.view, front.claim_request_slot(), OP_WRITE if i % 2 else OP_READ, 100 + i, 8 * i, ((i, 0, 7),))
    if indirect:
        enc.indirect(front.view, front.claim_request_slot(), OP_WRITE, 200, 64, 3, (9,))
    front.push_requests()
    return mem, front


def _attach(tmp_path, mem, identity=None):
    ring = BackRing(memoryview(mem), ABI, 0)
    intake = RequestIntake(ABI, LIMITS)
    return ring, intake, attach_journal(tmp_path, NAME, identity or _identity(), _geometry(), ring, intake, "t/ring0")


def test_a_fresh_journal_then_its_removal(tmp_path):
    mem, _ = _ring_with_requests(0)
    _, _, attached = _attach(tmp_path, mem)
    assert attached.resumed is None and (tmp_path / NAME).exists()
    attached.close(remove=True)
    assert not (tmp_path / NAME).exists()


def test_a_killed_process_is_taken_over_from_its_journal(tmp_path):
    mem, front = _ring_with_requests(3, indirect=True)
    ring, intake, first = _attach(tmp_path, mem)
    pos = ring.req_cons
    raw, n = ring.take_slots(8)
    items = intake.parse(raw, n)
    segments = b"".join(struct.pack("<IBBxx", 40 + k, 0, 7) for k in range(3))
    items[3] = intake.decode_indirect_segments(items[3], segments)
    ref = first.journal.record_taken(pos, raw, n, [(3, segments)])
    # Request 1 answered and published, request 2 answered but not published; 0 and 3 in flight.
    for i in (1, 2):
        first.journal.record_answered(ref + i, RSP_OKAY, ring.rsp_prod_pvt)
        ring.put_response(items[i].id, items[i].op, RSP_OKAY)
        if i == 1:
            ring.push_responses()
            first.journal.published(ring.rsp_prod_pvt)
    first.journal.release()
    first.file.close()  # the process dies: the file stays, its mapping goes
    assert [r.id for r in front.take_responses(8)] == [101]

    ring, _, again = _attach(tmp_path, mem)
    resumed = again.resumed
    assert resumed is not None
    assert resumed.republish == [(102, OP_READ, RSP_OKAY)]
    reruns = [item for item, _ in resumed.rerun]
    assert [type(i) for i in reruns] == [Request, Request]
    assert [i.id for i in reruns] == [100, 200]
    assert reruns[1].segments == tuple((40 + k, 0, 7) for k in range(3)) and reruns[1].indirect
    assert ring.req_cons == 4 and ring.rsp_prod_pvt == 1
    again.close(remove=False)


def test_a_journal_of_another_connection_is_discarded_with_a_log_line(tmp_path, caplog):
    mem, _ = _ring_with_requests(2)
    ring, intake, first = _attach(tmp_path, mem)
    raw, n = ring.take_slots(8)
    first.journal.record_taken(0, raw, n)
    first.journal.release()
    first.file.close()
    caplog.set_level(logging.WARNING)
    ring, _, again = _attach(tmp_path, mem, identity=_identity(refs=(77,)))  # the guest reconnected: new pages
    assert again.resumed is None
    assert ring.req_cons == 0  # attached as blkback attaches
    assert any("discarded" in r.getMessage() and "another connection" in r.getMessage() for r in caplog.records)
    again.close(remove=True)


def test_an_unreadable_journal_is_discarded(tmp_path, caplog):
    (tmp_path / NAME).write_bytes(b"\xff" * 8192)
    mem, _ = _ring_with_requests(1)
    caplog.set_level(logging.WARNING)
    _, _, attached = _attach(tmp_path, mem)
    assert attached.resumed is None
    assert any("not a journal" in r.getMessage() for r in caplog.records)
    attached.close(remove=True)


def test_indirect_header_without_segments_is_answered_error_not_guessed(tmp_path):
    mem, _ = _ring_with_requests(0, indirect=True)
    ring, intake, first = _attach(tmp_path, mem)
    raw, n = ring.take_slots(8)
    assert type(intake.parse(raw, n)[0]) is IndirectRequest
    first.journal.record_taken(0, raw, n, [(0, b"")])  # its page copy failed
    first.journal.release()
    first.file.close()
    _, _, again = _attach(tmp_path, mem)
    assert again.resumed is not None
    (item, _), = again.resumed.rerun
    assert item.status != RSP_OKAY and item.id == 200
    again.close(remove=True)
