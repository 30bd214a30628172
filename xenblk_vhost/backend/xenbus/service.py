"""The service: find the devices of the configured domains and run one Device task each.

    async with open_xenstore(path) as xs:
        service = Service(xs, platform, configs)                # backend/vbd and backend/vbd3
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            ...
            service.reload(new_configs)       # SIGHUP: applied at each device's next connect
            nursery.cancel_scope.cancel()     # shutdown: every device drained and released

Where devices are: /local/domain/<backend>/backend/<kind>/<domid>/<devid>,
<backend> being our own domid (the `domid` node of our xenstore home; 0 if
there is none), <kind> one of `kinds`: `vbd` (backendtype=phy), `vbd3`
(backendtype=tap, Xen >= 4.19), `qdisk` (the device-model route, served by
the qemu-dm shim, one domain per process). One watch per kind; an event
names the (kind, domid) to look at again, except events below a device that
is already running (its own task follows those).

Which domains: a domain is ours when a DomainConfig matches it, by domid or
by the name in /local/domain/<domid>/name, read when its devices appear. A
rebooted guest comes back under a new domid with the same name and is
served again; domains nobody configured are left alone (another backend
may own them). A device of a configured domain whose vdev has no disk in
the config gets a Device anyway, which reports the error to the toolstack.

Which dirs start a Device (xenbus_probe_node's rule, plus takeover):
  - state Initialising (1): a new device;
  - state InitWait..Connected (2-4) seen for the first time: a device a
    previous backend process served (restart, upgrade): taken over, the
    frontend's rings re-attached where they stood (blkback's unbind/bind);
  - Closing/Closed or no state: being torn down, left alone;
  - a dir whose Device already ended starts again only from Initialising
    (the toolstack re-created it).

A Device failing is logged and forgotten (its last error report is kept
for the operator, by domain and vdev: `last_errors`); the service keeps
serving the others. Losing the connection to xenstored is not a device's
failure: it ends run() with XenStoreConnectionError (nothing can be served
without xenstore; the entry point exits so that the service manager starts
a new daemon, which takes the devices over).

Cancelling run() (shutdown) cancels every Device, each of which drains and
releases its rings and storage before run() returns; the xenstore state is
left as it was, so guests see their disks pause, not vanish, until a
backend takes them over again.

Each device's task carries its domain, vdev and device name as log fields
(log_context), so every line it or its rings log can be told apart in the
journal by DOMAIN= and VDEV=.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import trio

from ... import log_context
from ...config import DiskConfig, DomainConfig, describe_changes
from ...vdev import vdev_name
from ...xen.interfaces import Platform, XenStore, XenStoreError
from ...xen.xenbus import XenbusState, parse_state
from ...xen.xenstore import XenStoreConnectionError, read_or_none
from ..contract import OpenVbd
from .device import RESIZE_POLL_INTERVAL, Device, DeviceId, ErrorReport, default_open_vbd
from .guest_warnings import GuestWarnings

log = logging.getLogger(__name__)

RUN_KINDS = ("vbd", "vbd3")
ALL_KINDS = ("vbd", "vbd3", "qdisk")
_ADOPTABLE = (XenbusState.INITIALISING, XenbusState.INIT_WAIT, XenbusState.INITIALISED, XenbusState.CONNECTED)


async def own_domid(xs: XenStore) -> int:
    """Our domid: `domid` relative to our xenstore home (xen-init-dom0 writes 0 for dom0,
    libxl writes it for a driver domain); 0 when absent or unreadable."""
    try:
        raw = await xs.read("domid")
    except XenStoreError:
        return 0
    text = raw.rstrip(b"\0").strip()
    return int(text) if text.isdigit() else 0


@dataclass
class _Devices:
    """Bookkeeping of one (kind, domid): running tasks and ended ones still present."""

    running: dict[int, trio.CancelScope] = field(default_factory=dict)
    ended: set[int] = field(default_factory=set)


class Service:
    def __init__(self, xs: XenStore, platform: Platform, configs: Iterable[DomainConfig], *,
                 kinds: Sequence[str] = RUN_KINDS, backend_domid: int | None = None,
                 only_domid: int | None = None, open_vbd: OpenVbd = default_open_vbd,
                 warnings: GuestWarnings | None = None,
                 resize_interval: float = RESIZE_POLL_INTERVAL,
                 hold: trio.Event | None = None, storage_in_use: Iterable[str] | None = None) -> None:
        """hold: taking over from a daemon that still serves (an upgrade): until it is set, each device
        found only prepares its takeover (backend/xenbus/device.py: nothing written, nothing taken from
        the running daemon), `prepared()` says when they all have; storage_in_use: the storage that
        daemon holds (a vhost-user export serves one client: a disk's handover_path is used instead)."""
        unknown = set(kinds) - set(ALL_KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be some of {ALL_KINDS}, got {list(kinds)}")
        self._xs = xs
        self._platform = platform
        self._configs = list(configs)
        self.kinds = tuple(kinds)
        self.backend_domid = backend_domid
        self._only_domid = only_domid
        self._open_vbd = open_vbd
        self._warnings = warnings or GuestWarnings(logging.getLogger("xenblk_vhost.guest"))
        self._resize_interval = resize_interval
        self._hold = hold
        self._storage_in_use = frozenset(storage_in_use) if storage_in_use is not None else None
        self._books: dict[tuple[str, int], _Devices] = {}
        self._dirty: set[tuple[str, int | None]] = set()
        self._wakeup = trio.Event()
        self._nursery: trio.Nursery | None = None
        self.devices: dict[DeviceId, Device] = {}  # running, for introspection and tests
        # The last error of each configured disk, kept after its device ended:
        # {(domain label, devid): report}; the label is what the config names.
        self.last_errors: dict[tuple[str, int], ErrorReport] = {}
        self.labels: dict[DeviceId, str] = {}  # each running device's domain, as its config names it

    # ------------------------------------------------------------------ public

    @property
    def configs(self) -> list[DomainConfig]:
        return list(self._configs)

    def reload(self, configs: Iterable[DomainConfig]) -> list[str]:
        """New configuration: new domains are looked for now; a device already
        running picks up its changed disk when its frontend next connects.
        What changed, one line each (config.describe_changes), for the operator."""
        old, self._configs = self._configs, list(configs)
        attached = {(self.labels[did], did.devid) for did in self.devices if did in self.labels}
        changes = describe_changes(old, self._configs, attached=attached)
        for kind in self.kinds:
            self._mark(kind, None)
        log.info("configuration reloaded: %d domain(s)%s", len(self._configs),
                 "".join(f"; {line}" for line in changes) or "; nothing changed")
        return changes

    async def prepared(self) -> None:
        """Every device found so far has prepared its takeover (see hold) or ended."""
        for device in list(self.devices.values()):
            await device.prepared.wait()

    async def settled(self) -> None:
        """Every device found so far has been probed: taken over, in InitWait, or failed."""
        for device in list(self.devices.values()):
            await device.settled.wait()

    def stopping(self) -> list[Device]:
        """The devices running now: cancel run(), then wait for each one's `let_go` (its rings and
        storage released, before the xenstore reads of its way out) to hand over without waiting
        for the rest of the service's end."""
        return list(self.devices.values())

    def storage_in_use(self) -> list[str]:
        """The storage our devices hold open (for the daemon taking over from us: Service's storage_in_use)."""
        return sorted({d.storage_path for d in self.devices.values() if d.vbd is not None and d.storage_path})

    async def domain_ids(self) -> dict[str, int]:
        """The domains xenstore knows now, {name: domid} (the operator's `list`: configured
        domains, present or not)."""
        found: dict[str, int] = {}
        for domid in await self._list_ints("/local/domain"):
            raw = await read_or_none(self._xs, f"/local/domain/{domid}/name")
            if raw is not None:
                found[raw.rstrip(b"\0").decode("utf-8", "replace")] = domid
        return found

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        if self.backend_domid is None:
            self.backend_domid = await own_domid(self._xs)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for kind in self.kinds:
                await nursery.start(self._watch_kind, kind)
            await self._scan_dirty()
            task_status.started()
            log.info("serving %s for %d configured domain(s) as backend domain %d",
                     "/".join(self.kinds), len(self._configs), self.backend_domid)
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                await self._scan_dirty()

    # ------------------------------------------------------------------ discovery

    def _kind_path(self, kind: str) -> str:
        return f"/local/domain/{self.backend_domid}/backend/{kind}"

    def _mark(self, kind: str, domid: int | None) -> None:
        self._dirty.add((kind, domid))
        self._wakeup.set()

    async def _watch_kind(self, kind: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        base = self._kind_path(kind)
        async with self._xs.watch(base) as events:
            self._mark(kind, None)  # whatever is already there
            task_status.started()
            async for path in events:
                self._on_event(kind, base, path)

    def _on_event(self, kind: str, base: str, path: str) -> None:
        parts = path[len(base):].strip("/").split("/") if path.startswith(base) else [""]
        if not parts[0]:
            self._mark(kind, None)
            return
        if not parts[0].isdigit():
            return
        domid = int(parts[0])
        if self._only_domid is not None and domid != self._only_domid:
            return
        books = self._books.get((kind, domid))
        if len(parts) >= 3 and parts[1].isdigit() and books and int(parts[1]) in books.running:
            return  # a running device's own node: its task follows it
        self._mark(kind, domid)

    async def _scan_dirty(self) -> None:
        dirty, self._dirty = self._dirty, set()
        for kind, domid in sorted(dirty, key=lambda d: (d[0], -1 if d[1] is None else d[1])):
            if domid is None:
                for found in await self._list_ints(self._kind_path(kind)):
                    if self._only_domid is None or found == self._only_domid:
                        await self._scan_domain(kind, found)
                for k, known in list(self._books):
                    if k == kind:
                        await self._scan_domain(kind, known)
            else:
                await self._scan_domain(kind, domid)

    async def _list_ints(self, path: str) -> list[int]:
        try:
            names = await self._xs.directory(path)
        except XenStoreError as e:
            if e.errno == errno.ENOENT:
                return []
            raise
        return [int(n) for n in names if n.isdigit()]

    async def _scan_domain(self, kind: str, domid: int) -> None:
        base = f"{self._kind_path(kind)}/{domid}"
        devids = set(await self._list_ints(base))
        books = self._books.setdefault((kind, domid), _Devices())
        for devid, scope in list(books.running.items()):
            if devid not in devids:
                scope.cancel()  # dir removed under a running device
        books.ended &= devids
        if not books.running and not books.ended and not devids:
            del self._books[(kind, domid)]
            return
        if not devids:
            return
        config, name = await self._domain_config(domid)
        if config is None:
            return
        for devid in sorted(devids - set(books.running)):
            state = parse_state(await read_or_none(self._xs, f"{base}/{devid}/state"))
            if devid in books.ended:
                if state != XenbusState.INITIALISING:
                    continue
                books.ended.discard(devid)
            elif state not in _ADOPTABLE:
                continue
            assert self.backend_domid is not None and self._nursery is not None  # set by run()
            did = DeviceId(self.backend_domid, kind, domid, devid)
            if state != XenbusState.INITIALISING:
                log.info("%s: taking over a device found in state %s", did, state.name)
            books.running[devid] = trio.CancelScope()
            device = self._new_device(did, config.label, name)
            self._nursery.start_soon(self._run_device, device, books.running[devid], config.label, name)

    async def _domain_config(self, domid: int) -> tuple[DomainConfig | None, str | None]:
        """The config that serves the domain, and the domain's name (None if it has none)."""
        if self._only_domid is not None and domid != self._only_domid:
            return None, None
        raw = await read_or_none(self._xs, f"/local/domain/{domid}/name")
        name = raw.rstrip(b"\0").decode("utf-8", "replace") if raw is not None else None
        return next((c for c in self._configs if c.matches(domid, name)), None), name

    async def _resolve_disk(self, domid: int, devid: int) -> DiskConfig | None:
        config, _ = await self._domain_config(domid)
        return config.disk(devid) if config is not None else None

    # ------------------------------------------------------------------ device tasks

    def _new_device(self, did: DeviceId, label: str, name: str | None) -> Device:
        """A device, known (devices, labels) from now on: before its task runs, for prepared()."""
        device = Device(self._xs, self._platform, did, lambda: self._resolve_disk(did.frontend_domid, did.devid),
                        warnings=self._warnings, open_vbd=self._open_vbd, resize_interval=self._resize_interval,
                        domain=name or label, hold=self._hold, storage_in_use=self._storage_in_use)
        self.devices[did] = device
        self.labels[did] = label
        return device

    async def _run_device(self, device: Device, scope: trio.CancelScope, label: str, name: str | None) -> None:
        did = device.id
        try:
            with log_context.bound(domain=name or label, domid=did.frontend_domid, vdev=vdev_name(did.devid),
                                   device=str(did)), scope:
                await device.run()
        except XenStoreConnectionError:
            raise  # the whole service's loss, not this device's: run() ends (see the module doc)
        except Exception:
            # One device failing must not take the others down.
            log.exception("%s: device task failed", did)
        finally:
            if device.last_error is not None:
                self.last_errors[(label, did.devid)] = device.last_error
            self.devices.pop(did, None)
            self.labels.pop(did, None)
            books = self._books.setdefault((did.kind, did.frontend_domid), _Devices())
            books.running.pop(did.devid, None)
            books.ended.add(did.devid)
            # Look again: the toolstack may have re-created the dir meanwhile.
            self._mark(did.kind, did.frontend_domid)
