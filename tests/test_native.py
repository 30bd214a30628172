"""The compiled kernels (xenblk_vhost/native) make the same decisions as their Python references.

* sim_grant_copy.c against SimGntdev.grant_copy (the simulated Xen's copy in
  Python): the same random and hostile grant tables, pin counts, domains and
  segments go through both; every status and every byte of guest and local
  memory afterwards must be equal.
* CopyBatch.add_sector_ranges (the datapath's packing) against CopyBatch.load
  of the CopySegments the old datapath built: the same bytes for the kernel,
  and hostile ranges (reversed, past the page) answered GNTST_bad_copy_arg
  without reaching the kernel.
* The C segment layout is the ioctl's (the ctypes one in xen/gntdev.py, which
  test_gntdev_abi.py checks against gcc and the kernel header).
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xenblk_vhost import native
from xenblk_vhost.blkif.abi import Abi
from xenblk_vhost.blkif.constants import OP_INDIRECT, OP_READ
from xenblk_vhost.blkif.intake import RequestIntake
from xenblk_vhost.blkif.request import IndirectRequest, Request, WireSegments
from xenblk_vhost.blkif.validate import RequestLimits
from xenblk_vhost.native import build as native_build
from xenblk_vhost.sim.gntdev import ForeignDomain, SimGntdev
from xenblk_vhost.sim.grant_table import (
    ENTRIES_PER_FRAME,
    GTF_permit_access,
    GTF_reading,
    GTF_readonly,
    GTF_sub_page,
    GTF_transitive,
    GTF_writing,
    active_table_bytes,
    grant_table_bytes,
)
from xenblk_vhost.xen import gntdev as g
from xenblk_vhost.xen._libc import buffer_address
from xenblk_vhost.xen.interfaces import PAGE_SIZE, CopySegment, GrantStatus

BACKEND = 0
GUEST = 7
PAGES = 6
GRANT_FRAMES = 1
NR_ENTRIES = GRANT_FRAMES * ENTRIES_PER_FRAME
LOCAL_PAGES = 4


def test_the_c_segment_is_the_ioctls_segment():
    ffi = native.load().ffi
    seg = g.GntdevGrantCopySegment
    assert ffi.sizeof("struct xk_copy_seg") == ctypes.sizeof(seg) == g.SEGMENT_SIZE
    for name in ("source", "dest", "len", "flags", "status"):
        assert ffi.offsetof("struct xk_copy_seg", name) == getattr(seg, name).offset, name
    assert ffi.offsetof("struct xk_copy_foreign", "offset") == g.GntdevCopyForeign.offset.offset
    assert ffi.offsetof("struct xk_copy_foreign", "domid") == g.GntdevCopyForeign.domid.offset


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name)
    os.ftruncate(fd, size)
    return fd


class World:
    """One guest as the simulated Xen sees it, and the backend's local memory, with no hypervisor process."""

    def __init__(self) -> None:
        self.mem_fd = _memfd("guest-memory", PAGES * PAGE_SIZE)
        self.dom = ForeignDomain(GUEST, PAGES, GRANT_FRAMES, self.mem_fd,
                                 _memfd("grants", grant_table_bytes(GRANT_FRAMES)),
                                 _memfd("active", active_table_bytes(GRANT_FRAMES)))
        self.local = mmap.mmap(-1, LOCAL_PAGES * PAGE_SIZE)
        self.local_addr = buffer_address(self.local)
        self.gntdev = SimGntdev.__new__(SimGntdev)  # no hypervisor: the one domain is looked up here
        self.gntdev.domid = BACKEND
        self.gntdev._native = None
        self.gntdev._native_failed = False
        self.gntdev._foreign = lambda domid: self.dom if domid == GUEST else None  # type: ignore[method-assign]

    def load(self, entries, pins, seed: int) -> None:
        grants, active, memory = self.dom._grants, self.dom._active, self.dom._memory
        for ref, (flags, domid, frame) in entries.items():
            struct.pack_into("<HHI", grants, ref * 8, flags, domid, frame)
        for ref, (count, frame) in pins.items():
            struct.pack_into("<II", active, ref * 8, count, frame)
        memory[:] = bytes((seed + i * 7) & 0xFF for i in range(len(memory)))
        self.local[:] = bytes((seed * 3 + i * 13) & 0xFF for i in range(len(self.local)))

    def snapshot(self) -> tuple[bytes, bytes, bytes]:
        return bytes(self.dom._memory), bytes(self.local), bytes(self.dom._grants)

    def close(self) -> None:
        self.dom.retire()
        self.local.close()


