"""Fuzz target: one ring drain as the backend does it, against an oracle written from blkif.h.

The input picks an ABI (native, x86_32, x86_64), a ring order, the device's limits (size, logical
block size, read-only, flush/barrier/discard, max indirect segments), the shared indices, and the bytes
of the slots and of the indirect pages. Then, as ring_worker does: attach, take a batch
(RequestIntake.take), resolve indirect requests from their pages, answer, and a second drain after the
guest moved req_prod again (forwards, backwards or absurdly).

Properties:
  - the only exception is RingOverflow, exactly when blkback's RING_REQUEST_PROD_OVERFLOW says the
    producer index is bogus, and then nothing is consumed;
  - the batch has as many entries as blkback's consume loop (`while rc != rp`, stopping at
    RING_REQUEST_CONS_OVERFLOW) would take, and req_cons moves past exactly those;
  - each verdict (accepted with the same fields, or rejected with the same id, echoed op and status)
    equals the oracle's, which reads the slot at the C structs' offsets (hard-coded here, per ABI, not
    taken from blkif/abi.py) and applies the rules in the order blkback and the docstrings give;
  - an accepted request encodes back (RequestEncoder) to a slot that decodes to the same request;
  - responses land at rsp_prod.. with the id, op and status given, and the notify decision is
    RING_PUSH_RESPONSES_AND_CHECK_NOTIFY's;
  - the compiled intake (native/intake.py), when it can be built, returns the very same verdicts for
    the same slots and indirect pages as the Python one.
"""

from __future__ import annotations

from typing import NamedTuple

from xenblk_vhost.blkif.abi import Abi
from xenblk_vhost.blkif.decode import RequestDecoder
from xenblk_vhost.blkif.encode import RequestEncoder
from xenblk_vhost.blkif.intake import RequestIntake
from xenblk_vhost.blkif.request import DiscardRequest, IndirectRequest, Rejection, Request
from xenblk_vhost.blkif.ring import BackRing, RingOverflow
from xenblk_vhost.blkif.validate import RequestLimits

from .bytes_reader import ByteReader

M32 = (1 << 32) - 1
U64_MAX = (1 << 64) - 1
OKAY, ERROR, EOPNOTSUPP = 0, -1, -2
PAGE = 4096
HEADER = 64  # struct blkif_sring before ring[]


class Offsets(NamedTuple):
    """Where blkif.h's fields sit in one slot, per ABI (x86_64 aligns uint64_t to 8, x86_32 to 4)."""

    entry: int
    id: int
    sector: int
    seg: int  # blkif_request.seg[]
    discard_nr: int  # blkif_request_discard.nr_sectors
    indirect_handle: int
    indirect_grefs: int


X86_64 = Offsets(entry=112, id=8, sector=16, seg=24, discard_nr=24, indirect_handle=24, indirect_grefs=28)
X86_32 = Offsets(entry=108, id=4, sector=12, seg=20, discard_nr=20, indirect_handle=20, indirect_grefs=24)
ABIS = ((Abi.NATIVE, X86_64), (Abi.X86_32, X86_32), (Abi.X86_64, X86_64))


def u(buf: bytes, off: int, n: int) -> int:
    return int.from_bytes(buf[off:off + n], "little")


def ring_size(o: Offsets, order: int) -> int:
    """__RING_SIZE: the largest power of two of slots that fits after the header."""
    fit = ((PAGE << order) - HEADER) // o.entry
    size = 1
    while size * 2 <= fit:
        size *= 2
    return size


# ---------------------------------------------------------------- the oracle


def reject(id_: int, op: int, status: int) -> tuple:
    return ("reject", id_, op, status)


def expect_rw(op, id_, handle, sector, segs, lim: RequestLimits, indirect: bool) -> tuple:
    if op == 3 and not lim.flush_enabled or op == 2 and not lim.barrier_enabled:
        return reject(id_, op, EOPNOTSUPP)
    nr = sum(last - first + 1 for _g, first, last in segs)
    if lim.read_only and (op == 1 or op == 2 and nr > 0):
        return reject(id_, op, ERROR)
    if nr:
        if sector + nr > U64_MAX or sector + nr > lim.sectors:
            return reject(id_, op, ERROR)
        bs = lim.logical_block_size // 512
        if sector % bs or any((last - first + 1) % bs for _g, first, last in segs):
            return reject(id_, op, ERROR)
    return ("rw", op, id_, handle, sector, tuple(segs), nr, indirect)


