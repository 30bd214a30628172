"""The toolstack's side of a vbd: exactly the xenstore nodes libxl writes.

The backend's tests and the libxl-sequence tests drive the backend through
these functions, so each one follows a libxl function step by step: the
same nodes, the same values, the same permissions, the same transactions,
the same waits and timeouts. Facts were read in xen-project/xen at
c447b7308b (tools/libs/light/); each function cites the lines.

    create_dom0_nodes(xs)                       xen-init-dom0
    create_domain_nodes(xs, domid, name, ...)   libxl__domain_make + libxl__build_post
    add_vbd(xs, domid, cfg) -> VbdPaths         device_disk_add + libxl__device_generic_add
    attach_vbd(xs, domid, cfg) -> VbdPaths      add_vbd, then wait for backend InitWait
    detach_vbd(xs, paths) -> DetachOutcome      libxl__initiate_device_generic_remove ... destroy
    destroy_domain(xs, domid) -> list[...]      libxl__destroy_domid's xenstore part

Not modelled: hotplug scripts (libxl runs `script add` after InitWait and
waits for `hotplug-status`; a test that needs it writes the node itself),
the JSON domain config, stub domains, COLO, virtio (`standalone`) disks.
Xen's side of a domain's death (xenstored firing @releaseDomain) is the
simulated hypervisor's business, not the toolstack's: see world.py.
"""

from __future__ import annotations

import enum
import errno
import uuid as uuid_module
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import trio

from ..vdev import parse_vdev
from ..xen.interfaces import Permission, XenStore, XenStoreError, XenStoreOps, XenStoreTransaction
from ..xen.xenbus import XenbusState

# libxl_internal.h:94-95
LIBXL_INIT_TIMEOUT = 10.0
LIBXL_DESTROY_TIMEOUT = 10.0

TOOLSTACK_DOMID = 0  # LIBXL_TOOLSTACK_DOMID



class BackendKind(str, enum.Enum):  # noqa: UP042 (str() stays 'BackendKind.VBD', as callers print it)
    """The <kind> in backend/<kind>/...: which daemon owns the device.

    libxl_disk.c:240-275 (libxl__device_from_disk): backendtype=phy -> vbd,
    tap -> vbd3 (4.19+), qdisk -> qdisk.
    """

    VBD = "vbd"
    VBD3 = "vbd3"
    QDISK = "qdisk"

    @property
    def type_value(self) -> str:
        # The `type` node, libxl_device.c:508-517 (string_of_backend).
        return {"vbd": "phy", "vbd3": "vbd3", "qdisk": "qdisk"}[self.value]


# libxl_device.c:495-506 (libxl__device_disk_string_of_format): the params
# prefix written for tap (vbd3) and qdisk disks.
_FORMAT_PREFIX = {"raw": "aio", "empty": "aio", "qcow": "qcow", "qcow2": "qcow2", "vhd": "vhd", "qed": "qed"}


@dataclass(frozen=True)
class VbdConfig:
    """One `disk=[...]` entry of an xl config, with libxl's defaults.

    discard_enable None means libxl's default, which is `readwrite`
    (libxl_disk.c:161, libxl__device_disk_setdefault); trusted defaults to 1
    (libxl_disk.c:164).
    """

    vdev: str
    target: str
    kind: BackendKind = BackendKind.VBD
    backend_domid: int = TOOLSTACK_DOMID
    readwrite: bool = True
    is_cdrom: bool = False
    removable: bool = False
    discard_enable: bool | None = None
    trusted: bool = True
    direct_io_safe: bool = False
    script: str | None = None
    format: str = "raw"
    # libxl writes the frontend's `protocol` only for PV guests
    # (libxl_disk.c:488-504), from xc_domain_get_native_protocol.
    domain_type: str = "pvh"
    native_protocol: str = "x86_64-abi"
    script_dir: str = "/etc/xen/scripts"

    @property
    def devid(self) -> int:
        return parse_vdev(self.vdev)