FLAGS = st.sampled_from([
    0, GTF_permit_access, GTF_permit_access | GTF_readonly, GTF_transitive, GTF_permit_access | GTF_sub_page,
    GTF_permit_access | GTF_reading, GTF_permit_access | GTF_readonly | GTF_reading | GTF_writing, 0xFFFF,
])
REFS = st.integers(0, 15) | st.sampled_from([NR_ENTRIES - 1, NR_ENTRIES, 0xFFFFFFFF])
ENTRY = st.tuples(FLAGS, st.sampled_from([BACKEND, GUEST, 1, 0xFFFF]), st.integers(0, PAGES + 2))
PIN = st.tuples(st.sampled_from([0, 1, 1 << 16, (1 << 16) | 3]), st.integers(0, PAGES + 2))
SEGMENT = st.builds(
    lambda to_guest, domid, gref, off, length, local: CopySegment(to_guest, domid, gref, off, local, length),
    st.booleans(), st.sampled_from([GUEST, GUEST, GUEST, GUEST + 1]), REFS,
    st.integers(0, PAGE_SIZE) | st.sampled_from([0, 512, 4095]),
    st.integers(0, PAGE_SIZE) | st.sampled_from([0, 512, 4096]),
    st.integers(0, (LOCAL_PAGES - 1) * PAGE_SIZE),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(entries=st.dictionaries(st.integers(0, 15) | st.just(NR_ENTRIES - 1), ENTRY, max_size=16),
       pins=st.dictionaries(st.integers(0, 15), PIN, max_size=6),
       segments=st.lists(SEGMENT, max_size=24), seed=st.integers(0, 255))
def test_compiled_sim_copy_decides_and_moves_bytes_as_the_python_one(entries, pins, segments, seed):
    w = World()
    try:
        segments = [CopySegment(s.to_guest, s.domid, s.gref, s.guest_offset, w.local_addr + s.local_addr, s.length)
                    for s in segments]
        w.load(entries, pins, seed)
        expected = w.gntdev.grant_copy(segments)
        after_python = w.snapshot()

        w.load(entries, pins, seed)
        batch = g.CopyBatch(capacity=4)
        count, refused = batch.load(segments)
        w.gntdev.grant_copy_batch(batch)
        assert batch.statuses(count, refused, len(segments)) == expected
        assert w.snapshot() == after_python
    finally:
        w.close()


@settings(max_examples=100, deadline=None)
@given(segments=st.lists(SEGMENT | st.builds(lambda s, off: dataclasses.replace(s, guest_offset=off), SEGMENT,
                                              st.integers(-3, -1) | st.integers(PAGE_SIZE, 1 << 17)), max_size=12))
def test_add_range_packs_and_refuses_as_load(segments):
    """CopyBatch.add_range (the indirect pages' copy, one segment at a time) gives the kernel the bytes
    load() gives it for the same segments, and refuses the same ones (statuses in the order added)."""
    loaded = g.CopyBatch(capacity=1)
    count, refused = loaded.load(segments)
    added = g.CopyBatch(capacity=1)
    added.reset()
    for i, s in enumerate(segments):
        added.add_range(s.to_guest, s.domid, s.gref, s.guest_offset, s.local_addr, s.length, i)
    assert added.count == count and (added.refused or None) == refused
    assert added.owners == list(range(len(segments)))
    size = count * g.SEGMENT_SIZE
    assert bytes(added._bytes[:size]) == bytes(loaded._bytes[:size])


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python-fallback"])
def test_compiled_sim_copy_covers_every_verdict(compiled, monkeypatch, caplog):
    """The property test's space holds each status; here each one is pinned down by hand too, and the
    same batch gives the same answers through the Python fallback (the kernels cannot be built)."""
    if not compiled:
        def cannot(*_a):
            raise native.NativeBuildError("no gcc here")
        monkeypatch.setattr(native, "load", cannot)
    w = World()
    try:
        w.load({10: (GTF_permit_access, BACKEND, 2), 11: (GTF_permit_access | GTF_readonly, BACKEND, 3),
                12: (GTF_permit_access, BACKEND, PAGES), 13: (GTF_permit_access, 5, 1),
                14: (GTF_permit_access | GTF_readonly, BACKEND, 4)},
               {14: (1 << 16, 4)}, 1)  # 14: read-only, but a writable map pins it: writes go through
        base = w.local_addr
        segs = [CopySegment(True, GUEST, 10, 512, base, 100),  # OKAY, into the guest
                CopySegment(False, GUEST, 11, 0, base + 4096, 4096),  # OKAY, out of a read-only grant
                CopySegment(True, GUEST, 11, 0, base, 8),  # write into a read-only grant
                CopySegment(True, GUEST, 12, 0, base, 8),  # frame past the guest's memory
                CopySegment(True, GUEST, 13, 0, base, 8),  # granted to another domain
                CopySegment(True, GUEST, NR_ENTRIES, 0, base, 8),  # past the table
                CopySegment(True, GUEST + 1, 10, 0, base, 8),  # no such domain
                CopySegment(True, GUEST, 10, 4000, base, 200),  # crosses its page
                CopySegment(True, GUEST, 14, 0, base + 8192, 16)]  # pinned writable
        batch = g.CopyBatch()
        count, refused = batch.load(segs)
        w.gntdev.grant_copy_batch(batch)
        S = GrantStatus
        assert batch.statuses(count, refused, len(segs)) == [
            S.OKAY, S.OKAY, S.GENERAL_ERROR, S.BAD_PAGE, S.GENERAL_ERROR, S.BAD_GNTREF, S.BAD_DOMAIN,
            S.BAD_COPY_ARG, S.OKAY]
        memory, local, _ = w.snapshot()
        fallback_said = [r for r in caplog.records if "compiled copy is unavailable" in r.getMessage()]
        assert len(fallback_said) == (0 if compiled else 1)
        w.gntdev.grant_copy_batch(batch)  # said once, not per batch
        assert len([r for r in caplog.records if "compiled copy is unavailable" in r.getMessage()]) == len(
            fallback_said)
        assert memory[2 * PAGE_SIZE + 512:2 * PAGE_SIZE + 612] == local[:100]
        assert local[4096:8192] == memory[3 * PAGE_SIZE:4 * PAGE_SIZE]
        assert memory[4 * PAGE_SIZE:4 * PAGE_SIZE + 16] == local[8192:8192 + 16]
    finally:
        w.close()


def test_a_module_built_beside_the_sources_is_found_when_they_are_read_only(monkeypatch, tmp_path):
    """A daemon under ProtectSystem=strict/ProtectHome=yes can write neither the tree nor a cache: it must
    still load the module built at install time (it once tried to build it again and failed its rings)."""
    native_build.build()  # up to date beside the sources
    monkeypatch.setattr(native_build.os, "access", lambda *_a: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-there"))
    assert native_build.build_dir() == tmp_path / "not-there" / "xenblk-vhost" / "native"
    found = native_build.find_built()
    assert found is not None and found.parent == native_build.HERE / "_build"


RANGE = st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 7), st.integers(0, 7))
HOSTILE_RANGE = st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 255), st.integers(0, 255))