def segments(raw: bytes, count: int) -> list[tuple[int, int, int]] | None:
    segs = [(u(raw, 8 * k, 4), raw[8 * k + 4], raw[8 * k + 5]) for k in range(count)]
    if any(last > 7 or first > last for _g, first, last in segs):
        return None
    return segs


def expect_slot(slot: bytes, o: Offsets, lim: RequestLimits) -> tuple:
    op = slot[0]
    id_ = u(slot, o.id, 8)
    sector = u(slot, o.sector, 8)
    if op <= 3:  # READ, WRITE, WRITE_BARRIER, FLUSH_DISKCACHE
        nseg = slot[1]
        if nseg == 0 and op <= 1 or nseg > 11:
            return reject(id_, op, ERROR)
        segs = segments(slot[o.seg:o.seg + 8 * nseg], nseg)
        if segs is None:
            return reject(id_, op, ERROR)
        return expect_rw(op, id_, u(slot, 2, 2), sector, segs, lim, False)
    if op == 5:  # DISCARD
        nr = u(slot, o.discard_nr, 8)
        if not lim.discard_enabled:
            return reject(id_, op, EOPNOTSUPP)
        if lim.read_only:
            return reject(id_, op, ERROR)
        if nr and (sector + nr > U64_MAX or sector + nr > lim.sectors):
            return reject(id_, op, ERROR)
        bs = lim.logical_block_size // 512
        if sector % bs or nr % bs:
            return reject(id_, op, ERROR)
        return ("discard", op, id_, u(slot, 2, 2), sector, nr, slot[1])
    if op == 6:  # INDIRECT
        iop, nseg = slot[1], u(slot, 2, 2)
        if iop > 1 or nseg == 0 or nseg > 8 * 512 or nseg > lim.max_indirect_segments:
            return reject(id_, iop, ERROR)
        if lim.read_only and iop == 1:
            return reject(id_, iop, ERROR)
        pages = (nseg + 511) // 512
        grefs = tuple(u(slot, o.indirect_grefs + 4 * k, 4) for k in range(pages))
        return ("indirect", 6, iop, id_, u(slot, o.indirect_handle, 2), sector, nseg, grefs)
    return reject(id_, op, EOPNOTSUPP)  # 4 (never valid) and 7..255


def verdict(item) -> tuple:
    """The production object in the oracle's shape."""
    kind = type(item)
    if kind is Rejection:
        return reject(item.id, item.op, item.status)
    if kind is Request:
        return ("rw", *item)
    if kind is DiscardRequest:
        return ("discard", *item)
    if kind is IndirectRequest:
        return ("indirect", *item)
    raise AssertionError(f"intake returned a {kind.__name__}")


def blkback_consumes(req_prod: int, req_cons: int, rsp_prod_pvt: int, size: int, max_count: int) -> int | None:
    """blkback's __do_block_io_op loop: None for a bogus req_prod, else how many it takes."""
    if (req_prod - rsp_prod_pvt) & M32 > size:
        return None
    rc, taken = req_cons, 0
    while rc != req_prod and taken < max_count:
        if (rc - rsp_prod_pvt) & M32 >= size:  # RING_REQUEST_CONS_OVERFLOW
            break
        rc = (rc + 1) & M32
        taken += 1
    return taken


# ---------------------------------------------------------------- the target


_compiled_tried = False
_compiled_factory = None


def _compiled(abi: Abi, lim: RequestLimits):
    """The compiled intake for the same limits, or None when the kernels cannot be built."""
    global _compiled_tried, _compiled_factory
    if not _compiled_tried:
        _compiled_tried = True
        try:
            from xenblk_vhost import native
            from xenblk_vhost.native.intake import CompiledIntake

            native.load()
            _compiled_factory = CompiledIntake
        except Exception:  # noqa: BLE001 - no compiler here: the Python intake alone is checked
            _compiled_factory = None
    return None if _compiled_factory is None else _compiled_factory(abi, lim)


