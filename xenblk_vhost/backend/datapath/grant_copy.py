"""Building grant-copy batches cheaply, and running them so one bad page fails one request.

A batch is a list of CopySegment and, in step, the owner each segment
belongs to (a Slot, or any object with a `status` attribute). run() makes
ONE Gntdev.grant_copy call for the whole batch and sets owner.status to
RSP_ERROR for every owner one of whose segments did not copy (GNTST_* != 0),
so a bad grant fails its own request only. If the call itself raises (the
ioctl refused the whole array) every owner in the batch fails.

CopySegment is a frozen slots dataclass; its generated __init__ costs about
twice what building the same object through its slot descriptors costs
(measured 1.9 against 0.9 us here), and the datapath makes one per segment,
so `segment()` builds it that way: the result is an ordinary, equal
CopySegment. Were CopySegment made a NamedTuple (proposed: 0.2 us), segment()
builds it with tuple.__new__ instead; nothing else here changes.

The copy data path does without CopySegment altogether: it packs each
request's segments straight into a CopyBatch (the kernel's own array) and
runs it with run_batch (Gntdev.grant_copy_batch): one pack per segment
instead of an object and then a pack, and the simulator's copy of such a
batch is compiled (native/sim_grant_copy.c).
"""

from __future__ import annotations

import logging
from typing import Any

from ...blkif.constants import RSP_ERROR
from ...xen.gntdev import CopyBatch
from ...xen.interfaces import CopySegment, Gntdev

log = logging.getLogger(__name__)

# The class as the builders below see it: its attributes are slot descriptors, which
# a type checker (seeing instance fields) cannot know.
_CopySegmentClass: Any = CopySegment

if issubclass(CopySegment, tuple):  # a NamedTuple: one C call
    _tuple_new: Any = tuple.__new__

    def segment(to_guest: bool, domid: int, gref: int, guest_offset: int, local_addr: int,
                length: int) -> CopySegment:
        """CopySegment(to_guest, domid, gref, guest_offset, local_addr, length), built fast."""
        return _tuple_new(CopySegment, (to_guest, domid, gref, guest_offset, local_addr, length))
else:
    _new = object.__new__
    _set_to_guest = _CopySegmentClass.to_guest.__set__
    _set_domid = _CopySegmentClass.domid.__set__
    _set_gref = _CopySegmentClass.gref.__set__
    _set_offset = _CopySegmentClass.guest_offset.__set__
    _set_addr = _CopySegmentClass.local_addr.__set__
    _set_length = _CopySegmentClass.length.__set__

    def segment(to_guest: bool, domid: int, gref: int, guest_offset: int, local_addr: int,
                length: int) -> CopySegment:
        """CopySegment(to_guest, domid, gref, guest_offset, local_addr, length), built fast."""
        s = _new(CopySegment)
        _set_to_guest(s, to_guest)
        _set_domid(s, domid)
        _set_gref(s, gref)
        _set_offset(s, guest_offset)
        _set_addr(s, local_addr)
        _set_length(s, length)
        return s


def run_batch(gntdev: Gntdev, batch: CopyBatch) -> int:
    """run_copy for a packed CopyBatch (its owners added with each request): one grant_copy_batch,
    the owners of failed segments get RSP_ERROR. Returns how many segments failed."""
    if not batch.owners:
        return 0
    try:
        gntdev.grant_copy_batch(batch)
    except OSError as e:
        log.warning("grant copy of %d segments failed as a whole: %s", len(batch.owners), e)
        for owner in batch.owners:
            owner.status = RSP_ERROR
        return len(batch.owners)
    failed = batch.failed_owners()
    for owner in failed:
        owner.status = RSP_ERROR
    return len(failed)


def run_copy(gntdev: Gntdev, segments: list[CopySegment], owners: list) -> int:
    """One grant_copy for all segments; fail the owners of failed ones. Returns how many failed."""
    if not segments:
        return 0
    try:
        statuses = gntdev.grant_copy(segments)
    except OSError as e:
        log.warning("grant copy of %d segments failed as a whole: %s", len(segments), e)
        for owner in owners:
            owner.status = RSP_ERROR
        return len(segments)
    if not any(statuses):
        return 0
    failed = 0
    for st, owner in zip(statuses, owners):
        if st:
            owner.status = RSP_ERROR
            failed += 1
    return failed
