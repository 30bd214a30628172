"""A hostile frontend: every class of attack on a block backend found in public records.

Each attack drives one ring of a connected reference frontend through its
raw interface (blkfront_raw.RawRing), racing itself from a second process
where the class is a race (hostile_racer.py), and returns an Outcome: how
many requests it put on the ring, how many were answered, the answers that
were wrong (an id never sent, an id answered twice, a status the request
cannot have), pages that must not change and did. What only the backend's
side can see (the disk outside the attacker's window, grant mappings,
tasks, fds, memory) the harness checks between attacks.

The classes, with the public record each comes from:

  double-fetch-slot      XSA-155 / CVE-2015-8550: PV backends reading shared
                         memory twice (check, then use). A racer rewrites the
                         request slots (sector, segments; or the whole slot)
                         between a valid write and hostile variants while the
                         backend takes them.
  double-fetch-indirect  XSA-155 again, on the indirect segment pages and the
                         slot's sector while an indirect write is taken.
  double-fetch-req-prod  XSA-155 on the producer index: req_prod flips between
                         honest and bogus while the backend reads it.
  padding-leak           XSA-216 / CVE-2017-10911: blkif responses leaking the
                         backend's stack through struct padding. Every response
                         written over a slot full of 0xa5 must have zero padding.
  bogus-req-prod         Linux blkback's RING_REQUEST_PROD_OVERFLOW check ("Frontend
                         provided bogus ring requests ... Halting ring processing"):
                         more requests than the ring holds, req_prod moved backwards,
                         half the index space ahead. The ring must halt, nothing else.
  indirect-abuse         the indirect descriptor checks of blkback's
                         xen_blkbk_parse_indirect/dispatch_rw_block_io: nested
                         indirect, 65535 segments, one over the offer, the ring page
                         itself as the segment page, ungranted segment pages.
  sector-overflow        blkback's "sector + nr_sects overflows / exceeds the device"
                         checks: u64 wrap of sector+count, of the byte offset
                         (sector << 9), discard ranges that wrap to 0.
  grant-abuse            XSA-365 / CVE-2021-26930 (blkback mishandling grant map
                         errors) and the grant rules: refs never granted, beyond the
                         table, reserved, granted to another domain, read-only for a
                         read, a grant naming a frame outside the guest, one bad
                         segment among good ones.
  grant-revoked-racing   XSA-365 again, under a race: a racer revokes and restores
                         the data pages' grant entries while reads and writes use them.
  duplicate-ids          every request with the same id (blkback answers each).
  responses-unconsumed   a guest that never reads a response nor asks to be woken
                         (rsp_event far away) and keeps the ring full.
  notify-storm           XSA-332 / CVE-2020-27673: a guest notifying without a
                         request, as fast as it can; the ring must still serve.
  garbage-slots          random bytes in every slot (what a fuzzer would send).

Vanishing mid-I/O and hostile xenstore nodes are the harness's (they act on
the domain and its nodes, not on a ring).
"""

from __future__ import annotations

import random
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import trio

from ..blkif.abi import SRING, layout
from ..blkif.constants import (
    OP_DISCARD,
    OP_INDIRECT,
    OP_READ,
    OP_WRITE,
    RSP_EOPNOTSUPP,
    RSP_ERROR,
    RSP_OKAY,
    U32_MASK,
    U64_MAX,
)
from ..blkif.encode import encode_segments
from ..xen._libc import buffer_address
from ..xen.interfaces import PAGE_SIZE
from .blkfront_grants import GrantedPage
from .blkfront_raw import RawRing
from .grant_table import ENTRY, GTF_permit_access, GTF_readonly
from .guest import Guest
from .hostile_racer import RaceSpec, racing

