"""A storage Queue wrapper for tests: records what the datapath asks, can hold completions back.

It wraps a real libblkio Queue (the I/O really happens) and
  * logs, in one list shared by several queues, every request queued
    ("queue", queue index, kind, start, length or iovcnt, tag) and every
    completion handed to the datapath ("complete", queue index, tag, ret);
  * holds the completion of a chosen request (hold(kind, start)) until
    release() -- the way to keep a request in flight for as long as a test
    needs, deterministically;
  * can make the next do_io() fail as libblkio's blkioq_do_io does when the
    device is gone (fail_next_do_io(errno)): what the datapath must survive.
wait_io() polls (every 2 ms) instead of sleeping on the completion fd, since
a held completion has already been taken from libblkio.
"""

from __future__ import annotations

import errno

import trio

from xenblk_vhost.storage import BlkioError


class GatedQueue:
    counted_reaps = False  # what it holds back is filtered out of do_io's lists (see Queue.counted_reaps)

    def __init__(self, queue, log: list) -> None:
        self._q = queue
        self.log = log
        self._hold_next: set[tuple[str, int]] = set()
        self._held_tags: set[int] = set()
        self._held: list[tuple[int, int]] = []
        self._released: list[tuple[int, int]] = []
        self._fail_errno = 0

    def __getattr__(self, name):  # completion_fd, index, max_completions, submit...
        return getattr(self._q, name)

    # ---- holding ----

    def hold(self, kind: str, start: int) -> None:
        """Hold the completion of the next `kind` request queued at byte `start`."""
        self._hold_next.add((kind, start))

    def release(self) -> None:
        self._released += self._held
        self._held = []
        self._held_tags.clear()

    @property
    def holding(self) -> int:
        return len(self._held)

    def _queued(self, kind: str, start: int, size: int, tag: int) -> None:
        self.log.append(("queue", self._q.index, kind, start, size, tag))
        if (kind, start) in self._hold_next:
            self._hold_next.discard((kind, start))
            self._held_tags.add(tag)

    # ---- requests ----

    def queue_lane(self, *args) -> bool:
        """The copy path's compiled lane queues a batch in one call, out of this wrapper's sight:
        refused, so every request comes through read()/write() below, logged and holdable."""
        return False

    def read(self, start, addr, length, tag, flags=0):
        self._queued("read", start, length, tag)
        self._q.read(start, addr, length, tag, flags)

    def write(self, start, addr, length, tag, flags=0):
        self._queued("write", start, length, tag)
        self._q.write(start, addr, length, tag, flags)

    def readv(self, start, iov, iovcnt, tag, flags=0):
        self._queued("readv", start, iovcnt, tag)
        self._q.readv(start, iov, iovcnt, tag, flags)

    def writev(self, start, iov, iovcnt, tag, flags=0):
        self._queued("writev", start, iovcnt, tag)
        self._q.writev(start, iov, iovcnt, tag, flags)

    def flush(self, tag, flags=0):
        self._queued("flush", -1, 0, tag)
        self._q.flush(tag, flags)

    def discard(self, start, length, tag, flags=0):
        self._queued("discard", start, length, tag)
        self._q.discard(start, length, tag, flags)

    def write_zeroes(self, start, length, tag, flags=0):
        self._queued("write_zeroes", start, length, tag)
        self._q.write_zeroes(start, length, tag, flags)

    # ---- completions ----

    def fail_next_do_io(self, err: int) -> None:
        self._fail_errno = err

    def do_io(self, min_completions=0, max_completions=None, timeout=30.0):
        if self._fail_errno:
            err, self._fail_errno = self._fail_errno, 0
            self.log.append(("do_io failed", self._q.index, err))
            raise BlkioError(err, "injected", f"blkioq_do_io(queue {self._q.index})")
        done = self._q.do_io(min_completions, max_completions, timeout)
        out, self._released = self._released, []
        for tag, ret in done:
            if tag in self._held_tags:
                self._held_tags.discard(tag)
                self._held.append((tag, ret))
            else:
                out.append((tag, ret))
        for tag, ret in out:
            self.log.append(("complete", self._q.index, tag, ret))
        return out

    async def wait_io(self, max_completions=None, timeout=None):
        deadline = trio.current_time() + (timeout if timeout is not None else 1e9)
        while True:
            out = self.do_io(0, max_completions)
            if out:
                return out
            if trio.current_time() >= deadline:
                raise BlkioError(errno.ETIME, "no completion", "GatedQueue.wait_io")
            await trio.sleep(0.002)


def gate_queues(vbd, log: list) -> list[GatedQueue]:
    """Wrap every queue of the Vbd's storage (before serve) with one shared log."""
    gated = [GatedQueue(q, log) for q in vbd.storage.queues]
    vbd.storage.queues[:] = gated
    return gated