@dataclass(frozen=True)
class VbdPaths:
    domid: int
    devid: int
    backend_domid: int
    kind: BackendKind
    frontend: str  # /local/domain/<domid>/device/vbd/<devid>
    backend: str  # /local/domain/<bdomid>/backend/<kind>/<domid>/<devid>
    libxl: str  # /libxl/<domid>/device/vbd/<devid>


def vbd_paths(domid: int, devid: int, kind: BackendKind | str = BackendKind.VBD,
              backend_domid: int = TOOLSTACK_DOMID) -> VbdPaths:
    """libxl_device.c:21-85: the frontend is always device/vbd (device->kind
    is VBD for every disk backend), the backend dir is named by backend_kind."""
    kind = BackendKind(kind)
    return VbdPaths(
        domid=domid,
        devid=devid,
        backend_domid=backend_domid,
        kind=kind,
        frontend=f"/local/domain/{domid}/device/vbd/{devid}",
        backend=f"/local/domain/{backend_domid}/backend/{kind.value}/{domid}/{devid}",
        libxl=f"/libxl/{domid}/device/vbd/{devid}",
    )


def backend_entries(domid: int, cfg: VbdConfig) -> list[tuple[str, str]]:
    """The backend's key/value list in libxl's order (libxl_disk.c:383-476).

    `frontend` is not in this list: libxl__device_generic_add writes it
    separately (libxl_device.c:249-251); add_vbd does the same.
    """
    kind = BackendKind(cfg.kind)
    entries: list[tuple[str, str]] = []
    if kind is BackendKind.VBD:
        # phy: params is the target verbatim, plus the absolute script path.
        entries.append(("params", cfg.target))
        entries.append(("script", _abs_script(cfg.script or "block", cfg.script_dir)))
    elif kind is BackendKind.VBD3:
        entries.append(("params", f"{_FORMAT_PREFIX[cfg.format]}:{cfg.target}"))
        entries.append(("script", _abs_script(cfg.script or "block-tap", cfg.script_dir)))
    else:
        # qdisk: libxl rejects script= for qdisk (bad_script), writes none.
        entries.append(("params", f"{_FORMAT_PREFIX[cfg.format]}:{cfg.target}"))
    discard = cfg.readwrite if cfg.discard_enable is None else cfg.discard_enable
    entries += [
        ("frontend-id", str(domid)),
        ("online", "1"),
        ("removable", "1" if cfg.removable else "0"),
        ("bootable", "1"),
        ("state", str(XenbusState.INITIALISING)),
        ("dev", cfg.vdev),
        ("type", kind.type_value),
        ("mode", "w" if cfg.readwrite else "r"),
        ("device-type", "cdrom" if cfg.is_cdrom else "disk"),
    ]
    if cfg.direct_io_safe:
        entries.append(("direct-io-safe", "1"))
    entries.append(("discard-enable", "1" if discard else "0"))
    entries.append(("specification", "xen"))
    return entries


def frontend_entries(cfg: VbdConfig) -> list[tuple[str, str]]:
    """The frontend's key/value list (libxl_disk.c:478-504); `backend` is
    written first and separately by libxl__device_generic_add."""
    entries = [
        ("backend-id", str(cfg.backend_domid)),
        ("state", str(XenbusState.INITIALISING)),
        ("virtual-device", str(cfg.devid)),
        ("device-type", "cdrom" if cfg.is_cdrom else "disk"),
        ("trusted", "1" if cfg.trusted else "0"),
    ]
    if cfg.domain_type == "pv":
        entries.append(("protocol", cfg.native_protocol))
    return entries


def _abs_script(script: str, script_dir: str) -> str:
    # libxl__abs_path: relative names live in the Xen script dir.
    return script if script.startswith("/") else f"{script_dir}/{script}"


# --------------------------------------------------------------------------
# Transactions, reads and waits
# --------------------------------------------------------------------------

T = TypeVar("T")


