"""The writer fence (backend/datapath/writer_fence.py): a takeover runs nothing again before the process
that last wrote the journal is gone.

  * the journal names its writer (pid, start time) in two slots flipped by a selector; an area of an
    earlier release (selector 0) names none;
  * writer_gone: a live process is not gone; killed but not reaped (a zombie, every thread exited)
    it is; a pid whose start time differs is another process (recycled pid): gone;
  * a vbd taking a ring over whose journal names a live process as its writer does not run the
    unanswered write again until that process is gone, then does, once.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import trio

from backend_support.frontend import TestFrontend
from backend_support.gated_queue import gate_queues
from backend_support.harness import make_disk_file, make_vbd, read_back
from xenblk_vhost.backend.datapath.journal import JournalGeometry, RingJournal, format_area, read_image
from xenblk_vhost.backend.datapath.journal_file import JournalFile
from xenblk_vhost.backend.datapath.writer_fence import own_identity, start_time, wait_writer_gone, writer_gone
from xenblk_vhost.blkif.constants import OP_WRITE, RSP_OKAY
from xenblk_vhost.xen.interfaces import PAGE_SIZE


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_the_journal_names_its_writer_in_flipping_slots():
    g = JournalGeometry.for_ring(4, 112, 8)
    buf = bytearray(g.size)
    format_area(buf, g, b"id", taken_to=0, published=0)
    assert read_image(buf).writer is None  # as an earlier release's journal: none named
    j = RingJournal(buf, g)
    j.set_writer(1234, 99)
    assert read_image(buf).writer == (1234, 99)
    j.set_writer(5678, 100)
    assert read_image(buf).writer == (5678, 100)
    j.set_writer(42, 7)
    assert read_image(buf).writer == (42, 7)


def test_a_live_process_is_not_gone_a_dead_or_recycled_one_is():
    pid, start = own_identity()
    assert not writer_gone(pid, start)
    assert writer_gone(pid, start + 1)  # same pid, another start: another process
    child = _sleeper()
    try:
        cstart = start_time(child.pid)
        assert cstart is not None and not writer_gone(child.pid, cstart)
        child.send_signal(signal.SIGKILL)
        # not reaped yet: a zombie whose threads have all exited is gone for the fence
        for _ in range(500):
            if writer_gone(child.pid, cstart):
                break
            time.sleep(0.01)
        assert writer_gone(child.pid, cstart)
        assert start_time(child.pid) == cstart  # still there (a zombie): the fence did not need the reaping
    finally:
        child.kill()
        child.wait()
    assert writer_gone(child.pid, cstart)


async def test_wait_returns_when_the_writer_goes():
    child = _sleeper()
    try:
        cstart = start_time(child.pid)
        assert cstart is not None
        with trio.move_on_after(0.3):
            await wait_writer_gone(child.pid, cstart, "test")
            raise AssertionError("returned while the writer was alive")
        async with trio.open_nursery() as n:
            n.start_soon(wait_writer_gone, child.pid, cstart, "test")
            await trio.sleep(0.05)
            child.kill()
        assert not await wait_writer_gone(os.getppid(), start_time(os.getppid()) or 0, "test", timeout=0.05)
    finally:
        child.kill()
        child.wait()


async def test_a_takeover_reruns_nothing_before_the_last_writer_is_gone(tmp_path, platform, guest):
    path = make_disk_file(tmp_path / "disk.img")
    journals = tmp_path / "journals"
    journals.mkdir()
    old = make_vbd(path, data_path="copy", queues=1, drain_timeout=0.2, journal_dir=journals)
    [q] = gate_queues(old, [])
    front = TestFrontend(guest)
    held = front.data_page(readonly=True, fill=b"W" * PAGE_SIZE)
    new = None
    child = _sleeper()
    try:
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as n:
                await n.start(old.serve, front.spec(), platform)
                q.hold("write", 8 * 512)
                front.rw(0, OP_WRITE, 1, 8, [(held.gref, 0, 7)])  # held by the storage: unanswered
                front.push()
                assert await front.no_response(0)
                scope.cancel()  # the drain times out: id 1 goes to the next process through the journal
        old.close()
        # As if another process (the sleeper) had written the journal and were still dying.
        [jpath] = list(journals.iterdir())
        jf = JournalFile.open_existing(jpath)
        assert jf is not None
        image = read_image(jf.buffer)
        assert image.writer == own_identity()
        writer = RingJournal(jf.buffer, image.geometry)
        cstart = start_time(child.pid)
        assert cstart is not None
        writer.set_writer(child.pid, cstart)
        writer.release()
        jf.close()
        new = make_vbd(path, data_path="copy", queues=1, journal_dir=journals)
        async with trio.open_nursery() as n:
            n.start_soon(new.serve, front.spec(), platform)
            assert await front.no_response(0, within=0.5), "ran again while the last writer was alive"
            child.send_signal(signal.SIGKILL)
            assert [tuple(r) for r in await front.responses(0, 1)] == [(1, OP_WRITE, RSP_OKAY)]
            assert await front.no_response(0)  # once
            await new.disconnect()
        assert read_back(path, 8 * 512, PAGE_SIZE) == b"W" * PAGE_SIZE
    finally:
        child.kill()
        child.wait()
        front.close()
        old.close()
        if new is not None:
            new.close()