def _limits(r: ByteReader) -> RequestLimits:
    mode = r.below(3)
    sectors = r.uint(8) if mode == 0 else r.uint(2) if mode == 1 else U64_MAX - r.u8()
    flags = r.u8()
    return RequestLimits(sectors=sectors, logical_block_size=512 << r.below(4), read_only=bool(flags & 1),
                         flush_enabled=bool(flags & 2), barrier_enabled=bool(flags & 4),
                         discard_enabled=bool(flags & 8), max_indirect_segments=r.uint(2) % 4097)


def _drain(r: ByteReader, ring: BackRing, intake: RequestIntake, view: memoryview, o: Offsets,
           lim: RequestLimits, size: int, max_count: int) -> list[tuple]:
    """One take() checked against the oracle; the final verdicts, in ring order."""
    cons0, pvt = ring.req_cons, ring.rsp_prod_pvt
    req_prod = u(view, 0, 4)
    expected_n = blkback_consumes(req_prod, cons0, pvt, size, max_count)
    slots = [bytes(view[HEADER + ((cons0 + i) & (size - 1)) * o.entry:][:o.entry])
             for i in range(expected_n or 0)]
    try:
        batch = intake.take(ring, max_count)
    except RingOverflow:
        assert expected_n is None, f"RingOverflow but blkback would take {expected_n}"
        assert ring.req_cons == cons0, "a bogus req_prod consumed requests"
        return []
    assert expected_n is not None, f"req_prod {req_prod} is bogus (rsp_prod_pvt {pvt}, size {size}): taken"
    assert len(batch) == expected_n, f"took {len(batch)}, blkback takes {expected_n}"
    assert ring.req_cons == (cons0 + expected_n) & M32
    encoder, decoder = RequestEncoder(intake.abi), RequestDecoder(intake.abi)
    compiled = _compiled(intake.abi, lim)
    if compiled is not None:
        assert compiled.parse(b"".join(slots), len(slots)) == batch, "compiled intake differs"
    finals = []
    for item, slot in zip(batch, slots):
        want = expect_slot(slot, o, lim)
        got = verdict(item)
        assert got == want, f"slot {slot.hex()}: intake {got}, oracle {want}"
        if want[0] != "reject":
            assert decoder.decode(encoder.slot(item)) == item, f"{item} does not survive encode + decode"
        if want[0] == "indirect":
            nseg = want[6]
            pages = r.take(8 * nseg)
            segs = segments(pages, nseg)
            _op, _iop, id_, handle, sector = want[1:6]
            want = reject(id_, _iop, ERROR) if segs is None else expect_rw(_iop, id_, handle, sector, segs, lim, True)
            got = verdict(intake.decode_indirect_segments(item, pages))
            if compiled is not None:
                assert verdict(compiled.decode_indirect_segments(item, pages)) == got, "compiled indirect differs"
            assert got == want, f"indirect {item} pages {pages[:64].hex()}...: intake {got}, oracle {want}"
            try:
                intake.decode_indirect_segments(item, pages[:-1])
            except ValueError:
                pass  # documented: the backend handed too little (a bug of ours, never the guest's)
            else:
                raise AssertionError("short indirect pages accepted")
        finals.append(want)
    return finals


def _answer(ring: BackRing, view: memoryview, o: Offsets, size: int, finals: list[tuple], rsp_event: int) -> None:
    old = u(view, 8, 4)
    first = ring.rsp_prod_pvt
    for want in finals:
        if want[0] == "reject":
            ring.put_response(want[1], want[2], want[3])
        else:
            ring.put_response(want[2], want[1], OKAY)  # ("rw" | "discard", op, id, ...)
    view[12:16] = (rsp_event & M32).to_bytes(4, "little")
    notify = ring.push_responses()
    new = (first + len(finals)) & M32
    assert u(view, 8, 4) == new, "rsp_prod not published"
    assert notify == (((new - rsp_event) & M32) < ((new - old) & M32)), "notify decision differs from ring.h"
    for i, want in enumerate(finals):
        at = HEADER + ((first + i) & (size - 1)) * o.entry
        rsp = bytes(view[at:at + 12])
        id_, op = (want[1], want[2]) if want[0] == "reject" else (want[2], want[1])
        status = want[3] if want[0] == "reject" else OKAY
        assert (u(rsp, 0, 8), rsp[8], int.from_bytes(rsp[10:12], "little", signed=True)) == (id_, op, status)


