"""The ring engine: a wake-up's plain requests served in one C call (native/ring_engine.c).

Step 13 held whole plain batches in C (copy_lane.py's hold), but the ring worker still drove them
with a dozen calls per wake-up (take, parse, hold, copy in, queue, do_io, walk, copy out, answer,
push, notify), each with its Python around it: at QD1 that is the whole cost, and under QEMU's TCG
on the rig every interpreted line counts again. The engine makes the chain one call: xb_engine_run
takes what the frontend published, and for the leading plain READ/WRITEs does what the held path
does with the same kernels in the same order, until the ring is empty (req_event re-armed, as
RING_FINAL_CHECK_FOR_REQUESTS) or something is not for it. The reaper's completions go the same
way (xb_engine_reap).

The ring worker (ring_worker.py) stays the owner of everything: it copies its state in before a
call (the ring's private indices, the free-slot stack) and takes the engine's out after (indices,
slots taken and given back, counts, latency, how many are held in the storage), then does what the
engine stopped for, the reference way (RingWorker._after_engine). It uses the engine only where the
held path would serve the batch anyway: the compiled intake, lane and answers, reaping by count, a
compiled journal or none, nothing stalled, halted, failed or away. XENBLK_RING_ENGINE=0 turns it
off (bench.py --engines no-engine compares).

The grant copy and the notify are the platform's: gntdev's ioctl or the simulated hypervisor's
tables, /dev/xen/evtchn's ioctl or the simulated channel's eventfd (EngineCopier, EngineNotifier:
what the Gntdev and EventChannel implementations offer; a wrapper that does not is served the
Python way).
"""

from __future__ import annotations

import logging
import os
from array import array
from typing import Any, Protocol, runtime_checkable

from ...storage import Queue
from .stats import LATENCY_BOUNDS

log = logging.getLogger(__name__)

ENGINE_ENV = "XENBLK_RING_ENGINE"

# Batches one call serves before giving the other rings and tasks a turn (XB_ENGINE_MORE).
MAX_BATCHES = 16
# xb_engine_serve comes back at least this often (ms) while busy, in a ring worker process: for the stall
# check (as SERVE_THREAD_SLICE_MS) and its periodic stats (ring_process.STATS_INTERVAL); the service asks for
# fresh ones over the channel, which brings the poll back at once. Each return cost the rig's TCG dom0
# milliseconds of Python: at 100 ms, 36-56 QD1 requests a return (step 20).
SERVE_SLICE_MS = 1000
# The same in a thread of the service's process (RingWorker._serve_in_thread): nothing in that process waits
# for the ring meanwhile (a task that needs it stops the poll through its stop fd), so it comes back only for
# the stall check (no completion, no event for this long while requests are in the storage) and to bound a
# stay. Each return costs the rig's TCG dom0 milliseconds of trio, and the ring stays on trio's path until
# the reaper's wait ends.
SERVE_THREAD_SLICE_MS = 1000
# In the service's thread an idle ring's poll sleeps without a timeout (struct xb_engine's idle_untimed): it
# comes back when it has something to report (then within the slice) or when a task needs the ring (every one
# that does stops the poll first: RingWorker._serve_pause). Not so in a ring worker process, whose poll blocks
# its trio loop: what other threads hand that loop (log records for the channel, trio's token) waits for the
# poll's return, a slice at most.
SERVE_IDLE_UNTIMED = True
# Requests of the most segments the engine's grant-copy array has room for (beyond: the reference path).
INDIRECT_IN_FLIGHT = 32

# What xb_engine_run / xb_engine_reap return (blkio_calls.h's XB_ENGINE_*; tests check they agree).
ENGINE_IDLE = 0  # the ring is empty, req_event re-armed
ENGINE_MORE = 1  # MAX_BATCHES served: call again after a schedule point
ENGINE_PYTHON = 2  # the next request (or the lack of a slot or journal frame) is the reference path's
ENGINE_REAPED = 3  # e.reaped completions wait in the queue's array for RingWorker._reaped
ENGINE_COPY_IN_FAILED = 4  # the last batch is held, not queued: its failed copies in are failed()
ENGINE_UNPREPARED = 5  # the last batch is held, its copy in not packed
ENGINE_COPY_OUT_FAILED = 6  # e.reaped completions walked (ready()), failed() copies out
ENGINE_STORAGE_ERROR = 7  # blkioq_do_io failed: errno e.error
ENGINE_BUG = 8
ENGINE_MAP = 9  # the next request's persistent grants are to be mapped first (CopyGrants.absorb): call again

