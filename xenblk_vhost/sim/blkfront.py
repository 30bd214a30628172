"""A reference blkif frontend that behaves like Linux xen-blkfront.

It runs inside a simulated guest (xenblk_vhost.sim.guest.Guest: memory,
grant table, event channels) with a xenstore connection that xenstored
treats as that guest's domain, and drives one vbd:

    async with open_blkfront(xs, guest, devid, BlkfrontOptions(...)) as front:
        await front.write(0, data); assert await front.read(0, 8) == data
        await front.flush(); await front.discard(8, 8)
        front.negotiated, front.disk, front.sectors, front.errors
    # leaving the block closes the device (Closing -> Closed) and takes
    # every grant back, recording in front.errors what the backend still held

Handshake (blkback_changed / talk_to_blkback / blkfront_connect): wait for
backend InitWait; ring order, queue count from the backend's
max-ring-page-order / multi-queue-max-queues; grant the ring pages,
allocate the event channels, write ring refs, event channels, protocol
and feature-persistent in one transaction; Initialised; wait for
Connected; read sectors/info/sector-size/physical-sector-size and the
features; Connected. The backend state watch stays for the device's life:
Connected again means "look at `sectors`" (online resize,
`await front.wait_resize()`); Closing means close (straight to Closed, as
blkfront_closing does). Once the backend is Closed the rings are torn down
(a reconnect through Initialising is possible: `front.reconnect()`).

The datapath is blkfront_ring.FrontendRing (one per queue, each with its
reaper task); grants are blkfront_grants.GrantPool; hostile tests get a
blkfront_raw.RawRing. Run as a process:

    python -m xenblk_vhost.sim.blkfront --hypervisor HV.sock --xenstore XS.sock \\
        --domid 1 --devid 51712 --requests 10000 --depth 32 [--knobs...]

prints one JSON object (negotiated features, workload result, errors) on
stdout and exits 0 if everything verified, 1 otherwise.

Where it differs from Linux xen-blkfront (on purpose):
- grants without persistent grants: pages carrying write data and indirect
  pages are granted read-only (Linux grants all read-write), so a backend
  that maps them writable fails;
- persistent-grant pages are allocated lazily up to Linux's bound, not all
  at connect; no 10 s purge of unused persistent grants (blkfront_delay_work);
- a protocol error (bad response id or op, overflowing rsp_prod, a grant
  still mapped) fails the ring's requests and is recorded in `errors`
  instead of BUG/WARN, and the other rings keep going;
- teardown checks what blkfront does not: when the backend reaches Closed,
  every ring page and grant must be unmapped and every request answered;
- knobs Linux lacks: no `protocol` key or x86_32-abi from a 64-bit guest,
  skipping InitWait, ring indices starting near 2**32;
- requests are issued by tasks, pushed one at a time (no blk-mq plugging
  or request merging), queues chosen round-robin instead of per CPU;
- no request splitting into an "extra request" (that is for guest pages
  larger than 4 KiB); bigger I/O is split into separate requests by
  read()/write(), as the block layer's limits would;
- on reconnect it does not requeue requests in flight (blkif_recover):
  they fail;
- an EOPNOTSUPP answer to a flush, barrier or discard is reported to the
  caller (BlkifStatusError) instead of silently turning the feature off;
- data always travels through pages granted for the purpose (Linux grants
  the bio's own pages unless `trusted=0` or persistent grants make it
  bounce), so `trusted` is read and reported but changes nothing;
- ring pages are consecutive guest frames (Linux: any frames, mapped
  virtually contiguous), and write_barrier() may be called at will (Linux
  sends WRITE_BARRIER only for flush/FUA when the backend lacks
  feature-flush-cache).
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from .._groups import reraise_alone
from ..blkif.abi import abi_for_protocol, ring_entries
from ..blkif.constants import (
    MAX_SEGMENTS_PER_REQUEST,
    OP_DISCARD,
    OP_READ,
    OP_WRITE,
    OP_WRITE_BARRIER,
    RSP_OKAY,
    SECTOR_SIZE,
    SECTORS_PER_PAGE,
    XEN_PAGE_SIZE,
)
from ..blkif.request import indirect_pages_for
from ..xen.interfaces import XenStore
from ..xen.xenbus import XenbusState
from . import blkfront_xenbus as xb
from .blkfront_config import BlkfrontOptions, DiskInfo, Negotiated
from .blkfront_grants import GrantPool
from .blkfront_raw import RawRing
from .blkfront_ring import Completion, FrontendRing, IoRequest, RingBroken, init_shared_ring


class BlkifStatusError(IOError):
    """The backend answered a request with a status other than OKAY."""

    def __init__(self, op: int, status: int) -> None:
        super().__init__(f"op {op} answered status {status}")
        self.op = op
        self.status = status


class _RingSetup:
    """What talk_to_blkback made for one ring: pages, refs, event channel."""

    def __init__(self, frames: list[int], view: memoryview, refs: list[int], channel) -> None:
        self.frames = frames
        self.view = view
        self.refs = refs
        self.channel = channel


class Blkfront:
    def __init__(self, xs: XenStore, guest, devid: int, options: BlkfrontOptions,
                 nursery: trio.Nursery) -> None:
        self.xs = xs
        self.guest = guest
        self.devid = devid
        self.options = options
        self.fe_path = f"/local/domain/{guest.domid}/device/vbd/{devid}"
        self._nursery = nursery
        self.details: xb.FrontendDetails | None = None
        self.state = XenbusState.INITIALISING
        self.backend_state: int = XenbusState.UNKNOWN
        self._backend_changed = trio.Event()
        self.negotiated: Negotiated | None = None
        self.disk: DiskInfo | None = None
        self.sectors = 0
        self._resized = trio.Event()
        self.resizes = 0
        self._setups: list[_RingSetup] = []
        self.rings: list[FrontendRing] = []
        self._ring_scopes: list[trio.CancelScope | None] = []
        self._reapers_done: dict[int, trio.Event] = {}  # by ring index: set when its reaper task has ended
        self._torn_down = trio.Event()
        self._torn_down.set()
        self._errors: list[str] = []
        self._queue = itertools.count()
        self.connections = 0
        self._watching = False
        self.ring_stats: list[dict] = []  # per ring, as of the last teardown

    # ---- what went wrong ------------------------------------------------------------------

    @property
    def errors(self) -> list[str]:
        """Backend misbehaviour seen so far, oldest first."""
        return self._errors + [f"ring {r.index}: {r.broken}" for r in self.rings if r.broken is not None]

    # ---- the backend's state ------------------------------------------------------------

    @property
    def _details(self) -> xb.FrontendDetails:
        """The toolstack's nodes, read before the first connect (all that follows relies on them)."""
        assert self.details is not None
        return self.details

    @property
    def _negotiated(self) -> Negotiated:
        """What the last connect negotiated (I/O happens only while connected)."""
        assert self.negotiated is not None
        return self.negotiated

    async def _watch_backend(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """blkback_changed: the otherend watch, for the device's whole life."""
        async with xb.watch_backend_state(self.xs, self._details.backend) as states:
            started = False
            async for state in states:
                self.backend_state = state
                self._backend_changed.set()
                self._backend_changed = trio.Event()
                if not started:  # the registration's fire: the state as it is now
                    task_status.started()
                    started = True
                if state == XenbusState.CONNECTED and self.state == XenbusState.CONNECTED:
                    await self._check_resize()
                elif (state in (XenbusState.CLOSING, XenbusState.CLOSED)
                      and self.state in (XenbusState.INITIALISED, XenbusState.CONNECTED)):
                    # blkfront_closing -> xenbus_frontend_closed: straight to Closed.
                    self.state = XenbusState.CLOSED
                    await xb.switch_state(self.xs, self.fe_path, XenbusState.CLOSED)
                if (state in (XenbusState.CLOSED, XenbusState.UNKNOWN)
                        and self.state in (XenbusState.CLOSED, XenbusState.CLOSING) and self._setups):
                    self._teardown()
                elif state == XenbusState.UNKNOWN and self._setups:
                    self._errors.append("backend state vanished while connected")
                    self._teardown()

    async def _wait_backend(self, wanted: set[int], what: str, tolerate: frozenset[int] = frozenset()) -> int:
        """Wait until the backend's state is one of `wanted`; a backend that
        closes or vanishes instead fails the wait (xenbus_dev_fatal), unless
        that state is one to `tolerate` (a backend still Closed from before
        we asked to reconnect)."""
        with trio.fail_after(self.options.state_timeout):
            while self.backend_state not in wanted:
                if (self.backend_state in (XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.UNKNOWN)
                        and self.backend_state not in tolerate):
                    error = await xb.read_str(self.xs, f"{self._details.backend}/error")
                    raise xb.HandshakeError(
                        f"backend state {self.backend_state} while waiting for {what}"
                        + (f" (backend error: {error})" if error else ""))
                await self._backend_changed.wait()
        return self.backend_state

    async def _check_resize(self) -> None:
        """blkfront_connect while connected: the backend may be telling a new size."""
        sectors = await xb.read_sectors(self.xs, self._details.backend)
        if sectors is not None and sectors != self.sectors:
            self.sectors = sectors
            self.resizes += 1
            self._resized.set()
            self._resized = trio.Event()

    async def wait_resize(self) -> int:
        """Wait for the next capacity change; return the new size in sectors."""
        await self._resized.wait()
        return self.sectors

    # ---- connecting -----------------------------------------------------------------------

    async def connect(self) -> None:
        """From Initialising to Connected (blkfront_probe .. blkfront_connect)."""
        if self.details is None:
            self.details = await xb.read_frontend_details(self.xs, self.fe_path)
        if not self._watching:
            await self._nursery.start(self._watch_backend)
            self._watching = True
        if not self.options.skip_init_wait:
            # blkback_changed: talk_to_blkback on InitWait (or on Connected
            # when we never got to Initialised).
            await self._wait_backend({XenbusState.INIT_WAIT, XenbusState.CONNECTED}, "InitWait",
                                     tolerate=frozenset({XenbusState.CLOSED}) if self.connections else frozenset())
        await self._talk_to_blkback()
        await self._wait_backend({XenbusState.CONNECTED}, "Connected")
        await self._blkfront_connect()

    async def _talk_to_blkback(self) -> None:
        d = self._details
        choice = await xb.choose_rings(self.xs, d.backend, self.options)
        abi = abi_for_protocol(self.options.protocol)
        nr_pages = 1 << choice.ring_page_order
        self._setups = []
        self._torn_down = trio.Event()
        for _ in range(choice.nr_rings):
            frames = self._contiguous_frames(nr_pages)
            view = self.guest.memory[frames[0] * XEN_PAGE_SIZE:(frames[-1] + 1) * XEN_PAGE_SIZE]
            view[:] = bytes(len(view))
            init_shared_ring(view, self.options.initial_index)
            refs = [self.guest.grant_access(f, d.backend_id, False) for f in frames]
            channel = self.guest.alloc_unbound(d.backend_id)
            self._setups.append(_RingSetup(frames, view, refs, channel))
        self._choice = choice
        self._abi = abi
        await xb.write_transport(
            self.xs, self.fe_path, choice.ring_page_order,
            [xb.RingNodes(s.refs, s.channel.local_port) for s in self._setups],
            self.options.protocol, self.options.feature_persistent)
        self.state = XenbusState.INITIALISED
        await xb.switch_state(self.xs, self.fe_path, XenbusState.INITIALISED)

    def _contiguous_frames(self, n: int) -> list[int]:
        """Frames for one ring, consecutive so the ring is one view (Linux
        maps discontiguous frames virtually contiguous; we cannot)."""
        frames = sorted(self.guest.alloc_pages(n))
        if frames[-1] - frames[0] != n - 1:
            self.guest.free_pages(frames)
            raise MemoryError(f"no {n} consecutive guest frames for a ring")
        return frames

    async def _blkfront_connect(self) -> None:
        d = self._details
        self.disk = await xb.read_disk_info(self.xs, d.backend)
        neg = await xb.gather_features(self.xs, d.backend, self.options, self._choice, d.trusted)
        self.negotiated = neg
        self.sectors = self.disk.sectors
        size = ring_entries(self._abi, neg.ring_page_order)
        grants = neg.max_indirect_segments or MAX_SEGMENTS_PER_REQUEST
        limit = (grants + indirect_pages_for(grants)) * size  # blkfront_setup_indirect
        self.rings = []
        for i, s in enumerate(self._setups):
            pool = GrantPool(self.guest, d.backend_id, persistent=neg.persistent, limit=limit)
            self.rings.append(FrontendRing(
                i, s.view, self._abi, neg.ring_page_order, s.channel, pool,
                handle=d.handle, max_indirect_segments=neg.max_indirect_segments))
        self._ring_scopes = [None] * len(self.rings)
        for ring in self.rings:
            self._start_reaper(ring)
        self.state = XenbusState.CONNECTED
        self.connections += 1
        await xb.switch_state(self.xs, self.fe_path, XenbusState.CONNECTED)

    def _start_reaper(self, ring: FrontendRing) -> None:
        scope = trio.CancelScope()
        self._ring_scopes[ring.index] = scope
        done = self._reapers_done[ring.index] = trio.Event()

        async def reaper() -> None:
            try:
                with scope:
                    try:
                        await ring.serve()
                    except trio.ClosedResourceError:
                        pass  # the event channel was closed under us: teardown
            finally:
                done.set()

        self._nursery.start_soon(reaper)

    # ---- closing ---------------------------------------------------------------------------

    def _teardown(self) -> None:
        """blkif_free, once the backend is Closed (or gone): every response
        it published is consumed, then everything granted is taken back.
        What the backend still holds, or never answered, is an error."""
        for scope in self._ring_scopes:
            if scope is not None:
                scope.cancel()
        for ring in self.rings:
            if ring.broken is None:
                ring.drain()
        self.ring_stats = [r.summary() for r in self.rings]
        for ring in self.rings:
            if ring.broken is not None:
                self._errors.append(f"ring {ring.index}: {ring.broken}")
            unanswered, still = ring.abandon_in_flight()
            if unanswered:
                self._errors.append(f"ring {ring.index}: backend closed with {unanswered} "
                                    f"request(s) unanswered")
            still += ring.pool.release_all()
            self._errors += [f"ring {ring.index}: {e}" for e in still]
            ring.release()
        for s in self._setups:
            kept = []
            for frame, ref in zip(s.frames, s.refs):
                if self.guest.end_access(ref):
                    kept.append(frame)
                else:
                    self._errors.append(f"ring page gref {ref} still mapped after the backend closed")
            s.channel.close()
            s.view.release()
            self.guest.free_pages(kept)
        self.rings = []
        self._ring_scopes = []
        self._setups = []
        self._torn_down.set()

    async def close(self) -> None:
        """Unplug from the guest's side (xenbus_dev_shutdown): Closing, wait
        for the backend to follow, Closed, wait until it is Closed and the
        rings are torn down."""
        if self.state == XenbusState.INITIALISING and self._setups:
            # Rings made but never announced: the backend cannot hold them.
            self._teardown()
            return
        if self.state in (XenbusState.INITIALISED, XenbusState.CONNECTED):
            self.state = XenbusState.CLOSING
            await xb.switch_state(self.xs, self.fe_path, XenbusState.CLOSING)
            await self._wait_backend({XenbusState.CLOSING, XenbusState.CLOSED, XenbusState.UNKNOWN}, "Closing")
        if self.state == XenbusState.CLOSING:
            self.state = XenbusState.CLOSED
            await xb.switch_state(self.xs, self.fe_path, XenbusState.CLOSED)
        await self.wait_closed()

    def force_teardown(self) -> None:
        """Take every grant back now, without waiting for the backend (what
        open_blkfront does when the backend never closes): for a Blkfront
        run on a caller's nursery that is being cancelled. What the backend
        still maps is recorded in `errors` and not reused."""
        if self._setups:
            self._errors.append("rings torn down without the backend closing")
            self._teardown()

    async def wait_closed(self) -> None:
        """Until the backend is Closed (or gone) and the rings are torn down."""
        with trio.fail_after(self.options.state_timeout):
            await self._torn_down.wait()

    async def reconnect(self) -> None:
        """After a close: back to Initialising and through the handshake again
        (blkback answers a frontend Initialising while it is Closed with InitWait)."""
        if self.state != XenbusState.CLOSED or self._setups:
            raise RuntimeError("reconnect needs a closed, torn-down device")
        self.state = XenbusState.INITIALISING
        await xb.switch_state(self.xs, self.fe_path, XenbusState.INITIALISING)
        await self.connect()

    def ring_nodes(self) -> list[xb.RingNodes]:
        """Per ring, the grant refs and event channel told to the backend."""
        return [xb.RingNodes(tuple(s.refs), s.channel.local_port) for s in self._setups]

    # ---- I/O -----------------------------------------------------------------------------

    def ring_for(self, queue: int | None) -> FrontendRing:
        if self.state != XenbusState.CONNECTED or not self.rings:
            raise RingBroken(f"device is not connected (state {self.state})")
        if queue is None:
            queue = next(self._queue) % len(self.rings)
        return self.rings[queue]

    async def submit(self, req: IoRequest, *, queue: int | None = None) -> Completion:
        """One blkif request; the completion carries the backend's status."""
        return await self.ring_for(queue).submit(req)

    async def _checked(self, req: IoRequest, queue: int | None) -> Completion:
        done = await self.submit(req, queue=queue)
        if done.status != RSP_OKAY:
            raise BlkifStatusError(req.op, done.status)
        return done

    def _chunks(self, nr_sectors: int, first_sect: int) -> list[tuple[int, int, int]]:
        """(offset in sectors, count, first_sect) per request, at most the
        negotiated segments each: what the block layer's limits make."""
        per = self._negotiated.segments_per_request * SECTORS_PER_PAGE
        out, done, first = [], 0, first_sect
        while done < nr_sectors:
            n = min(nr_sectors - done, per - first)
            out.append((done, n, first))
            done += n
            first = (first + n) % SECTORS_PER_PAGE
        return out

    async def _all(self, requests: list[IoRequest], queue: int | None) -> list[Completion]:
        """Issue the requests one I/O was split into, concurrently; raise
        the first failure itself (not wrapped in a group)."""
        if len(requests) == 1:
            return [await self._checked(requests[0], queue)]
        results: list[Completion | None] = [None] * len(requests)
        failures: list[BaseException] = []

        async def one(i: int) -> None:
            try:
                results[i] = await self._checked(requests[i], queue)
            except (BlkifStatusError, RingBroken) as exc:
                failures.append(exc)

        async with trio.open_nursery() as nursery:
            for i in range(len(requests)):
                nursery.start_soon(one, i)
        if failures:
            raise failures[0]
        return [r for r in results if r is not None]  # all of them: no failure

    async def read(self, sector: int, nr_sectors: int, *, first_sect: int = 0,
                   queue: int | None = None) -> bytes:
        reqs = [IoRequest(OP_READ, sector + off, n, first_sect=first)
                for off, n, first in self._chunks(nr_sectors, first_sect)]
        return b"".join(_read_data(done) for done in await self._all(reqs, queue))

    async def write(self, sector: int, data: bytes, *, first_sect: int = 0,
                    queue: int | None = None) -> None:
        if len(data) % SECTOR_SIZE:
            raise ValueError("data must be whole 512-byte sectors")
        reqs = [IoRequest(OP_WRITE, sector + off, n, data[off * SECTOR_SIZE:(off + n) * SECTOR_SIZE], first)
                for off, n, first in self._chunks(len(data) // SECTOR_SIZE, first_sect)]
        await self._all(reqs, queue)

    async def write_barrier(self, sector: int = 0, data: bytes = b"", *, first_sect: int = 0,
                            queue: int | None = None) -> None:
        """BLKIF_OP_WRITE_BARRIER (what blkfront sends for a FUA write or a
        flush when the backend offered only feature-barrier)."""
        await self._checked(IoRequest(OP_WRITE_BARRIER, sector, len(data) // SECTOR_SIZE, data or None,
                                      first_sect), queue)

    async def flush(self, *, queue: int | None = None) -> None:
        """An empty flush with the negotiated flush op (FLUSH_DISKCACHE, or
        WRITE_BARRIER if that is all the backend offers)."""
        if self._negotiated.flush_op is None:
            raise RuntimeError("the backend offered neither feature-flush-cache nor feature-barrier")
        await self._checked(IoRequest(self._negotiated.flush_op), queue)

    async def discard(self, sector: int, nr_sectors: int, *, secure: bool = False,
                      queue: int | None = None) -> None:
        await self._checked(IoRequest(OP_DISCARD, sector, nr_sectors, secure=secure), queue)

    # ---- hostile access --------------------------------------------------------------------

    @asynccontextmanager
    async def raw_ring(self, queue: int = 0) -> AsyncIterator[RawRing]:
        """Hand one ring to a hostile test; its reaper is stopped meanwhile
        and the ring resynchronised (indices as they are) afterwards."""
        ring = self.ring_for(queue)
        if ring.in_flight:
            raise RuntimeError(f"ring {queue} has {ring.in_flight} requests in flight")
        scope = self._ring_scopes[queue]
        if scope is not None:
            scope.cancel()
            # Until it has ended: a reaper started but not yet run would
            # otherwise wait on the event channel beside the raw user.
            await self._reapers_done[queue].wait()
        raw = RawRing(ring, self.guest, self._details.backend_id)
        try:
            yield raw
        finally:
            raw.release()
            if self.state == XenbusState.CONNECTED and ring in self.rings:
                ring.resync()
                self._start_reaper(ring)

    # ---- reporting -------------------------------------------------------------------------

    def outstanding(self) -> list[dict]:
        """Per ring: the requests the backend has not answered (FrontendRing.outstanding)."""
        return [r.outstanding() for r in self.rings]

    def report(self) -> dict:
        return {
            "state": self.state,
            "backend_state": self.backend_state,
            "negotiated": self.negotiated.as_dict() if self.negotiated else None,
            "disk": vars(self.disk) if self.disk else None,
            "sectors": self.sectors,
            "resizes": self.resizes,
            "connections": self.connections,
            "rings": [r.summary() for r in self.rings] or self.ring_stats,
            "errors": self.errors,
        }


@asynccontextmanager
async def open_blkfront(xs: XenStore, guest, devid: int,
                        options: BlkfrontOptions = BlkfrontOptions()) -> AsyncIterator[Blkfront]:
    """A connected frontend for the block; closed (orderly, bounded by
    options.state_timeout even when cancelled) and its tasks gone after.

    A failure (of the handshake, or raised by the block) comes out as
    itself, not wrapped in the exception group of our internal nursery."""
    try:
        async with _frontend_nursery(xs, guest, devid, options) as front:
            yield front
    except BaseExceptionGroup as group:
        reraise_alone(group)
        raise


@asynccontextmanager
async def _frontend_nursery(xs: XenStore, guest, devid: int, options: BlkfrontOptions) -> AsyncIterator[Blkfront]:
    async with trio.open_nursery() as nursery:
        front = Blkfront(xs, guest, devid, options, nursery)
        try:
            await front.connect()
            yield front
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + options.state_timeout
                try:
                    if front._setups:
                        await front.close()
                except (trio.TooSlowError, xb.HandshakeError, RingBroken) as exc:
                    front._errors.append(f"close: {exc!r}")
                # If the backend never closed, take back what we can anyway,
                # so nothing of ours outlives the block.
                front.force_teardown()
            nursery.cancel_scope.cancel()


if __name__ == "__main__":
    from .blkfront_main import main

    sys.exit(main())


def _read_data(done: Completion) -> bytes:
    """A successful read's data (_all raised for a failed one)."""
    assert done.data is not None
    return done.data