ANY = frozenset({RSP_OKAY, RSP_ERROR, RSP_EOPNOTSUPP})
OK_OR_ERROR = frozenset({RSP_OKAY, RSP_ERROR})
ERROR = frozenset({RSP_ERROR})
REFUSED = frozenset({RSP_ERROR, RSP_EOPNOTSUPP})  # discard refused either way when not offered
OKAY = frozenset({RSP_OKAY})

NEVER_GRANTED = 0x7FFF_FFF0  # far beyond any table the simulation gives a guest
OTHER_DOMAIN = 0x7FEE  # a domid no backend in the tests is


@dataclass
class Target:
    """What an attack needs: the raw ring and the facts of the disk it attacks."""

    raw: RawRing
    guest: Guest  # the attacking domain, seen from inside
    socket_path: str  # the hypervisor's, for the racer process
    domid: int
    sectors: int  # disk size in 512-byte sectors
    window: int  # the attacker writes only sectors [0, window): the harness checks the rest
    max_indirect: int  # feature-max-indirect-segments as negotiated (0: none)
    ring_refs: tuple[int, ...] = ()  # the grants of this ring's own pages
    # Persistent grants negotiated: data pages granted writable even for a
    # write, as Linux blkfront does (blkback maps persistent grants r/w).
    persistent: bool = False
    race_seconds: float = 0.3


@dataclass
class Outcome:
    tried: int = 0  # requests put on the ring
    answered: int = 0
    unanswered: int = 0  # expected answers that never came
    wrong: list[str] = field(default_factory=list)  # answers that cannot be right
    halted: bool = False  # the ring halted, as this attack requires
    changed_pages: int = 0  # pages that had to stay unchanged and did not
    race_rounds: int = 0  # the racer's rounds of flips (0: no race)
    needs_reconnect: bool = False  # the ring is no longer usable (halted): reconnect before the next
    cpu_s: float = 0.0  # this process's CPU time during a storm (the backend's, when it runs here)
    wall_s: float = 0.0

    def add(self, other: Outcome) -> None:
        self.tried += other.tried
        self.answered += other.answered
        self.unanswered += other.unanswered
        self.wrong += other.wrong
        self.halted = self.halted or other.halted
        self.changed_pages += other.changed_pages
        self.race_rounds += other.race_rounds
        self.needs_reconnect = self.needs_reconnect or other.needs_reconnect


@dataclass(frozen=True)
class Attack:
    name: str
    record: str  # the public record of the class
    run: Callable[[Target], Awaitable[Outcome]]


# ---- helpers ----------------------------------------------------------------------------------


def _memory_offset(t: Target, view) -> int:
    """Where a view of the guest's own memory lies in it (for the racer)."""
    return buffer_address(view) - t.guest.memory_addr


def _slot(t: Target) -> bytearray:
    return bytearray(t.raw.entry_size)


def _rw(t: Target, op: int, id_: int, sector: int, segs, **kw) -> bytes:
    buf = _slot(t)
    t.raw.encoder.rw(buf, 0, op, id_, sector, segs, **kw)
    return bytes(buf)


def _indirect(t: Target, op: int, id_: int, sector: int, nr: int, grefs, **kw) -> bytes:
    buf = _slot(t)
    t.raw.encoder.indirect(buf, 0, op, id_, sector, nr, grefs, **kw)
    return bytes(buf)


def _discard(t: Target, id_: int, sector: int, nr: int) -> bytes:
    buf = _slot(t)
    t.raw.encoder.discard(buf, 0, id_, sector, nr)
    return bytes(buf)


async def _collect(raw: RawRing, want: int, timeout: float) -> list:
    """Responses until `want` arrived or `timeout` passed (polling too: a
    hostile guest may have turned notifications off)."""
    out: list = []
    deadline = trio.current_time() + timeout
    while len(out) < want and trio.current_time() < deadline:
        out += raw.take_responses()
        if len(out) >= want:
            break
        with trio.move_on_after(0.05):
            await raw.channel.wait()
    return out