def one_input(data: bytes) -> None:
    r = ByteReader(data)
    abi, o = ABIS[r.below(3)]
    order = r.below(5)
    size = ring_size(o, order)
    lim = _limits(r)
    rsp_prod = r.uint(4)
    req_prod = (rsp_prod + r.below(size + 3)) & M32 if r.flag() else r.uint(4)
    rsp_event = (rsp_prod + r.u8()) & M32 if r.flag() else r.uint(4)
    max_count = 1 + r.below(64)
    mem = bytearray(PAGE << order)
    view = memoryview(mem)
    view[0:4] = req_prod.to_bytes(4, "little")
    view[4:8] = r.take(4)  # req_event: the backend's to write, whatever the guest left there
    view[8:12] = rsp_prod.to_bytes(4, "little")
    view[12:16] = rsp_event.to_bytes(4, "little")
    for i in range(min(size, r.below(65))):  # that many slots from rsp_prod on
        at = HEADER + ((rsp_prod + i) & (size - 1)) * o.entry
        view[at:at + o.entry] = r.take(o.entry)

    if (req_prod - rsp_prod) & M32 > size:
        try:
            BackRing(view, abi, order)
        except RingOverflow:
            return
        raise AssertionError(f"attached to a ring whose req_prod {req_prod} is bogus (rsp_prod {rsp_prod})")
    ring = BackRing(view, abi, order)
    intake = RequestIntake(abi, lim)
    finals = _drain(r, ring, intake, view, o, lim, size, max_count)
    answered = finals[:r.below(len(finals) + 1)]
    if answered:
        _answer(ring, view, o, size, answered, rsp_event)
    # The guest moves req_prod again: onwards, backwards, anywhere; then a second drain.
    moved = (req_prod + r.below(size + 3) - r.below(4)) & M32 if r.flag() else r.uint(4)
    view[0:4] = moved.to_bytes(4, "little")
    _drain(r, ring, intake, view, o, lim, size, 1 + r.below(64))


def _below_bytes(value: int, n: int) -> bytes:
    return value.to_bytes(1 if n <= 256 else 2, "little")


def seeds():
    """One ring per ABI with one of each request kind (accepted and refused), and bogus indices."""
    from xenblk_vhost.blkif.abi import layout

    for abi_index, (abi, o) in enumerate(ABIS):
        enc = RequestEncoder(abi)
        lay = layout(abi)
        slots = [
            enc.slot(Request(0, 1, 0, 8, ((11, 0, 7),), 8)),
            enc.slot(Request(0, 9, 0, 8, ((11, 0, 8),), 9)),  # last_sect 8: past the page
            enc.slot(Request(1, 2, 0, 16, ((12, 0, 7), (13, 0, 3)), 12)),
            enc.slot(Request(3, 3, 0, 0, (), 0)),
            enc.slot(Request(2, 4, 0, 24, ((14, 0, 7),), 8)),
            enc.slot(DiscardRequest(5, 5, 0, 64, 64, 0)),
            enc.slot(IndirectRequest(6, 0, 6, 0, 128, 3, (20,))),
            enc.slot(IndirectRequest(6, 1, 7, 0, 256, 600, (21, 22))),
        ]
        other = bytearray(lay.entry_size)
        enc.other(other, 0, 4, 8)
        slots.append(bytes(other))
        size = ring_size(o, 0)
        for bogus in (False, True):
            head = bytes([abi_index, 0])  # ABI, order 0
            head += bytes([1]) + (4096).to_bytes(2, "little") + bytes([0b1110 | bogus, 0]) + (256).to_bytes(2, "little")
            head += (5).to_bytes(4, "little")  # rsp_prod
            head += bytes([0 if bogus else 1]) + ((5 + size + 1).to_bytes(4, "little") if bogus
                                                  else _below_bytes(len(slots), size + 3))
            head += bytes([1, 1])  # rsp_event = rsp_prod + 1
            head += bytes([63])  # max_count 64
            head += bytes(4)  # req_event
            head += bytes([len(slots)])
            pages = (b"".join((30 + k).to_bytes(4, "little") + bytes([0, 7, 0, 0]) for k in range(600)))
            tail = bytes([len(slots), 1, 2, 0])  # answer all; then req_prod + 2
            yield head + b"".join(slots) + pages + tail
