"""Is xenblk-vhost serving this device, from the YAML file the xl line names? (pure)

The script gathers what xenstore says (script.py) and these functions decide.
libxl runs `add` only once the backend reached InitWait, so "some backend
took the device" is already known; what is not known, and what an operator
gets wrong, is whether that backend is ours and serves it as the file says:

  * the file must configure this domain (by name or domid) and this vdev;
  * kernel xen-blkback must not be loaded for a `vbd` device: it claims
    every backend/vbd dir too, and two backends on one ring corrupt it;
  * the backend must be in InitWait..Connected, not reporting an error;
  * what it advertised before InitWait must fit the file's disk:
    max-ring-page-order equal to ring_page_order, multi-queue-max-queues
    and feature-max-indirect-segments no more than queues and
    max_indirect_segments (xenblk-vhost derives them from the disk's
    config; the storage can only lower the last two). A mismatch means the
    daemon runs another configuration: the file was edited and not reloaded,
    or another daemon (or backend) serves the device;
  * when a daemon's control socket lists the device (daemon.py), it serves
    it from the file's storage (driver and path): exact where the feature
    check is a heuristic, and it catches a changed path too;
  * as Xen's own block scripts must (docs/misc/block-scripts.txt), the
    same storage is not given read-write to two domains, nor to one domain
    read-write while another has it at all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import DiskConfig, DomainConfig
from ..vdev import vdev_name
from ..xen.xenbus import XenbusState, state_label


class HotplugError(Exception):
    """Why the attach must fail; `status` is what hotplug-status gets (block-common.sh
    writes `busy` for storage in use elsewhere, `error` for everything else)."""

    def __init__(self, message: str, status: str = "error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class BackendView:
    """The device's backend dir as the script read it."""

    state: int | None
    error: str | None  # what the daemon reported (xenbus_dev_fatal), if anything
    mode: str
    features: dict[str, str]  # the keys published before InitWait


@dataclass(frozen=True)
class Attachment:
    """One disk attached to a domain: what the sharing rule compares."""

    domid: int
    domain: str  # name, or "domid N"
    vdev: int
    storage: str  # the disk's path, symlinks resolved
    writable: bool

    def __str__(self) -> str:
        return f"domain {self.domain} as {vdev_name(self.vdev)} ({'read-write' if self.writable else 'read-only'})"


def who(cfg: DomainConfig) -> str:
    return f"domain {cfg.name!r}" if cfg.name is not None else f"domid {cfg.domid}"


def served_disk(cfg: DomainConfig, domid: int, name: str | None, devid: int) -> DiskConfig:
    """The file's disk for this device; HotplugError if the file is for another domain or vdev."""
    if not cfg.matches(domid, name):
        shown = f"{name!r}" if name is not None else "its name unreadable"
        raise HotplugError(f"{cfg.source} configures {who(cfg)}, but this disk belongs to domain {domid} "
                           f"({shown}): the xl disk line names another domain's file")
    disk = cfg.disk(devid)
    if disk is None:
        have = ", ".join(d.name for d in cfg.disks)
        raise HotplugError(f"{cfg.source} has no disk {vdev_name(devid)} (device {devid}) for {who(cfg)}; "
                           f"it configures {have}")
    return disk


def check_blkback(kind: str, blkback_loaded: bool) -> None:
    if kind == "vbd" and blkback_loaded:
        raise HotplugError("the kernel's xen-blkback is loaded and serves every backend/vbd device too: "
                           "unload it (modprobe -r xen-blkback; blacklist it in /etc/modprobe.d), "
                           "or use backendtype=tap (Xen >= 4.19), which it does not claim")


def check_backend(view: BackendView, source: str) -> None:
    """The backend took the device and has not given up on it."""
    if view.state in (XenbusState.INIT_WAIT, XenbusState.INITIALISED, XenbusState.CONNECTED):
        return
    name = state_label(view.state) if view.state is not None else "absent"
    if view.error:
        raise HotplugError(f"the backend reported: {view.error} (state {name})")
    if view.state in (XenbusState.CLOSING, XenbusState.CLOSED):
        raise HotplugError(f"the backend is closing the device (state {name})")
    raise HotplugError(f"no backend has taken the device (state {name}): is `xenblk-vhost run {source}` "
                       f"running? (systemd: systemctl status xenblk-vhost@<domain>)")


def check_features(disk: DiskConfig, features: dict[str, str], source: str) -> None:
    """What the backend advertised fits the file's disk (see the module doc)."""
    problems = []
    for key, configured, exact in (("max-ring-page-order", disk.ring_page_order, True),
                                   ("multi-queue-max-queues", disk.queues, False),
                                   ("feature-max-indirect-segments", disk.max_indirect_segments, False)):
        raw = features.get(key)
        if raw is None or not raw.strip().isdigit():
            problems.append(f"{key} is {'missing' if raw is None else repr(raw)}")
            continue
        value = int(raw)
        if value != configured if exact else value > configured:
            problems.append(f"{key} is {value} where the file says {configured}")
    if problems:
        raise HotplugError(f"the backend serving this device does not follow {source} ({'; '.join(problems)}): "
                           f"another configuration is running; after editing the file reload the daemon "
                           f"(systemctl reload xenblk-vhost@<domain>) and attach again")


def check_served_by(control: str, driver: str | None, path: str | None, disk: DiskConfig, source: str) -> None:
    """The daemon that lists the device (on its control socket `control`) uses the file's storage."""
    if (driver, path) != (disk.driver, disk.path):
        raise HotplugError(f"the daemon answering on {control} serves this device from {driver} {path}, but "
                           f"{source} says {disk.driver} {disk.path}: after editing the file reload the daemon "
                           f"(systemctl reload xenblk-vhost@<domain>) and attach again")


def writable(disk: DiskConfig, mode: str) -> bool:
    # As the daemon decides (backend/xenbus/device.py effective_disk): 'w' in mode, unless the file says readonly.
    return "w" in mode and not disk.readonly


def storage_key(path: str) -> str:
    return os.path.realpath(path)


def sharing_conflict(mine: Attachment, others: list[Attachment]) -> Attachment | None:
    """Another domain's attachment of the same storage that forbids ours, if any
    (block-common.sh check_sharing: the same VM may share, other VMs only read-only)."""
    for other in others:
        if other.domid == mine.domid or other.storage != mine.storage:
            continue
        if mine.writable or other.writable:
            return other
    return None


def check_sharing(mine: Attachment, others: list[Attachment]) -> None:
    other = sharing_conflict(mine, others)
    if other is not None:
        raise HotplugError(f"{mine.storage} is already attached to {other}; {vdev_name(mine.vdev)} would have it "
                           f"{'read-write' if mine.writable else 'read-only'}: a disk written by one domain "
                           f"cannot be given to another", status="busy")


def physical_device_path(kind: str, disk: DiskConfig) -> str | None:
    """What to write as physical-device-path, if anything.

    libxl reads it for script disks as the local path of the disk: QEMU opens
    it for an HVM guest's emulated disk (libxl_dm.c; without it the disk is
    PV only, with a warning). Only an io_uring disk's file or block device
    is something QEMU can open. For tap (vbd3) libxl takes the node as
    tapdisk's NBD socket (libxl_disk.c, libxl__device_disk_find_local_path),
    so nothing is written there.
    """
    if kind == "vbd" and disk.driver == "io_uring":
        return disk.path
    return None


def mode_warnings(disk: DiskConfig, mode: str) -> list[str]:
    if "w" in mode and disk.readonly:
        return [f"the xl line asks for read-write but the file says readonly: {disk.name} is served read-only"]
    return []