@settings(max_examples=200, deadline=None)
@given(requests=st.lists(st.tuples(st.booleans(), st.lists(RANGE | HOSTILE_RANGE, min_size=1, max_size=11)),
                         max_size=12),
       domid=st.integers(0, 0x7FEF))
def test_packing_sector_ranges_is_packing_the_old_copy_segments(requests, domid):
    """The datapath's packing gives the kernel exactly the bytes the CopySegment path gave it."""
    new = g.CopyBatch(capacity=2)
    new.reset()
    old_segments = []
    addr = 0x7F0000000000
    for i, (to_guest, ranges) in enumerate(requests):
        covered = new.add_sector_ranges(to_guest, domid, ranges, addr, i)
        a = addr
        for gref, first, last in ranges:
            n = (last - first + 1) * 512
            if n <= 0:
                n = -1  # reversed (or empty): refused, as an impossible length
            old_segments.append(CopySegment(to_guest, domid, gref, first * 512, a, n))
            if n > 0 and first * 512 + n <= PAGE_SIZE:
                a += n
        assert covered == a - addr
        addr += 1 << 20
    old = g.CopyBatch()
    count, refused = old.load(old_segments)
    assert new.count == count
    assert (new.refused or None) == refused
    assert bytes(new.buffer)[:count * g.SEGMENT_SIZE] == bytes(old.buffer)[:count * g.SEGMENT_SIZE]
    assert new.owners == [i for i, (_, ranges) in enumerate(requests) for _ in ranges]
    # nothing copied yet: every status 0 but the refused ones, and their owners are the failed ones
    assert new.results() == [refused.get(i, 0) if refused else 0 for i in range(len(old_segments))]
    assert new.failed_owners() == [new.owners[i] for i in sorted(refused or {})]


WIRE = struct.Struct("<IBB2x")
WIRE_SEGMENT = st.builds(lambda ref, first, last: WIRE.pack(ref, first, last), st.integers(0, 0xFFFFFFFF),
                         st.integers(0, 9) | st.integers(0, 255), st.integers(0, 9) | st.integers(0, 255))


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "python-fallback"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(st.tuples(st.booleans(), st.lists(WIRE_SEGMENT, min_size=1, max_size=300)), max_size=6),
       domid=st.integers(0, 0x7FEF))
