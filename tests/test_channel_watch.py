"""ChannelWatch (block_wait in a ring worker process): it signals only a thread inside a serve call, while the
watched fd is readable, again until the call is over; never outside one; and it stops when closed."""
import os
import threading
import time

from xenblk_vhost import native
from xenblk_vhost.backend.datapath.channel_watch import ChannelWatch


def _signo() -> int:
    signo = int(native.load_blkio().lib.xb_wake_signal())  # (installs the engine's no-op handler)
    assert signo > 0
    return signo


# How long a call lasts where the watch must signal it: long enough that a thread the machine's load delays
# for a while still finds the call on (the test waits only for what it must see).
CALL_S = 1.0


def _serve_for(watch: ChannelWatch, seconds: float) -> threading.Thread:
    """A thread inside one serve call for `seconds` (its sleep, interrupted by the signals, is resumed)."""
    def call() -> None:
        with watch.serving():
            time.sleep(seconds)
    thread = threading.Thread(target=call)
    thread.start()
    return thread


def _wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline
        time.sleep(0.001)


def test_a_readable_channel_wakes_the_call_on_and_again_until_it_is_over():
    fd = os.eventfd(0, os.EFD_NONBLOCK)
    watch = ChannelWatch(fd, _signo(), retry_s=0.002)
    try:
        call = _serve_for(watch, CALL_S)
        time.sleep(0.05)
        assert watch.signals_sent == 0  # (nothing to say: the call sleeps on)
        os.eventfd_write(fd, 1)
        _wait_for(lambda: watch.signals_sent >= 3)  # (this call does not return for them: sent again)
        call.join()
        sent = watch.signals_sent
        time.sleep(0.05)
        assert watch.signals_sent == sent  # the call is over: none after it, though the fd is still readable
        call = _serve_for(watch, CALL_S)  # the next call, the fd not drained: woken at once, as the poll was
        _wait_for(lambda: watch.signals_sent > sent)
        call.join()
        os.eventfd_read(fd)  # (drained, as the channel's reader does between calls)
        sent = watch.signals_sent
        call = _serve_for(watch, 0.1)
        call.join()
        assert watch.signals_sent == sent
    finally:
        watch.close()
        os.close(fd)
    assert not watch._thread.is_alive()


def test_nothing_is_sent_outside_a_call_and_a_hang_up_wakes_one():
    r, w = os.pipe()
    watch = ChannelWatch(r, _signo(), retry_s=0.002)
    try:
        os.close(w)  # (the service's death: the channel hangs up)
        time.sleep(0.05)
        assert watch.signals_sent == 0
        call = _serve_for(watch, CALL_S)
        _wait_for(lambda: watch.signals_sent >= 1)
        call.join()
    finally:
        watch.close()
        watch.close()  # (twice: a no-op)
        os.close(r)
    assert not watch._thread.is_alive()
