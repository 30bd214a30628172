"""Every per-request rule of DESIGN.md, enforced end to end.

Each case sends one bad request through the shared ring of a served Vbd and
checks the exact response (its own id, the op echoed as blkback echoes it,
the exact status) and that nothing was touched: the backing file is
byte-identical and a page the request named for a read is unchanged.

Rules (DESIGN.md "Per-request rules from the seed"):
  segments 1..11 (0 only for a flush/barrier); indirect segments <= the
  advertised feature-max-indirect-segments; first_sect <= last_sect < 8;
  sector + nr_sects neither overflows nor passes the device end; writes to a
  read-only device fail; I/O aligned to the logical block size; unknown ops
  EOPNOTSUPP; every failure answered BLKIF_RSP_ERROR with the request's id.
Plus what follows from the grant rules: a segment whose grant is bad (never
granted, granted to someone else, read-only for a read) fails its request
only, on both data paths.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

import pytest

from backend_support.frontend import TestFrontend
from backend_support.harness import DISK_SIZE, connected, file_digest, make_disk_file, make_vbd, read_back
from backend_support.qsd_exports import four_k_sector_export
from xenblk_vhost.blkif.abi import Abi
from xenblk_vhost.blkif.constants import (
    OP_DISCARD,
    OP_FLUSH_DISKCACHE,
    OP_READ,
    OP_RESERVED_1,
    OP_WRITE,
    OP_WRITE_BARRIER,
    RSP_EOPNOTSUPP,
    RSP_ERROR,
    RSP_OKAY,
    U64_MAX,
)
from xenblk_vhost.blkif.intake import RequestIntake
from xenblk_vhost.native.intake import ENGINE_ENV, CompiledIntake
from xenblk_vhost.xen.interfaces import PAGE_SIZE

SECTORS = DISK_SIZE // 512
MAX_INDIRECT = 32
NEVER_GRANTED = 4000


@asynccontextmanager
async def served(tmp_path, platform, guest, abi=Abi.NATIVE, **cfg):
    path = make_disk_file(tmp_path / "disk.img")
    cfg.setdefault("max_indirect_segments", MAX_INDIRECT)
    vbd = make_vbd(path, **cfg)
    front = TestFrontend(guest, abi, persistent=cfg.get("persistent_grants", False) and cfg.get("data_path") == "map")
    try:
        async with connected(vbd, front, platform):
            yield vbd, front, path
    finally:
        front.close()
        vbd.close()


async def answer_of(front, ring=0):
    front.push(ring)
    [r] = await front.responses(ring, 1)
    return r


# Each case: (name, config overrides, sender(front) -> expected (id, op, status)).
# A sender may return a page that must stay unchanged (a read's target).

def _page_ro(front):
    return front.data_page(readonly=True, fill=b"W" * PAGE_SIZE)


def _page_rw(front):
    return front.data_page(readonly=False, fill=b"R" * PAGE_SIZE)


def read_no_segments(front):
    front.rw(0, OP_READ, 11, 0, [])
    return (11, OP_READ, RSP_ERROR)


def write_no_segments(front):
    front.rw(0, OP_WRITE, 12, 0, [])
    return (12, OP_WRITE, RSP_ERROR)


def write_twelve_segments(front):
    pages = [_page_ro(front) for _ in range(11)]
    front.rw(0, OP_WRITE, 13, 0, [(p.gref, 0, 7) for p in pages], nr_segments=12)
    return (13, OP_WRITE, RSP_ERROR)


def read_255_segments(front):
    p = _page_rw(front)
    front.rw(0, OP_READ, 14, 0, [(p.gref, 0, 7)], nr_segments=255)
    return (14, OP_READ, RSP_ERROR), p


def flush_twelve_segments(front):
    p = _page_ro(front)
    front.rw(0, OP_FLUSH_DISKCACHE, 15, 0, [(p.gref, 0, 7)], nr_segments=12)
    return (15, OP_FLUSH_DISKCACHE, RSP_ERROR)


def first_after_last(front):
    p = _page_ro(front)
    front.rw(0, OP_WRITE, 16, 0, [(p.gref, 5, 4)])
    return (16, OP_WRITE, RSP_ERROR)


def last_sect_eight(front):
    p = _page_rw(front)
    front.rw(0, OP_READ, 17, 0, [(p.gref, 0, 8)])
    return (17, OP_READ, RSP_ERROR), p


def bad_second_segment(front):
    a, b = _page_ro(front), _page_ro(front)
    front.rw(0, OP_WRITE, 18, 0, [(a.gref, 0, 7), (b.gref, 3, 9)])
    return (18, OP_WRITE, RSP_ERROR)


def past_the_end(front):
    p = _page_ro(front)
    front.rw(0, OP_WRITE, 19, SECTORS - 4, [(p.gref, 0, 7)])
    return (19, OP_WRITE, RSP_ERROR)


def far_past_the_end(front):
    p = _page_rw(front)
    front.rw(0, OP_READ, 20, SECTORS * 1000, [(p.gref, 0, 0)])
    return (20, OP_READ, RSP_ERROR), p


def u64_overflow(front):
    p = _page_ro(front)
    front.rw(0, OP_WRITE, 21, U64_MAX - 3, [(p.gref, 0, 7)])
    return (21, OP_WRITE, RSP_ERROR)


def discard_past_the_end(front):
    front.discard(0, 22, SECTORS - 8, 16)
    return (22, OP_DISCARD, RSP_ERROR)


def discard_overflow(front):
    front.discard(0, 23, 8, U64_MAX)
    return (23, OP_DISCARD, RSP_ERROR)


def unknown_op_4(front):
    front.other(0, OP_RESERVED_1, 24)
    return (24, OP_RESERVED_1, RSP_EOPNOTSUPP)


def unknown_op_7(front):
    front.other(0, 7, 25)
    return (25, 7, RSP_EOPNOTSUPP)


def unknown_op_255(front):
    front.other(0, 255, 0xFFFF_FFFF_FFFF_FFFF)
    return (0xFFFF_FFFF_FFFF_FFFF, 255, RSP_EOPNOTSUPP)


def indirect_too_many(front):
    pages = [_page_ro(front) for _ in range(MAX_INDIRECT + 1)]
    front.indirect(0, OP_WRITE, 26, 0, [(p.gref, 0, 7) for p in pages])
    return (26, OP_WRITE, RSP_ERROR)


def indirect_zero_segments(front):
    front.indirect(0, OP_READ, 27, 0, [], nr_segments=0)
    return (27, OP_READ, RSP_ERROR)


def indirect_flush_op(front):
    pages = [_page_ro(front) for _ in range(12)]
    front.indirect(0, OP_FLUSH_DISKCACHE, 28, 0, [(p.gref, 0, 7) for p in pages])
    return (28, OP_FLUSH_DISKCACHE, RSP_ERROR)


def indirect_bad_segment(front):
    pages = [_page_ro(front) for _ in range(12)]
    segs = [(p.gref, 0, 7) for p in pages]
    segs[7] = (pages[7].gref, 6, 2)
    front.indirect(0, OP_WRITE, 29, 0, segs)
    return (29, OP_WRITE, RSP_ERROR)


def indirect_page_not_granted(front):
    for _ in range(12):
        _page_ro(front)
    r = front.rings[0]
    r.enc.indirect(r.ring.view, r.ring.claim_request_slot(), OP_WRITE, 30, 0, 12, [NEVER_GRANTED])
    return (30, OP_WRITE, RSP_ERROR)


def indirect_lying_count(front):
    """nr_segments says 20 but the page holds 12 real segments and zeros after: segment 13 is
    (gref 0, 0, 0), and gref 0 is never ours: the copy of its data fails, nothing is written."""
    pages = [_page_ro(front) for _ in range(12)]
    front.indirect(0, OP_WRITE, 31, 0, [(p.gref, 0, 7) for p in pages], nr_segments=20)
    return (31, OP_WRITE, RSP_ERROR)


def write_not_granted(front):
    good = _page_ro(front)
    front.rw(0, OP_WRITE, 32, 0, [(good.gref, 0, 7), (NEVER_GRANTED, 0, 7)])
    return (32, OP_WRITE, RSP_ERROR)


def write_granted_to_another_domain(front):
    [frame] = front.guest.alloc_pages(1)
    gref = front.guest.grant_access(frame, 5, readonly=True)
    front.rw(0, OP_WRITE, 33, 8, [(gref, 0, 7)])
    return (33, OP_WRITE, RSP_ERROR)


def read_into_read_only_grant(front):
    p = _page_ro(front)
    front.rw(0, OP_READ, 34, 0, [(p.gref, 0, 7)])
    return (34, OP_READ, RSP_ERROR), p


CASES = [
    read_no_segments, write_no_segments, write_twelve_segments, read_255_segments, flush_twelve_segments,
    first_after_last, last_sect_eight, bad_second_segment, past_the_end, far_past_the_end, u64_overflow,
    discard_past_the_end, discard_overflow, unknown_op_4, unknown_op_7, unknown_op_255, indirect_too_many,
    indirect_zero_segments, indirect_flush_op, indirect_bad_segment, indirect_page_not_granted,
    indirect_lying_count, write_not_granted, write_granted_to_another_domain, read_into_read_only_grant,
]


@pytest.mark.parametrize(("data_path", "abi", "engine"), [
    ("copy", Abi.NATIVE, "compiled"), ("copy", Abi.X86_32, "compiled"), ("map", Abi.NATIVE, "compiled"),
    ("map", Abi.X86_32, "compiled"), ("copy", Abi.NATIVE, "python"), ("map", Abi.X86_32, "python"),
], ids=lambda v: {Abi.NATIVE: "x86_64", Abi.X86_32: "x86_32"}.get(v, v))
async def test_every_bad_request_is_answered_exactly_and_touches_nothing(tmp_path, platform, guest, data_path, abi,
                                                                         engine, monkeypatch):
    """On both request-intake engines (XENBLK_ENGINE: the compiled one and its Python reference)."""
    monkeypatch.setenv(ENGINE_ENV, engine)
    async with served(tmp_path, platform, guest, abi, data_path=data_path) as (vbd, front, path):
        intakes = [w.intake for w in vbd._workers]
        assert intakes and all(type(i) is (CompiledIntake if engine == "compiled" else RequestIntake)
                               for i in intakes)
        digest = file_digest(path)
        for case in CASES:
            out = case(front)
            expected, page = (out if len(out) == 2 else (out, None))
            before = page.bytes() if page else None
            r = await answer_of(front)
            assert tuple(r) == expected, case.__name__
            assert file_digest(path) == digest, f"{case.__name__} changed the disk"
            if page is not None:
                assert page.bytes() == before, f"{case.__name__} wrote into the guest page"
        # and the ring still serves a good request afterwards
        good = front.data_page(readonly=True, fill=b"G" * PAGE_SIZE)
        front.rw(0, OP_WRITE, 99, 16, [(good.gref, 0, 7)])
        assert tuple(await answer_of(front)) == (99, OP_WRITE, RSP_OKAY)
        assert read_back(path, 16 * 512, PAGE_SIZE) == b"G" * PAGE_SIZE
        assert vbd.stats()["total"]["errors"] == len(CASES)


async def test_bad_and_good_requests_in_one_batch(tmp_path, platform, guest):
    """A bad grant fails its own request only; the batch's other requests run (one grant copy for all)."""
    async with served(tmp_path, platform, guest) as (vbd, front, path):
        a = front.data_page(readonly=True, fill=b"A" * PAGE_SIZE)
        c = front.data_page(readonly=True, fill=b"C" * PAGE_SIZE)
        r = front.data_page(readonly=False)
        front.rw(0, OP_WRITE, 1, 0, [(a.gref, 0, 7)])
        front.rw(0, OP_WRITE, 2, 8, [(NEVER_GRANTED, 0, 7)])
        front.rw(0, OP_WRITE, 3, 16, [(c.gref, 0, 3), (c.gref, 4, 7)])
        front.rw(0, OP_READ, 4, 24, [(r.gref, 0, 7)])
        front.other(0, 9, 5)
        front.push()
        got = {x.id: tuple(x) for x in await front.responses(0, 5)}
        assert got == {1: (1, OP_WRITE, RSP_OKAY), 2: (2, OP_WRITE, RSP_ERROR), 3: (3, OP_WRITE, RSP_OKAY),
                       4: (4, OP_READ, RSP_OKAY), 5: (5, 9, RSP_EOPNOTSUPP)}
        assert (
            read_back(path, 0, 3 * PAGE_SIZE)
            == b"A" * PAGE_SIZE + read_back(path, PAGE_SIZE, PAGE_SIZE) + b"C" * PAGE_SIZE
        )
        assert r.bytes() == read_back(path, 24 * 512, PAGE_SIZE)


