"""One ring's datapath: shared ring -> storage -> responses, in batches.

Two trio tasks per ring, sharing its state (single-threaded: no locks, and
no await inside a step that touches the ring):

  intake  wake on the event channel -> take up to <free slots> requests with
          RequestIntake (a private copy, validated) -> answer rejections ->
          ONE grant copy of all indirect pages of the batch into private
          memory, then decode their segments -> give each request a slot ->
          data path prepare (copy: ONE grant copy of all write data into the
          ring's memory region; map: one map call per batch) -> queue every
          storage request -> ONE do_io, which also reaps what completed
          inline (page-cached io_uring completes reads during submission) ->
          push responses, notify at most once -> checkpoint (not always:
          YIELD_EVERY) -> again, and
          RING_FINAL_CHECK_FOR_REQUESTS before sleeping. A wake-up that
          found nothing pauses the next wait, longer each time in a row
          (notify_backoff.py: blkback's lateeoi after XSA-332).
  reaper  sleep on the queue's completion fd (Queue.wait_io) while storage
          requests are outstanding -> complete the batch: next step of
          multi-step requests (flush, barrier), ONE grant copy of all read
          data back (copy path), unmap (map path), responses, ONE push.

Bounds: max_inflight request slots (a SlotPool; the ring takes no more
requests than it has free slots and counts oo_req when the frontend has
more), the data path's memory (copy path: a fixed region), max_completions
per reap. Nothing on the hot path allocates per request beyond the decoded
request itself and its grant-copy segments.

Failure rules:
  * a Rejection from the intake, a request whose grant copy or map failed,
    a storage completion with ret < 0: that request alone gets RSP_ERROR;
  * RingOverflow (bogus req_prod): log once, halt this ring (it answers
    nothing more, its in-flight requests still finish so their buffers can
    be freed); other rings and vbds are untouched;
  * the storage failing as a whole (do_io raising, or no completion at all
    for storage_timeout seconds while requests are outstanding: a vanished
    vhost-user server): every later request is answered RSP_ERROR without
    touching the storage, and so is what waited for memory; the ring stays
    alive and `on_storage_failure` tells the Vbd. What the storage still
    holds is NOT answered or released yet: io_uring (or a vhost-user
    server) may still write into its pages, and libblkio has no
    per-request cancel. The Vbd destroys the storage instance (the one
    abort libblkio has), then calls abandon() on every ring, which answers
    those requests RSP_ERROR and unmaps their pages. The teardown does the
    same for requests that outlive a timed-out drain;
  * unless the Vbd reconnects: then its `on_storage_failure` calls park()
    on every ring of the vbd (this one included) and destroys the instance:
    the requests in flight keep their slots, unanswered, and the intake
    takes nothing new (the guest's requests wait on the shared ring, where
    a guest expects them to wait). attach_storage(queue, datapath) with a
    new storage instance queues the parked requests again from step 0
    (writes copied again from the guest's still-granted pages on the copy
    path, whose memory region died with the old instance); give_up()
    answers them RSP_ERROR and fails fast until attach_storage(). stop()
    and drain() give up too: nothing taken stays unanswered.

Crash safety (journal.py, optional): with a journal, every batch taken is
recorded (its private copy, indirect segments included) before any storage
I/O, every answer before its response is written, every publication after
it; a worker started by a takeover first publishes again what was answered
but not published and runs again what was not answered (resume_from), then
takes requests after the last one recorded; and it notifies the frontend once (the last
process may have died between publishing responses and notifying).

Stopping: stop() makes the intake take nothing more; run() returns once
every request taken has been answered. After a cancellation, drain() does
the same from a shielded cleanup with a time limit.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time
from array import array
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial

import trio

from ...blkif.constants import (
    OP_FLUSH_DISKCACHE,
    OP_READ,
    OP_WRITE,
    OP_WRITE_BARRIER,
    RSP_ERROR,
    RSP_OKAY,
    SECTOR_SIZE,
    XEN_PAGE_SIZE,
)
from ...blkif.request import DiscardRequest, IndirectRequest, Rejection, Request
from ...blkif.ring import BackRing, RingOverflow
from ...native.intake import _SEG, CompiledIntake, make_intake
from ...storage import BlkioError, IovecArray, Queue
from ...xen.interfaces import EventChannel, Gntdev
from .barrier import BarrierGate
from .channel_watch import ChannelWatch
from .copy_lane import MIN_BATCH, CopyLane
from .data_path import DataPath
from .indirect_pages import IndirectPages
from .journal import InflightJournal
from .journal_compiled import make_compiled_answers, make_ring_push
from .notify_backoff import SpuriousBackoff
from .ring_engine import (
    ENGINE_BUG,
    ENGINE_COPY_IN_FAILED,
    ENGINE_COPY_OUT_FAILED,
    ENGINE_IDLE,
    ENGINE_MAP,
    ENGINE_MORE,
    ENGINE_PYTHON,
    ENGINE_REAPED,
    ENGINE_STORAGE_ERROR,
    ENGINE_UNPREPARED,
    SERVE_IDLE_UNTIMED,
    SERVE_SLICE_MS,
    SERVE_THREAD_SLICE_MS,
    RingEngine,
    block_wait_wanted,
    make_engine,
    serve_wanted,
)
from .ring_policy import RingPolicy
from .slots import (
    STEP_DISCARD,
    STEP_FLUSH,
    STEP_READ,
    STEP_WRITE,
    STEP_WRITE_ZEROES,
    Slot,
    SlotPool,
)
from .stats import RingStats
from .storage_ops import queue_step

log = logging.getLogger(__name__)

# How often _serve_pause (and a ring worker process's ChannelWatch) sends the engine's wake signal again
# while its serve call has not returned (block_wait: one landing just before the read is not seen; the next
# one is).
WAKE_RETRY_S = 0.002

_seg_unpack_from = _SEG.unpack_from  # a direct request's (gref, first_sect, last_sect), as the intake builds it
_seg_iter = _SEG.iter_unpack

R_READ_ONLY_FLUSH = "flush with data on a read-only device"

IDLE_PURGE_INTERVAL = 1.0  # seconds between persistent-grant purges while idle
# A batch whose requests all completed inline (page-cached io_uring) leaves nobody waiting for this
# ring: when the next request is already on the ring (at QD1 the guest, woken by our notify, often
# posts it before the notify returns) the intake takes it at once and pays a full trio schedule
# point (the run loop's epoll_wait and a task switch: 5-10 us, most of a QD1 request's cost) only
# every YIELD_EVERY such batches, so the other rings and tasks still run. With requests outstanding
# the reaper must run, so it yields at once; with the ring empty it yields too: the checkpoint gives
# the guest time to post, and costs less than sleeping on the channel and being woken.
YIELD_EVERY = 4

_READ: tuple[int, ...] = (STEP_READ,)
_WRITE: tuple[int, ...] = (STEP_WRITE,)
_FLUSH: tuple[int, ...] = (STEP_FLUSH,)
_WRITE_THEN_FLUSH: tuple[int, ...] = (STEP_WRITE, STEP_FLUSH)  # flush carrying data: durable when answered
_BARRIER: tuple[int, ...] = (STEP_FLUSH,)  # after the drain
_BARRIER_WITH_DATA: tuple[int, ...] = (STEP_FLUSH, STEP_WRITE, STEP_FLUSH)
_DISCARD: tuple[int, ...] = (STEP_DISCARD,)
_WRITE_ZEROES: tuple[int, ...] = (STEP_WRITE_ZEROES,)


class RingWorker:
    """One ring served by its policy (ring_policy.py) with its live objects:

    ring     the mapped shared ring (BackRing)      channel   its bound event channel
    queue    its libblkio queue                     datapath  its DataPath (copy or map)
    gntdev   for the indirect pages' grant copy     gate      the vbd's barrier gate (shared by its rings)
    on_storage_failure  told once when the storage fails as a whole (the Vbd reopens it at the next connect)

    It owns its request intake (`intake`: validated against policy.limits until set_limits) and
    its counters (`stats`).
    """

    def __init__(self, policy: RingPolicy, *, ring: BackRing, channel: EventChannel, queue: Queue,
                 datapath: DataPath, gntdev: Gntdev, gate: BarrierGate,
                 on_storage_failure: Callable[[Exception], None] | None = None,
                 journal: InflightJournal | None = None) -> None:
        self.policy = policy
        self.name = policy.name
        self.ring = ring
        # The compiled intake (native/intake.py) or its Python reference: the same verdicts.
        self.intake = make_intake(policy.abi, policy.limits)
        self.channel = channel
        self.queue = queue
        self.datapath = datapath
        self.gate = gate
        self.stats = RingStats()
        self.pool = SlotPool(policy.slots)
        self.shape = policy.shape
        self._discard_steps = _WRITE_ZEROES if policy.discard_by_write_zeroes else _DISCARD
        self._counts_grants = datapath.keeps_grants
        self.storage_timeout = policy.storage_timeout
        self._on_storage_failure = on_storage_failure
        # iovec arrays only where a request can have several extents: grant-
        # mapped pages (the copy path packs each request in one buffer and
        # splits it by byte ranges, never needing one).
        self._iovecs: IovecArray | None = None
        self._iov_per_slot = 0
        if datapath.uses_iovecs:
            max_segments = policy.max_request_segments
            self._iov_per_slot = self.shape.iovecs_per_request(max_segments, max_segments * XEN_PAGE_SIZE)
            self._iovecs = IovecArray(policy.slots * self._iov_per_slot)
        self._indirect = IndirectPages(gntdev, policy.frontend_domid, self.intake, policy.slots)
        self.journal = journal
        if journal is not None:  # the compiled intake then records each batch in its parse call
            self.intake.record_into(getattr(journal, "c_state", None))
        # The compiled engine's push: the ring's and the journal's published in one C call.
        self._compiled_push = make_ring_push(ring, journal)
        # ... and its answers: a push's responses and their journal answers in one C call; without a
        # journal only for pushes of 16 or more (below, BackRing's puts cost no more than the C
        # call's list conversion and wrapper; from 32 on the call saves ~0.04 us an answer).
        self._answers = make_compiled_answers(ring, journal)
        self._compiled_answers = self._answers.answer if self._answers is not None else None
        self._compiled_answers_from = 1 if journal is not None else 16
        self._resume: list | None = None  # (item, ref) a takeover left to run again

        self._io_outstanding = 0  # storage requests queued or submitted, not completed
        self._last_completion = time.monotonic()
        self._stalled: list[Slot] = []  # slots waiting for data-path memory, in ring order
        self._unpushed = False
        self._notify_failed = False
        self._halted = False
        self._failed = False
        self._away = False  # storage lost, the vbd reconnecting: requests parked, intake held
        self._parked: list[Slot] = []
        self._storage_back: trio.Event | None = None
        self.storage_resets = 0  # times this ring was handed a new storage instance
        self._stopping = False
        self._idle_scope: trio.CancelScope | None = None
        self._slot_freed: trio.Event | None = None
        self._all_answered: trio.Event | None = None
        self._reaper_wakeup = trio.Event()
        self._queued = False  # a storage request was queued since the last do_io (see _kick)
        self._last_purge = time.monotonic()
        self._backoff = SpuriousBackoff()
        self._lane_datapath: DataPath | None = None  # what _lane() decided for (see there)
        self._lane_queue: Queue | None = None
        self._lane_cached: CopyLane | None = None
        # Reap by count (Queue.do_io_count: the completions stay in the queue's array for the lane's
        # compiled walk) rather than as a list of (tag, ret); decided with the lane (see _lane).
        self._counted = False
        self._completions_at = 0  # where the queue leaves them then (Queue.completions_address)
        # A completion's tag is its slot's index, with the lane's bit (copy_lane.py) when the lane
        # queued it: masked off (pools of more than 0xFFFF slots have no lane, nor such tags).
        self._tag_slot = 0xFFFF if policy.slots <= 0xFFFF else -1
        # Whole plain batches held by the lane (copy_lane.py's hold): no Slot filled, answered from the
        # lane's table by the compiled walk; decided with the lane (see _lane). _held: how many slots
        # are held now (their Slots stale: _materialise gives them their fields before anything else
        # reads them), in _held_lane, whose buffers are _held_datapath's.
        self._holding = False
        self._held = 0
        # The ring engine (ring_engine.py): a wake-up's plain requests in one C call, where the held
        # path would serve them; decided with the lane (see _lane).
        self._engine: RingEngine | None = None
        # Set (ring worker processes: the channel's fd) when nothing else in this process needs the
        # trio loop while the ring is idle: the engine then sleeps in its own poll (xb_engine_serve),
        # serving wake-ups without trio, until this fd is readable, a timeout or a signal.
        self.serve_wake_fd: int | None = None
        # In the service's process (serve_wake_fd None) the engine's poll runs in a thread of this
        # ring's own (_serve_in_thread), the trio loop going on beside it; everything that reads or
        # changes this ring's state from another task first brings it back (_serve_pause).
        self._serve_stop: int = -1  # an eventfd: written, it ends the thread's poll
        self._serve_limiter = trio.CapacityLimiter(1)  # (not trio's shared 40 threads: one per ring)
        self._serve_lock = threading.Lock()  # held by the thread through its C call
        self._serve_thread = 0  # that thread's ident while it holds the lock (for block_wait's wake signal)
        self._serve_signal: int | None = None  # the engine's wake signal, once block_wait is on
        self._block_wait = block_wait_wanted()
        self._channel_watch: ChannelWatch | None = None  # block_wait's in a ring worker process (_serve_engine)
        self._serve_gen = 0  # which serve a thread's job is for (a stale one never runs)
        self._serve_active = False  # a serve is on (its task has not taken its state back yet)
        self._serve_blocked = False  # the thread must not start its C call (brought back before)
        self._serve_ran = False  # its C call ran: its state is to be taken back
        self._serve_code = ENGINE_IDLE
        self._serve_taken_back = False  # _after_engine done for it (by the task or by _serve_pause)
        self._reaper_in_wait = False  # the reaper is in the queue's wait_io (then no thread may serve)
        self._serve_ok = serve_wanted()
        gate.on_close(self._serve_pause)
        self._held_lane: CopyLane | None = None
        self._held_datapath: DataPath | None = None

    # ------------------------------------------------------------ lifecycle

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve until stop(); return once everything taken was answered."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._reap_loop)
                task_status.started()
                if self._resume:
                    await self._run_again()
                await self._intake_loop()
                await self._wait_all_answered()
                nursery.cancel_scope.cancel()
        finally:
            if self._serve_stop >= 0 and not self._serve_active:  # (the engine's thread is done with it)
                os.close(self._serve_stop)
                self._serve_stop = -1
            if self._channel_watch is not None:  # (no serve call is on: they run in this task)
                self._channel_watch.close()
                self._channel_watch = None

    def resume_from(self, republish: list[tuple[int, int, int]], rerun: list) -> None:
        """A takeover (ring_journal.py set the ring's indices): publish the answers the last process
        wrote but did not publish, now; run the requests it had not answered first thing in run()."""
        for id_, op, status in republish:
            if status != RSP_OKAY:
                self.stats.errors += 1
            self.ring.put_response(id_, op, status)
            self._unpushed = True
        if self._unpushed:
            self._unpushed = False
            self.ring.push_responses()
            if self.journal is not None:
                self.journal.published(self.ring.rsp_prod_pvt)
        # One event whatever was found: the last process may have died between publishing responses
        # and notifying (_push), and then the journal holds nothing of them (published: freed) while
        # the frontend, which re-armed rsp_event before they landed, sleeps until an event comes
        # (the crash campaign's stall: a guest waiting forever for a response already in the ring).
        # A spurious event costs the frontend one look at rsp_prod.
        self._notify_frontend()
        self._resume = list(rerun)

    async def _run_again(self) -> None:
        """The takeover's unanswered requests, from the journal's copy, before anything new; as many
        at a time as there are free slots (the last process may have had more)."""
        resume, self._resume = self._resume or [], None
        while resume:
            free = self.pool.available
            if not free:
                await self._wait_slot()
                continue
            chunk, resume = resume[:free], resume[free:]
            await self._dispatch([item for item, _ in chunk], refs=[ref for _, ref in chunk])
            self._push()

    def stop(self) -> None:
        """Take no more requests (what is in flight still finishes; parked requests are answered ERROR)."""
        self._stopping = True
        self._serve_pause()
        if self._away:
            self.give_up("disconnecting")
        if self._idle_scope is not None:
            self._idle_scope.cancel()

    @property
    def busy(self) -> int:
        self._serve_pause()
        return self.pool.busy

    async def drain(self, timeout: float, *, keep_unanswered: bool = False) -> bool:
        """After cancellation: finish and answer what is in flight. False if it did not finish in time.

        keep_unanswered: the journal hands what does not finish to the next process (an upgrade or
        a restart), so requests held for a lost storage stay unanswered rather than ERROR."""
        self._stopping = True
        if self._away and not keep_unanswered:
            self.give_up("disconnecting")
        with trio.move_on_after(timeout):
            while self.pool.busy and not self._failed:
                if not self._io_outstanding:
                    if self._stalled:
                        self._retry_stalled()
                        self._kick()
                        self._push()
                        continue
                    break  # busy slots with no storage request: cannot progress
                queue = self.queue
                try:
                    batch = await self._wait_io(queue, timeout)
                except BlkioError as e:
                    if e.errno == errno.ETIME:
                        # wait_io's own bound (the drain's) ran out before the scope's: not finished
                        # in time, which the caller handles (a hand-over leaves them to the journal);
                        # not a storage failure, which would answer them ERROR.
                        break
                    self._storage_failed(e)
                    break
                except trio.ClosedResourceError as e:
                    self._storage_failed(e)
                    break
                self._reaped(queue, batch)
                self._kick()
                self._push()
        self._push()
        return self.pool.busy == 0

    # ------------------------------------------------------------ intake

    async def _idle_wait(self, fn) -> None:
        """Await fn() unless stopping; stop() interrupts it."""
        with trio.CancelScope() as scope:
            self._idle_scope = scope
            if self._stopping:
                scope.cancel()
            try:
                await fn()
            finally:
                self._idle_scope = None

    async def _wait_slot(self) -> None:
        self._slot_freed = trio.Event()
        await self._slot_freed.wait()

    async def _intake_loop(self) -> None:
        ring = self.ring
        pool = self.pool
        gate = self.gate
        take = self.intake.take
        backoff = self._backoff
        woken = False  # the last channel event has not yet been followed by a batch
        parse = self.intake.parse
        journal = self.journal
        unyielded = 0  # batches since the last full schedule point
        reference_next = False  # the engine left the next batch to the reference path
        while not self._stopping:
            if self._halted:
                await self._idle_wait(trio.sleep_forever)
                continue
            if gate.closed:
                await self._idle_wait(gate.wait_open)
                continue
            if self._away:
                back = self._storage_back
                assert back is not None
                await self._idle_wait(back.wait)
                continue
            free = pool.available
            if journal is not None and journal.room < free:
                free = journal.room  # frames wait for a publish (never for long: see journal.py)
            if not free:
                if ring.nr_unconsumed_requests():
                    self.stats.oo_req += 1
                await self._idle_wait(self._wait_slot)
                continue
            lane = self._lane()
            engine = self._engine
            if engine is not None and not reference_next and self._engine_may_run(engine):
                code = self._run_engine(engine)
                if engine.e.taken_n and woken:
                    woken = False
                    backoff.worked()
                if code == ENGINE_PYTHON:
                    reference_next = True
                    continue  # (free slots and journal room looked at again first)
                if code != ENGINE_IDLE:
                    await trio.lowlevel.checkpoint()
                    continue
                # The ring is empty and req_event asks for the next request (the engine's final check).
                # (in the service's process not while the reaper waits for what is in the storage: the
                # queue is one thread's at a time; the reaper answers it, the channel wakes us)
                if (self._serve_ok and self.pool.busy == self._held and not self._stopping
                        and (self.serve_wake_fd is not None or not self._reaper_in_wait)):
                    if self.serve_wake_fd is not None:
                        code = self._serve_engine(engine, self.serve_wake_fd)
                    else:
                        code = await self._serve_in_thread(engine)
                    if engine.e.taken_n:
                        woken = False
                        backoff.worked()
                    if code == ENGINE_PYTHON:
                        reference_next = True
                        continue
                    if code != ENGINE_IDLE:
                        await trio.lowlevel.checkpoint()  # (the channel's reader, the stats)
                        continue
                    woken = True  # wake-ups that brought nothing (_after_engine counted them): the backoff below
                elif woken:
                    self.stats.spurious_wakeups += 1
                unyielded = 0
                self._maybe_purge()
                if woken:
                    pause = backoff.spurious()
                    if pause:
                        await self._idle_wait(partial(trio.sleep, pause))
                await self._idle_wait(self.channel.wait)
                woken = True
                continue
            reference_next = False
            try:
                if journal is None and lane is None:
                    batch = take(ring, free)
                    raw = b""
                else:  # the journal records the private copy; the lane stashes from it
                    pos = ring.req_cons
                    raw, n = ring.take_slots(free)
                    batch = (parse(raw, n, pos) if lane is None or n < MIN_BATCH
                             else lane.all_plain(self.intake, raw, n, pos))
            except RingOverflow as e:
                self._halt(e)
                continue
            plain = batch is None  # every request plain: the lane's batch, no object per request
            if plain and not self._dispatch_plain(lane, raw, n, pos):
                plain = False
                assert isinstance(self.intake, CompiledIntake)  # (the lane's condition)
                batch = self.intake.build_last(raw, n)  # (the lane refused it: the reference way)
            if plain or batch:
                if woken:
                    woken = False
                    backoff.worked()
                if plain:
                    pass  # dispatched above
                elif journal is None:
                    await self._dispatch(batch, raw=raw)
                else:
                    await self._dispatch(batch, pos=pos, raw=raw)
                self._push()
                unyielded += 1
                if self._io_outstanding or unyielded >= YIELD_EVERY or ring.req_prod == ring.req_cons:
                    unyielded = 0
                    await trio.lowlevel.checkpoint()  # let the reaper and other rings run
                else:
                    await trio.lowlevel.checkpoint_if_cancelled()
                continue
            if ring.final_check_for_requests():
                continue
            self._maybe_purge()
            if woken:  # the last event brought no request: a notify storm pauses here
                self.stats.spurious_wakeups += 1
                pause = backoff.spurious()
                if pause:
                    await self._idle_wait(partial(trio.sleep, pause))
            await self._idle_wait(self.channel.wait)
            woken = True

    # ------------------------------------------------------------ the ring engine

    @property
    def engine_counts(self) -> tuple[int, float]:
        """(notifies, seconds in the grant copy) the ring engine made so far (bench.py's figures: with
        the simulated hypervisor its copy runs in our process, reported apart)."""
        engine = self._engine
        if engine is None:
            return 0, 0.0
        return engine.e.notifies, engine.e.copy_ns * 1e-9

    def _engine_may_run(self, engine: RingEngine) -> bool:
        """Whether the engine may serve now: where the held path would (see _dispatch_plain), with
        the queue, the channel and the ring still open (it keeps their addresses and fds)."""
        if (self._failed or self._away or self._halted or self._stalled or engine.queue.closed
                or not engine.channel_open()):
            return False
        try:
            self.ring.view.nbytes  # noqa: B018 - raises once the view is released (the ring unmapped)
        except ValueError:
            return False
        return True

    def _engine_in(self, engine: RingEngine) -> None:
        """This ring's state into the engine before a call (_after_engine takes it back)."""
        ring = self.ring
        e = engine.e
        e.req_cons = ring.req_cons
        e.rsp_prod_pvt = ring.rsp_prod_pvt
        e.held = self._held
        engine.load_free(self.pool.free)

    def _run_engine(self, engine: RingEngine) -> int:
        """One xb_engine_run with this ring's state in and out; what it stopped for done the reference way.
        Returns what it returned."""
        self._engine_in(engine)
        return self._after_engine(engine, engine.run())

    def _serve_engine(self, engine: RingEngine, wake_fd: int) -> int:
        """xb_engine_serve: the ring served from the engine's own poll until wake_fd is readable,
        SERVE_SLICE passes, or something is for the reference path. Blocks this thread (and its trio
        loop: only where nothing else waits for it, see serve_wake_fd). With block_wait the engine's
        sleeps do not watch wake_fd: a ChannelWatch thread does, and wakes this one."""
        self._engine_in(engine)
        watch = self._channel_watch_for(engine, wake_fd)
        with watch.serving() if watch is not None else nullcontext():
            code = engine.serve(wake_fd, SERVE_SLICE_MS)
        return self._after_engine(engine, code, served=True)

    def _channel_watch_for(self, engine: RingEngine, wake_fd: int) -> ChannelWatch | None:
        """block_wait for the engine's serve on this thread (each engine of the ring's: a reconnect makes a
        new one), and the thread that wakes it when wake_fd speaks; None: the engine polls wake_fd itself."""
        if not self._block_wait:
            return None
        signo = engine.enable_block_wait()
        if signo is None:
            return None
        watch = self._channel_watch
        if watch is None or watch.fd != wake_fd:
            if watch is not None:
                watch.close()
            watch = self._channel_watch = ChannelWatch(wake_fd, signo, WAKE_RETRY_S)
        return watch

    async def _serve_in_thread(self, engine: RingEngine) -> int:
        """_serve_engine in a thread of this ring's (the C call releases the GIL): the trio loop serves
        the other rings and the control plane meanwhile. A cancellation ends the poll (the stop fd)
        and waits for it; another task that needs this ring's state calls _serve_pause first."""
        if self._serve_stop < 0:
            self._serve_stop = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._engine_in(engine)
        stop = self._serve_stop
        lock = self._serve_lock
        if self._block_wait:  # (each engine of the ring's: a reconnect makes a new one)
            self._serve_signal = engine.enable_block_wait()
        with lock:
            self._serve_gen += 1
            gen = self._serve_gen
            self._serve_blocked = self._serve_ran = self._serve_taken_back = False
        self._serve_active = True

        def serve() -> None:
            with lock:  # (held through the C call: _serve_pause waits on it)
                if self._serve_blocked or self._serve_gen != gen:
                    return  # brought back (or given up) before it started: never runs
                self._serve_thread = threading.get_ident()
                try:
                    self._serve_code = engine.serve(stop, SERVE_THREAD_SLICE_MS, idle_untimed=SERVE_IDLE_UNTIMED)
                finally:
                    self._serve_thread = 0
                self._serve_ran = True

        try:
            # abandon_on_cancel: a cancellation comes back at once; the finally below ends the C call
            # (the stop fd) and waits for it (the lock) before anything else touches the ring.
            await trio.to_thread.run_sync(serve, limiter=self._serve_limiter, abandon_on_cancel=True)
        finally:
            self._serve_pause()  # (unless another task brought it back already)
            self._serve_active = False
            try:
                os.eventfd_read(stop)
            except BlockingIOError:
                pass
            self._reaper_wakeup.set()  # (it waited for the thread to end: see _reap_loop)
        return self._serve_code if self._serve_ran else ENGINE_MORE

    def settle(self) -> None:
        """Bring the ring back from the engine's thread, its counts up to date (it serves on at its next
        turn): for whoever reads its stats."""
        self._serve_pause()

    def _serve_pause(self) -> None:
        """Bring a ring served from a thread back before another task reads or changes its state: stop
        the engine's poll, wait for its C call to return (microseconds: it polls the stop fd, or
        block_wait's read ends at the wake signal), and take its state back, once: the serving task's
        own ending comes here too."""
        if not self._serve_active or self._serve_taken_back:
            return
        os.eventfd_write(self._serve_stop, 1)
        self._serve_acquire()  # the C call returned, or never starts (a later start sees the generation moved)
        try:
            self._serve_blocked = True
            self._serve_gen += 1
        finally:
            self._serve_lock.release()
        self._serve_taken_back = True
        engine = self._engine
        if self._serve_ran and engine is not None:
            self._after_engine(engine, self._serve_code, served=True)

    def _serve_acquire(self) -> None:
        """Take the serve lock, which the thread holds through its C call: with block_wait the engine may
        sleep in a read that only the wake signal ends, and a signal that lands between its last look and
        its read is not seen: sent again every WAKE_RETRY_S until the call has returned."""
        lock, signo = self._serve_lock, self._serve_signal
        if signo is None:
            lock.acquire()
            return
        while True:
            thread = self._serve_thread  # (non-zero only while that thread holds the lock: it is alive)
            if thread:
                signal.pthread_kill(thread, signo)
            if lock.acquire(timeout=WAKE_RETRY_S):
                return

    def _reap_engine(self, engine: RingEngine, n: int) -> None:
        """The reaper's n completions (in the queue's array) through xb_engine_reap."""
        self._engine_in(engine)
        self._after_engine(engine, engine.reap(n))

    def _after_engine(self, engine: RingEngine, code: int, served: bool = False) -> int:
        """Take the engine's state back (what _dispatch_held, _complete_held and _push would have
        left), then do what it stopped for, as the held path does it. served: from its own poll."""
        e = engine.e
        ring = self.ring
        ring.req_cons = e.req_cons
        ring.rsp_prod_pvt = e.rsp_prod_pvt
        low, top = engine.free_changes()
        free = self.pool.free
        del free[low:]
        if top:
            free.extend(top)
        took = e.taken_n
        grants = engine.grants
        if grants is not None:  # the persistent grants it found unmapped get mapped now, between its calls
            grants.absorb()
            self.stats.persistent_grants = len(grants)
        self.stats.engine_syscalls += e.syscalls
        self.stats.copy_segs_mapped += e.pg_segs
        self.stats.copy_segs_xen += e.xen_segs
        self.stats.engine_sleeps += e.sleeps
        if served:
            self.stats.poll_returns += 1
            self.stats.spurious_wakeups += e.spurious  # (all of them: the poll absorbs the first in a row)
        if took:
            self.stats.engine_req += took
            if served:
                self.stats.poll_req += took
            rd_req, rd_sect, wr_req, wr_sect = engine.take_counts()
            self._count_dispatched(took, rd_req, rd_sect, wr_req, wr_sect)
            self._held += took
            self._held_lane, self._held_datapath = self._lane_cached, self.datapath
        self._io_outstanding += e.queued
        done = e.completed
        if done:
            self._held -= done
            self._io_outstanding -= done
            self._last_completion = time.monotonic()
            engine.fold_latency(self.stats.latency)
            self._released(done)
        if e.notify_errno and not self._notify_failed:
            self._notify_failed = True
            log.warning("%s: cannot notify the frontend: %s", self.name, os.strerror(e.notify_errno))
        if code > ENGINE_PYTHON and code != ENGINE_MAP:  # (MAP: absorb() above mapped its pages; call again)
            self._engine_stopped(engine, code)
            self._kick()
            self._push()
        elif self._stalled:
            self._retry_stalled()
        if self._io_outstanding:
            self._reaper_wakeup.set()
        return code

    def _engine_stopped(self, engine: RingEngine, code: int) -> None:
        """What the engine left to the reference path, as the held path leaves it there."""
        e = engine.e
        if code == ENGINE_REAPED:
            self._reaped(engine.queue, e.reaped)
        elif code in (ENGINE_COPY_IN_FAILED, ENGINE_UNPREPARED):
            idx = engine.taken(e.held_n)
            run = self._materialise(idx, queued=False)
            if code == ENGINE_UNPREPARED:
                self.datapath.release_large(run)  # (prepare() gives each its buffer again)
                self._start(run)
            else:
                self._queue_failed_in(run, set(engine.failed()))
        elif code == ENGINE_COPY_OUT_FAILED:
            self._io_outstanding -= e.reaped
            self._last_completion = time.monotonic()
            self._held_copy_out_failed(engine.ready(e.reaped), set(engine.failed()))
        elif code == ENGINE_STORAGE_ERROR:
            self._storage_failed(BlkioError(e.error, "blkioq_do_io failed", "the ring engine"))
        elif code == ENGINE_BUG:
            raise RuntimeError(f"{self.name}: the ring engine walked an entry it could not answer")

    def _halt(self, e: RingOverflow) -> None:
        log.warning("%s: frontend provided bogus ring requests (%s); halting this ring", self.name, e)
        self._halted = True
        self.stats.halted = True

    def _maybe_purge(self) -> None:
        now = time.monotonic()
        if now - self._last_purge >= IDLE_PURGE_INTERVAL:
            self._last_purge = now
            self.datapath.idle()
            self.stats.persistent_grants = self.datapath.persistent_grants

    def _lane(self):
        """The copy path's compiled lane (copy_lane.py) when this ring can use it now: the compiled
        intake (whose records it stashes) and the storage's compiled calls. Decided again only when
        the data path or the queue changed (attach_storage): it is asked several times a batch."""
        datapath, queue = self.datapath, self.queue
        if datapath is not self._lane_datapath or queue is not self._lane_queue:
            self._lane_datapath, self._lane_queue = datapath, queue
            lane = datapath.lane
            if (lane is None or type(self.intake) is not CompiledIntake or not getattr(queue, "compiled_calls", False)
                    or self._tag_slot < 0):
                lane = None
            self._lane_cached = lane
            # (a wrapper that filters the completions, tests' GatedQueue, says it cannot)
            self._counted = lane is not None and getattr(queue, "counted_reaps", False) is True
            self._completions_at = queue.completions_address if self._counted else 0
            max_transfer = self.shape.max_transfer
            self._holding = (self._counted and self._answers is not None and lane is not None
                             and (not max_transfer or max_transfer >= lane.stride))
            self._engine = None
            if self._holding:
                self._engine = make_engine(ring=self.ring, intake=self.intake, answers=self._answers,
                                           journal=self.journal, lane=lane, queue=queue, datapath=datapath,
                                           channel=self.channel, max_transfer=max_transfer)
        return self._lane_cached

    def _stash(self, lane, raw: bytes, count: int, slot_of: array, run: list[Slot]) -> None:
        """Keep the plain requests just loaded (slot_of: their batch positions' slots) in the lane;
        if the kernel refuses, take them all off it (the reference path serves them)."""
        if not lane.stash(self.intake, raw, count, slot_of):
            log.warning("%s: the compiled lane refused a batch; serving it the reference way", self.name)
            for slot in run:
                slot.lane = False

    def _dispatch_plain(self, lane, raw: bytes, n: int, pos: int) -> bool:
        """_dispatch for a batch of n plain READ/WRITE requests (the intake's records of raw say so):
        the same slots, journal records, counts and storage requests, without the intake's objects.
        False: the lane refused the batch (nothing done: the caller serves it the reference way)."""
        free = self.pool.free
        idx = free[-n:]
        idx.reverse()  # the slots n free.pop() would give, in that order
        intake = self.intake
        assert isinstance(intake, CompiledIntake)
        if (self._holding and not (self._failed or self._away or self._halted)
                and (self.journal is None or intake.recorded >= 0) and self._dispatch_held(lane, raw, n, idx)):
            return True
        if not lane.stash(intake, raw, n, array("i", idx)):
            log.warning("%s: the compiled lane refused a batch; serving it the reference way", self.name)
            return False
        del free[-n:]
        journal = self.journal
        first = -1
        if journal is not None:  # before anything reaches the storage: by the intake's decode if it could
            first = intake.recorded
            if first < 0:
                first = journal.record_taken(pos, raw, n, None)
        slots = self.pool.slots
        now = time.monotonic()
        run: list[Slot] = []
        append = run.append
        rd_req = rd_sect = wr_req = wr_sect = 0
        seg_unpack = _seg_unpack_from
        off = intake.seg_offset
        entry = intake.entry_size
        jref = -1
        for i, (op, nseg, id_, sector, nr) in enumerate(intake.plain_records(n)):
            slot = slots[idx[i]]
            if nseg == 1:
                segments: tuple = (seg_unpack(raw, off),)
            else:
                segments = tuple(_seg_iter(raw[off:off + nseg * 8]))
            off += entry
            # Slot.load's stores, inline
            slot.req_id = id_
            slot.op = op
            slot.sector = sector
            slot.nr_bytes = nr * SECTOR_SIZE
            slot.segments = segments
            if op:
                slot.writes = True
                slot.steps = _WRITE
                wr_req += 1
                wr_sect += nr
            else:
                slot.writes = False
                slot.steps = _READ
                rd_req += 1
                rd_sect += nr
            slot.taken_at = now
            if first >= 0:
                jref = first + i
            slot.jref = jref
            slot.lane = True
            append(slot)
        self._count_dispatched(n, rd_req, rd_sect, wr_req, wr_sect)
        self._start(run)
        self._kick()
        return True

    def _dispatch_held(self, lane: CopyLane, raw: bytes, n: int, idx: list[int]) -> bool:
        """_dispatch_plain with the batch held by the lane (copy_lane.py): its requests stay in the
        lane's table (ids, journal refs, the batch's clock read) and no Slot is filled; the writes'
        data in, then the storage requests, each one C call over the slot indices. Any doubt (a copy
        in failed, a call refused) fills the Slots and goes on the reference way. False: the lane
        would not hold the batch (nothing done)."""
        slots_arr = array("H", idx)
        first = self.intake.recorded if self.journal is not None else -1  # (the parse recorded the batch)
        counts = lane.hold(self.intake, raw, n, slots_arr, first, time.monotonic())
        if counts is None:
            return False
        del self.pool.free[-n:]
        self._held += n
        self._held_lane, self._held_datapath = lane, self.datapath
        rd_req, rd_sect, wr_req, wr_sect = counts
        self._count_dispatched(n, rd_req, rd_sect, wr_req, wr_sect)
        failed = self.datapath.prepare_held(slots_arr) if wr_req else []
        if failed is None:  # the packer refused: prepare() them the reference way
            self._start(self._materialise(idx, queued=False))
        elif failed or not lane.queue(self.queue, slots_arr):
            self._queue_failed_in(self._materialise(idx, queued=False), failed)
        else:
            self._io_outstanding += n
            self._queued = True
        self._kick()
        return True

    def _queue_failed_in(self, run: list[Slot], failed) -> None:
        """Queue the given (materialised) held slots, those whose copy in failed answered an error
        (what prepare() leaves: a failed copy in is an error)."""
        for slot in run:
            if slot.index in failed:
                slot.status = RSP_ERROR
        self._queue_prepared(run)

    def _held_copy_out_failed(self, indices: list[int], failed) -> None:
        """Walked held slots (in completion order) of which a read's copy back failed: answered the
        reference way, those an error."""
        ready = self._materialise(indices, queued=True)
        for slot in ready:
            slot.parts = 0
            slot.in_storage = False
            if slot.index in failed:
                slot.status = RSP_ERROR
        self.datapath.release_large(ready)  # (an indirect request the engine held: its copy out is done)
        self._finish(ready, copied=True)

    def _materialise(self, indices, *, queued: bool) -> list[Slot]:
        """Give these slots, where held by the lane, the fields _dispatch_plain and prepare() give a
        lane slot (and, queued, what queueing gives it), so that the reference path can serve them;
        they are not held after. The slots given them, in the order of indices."""
        lane, datapath = self._held_lane, self._held_datapath
        if not self._held or lane is None or datapath is None:
            return []
        slots = self.pool.slots
        out = []
        for s in indices:
            request = lane.take_back(s)
            if request is None:
                continue
            slot = slots[s]
            (slot.req_id, slot.op, slot.sector, slot.nr_bytes, slot.segments, slot.taken_at, slot.jref,
             large) = request
            if slot.op:
                slot.writes, slot.steps = True, _WRITE
            else:
                slot.writes, slot.steps = False, _READ
            # (an indirect request the engine held with more than 11 segments: the reference packs its
            # WireSegments, from the buffer the engine gave it)
            slot.lane = type(slot.segments) is tuple
            datapath.attach_held(slot, large)
            if queued:
                slot.parts = 1
                slot.in_storage = True
            out.append(slot)
        self._held -= len(out)
        return out

    def _materialise_all(self) -> None:
        """Every held slot given its fields (they are all in the storage, or being answered): before
        anything scans the pool (park, abandon, attach_storage)."""
        if self._held and self._held_lane is not None:
            self._materialise(self._held_lane.held_slots(), queued=True)

    async def _dispatch(self, batch, *, pos: int = -1, raw: bytes = b"", refs=None) -> None:
        """Run a batch: `pos` and `raw` (its ring position and private copy) to record it in the
        journal first; `refs` for requests already recorded (a takeover's). `raw` also lets the
        copy path's lane stash the batch's plain requests."""
        indirect: list | None = None
        for item in batch:
            if type(item) is IndirectRequest:
                indirect = [] if pos >= 0 and self.journal is not None else None
                batch = self._indirect.resolve(batch, indirect)
                break
        if pos >= 0 and self.journal is not None:
            # Recorded before anything reaches the storage (the intake took no more than room): by
            # the compiled intake's parse of this batch when it could (no indirect request), else here.
            first = self.intake.recorded
            if first < 0:
                first = self.journal.record_taken(pos, raw, len(batch), indirect)
            refs = range(first, first + len(batch))
        slots = self.pool.slots
        free = self.pool.free
        read_only = self.policy.limits.read_only
        now = time.monotonic()  # one clock read for the batch: its requests' latency starts here
        run: list[Slot] = []
        append = run.append
        rd_req = rd_sect = wr_req = wr_sect = 0
        jref = -1
        # The lane takes the plain requests decoded from this very private copy (not a takeover's).
        lane = self._lane() if raw and len(batch) >= MIN_BATCH else None
        count = len(batch)
        slot_of = array("i", [-1]) * count if lane is not None else None
        laned = 0
        for i, item in enumerate(batch):
            if refs is not None:
                jref = refs[i]
            kind = type(item)
            if kind is Request:
                op = item.op
                if op == OP_WRITE_BARRIER:
                    self._count_dispatched(len(run), rd_req, rd_sect, wr_req, wr_sect)
                    rd_req = rd_sect = wr_req = wr_sect = 0
                    if laned:
                        assert slot_of is not None
                        self._stash(lane, raw, count, slot_of, run)
                        slot_of = array("i", [-1]) * count  # (a slot may be freed and reused meanwhile)
                        laned = 0
                    self._start(run)
                    self._kick()
                    run = []
                    append = run.append
                    await self._barrier(item, jref)
                    continue
                nr = item.nr_sectors
                if op == OP_READ:
                    writes, steps = False, _READ
                    rd_req += 1
                    rd_sect += nr
                elif op == OP_WRITE:
                    writes, steps = True, _WRITE
                    wr_req += 1
                    wr_sect += nr
                else:  # OP_FLUSH_DISKCACHE (the decoder lets nothing else through)
                    assert op == OP_FLUSH_DISKCACHE
                    self.stats.f_req += 1
                    wr_sect += nr
                    writes, steps = bool(nr), _WRITE_THEN_FLUSH if nr else _FLUSH
                # The pool's slots are taken inline; the intake took no more
                # requests than there are free slots.
                slot = slots[free.pop()]
                segments = item.segments
                slot.load(item.id, op, item.sector, nr * SECTOR_SIZE, segments, writes, steps, now)
                slot.jref = jref
                if slot_of is not None and op <= OP_WRITE and type(segments) is tuple and segments:
                    slot_of[i] = slot.index  # a direct request: its segments are in the private copy
                    slot.lane = True
                    laned += 1
                if writes and op == OP_FLUSH_DISKCACHE and read_only:
                    log.debug("%s: %s (id %d)", self.name, R_READ_ONLY_FLUSH, item.id)
                    slot.status = RSP_ERROR
                append(slot)
            elif kind is Rejection:
                log.debug("%s: rejected id %d op %d: %s", self.name, item.id, item.op, item.reason)
                self._answer(item.id, item.op, item.status, jref)
            elif kind is DiscardRequest:
                self.stats.ds_req += 1
                if not item.nr_sectors:
                    self._answer(item.id, item.op, RSP_OKAY, jref)  # nothing to discard (blkback: OKAY)
                    continue
                slot = slots[free.pop()]
                slot.load(item.id, item.op, item.sector, item.nr_sectors * SECTOR_SIZE, (), False,
                          self._discard_steps, now)
                slot.jref = jref
                append(slot)
            else:
                raise TypeError(f"unexpected {kind.__name__} after indirect resolution")
        self._count_dispatched(len(run), rd_req, rd_sect, wr_req, wr_sect)
        if laned:
            assert slot_of is not None
            self._stash(lane, raw, count, slot_of, run)
        self._start(run)
        self._kick()

    def _count_dispatched(self, slots: int, rd_req: int, rd_sect: int, wr_req: int, wr_sect: int) -> None:
        """Account for `slots` newly busy slots (their requests counted as blkback counts them)."""
        stats = self.stats
        stats.rd_req += rd_req
        stats.rd_sect += rd_sect
        stats.wr_req += wr_req
        stats.wr_sect += wr_sect
        stats.in_flight += slots
        self.gate.enter(slots)

    async def _barrier(self, item: Request, jref: int = -1) -> None:
        """Drain the whole vbd, flush, write (and flush again), answer; then let everyone go on."""
        self._push()  # what came before the barrier must not wait for it
        await self.gate.drain()
        try:
            slot = self.pool.slots[self.pool.free.pop()]
            nr = item.nr_sectors
            slot.load(item.id, item.op, item.sector, nr * SECTOR_SIZE, item.segments, bool(nr),
                      _BARRIER_WITH_DATA if nr else _BARRIER, time.monotonic())
            slot.jref = jref
            self._count_dispatched(1, 0, 0, 0, 0)
            self.stats.f_req += 1
            self.stats.wr_sect += nr
            done = slot.done = trio.Event()
            self._start([slot])
            self._kick()
            self._push()
            await done.wait()
        finally:
            self.gate.reopen()

    # ------------------------------------------------------------ slots and storage

    def _release_all(self, slots) -> None:
        """Give answered slots back to the pool, and wake whoever waits for that."""
        free = self.pool.free
        for slot in slots:
            # Only what the next user of the slot does not set itself.
            slot.step = 0
            if slot.status:
                slot.status = RSP_OKAY
            done = slot.done
            if done is not None:
                slot.done = None
                done.set()
            free.append(slot.index)
        self._released(len(slots))

    def _released(self, n: int) -> None:
        """n slots went back to the pool: the gate's and the stats' counts, and whoever waits."""
        self.gate.leave(n)
        self.stats.in_flight -= n
        if self._slot_freed is not None:
            self._slot_freed.set()
            self._slot_freed = None
        if self._all_answered is not None and not self.pool.busy:
            self._all_answered.set()

    def _start(self, slots) -> None:
        """Prepare the slots' data and queue their first step (submission is _kick's)."""
        if not slots:
            return
        if self._failed:
            for slot in slots:
                slot.status = RSP_ERROR
            self._finish(slots)
            return
        if self._away:  # a barrier that got through its gate while the storage went away
            self._park(slots)
            return
        waiting = self.datapath.prepare(slots)
        if self._counts_grants:
            self.stats.persistent_grants = self.datapath.persistent_grants
        if waiting:
            self._stalled.extend(waiting)
            held = set(map(id, waiting))
            slots = [s for s in slots if id(s) not in held]
        self._queue_prepared(slots)

    def _queue_prepared(self, slots) -> None:
        """_start's second half, for prepared slots: queue the first step of each (ring order), answer
        those that failed already."""
        failed = None
        qread = self.queue.read
        qwrite = self.queue.write
        max_transfer = self.shape.max_transfer
        queued = 0
        lane = self._lane()
        laned: list[Slot] = []  # lane slots not queued yet: queued together, in ring order
        for slot in slots:
            if slot.status:
                if failed is None:
                    failed = []
                failed.append(slot)
                continue
            steps = slot.steps
            if slot.lane and lane is not None and (not max_transfer or slot.nr_bytes <= max_transfer):
                laned.append(slot)
                continue
            if laned:
                queued += self._queue_laned(lane, laned)
                laned = []
            if steps is _READ or steps is _WRITE:
                extents = slot.extents
                if len(extents) == 1:
                    addr, n = extents[0]
                    if not max_transfer or n <= max_transfer:
                        # the common case, one storage request from one buffer
                        (qwrite if steps is _WRITE else qread)(slot.sector * SECTOR_SIZE, addr, n, slot.index)
                        slot.parts = 1
                        slot.in_storage = True
                        queued += 1
                        continue
            self._queue(slot)
        if laned:
            queued += self._queue_laned(lane, laned)
        self._io_outstanding += queued
        if queued:
            self._queued = True
        if failed:
            self._finish(failed)

    def _queue_laned(self, lane, slots: list[Slot]) -> int:
        """One storage request per lane slot (each one buffer: one part), in one compiled call;
        one by one if the kernel refuses (then they leave the lane). How many were queued."""
        few = len(slots) < MIN_BATCH
        if few or not lane.queue(self.queue, array("H", [slot.index for slot in slots])):
            qread = self.queue.read  # a few (cheaper one by one), or the kernel refused them
            qwrite = self.queue.write
            # A few keep the lane's tag (their entries were stashed, so the compiled completion walk
            # can take them with the others); a group the kernel refused does not.
            tag = lane.tag if few else 0
            for slot in slots:
                addr, n = slot.extents[0]
                (qwrite if slot.steps is _WRITE else qread)(slot.sector * SECTOR_SIZE, addr, n, tag | slot.index)
        for slot in slots:
            slot.parts = 1
            slot.in_storage = True
        return len(slots)

    def _queue(self, slot) -> None:
        n = queue_step(self.queue, slot, self.shape, self._iovecs, slot.index * self._iov_per_slot)
        self._queued = True
        slot.parts = n
        slot.in_storage = True
        self._io_outstanding += n

    def _retry_stalled(self) -> None:
        stalled, self._stalled = self._stalled, []
        self._start(stalled)

    def _kick(self) -> None:
        """Submit everything queued; complete whatever finished inline, until nothing does."""
        if self._failed or self._away:
            return
        queue = self.queue
        self._lane()  # (decides _counted for this queue)
        do_io = queue.do_io_count if self._counted else queue.do_io
        full = queue.max_completions
        while True:
            self._queued = False
            try:
                done = do_io(0)
            except BlkioError as e:
                self._storage_failed(e)
                return
            if not done:
                break
            n = self._reaped(queue, done)
            # Again only if completing queued something (a flush's next step, a request that
            # waited for memory) or the completion array came back full: else the next call
            # finds nothing (one cffi call and libblkio's reap saved per batch at QD1).
            if not self._queued and n < full:
                break
        if self._io_outstanding:
            self._reaper_wakeup.set()

    async def _wait_io(self, queue: Queue, timeout: float):
        """queue.wait_io: how many completed when reaping by count (see _lane), else the list."""
        self._lane()
        if self._counted:
            return await queue.wait_io(timeout=timeout, count=True)
        return await queue.wait_io(timeout=timeout)

    def _reaped(self, queue: Queue, done) -> int:
        """Complete what queue's do_io or wait_io returned: a list of (tag, ret), or (reaping by
        count) how many completions wait in its array. Returns how many."""
        if type(done) is not int:
            self._complete(done)
            return len(done)
        if (done >= MIN_BATCH or self._held) and self._complete_lane(queue, done):
            return done
        self._complete(queue.completed(done))
        return done

    def _complete_lane(self, queue: Queue, n: int) -> bool:
        """_complete for n completions in queue's array when all are the lane's successes: the
        data path's compiled walk finds their slots and copies the reads out in one call (what
        _complete and finish() would do, as they would do it); then they are answered. False: not
        all are (nothing done)."""
        if queue is not self._lane_queue or not self._completions_at:  # (decided for another queue)
            return False
        if self._held:  # (a held slot's Slot is stale: the walk below must not hand it out)
            return self._complete_held(n)
        ready = self.datapath.finish_lane(self.pool.slots, self._completions_at, n)
        if ready is None:
            return False
        self._io_outstanding -= n
        self._last_completion = time.monotonic()
        for slot in ready:  # what _complete leaves on a finished one-part, one-step slot
            slot.parts = 0
            slot.in_storage = False
        self._finish(ready, copied=True)
        return True

    def _complete_held(self, n: int) -> bool:
        """_complete_lane for n completions in the lane queue's array when all are held slots'
        successes: the reads copied out, then answered and released, all from the lane's table and
        slot indices (_finish's work, compiled). False: not all are (nothing done)."""
        if self._halted:
            return False  # a halted ring answers nothing: the reference way
        datapath = self.datapath
        failed = datapath.finish_held(self._completions_at, n)
        if failed is None:
            return False
        self._io_outstanding -= n
        now = self._last_completion = time.monotonic()
        lane = self._held_lane
        assert lane is not None and self._answers is not None
        if failed:  # a read's copy back failed: its answer is an error, the reference way
            self._held_copy_out_failed(lane.ready(n), failed)
            return True
        self._held -= n
        self._answers.answer_held(lane, n, now, self.stats.latency)
        self._unpushed = True
        self.pool.free.extend(lane.ready(n))  # (held slots kept a free slot's step, status and done)
        self._released(n)
        if self._stalled:
            self._retry_stalled()
        return True

    def _complete(self, done) -> None:
        if self._held:
            self._materialise([tag & self._tag_slot for tag, _ in done], queued=True)
        slots = self.pool.slots
        finished = []
        self._io_outstanding -= len(done)
        self._last_completion = time.monotonic()
        mask = self._tag_slot
        for tag, ret in done:
            slot = slots[tag & mask]
            if ret < 0:
                if slot.status == RSP_OKAY:
                    log.debug("%s: storage error %d for id %d", self.name, ret, slot.req_id)
                slot.status = RSP_ERROR
            slot.parts -= 1
            if slot.parts:
                continue
            slot.step += 1
            if slot.status == RSP_OKAY and slot.step < len(slot.steps):
                self._queue(slot)  # the next step of a flush or barrier
                continue
            slot.in_storage = False
            finished.append(slot)
        if finished:
            self._finish(finished)

    def _finish(self, slots, copied: bool = False) -> None:
        """Data path finish (copy reads out / unmap), then answer and free the ready slots.
        copied: the data path's finish_lane did it already (all may be answered)."""
        ready = slots if copied else self.datapath.finish(slots)
        if ready:
            self.stats.latency.observe(time.monotonic(), ready)  # one clock read for the batch
            if self._halted:  # a halted ring answers nothing more
                self.stats.errors += sum(1 for s in ready if s.status)
            elif self._compiled_answers is not None and len(ready) >= self._compiled_answers_from:
                self.stats.errors += self._compiled_answers(ready)
                self._unpushed = True
            else:
                ring = self.ring
                put = ring.put_response
                journal = self.journal
                errors = 0
                if journal is not None:
                    # One call for the push, before the first response is written: they take the
                    # response positions from rsp_prod_pvt on, in this order.
                    journal.record_answers(ready, ring.rsp_prod_pvt)
                for slot in ready:
                    status = slot.status
                    if status:
                        errors += 1
                    put(slot.req_id, slot.op, status)
                self.stats.errors += errors
                self._unpushed = True
            self._release_all(ready)
        if self._stalled:
            self._retry_stalled()

    def _answer(self, id_: int, op: int, status: int, jref: int = -1) -> None:
        if status != RSP_OKAY:
            self.stats.errors += 1
        if self._halted:
            return  # a halted ring answers nothing more
        if self.journal is not None and jref >= 0:
            self.journal.record_answered(jref, status, self.ring.rsp_prod_pvt)
        self.ring.put_response(id_, op, status)
        self._unpushed = True

    def _push(self) -> None:
        if self._unpushed:
            self._unpushed = False
            push = self._compiled_push
            if push is not None:
                notify = push()
            else:
                notify = self.ring.push_responses()
                if self.journal is not None:
                    self.journal.published(self.ring.rsp_prod_pvt)
            if notify:
                self._notify_frontend()

    def _notify_frontend(self) -> None:
        try:
            self.channel.notify()
        except (OSError, trio.ClosedResourceError) as e:
            # The frontend's end is gone (domain dying): nobody to
            # wake; the control side will tear the connection down.
            if not self._notify_failed:
                self._notify_failed = True
                log.warning("%s: cannot notify the frontend: %s", self.name, e)

    def _storage_failed(self, e: Exception) -> None:
        """The storage as a whole is gone: tell the Vbd, which parks every ring (it reconnects) or
        destroys the storage and abandons; without a Vbd, just stop using it.

        Slots the storage holds stay as they are until abandon() (after the
        storage is destroyed) or attach_storage() (parked): answering them now
        would let the guest reuse pages a late completion can still write.
        """
        if self._failed or self._away:
            return
        if self._on_storage_failure is not None:
            self._on_storage_failure(e)
        if not (self._failed or self._away):
            self.storage_lost(e)

    def storage_lost(self, why: object = "it failed on another ring") -> None:
        """Never touch the storage again (it failed, maybe on another ring); error what waited for memory."""
        self._serve_pause()
        if not self._failed:
            log.warning("%s: storage failed (%s); answering errors from now on", self.name, why)
        self._failed = True
        stalled, self._stalled = self._stalled, []
        for slot in stalled:
            slot.status = RSP_ERROR
        if stalled:
            self._finish(stalled)
            self._push()

    def abandon(self, *, answer: bool = True) -> None:
        """The storage instance was destroyed: nothing can touch our buffers any more.

        Answer RSP_ERROR to every request it still held and release its
        buffers/mappings. Only the owner of the storage (the Vbd) calls this,
        after blkio_destroy().

        answer=False (the ring's journal goes to the next process: an upgrade or
        a restart): release the buffers and mappings of every unanswered request
        (held by the storage, parked for a lost one, waiting for memory) without
        answering it; the journal still has it taken and unanswered, so the next
        process runs it again from the journal's copy. Nothing is copied to the
        guest for them.
        """
        self._serve_pause()
        self._failed = True
        self._materialise_all()
        stuck = [s for s in self.pool.slots if s.in_storage]
        self._io_outstanding = 0
        if not answer:  # what waits for a lost storage or for memory is unanswered too
            stuck += self._parked + self._stalled
            self._parked, self._stalled = [], []
        for slot in stuck:
            slot.status = RSP_ERROR  # a failed read copies nothing to the guest
            slot.parts = 0
            slot.in_storage = False
        if stuck and answer:
            log.warning("%s: %d request(s) the destroyed storage held answered with an error",
                        self.name, len(stuck))
            self._finish(stuck)
        elif stuck:
            log.info("%s: %d request(s) left unanswered for the next process (journal)", self.name, len(stuck))
            self._release_all(self.datapath.finish(stuck))
        self._push()

    # ------------------------------------------------------------ storage replaced (vbd reconnect)

    @property
    def storage_away(self) -> bool:
        return self._away

    def park(self, e: Exception) -> None:
        """The vbd's storage failed as a whole and the vbd will try a new instance: park what is in
        flight (unanswered, slots kept), hold the intake. The caller destroys the old instance next,
        without awaiting in between, so nothing can be queued on it meanwhile."""
        self._serve_pause()
        if self._away or self._failed:
            return
        self._materialise_all()
        log.warning("%s: storage lost (%s); holding %d request(s) in flight until it is back",
                    self.name, e, sum(1 for s in self.pool.slots if s.in_storage) + len(self._stalled))
        self._away = True
        self._storage_back = trio.Event()
        stuck = [s for s in self.pool.slots if s.in_storage]
        stalled, self._stalled = self._stalled, []
        self._io_outstanding = 0
        for slot in stuck:
            slot.in_storage = False
        self._park(stuck + stalled)
        self._push()

    def _park(self, slots: list[Slot]) -> None:
        """Keep these requests (unanswered) for the next storage instance; one that already
        failed a part is answered ERROR now."""
        failed = []
        for slot in slots:
            slot.parts = 0
            slot.step = 0
            slot.lane = False  # a new storage instance may come with a new data path (and lane)
            if slot.status:
                failed.append(slot)
            else:
                self._parked.append(slot)
        if failed:
            self._finish(failed)

    def attach_storage(self, queue: Queue, datapath: DataPath | None = None) -> int:
        """Serve from a new storage instance: queue the parked requests again from their first step
        (after `datapath`.prepare() if the data path is new: the copy path's buffers died with the old
        instance; the map path keeps its mappings). Returns how many requests were re-queued."""
        self._serve_pause()
        self._materialise_all()
        if any(s.in_storage for s in self.pool.slots) or self._io_outstanding:
            raise RuntimeError(f"{self.name}: storage replaced while requests are in the old one")
        self.queue = queue
        self.storage_resets += 1
        self._failed = False
        self._last_completion = time.monotonic()
        parked, self._parked = self._parked, []
        was_away, self._away = self._away, False
        if datapath is not None:
            self.datapath = datapath
            self._start(parked)
        else:
            for slot in parked:
                self._queue(slot)
        self._kick()
        self._push()
        if was_away:
            self._wake_intake()
        return len(parked)

    def give_up(self, why: str) -> None:
        """No storage to come back in time: answer the parked requests ERROR and fail fast until
        attach_storage()."""
        self._serve_pause()
        if not self._away:
            return
        parked, self._parked = self._parked, []
        self._away = False
        log.warning("%s: storage still away (%s): answering %d held request(s) ERROR", self.name, why, len(parked))
        self._failed = True  # the old instance is destroyed: nothing is in it, nothing waits for memory
        for slot in parked:
            slot.status = RSP_ERROR
        if parked:
            self._finish(parked)
        self._push()
        self._wake_intake()

    def _wake_intake(self) -> None:
        back, self._storage_back = self._storage_back, None
        if back is not None:
            back.set()

    # ------------------------------------------------------------ reaper

    async def _reap_loop(self) -> None:
        while True:
            # (while the engine's thread serves, it reaps: the queue is its alone; woken when it ends)
            if self._failed or self._away or not self._io_outstanding or self._serve_active:
                self._reaper_wakeup = trio.Event()
                await self._reaper_wakeup.wait()
                continue
            queue = self.queue
            self._reaper_in_wait = True
            try:
                try:
                    batch = await self._wait_io(queue, self.storage_timeout)
                finally:
                    self._reaper_in_wait = False
            except trio.ClosedResourceError:
                continue  # the Vbd destroyed the storage (this or another ring failed): failed or parked
            except BlkioError as e:
                if queue is not self.queue:
                    continue  # the old instance's: its requests were parked or answered already
                # ETIME: nothing completed for storage_timeout in this wait;
                # a failure only if nothing completed meanwhile (the intake
                # may have reaped completions inline). Any other error is
                # blkioq_do_io itself failing: the storage is gone.
                if e.errno != errno.ETIME or (
                        self._io_outstanding
                        and time.monotonic() - self._last_completion >= self.storage_timeout):
                    self._storage_failed(e)
                    self._push()
                continue
            if queue is not self.queue:
                continue  # completions of a destroyed instance: their requests were parked again
            engine = self._engine
            if (engine is not None and type(batch) is int and self._held and engine.queue is queue
                    and self._engine_may_run(engine)):
                self._reap_engine(engine, batch)
                continue
            self._reaped(queue, batch)
            self._kick()
            self._push()

    async def _wait_all_answered(self) -> None:
        while self.pool.busy:
            self._all_answered = trio.Event()
            await self._all_answered.wait()
        self._all_answered = None
