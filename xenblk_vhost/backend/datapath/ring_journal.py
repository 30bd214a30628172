"""A ring's journal at connect: taken over from the last process, or made afresh.

    attached = attach_journal(directory, name, identity, geometry, ring, intake, log_name)
    attached.journal      the RingJournal the worker records into
    attached.resumed      None (a fresh journal), or what the takeover left to do:
        .republish        (id, op, status) to write at the ring's rsp_prod onwards, then publish
        .rerun            (item, ref): decoded again from the journal's copy, to run again
        .writer           the last writer (pid, start time): Vbd waits for it to be gone before
                          running anything again (writer_fence.py), then names itself
    attached.close(remove=...)

On a takeover the ring's private indices are set here (req_cons, rsp_prod_pvt);
the worker does the rest before it takes anything new (RingWorker.resume_from).
A journal that is unreadable or not this ring's is logged, removed and
replaced by a fresh one, and the ring is attached as blkback attaches
(at rsp_prod): nothing better can be known then.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from ...blkif.constants import RSP_ERROR
from ...blkif.intake import RequestIntake
from ...blkif.request import Decoded, IndirectRequest, Rejection
from ...blkif.ring import BackRing
from .journal import JournalCorrupt, JournalGeometry, RingJournal, format_area, read_image
from .journal_compiled import make_ring_journal
from .journal_file import JournalFile
from .takeover import Entry, JournalMismatch, plan_takeover
from .writer_fence import own_identity

log = logging.getLogger(__name__)

R_JOURNAL_NO_SEGMENTS = "indirect segments missing from the journal"
R_JOURNAL_INDIRECT_COPY = "indirect page copy failed"


@dataclass
class Resumed:
    republish: list[tuple[int, int, int]] = field(default_factory=list)  # (id, op, status)
    rerun: list[tuple[Decoded, int]] = field(default_factory=list)  # (item, journal ref)
    published: int = 0  # entries found answered and published: dropped
    writer: tuple[int, int] | None = None  # the last process's (pid, start time): fence it before rerun


@dataclass
class AttachedJournal:
    file: JournalFile
    journal: RingJournal
    resumed: Resumed | None

    def close(self, *, remove: bool) -> None:
        """Let go of the mapping; remove: the connection ended with nothing in flight."""
        self.journal.release()
        if remove:
            self.file.remove()
        else:
            self.file.close()


def ring_identity(*, frontend_domid: int, vdev: str, ring: int, abi: str, ring_refs: tuple[int, ...],
                  event_channel: int) -> bytes:
    """What ties a journal to one connection of one ring (a reconnected frontend grants new pages)."""
    refs = ",".join(str(r) for r in ring_refs)
    return (f"xenblk-vhost ring journal\ndomid={frontend_domid}\nvdev={vdev}\nring={ring}\nabi={abi}\n"
            f"ring-refs={refs}\nevent-channel={event_channel}\n").encode()


def _decode(intake: RequestIntake, entry: Entry, entry_size: int) -> Decoded:
    frame, i = entry.frame, entry.i
    item = intake.parse(frame.raw[i * entry_size:(i + 1) * entry_size], 1)[0]
    if type(item) is IndirectRequest:
        segments = frame.indirect[i]
        if segments is None:
            return Rejection(item.id, item.indirect_op, RSP_ERROR, R_JOURNAL_NO_SEGMENTS)
        if not segments:
            return Rejection(item.id, item.indirect_op, RSP_ERROR, R_JOURNAL_INDIRECT_COPY)
        return intake.decode_indirect_segments(item, segments)
    return item


def attach_journal(directory: Path, name: str, identity: bytes, geometry: JournalGeometry, ring: BackRing,
                   intake: RequestIntake, log_name: str, *, opened: JournalFile | None = None) -> AttachedJournal:
    """opened: the file at directory/name opened (and its pages touched) before; used if it is still
    the file there."""
    path = directory / name
    if opened is not None and not opened.is_at(path):
        opened.close()
        opened = None
    jf = opened if opened is not None else JournalFile.open_existing(path)
    if jf is not None:
        try:
            image = read_image(jf.buffer)
            plan = plan_takeover(image, identity, rsp_prod=ring.rsp_prod, req_prod=ring.req_prod,
                                 ring_size=ring.size)
        except (JournalCorrupt, JournalMismatch) as e:
            log.warning("%s: journal %s discarded: %s", log_name, path, e)
            jf.remove()
        else:
            journal = make_ring_journal(jf.buffer, image.geometry)
            journal.adopt(image, plan.rsp_prod)
            ring.req_cons = plan.req_cons
            ring.rsp_prod_pvt = plan.rsp_prod
            entry_size = image.geometry.entry_size
            resumed = Resumed(published=plan.published, writer=image.writer)
            for rp in plan.republish:
                item = _decode(intake, rp.entry, entry_size)
                resumed.republish.append((item.id, item.response_op, rp.status))
            for entry in plan.rerun:
                resumed.rerun.append((_decode(intake, entry, entry_size),
                                      journal.frame_ref(entry.frame.index) + entry.i))
            log.info("%s: took the ring over from its journal at rsp_prod %d: %d answer(s) published again, "
                     "%d request(s) run again, intake resumes at %d", log_name, plan.rsp_prod,
                     len(resumed.republish), len(resumed.rerun), plan.req_cons)
            return AttachedJournal(jf, journal, resumed)
    jf = JournalFile.create(path, geometry.size)
    try:
        format_area(jf.buffer, geometry, identity, taken_to=ring.req_cons, published=ring.rsp_prod)
        journal = make_ring_journal(jf.buffer, geometry)
        journal.set_writer(*own_identity())
        return AttachedJournal(jf, journal, None)
    except BaseException:
        jf.remove()
        raise