@pytest.mark.parametrize("data_path", ["copy", "map"])
async def test_read_only_device(tmp_path, platform, guest, data_path):
    """Writes, barriers with data, flushes with data, discards and indirect writes fail; the rest works."""
    async with served(tmp_path, platform, guest, readonly=True, data_path=data_path) as (vbd, front, path):
        assert vbd.features.read_only and not vbd.features.discard
        digest = file_digest(path)
        w = front.data_page(readonly=True, fill=b"X" * PAGE_SIZE)
        bad = [
            lambda: front.rw(0, OP_WRITE, 1, 0, [(w.gref, 0, 7)]),
            lambda: front.rw(0, OP_WRITE_BARRIER, 2, 0, [(w.gref, 0, 7)]),
            lambda: front.rw(0, OP_FLUSH_DISKCACHE, 3, 0, [(w.gref, 0, 7)]),
            lambda: front.indirect(0, OP_WRITE, 5, 0, [(w.gref, 0, 7)] * 12),
        ]
        for i, send in enumerate(bad):
            send()
            r = await answer_of(front)
            assert r.status == RSP_ERROR and r.id in (1, 2, 3, 5), i
        front.discard(0, 4, 0, 8)
        assert tuple(await answer_of(front)) == (4, OP_DISCARD, RSP_EOPNOTSUPP)  # not offered at all
        assert file_digest(path) == digest
        rd = front.data_page(readonly=False)
        front.rw(0, OP_READ, 6, 8, [(rd.gref, 0, 7)])
        front.rw(0, OP_FLUSH_DISKCACHE, 7, 0, [])
        front.rw(0, OP_WRITE_BARRIER, 8, 0, [])
        front.push()
        got = sorted(tuple(x) for x in await front.responses(0, 3))
        assert got == [(6, OP_READ, RSP_OKAY), (7, OP_FLUSH_DISKCACHE, RSP_OKAY), (8, OP_WRITE_BARRIER, RSP_OKAY)]
        assert rd.bytes() == read_back(path, 8 * 512, PAGE_SIZE)