async def in_transaction(xs: XenStore, body: Callable[[XenStoreTransaction], Awaitable[T]]) -> T:
    """Run body(t) in a transaction, again from the top on EAGAIN, as libxl's
    `for (;;) { transaction_start ... commit; if (!rc) break; }` loops do."""
    return await xs.transact(body)


async def read_or_none(xs: XenStoreOps, path: str) -> str | None:
    try:
        return (await xs.read(path)).decode()
    except XenStoreError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise


async def _rm_if_present(xs: XenStoreOps, path: str) -> None:
    try:
        await xs.rm(path)
    except XenStoreError as exc:
        if exc.errno != errno.ENOENT:
            raise


async def path_cleanup(xs: XenStoreOps, path: str) -> None:
    """libxl__xs_path_cleanup (libxl_xshelp.c:287-326): remove `path`, then
    each parent while it holds an empty value and has no children left."""
    try:
        await xs.rm(path)
    except XenStoreError as exc:
        if exc.errno == errno.ENOENT:
            return
        raise
    parts = path.rstrip("/").split("/")
    for end in range(len(parts) - 1, 1, -1):
        parent = "/".join(parts[:end])
        value = await read_or_none(xs, parent)
        if value is None or value != "":
            return
        if await xs.directory(parent):
            return
        await xs.rm(parent)


class DeviceTimeout(TimeoutError):
    """The backend did not reach the state libxl waits for in time (ERROR_TIMEDOUT)."""


class StateNodeRemoved(LookupError):
    """The state node vanished while libxl waited on it (devstate ERROR_INVAL)."""


async def wait_for_state(xs: XenStore, state_path: str, wanted: int, timeout: float) -> None:
    """libxl__ev_devstate_wait (libxl_event.c:1030-1062): watch the node,
    re-read it on every event, done when it equals `wanted`; its removal
    is an error, and so is the timeout."""
    with trio.move_on_after(timeout):
        async with xs.watch(state_path) as events:
            async for _ in events:
                raw = await read_or_none(xs, state_path)
                if raw is None:
                    raise StateNodeRemoved(f"{state_path} removed while waiting for state {wanted}")
                if _atoi(raw) == wanted:
                    return
    raise DeviceTimeout(f"{state_path} did not reach state {wanted} within {timeout} s")


def _atoi(text: str) -> int:
    """C atoi: leading digits, 0 if none (libxl parses states with atoi)."""
    digits = ""
    for ch in text.strip():
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else 0


# --------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------

def _noperm() -> list[Permission]:
    return [Permission(TOOLSTACK_DOMID, False, False)]


def _roperm(domid: int) -> list[Permission]:
    return [Permission(TOOLSTACK_DOMID, False, False), Permission(domid, True, False)]


def _rwperm(domid: int) -> list[Permission]:
    # Owner = the guest: it may read and write, nobody else (but dom0).
    return [Permission(domid, False, False)]


async def _mknod(t: XenStoreOps, path: str, perms: Sequence[Permission]) -> None:
    # libxl__xs_mknod (libxl_xshelp.c:171-191): write "" then set perms.
    await t.write(path, "")
    await t.set_perms(path, perms)


async def create_dom0_nodes(xs: XenStore) -> None:
    """xen-init-dom0 (tools/helpers/xen-init-dom0.c:109-120): dom0's domid and name."""
    await xs.write("/local/domain/0/domid", "0")
    await xs.write("/local/domain/0/name", "Domain-0")


@dataclass(frozen=True)
class DomainPaths:
    domid: int
    dom_path: str
    vm_path: str
    libxl_path: str