async def exchange(t: Target, requests: list[tuple[int, bytes, frozenset[int]]], *,
                   timeout: float = 10.0) -> Outcome:
    """Put the slots on the ring, publish, kick; check each answer against
    its request (by id: a multiset, so duplicate ids are fine)."""
    raw = t.raw
    out = Outcome(tried=len(requests))
    expected: dict[int, list[frozenset[int]]] = {}
    for id_, _, allowed in requests:
        expected.setdefault(id_, []).append(allowed)
    raw.queue([slot for _, slot, _ in requests])
    raw.publish()
    raw.notify()
    answers = await _collect(raw, len(requests), timeout)
    out.answered = len(answers)
    for r in answers:
        pending = expected.get(r.id)
        if not pending:
            out.wrong.append(f"answer for id {r.id:#x} that was not pending")
            continue
        allowed = pending.pop(0)
        if r.status not in allowed:
            out.wrong.append(f"id {r.id:#x} op {r.op}: status {r.status} not in {sorted(allowed)}")
    out.unanswered = sum(len(v) for v in expected.values())
    return out


async def _counted(t: Target, slots: list[bytes], *, timeout: float = 10.0) -> Outcome:
    """For slots whose id bytes a racer may clobber: count answers by rsp_prod."""
    raw = t.raw
    before = raw.rsp_prod
    raw.queue(slots)
    raw.publish()
    raw.notify()
    with trio.move_on_after(timeout):
        while ((raw.rsp_prod - before) & U32_MASK) < len(slots):
            with trio.move_on_after(0.05):
                await raw.channel.wait()
    answered = (raw.rsp_prod - before) & U32_MASK
    raw.take_responses()  # whatever they say: a racer wrote over them
    return Outcome(tried=len(slots), answered=answered, unanswered=len(slots) - answered)


@dataclass(frozen=True)
class Page:
    """A page granted to the backend for an attack (released with the raw ring)."""

    gref: int
    frame: int
    view: memoryview


def _page(t: Target, *, readonly: bool, data: bytes = b"") -> Page:
    granted: GrantedPage = t.raw.grant_page(readonly=readonly, data=data)
    assert granted.gref is not None  # grant_page always grants
    return Page(granted.gref, granted.frame, granted.view)


def _data_pages(t: Target, n: int, *, readonly: bool, seed: int) -> list[Page]:
    """Pages with random data; `readonly` for what the backend only reads (a
    write's data), which with persistent grants are granted writable anyway."""
    rng = random.Random(seed)
    readonly = readonly and not t.persistent
    return [_page(t, readonly=readonly, data=rng.randbytes(PAGE_SIZE)) for _ in range(n)]


def _window_sector(t: Target, i: int, sectors: int = 8) -> int:
    return (i * sectors) % (t.window - sectors)


# ---- the attacks ------------------------------------------------------------------------------


async def double_fetch_slot(t: Target) -> Outcome:
    """Two races: (a) sector and segments flip, ids intact, every answer checked
    by id; (b) the whole slot flips (op, nr_segments too), answers counted."""
    raw = t.raw
    lay = layout(raw.abi)
    sector_off = lay.request.offset("sector_number")
    total = Outcome()
    n = min(raw.size, 16)
    for whole in (False, True):
        pages = _data_pages(t, n, readonly=True, seed=155)
        base = raw.ring.req_prod_pvt
        valid, flips = [], []
        for i, page in enumerate(pages):
            good = _rw(t, OP_WRITE, 0x1550 + i, _window_sector(t, i), [(page.gref, 0, 7)])
            hostile = [
                _rw(t, OP_WRITE, 0x1550 + i, t.sectors - 4, [(page.gref, 0, 7)]),  # past the end
                _rw(t, OP_WRITE, 0x1550 + i, _window_sector(t, i), [(page.gref, 0, 7)], nr_segments=255),
                _rw(t, OP_WRITE, 0x1550 + i, _window_sector(t, i), [(page.gref, 0, 200)]),
                _rw(t, OP_WRITE, 0x1550 + i, _window_sector(t, i), [(NEVER_GRANTED, 0, 7)]),
                _rw(t, OP_WRITE, 0x1550 + i, U64_MAX - 3, [(page.gref, 0, 7)]),
                _rw(t, OP_READ, 0x1550 + i, _window_sector(t, i), [(page.gref, 0, 7)]),  # read into r/o
                _discard(t, 0x1550 + i, 0, U64_MAX),
            ]
            variant = hostile[i % len(hostile)]
            valid.append(good)
            off = _memory_offset(t, raw.view[raw.slot_offset(base + i):])
            start = 0 if whole else sector_off
            flips.append((off + start, [good[start:], variant[start:]]))
        async with racing(t.socket_path, t.domid, RaceSpec(memory=flips)) as racer:
            if whole:
                got = await _counted(t, valid)
            else:
                got = await exchange(t, [(0x1550 + i, slot, ANY) for i, slot in enumerate(valid)])
        got.race_rounds = racer.rounds
        total.add(got)
    return total