def test_packing_wire_segments_is_packing_their_tuples(compiled, monkeypatch, requests, domid):
    """An indirect request's segments packed from their wire bytes (compiled) give the kernel exactly
    what packing their tuples gives it: same bytes, refusals, owners and local bytes covered."""
    if not compiled:
        monkeypatch.setattr(g, "_packer", lambda: None)
    by_bytes, by_tuples = g.CopyBatch(capacity=3), g.CopyBatch(capacity=3)
    addr = 0x7F0000000000
    for i, (to_guest, wire) in enumerate(requests):
        raw = b"".join(wire)
        a = by_bytes.add_segment_bytes(to_guest, domid, raw, addr, i)
        b = by_tuples.add_sector_ranges(to_guest, domid, tuple(WIRE.iter_unpack(raw)), addr, i)
        assert a == b
        addr += 1 << 21
    assert by_bytes.count == by_tuples.count
    assert by_bytes.refused == by_tuples.refused
    assert by_bytes.owners == by_tuples.owners
    n = by_tuples.count * g.SEGMENT_SIZE
    assert bytes(by_bytes.buffer)[:n] == bytes(by_tuples.buffer)[:n]


def test_an_indirect_requests_segments_carry_their_wire_bytes():
    limits = RequestLimits(sectors=1 << 30, max_indirect_segments=256)
    header = IndirectRequest(OP_INDIRECT, OP_READ, 5, 0, 8, 3, (77,))
    wire = WIRE.pack(10, 0, 7) + WIRE.pack(11, 2, 3) + WIRE.pack(12, 7, 7)
    req = RequestIntake(Abi.NATIVE, limits).decode_indirect_segments(header, wire + b"junk" * 100)
    assert type(req) is Request and type(req.segments) is WireSegments
    assert req.segments == ((10, 0, 7), (11, 2, 3), (12, 7, 7)) and req.segments.raw == wire
    assert req == Request(OP_READ, 5, 0, 8, ((10, 0, 7), (11, 2, 3), (12, 7, 7)), 8 + 2 + 1, True)


def test_disabled_kernels_leave_every_user_on_its_python_path(monkeypatch):
    """native.set_enabled(False) (bench.py --engines python): the packing and the simulated copy take their
    Python references; enabled again, the compiled ones."""
    w = World()
    calls = []
    python_copy = w.gntdev.grant_copy
    monkeypatch.setattr(w.gntdev, "grant_copy", lambda segs: calls.append(len(segs)) or python_copy(segs))
    try:
        w.load({10: (GTF_permit_access, BACKEND, 2)}, {}, 1)
        wire = WIRE.pack(10, 0, 7) + WIRE.pack(10, 9, 3)
        for enabled in (False, True):
            native.set_enabled(enabled)
            assert (g._packer() is not None) is enabled
            batch = g.CopyBatch()
            batch.reset()
            assert batch.add_segment_bytes(True, GUEST, wire, w.local_addr, "req") == PAGE_SIZE
            w.gntdev.grant_copy_batch(batch)
            assert batch.results() == [0, GrantStatus.BAD_COPY_ARG]
            assert calls == [1]  # only the disabled round went through Python's grant_copy
    finally:
        native.set_enabled(True)
        w.close()


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(1, 300), min_size=1, max_size=10), data=st.data())
def test_the_compiled_status_check_finds_the_reference_failed_owners(sizes, data):
    """failed_owners' check that every segment copied (compiled: xk_copy_failures) against the Python scan,
    with any segments of a batch of indirect-sized requests given a failed status."""
    batch = g.CopyBatch(capacity=2)
    for i, n in enumerate(sizes):
        batch.add_segment_bytes(True, 1, WIRE.pack(7, 0, 7) * n, 0x7F0000000000 + i * (1 << 21), i)
    statuses = memoryview(batch.buffer).cast("B").cast("h")
    failed = sorted(set(data.draw(st.lists(st.integers(0, batch.count - 1), max_size=5))))
    for k in failed:
        statuses[(k * g.SEGMENT_SIZE + g._STATUS_OFFSET) // 2] = data.draw(st.sampled_from([-1, -3, -8, 1]))
    statuses.release()
    got = batch.failed_owners()
    native.set_enabled(False)
    try:
        want = batch.failed_owners()
    finally:
        native.set_enabled(True)
    assert got == want == [batch.owners[k] for k in failed]