COPY_GNTDEV, COPY_SIM = 1, 2
NOTIFY_EVTCHN, NOTIFY_EVENTFD = 1, 2


@runtime_checkable
class EngineCopier(Protocol):
    def engine_copier(self, domid: int) -> dict[str, int] | None:
        """How the engine runs this gntdev's grant copies with domid's grants: {"kind": COPY_GNTDEV,
        "fd", "request"} or {"kind": COPY_SIM, the simulated domain's table addresses}; None: it cannot."""


@runtime_checkable
class EngineNotifier(Protocol):
    def engine_notify(self) -> tuple[int, int, int, int, int, int] | None:
        """(kind, fd, ioctl request, port, the fd readable while an event is pending, the reset ioctl
        request) for the engine's notify of this channel and its own waits; None: it cannot (closed)."""


def wanted() -> bool:
    return os.environ.get(ENGINE_ENV, "1").strip() != "0"


# XENBLK_RING_SERVE=0: the engine without its own poll (xb_engine_serve), in ring worker processes and in
# the service's threads alike: every wake-up through trio (bench.py --engines no-serve compares).
SERVE_ENV = "XENBLK_RING_SERVE"


def serve_wanted() -> bool:
    return os.environ.get(SERVE_ENV, "1").strip() != "0"


# XENBLK_RING_SPIN_US: how long the engine's poll looks at the ring (and the storage's completions) before
# asking the frontend for an event and sleeping (ring_engine.c's spin_for_work); 0: it sleeps at once. 50 us
# by bench.py (README step 16: 10 and 20 us lost most of it, a QD1 round trip there being 20-30 us); after
# work only, so an idle ring costs nothing and a ring at a few hundred requests a second a few per cent of
# a core at most.
SPIN_ENV = "XENBLK_RING_SPIN_US"
DEFAULT_SPIN_US = 50

# XENBLK_RING_BLOCK_WAIT=0: the engine's serve calls (the service's serve thread, a ring worker process's
# main thread) sleep in poll(2) and then read the event channel, as before step 23, instead of one blocking
# read(2) (struct xb_engine's block_wait): for measurements.
BLOCK_WAIT_ENV = "XENBLK_RING_BLOCK_WAIT"


def block_wait_wanted() -> bool:
    return os.environ.get(BLOCK_WAIT_ENV, "1").strip() != "0"


# XENBLK_LATENCY_SAMPLE: the engine times one batch taken in N for the latency histogram (1: every one).
# Timing a batch costs two clock reads (its take, its answer): free where the vDSO reads the clock, a
# syscall each where Linux reads it through the hypervisor (a PV dom0 whose TSC it found unstable: the
# rig's, 25-34 us a read; at queue depth one the two were a quarter of the engine's syscalls per request).
LATENCY_SAMPLE_ENV = "XENBLK_LATENCY_SAMPLE"
# A clock read slower than this is a syscall (a vDSO read costs tens of ns; see xb_clock_cost_ns).
SLOW_CLOCK_NS = 1000
# Where the clock is a syscall: one batch in SLOW_CLOCK_SAMPLE timed, and no look before sleeping (the
# look reads the clock at every turn; on the rig it cost dom0 28 % more CPU per I/O: README step 17).
SLOW_CLOCK_SAMPLE = 16


def _env_int(name: str, low: int, high: int) -> int | None:
    """An integer knob from the environment, clamped; None when unset or not a number."""
    try:
        return max(low, min(high, int(os.environ[name])))
    except (KeyError, ValueError):
        return None