async def double_fetch_indirect(t: Target) -> Outcome:
    if not t.max_indirect:
        return Outcome()
    raw = t.raw
    lay = layout(raw.abi)
    sector_off = lay.indirect.offset("sector_number")
    nseg = min(16, t.max_indirect)
    total = Outcome()
    for round_ in range(2):
        data = _data_pages(t, nseg, readonly=True, seed=round_)
        good_segs = [(p.gref, 0, 7) for p in data]
        hostile_segs = [
            [(NEVER_GRANTED, 0, 7)] * nseg,
            [(p.gref, 0, 200) for p in data],
            [(p.gref, 7, 0) for p in data],
            good_segs[:-1] + [(0xFFFF_FFFF, 0, 7)],
        ]
        n = 4
        base = raw.ring.req_prod_pvt
        slots, flips = [], []
        for i in range(n):
            ind = _page(t, readonly=not t.persistent, data=encode_segments(good_segs))
            sector = _window_sector(t, i, nseg * 8)
            slot = _indirect(t, OP_WRITE, 0x1551 + i, sector, nseg, [ind.gref])
            slots.append((0x1551 + i, slot, ANY))
            good = encode_segments(good_segs)
            bad = encode_segments(hostile_segs[(i + round_) % len(hostile_segs)])
            flips.append((_memory_offset(t, ind.view), [good, bad]))
            slot_mem = _memory_offset(t, raw.view[raw.slot_offset(base + i):]) + sector_off
            flips.append((slot_mem, [struct.pack("<Q", sector), struct.pack("<Q", t.sectors - 1)]))
        async with racing(t.socket_path, t.domid, RaceSpec(memory=flips)) as racer:
            got = await exchange(t, slots)
        got.race_rounds = racer.rounds
        total.add(got)
    return total


async def double_fetch_req_prod(t: Target) -> Outcome:
    """req_prod flips between 4 honest requests and half the index space ahead:
    the backend either halts the ring or serves the 4; never anything else."""
    raw = t.raw
    pages = _data_pages(t, 4, readonly=True, seed=3)
    slots = [_rw(t, OP_WRITE, 0x1552 + i, _window_sector(t, i), [(p.gref, 0, 7)]) for i, p in enumerate(pages)]
    first = raw.queue(slots)
    honest = (first + 4) & U32_MASK
    off = _memory_offset(t, raw.view) + SRING.offset("req_prod")
    flips = [(off, [struct.pack("<I", honest), struct.pack("<I", (first + (1 << 31)) & U32_MASK)])]
    async with racing(t.socket_path, t.domid, RaceSpec(memory=flips)) as racer:
        raw.notify()
        await trio.sleep(t.race_seconds)
    # The racer's last write may be either value: settle it honestly and look.
    raw.set_req_prod(honest)
    raw.notify()
    answers = await _collect(raw, 4, 1.0)
    out = Outcome(tried=4, answered=len(answers), race_rounds=racer.rounds)
    for r in answers:
        if r.status != RSP_OKAY:
            out.wrong.append(f"honest write id {r.id:#x} answered {r.status}")
    if len(answers) == 4:
        # Served all four, but it may have seen a bogus value after that (at
        # its final check): one more honest request says whether it halted.
        again = _rw(t, OP_WRITE, 0x1556, 0, [(pages[0].gref, 0, 7)])
        probe = await exchange(t, [(0x1556, again, OKAY)], timeout=3.0)
        out.tried += 1
        out.answered += probe.answered
        out.wrong += probe.wrong
        if probe.answered:
            return out
    out.halted = out.needs_reconnect = True  # it saw a bogus value and halted: correct
    return out


