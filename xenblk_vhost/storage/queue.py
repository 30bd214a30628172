"""One libblkio queue: the datapath.

Made for batches: queue many requests (each one C call, no allocation),
then one do_io() submits them all and reaps up to `max_completions`
completions into an array preallocated per queue. Completions come back as a
list of (tag, ret) tuples decoded in one C-level struct.iter_unpack over
that array; ret is 0 on success and -errno on failure, and error_message(i) fetches libblkio's text for the i-th
completion of the last do_io() only when someone wants it.

Addresses are ints (local virtual addresses: grant-mapped pages, memory
region offsets, IovecArray entries) and tags are ints that fit in a pointer
(they travel as the request's user_data).

A queue is not thread-safe (libblkio's rule); with trio it belongs to one
task at a time for submission, and to one task for wait_io().

Modes:
- blocking: do_io(min_completions=n, timeout=...) -- waits inside libblkio
  (blocks the thread: benchmarks, tools, never the trio event loop for long);
- event-driven: await wait_io() -- submits, then sleeps on the completion
  fd in trio until something completes.

The per-request calls (blkioq_read ... blkioq_flush, blkioq_do_io) go
through the compiled wrappers of native/blkio_calls.c when they can be
built: cffi's ABI mode (cdef.py) pays libffi's generic call machinery on
each, about as much as libblkio's own work per request. ABI mode stays the
reference, used when the wrappers cannot be built or the compiled kernels
are switched off (native.set_enabled(False): bench.py --engines python).
"""

from __future__ import annotations

import errno
import math
import os
import struct

import trio

from .. import native
from .cdef import ffi, lib
from .errors import BlkioError, last_error_message

# struct blkio_completion { void *user_data; const char *error_msg; int ret; uint8_t reserved_[12]; }
# decoded as (user_data, ret): the message pointer is skipped, fetched on demand.
_COMPLETION = struct.Struct("=Q8xi12x")
assert _COMPLETION.size == ffi.sizeof("struct blkio_completion")
_COMPLETION_SIZE = _COMPLETION.size
_iter_completions = _COMPLETION.iter_unpack

DEFAULT_MAX_COMPLETIONS = 256
DEFAULT_YIELD_EVERY = 4
DEFAULT_BLOCKING_TIMEOUT = 30.0  # seconds, for do_io(min_completions > 0)


def _closed(*_args, **_kwargs):
    raise BlkioError(errno.EBADF, "queue is closed", "blkioq")


def _compiled_calls():
    """native/blkio_calls.c's lib, or None (then ABI mode: the same calls, dearer)."""
    if not native.enabled:
        return None
    try:
        return native.load_blkio().lib
    except native.NativeBuildError:
        return None


