"""block_wait in a ring worker process: a thread that ends the engine's blocking read when the service speaks.

A ring worker process serves its ring from the engine's own sleeps on its main thread
(RingWorker._serve_engine, the trio loop blocked meanwhile) and must come back when its channel to the
service is readable (a message, or the service's death: EOF). Sleeping in poll(2) the engine watched the
channel's fd beside the event channel; with block_wait (blkio_calls.h) it sleeps in one blocking read(2)
of the event channel, one kernel call less a wake-up, which no second fd can end. This thread watches the
channel's fd instead, for a whole serve call at a time (one poll(2) of its own a call, nothing a request),
and when it is readable sends the serving thread the engine's wake signal, as RingWorker._serve_acquire
does in the service's process: again every retry_s until the call has returned, since a signal that lands
between the engine's last look at the ring and its read is not seen (its handler only makes the read fail
with EINTR).

The thread signals only a thread inside a serve call (`serving()`, whose exit waits for the lock the
signals are sent under), and after the call it waits for the next one before it looks at the fd again:
the channel's reader (a trio task of the main thread) drains it in between, and a channel still readable
when the next call starts ends that call at once, as the poll did.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class ChannelWatch:
    """Wakes the thread serving a ring (with signo) whenever fd is readable while it serves."""

    def __init__(self, fd: int, signo: int, retry_s: float) -> None:
        self.fd = fd
        self._signo = signo
        self._retry_s = retry_s
        self._cond = threading.Condition()
        self._serving = 0  # the serving thread's ident while a serve call is on; 0: none
        self._call = 0  # which serve call (counted): a signal is for the call that was on when the fd spoke
        self._closed = False
        self.signals_sent = 0  # (for tests and the curious)
        self._quit = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._thread = threading.Thread(target=self._run, name=f"xenblk-channel-watch-{fd}", daemon=True)
        self._thread.start()

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Around one serve call, on the thread that makes it: that thread is woken while it is inside."""
        with self._cond:
            self._serving = threading.get_ident()
            self._call += 1
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:  # (no signal is sent after this: they are sent under the lock)
                self._serving = 0
                self._cond.notify()

    def close(self) -> None:
        """Stop the thread and wait for it (not from inside serving())."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify()
        os.eventfd_write(self._quit, 1)
        self._thread.join()
        os.close(self._quit)

    def _wait_serving(self) -> bool:
        """Until a serve call is on; False: closed."""
        with self._cond:
            while not self._serving and not self._closed:
                self._cond.wait()
            return not self._closed

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(self._quit, select.POLLIN)
        try:
            while self._wait_serving():
                ready = dict(poller.poll())  # (the GIL released: the serving thread is in C, without it too)
                if self._quit in ready:
                    return
                if ready.get(self.fd, 0) & select.POLLNVAL:
                    log.error("ring worker: its channel's fd %d is closed; the serve calls end at their slice", self.fd)
                    return
                # Readable, or hung up (the service's death): bring the call on now back, until it is (a
                # signal landing before its read is not seen). A later call starting with the fd still
                # readable is the next poll's: it returns at once.
                with self._cond:
                    call = self._call  # (the one on now, if any: the fd is readable now)
                    while self._serving and self._call == call and not self._closed:
                        signal.pthread_kill(self._serving, self._signo)
                        self.signals_sent += 1
                        self._cond.wait(self._retry_s)
        except Exception:  # (cannot be expected; without this thread the calls still end at their slice)
            log.exception("ring worker: the channel watch failed; the serve calls end at their slice")
