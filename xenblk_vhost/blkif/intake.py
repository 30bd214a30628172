"""One ring drain: copy the published slots out once, decode, validate.

This is the backend's entry point to the protocol core. Per wake-up:

    intake = RequestIntake(abi, limits)          # once per ring (and per resize)
    batch = intake.take(ring, max_count)         # RingOverflow: halt this ring
    for item in batch:
        if type(item) is Rejection: answer (item.id, item.op, item.status)
        elif type(item) is IndirectRequest: copy its pages, then
            item = intake.decode_indirect_segments(item, pages_bytes)
        ...

`take` costs one bytes() copy per contiguous run of slots (two when the
batch wraps the ring) and then works only on that private copy, so a guest
rewriting the ring meanwhile changes nothing we act on.

Public API:
    RequestIntake(abi, limits)
        .take(ring, max_count) -> list[Request | DiscardRequest
                                       | IndirectRequest | Rejection]
        .parse(raw, count, pos=-1) -> same list, from an already private copy
        .record_into(journal_state) -> False: this intake writes no journal (the
                                compiled one can: native/intake.py); .recorded is -1
        .decode_indirect_segments(header, pages_bytes) -> Request | Rejection
        .limits                 the RequestLimits in force
"""

from __future__ import annotations

from .abi import Abi
from .decode import RequestDecoder
from .request import Decoded, IndirectRequest, Rejection, Request
from .ring import BackRing
from .validate import RequestLimits, Validator


class RequestIntake:
    __slots__ = ("abi", "_decoder", "_validator", "_entry")

    recorded = -1  # the compiled intake's journal record of the last batch parsed: none here

    def __init__(self, abi: Abi, limits: RequestLimits) -> None:
        self.abi = abi
        self._decoder = RequestDecoder(abi)
        self._validator = Validator(limits)
        self._entry = self._decoder.layout.entry_size

    @property
    def limits(self) -> RequestLimits:
        return self._validator.limits

    def set_limits(self, limits: RequestLimits) -> None:
        """Apply new device facts (e.g. after an online resize) to later batches."""
        self._validator = Validator(limits)

    def take(self, ring: BackRing, max_count: int) -> list[Decoded]:
        """Consume up to max_count requests from ring and decode+validate them.

        Raises RingOverflow (from the ring) if req_prod is bogus; nothing is
        consumed then.
        """
        if ring.abi is not self.abi:
            raise ValueError(f"ring speaks {ring.abi}, intake {self.abi}")
        raw, n = ring.take_slots(max_count)
        return self.parse(raw, n)

    def record_into(self, journal_state) -> bool:
        """Whether this intake writes each batch's journal record itself: not this one."""
        return False

    def parse(self, raw: bytes, count: int, pos: int = -1) -> list[Decoded]:
        """Decode+validate `count` back-to-back slots of a private copy (pos: its ring position,
        for an intake that records batches in a journal)."""
        decode = self._decoder.decode
        checks = self._validator.check_by_type
        out: list[Decoded] = []
        append = out.append
        for off in range(0, count * self._entry, self._entry):
            item = decode(raw, off)
            append(checks[type(item)](item))
        return out

    def decode_indirect_segments(self, header: IndirectRequest, pages_bytes) -> Request | Rejection:
        """See Validator.decode_indirect_segments."""
        return self._validator.decode_indirect_segments(header, pages_bytes)