async def padding_leak(t: Target) -> Outcome:
    raw = t.raw
    lay = layout(raw.abi)
    n = raw.size
    slots = []
    for _ in range(n):
        slot = bytearray(b"\xa5" * raw.entry_size)  # op 0xa5: unknown; id 0xa5a5...
        slots.append(bytes(slot))
    before = raw.rsp_prod
    first = raw.queue(slots)
    raw.publish()
    raw.notify()
    with trio.move_on_after(10):
        while ((raw.rsp_prod - before) & U32_MASK) < n:
            with trio.move_on_after(0.05):
                await raw.channel.wait()
    out = Outcome(tried=n, answered=(raw.rsp_prod - before) & U32_MASK)
    out.unanswered = n - out.answered
    want = lay.response_struct.pack(0xA5A5A5A5A5A5A5A5, 0xA5, RSP_EOPNOTSUPP)
    for i in range(out.answered):
        off = raw.slot_offset(first + i)
        got = bytes(raw.view[off:off + len(want)])
        if got != want:
            out.wrong.append(f"response {i}: {got.hex()} != {want.hex()} (padding or fields)")
    raw.take_responses()
    return out


def bogus_variant(k: int) -> Callable[[Target], Awaitable[Outcome]]:
    """One bogus req_prod (BOGUS_VARIANTS[k]); each halts the ring, so the
    harness reconnects before the next attack."""
    async def run(t: Target) -> Outcome:
        raw = t.raw
        # An honest exchange first, so "backwards" has somewhere to go back from.
        page = _data_pages(t, 1, readonly=True, seed=k)[0]
        out = await exchange(t, [(0xB0 + k, _rw(t, OP_WRITE, 0xB0 + k, 0, [(page.gref, 0, 7)]), OKAY)])
        prod = raw.req_prod
        bogus = [prod + raw.size + 1, prod - 1, prod + (1 << 31), prod - raw.size][k]
        raw.set_req_prod(bogus)
        raw.notify()
        late = await _collect(raw, 1, 0.5)
        if late:
            out.wrong.append(f"{len(late)} answers after req_prod {bogus & U32_MASK:#x} (rsp_prod {raw.rsp_prod:#x})")
        # Then an honest request: a halted ring must not serve it either.
        raw.set_req_prod(prod)
        honest = await exchange(t, [(0xB8, _rw(t, OP_WRITE, 0xB8, 0, [(page.gref, 0, 7)]), OKAY)], timeout=0.5)
        if honest.answered:
            out.wrong.append("a halted ring answered a later request")
        out.tried += 2
        out.halted = not late and not honest.answered
        out.needs_reconnect = True
        return out
    return run


BOGUS_VARIANTS = ("more than the ring holds", "moved back by one", "half the index space ahead",
                  "moved back by a whole ring")