async def create_domain_nodes(
    xs: XenStore,
    domid: int,
    name: str,
    *,
    uuid: str | None = None,
    domain_type: str = "pvh",
    max_memkb: int = 262144,
    target_memkb: int | None = None,
    vcpus: int = 1,
    store_port: int = 1,
    store_gfn: int = 0xFEFFC,
    introduce: bool = True,
) -> DomainPaths:
    """A new domain's nodes and permissions.

    libxl_create.c:795-923 (libxl__domain_make, one transaction): the domain
    dir and /vm/<uuid> are owned by dom0 and readable by the guest; most of
    control/, data, drivers, feature, attr, error are owned by the guest.
    Then libxl_dom.c:461-492 (libxl__build_post): memory, domid and vCPU
    availability, the store ring's port and frame (the sim's guests reach
    xenstored by socket; the values only need to look right), and
    xs_introduce_domain (libxl_dom.c:510). (The xend_suspend_evtchn_compat=
    false branch; HVM adds hvmloader and the S3/S4 control nodes.)
    """
    dom_uuid = uuid or str(uuid_module.uuid4())
    dom_path = f"/local/domain/{domid}"
    vm_path = f"/vm/{dom_uuid}"
    libxl_path = f"/libxl/{domid}"
    ro, rw, no = _roperm(domid), _rwperm(domid), _noperm()
    hvm = domain_type == "hvm"

    async def make(t: XenStoreTransaction) -> None:
        await _rm_if_present(t, dom_path)
        await _mknod(t, dom_path, ro)
        await _rm_if_present(t, vm_path)
        await _mknod(t, vm_path, ro)
        await _rm_if_present(t, libxl_path)
        await _mknod(t, libxl_path, no)
        await _mknod(t, f"{libxl_path}/device", no)
        await t.write(f"{dom_path}/vm", vm_path)
        # libxl__domain_rename (libxl_domain.c:21-165): name, and /vm/<uuid>/name.
        await t.write(f"{dom_path}/name", name)
        await t.write(f"{vm_path}/name", name)
        await _mknod(t, f"{dom_path}/cpu", ro)
        await _mknod(t, f"{dom_path}/memory", ro)
        await _mknod(t, f"{dom_path}/device", ro)
        await _mknod(t, f"{dom_path}/device/suspend/event-channel", rw)
        await _mknod(t, f"{dom_path}/control", ro)
        if hvm:
            await _mknod(t, f"{dom_path}/hvmloader", ro)
        for node in ("shutdown", "feature-poweroff", "feature-reboot", "feature-suspend"):
            await _mknod(t, f"{dom_path}/control/{node}", rw)
        if hvm:
            await _mknod(t, f"{dom_path}/control/feature-s3", rw)
            await _mknod(t, f"{dom_path}/control/feature-s4", rw)
        await _mknod(t, f"{dom_path}/control/sysrq", rw)
        for node in ("data", "drivers", "feature", "attr", "error"):
            await _mknod(t, f"{dom_path}/{node}", rw)
        await t.write(f"{vm_path}/uuid", dom_uuid)
        await t.write(f"{vm_path}/name", name)
        await t.write(f"{dom_path}/control/platform-feature-multiprocessor-suspend", "1")
        await t.write(f"{dom_path}/control/platform-feature-xs_reset_watches", "1")
        await t.write(f"{libxl_path}/type", domain_type)

    await in_transaction(xs, make)

    target = max_memkb if target_memkb is None else target_memkb

    async def build_post(t: XenStoreTransaction) -> None:
        await t.write(f"{dom_path}/memory/static-max", str(max_memkb))
        await t.write(f"{dom_path}/memory/target", str(target))
        await t.write(f"{dom_path}/memory/videoram", "0")
        await t.write(f"{dom_path}/domid", str(domid))
        await t.write(f"{dom_path}/store/port", str(store_port))
        await t.write(f"{dom_path}/store/ring-ref", str(store_gfn))
        for cpu in range(vcpus):
            await t.write(f"{dom_path}/cpu/{cpu}/availability", "online")

    await in_transaction(xs, build_post)
    if introduce:
        # libxl_dom.c:510: xs_introduce_domain, which fires @introduceDomain.
        await xs.introduce_domain(domid, store_gfn, store_port)  # type: ignore[attr-defined]
    return DomainPaths(domid, dom_path, vm_path, libxl_path)


# --------------------------------------------------------------------------
# Devices
# --------------------------------------------------------------------------

class DeviceExists(FileExistsError):
    """libxl's ERROR_DEVICE_EXISTS: /libxl/<domid>/device/vbd/<devid> is present."""


