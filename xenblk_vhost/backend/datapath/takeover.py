"""Takeover of a live ring from its journal: what to publish again, what to run again, where to resume.

Pure decisions over a JournalImage (journal.py) and the ring's shared
indices as the new process finds them. The invariant they rest on: every
request taken from the ring gets exactly one response, so after a kill

    req_cons = rsp_prod (published) + k (answered, not published) + u (taken, not answered)

where k and u are counted in the journal. The answered-but-unpublished ones
must sit exactly at response positions rsp_prod .. rsp_prod+k-1 (answers
are recorded before their response is written, in response order), and the
journal's taken_to hint must agree with req_cons. Anything else means the
journal is not this ring's (another frontend, or the guest reconnected and
re-initialised the ring meanwhile): JournalMismatch, and the caller starts
the ring afresh.

    plan = plan_takeover(image, identity, rsp_prod=..., req_prod=..., ring_size=...)
    plan.republish   answered, not published: write these responses again at
                     rsp_prod, rsp_prod+1, ... (in this order), then publish
    plan.rerun       taken, not answered: run again from the journal's copy
                     (never from the ring: its slots may hold responses by now)
    plan.req_cons    where intake resumes (the requests after it are still in the ring)
"""

from __future__ import annotations

from dataclasses import dataclass

from ...blkif.constants import U32_MASK
from .journal import FrameImage, JournalImage

_M = U32_MASK


class JournalMismatch(Exception):
    """The journal does not describe this ring (say why in the message)."""


@dataclass(frozen=True)
class Entry:
    """One request of the journal: frame image and index in it."""

    frame: FrameImage
    i: int

    @property
    def position(self) -> int:
        return self.frame.position(self.i)


@dataclass(frozen=True)
class Republish:
    entry: Entry
    status: int
    rsp_pos: int


@dataclass(frozen=True)
class TakeoverPlan:
    rsp_prod: int
    req_cons: int
    republish: tuple[Republish, ...]  # in response order, from rsp_prod
    rerun: tuple[Entry, ...]  # in ring order
    published: int  # requests found answered and published (dropped)

    @property
    def rsp_prod_after(self) -> int:
        return (self.rsp_prod + len(self.republish)) & _M


def plan_takeover(image: JournalImage, identity: bytes, *, rsp_prod: int, req_prod: int, ring_size: int
                  ) -> TakeoverPlan:
    if image.identity != identity:
        raise JournalMismatch("the journal is another connection's (frontend, ring refs or channel differ)")
    P = rsp_prod & _M
    if (P - image.published) & _M > ring_size:
        raise JournalMismatch(f"ring rsp_prod {P} is not at or shortly after the journal's {image.published}")
    republish: list[Republish] = []
    rerun: list[Entry] = []
    published = 0
    positions = set()
    for fr in image.frames:
        for i, answer in enumerate(fr.answers):
            entry = Entry(fr, i)
            pos = entry.position
            if pos in positions:
                raise JournalMismatch(f"ring position {pos} recorded twice")
            positions.add(pos)
            if answer is None:
                rerun.append(entry)
                continue
            status, rsp_pos = answer
            if (rsp_pos - P) & _M < ring_size:
                republish.append(Republish(entry, status, rsp_pos))
            else:
                published += 1
    republish.sort(key=lambda r: (r.rsp_pos - P) & _M)
    for k, r in enumerate(republish):
        if r.rsp_pos != (P + k) & _M:
            raise JournalMismatch(f"unpublished answers do not follow rsp_prod {P} (found {r.rsp_pos} at {k})")
    req_cons = (P + len(republish) + len(rerun)) & _M
    if req_cons != image.taken_to:
        # The hint is stored right after a batch's frame: a kill in between
        # leaves it at the start of that (complete) batch.
        last = image.frames[-1] if image.frames else None
        if last is None or not (last.first_pos == image.taken_to
                                and (last.first_pos + last.n) & _M == req_cons):
            raise JournalMismatch(f"{len(republish)} unpublished and {len(rerun)} unanswered after rsp_prod {P} "
                                  f"make req_cons {req_cons}, the journal says {image.taken_to}")
    if (req_prod - req_cons) & _M > ring_size:
        raise JournalMismatch(f"ring req_prod {req_prod & _M} is behind the {req_cons} requests taken")
    rerun.sort(key=lambda e: (e.position - req_cons) & _M)  # oldest first (all are before req_cons)
    return TakeoverPlan(P, req_cons, tuple(republish), tuple(rerun), published)
