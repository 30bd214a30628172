"""Before a takeover runs requests again: the process that last wrote the journal is gone.

A SIGKILLed backend leaves writes it submitted and never answered; the next process runs them
again from the journal (ring_journal.py). If one of the old writes could still reach the storage
after that, it could land after the new process answered the rerun and the guest wrote the same
sectors anew: old data over new. Which old writes can still land, with driver io_uring
(Linux's io_uring, read for facts: do_exit, io_uring_cancel_generic, io_wq_exit_workers):

  * work the kernel handed to io-wq (a buffered write that would block, anything punted): run
    by io-wq worker threads of the killed process. The exiting task cancels what has not
    started and waits for its workers to finish and exit (io_wq_put_and_exit) before its exit
    goes on, and the process is not reaped before all its threads are gone. So once the
    process is gone (reaped, or a zombie whose every thread has exited), none of these lands.
    FENCED here.
  * a process that is still alive: an old ring worker process that outlived its parent, or a
    new daemon started by hand while the old one is still dying. FENCED here (the same wait).
  * O_DIRECT writes already issued to the block layer (bios in flight): the kernel does not
    make the exiting task wait for them; the ring's context is torn down afterwards by a
    kernel worker. They can complete after the process is reaped. NOT FENCED: nothing a
    new process can observe says when they are done (their latency is normally far below
    the start-up of a new daemon, but a storage that stalls for seconds can hold one).
  * vhost-user storage (qemu-storage-daemon): the server keeps executing what it took after
    its client died; the server's own business. NOT FENCED here.

The fence: the journal header names its writer (pid and the kernel's start time of that
process, so a recycled pid is not mistaken for it: journal.py's set_writer). A process taking
over a journal with requests to run again waits until that writer is gone, polling /proc.
Bounded (WAIT_S): a process that cannot die (stuck in the kernel on its storage) is reported,
and the takeover goes on.
"""

from __future__ import annotations

import logging
import os
import time

import trio

log = logging.getLogger(__name__)

WAIT_S = 30.0
POLL_S = 0.005


def start_time(pid: int) -> int | None:
    """The process's start time (clock ticks after boot, /proc/PID/stat field 22); None if no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # comm (field 2) may hold spaces and parentheses: the fields after it follow the last ')'.
    fields = stat[stat.rindex(b")") + 2:].split()
    return int(fields[19])


def own_identity() -> tuple[int, int]:
    pid = os.getpid()
    start = start_time(pid)
    assert start is not None
    return pid, start


def _thread_states(pid: int) -> list[bytes]:
    states: list[bytes] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError):
        return states
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        states.append(stat[stat.rindex(b")") + 2:].split()[0])
    return states


def writer_gone(pid: int, start: int) -> bool:
    """True when process pid (started at `start`) has no thread left that could submit or finish I/O."""
    if pid <= 0:
        return True
    if start_time(pid) != start:
        return True  # no such process, or the pid now names another one
    return all(s in (b"Z", b"X") for s in _thread_states(pid))


async def wait_writer_gone(pid: int, start: int, log_name: str, timeout: float = WAIT_S) -> bool:
    """Wait until the journal's last writer is gone (see the module doc); False if it outlived timeout."""
    if pid == os.getpid() or writer_gone(pid, start):
        return True
    t0 = time.monotonic()
    log.info("%s: the journal's last writer (pid %d) is still running: waiting for it to be gone before "
             "running its requests again", log_name, pid)
    with trio.move_on_after(timeout):
        while not writer_gone(pid, start):
            await trio.sleep(POLL_S)
        log.info("%s: pid %d gone after %.3f s", log_name, pid, time.monotonic() - t0)
        return True
    log.warning("%s: the journal's last writer (pid %d) is still there after %.0f s; running its requests "
                "again anyway: a write it submitted could still land after ours", log_name, pid, timeout)
    return False
