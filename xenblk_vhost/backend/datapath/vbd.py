"""One virtual block device: its storage, what it offers, and its rings while connected.

The VbdDataplane of backend/contract.py, served in this process; the xenbus
side (backend/xenbus/device.py) uses that surface and nothing else:

    vbd = Vbd.open(disk_config)          # create: opens the storage: open_storage(disk, disk.queues)
    vbd.features                         # VbdFeatures: what to advertise
    vbd.features.probe_nodes()           #   keys before InitWait (indirect, queues, ring order)
    vbd.features.connect_nodes(sectors)  #   keys of the Connected transaction
    await nursery.start(vbd.serve, spec, platform)
                                         # start: maps every ring, binds every channel, starts one
                                         # RingWorker per ring; returns (started) once serving.
                                         # Raises VbdConnectError (nothing left behind) if the
                                         # spec is unusable or a ring/channel cannot be set up.
    await vbd.disconnect()               # stop: stop taking requests, finish and answer what is in
                                         # flight, then unmap/unbind/free; serve() returns.
                                         # Idempotent; returns at once when not serving.
    vbd.current_sectors()                # storage capacity now, 512-byte units (online resize:
    vbd.sectors                          #   compare with the size in force, and
    vbd.apply_size(sectors)              #   apply a new one to later requests; publishing is yours)
    vbd.stats()                          # {"rings": [per-ring snapshot], "total": {...}}
    await vbd.pause(); vbd.resume()      # the operator's quiesce (snapshot hook): the rings take
                                         #   nothing new, pause() returns once nothing is in flight
                                         #   (the barrier gate, barrier.py); kept across reconnects
    vbd.close()                          # destroy: free the storage (after disconnect)

Cancelling the task running serve() is the other way out: the shielded
cleanup gives in-flight requests `drain_timeout` seconds to finish (they are
answered), then destroys the storage instance if some did not (so no
request can still touch a page we unmap), answers those ERROR and releases
their pages, then unmaps and unbinds everything. A storage failing while
serving (ring_worker.py) is destroyed the same way at once. Either way,
after serve() returns: no task, no grant mapping, no bound channel, no
memory region of this connection remains.

One libblkio queue per ring (ring i uses storage queue i), so a vbd
serves as many rings as the storage opened queues (features.max_queues).
A frontend may connect, disconnect and connect again to the same Vbd; if
the storage failed as a whole meanwhile it is reopened at the next serve().

Storage failing as a whole WHILE serving (a killed vhost-user server, or
no completion for storage_timeout): the old instance is destroyed at once
(nothing it still holds can land in memory we reuse), the rings park their
requests, and a task of serve() opens a new instance on the same
properties with backoff (storage_link.py: the policy, what the guest sees,
what is retried); the rings then go on with it, frontend untouched.
`vbd.storage_link` says where that stands (stats()["storage"]).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import trio

from ...blkif.abi import layout, ring_entries
from ...blkif.constants import MAX_SEGMENTS_PER_REQUEST, SECTOR_SIZE, XEN_PAGE_SIZE
from ...blkif.intake import RequestIntake
from ...blkif.ring import BackRing, RingOverflow
from ...blkif.validate import RequestLimits
from ...config import DiskConfig
from ...storage import BlkioError, StorageDevice
from ...storage.server_socket import ServerSocket
from ...xen.interfaces import EventChannel, GrantMapping, Platform
from ..contract import ConnectionSpec, RingSpec, VbdConnectError
from ..features import MAX_PERSISTENT_GRANTS, VbdFeatures, derive_features
from .barrier import BarrierGate
from .copy_grants import CopyGrants
from .copy_path import CopyDataPath, plan_bounce
from .data_path import DataPath
from .journal import JournalGeometry
from .journal_file import JournalFile, journal_name
from .map_path import MapDataPath
from .persistent_grants import DEFAULT_TRIM_INTERVAL, PersistentGrants
from .ring_journal import AttachedJournal, attach_journal, ring_identity
from .ring_policy import DEFAULT_STORAGE_TIMEOUT, RingPolicy
from .ring_worker import RingWorker
from .stats import RingStats, total
from .storage_link import FAILED, ReconnectPolicy, StorageLink, worth_logging
from .storage_ops import StorageShape
from .writer_fence import own_identity, wait_writer_gone

log = logging.getLogger(__name__)

DEFAULT_DRAIN_TIMEOUT = 5.0


def open_storage(disk: DiskConfig, queues: int | None = None) -> StorageDevice:
    """Open the disk's storage with `queues` queues (default: the config's), as the Vbd needs it."""
    return StorageDevice.open(disk.driver, disk.blkio_properties(), queues or disk.queues)


class _RingResources:
    """What one ring holds while connected, released in reverse order of acquisition."""

    def __init__(self) -> None:
        self.mapping: GrantMapping | None = None
        self.ring: BackRing | None = None
        self.channel: EventChannel | None = None
        self.datapath: DataPath | None = None
        self.worker: RingWorker | None = None
        self.journal: AttachedJournal | None = None
        self.remove_journal = False  # the connection ended in order: nothing for a successor
        # the copy path's memory region belongs to a storage instance: a new instance needs a new one
        self.new_datapath: Callable[[StorageDevice], DataPath] | None = None
        self.slots = 0  # the data path's request slots
        self.journal_opened: JournalFile | None = None  # the last process's journal, opened by prepare()

    def close(self) -> None:
        errors = []
        for step in (self._close_channel, self._close_datapath, self._close_journal, self._close_ring):
            try:
                step()
            except Exception as e:  # keep releasing the rest; report at the end
                errors.append(e)
        if errors:
            raise errors[0]

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    def _close_datapath(self) -> None:
        if self.datapath is not None:
            self.datapath.close()
            self.datapath = None

    def _close_journal(self) -> None:
        if self.journal_opened is not None:
            self.journal_opened.close()
            self.journal_opened = None
        if self.journal is not None:
            self.journal.close(remove=self.remove_journal)
            self.journal = None

    def _close_ring(self) -> None:
        if self.ring is not None:
            self.ring.view.release()
            self.ring = None
        if self.mapping is not None:
            self.mapping.close()
            self.mapping = None


class Vbd:
    def __init__(self, disk: DiskConfig, storage: StorageDevice, *,
                 storage_timeout: float = DEFAULT_STORAGE_TIMEOUT,
                 drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
                 max_persistent_grants: int = MAX_PERSISTENT_GRANTS,
                 persistent_trim_interval: float = DEFAULT_TRIM_INTERVAL,
                 shape: StorageShape | None = None, journal_dir: Path | None = None,
                 reconnect: ReconnectPolicy | None = None, ring_index: int | None = None,
                 gate_factory: Callable[[], BarrierGate] = BarrierGate) -> None:
        """Take ownership of an opened storage device.

        journal_dir: keep each ring's in-flight journal there (journal_file.py),
        and take a live ring over from the journal found there; None: no journal.

        shape: override the storage's request limits (max-transfer,
        max-segments, max discard) the datapath splits requests by; tests
        use it to exercise splitting on storage without such limits.
        reconnect: what to do when the storage fails as a whole while serving (storage_link.py).
        ring_index: serve ring `ring_index` alone, on this storage's queue 0 (a ring worker process,
        process_vbd.py: the spec it gets names that one ring); None: every ring of the spec.
        gate_factory: the barrier gate of a connection (a ring worker's coordinates with its parent).
        persistent_trim_interval: how often a full persistent-grant cache may evict (persistent_grants.py).
        """
        self.disk = disk
        self.storage = storage
        self.storage_timeout = storage_timeout
        self.drain_timeout = drain_timeout
        self.max_persistent_grants = max_persistent_grants
        self.persistent_trim_interval = persistent_trim_interval
        self.journal_dir = journal_dir
        self.ring_index = ring_index
        self._gate_factory = gate_factory
        self._connection_ending = False
        self.features: VbdFeatures = derive_features(
            disk, storage.limits, capacity=storage.capacity, num_queues=len(storage.queues))
        self._sectors = self.features.sectors
        self._shape_override = shape
        self._gate = BarrierGate()
        self._workers: list[RingWorker] = []
        # A ring worker process (ring_process.py) sets its channel's fd: its one ring may then sleep in
        # the ring engine's own poll (RingWorker.serve_wake_fd), which returns when the channel speaks.
        self.serve_wake_fd: int | None = None
        self._intakes: list[RequestIntake] = []
        self._ring_stats: list[RingStats] = []
        self._serving = False
        self._stopped: trio.Event | None = None
        self._storage_failed = False
        self._paused = False
        self.reconnect_policy = reconnect or ReconnectPolicy()
        self.storage_link = StorageLink()
        self._resources: list[_RingResources] = []
        self._storage_lost: trio.Event | None = None  # set while serving with reconnect: wakes _keep_storage
        self._server: ServerSocket | None = None  # vhost-user: our duplicate of libblkio's socket, watched
        self._prepared: tuple[ConnectionSpec, list[_RingResources]] | None = None  # prepare()
        # Set whenever no connection holds the event channels and journals (serve() clears it; its
        # teardown sets it as soon as those are released, before the rest): a hand-over waits for it.
        self.let_go = trio.Event()
        self.let_go.set()

    @classmethod
    def open(cls, disk: DiskConfig, *, queues: int | None = None, **kwargs) -> Vbd:
        """create; a disk with `ring_workers: process` gets a ProcessVbd (process_vbd.py)."""
        if cls is Vbd and disk.ring_workers == "process":
            from .process_vbd import ProcessVbd  # it builds on this module

            cls = ProcessVbd
        storage = open_storage(disk, queues)
        try:
            return cls(disk, storage, **kwargs)
        except BaseException:
            storage.close()
            raise

    # ------------------------------------------------------------ size

    def current_sectors(self) -> int:
        """The storage's size now, in 512-byte sectors (re-read from libblkio)."""
        return self.storage.capacity // SECTOR_SIZE

    @property
    def sectors(self) -> int:
        """The size requests are validated against (what was last published)."""
        return self._sectors

    def apply_size(self, sectors: int) -> None:
        """Validate requests from now on against a new size (in-flight ones are not recalled)."""
        self._sectors = sectors
        limits = self.features.request_limits(sectors)
        for intake in self._intakes:
            intake.set_limits(limits)

    # ------------------------------------------------------------ stats

    async def refresh_stats(self) -> None:
        """stats() is always current here (the rings are this process's)."""

    def stats(self) -> dict:
        for w in self._workers:  # (a ring served from a thread counts what it did when brought back)
            if w is not None:
                w.settle()
        rings = [s.snapshot() for s in self._ring_stats]
        return {"rings": rings, "total": total(rings), "storage": self.storage_link.snapshot()}

    # ------------------------------------------------------------ pause (operator)

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        """Take no new request from any ring; return once every request taken is answered.

        The barrier gate does it: closed, every ring's intake waits at it, and
        drain() returns when the vbd's in-flight count reaches zero. Not
        serving: the next connection starts closed. Cancelled (a deadline):
        resumed, as drain() reopens on the way out.
        """
        if self._paused:
            return
        self._paused = True
        if not self._serving:
            return
        try:
            await self._gate.drain()
        except BaseException:
            self._paused = False
            raise

    def resume(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._serving:
            self._gate.reopen()

    # ------------------------------------------------------------ serving

    @property
    def serving(self) -> bool:
        return self._serving

    def _check_spec(self, spec: ConnectionSpec) -> None:
        f = self.features
        if not spec.rings:
            raise VbdConnectError("no rings")
        if self.ring_index is not None:
            if [r.index for r in spec.rings] != [self.ring_index]:
                raise VbdConnectError(f"a ring worker serves ring {self.ring_index} alone")
        elif len(spec.rings) > f.max_queues:
            raise VbdConnectError(f"{len(spec.rings)} rings requested, {f.max_queues} offered")
        elif sorted(r.index for r in spec.rings) != list(range(len(spec.rings))):
            raise VbdConnectError("ring indices are not 0..n-1")
        for r in spec.rings:
            n = len(r.ring_refs)
            if n == 0 or n & (n - 1) or r.order > f.max_ring_page_order:
                raise VbdConnectError(f"ring {r.index}: {n} ring pages (max order {f.max_ring_page_order})")
        if spec.persistent_grants and not f.persistent:
            raise VbdConnectError("persistent grants were not offered")

    def _reopen_storage_if_failed(self) -> None:
        """Storage that failed as a whole (or that we destroyed) is opened afresh."""
        if not (self._storage_failed or self.storage.closed):
            return
        log.info("reopening storage of %s", self.disk.name)
        self.storage.close()
        try:
            self.storage = open_storage(self.disk, self.features.max_queues)
        except OSError as e:
            raise VbdConnectError(f"storage of {self.disk.name} cannot be reopened: {e}") from e
        self._storage_failed = False

    def _note_storage_failure(self, e: Exception) -> None:
        """A ring saw the storage fail as a whole: abort it now rather than at the teardown.

        No request is answered (nor its pages unmapped) while the storage may
        still write them: every ring stops using the storage, the instance is
        destroyed (libblkio's only abort: no per-request cancel exists), then
        - reconnecting (serving with a ReconnectPolicy enabled): the rings
          park their requests and _keep_storage brings a new instance;
        - else: each ring answers what the storage held ERROR; the storage is
          reopened at the next connect.
        Synchronous: nothing awaits between the rings' parking and the destroy.
        """
        if self._storage_failed:
            return
        self._storage_failed = True
        if self._storage_lost is None:
            self._destroy_storage_then_abandon(self._workers)
            return
        log.warning("%s: storage failed (%s); reconnecting to %s", self.disk.name, e, self.disk.path)
        self.storage_link.lost(e)
        for w in self._workers:
            w.park(e)
        # Destroyed now, before any ring can reuse a buffer the old instance (or a frozen server
        # sharing its memory) could still write. Our duplicate of its socket first, or the
        # connection would outlive the instance.
        self._stop_watching_server()
        self.storage.close()
        self._storage_lost.set()

    def _destroy_storage_then_abandon(self, workers: list[RingWorker]) -> None:
        for w in workers:
            w.storage_lost()
        self.storage.close()
        for w in workers:
            w.abandon()

    # ------------------------------------------------------------ reconnecting (storage_link.py)

    async def _keep_storage(self) -> None:
        """While serving: each time the storage is lost, get a new instance to the rings."""
        policy = self.reconnect_policy
        while True:
            assert self._storage_lost is not None
            async with trio.open_nursery() as watching:
                watching.start_soon(self._watch_server)
                await self._storage_lost.wait()
                watching.cancel_scope.cancel()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._hold_requests, policy.hold)
                storage, datapaths = await self._open_with_backoff(policy)
                nursery.cancel_scope.cancel()
            self._attach(storage, datapaths)
            self._storage_lost = trio.Event()

    async def _watch_server(self) -> None:
        """vhost-user: notice at once that the server hung up (killed, crashed, stopped by its
        operator), rather than after storage_timeout without completions (storage/server_socket.py)."""
        if not self.disk.driver.startswith("virtio-blk-vhost-user"):
            return
        watch = ServerSocket.find(self.disk.path)
        if watch is None:
            log.info("%s: cannot find the vhost-user socket to %s; a dead server is noticed after %g s "
                     "without completions", self.disk.name, self.disk.path, self.storage_timeout)
            return
        self._server = watch
        try:
            await watch.hangup()
            if self._server is watch:
                self._note_storage_failure(BlkioError(errno.ECONNRESET, "the vhost-user server hung up",
                                                      self.disk.path))
        finally:
            if self._server is watch:
                self._stop_watching_server()

    def _stop_watching_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()

    async def _hold_requests(self, hold: float) -> None:
        await trio.sleep(hold)
        for w in self._workers:
            w.give_up(f"no storage for {hold:g} s")
        self.storage_link.gave_up_holding()

    async def _open_with_backoff(self, policy: ReconnectPolicy) -> tuple[StorageDevice, list]:
        for delay in policy.delays():
            problem: Exception | str
            try:
                storage = await _open_in_thread(self.disk, self.features.max_queues)
            except OSError as e:
                problem = e
            else:
                try:
                    return storage, self._fit(storage)
                except (OSError, ValueError) as e:
                    storage.close()
                    problem = e
            self.storage_link.attempt_failed(problem)
            attempt = self.storage_link.attempts
            if worth_logging(attempt):
                log.warning("%s: storage still away (attempt %d: %s); next in %.2f s%s", self.disk.name, attempt,
                            problem, delay, ", requests answered ERROR meanwhile"
                            if self.storage_link.state == FAILED else ", requests held")
            await trio.sleep(delay)
        raise AssertionError("unreachable: delays() is endless")

    def _fit(self, storage: StorageDevice) -> list:
        """Check a new instance can take the old one's place; make the data paths that need it."""
        if len(storage.queues) < len(self._workers):
            raise ValueError(f"{len(storage.queues)} queues, {len(self._workers)} rings connected")
        old = self.features
        if storage.limits.logical_block_size != old.sector_size:
            raise ValueError(f"logical block size {storage.limits.logical_block_size}, was {old.sector_size}")
        if storage.capacity < self._sectors * SECTOR_SIZE:
            raise ValueError(f"{storage.capacity} bytes, the frontend was told {self._sectors * SECTOR_SIZE}")
        datapaths: list = []
        try:
            for res in self._resources:
                datapaths.append(res.new_datapath(storage) if res.new_datapath is not None else None)
        except BaseException:
            for dp in datapaths:
                if dp is not None:
                    dp.close()
            raise
        return datapaths

    def _attach(self, storage: StorageDevice, datapaths: list) -> None:
        self.storage = storage
        self._storage_failed = False
        retried = 0
        for i, (res, datapath) in enumerate(zip(self._resources, datapaths)):
            if datapath is not None:
                old, res.datapath = res.datapath, datapath
                if old is not None:
                    old.close()  # its region went with the old instance
            assert res.worker is not None
            retried += res.worker.attach_storage(storage.queues[i], datapath)
        away = self.storage_link.back(retried)
        log.warning("%s: storage back after %.2f s (%d failed attempts); %d request(s) queued again",
                    self.disk.name, away, self.storage_link.attempts, retried)

    def _map_ring(self, res: _RingResources, rspec: RingSpec, spec: ConnectionSpec, platform: Platform) -> None:
        """The ring's pages mapped and its data path made: what a takeover can do before the previous
        process lets go (a grant may be mapped by two processes at once; prepare())."""
        f = self.features
        domid = spec.frontend_domid
        try:
            res.mapping = platform.gntdev.map_grants(domid, rspec.ring_refs, readonly=False)
        except OSError as e:
            raise VbdConnectError(f"ring {rspec.index}: cannot map ring pages: {e}") from e
        max_slots = min(self.disk.max_inflight, ring_entries(spec.abi, rspec.order))
        max_request_bytes = max(MAX_SEGMENTS_PER_REQUEST, f.max_indirect_segments) * XEN_PAGE_SIZE
        # The one place that picks how a request's data reaches the guest's pages.
        if f.data_path == "copy":
            slots, nlarge = plan_bounce(self.disk.memory, max_slots, max_request_bytes)

            def new_datapath(storage: StorageDevice) -> DataPath:
                grants = None
                if spec.persistent_grants:  # (a fresh table with each storage instance: mapped again lazily)
                    grants = CopyGrants.make(platform.gntdev, domid, max_grants=self.max_persistent_grants,
                                             trim_interval=self.persistent_trim_interval)
                return CopyDataPath(storage, platform.gntdev, domid, slots=slots, large_buffers=nlarge,
                                    max_request_bytes=max_request_bytes, grants=grants)

            res.new_datapath = new_datapath
            res.datapath = new_datapath(self.storage)
        else:
            slots = max_slots
            cache = None
            if spec.persistent_grants:
                cache = PersistentGrants(platform.gntdev, domid, max_grants=self.max_persistent_grants,
                                         trim_interval=self.persistent_trim_interval)
            res.datapath = MapDataPath(platform.gntdev, domid, cache)
        res.slots = slots

    def _make_ring(self, res: _RingResources, rspec: RingSpec, spec: ConnectionSpec, platform: Platform,
                   limits: RequestLimits) -> RingWorker:
        f = self.features
        domid = spec.frontend_domid
        # Phases timed: on a takeover they are the guest's pause (the rig's upgrade measured seconds here).
        t0 = time.monotonic()
        prepared = res.mapping is not None
        if not prepared:
            self._map_ring(res, rspec, spec, platform)
        t_map = time.monotonic()
        assert res.mapping is not None
        try:
            res.ring = BackRing(res.mapping.buffer, spec.abi, rspec.order)
        except RingOverflow as e:
            raise VbdConnectError(f"ring {rspec.index}: {e}") from e
        try:
            res.channel = platform.evtchn.bind_interdomain(domid, rspec.event_channel)
        except OSError as e:
            raise VbdConnectError(f"ring {rspec.index}: cannot bind event channel: {e}") from e
        t_ring = time.monotonic()
        assert res.datapath is not None  # made with the mapping
        slots = res.slots
        policy = RingPolicy(
            name=f"{self.disk.name}/ring{rspec.index}", frontend_domid=domid, abi=spec.abi, limits=limits,
            slots=slots, shape=self._shape_override or StorageShape.of(
                self.storage.limits, discard_by_write_zeroes=f.discard_by_write_zeroes),
            discard_by_write_zeroes=f.discard_by_write_zeroes, storage_timeout=self.storage_timeout)
        t_datapath = time.monotonic()
        opened, res.journal_opened = res.journal_opened, None
        res.journal = self._attach_journal(res.ring, rspec, spec, policy, opened)
        t_journal = time.monotonic()
        queue = self.storage.queues[self._queue_of(rspec)]
        res.worker = RingWorker(policy, ring=res.ring, channel=res.channel, queue=queue,
                                datapath=res.datapath, gntdev=platform.gntdev, gate=self._gate,
                                on_storage_failure=self._note_storage_failure,
                                journal=res.journal.journal if res.journal is not None else None)
        res.worker.serve_wake_fd = self.serve_wake_fd
        if res.journal is not None and res.journal.resumed is not None:
            resumed = res.journal.resumed
            res.worker.resume_from(resumed.republish, resumed.rerun)
            log.info("%s: set up for the takeover in %.3f s (ring pages and data path %.3f%s, event channel %.3f, "
                     "policy %.3f, journal %.3f)", policy.name, t_journal - t0, t_map - t0,
                     " (prepared before the release)" if prepared else "", t_ring - t_map, t_datapath - t_ring,
                     t_journal - t_datapath)
        self._intakes.append(res.worker.intake)
        self._ring_stats.append(res.worker.stats)
        return res.worker

    async def _fence_last_writers(self, resources: list[_RingResources]) -> None:
        """A takeover with requests to run again: none before the process that left them is gone
        (writer_fence.py says which of its writes that fences); then this process is the writer."""
        me = own_identity()
        for res in resources:
            attached = res.journal
            if attached is None or attached.resumed is None:
                continue
            writer = attached.resumed.writer
            if writer is not None and writer != me and attached.resumed.rerun:
                await wait_writer_gone(*writer, log_name=self.disk.name)
            attached.journal.set_writer(*me)

    def _queue_of(self, rspec: RingSpec) -> int:
        """Ring i on storage queue i; a ring worker's one ring on its storage's one queue."""
        return 0 if self.ring_index is not None else rspec.index

    def _attach_journal(self, ring: BackRing, rspec: RingSpec, spec: ConnectionSpec, policy: RingPolicy,
                        opened: JournalFile | None = None) -> AttachedJournal | None:
        """The ring's journal: the last process's taken over, or a new one. A journal that cannot
        be kept (the directory not writable, full) is logged; the ring is served without one."""
        if self.journal_dir is None:
            if opened is not None:
                opened.close()
            return None
        identity = ring_identity(frontend_domid=spec.frontend_domid, vdev=self.disk.name, ring=rspec.index,
                                 abi=spec.abi.value, ring_refs=rspec.ring_refs, event_channel=rspec.event_channel)
        geometry = JournalGeometry.for_ring(policy.slots, layout(spec.abi).entry_size,
                                            policy.limits.max_indirect_segments)
        name = journal_name(spec.frontend_domid, self.disk.name, rspec.index)
        try:
            return attach_journal(self.journal_dir, name, identity, geometry, ring,
                                  RequestIntake(spec.abi, policy.limits), policy.name, opened=opened)
        except OSError as e:
            log.warning("%s: no journal (%s): a crash of this process could lose or repeat this ring's "
                        "in-flight requests", policy.name, e)
            return None

    def prepare(self, spec: ConnectionSpec, platform: Platform) -> None:
        """Before a takeover, while the previous process still serves the rings: map every ring's
        pages and make its data path (a grant may be mapped by two processes at once; the copy
        path's memory region is this storage instance's). serve() with the same spec then only
        binds the event channels, reads the journals and starts the workers: what must wait until
        the previous process has let go. VbdConnectError (nothing kept) if it cannot."""
        self.unprepare()
        if self._serving:
            raise VbdConnectError("already serving a connection")
        self._check_spec(spec)
        self._reopen_storage_if_failed()
        resources: list[_RingResources] = []
        try:
            for rspec in sorted(spec.rings, key=lambda r: r.index):
                res = _RingResources()
                resources.append(res)
                self._map_ring(res, rspec, spec, platform)
                if self.journal_dir is not None:
                    try:
                        res.journal_opened = JournalFile.open_existing(
                            self.journal_dir / journal_name(spec.frontend_domid, self.disk.name, rspec.index))
                        if res.journal_opened is not None:
                            res.journal_opened.touch()
                    except OSError as e:  # read after the release instead
                        log.info("%s/ring%d: journal not opened before the takeover: %s", self.disk.name,
                                 rspec.index, e)
        except BaseException:
            for res in resources:
                res.close()
            raise
        self._prepared = (spec, resources)

    def unprepare(self) -> None:
        """Let go of what prepare() made (the takeover did not happen, or with another spec)."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None:
            for res in prepared[1]:
                res.close()

    def _take_prepared(self, spec: ConnectionSpec) -> list[_RingResources] | None:
        """prepare()'s rings if they were made for this spec on the storage in use now."""
        prepared, self._prepared = self._prepared, None
        if prepared is None:
            return None
        if prepared[0] == spec and not (self._storage_failed or self.storage.closed):
            return prepared[1]
        log.info("%s: the connection prepared before the takeover is not this one; setting up afresh",
                 self.disk.name)
        for res in prepared[1]:
            res.close()
        return None

    async def serve(self, spec: ConnectionSpec, platform: Platform, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the frontend's rings until disconnect() (or cancellation); see the module doc."""
        if self._serving:
            raise VbdConnectError("already serving a connection")
        self._check_spec(spec)
        self._serving = True
        self.let_go = trio.Event()
        self._stopped = trio.Event()
        self._gate = self._gate_factory()
        if self._paused:
            self._gate.close()
        self._intakes = []
        self._ring_stats = []
        self._connection_ending = False
        prepared = self._take_prepared(spec)
        resources: list[_RingResources] = list(prepared) if prepared is not None else []
        try:
            self._reopen_storage_if_failed()
            limits = self.features.request_limits(self._sectors)
            workers = []
            for i, rspec in enumerate(sorted(spec.rings, key=lambda r: r.index)):
                if prepared is None:
                    resources.append(_RingResources())
                workers.append(self._make_ring(resources[i], rspec, spec, platform, limits))
            self._workers = workers
            self._resources = resources
            await self._fence_last_writers(resources)
            async with trio.open_nursery() as nursery:
                if self.reconnect_policy.enabled:
                    self._storage_lost = trio.Event()
                    nursery.start_soon(self._keep_storage)
                async with trio.open_nursery() as rings:
                    for w in self._workers:
                        await rings.start(w.run)
                    task_status.started()
                nursery.cancel_scope.cancel()  # the rings are done: stop reconnecting
        finally:
            self._storage_lost = None
            with trio.CancelScope(shield=True):
                try:
                    await self._teardown(resources)
                finally:
                    self.let_go.set()

    async def _teardown(self, resources: list[_RingResources]) -> None:
        """Finish in-flight I/O (bounded), destroy the storage if it will not finish, free everything."""
        # The rings drain side by side under one deadline: libxl waits only
        # 10 s for Closed on detach, whatever the number of queues.
        busy = [res.worker for res in resources if res.worker is not None and res.worker.busy]
        finished: list[bool] = []
        # Cancelled (the service stopping for an upgrade or a restart) with every ring journaled:
        # what does not finish in drain_timeout is the next process's to run again from the journal,
        # never answered ERROR here because the storage is slow (the guest sees only latency).
        hand_over = (not self._connection_ending and bool(resources)
                     and all(res.journal is not None for res in resources))

        async def drain(worker: RingWorker) -> None:
            finished.append(await worker.drain(self.drain_timeout, keep_unanswered=hand_over))

        started = time.monotonic()
        async with trio.open_nursery() as nursery:
            for worker in busy:
                nursery.start_soon(drain, worker)
        drained = time.monotonic()
        stuck = not all(finished)
        if stuck or self._storage_failed:
            # Storage may still own some of our buffers/pages (requests that
            # did not finish, or were answered ERROR when the storage failed
            # without completing): destroying the instance cancels or
            # completes them before we free the region or unmap the pages.
            workers = [res.worker for res in resources if res.worker is not None]
            self._storage_failed = True
            if hand_over:
                if stuck:
                    log.warning("%s: in-flight I/O did not finish in %.1f s; closing the storage and "
                                "leaving those requests to the next process", self.disk.name, self.drain_timeout)
                self._stop_watching_server()
                self.storage.close()
                for w in workers:
                    w.abandon(answer=False)  # unmap and free; the journal keeps them unanswered
            else:
                if stuck:
                    log.warning("%s: in-flight I/O did not finish; closing the storage", self.disk.name)
                # then answer and unmap what it held (a batch mapping stays mapped otherwise)
                self._destroy_storage_then_abandon(workers)
        errors = []
        if hand_over:
            # What the next process waits for: the event channels (a port binds once); the journals
            # are final already (the workers are done). Mappings (the journals' too: unmapping pages
            # costs dearly in a PV domain under emulation), data paths and storage go after `let_go`.
            for res in reversed(resources):
                try:
                    res._close_channel()
                except Exception as e:
                    errors.append(e)
            self.let_go.set()
            let_go = time.monotonic()
            # The hand-over goes on (its "released" sent) before the frees below: a checkpoint alone
            # was not enough (a batch runs its tasks in either order; the rig saw the frees first).
            await trio.sleep(0.01)
        for res in reversed(resources):
            # A connection that ended in order (the frontend closed, detach) leaves no journal;
            # cancelled (the service stopping): the frontend stays Connected and the journal
            # (all answered by now, if the drain finished) is the next process's to take over.
            res.remove_journal = self._connection_ending
            try:
                res.close()
            except Exception as e:
                errors.append(e)
        if hand_over:  # the guest's pause on an upgrade runs through here: say where it went
            log.info("%s: rings released for the next process in %.3f s (%d busy ring(s) drained in %.3f; "
                     "channels let go at %.3f, journals, mappings and data paths freed after)",
                     self.disk.name, time.monotonic() - started, len(busy), drained - started, let_go - started)
        self._workers = []
        self._resources = []
        self._serving = False
        self.let_go.set()
        if self._stopped is not None:
            self._stopped.set()
        if errors:
            raise errors[0]

    async def disconnect(self) -> None:
        """Stop taking requests, answer everything in flight, release the connection."""
        if not self._serving:
            return
        self._connection_ending = True
        for w in self._workers:
            w.stop()
        assert self._stopped is not None
        await self._stopped.wait()

    def close(self) -> None:
        """Free the storage. Call after serve() has returned."""
        if self._serving:
            raise RuntimeError("close() while serving: disconnect() first")
        self.unprepare()
        self.storage.close()


async def _open_in_thread(disk: DiskConfig, queues: int) -> StorageDevice:
    """open_storage() off the event loop: a vhost-user connect to a server that accepts but does not
    answer (frozen) blocks in libblkio. Cancelled meanwhile, the thread is abandoned and closes what
    it opens when it returns."""
    lock = threading.Lock()
    abandoned = False
    opened: list[StorageDevice] = []

    def run() -> StorageDevice:
        storage = open_storage(disk, queues)
        with lock:
            if abandoned:
                storage.close()
            else:
                opened.append(storage)
        return storage

    try:
        return await trio.to_thread.run_sync(run, abandon_on_cancel=True)
    except BaseException:
        with lock:
            abandoned = True
            for storage in opened:
                storage.close()
        raise
