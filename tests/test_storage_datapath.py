"""Data written and read through libblkio, compared with the backing file read directly.

Parametrized over every target (io_uring file buffered and O_DIRECT, io_uring
on a loop block device, virtio-blk-vhost-user to qemu-storage-daemon).
Blocking do_io() with timeouts here; the trio completion-fd mode is in
test_storage_trio.py.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storage_support.patterns import block_pattern, pattern_range, read_file
from storage_support.targets import TARGET_NAMES, Target, open_target
from xenblk_vhost.storage import BlkioError, IovecArray

BS = 4096
TIMEOUT = 10.0  # seconds; a hang is a failure, not a stuck suite


@pytest.fixture(params=TARGET_NAMES)
def target(request, tmp_path: Path):
    yield from open_target(request, tmp_path)


def _run(q, expected_tags: set[int]) -> dict[int, int]:
    """Submit and reap until every expected tag completed; return tag -> ret."""
    done: dict[int, int] = {}
    while len(done) < len(expected_tags):
        for tag, ret in q.do_io(1, timeout=TIMEOUT):
            assert tag in expected_tags and tag not in done, tag
            done[tag] = ret
    return done


def test_write_batch_flush_then_read_and_readv(target: Target):
    dev, q = target.device, target.device.queues[0]
    region = dev.alloc_mem_region(64 * BS)
    nblocks, first = 48, 100  # a batch bigger than one do_io's worth of typical QD
    region.view[: nblocks * BS] = pattern_range(first, nblocks, seed=1)
    for i in range(nblocks):
        q.write((first + i) * BS, region.address(i * BS), BS, 1000 + i)
    assert _run(q, {1000 + i for i in range(nblocks)}) == {1000 + i: 0 for i in range(nblocks)}
    q.flush(7)
    assert _run(q, {7}) == {7: 0}

    assert read_file(target.backing, first * BS, nblocks * BS) == pattern_range(first, nblocks, seed=1)

    # Read back: even blocks with read(), odd ones with a 3-element readv whose
    # pieces land in scattered, reversed places of the region.
    region.view[:] = b"\xee" * len(region.view)
    iov = IovecArray(3 * nblocks)
    dest = 32 * BS  # readv pieces go above the read() area (blocks 0..23)
    for i in range(nblocks):
        if i % 2 == 0:
            q.read((first + i) * BS, region.address(i * BS // 2), BS, i)
        else:
            base = dest + (i // 2) * BS
            pieces = [(base + 3072, 1024), (base + 1024, 2048), (base, 1024)]
            iov.fill(3 * i, [(region.address(off), ln) for off, ln in pieces])
            q.readv((first + i) * BS, iov.address(3 * i), 3, i)
    assert _run(q, set(range(nblocks))) == {i: 0 for i in range(nblocks)}
    for i in range(nblocks):
        expect = block_pattern(first + i, seed=1)
        if i % 2 == 0:
            got = bytes(region.view[i * BS // 2 : i * BS // 2 + BS])
        else:
            base = dest + (i // 2) * BS
            v = region.view
            got = (
                bytes(v[base + 3072 : base + 4096]) + bytes(v[base + 1024 : base + 3072]) + bytes(v[base : base + 1024])
            )
        assert got == expect, f"block {i}"


def test_writev_gathers_scattered_segments(target: Target):
    dev, q = target.device, target.device.queues[0]
    region = dev.alloc_mem_region(16 * BS)
    # Four 4 KiB source blocks placed out of order in the region, gathered into one 16 KiB write.
    order = [3, 0, 2, 1]
    for slot, blk in enumerate(order):
        region.view[slot * BS : (slot + 1) * BS] = block_pattern(blk, seed=2)
    iov = IovecArray(8)
    iov.fill(0, [(region.address(order.index(blk) * BS), BS) for blk in range(4)])
    assert iov.total_length(0, 4) == 4 * BS
    q.writev(40 * BS, iov.address(0), 4, 55)
    q.flush(56)  # no ordering between in-flight requests: the flush proves nothing here...
    assert _run(q, {55, 56}) == {55: 0, 56: 0}
    q.flush(57)  # ...this one, issued after the write completed, does
    assert _run(q, {57}) == {57: 0}
    assert read_file(target.backing, 40 * BS, 4 * BS) == pattern_range(0, 4, seed=2)


def test_reads_data_written_to_the_backing_file(target: Target):
    dev, q = target.device, target.device.queues[0]
    data = pattern_range(300, 8, seed=3)
    fd = os.open(target.backing, os.O_WRONLY)
    try:
        os.pwrite(fd, data, 300 * BS)
        os.fsync(fd)
    finally:
        os.close(fd)
    region = dev.alloc_mem_region(8 * BS)
    q.read(300 * BS, region.addr, 8 * BS, 1)
    assert _run(q, {1}) == {1: 0}
    assert bytes(region.view[: 8 * BS]) == data


def test_write_zeroes_leaves_neighbours_alone(target: Target):
    dev, q = target.device, target.device.queues[0]
    assert dev.limits.supports_write_zeroes
    region = dev.alloc_mem_region(8 * BS)
    region.view[: 8 * BS] = pattern_range(0, 8, seed=4)
    q.write(200 * BS, region.addr, 8 * BS, 1)
    assert _run(q, {1}) == {1: 0}
    q.write_zeroes(202 * BS, 3 * BS, 2)
    assert _run(q, {2}) == {2: 0}
    q.flush(3)
    assert _run(q, {3}) == {3: 0}
    on_disk = read_file(target.backing, 200 * BS, 8 * BS)
    assert on_disk[: 2 * BS] == pattern_range(0, 2, seed=4)
    assert on_disk[2 * BS : 5 * BS] == bytes(3 * BS)
    assert on_disk[5 * BS :] == pattern_range(5, 3, seed=4)
    # and reading through the device agrees
    q.read(200 * BS, region.addr, 8 * BS, 4)
    assert _run(q, {4}) == {4: 0}
    assert bytes(region.view[: 8 * BS]) == on_disk


def test_read_past_the_end(target: Target):
    """Regular files grow (can-grow: zeroes past EOF); devices fail the request with -errno."""
    dev, q = target.device, target.device.queues[0]
    region = dev.alloc_mem_region(BS)
    region.view[:] = b"\xee" * BS
    capacity = dev.capacity
    q.read(capacity + 64 * BS, region.addr, BS, 9)
    (tag, ret), = q.do_io(1, timeout=TIMEOUT)
    assert tag == 9
    if dev.limits.can_grow:
        assert target.name in ("file", "file-direct")
        assert ret == 0 and bytes(region.view) == bytes(BS)
    else:
        assert ret == -errno.EIO
        assert bytes(region.view) == b"\xee" * BS
    assert dev.capacity == capacity  # a read never grows the device
    q.error_message(0)  # may be None: libblkio does not always explain; must not crash


def test_tags_round_trip_full_pointer_width(target: Target):
    dev, q = target.device, target.device.queues[0]
    region = dev.alloc_mem_region(BS)
    tags = {0, 1, 2**32 + 5, 2**63 + 11, 2**64 - 1}
    for t in tags:
        q.read(0, region.addr, BS, t)
    assert set(_run(q, tags)) == tags


def test_waiting_for_more_than_in_flight_is_einval(target: Target):
    q = target.device.queues[0]
    with pytest.raises(BlkioError) as err:
        q.do_io(1, timeout=TIMEOUT)
    assert err.value.errno == errno.EINVAL
    with pytest.raises(ValueError):
        q.do_io(0, q.max_completions + 1)


def test_flush_on_an_idle_device(target: Target):
    q = target.device.queues[0]
    q.flush(1, 0)
    assert _run(q, {1}) == {1: 0}


def test_readv_with_max_segments(target: Target):
    """The advertised max-segments works (512-byte pieces, each in its own place)."""
    dev, q = target.device, target.device.queues[0]
    nseg = dev.limits.max_segments
    seg = 512
    data = pattern_range(0, nseg * seg // BS + 1, seed=12)[: nseg * seg]
    fd = os.open(target.backing, os.O_WRONLY)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    os.close(fd)
    region = dev.alloc_mem_region(2 * nseg * seg)
    iov = IovecArray(nseg + 1)
    for i in range(nseg):  # every other 512-byte slot, so contiguity cannot hide a bug
        iov.set(i, region.address(2 * i * seg), seg)
    q.readv(0, iov.address(0), nseg, 1)
    assert _run(q, {1}) == {1: 0}
    got = b"".join(bytes(region.view[2 * i * seg : (2 * i + 1) * seg]) for i in range(nseg))
    assert got == data
    if target.device.limits.driver == "io_uring":  # io_uring refuses one more (vhost-user does not check)
        iov.set(nseg, region.address(1 * seg), seg)
        q.readv(0, iov.address(0), nseg + 1, 2)
        assert _run(q, {2}) == {2: -errno.EINVAL}


# Random scatter-gather writes, checked against a model and the backing file.
_SPAN = 256 * 512  # the first 128 KiB of the device


@st.composite
def _writes(draw):
    """[(start_sector, [segment lengths in sectors])], all inside _SPAN."""
    ops = []
    for _ in range(draw(st.integers(1, 6))):
        segs = draw(st.lists(st.integers(1, 16), min_size=1, max_size=8))
        start = draw(st.integers(0, _SPAN // 512 - sum(segs)))
        ops.append((start, segs))
    return ops


@pytest.mark.parametrize("target", ["file-direct", "vhost-user"], indirect=True)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_writes(), seed=st.integers(0, 2**16))
def test_random_writev_matches_model(target: Target, ops, seed):
    dev, q = target.device, target.device.queues[0]
    model = bytearray(read_file(target.backing, 0, _SPAN))
    region = dev.alloc_mem_region(_SPAN)
    iov = IovecArray(8)
    try:
        for n, (start, segs) in enumerate(ops):
            total = sum(segs) * 512
            data = pattern_range(n, total // BS + 1, seed=seed)[:total]
            # place the segments backwards in the region: the gather order must come from the iovecs
            pos, off, pieces = _SPAN, 0, []
            for s in segs:
                ln = s * 512
                pos -= ln
                region.view[pos : pos + ln] = data[off : off + ln]
                pieces.append((region.address(pos), ln))
                off += ln
            iov.fill(0, pieces)
            q.writev(start * 512, iov.address(0), len(segs), n)
            assert _run(q, {n}) == {n: 0}  # one at a time: overlapping writes have no order in flight
            model[start * 512 : start * 512 + total] = data
        q.flush(99)
        assert _run(q, {99}) == {99: 0}
        assert read_file(target.backing, 0, _SPAN) == model
        q.read(0, region.addr, _SPAN, 100)
        assert _run(q, {100}) == {100: 0}
        assert bytes(region.view) == model
    finally:
        dev.release_mem_region(region)