async def indirect_abuse(t: Target) -> Outcome:
    if not t.max_indirect:
        return Outcome()
    data = _data_pages(t, 12, readonly=True, seed=12)
    segs = [(p.gref, 0, 7) for p in data]
    page = _page(t, readonly=not t.persistent, data=encode_segments(segs))
    other = t.guest.alloc_pages(1)[0]
    foreign = t.guest.grant_access(other, OTHER_DOMAIN, True)
    ring_ref = t.ring_refs[0] if t.ring_refs else NEVER_GRANTED
    cases = [
        (0xD0, _indirect(t, OP_INDIRECT, 0xD0, 0, 12, [page.gref]), ERROR),  # nested indirect
        (0xD1, _indirect(t, OP_WRITE, 0xD1, 0, 65535, [page.gref]), ERROR),
        (0xD2, _indirect(t, OP_WRITE, 0xD2, 0, t.max_indirect + 1, [page.gref] * 8), ERROR),
        (0xD3, _indirect(t, OP_WRITE, 0xD3, 0, 12, [ring_ref]), ANY),  # the ring as segment list
        (0xD4, _indirect(t, OP_WRITE, 0xD4, 0, 12, [NEVER_GRANTED]), ERROR),
        (0xD5, _indirect(t, OP_WRITE, 0xD5, 0, 12, [foreign]), ERROR),
        (0xD6, _indirect(t, OP_READ, 0xD6, 0, 0, [page.gref]), ERROR),
        (0xD7, _indirect(t, OP_DISCARD, 0xD7, 0, 12, [page.gref]), ERROR),
        # Unused indirect grefs are never looked at: junk there is fine.
        (0xD8, _indirect(t, OP_WRITE, 0xD8, 16, 12, [page.gref, NEVER_GRANTED, 0xFFFF_FFFF]), OKAY),
        (0xD9, _indirect(t, OP_WRITE, 0xD9, t.sectors - 8, 12, [page.gref]), ERROR),  # past the end
    ]
    out = await exchange(t, cases)
    t.guest.end_access(foreign)
    t.guest.free_pages([other])
    return out


async def sector_overflow(t: Target) -> Outcome:
    ro = _data_pages(t, 1, readonly=True, seed=9)[0]
    rw = _data_pages(t, 1, readonly=False, seed=10)[0]
    before = bytes(rw.view)
    seg = [(ro.gref, 0, 7)]
    cases = [
        (0xE0, _rw(t, OP_WRITE, 0xE0, U64_MAX - 3, seg), ERROR),   # sector + 8 wraps
        (0xE1, _rw(t, OP_WRITE, 0xE1, t.sectors - 4, seg), ERROR),  # crosses the end
        (0xE2, _rw(t, OP_WRITE, 0xE2, 1 << 55, seg), ERROR),       # sector << 9 wraps to byte 0
        (0xE3, _rw(t, OP_WRITE, 0xE3, (1 << 55) + 0x800, seg), ERROR),
        (0xE4, _rw(t, OP_READ, 0xE4, t.sectors, [(rw.gref, 0, 0)]), ERROR),  # the sector after the end
        (0xE5, _discard(t, 0xE5, 1 << 63, 1 << 63), REFUSED),       # sum wraps to exactly 0
        (0xE6, _discard(t, 0xE6, t.sectors - 8, 16), REFUSED),
        (0xE7, _discard(t, 0xE7, 8, U64_MAX), REFUSED),
        (0xE8, _rw(t, OP_WRITE, 0xE8, U64_MAX, seg), ERROR),
    ]
    out = await exchange(t, cases)
    if bytes(rw.view) != before:
        out.changed_pages += 1
    return out