class Queue:
    """A started queue of a Blkio instance (blkio_get_queue / blkio_add_queue).

    Obtain through Blkio.queue() / StorageDevice.queues; closed together with
    its instance. After close every method raises BlkioError(EBADF).
    """

    # do_io_count() and wait_io(count=True) leave the completions in the array (a wrapper that
    # filters completions sets this False: its callers then take do_io's lists)
    counted_reaps = True

    def __init__(self, handle, index: int, *, poll: bool = False, max_completions: int = DEFAULT_MAX_COMPLETIONS):
        getter = lib.blkio_get_poll_queue if poll else lib.blkio_get_queue
        q = getter(handle, index)
        if q == ffi.NULL:
            raise BlkioError(errno.ENOENT, last_error_message() or f"no queue {index}", "blkio_get_queue")
        if max_completions <= 0:
            raise ValueError("max_completions must be positive")
        self.index = index
        self.poll = poll
        self.max_completions = max_completions
        self._q = q
        self._completions = ffi.new("struct blkio_completion[]", max_completions)
        self._completion_bytes = memoryview(ffi.buffer(self._completions))
        # Where do_io_count() leaves its completions (struct blkio_completion[], 32 bytes each).
        self.completions_address = int(ffi.cast("uintptr_t", self._completions))
        self._timeout = ffi.new("struct timespec *")  # libblkio writes the remaining time back
        self._completion_fd: int | None = None
        # wait_io(): a full trio schedule point every yield_every calls that did not sleep.
        self.yield_every = DEFAULT_YIELD_EVERY
        self._calls_without_yield = 0
        self.select_calls(compiled=True)

    def select_calls(self, compiled: bool) -> bool:
        """Make the per-request calls through the compiled wrappers (when they can be had: see the
        module's doc) or through cffi's ABI mode; whether they are compiled now. Same results."""
        if self._q is None:
            _closed()
        # The C functions, swapped for _closed on close() so a stale Queue can
        # never hand a dangling blkioq pointer to libblkio. _qarg, _completions_arg,
        # _timeout_arg and _null are what each flavour takes for the queue, the
        # completion array, the timeout and NULL: cdata in ABI mode, addresses compiled.
        calls = _compiled_calls() if compiled else None
        self.compiled_calls = calls is not None
        if calls is not None:
            self._qarg = int(ffi.cast("uintptr_t", self._q))
            self._completions_arg = int(ffi.cast("uintptr_t", self._completions))
            self._timeout_arg = int(ffi.cast("uintptr_t", self._timeout))
            self._null = 0
            self._read, self._write = calls.xb_read, calls.xb_write
            self._readv, self._writev = calls.xb_readv, calls.xb_writev
            self._write_zeroes, self._discard = calls.xb_write_zeroes, calls.xb_discard
            self._flush, self._do_io = calls.xb_flush, calls.xb_do_io
            self._set_fd_enabled = calls.xb_set_completion_fd_enabled
            self._queue_lane = calls.xb_queue_lane
        else:
            self._qarg, self._completions_arg, self._timeout_arg, self._null = (
                self._q, self._completions, self._timeout, ffi.NULL)
            self._read, self._write = lib.blkioq_read, lib.blkioq_write
            self._readv, self._writev = lib.blkioq_readv, lib.blkioq_writev
            self._write_zeroes, self._discard = lib.blkioq_write_zeroes, lib.blkioq_discard
            self._flush, self._do_io = lib.blkioq_flush, lib.blkioq_do_io
            self._set_fd_enabled = lib.blkioq_set_completion_fd_enabled
            self._queue_lane = None
        return self.compiled_calls

    # ---- queueing requests (nothing reaches the device before do_io/wait_io) ----

    def read(self, start: int, addr: int, length: int, tag: int, flags: int = 0) -> None:
        self._read(self._qarg, start, addr, length, tag, flags)

    def write(self, start: int, addr: int, length: int, tag: int, flags: int = 0) -> None:
        self._write(self._qarg, start, addr, length, tag, flags)

    def readv(self, start: int, iovec_addr: int, iovcnt: int, tag: int, flags: int = 0) -> None:
        """iovec_addr: address of iovcnt struct iovec, e.g. IovecArray.address(i); kept until completion."""
        self._readv(self._qarg, start, iovec_addr, iovcnt, tag, flags)

    def writev(self, start: int, iovec_addr: int, iovcnt: int, tag: int, flags: int = 0) -> None:
        self._writev(self._qarg, start, iovec_addr, iovcnt, tag, flags)

    def write_zeroes(self, start: int, length: int, tag: int, flags: int = 0) -> None:
        self._write_zeroes(self._qarg, start, length, tag, flags)

    def discard(self, start: int, length: int, tag: int, flags: int = 0) -> None:
        self._discard(self._qarg, start, length, tag, flags)

    def flush(self, tag: int, flags: int = 0) -> None:
        self._flush(self._qarg, tag, flags)

    def queue_lane(self, table: int, nslots: int, idx: int, n: int, base: int, stride: int) -> bool:
        """The copy path's lane (backend/datapath/copy_lane.py): a READ or WRITE per slot of the
        uint16 array at idx, from the lane table at table, in one compiled call. False (nothing
        queued) when the calls are not compiled or an entry is not valid: queue them one by one."""
        call = self._queue_lane
        if call is None:
            return False
        return call(self._qarg, table, nslots, idx, n, base, stride) == n

    def engine_handles(self) -> tuple[int, int, int] | None:
        """(the blkioq, its completion array, max_completions) as addresses, for the ring engine
        (backend/datapath/ring_engine.py), when the calls are compiled and the queue open; the caller
        checks `closed` before each use of them (close() frees the queue)."""
        if self._q is None or not self.compiled_calls:
            return None
        return self._qarg, self._completions_arg, self.max_completions

    # ---- submitting and reaping ----

    def do_io(self, min_completions: int = 0, max_completions: int | None = None,
              timeout: float | None = DEFAULT_BLOCKING_TIMEOUT) -> list[tuple[int, int]]:
        """Submit everything queued and return up to max_completions (tag, ret).

        min_completions > 0 blocks the thread until that many completed or
        `timeout` seconds passed (then BlkioError(ETIME)). The timeout has a
        default because a vanished vhost-user server never completes
        anything: without it this would block forever (None: no limit).
        min_completions must not exceed the requests in flight (EINVAL).
        """
        n = self.do_io_count(min_completions, max_completions, timeout)
        return self.completed(n) if n else []

    def do_io_count(self, min_completions: int = 0, max_completions: int | None = None,
                    timeout: float | None = DEFAULT_BLOCKING_TIMEOUT) -> int:
        """do_io(), but how many completed: they stay in the completion array (completions_address;
        completed(n) as do_io's list) until the next do_io/wait_io. For a caller that walks them in
        compiled code (the copy path's lane) without a tuple per completion."""
        if max_completions is None:
            max_completions = self.max_completions
        elif max_completions > self.max_completions:
            raise ValueError(f"max_completions {max_completions} > preallocated {self.max_completions}")
        ts = self._null
        if timeout is not None and min_completions != 0:
            ts = self._timeout_arg
            frac, whole = math.modf(max(timeout, 0.0))
            self._timeout.tv_sec = int(whole)
            self._timeout.tv_nsec = int(frac * 1e9)
        n = self._do_io(self._qarg, self._completions_arg, min_completions, max_completions, ts)
        if n < 0:
            raise BlkioError(-n, last_error_message(), f"blkioq_do_io(queue {self.index})")
        return n

    def completed(self, n: int) -> list[tuple[int, int]]:
        """The (tag, ret) of the last do_io_count()'s n completions."""
        return list(_iter_completions(self._completion_bytes[: n * _COMPLETION_SIZE]))

    def submit(self) -> None:
        """Submit queued requests without reaping (do_io with max 0)."""
        n = self._do_io(self._qarg, self._null, 0, 0, self._null)
        if n < 0:
            raise BlkioError(-n, last_error_message(), f"blkioq_do_io(queue {self.index})")

    def error_message(self, position: int) -> str | None:
        """libblkio's message for completion `position` of the last do_io()/wait_io() batch.

        May be None even when ret < 0 (libblkio does not always say more).
        Valid only until the next do_io()/wait_io() on this queue.
        """
        if self._q is None:
            _closed()
        if not 0 <= position < self.max_completions:
            raise IndexError(position)
        msg = self._completions[position].error_msg
        return None if msg == ffi.NULL else ffi.string(msg).decode(errors="replace")

    # ---- event-driven mode (trio) ----

    @property
    def completion_fd(self) -> int:
        """The queue's completion fd (O_NONBLOCK; owned by libblkio; -1 for poll queues)."""
        if self._q is None:
            _closed()
        if self._completion_fd is None:
            self._completion_fd = lib.blkioq_get_completion_fd(self._q)
        return self._completion_fd

    def set_completion_fd_enabled(self, enabled: bool) -> None:
        if self._q is None:
            _closed()
        self._set_fd_enabled(self._qarg, enabled)

    async def wait_io(self, max_completions: int | None = None,
                      timeout: float | None = None, *, count: bool = False):
        """Submit everything queued, then return >= 1 completions (up to max).

        Sleeps on the completion fd when nothing has completed yet. The fd is
        enabled only while we sleep (the blkio(3) pattern: while we are busy
        processing completions, notifications would only cause extra
        wake-ups); after enabling we check again, because a completion that
        landed between the check and the enable raised no event. Spurious
        events and an already-drained eventfd (EAGAIN) just loop.

        Always a cancel point, taken *before* reaping so a cancellation never
        drops completions already taken from libblkio. With io_uring on
        page-cached files requests complete inline at submit, so a caller's
        loop may never sleep here: then every `yield_every`-th call that
        does not sleep is also a full schedule point (trio.lowlevel.checkpoint,
        ~5-10 us: too dear to pay on every batch of a 250k IOPS datapath,
        but often enough that other tasks keep running).

        timeout: seconds without any completion before BlkioError(ETIME)
        (libblkio cannot tell us that a vhost-user server died: its requests
        simply never complete). A closed queue wakes a sleeper with
        trio.ClosedResourceError.

        count: return how many completed instead (do_io_count: they wait in the completion array).
        """
        reap = self.do_io_count if count else self.do_io
        self._calls_without_yield += 1
        if self._calls_without_yield >= self.yield_every:
            self._calls_without_yield = 0
            await trio.lowlevel.checkpoint()
        else:
            await trio.lowlevel.checkpoint_if_cancelled()
        batch = reap(0, max_completions)
        if batch:
            return batch
        fd = self.completion_fd
        if fd < 0:
            raise BlkioError(errno.EINVAL, "poll queues have no completion fd", "wait_io")
        deadline = math.inf if timeout is None else trio.current_time() + timeout
        self._set_fd_enabled(self._qarg, True)
        try:
            while True:
                batch = reap(0, max_completions)
                if batch:
                    return batch
                with trio.move_on_at(deadline):
                    await trio.lowlevel.wait_readable(fd)
                self._calls_without_yield = 0  # sleeping was a schedule point
                if self._q is None:  # closed while we slept
                    raise trio.ClosedResourceError("queue closed while waiting for completions")
                try:
                    os.read(fd, 8)  # reset the eventfd before do_io, as blkio(3) requires
                except BlockingIOError:
                    pass  # spurious or already consumed: do_io below decides
                if trio.current_time() >= deadline:
                    batch = reap(0, max_completions)
                    if batch:
                        return batch
                    raise BlkioError(errno.ETIME, f"no completion within {timeout} s", f"wait_io(queue {self.index})")
        finally:
            if self._q is not None:
                self._set_fd_enabled(self._qarg, False)

    # ---- lifecycle ----

    @property
    def closed(self) -> bool:
        return self._q is None

    def _close(self) -> None:
        """Called by the owning Blkio before blkio_destroy()/blkio_remove_queue()."""
        if self._q is None:
            return
        if self._completion_fd is not None and self._completion_fd >= 0:
            # Wake any task sleeping in wait_readable(fd) before libblkio closes
            # the fd (trio must never wait on a closed or reused fd number).
            try:
                trio.lowlevel.notify_closing(self._completion_fd)
            except RuntimeError:
                pass  # closed outside trio.run(): nobody can be waiting in trio
        self._q = None
        self._completion_fd = None
        self._read = self._write = self._readv = self._writev = _closed
        self._write_zeroes = self._discard = self._flush = self._do_io = self._set_fd_enabled = _closed
        self._queue_lane = _closed

    def __repr__(self) -> str:
        return f"<Queue {self.index}{' poll' if self.poll else ''}{' closed' if self._q is None else ''}>"