async def add_vbd(xs: XenStore, domid: int, cfg: VbdConfig) -> VbdPaths:
    """device_disk_add (libxl_disk.c:294-528) in one transaction, writing
    through libxl__device_generic_add (libxl_device.c:148-297).

    Frontend dir: owned by the guest, readable by the backend domain, and
    every frontend node gets those permissions explicitly. Backend dir:
    owned by the backend domain, readable by the guest; its nodes inherit.
    A copy of the backend nodes goes under /libxl/<domid>/device/vbd/<devid>.
    """
    paths = vbd_paths(domid, cfg.devid, cfg.kind, cfg.backend_domid)
    bents = backend_entries(domid, cfg)
    fents = frontend_entries(cfg)
    frontend_perms = [Permission(domid, False, False), Permission(cfg.backend_domid, True, False)]
    backend_perms = [Permission(cfg.backend_domid, False, False), Permission(domid, True, False)]

    async def add(t: XenStoreTransaction) -> None:
        # libxl__device_exists: the libxl copy is the marker.
        if await read_or_none(t, paths.libxl) is not None:
            raise DeviceExists(f"{paths.libxl} already exists")
        await _rm_if_present(t, paths.libxl)
        await t.write(f"{paths.libxl}/frontend", paths.frontend)
        await t.write(f"{paths.libxl}/backend", paths.backend)

        await _rm_if_present(t, paths.frontend)
        await t.mkdir(paths.frontend)
        await t.set_perms(paths.frontend, frontend_perms)
        await t.write(f"{paths.frontend}/backend", paths.backend)
        for key, value in fents:  # libxl__xs_writev_perms: write, then set perms
            await t.write(f"{paths.frontend}/{key}", value)
            await t.set_perms(f"{paths.frontend}/{key}", frontend_perms)

        await _rm_if_present(t, paths.backend)
        await t.mkdir(paths.backend)
        await t.set_perms(paths.backend, backend_perms)
        await t.write(f"{paths.backend}/frontend", paths.frontend)
        for key, value in bents:
            await t.write(f"{paths.backend}/{key}", value)
        for key, value in bents:
            await t.write(f"{paths.libxl}/{key}", value)

    await in_transaction(xs, add)
    return paths


async def attach_vbd(xs: XenStore, domid: int, cfg: VbdConfig,
                     timeout: float = LIBXL_INIT_TIMEOUT) -> VbdPaths:
    """add_vbd, then libxl__wait_device_connection (libxl_device.c:978-1013):
    wait for backend InitWait within LIBXL_INIT_TIMEOUT, except for qdisk,
    where QEMU goes straight to Connected and libxl does not wait."""
    paths = await add_vbd(xs, domid, cfg)
    if paths.kind is not BackendKind.QDISK:
        await wait_for_state(xs, f"{paths.backend}/state", XenbusState.INIT_WAIT, timeout)
    return paths


class DetachOutcome(enum.Enum):
    CLOSED = "backend reached Closed; nodes removed"
    BACKEND_GONE = "backend state node absent; frontend cleaned up only"
    FORCED = "backend did not close in time; nodes removed anyway (forced)"
    STATE_REMOVED = "backend state vanished while waiting; nodes left in place"


async def _remove_round(xs: XenStore, paths: VbdPaths, force: bool) -> bool:
    """One pass of libxl__initiate_device_generic_remove's transaction
    (libxl_device.c:1062-1102). Returns False if the backend is already gone."""
    state_path = f"{paths.backend}/state"

    async def body(t: XenStoreTransaction) -> bool:
        if force:
            await path_cleanup(t, paths.frontend)
        state = await read_or_none(t, state_path)
        if state is None:
            return False
        await t.write(f"{paths.backend}/online", "0")
        if _atoi(state) != XenbusState.CLOSED:
            await t.write(state_path, str(XenbusState.CLOSING))
        return True

    return await in_transaction(xs, body)