_clock_cost_ns: int | None = None


def clock_cost_ns(lib: Any) -> int:
    """What a clock read costs in this process's host (measured once, logged when it is a syscall)."""
    global _clock_cost_ns
    if _clock_cost_ns is None:
        _clock_cost_ns = int(lib.xb_clock_cost_ns())
        if _clock_cost_ns >= SLOW_CLOCK_NS:
            log.info("a clock read costs %.1f us here (a syscall, no vDSO clock): the ring engine times one batch"
                     " in %d for the latency histogram (%s) and does not look at the ring before sleeping (%s)"
                     " unless set", _clock_cost_ns / 1000, SLOW_CLOCK_SAMPLE, LATENCY_SAMPLE_ENV, SPIN_ENV)
    return _clock_cost_ns


def spin_us(lib: Any = None) -> int:
    """XENBLK_RING_SPIN_US, else DEFAULT_SPIN_US (0 where a clock read is a syscall: lib given)."""
    us = _env_int(SPIN_ENV, 0, 1000)
    if us is not None:
        return us
    return 0 if lib is not None and clock_cost_ns(lib) >= SLOW_CLOCK_NS else DEFAULT_SPIN_US


def latency_sample(lib: Any) -> int:
    """XENBLK_LATENCY_SAMPLE, else 1 (SLOW_CLOCK_SAMPLE where a clock read is a syscall)."""
    every = _env_int(LATENCY_SAMPLE_ENV, 1, 1024)
    if every is not None:
        return every
    return SLOW_CLOCK_SAMPLE if clock_cost_ns(lib) >= SLOW_CLOCK_NS else 1


