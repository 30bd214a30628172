"""One backend device's xenbus life: probe, follow the frontend, connect, close, go.

This is Linux blkback's xenbus.c (xen_blkbk_probe, frontend_changed,
connect_ring, connect, xen_blkbk_remove) and the xenbus core around it
(xenbus_switch_state, xenbus_dev_fatal, xenbus_dev_remove), as one trio
task per backend dir:

    device = Device(xs, platform, DeviceId(0, "vbd", 5, 51712), resolve_disk, warnings=w)
    await nursery.start(device.run)   # started once the device is in InitWait (or failed)
    # returns when the device is forgotten: frontend gone, detached (online=0), dir removed

Probe: read the toolstack's nodes (frontend, frontend-id, mode, device-type,
discard-enable), find the disk's config (resolve_disk), open its storage
(a Vbd) and publish feature-max-indirect-segments, multi-queue-max-queues,
max-ring-page-order (and feature-persistent when offered) together with
state InitWait in one transaction: libxl gives the phy route 10 s to reach
InitWait, and the frontend must see the features when it does.

Then a single control loop wakes on the frontend's `state`, our own `state`
and `online` (watches), or once a second (RESIZE_POLL_INTERVAL: the online
resize check), re-reads the three nodes and, when they changed, acts as
on_frontend_state() decides. Decisions use the nodes' current values, so
the toolstack writing our state (detach writes Closing) counts as ours.

Errors are reported as xenbus_dev_fatal does: "<errno> <message>" in
/local/domain/<backend>/error/backend/<kind>/<domid>/<devid>/error (and, for
the frontend's and the operator's eyes, in the backend dir's own `error`),
and the device goes Closing. Errors a guest causes are logged through the shared
rate limiter (GuestWarnings), keyed by the guest's domid.

Ending: a frontend whose state node is gone (domain destroyed) or Closed
while online=0 (detach) makes the device forget itself, as does the removal
of our backend dir; cancellation (service shutdown) ends it too. In every
case the rings are drained (in-flight requests answered), unmapped and
unbound, and the storage closed, before run() returns; if the toolstack
left our state at Closing we write Closed on the way out, as
xenbus_dev_remove does, so libxl need not wait for its timeout. A service
shutdown writes nothing else: the frontend stays Connected and a backend
started later takes the device over (see service.py).

The operator (observability/control_commands.py, over the control socket)
may pause and resume the device (the vbd's quiesce: the snapshot hook; a
pause outlives reconnects and a reopened storage) and detach it: what the
toolstack's remove makes the backend do, started from our side (Closing,
the frontend closes, rings drained, storage released, Closed). The device
keeps its last error report (`last_error`) and its connection's spec
(`connection`) for `xenblk-vhost ctl list/status`.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from ..._groups import leaves
from ...blkif.constants import VDISK_CDROM
from ...config import DiskConfig
from ...vdev import vdev_name
from ...xen.interfaces import Platform, XenStore, XenStoreError
from ...xen.xenbus import XenbusState, parse_state
from ...xen.xenstore import XenStoreConnectionError
from ..contract import ConnectionSpec, OpenVbd, VbdConnectError, VbdDataplane
from .frontend_params import FrontendParamError, Offer, read_connection_spec
from .guest_warnings import GuestWarnings
from .state_machine import Action, on_frontend_state

log = logging.getLogger(__name__)

RESIZE_POLL_INTERVAL = 1.0
# The watches and the serve's failures wake the control loop, which then reads the three nodes (_step); a
# resize poll alone reads them only every this many (a safety net for a lost watch event): three xenstore
# round trips per disk per second cost the rig's TCG dom0 a visible share of a CPU with nothing happening.
RESTEP_EVERY = 10
# A device found Connected (a restart, a crash): how long its storage may refuse us before the
# device is failed. The guest's I/O waits meanwhile; failing it loses the guest its disk.
TAKEOVER_STORAGE_PATIENCE = 30.0
# How long the way out may take: draining the rings (Vbd's own bound is
# 5 s per ring) and a few xenstore writes.
RELEASE_TIMEOUT = 30.0

# Keys the Connected transaction may have written: removed first, so a
# reconnect with other features (config reloaded) leaves none stale.
_CONNECT_OPTIONAL_KEYS = ("feature-discard", "discard-granularity", "discard-alignment", "discard-secure")

ResolveDisk = Callable[[], Awaitable["DiskConfig | None"]]


@dataclass(frozen=True)
class DeviceId:
    """Where a device lives: /local/domain/<backend>/backend/<kind>/<frontend>/<devid>."""

    backend_domid: int
    kind: str  # vbd | vbd3 | qdisk
    frontend_domid: int
    devid: int

    @property
    def relative_path(self) -> str:
        """The xenbus nodename (relative to the backend domain's home)."""
        return f"backend/{self.kind}/{self.frontend_domid}/{self.devid}"

    @property
    def backend_path(self) -> str:
        return f"/local/domain/{self.backend_domid}/{self.relative_path}"

    @property
    def error_path(self) -> str:
        """Where xenbus_dev_error writes: error/<nodename>/error under our home."""
        return f"/local/domain/{self.backend_domid}/error/{self.relative_path}/error"

    def __str__(self) -> str:
        # blkback names its devices the same way (vbd-<domid>-<devid>).
        return f"{self.kind}-{self.frontend_domid}-{self.devid}"


class DeviceFatal(Exception):
    """A condition to report through the error node before going Closing."""

    def __init__(self, err: int, message: str, *, guest: bool) -> None:
        super().__init__(message)
        self.errno = err
        self.message = message
        self.guest = guest  # the guest caused it: rate-limit the log line


@dataclass(frozen=True)
class ErrorReport:
    """The last error a device reported (as written to xenstore), and when (wall clock)."""

    message: str
    at: float


@dataclass(frozen=True)
class ToolstackNodes:
    """What libxl wrote in our backend dir that we act on."""

    frontend: str
    frontend_id: int
    params: str  # the xl disk line's target: informational, the YAML file decides
    mode: str
    cdrom: bool
    discard_enable: bool


def effective_disk(disk: DiskConfig, nodes: ToolstackNodes) -> DiskConfig:
    """The config as this attachment may use it.

    Read-only unless libxl's mode has 'w' (blkback: !strchr(mode, 'w')); a
    config `readonly: true` wins either way. Discard only if the toolstack
    did not disable it (discard-enable=0, as libxl writes for read-only
    disks by default) and the config allows it.
    """
    readonly = disk.readonly or "w" not in nodes.mode
    discard = disk.discard and nodes.discard_enable
    if readonly == disk.readonly and discard == disk.discard:
        return disk
    return dataclasses.replace(disk, readonly=readonly, discard=discard)


def default_open_vbd(disk: DiskConfig) -> VbdDataplane:
    """create, in this process: the datapath's Vbd (the only datapath module the control plane names)."""
    from ..datapath.vbd import Vbd

    return Vbd.open(disk)


def journaled_open_vbd(journal_dir: Path) -> OpenVbd:
    """create, as default_open_vbd, with each ring's in-flight journal kept in journal_dir."""

    def open_vbd(disk: DiskConfig) -> VbdDataplane:
        from ..datapath.vbd import Vbd

        return Vbd.open(disk, journal_dir=journal_dir)

    return open_vbd


def next_tick(now: float, interval: float) -> float:
    """The first multiple of interval after now: every device's resize poll wakes on the same ticks of
    trio's clock, so the service's loop wakes once a tick for all of them (each wake-up of its own cost the
    rig's TCG dom0 milliseconds of Python: with four disks, four a second)."""
    return (math.floor(now / interval) + 1) * interval


class _Wakeup:
    """A level-triggered flag: any number of set() before wait() is one wakeup."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait_until(self, deadline: float) -> bool:
        """True if set() woke it, False if trio's clock reached deadline first."""
        fired = False
        with trio.move_on_at(deadline):
            await self._event.wait()
            fired = True
        self._event = trio.Event()
        return fired


class Device:
    def __init__(self, xs: XenStore, platform: Platform, device_id: DeviceId, resolve_disk: ResolveDisk, *,
                 warnings: GuestWarnings, open_vbd: OpenVbd = default_open_vbd,
                 resize_interval: float = RESIZE_POLL_INTERVAL, domain: str | None = None,
                 hold: trio.Event | None = None, storage_in_use: frozenset[str] | None = None) -> None:
        self.id = device_id
        self.domain = domain  # the domain's name (None: unknown), for the operator
        self._xs = xs
        self._platform = platform
        self._resolve_disk = resolve_disk
        self._warnings = warnings
        self._open_vbd = open_vbd
        self._resize_interval = resize_interval
        self.name = str(device_id)
        self.be = device_id.backend_path
        self.nodes: ToolstackNodes | None = None
        self.disk: DiskConfig | None = None  # the config in use (before effective_disk)
        self.vbd: VbdDataplane | None = None
        self.state = XenbusState.UNKNOWN  # our state as we last wrote or saw it
        self.published_sectors: int | None = None
        self._serve_nursery: trio.Nursery | None = None  # where the datapath's serve() runs
        self._serve_failed: BaseException | None = None
        self._seen: tuple | None = None
        self._wakeup = _Wakeup()
        self.last_error: ErrorReport | None = None
        self.connection: ConnectionSpec | None = None  # what the frontend connected with, while it is
        self._operator = trio.Lock()  # one pause, resume or detach at a time
        self._paused = False  # by the operator: applied to every vbd this device opens
        self._detaching = False  # by the operator: release the storage once Closed
        self._state_changed = trio.Event()
        self.ended = trio.Event()
        # A takeover from a daemon still serving (upgrade): until `hold` is set, only what writes
        # nothing and takes nothing from it (prepare_takeover); `prepared` is set once that is done.
        # storage_in_use: the storage it holds (a vhost-user export takes one client).
        self._hold = hold
        self._storage_in_use = storage_in_use
        self.prepared = trio.Event()
        self.settled = trio.Event()  # probed: taken over, InitWait, or failed
        self.let_go = trio.Event()  # stopping: the rings and the storage released (xenstore aside)
        self._prepared_spec: ConnectionSpec | None = None
        self._prepared_sectors: bytes | None = None  # our `sectors` node, read with the prepared spec
        self.storage_path: str | None = None  # what the vbd opened (a vhost-user disk: path or handover_path)
        self._opened_early = False
        self.storage_may_stay = False

    # ------------------------------------------------------------------ life

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Probe, follow the frontend until the device is forgotten, release everything."""
        forgotten = False
        try:
            async with trio.open_nursery() as nursery:
                self._serve_nursery = nursery
                await self._probe()
                self.settled.set()
                task_status.started()
                if self.nodes is not None:  # else: reported; nothing to follow
                    await self._follow()
                    forgotten = True
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(RELEASE_TIMEOUT) as scope:
                    await self._release(forgotten)
                if scope.cancelled_caught:
                    log.error("%s: releasing took longer than %.0f s; gave up waiting", self.name, RELEASE_TIMEOUT)
            self.prepared.set()
            self.settled.set()
            self.let_go.set()
            self.ended.set()

    async def _probe(self) -> None:
        """xen_blkbk_probe + backend_changed: storage open and features out, then InitWait."""
        if self._hold is not None and not self._hold.is_set():
            await self._prepare_then_wait(self._hold)
        self.prepared.set()
        if self._prepared_spec is not None:
            # Prepared, and our state node untouched since (still Connected): nothing to read again.
            started = trio.current_time()
            if await self._take_over_live_rings(prepared=True):
                log.info("%s: takeover took %.3f s after the release (storage, connection and ring pages "
                         "prepared before it)", self.name, trio.current_time() - started)
                await self._rm_error_report()  # a previous device's report, not ours
                return
            self._unprepare()  # the usual way from here: everything read again
        await self._rm_error_report()  # a previous device's report, not ours
        started = trio.current_time()
        try:
            if self.nodes is None:
                self.nodes = await self._read_toolstack_nodes()
            else:  # read while preparing; our state may have moved since
                self.state = parse_state(await self._read(f"{self.be}/state"))
            if self.state == XenbusState.CONNECTED:
                await self._open_patiently()
            else:
                await self._open()
        except DeviceFatal as e:
            self._unprepare()
            await self._fatal(e)
            return
        opened = trio.current_time()
        if self.state == XenbusState.CONNECTED and await self._take_over_live_rings():
            # On an upgrade this is the guest's pause after the old daemon's drain: say where it went.
            log.info("%s: takeover took %.3f s (storage opened %.3f%s, rings taken over %.3f)", self.name,
                     trio.current_time() - started, opened - started,
                     " (before the release)" if self._opened_early else "", trio.current_time() - opened)
            return
        self._unprepare()
        await self._switch_state(XenbusState.INIT_WAIT, extra=self._probe_nodes(), unless_closing=True)

    async def _prepare_then_wait(self, hold: trio.Event) -> None:
        """_prepare_takeover, then wait for the release. The connection prepared is used only if our
        state node was not written meanwhile: a frontend that reconnected to the running daemon did so
        through InitWait and Connected (two writes; the watch's first event is its registration), and
        its new rings are read again after the release."""
        writes = 0
        async with self._xs.watch(f"{self.be}/state") as events:
            async with trio.open_nursery() as watching:
                async def count() -> None:
                    nonlocal writes
                    async for _ in events:
                        writes += 1

                watching.start_soon(count)
                await self._prepare_takeover()
                self.prepared.set()
                await hold.wait()
                watching.cancel_scope.cancel()
        if writes > 1 and self._prepared_spec is not None:
            log.info("%s: our state changed while the running daemon served; reading the connection again",
                     self.name)
            self._unprepare()

    async def _prepare_takeover(self) -> None:
        """While the daemon we take over from still serves: everything of a takeover that writes
        nothing and takes nothing from it: the toolstack's and the frontend's nodes read, the storage
        opened when that can be done twice (a file; a vhost-user export it does not use), the rings
        mapped and the data paths made (Vbd.prepare). Never fails: what is not done here is done
        after the release, as for a crash."""
        t0 = trio.current_time()
        try:
            self.nodes = await self._read_toolstack_nodes()
            if self.state != XenbusState.CONNECTED:
                return
            disk = await self._resolve_disk()
            if disk is None or not self._may_open_early(disk):
                return
            frontend = parse_state(await self._read(f"{self.nodes.frontend}/state", unreadable_is_absent=True))
            if frontend != XenbusState.CONNECTED:
                return
            await self._open()
            self._opened_early = True
            opened = trio.current_time()
            assert self.vbd is not None
            f = self.vbd.features
            offer = Offer(max_queues=f.max_queues, max_ring_page_order=f.max_ring_page_order,
                          persistent=f.persistent)
            spec = await read_connection_spec(self._xs, self.nodes.frontend, self.id.frontend_domid, offer)
            self._prepared_sectors = await self._read(f"{self.be}/sectors")
            self.vbd.prepare(spec, self._platform)
            self._prepared_spec = spec
            log.info("%s: takeover prepared while the running daemon serves, in %.3f s (storage %s opened %.3f, "
                     "rings mapped %.3f)", self.name, trio.current_time() - t0, self.storage_path, opened - t0,
                     trio.current_time() - opened)
        except XenStoreConnectionError:
            raise
        except (DeviceFatal, FrontendParamError, Exception) as e:
            # Not the device's failure: the takeover does it after the release, and reports there.
            log.info("%s: takeover not prepared (%s); done after the release", self.name,
                     getattr(e, "message", None) or e)
            self._unprepare()

    def _may_open_early(self, disk: DiskConfig) -> bool:
        """Whether the storage may be opened while the running daemon holds it: a file or block device
        (io_uring) can be opened twice; a vhost-user export takes one client, so only an export the
        running daemon does not use (its handover_path, say); vdpa and vfio devices are exclusive."""
        if disk.driver in ("io_uring", "nvme-io_uring"):
            return True
        # A connect to an export in use does not fail: it waits until that client lets go, and the
        # running daemon lets go only once we are ready. So only when that daemon said what it holds
        # and the operator named a second export.
        if disk.driver == "virtio-blk-vhost-user" and self._storage_in_use is not None and disk.handover_path:
            return self._storage_choice(disk).path not in self._storage_in_use
        return False

    def _storage_choice(self, disk: DiskConfig) -> DiskConfig:
        """A vhost-user disk with a handover_path: the export the running daemon does not use (path
        first). Without one we take over from (a crash, a restart), or without a second export: path."""
        busy = self._storage_in_use
        if disk.handover_path is None or busy is None or disk.path not in busy:
            return disk
        return dataclasses.replace(disk, path=disk.handover_path, handover_path=disk.path)

    def _unprepare(self) -> None:
        self._prepared_spec = None
        if self.vbd is not None:
            try:
                self.vbd.unprepare()
            except Exception as e:
                log.error("%s: releasing the prepared takeover: %s", self.name, e)

    async def _take_over_live_rings(self, *, prepared: bool = False) -> bool:
        """A device left Connected by the process before us, its frontend Connected: serve its rings
        where they stand and write nothing (blkfront runs its connect path again on every
        Connected it is shown; from its error state that path is a kernel BUG). The rings are
        taken over from their journals when there are (ring_journal.py). False: not possible
        (the frontend is elsewhere, or its nodes do not describe a connection we can serve):
        the usual InitWait round trip then."""
        assert self.nodes is not None and self.vbd is not None
        if not prepared:  # (prepared: read before the release; a change since is the control loop's to follow)
            frontend = parse_state(await self._read(f"{self.nodes.frontend}/state", unreadable_is_absent=True))
            if frontend != XenbusState.CONNECTED:
                return False
        f = self.vbd.features
        offer = Offer(max_queues=f.max_queues, max_ring_page_order=f.max_ring_page_order, persistent=f.persistent)
        spec = self._prepared_spec  # read before the release (Vbd.prepare mapped its rings)
        if spec is None:
            try:
                spec = await read_connection_spec(self._xs, self.nodes.frontend, self.id.frontend_domid, offer)
            except FrontendParamError as e:
                log.warning("%s: cannot take the live connection over (%s); connecting again", self.name,
                            e.message)
                return False
        sectors_raw = self._prepared_sectors if prepared else await self._read(f"{self.be}/sectors")
        try:
            published = int(sectors_raw.rstrip(b"\0")) if sectors_raw is not None else None
        except ValueError:
            published = None
        assert self._serve_nursery is not None
        try:
            await self._serve_nursery.start(self._serve, spec)
        except Exception as e:
            log.warning("%s: cannot take the live connection over (%s); connecting again", self.name, e)
            return False
        self.connection = spec
        if published is not None and published != self.vbd.sectors:
            self.vbd.apply_size(published)  # what the frontend was told; the resize check goes on from there
        self.published_sectors = published
        self._seen = None
        log.info("%s: took the live connection over (%d queues, protocol %s); state left Connected",
                 self.name, len(spec.rings), spec.abi.value)
        return True

    async def _open(self) -> None:
        """Find the disk's config and open its storage (replacing an older one)."""
        disk = await self._resolve_disk()
        if disk is None:
            raise DeviceFatal(errno.ENODEV, f"no disk configured for this domain as "
                                            f"{vdev_name(self.id.devid)} (device {self.id.devid})", guest=False)
        assert self.nodes is not None
        if self.vbd is not None:
            if disk == self.disk:
                return
            log.info("%s: configuration changed; reopening %s", self.name, disk.path)
            self._close_vbd()
        storage = self._storage_choice(effective_disk(disk, self.nodes))
        try:
            self.vbd = self._open_vbd(storage)
        except Exception as e:
            raise DeviceFatal(getattr(e, "errno", None) or errno.EIO,
                              f"creating vbd structure: {e}", guest=False) from e
        self.disk = disk
        self.storage_path = storage.path
        # The next daemon does not need this storage closed to open its own: a file, or a vhost-user
        # disk with a second export (it takes the one we do not use).
        self.storage_may_stay = disk.driver in ("io_uring", "nvme-io_uring") or (
            disk.driver == "virtio-blk-vhost-user" and disk.handover_path is not None)
        if self._paused:
            await self.vbd.pause()  # not serving yet: at once; its first connection starts paused
        f = self.vbd.features
        log.info("%s: %s %s (params %r, mode %s): %d sectors of %d bytes%s, %d queues, ring order %d, "
                 "%d indirect segments, %s path%s", self.name, disk.driver, storage.path, self.nodes.params,
                 self.nodes.mode, f.sectors, f.sector_size, " ro" if f.read_only else "",
                 f.max_queues, f.max_ring_page_order, f.max_indirect_segments, f.data_path,
                 ", persistent grants" if f.persistent else "")

    async def _open_patiently(self) -> None:
        """_open for a device a previous process left Connected: the guest's disk is live and waits
        for us, so a storage that refuses us for a while (a vhost-user storage daemon still ending
        the dead process's session refuses connections) is tried again, for up to
        TAKEOVER_STORAGE_PATIENCE seconds, before the device is failed (Closing: the guest loses it)."""
        deadline = trio.current_time() + TAKEOVER_STORAGE_PATIENCE
        delay = 0.02
        while True:
            try:
                await self._open()
                return
            except DeviceFatal as e:
                if e.errno == errno.ENODEV or trio.current_time() + delay > deadline:
                    raise
                if delay == 0.02:
                    log.warning("%s: storage not available for the takeover (%s); trying again for up to %.0f s",
                                self.name, e.message, TAKEOVER_STORAGE_PATIENCE)
                await trio.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _probe_nodes(self) -> dict[str, str]:
        assert self.vbd is not None
        nodes = self.vbd.features.probe_nodes()
        if self.vbd.features.persistent:
            nodes["feature-persistent"] = "1"
        return nodes

    async def _read_toolstack_nodes(self) -> ToolstackNodes:
        async def need(key: str) -> str:
            raw = await self._read(f"{self.be}/{key}")
            if raw is None:
                raise DeviceFatal(errno.ENOENT, f"reading {self.be}/{key}", guest=False)
            return raw.decode("utf-8", "replace").rstrip("\0")

        frontend = await need("frontend")
        try:
            frontend_id = int(await need("frontend-id"))
        except ValueError:
            raise DeviceFatal(errno.EINVAL, f"reading {self.be}/frontend-id: not a number", guest=False) from None
        if frontend_id != self.id.frontend_domid:
            raise DeviceFatal(errno.EINVAL, f"frontend-id {frontend_id} does not match the backend path",
                              guest=False)
        mode = await need("mode")
        params = await self._read(f"{self.be}/params")
        self.state = parse_state(await self._read(f"{self.be}/state"))
        device_type = await self._read(f"{self.be}/device-type")
        discard_enable = await self._read(f"{self.be}/discard-enable")
        return ToolstackNodes(
            frontend=frontend,
            frontend_id=frontend_id,
            params=params.decode("utf-8", "replace").rstrip("\0") if params is not None else "",
            mode=mode,
            # blkback reads device-type from the frontend; the toolstack writes
            # the same value on both sides and ours is not the guest's to change.
            cdrom=device_type is not None and device_type.rstrip(b"\0") == b"cdrom",
            # blkback: xenbus_read_unsigned(nodename, "discard-enable", 1)
            discard_enable=discard_enable is None or discard_enable.rstrip(b"\0").strip() != b"0",
        )

    async def _follow(self) -> None:
        """The control loop: watches wake it, the resize poll times it out."""
        assert self.nodes is not None
        fe_state = f"{self.nodes.frontend}/state"
        async with trio.open_nursery() as watchers:
            for path in (fe_state, f"{self.be}/state", f"{self.be}/online"):
                await watchers.start(self._forward_watch, path)
            quiet = 0  # resize polls in a row that no watch or failure interrupted
            while True:
                if quiet % RESTEP_EVERY == 0 and await self._step(fe_state):
                    break
                await self._check_resize()
                tick = next_tick(trio.current_time(), self._resize_interval)
                quiet = 0 if await self._wakeup.wait_until(tick) else quiet + 1
            watchers.cancel_scope.cancel()

    async def _forward_watch(self, path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with self._xs.watch(path) as events:
            task_status.started()
            async for _ in events:
                self._wakeup.set()

    async def _step(self, fe_state_path: str) -> bool:
        """Look at the three nodes, act if they changed. True: the device is done."""
        if self._serve_failed is not None:
            failure, self._serve_failed = self._serve_failed, None
            await self._disconnect()
            await self._fatal(DeviceFatal(errno.EIO, f"serving the rings: {failure}", guest=False))
        be_raw = await self._read(f"{self.be}/state")
        if be_raw is None:
            log.info("%s: backend dir removed", self.name)
            return True
        frontend = parse_state(await self._read(fe_state_path, unreadable_is_absent=True))
        backend = parse_state(be_raw)
        online = await self._online()
        if backend != self.state:
            log.info("%s: %s -> %s (written by the toolstack)", self.name, self.state.label,
                     backend.label)
            self.state = backend
        seen = (frontend, backend, online)
        if seen == self._seen:
            return False
        previous, self._seen = self._seen, seen
        action = on_frontend_state(frontend, backend, online)
        if action is Action.FATAL and previous is not None and previous[0] == frontend:
            return False  # reported when the frontend got there; our own Closing is no news
        log.debug("%s: frontend %s, backend %s, online %s: %s", self.name, frontend.name, backend.name,
                  online, action.name)
        if action is Action.NOTHING:
            return False
        if action is Action.INIT_WAIT:
            log.info("%s: frontend reconnecting", self.name)
            await self._reprobe()
        elif action is Action.CONNECT:
            await self._connect()
        elif action is Action.CLOSING:
            await self._switch_state(XenbusState.CLOSING)
        elif action is Action.CLOSE:
            await self._disconnect()
            if self._detaching:  # the operator's detach: the storage goes too
                self._close_vbd()
                self._detaching = False
                log.info("%s: detached by the operator; storage released", self.name)
            await self._switch_state(XenbusState.CLOSED)
        elif action is Action.CLOSE_AND_REMOVE:
            await self._disconnect()
            await self._switch_state(XenbusState.CLOSED)
            log.info("%s: detached", self.name)
            return True
        elif action is Action.REMOVE:
            log.info("%s: frontend gone", self.name)
            return True
        elif action is Action.FATAL:
            await self._fatal(DeviceFatal(errno.EINVAL, f"saw state {int(frontend)} at frontend", guest=True))
        return False

    async def _reprobe(self) -> None:
        """Frontend back in Initialising after we closed: InitWait again, with the
        current configuration (a reload takes effect here)."""
        try:
            await self._open()
        except DeviceFatal as e:
            await self._fatal(e)
            return
        await self._rm_error_report()  # the last connection's failure is history now
        await self._switch_state(XenbusState.INIT_WAIT, extra=self._probe_nodes())

    # ------------------------------------------------------------------ connect

    async def _connect(self) -> None:
        """frontend_changed's Initialised/Connected case: connect_ring, then connect()."""
        if self.vbd is None:
            return  # the probe failed and said so; nothing to connect to
        # "Enforce precondition before potential leak point" (blkback).
        await self._disconnect()
        f = self.vbd.features
        offer = Offer(max_queues=f.max_queues, max_ring_page_order=f.max_ring_page_order, persistent=f.persistent)
        assert self.nodes is not None
        try:
            spec = await read_connection_spec(self._xs, self.nodes.frontend, self.id.frontend_domid, offer)
        except FrontendParamError as e:
            await self._fatal(DeviceFatal(e.errno, e.message, guest=True))
            return
        assert self._serve_nursery is not None  # set by run() before anything else
        try:
            await self._serve_nursery.start(self._serve, spec)
        except VbdConnectError as e:
            ports = ",".join(str(r.event_channel) for r in spec.rings)
            await self._fatal(DeviceFatal(errno.EINVAL, f"mapping ring-ref port {ports}: {e}", guest=True))
            return
        except Exception as e:  # ours, not the guest's: e.g. the storage could not be reopened
            await self._fatal(DeviceFatal(getattr(e, "errno", None) or errno.EIO, f"connecting: {e}", guest=False))
            return
        self.connection = spec
        self._warnings.log(logging.INFO, ("connect", self.id.frontend_domid), "%s: using %d queues, protocol %s%s",
                           self.name, len(spec.rings), spec.abi.value,
                           ", persistent grants" if spec.persistent_grants else "")
        if not await self._publish_connected():
            await self._disconnect()

    async def _serve(self, spec: ConnectionSpec, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                     ) -> None:
        """The datapath's serve (start), with a failure after start turned into a fatal by the control loop."""
        vbd = self.vbd
        assert vbd is not None  # _connect checked
        started = False

        def started_now(value=None) -> None:
            nonlocal started
            started = True
            task_status.started(value)

        status = _StartedHook(started_now)
        try:
            await vbd.serve(spec, self._platform, task_status=status)
        except Exception as e:
            if not started:
                raise
            # Named by what went wrong (not "Exceptions from Trio nursery"); the traceback logged,
            # for a failure here is a bug or a storage fault the operator must be able to place.
            cause = next((x for x in leaves(e) if not isinstance(x, trio.Cancelled)), e)
            log.error("%s: datapath failed: %s", self.name, cause, exc_info=cause)
            self._serve_failed = cause
            self._wakeup.set()

    async def _publish_connected(self) -> bool:
        """connect(): the device's properties and state Connected in ONE transaction.

        Nothing is written if our state node is gone or the toolstack has
        meanwhile asked us to close (Closing/Closed): False then.
        """
        assert self.vbd is not None and self.nodes is not None
        sectors = self.vbd.current_sectors()
        if sectors != self.vbd.sectors:
            self.vbd.apply_size(sectors)
        nodes = self.vbd.features.connect_nodes(sectors)
        if self.nodes.cdrom:
            nodes["info"] = str(int(nodes["info"]) | VDISK_CDROM)
        if not self.nodes.discard_enable:
            # blkback writes no discard key at all when the toolstack disabled it.
            nodes.pop("feature-discard", None)

        async def body(t) -> bool:
            current = await self._read(f"{self.be}/state", t)
            if current is None or parse_state(current) in (XenbusState.CLOSING, XenbusState.CLOSED):
                return False
            for key in _CONNECT_OPTIONAL_KEYS:
                if key not in nodes:
                    await t.rm(f"{self.be}/{key}")
            for key, value in nodes.items():
                await t.write(f"{self.be}/{key}", value)
            await t.write(f"{self.be}/state", str(int(XenbusState.CONNECTED)))
            return True

        if not await self._xs.transact(body):
            log.info("%s: not publishing Connected: the device is closing or gone", self.name)
            return False
        self.published_sectors = sectors
        self._note_state(XenbusState.CONNECTED)
        return True

    async def _check_resize(self) -> None:
        """Online resize: a new size is published with a state rewrite (=4) in one
        transaction, which fires the frontend's watch (blkfront revalidates)."""
        vbd = self.vbd
        if vbd is None or not vbd.serving or self.published_sectors is None:
            return
        try:
            sectors = vbd.current_sectors()
        except Exception as e:  # a storage that cannot say its size keeps the old one
            log.debug("%s: reading capacity failed: %s", self.name, e)
            return
        if sectors == self.published_sectors:
            return
        # Validate against the storage's real size at once (a shrunk disk must not
        # take requests past its new end while the frontend is being told).
        vbd.apply_size(sectors)

        async def body(t) -> bool:
            current = await self._read(f"{self.be}/state", t)
            if current is None or parse_state(current) != XenbusState.CONNECTED:
                return False
            await t.write(f"{self.be}/sectors", str(sectors))
            await t.write(f"{self.be}/state", str(int(XenbusState.CONNECTED)))
            return True

        if await self._xs.transact(body):
            log.info("%s: resized from %d to %d sectors", self.name, self.published_sectors, sectors)
            self.published_sectors = sectors

    # ------------------------------------------------------------------ state, errors

    async def _switch_state(self, state: XenbusState, *, extra: dict[str, str] | None = None,
                            unless_closing: bool = False) -> bool:
        """xenbus_switch_state: write `state` (and `extra` keys) in one transaction,
        only if our state node still exists; no write if it already holds `state`.
        unless_closing: nor if the toolstack has set Closing/Closed meanwhile (a
        device detached while we probed it must not be brought back to life)."""
        extra = extra or {}

        async def body(t) -> bool:
            current = await self._read(f"{self.be}/state", t)
            if current is None:
                return False
            if unless_closing and parse_state(current) in (XenbusState.CLOSING, XenbusState.CLOSED):
                return False
            for key, value in extra.items():
                await t.write(f"{self.be}/{key}", value)
            if parse_state(current) != state or extra:
                await t.write(f"{self.be}/state", str(int(state)))
            return True

        if not await self._xs.transact(body):
            log.debug("%s: state node gone; not switching to %s", self.name, state.name)
            return False
        self._note_state(state)
        return True

    def _note_state(self, state: XenbusState) -> None:
        if state != self.state:
            log.info("%s: %s -> %s", self.name, self.state.label, state.label)
            self._state_changed.set()
            self._state_changed = trio.Event()
        self.state = state

    async def _fatal(self, e: DeviceFatal) -> None:
        """xenbus_dev_fatal: the error report, a log line, then Closing.

        The report goes where xenbus_dev_error puts it (error/<nodename>/error
        under our home) and, as well, to `error` in the backend dir itself,
        where the frontend (and an operator listing the device) can read it.
        """
        text = f"{e.errno} {e.message}"
        self.last_error = ErrorReport(text, time.time())
        if e.guest:
            self._warnings.warn(self.id.frontend_domid, "%s: %s", self.name, text)
        else:
            log.error("%s: %s", self.name, text)
        try:
            await self._xs.write(self.id.error_path, text)

            async def beside_the_device(t) -> None:
                if await self._read(f"{self.be}/state", t) is not None:  # not re-creating a removed dir
                    await t.write(f"{self.be}/error", text)

            await self._xs.transact(beside_the_device)
        except XenStoreError as err:
            log.error("%s: failed to write the error report (%s)", self.name, err)
        await self._switch_state(XenbusState.CLOSING)

    # ------------------------------------------------------------------ the operator's requests

    @property
    def paused(self) -> bool:
        return self._paused

    async def pause(self) -> None:
        """The snapshot hook: take no new request, return once none is in flight (the vbd's
        pause, backend/contract.py). Kept across reconnects until resume(). Cancelled (the
        caller's deadline): not paused."""
        async with self._operator:
            self._paused = True
            try:
                if self.vbd is not None:  # else: the vbd opened next starts paused (_open)
                    await self.vbd.pause()
            except BaseException:
                self._paused = False
                raise
            log.info("%s: paused by the operator", self.name)

    async def resume(self) -> None:
        async with self._operator:
            self._paused = False
            if self.vbd is not None:
                self.vbd.resume()
            log.info("%s: resumed by the operator", self.name)

    async def detach(self) -> None:
        """What the toolstack's remove makes the backend do, from our side: Closing; once the
        frontend has closed, the rings drained and unmapped, the storage released, Closed.
        Returns once Closed (or the device ended). The toolstack's nodes stay: `xl block-detach`
        (or the domain's end) removes them, and a frontend that starts over is served again."""
        async with self._operator:
            if self.state == XenbusState.CLOSED:
                self._close_vbd()
                return
            self._detaching = True
            log.info("%s: detach asked by the operator", self.name)
            if not await self._switch_state(XenbusState.CLOSING):
                return  # our state node is gone: the device is being removed anyway
            self._wakeup.set()
            while self.state != XenbusState.CLOSED and not self.ended.is_set():
                changed = self._state_changed
                with trio.move_on_after(1.0):  # the device may end without a state change
                    await changed.wait()

    # ------------------------------------------------------------------ release

    async def _disconnect(self) -> None:
        if self.vbd is not None and self.vbd.serving:
            self._log_served(self.vbd.stats()["total"])
            await self.vbd.disconnect()
        self.published_sectors = None
        self.connection = None

    def _log_served(self, t: dict) -> None:
        """What the connection ending did, in one line (the counters restart with the next one)."""
        served = t["rd_req"] + t["wr_req"] + t["f_req"] + t["ds_req"]
        engine = t.get("engine_req", 0)
        calls = t.get("engine_syscalls", 0)
        log.info("%s: the connection served %d requests (%d reads, %d writes, %d flushes, %d discards; %d errors); "
                 "the ring engine took %d of them, %d in its own poll, which came back to Python %d times; it made "
                 "%d kernel calls (%.2f a request), %d of them sleeps; %d persistent grants mapped, %d of its %d "
                 "grant-copy segments copied from them", self.name,
                 served, t["rd_req"], t["wr_req"], t["f_req"], t["ds_req"], t["errors"], engine,
                 t.get("poll_req", 0), t.get("poll_returns", 0), calls, calls / engine if engine else 0.0,
                 t.get("engine_sleeps", 0), t.get("persistent_grants", 0), t.get("copy_segs_mapped", 0),
                 t.get("copy_segs_mapped", 0) + t.get("copy_segs_xen", 0))

    def _close_vbd(self) -> None:
        vbd, self.vbd = self.vbd, None
        if vbd is not None:
            try:
                vbd.close()
            except Exception as e:
                log.error("%s: closing the storage: %s", self.name, e)

    async def _release(self, forgotten: bool) -> None:
        """Everything back: rings drained and freed, storage closed; then, as
        xenbus_dev_remove, Closed if the toolstack left us at Closing. A device
        forgotten (not merely stopped with the service) takes its error report
        along: nobody is left to read it, and error/ would only grow."""
        started = trio.current_time()
        had_vbd = self.vbd is not None
        try:
            await self._disconnect()
        except Exception as e:
            log.error("%s: disconnecting: %s", self.name, e)
        disconnected = trio.current_time()
        self._close_vbd()
        self.let_go.set()  # rings and storage released: a daemon taking over may start now
        if had_vbd and not forgotten:  # the service stopping (upgrade, restart): part of the guest's pause
            log.info("%s: released in %.3f s (rings %.3f, storage closed %.3f)", self.name,
                     trio.current_time() - started, disconnected - started, trio.current_time() - disconnected)
        try:
            raw = await self._read(f"{self.be}/state")
            if raw is not None and parse_state(raw) == XenbusState.CLOSING:
                await self._switch_state(XenbusState.CLOSED)
            if forgotten or raw is None:
                await self._rm_error_report()
        except (XenStoreError, ConnectionError) as e:
            log.debug("%s: xenstore unavailable on the way out: %s", self.name, e)

    # ------------------------------------------------------------------ xenstore helpers

    async def _read(self, path: str, t=None, *, unreadable_is_absent: bool = False) -> bytes | None:
        """A node's value or None if absent. unreadable_is_absent: EACCES too, for
        the guest's nodes (it may deny us its state: xenbus reads that as Unknown)."""
        try:
            return await (t or self._xs).read(path)
        except XenStoreError as e:
            if e.errno == errno.ENOENT or (unreadable_is_absent and e.errno == errno.EACCES):
                return None
            raise

    async def _online(self) -> bool:
        # xenbus_dev_is_online: xenbus_read_unsigned(nodename, "online", 0) != 0
        raw = await self._read(f"{self.be}/online")
        if raw is None:
            return False
        text = raw.rstrip(b"\0").strip()
        return text.isdigit() and int(text) != 0

    async def _rm_error_report(self) -> None:
        """Both reports: `error` in the backend dir, and our dir under error/ with
        the parents it leaves empty (as libxl's path cleanup)."""
        await self._rm_quietly(f"{self.be}/error")
        home = f"/local/domain/{self.id.backend_domid}/error"
        path = f"{home}/{self.id.relative_path}"
        if await self._read(path) is None:
            return
        await self._rm_quietly(path)
        try:
            while True:
                path = path.rsplit("/", 1)[0]
                if path == home or await self._xs.directory(path):
                    return
                await self._rm_quietly(path)
        except XenStoreError as e:
            if e.errno != errno.ENOENT:  # another device's cleanup got there first
                raise

    async def _rm_quietly(self, path: str) -> None:
        try:
            await self._xs.rm(path)
        except XenStoreError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES):
                log.debug("%s: removing %s: %s", self.name, path, e)


class _StartedHook:
    """A task_status whose started() tells us too (to know when the datapath is serving)."""

    def __init__(self, on_started: Callable[[object], None]) -> None:
        self._on_started = on_started

    def started(self, value: object = None) -> None:
        self._on_started(value)


__all__ = ["Device", "DeviceId", "DeviceFatal", "ErrorReport", "ToolstackNodes", "effective_disk", "journaled_open_vbd",
           "RESIZE_POLL_INTERVAL"]