async def grant_abuse(t: Target) -> Outcome:
    raw = t.raw
    guest = t.guest
    good = _data_pages(t, 11, readonly=True, seed=11)
    ro_target = _page(t, readonly=True, data=random.Random(12).randbytes(PAGE_SIZE))
    ro_before = bytes(ro_target.view)
    [frame] = guest.alloc_pages(1)
    foreign = guest.grant_access(frame, OTHER_DOMAIN, False)
    [frame2] = guest.alloc_pages(1)
    wild = guest.grant_access(frame2, raw.backend_domid, False)
    # Rewrite that entry to name a frame the guest does not have (as a guest may).
    ENTRY.pack_into(guest.table._buf, wild * ENTRY.size,
                    GTF_permit_access, raw.backend_domid, 0x7FFF_FFFF)
    w = _window_sector
    cases = [
        (0xF0, _rw(t, OP_WRITE, 0xF0, w(t, 0), [(NEVER_GRANTED, 0, 7)]), ERROR),
        (0xF1, _rw(t, OP_WRITE, 0xF1, w(t, 1), [(0xFFFF_FFFF, 0, 7)]), ERROR),  # beyond the table
        (0xF2, _rw(t, OP_WRITE, 0xF2, w(t, 2), [(0, 0, 7)]), ERROR),  # reserved ref 0
        (0xF3, _rw(t, OP_READ, 0xF3, w(t, 3), [(foreign, 0, 7)]), ERROR),  # another domain's
        (0xF4, _rw(t, OP_READ, 0xF4, w(t, 4), [(ro_target.gref, 0, 7)]), ERROR),  # read into r/o
        (0xF5, _rw(t, OP_WRITE, 0xF5, w(t, 5), [(wild, 0, 7)]), ERROR),  # frame outside the guest
        (0xF6, _rw(t, OP_READ, 0xF6, w(t, 6), [(wild, 0, 7)]), ERROR),
        # one bad segment after ten good ones: the whole request fails (XSA-365)
        (0xF7, _rw(t, OP_WRITE, 0xF7, w(t, 7, 88), [(p.gref, 0, 7) for p in good[:10]] + [(NEVER_GRANTED, 0, 7)]),
         ERROR),
        (0xF8, _rw(t, OP_WRITE, 0xF8, w(t, 8, 88), [(NEVER_GRANTED, 0, 7)] + [(p.gref, 0, 7) for p in good[:10]]),
         ERROR),
    ]
    out = await exchange(t, cases)
    if bytes(ro_target.view) != ro_before:
        out.changed_pages += 1
    for ref, fr in ((foreign, frame), (wild, frame2)):
        guest.end_access(ref)
        guest.free_pages([fr])
    return out


async def grant_revoked_racing(t: Target) -> Outcome:
    raw = t.raw
    n = min(raw.size, 16)
    total = Outcome()
    for readonly, op in ((True, OP_WRITE), (False, OP_READ)):
        pages = _data_pages(t, n, readonly=readonly, seed=365)
        granted = GTF_permit_access | (GTF_readonly if readonly and not t.persistent else 0)
        spec = RaceSpec(grants=[(p.gref, [granted, 0, granted | GTF_readonly, granted]) for p in pages])
        slots = [(0x3650 + i, _rw(t, op, 0x3650 + i, _window_sector(t, i), [(p.gref, 0, 7)]), OK_OR_ERROR)
                 for i, p in enumerate(pages)]
        async with racing(t.socket_path, t.domid, spec) as racer:
            got = await exchange(t, slots)
        got.race_rounds = racer.rounds
        # The racer left the flags as it liked: make them honest again (nothing is mapped now).
        for p in pages:
            ENTRY.pack_into(t.guest.table._buf, p.gref * ENTRY.size,
                            granted, raw.backend_domid, p.frame)
        total.add(got)
    return total


async def duplicate_ids(t: Target) -> Outcome:
    raw = t.raw
    n = min(raw.size, 32)
    pages = _data_pages(t, n, readonly=False, seed=7)
    slots = []
    for i, p in enumerate(pages):
        op = OP_WRITE if i % 2 else OP_READ
        slots.append((7, _rw(t, op, 7, _window_sector(t, i), [(p.gref, 0, 7)]), OKAY))
    return await exchange(t, slots)