async def test_discard_not_offered_is_eopnotsupp(tmp_path, platform, guest):
    async with served(tmp_path, platform, guest, discard=False) as (vbd, front, path):
        assert not vbd.features.discard and "discard-granularity" not in vbd.features.connect_nodes()
        digest = file_digest(path)
        front.discard(0, 77, 0, 8)
        assert tuple(await answer_of(front)) == (77, OP_DISCARD, RSP_EOPNOTSUPP)
        assert file_digest(path) == digest
        front.discard(0, 78, 0, 0)  # validated the same way even when empty
        assert tuple(await answer_of(front)) == (78, OP_DISCARD, RSP_EOPNOTSUPP)


async def test_empty_discard_is_okay_and_does_nothing(tmp_path, platform, guest):
    async with served(tmp_path, platform, guest) as (vbd, front, path):
        digest = file_digest(path)
        front.discard(0, 5, 64, 0)
        assert tuple(await answer_of(front)) == (5, OP_DISCARD, RSP_OKAY)
        assert file_digest(path) == digest


async def test_indirect_not_offered(tmp_path, platform, guest):
    """max_indirect_segments 0 (e.g. the storage's max-transfer is small): every indirect request fails."""
    async with served(tmp_path, platform, guest, max_indirect_segments=0) as (vbd, front, path):
        assert vbd.features.probe_nodes()["feature-max-indirect-segments"] == "0"
        digest = file_digest(path)
        pages = [front.data_page(readonly=True) for _ in range(12)]
        front.indirect(0, OP_WRITE, 3, 0, [(p.gref, 0, 7) for p in pages])
        assert tuple(await answer_of(front)) == (3, OP_WRITE, RSP_ERROR)
        assert file_digest(path) == digest