class RingEngine:
    """One ring's struct xb_engine and its scratch arrays (all owned here: the struct points into them)."""

    __slots__ = ("_ffi", "e", "_run", "_reap", "_serve", "_keep", "_stack", "queue", "_notifier_of", "grants",
                 "_lib", "wake_signal")

    def __init__(self, blkio: Any, *, ring: Any, cfg_address: int, rsp_address: int, sring: int,
                 journal_address: int, lane: Any, queue: Any, handles: tuple[int, int, int], copier: dict[str, int],
                 notifier: tuple[int, int, int, int, int, int], notifier_of: Any = None,
                 indirect: tuple[int, int, int, int, int] | None = None, per_frame: int = 0,
                 grants: Any = None) -> None:
        ffi, lib = blkio.ffi, blkio.lib
        self._ffi = ffi
        self.queue = queue
        self._notifier_of = notifier_of  # the channel's engine_notify: None once it is closed
        e = ffi.new("struct xb_engine *")
        nslots = lane.nslots
        room = max(nslots, handles[2])  # walks of up to max_completions, batches of up to nslots
        entry = ring.entry_size
        # Indirect requests (lane_entry.h): (grefs offset, large stack, its depth, region, max_transfer).
        max_ind = lane.max_ind if indirect is not None else 0
        # The grant-copy array: 11 segments a request, and room for INDIRECT_IN_FLIGHT requests of the most
        # segments (a batch or a walk needing more goes to the reference path).
        room_segs = 11 * room + max_ind * min(nslots, INDIRECT_IN_FLIGHT)
        keep = [
            ffi.new("uint8_t[]", ring.size * entry),       # raw
            ffi.new("uint8_t[]", ring.size * 40),          # recs (struct xk_req: 40 bytes)
            ffi.new("uint16_t[]", nslots),                 # taken
            ffi.new("uint16_t[]", room),                   # ready
            ffi.new("uint16_t[]", room_segs),              # owners
            ffi.new("uint16_t[]", room),                   # failed
            ffi.new("uint8_t[]", 24 * room_segs),          # segs (struct xk_copy_seg: 24 bytes)
            ffi.new("uint16_t[]", nslots),                 # stack
            ffi.new("double[]", LATENCY_BOUNDS),
            ffi.new("uint64_t[]", len(LATENCY_BOUNDS) + 1),
            ffi.new("uint64_t[]", len(LATENCY_BOUNDS) + 1),
        ]
        if max_ind:
            keep.append(ffi.new("uint16_t[]", ring.size))                                  # lens
            keep.append(ffi.new("uint8_t[]", max(1, per_frame) * max_ind * 8))           # jind
        # Persistent grants (copy_grants.py): the table, and scratch for the segments that still go to Xen.
        self.grants = grants
        if grants is not None:
            keep.append(ffi.new("uint8_t[]", 24 * room_segs))   # pg_rest
            keep.append(ffi.new("uint32_t[]", room_segs))       # pg_idx
        self._keep = keep
        addr = [int(ffi.cast("uintptr_t", a)) for a in keep]
        e.sring = sring
        e.size = ring.size
        e.entry = entry
        e.cfg = cfg_address
        e.rsp = rsp_address
        e.journal = journal_address
        e.raw, e.recs, e.taken, e.ready, e.owners, e.failed, e.segs, e.stack = addr[:8]
        e.bounds, e.buckets, e.call_buckets = addr[8:11]
        e.room_segs = room_segs
        if max_ind:
            assert indirect is not None
            e.lens, e.jind = addr[11:13]
            e.ind, e.max_ind = lane.ind_addr, max_ind
            e.grefs_off, e.large, e.nlarge, e.region, e.max_transfer = indirect
        if grants is not None:
            e.pgrants = grants.address
            e.pg_rest, e.pg_idx = addr[-2:]
        e.nbounds = len(LATENCY_BOUNDS)
        e.table = lane.table_addr
        e.nslots = nslots
        e.base = lane.base
        e.stride = lane.stride
        e.q, e.completions, e.max_completions = handles
        e.max_batches = MAX_BATCHES
        e.copy_kind = copier["kind"]
        if copier["kind"] == COPY_GNTDEV:
            e.copy_fd, e.copy_request = copier["fd"], copier["request"]
        else:
            e.sim_table, e.sim_entries, e.sim_active = copier["table"], copier["entries"], copier["active"]
            e.sim_memory, e.sim_pages = copier["memory"], copier["pages"]
            e.sim_alive, e.sim_alive_value = copier["alive"], copier["alive_value"]
        e.domid = copier["domid"]
        e.ldomid = copier.get("ldomid", 0)
        e.notify_kind, e.notify_fd, e.notify_request, e.notify_port, e.wait_fd, e.reset_request = notifier
        e.completion_fd = queue.completion_fd
        e.spin_ns = e.spin_cur_ns = spin_us(lib) * 1000
        e.lat_every = latency_sample(lib)  # (sampling applies while the look is off: struct xb_engine)
        self.e = e
        self._stack = keep[7]
        self._run = lib.xb_engine_run
        self._reap = lib.xb_engine_reap
        self._serve = lib.xb_engine_serve
        self._lib = lib
        self.wake_signal: int | None = None  # block_wait's (enable_block_wait)

    def enable_block_wait(self) -> int | None:
        """serve()'s sleeps become one blocking read of the event channel (blkio_calls.h: block_wait): only
        for a caller that wakes the serving thread with the returned signal (pthread_kill), again until
        serve() has returned. None (nothing changed) where the signal's handler could not be installed."""
        if self.wake_signal is None:
            signo = int(self._lib.xb_wake_signal())
            if signo <= 0:
                return None
            self.wake_signal = signo
            self.e.block_wait = 1
        return self.wake_signal

    def channel_open(self) -> bool:
        """Whether the event channel is still open (the engine writes to its fd)."""
        return self._notifier_of is None or self._notifier_of() is not None

    def load_free(self, free: list[int]) -> None:
        """The ring worker's free-slot stack in (before a call)."""
        n = len(free)
        if n:
            self._ffi.memmove(self._stack, array("H", free), 2 * n)
        self.e.nfree = n

    def run(self) -> int:
        return self._run(self.e)

    def reap(self, n: int) -> int:
        return self._reap(self.e, n)

    def serve(self, wake_fd: int, timeout_ms: int, idle_untimed: bool = False) -> int:
        self.e.idle_untimed = 1 if idle_untimed else 0
        return self._serve(self.e, wake_fd, timeout_ms)

    def free_changes(self) -> tuple[int, list[int]]:
        """After a call: (low, the stack's entries from low on): the entries below low are untouched."""
        e = self.e
        low, top = e.low, e.nfree
        return low, (self._ffi.unpack(self._stack + low, top - low) if top > low else [])

    def taken(self, n: int) -> list[int]:
        return self._ffi.unpack(self._ffi.cast("uint16_t *", self.e.taken), n)

    def ready(self, n: int) -> list[int]:
        return self._ffi.unpack(self._ffi.cast("uint16_t *", self.e.ready), n)

    def failed(self) -> list[int]:
        return self._ffi.unpack(self._ffi.cast("uint16_t *", self.e.failed), self.e.nfailed)

    def fold_latency(self, latency: Any) -> None:
        """Add the latency counted since the last fold to latency (a LatencyHistogram)."""
        e = self.e
        mask = e.lat_mask
        if not mask:
            return
        buckets = self._keep[9]
        counts = latency.counts
        while mask:
            low = mask & -mask
            b = low.bit_length() - 1
            counts[b] += buckets[b]
            buckets[b] = 0
            mask ^= low
        latency.sum += e.lat_total
        e.lat_mask = 0
        e.lat_total = 0.0

    def take_counts(self) -> tuple[int, int, int, int]:
        c = self.e.counts
        out = (c[0], c[1], c[2], c[3])
        c[0] = c[1] = c[2] = c[3] = 0
        return out