async def responses_unconsumed(t: Target) -> Outcome:
    raw = t.raw
    page = _data_pages(t, 1, readonly=True, seed=1)[0]
    out = Outcome()
    for _ in range(6):
        raw.set_rsp_event(raw.rsp_prod + (1 << 31))  # "never wake me"
        slots = [_rw(t, OP_WRITE, 0x600 + i, _window_sector(t, i), [(page.gref, 0, 7)]) for i in range(raw.size)]
        before = raw.rsp_prod
        raw.queue(slots)
        raw.publish()
        raw.notify()
        with trio.move_on_after(10):
            while ((raw.rsp_prod - before) & U32_MASK) < len(slots):
                await trio.sleep(0.005)  # polling: no notification was asked for
        got = (raw.rsp_prod - before) & U32_MASK
        out.tried += len(slots)
        out.answered += got
        out.unanswered += len(slots) - got
        # The responses are never read: the private consumer index jumps over them.
        raw.ring.rsp_cons = raw.rsp_prod
    raw.set_rsp_event(raw.rsp_prod + 1)
    return out


async def notify_storm(t: Target) -> Outcome:
    raw = t.raw
    kick_fileno = getattr(raw.channel, "kick_fileno", None)  # the simulated port's eventfd
    if kick_fileno is None:
        raise TypeError("a notify storm needs the simulated event channel's kick fd")
    spec = RaceSpec(kick_fd=kick_fileno())
    cpu0, wall0 = time.process_time(), time.monotonic()
    async with racing(t.socket_path, t.domid, spec) as racer:
        await trio.sleep(t.race_seconds * 3)
        cpu1, wall1 = time.process_time(), time.monotonic()
        # A real request in the middle of the storm is still served.
        page = _data_pages(t, 1, readonly=True, seed=332)[0]
        out = await exchange(t, [(0x332, _rw(t, OP_WRITE, 0x332, 0, [(page.gref, 0, 7)]), OKAY)])
    out.race_rounds = racer.rounds
    out.cpu_s, out.wall_s = cpu1 - cpu0, wall1 - wall0
    return out


async def garbage_slots(t: Target) -> Outcome:
    raw = t.raw
    rng = random.Random(0x6A7B)
    slots = []
    id_off = layout(raw.abi).request.offset("id")
    for i in range(raw.size):
        slot = bytearray(rng.randbytes(raw.entry_size))
        # Keep read/write sectors anywhere: validation has to catch them all.
        struct.pack_into("<Q", slot, id_off, 0x6A000 + i)
        slots.append((0x6A000 + i, bytes(slot), ANY))
    return await exchange(t, slots)


ATTACKS: list[Attack] = [
    Attack("double-fetch-slot", "XSA-155 (CVE-2015-8550)", double_fetch_slot),
    Attack("double-fetch-indirect", "XSA-155 (CVE-2015-8550)", double_fetch_indirect),
    Attack("double-fetch-req-prod", "XSA-155 (CVE-2015-8550)", double_fetch_req_prod),
    Attack("padding-leak", "XSA-216 (CVE-2017-10911)", padding_leak),
    *[Attack(f"bogus-req-prod/{name}", "blkback RING_REQUEST_PROD_OVERFLOW", bogus_variant(k))
      for k, name in enumerate(BOGUS_VARIANTS)],
    Attack("indirect-abuse", "blkback xen_blkbk_parse_indirect limits", indirect_abuse),
    Attack("sector-overflow", "blkback sector range checks", sector_overflow),
    Attack("grant-abuse", "XSA-365 (CVE-2021-26930)", grant_abuse),
    Attack("grant-revoked-racing", "XSA-365 (CVE-2021-26930)", grant_revoked_racing),
    Attack("duplicate-ids", "blkif: ids are the frontend's, echoed", duplicate_ids),
    Attack("responses-unconsumed", "blkif ring flow control", responses_unconsumed),
    Attack("notify-storm", "XSA-332 (CVE-2020-27673)", notify_storm),
    Attack("garbage-slots", "blkback validation (fuzz-like)", garbage_slots),
]