async def test_misaligned_to_a_4k_logical_block(tmp_path, platform, guest):
    """On a 4 KiB-sector disk (qemu-storage-daemon export, vhost-user, copy path) I/O must be 4 KiB aligned."""
    with four_k_sector_export(tmp_path / "qsd", DISK_SIZE) as export:
        make_disk_file(export.image)
        vbd = make_vbd(export.socket, driver="virtio-blk-vhost-user", queues=1)
        front = TestFrontend(guest)
        try:
            assert vbd.features.sector_size == 4096 and vbd.features.sectors == SECTORS
            async with connected(vbd, front, platform):
                digest = file_digest(export.image)
                w = front.data_page(readonly=True, fill=b"M" * PAGE_SIZE)
                cases = [
                    (1, OP_WRITE, 4, [(w.gref, 0, 7)]),  # start not on a 4 KiB block
                    (2, OP_WRITE, 8, [(w.gref, 0, 3)]),  # 2 KiB long
                    (3, OP_WRITE, 8, [(w.gref, 0, 7), (w.gref, 0, 3), (w.gref, 4, 7)]),  # halves
                ]
                for id_, op, sector, segs in cases:
                    front.rw(0, op, id_, sector, segs)
                    assert tuple(await answer_of(front)) == (id_, op, RSP_ERROR)
                front.discard(0, 4, 8, 4)
                assert tuple(await answer_of(front)) == (4, OP_DISCARD, RSP_ERROR)
                assert file_digest(export.image) == digest
                front.rw(0, OP_WRITE, 5, 8, [(w.gref, 0, 7)])  # aligned: fine
                assert tuple(await answer_of(front)) == (5, OP_WRITE, RSP_OKAY)
            assert read_back(export.image, 8 * 512, PAGE_SIZE) == b"M" * PAGE_SIZE
        finally:
            front.close()
            vbd.close()