def make_engine(*, ring: Any, intake: Any, answers: Any, journal: Any, lane: Any, queue: Any, datapath: Any,
                channel: Any, max_transfer: int = 0) -> RingEngine | None:
    """The ring's engine when every piece it chains is the compiled one, else None (the held path)."""
    if not wanted() or answers is None or lane is None:
        return None
    cfg_address = getattr(intake, "cfg_address", None)
    # The engine submits and reaps itself (blkioq_do_io): only for a queue whose reaping is Queue's own
    # (a wrapper that only counts or waits may delegate; one that stalls or filters reaps may not).
    if getattr(getattr(queue, "do_io_count", None), "__func__", None) is not Queue.do_io_count:
        return None
    handles_of = getattr(queue, "engine_handles", None)
    handles = handles_of() if handles_of is not None else None
    copier_of = getattr(datapath, "engine_copier", None)
    notifier_of = getattr(channel, "engine_notify", None)
    if cfg_address is None or handles is None or copier_of is None or notifier_of is None:
        return None
    # Indirect requests too where the lane has a side table and the data path lends its large buffers.
    indirect = None
    buffers_of = getattr(datapath, "engine_buffers", None)
    grefs_off = getattr(intake, "grefs_offset", None)
    if getattr(lane, "max_ind", 0) and buffers_of is not None and grefs_off is not None:
        stack, depth, region = buffers_of()
        indirect = (grefs_off, stack, depth, region, max_transfer)
    journal_address = 0
    per_frame = 0
    if journal is not None:
        state = getattr(journal, "c_state", None)
        if state is None:
            return None
        journal_address = journal.c_state_address
        per_frame = journal.geometry.per_frame
    grants_of = getattr(datapath, "engine_grants", None)
    grants = grants_of() if grants_of is not None else None
    copier = copier_of()
    notifier = notifier_of()
    if copier is None or notifier is None:
        return None
    from ... import native

    try:
        blkio = native.load_blkio()
    except native.NativeBuildError as e:
        log.warning("the ring engine is unavailable: %s", e)
        return None
    if not hasattr(blkio.lib, "xb_engine_run"):
        return None
    return RingEngine(blkio, ring=ring, cfg_address=cfg_address, rsp_address=answers.ctx_address,
                      sring=answers.sring_address, journal_address=journal_address, lane=lane, queue=queue,
                      handles=handles, copier=copier, notifier=notifier, notifier_of=notifier_of, indirect=indirect,
                      per_frame=per_frame, grants=grants)