async def destroy_device(xs: XenStore, paths: VbdPaths) -> None:
    """libxl__device_destroy (libxl_device.c:814-861) run by the toolstack
    domain for a backend it also hosts: clean up the frontend, the libxl copy
    and the backend dir, removing emptied parents, in one transaction."""

    async def body(t: XenStoreTransaction) -> None:
        await path_cleanup(t, paths.frontend)
        await path_cleanup(t, paths.libxl)
        await path_cleanup(t, paths.backend)

    await in_transaction(xs, body)


async def detach_vbd(xs: XenStore, paths: VbdPaths, *, timeout: float = LIBXL_DESTROY_TIMEOUT,
                     force: bool = False) -> DetachOutcome:
    """`xl block-detach`: online=0 and backend Closing (unless already
    Closed), wait up to `timeout` for Closed, then remove the nodes.

    On timeout libxl (force AUTO) starts over with force on, which first
    removes the frontend dir, waits once more, and removes everything
    whatever the answer (libxl_device.c:1176-1191, 1409-1423). With
    force=True (what domain destroy uses) the first round is already forced.
    A backend whose state node vanished mid-wait leaves the nodes in place
    unless forced (devstate ERROR_INVAL; libxl_device.c:1413).
    """
    state_path = f"{paths.backend}/state"
    forced = force
    while True:
        if not await _remove_round(xs, paths, forced):
            # "backend already removed, cleanup frontend only"
            await destroy_device(xs, paths)
            return DetachOutcome.BACKEND_GONE
        try:
            await wait_for_state(xs, state_path, XenbusState.CLOSED, timeout)
        except DeviceTimeout:
            if not forced:
                forced = True
                continue
            await destroy_device(xs, paths)
            return DetachOutcome.FORCED
        except StateNodeRemoved:
            if forced:
                await destroy_device(xs, paths)
                return DetachOutcome.FORCED
            return DetachOutcome.STATE_REMOVED
        await destroy_device(xs, paths)
        return DetachOutcome.CLOSED


async def list_devices(xs: XenStore, domid: int) -> list[VbdPaths]:
    """The vbds libxl knows for a domain, from /libxl/<domid>/device/vbd/*/backend
    (libxl_device.c:893-937, libxl__devices_destroy's scan)."""
    base = f"/libxl/{domid}/device/vbd"
    try:
        devids = await xs.directory(base)
    except XenStoreError as exc:
        if exc.errno == errno.ENOENT:
            return []
        raise
    found = []
    for devid in devids:
        backend = await read_or_none(xs, f"{base}/{devid}/backend")
        if backend is None:
            continue
        parts = backend.split("/")
        # /local/domain/<bdomid>/backend/<kind>/<domid>/<devid>
        if len(parts) != 8 or parts[4] != "backend":
            continue
        found.append(vbd_paths(domid, int(devid), parts[5], int(parts[3])))
    return found


async def destroy_domain(xs: XenStore, domid: int, *,
                         timeout: float = LIBXL_DESTROY_TIMEOUT) -> dict[int, DetachOutcome]:
    """`xl destroy`'s xenstore part: every device removed with force on, in
    parallel (libxl_domain.c:1278-1282, libxl__devices_destroy), then the
    domain's /vm, /local/domain and /libxl trees (libxl_domain.c:1509-1543)."""
    outcomes: dict[int, DetachOutcome] = {}

    async def one(paths: VbdPaths) -> None:
        outcomes[paths.devid] = await detach_vbd(xs, paths, timeout=timeout, force=True)

    async with trio.open_nursery() as nursery:
        for paths in await list_devices(xs, domid):
            nursery.start_soon(one, paths)

    dom_path = f"/local/domain/{domid}"
    vm_path = await read_or_none(xs, f"{dom_path}/vm")
    if vm_path:
        await _rm_if_present(xs, vm_path)
    await _rm_if_present(xs, dom_path)
    await _rm_if_present(xs, f"/libxl/{domid}")
    await _rm_if_present(xs, f"/local/domain/{domid}/hvmloader")
    return outcomes
