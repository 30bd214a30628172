"""`block-xenblk-vhost add|remove`: what libxl runs for each disk of ours.

How libxl runs it (tools/libs/light/libxl_device.c device_hotplug,
libxl_linux.c libxl__hotplug_disk), for backendtype=phy (backend/vbd) and,
on Xen >= 4.19, backendtype=tap (backend/vbd3):

    argv  <script> add | <script> remove
    env   XENBUS_PATH=backend/<kind>/<domid>/<devid>  (relative to our xenstore home)
          XENBUS_TYPE=<kind>  XENBUS_BASE_PATH=backend  script=<script>
    stdin /dev/null, stdout to libxl's stderr; killed after 40 s

`add` runs once the backend reached InitWait (libxl gave it 10 s). It checks
that xenblk-vhost serves the device from the YAML file the xl line names
(checks.py), then writes `physical-device-path` where QEMU could use one and
`hotplug-status = connected`, and exits 0. On any problem it writes
`hotplug-error = <why>` and `hotplug-status = error` (`busy`: the storage is
in use by another domain), says why on stderr, and exits 1: libxl logs
hotplug-error and fails the attach. Nothing is written if the backend dir
is gone (a node written there would re-create it).

With a daemon's control socket in /run/xenblk-vhost (daemon.py), `add` also
checks that the daemon listing the device serves it from the file's storage.

`remove` runs after the backend reached Closed (or libxl gave up waiting,
forced), right before libxl deletes the dir: the daemon has released the
device by then, so it only removes the nodes `add` wrote, and exits 0 (libxl
ignores a failed remove anyway).

xenstore is reached as libxenstore does: $XENSTORED_PATH, the xenstored
socket, or /dev/xen/xenbus; `--xenstore PATH` overrides.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import trio

from ..config import ConfigError, DomainConfig, load_config
from ..exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ..xen.interfaces import XenStore, XenStoreError
from ..xen.xenstore import read_or_none
from .checks import (
    Attachment,
    BackendView,
    HotplugError,
    check_backend,
    check_blkback,
    check_features,
    check_served_by,
    check_sharing,
    mode_warnings,
    physical_device_path,
    served_disk,
    storage_key,
    writable,
)
from .daemon import CONTROL_DIR, find_daemon
from .target import KINDS, BackendDevice, config_path, parse_xenbus_path

PROG = "xenblk-vhost-hotplug"
# libxl kills the script after LIBXL_HOTPLUG_TIMEOUT (40 s); answering before
# that lets us say why instead of being killed.
DEADLINE = 30.0
SYS_MODULE = Path("/sys/module")

_PROBE_KEYS = ("max-ring-page-order", "multi-queue-max-queues", "feature-max-indirect-segments")
# What `add` writes and `remove` takes away.
_OUR_NODES = ("hotplug-status", "hotplug-error", "physical-device-path")


async def _read(xs: XenStore, path: str) -> str | None:
    """A node's value; None if absent or unreadable to us."""
    raw = await read_or_none(xs, path)
    return None if raw is None else raw.rstrip(b"\0").decode("utf-8", "replace")


async def _domain_name(xs: XenStore, domid: int) -> str | None:
    return await _read(xs, f"/local/domain/{domid}/name")


def _load(path: str) -> DomainConfig:
    # The storage is not looked at: the daemon has opened it already (it would
    # not be in InitWait otherwise), and in a container it may see other paths.
    try:
        return load_config(path, check_storage=False)
    except ConfigError as e:
        raise HotplugError("; ".join(str(p) for p in e.problems)) from None


# ---------------------------------------------------------------------- add

async def add(xs: XenStore, device: BackendDevice, *, sys_module: Path = SYS_MODULE,
              control_dir: Path = CONTROL_DIR, warn: TextIO = sys.stderr) -> str:
    """Check, then write physical-device-path and hotplug-status=connected.
    Returns a one-line summary; raises HotplugError (after writing the error
    nodes) if the attach must fail."""
    try:
        summary = await _verify_and_connect(xs, device, sys_module, control_dir, warn)
    except HotplugError as e:
        await _report(xs, device, e)
        raise
    return summary


async def _verify_and_connect(xs: XenStore, device: BackendDevice, sys_module: Path, control_dir: Path,
                              warn: TextIO) -> str:
    be = device.path
    params = await _read(xs, f"{be}/params")
    if params is None:
        raise HotplugError(f"{be}/params is missing: the backend dir is incomplete or gone")
    source = config_path(device, params)
    cfg = _load(source)
    name = await _domain_name(xs, device.frontend_domid)
    disk = served_disk(cfg, device.frontend_domid, name, device.devid)
    check_blkback(device.kind, (sys_module / "xen_blkback").exists())
    state = await _read(xs, f"{be}/state")
    view = BackendView(
        state=int(state) if state is not None and state.strip().isdigit() else None,
        error=await _read(xs, f"{be}/error"),
        mode=await _read(xs, f"{be}/mode") or "r",
        features={k: v for k in _PROBE_KEYS if (v := await _read(xs, f"{be}/{k}")) is not None},
    )
    check_backend(view, source)
    check_features(disk, view.features, source)
    served, silent = await find_daemon(device, control_dir)
    if served is not None:
        check_served_by(served.control, served.driver, served.path, disk, source)
        how = f"daemon at {served.control}"
    else:
        how = "xenstore only: no control socket lists it"
        for reason in silent:
            print(f"{PROG}: {device}: note: {reason}", file=warn)
    mine = Attachment(device.frontend_domid, _shown(name, device.frontend_domid), device.devid,
                      storage_key(disk.path), writable(disk, view.mode))
    check_sharing(mine, await attachments_elsewhere(xs, device))
    for line in mode_warnings(disk, view.mode):
        print(f"{PROG}: {device}: warning: {line}", file=warn)
    pdp = physical_device_path(device.kind, disk)

    async def connect(t) -> bool:
        if await _read(t, f"{be}/state") is None:
            return False
        await t.rm(f"{be}/hotplug-error")
        if pdp is not None:
            await t.write(f"{be}/physical-device-path", pdp)
        await t.write(f"{be}/hotplug-status", "connected")
        return True

    if not await xs.transact(connect):
        raise HotplugError("the backend dir vanished while checking: the device is being removed")
    return (f"{device.kind}/{device.frontend_domid}/{device.devid}: {_shown(name, device.frontend_domid)} "
            f"{disk.name} served from {source} ({disk.driver} {disk.path}, "
            f"{'read-write' if mine.writable else 'read-only'}; checked with the {how})")


def _shown(name: str | None, domid: int) -> str:
    return name if name is not None else f"domid {domid}"


async def _report(xs: XenStore, device: BackendDevice, e: HotplugError) -> None:
    """hotplug-error and hotplug-status, as block-common.sh's fatal/ebusy, in
    one transaction, and only into a backend dir that still exists."""
    be = device.path

    async def write(t) -> None:
        if await _read(t, f"{be}/state") is None:
            return
        await t.write(f"{be}/hotplug-error", e.message)
        await t.write(f"{be}/hotplug-status", e.status)

    try:
        await xs.transact(write)
    except (XenStoreError, ConnectionError):
        pass  # the message still goes to stderr, where libxl's log has it


async def attachments_elsewhere(xs: XenStore, device: BackendDevice) -> list[Attachment]:
    """The disks this script has connected for other devices (hotplug-status =
    connected; `remove` clears it), as their own YAML files describe them."""
    home = device.path[: device.path.index("backend/")]
    configs: dict[str, DomainConfig | None] = {}
    found = []
    for kind in KINDS:
        for domid in await _ints(xs, f"{home}backend/{kind}"):
            for devid in await _ints(xs, f"{home}backend/{kind}/{domid}"):
                other = BackendDevice(f"{home}backend/{kind}/{domid}/{devid}", kind, domid, devid)
                if (kind, domid, devid) == (device.kind, device.frontend_domid, device.devid):
                    continue
                attachment = await _attachment(xs, other, configs)
                if attachment is not None:
                    found.append(attachment)
    return found


async def _attachment(xs: XenStore, device: BackendDevice,
                      configs: dict[str, DomainConfig | None]) -> Attachment | None:
    be = device.path
    if await _read(xs, f"{be}/hotplug-status") != "connected":
        return None
    params = await _read(xs, f"{be}/params")
    try:
        source = config_path(device, params or "")
    except HotplugError:
        return None  # not one of ours (another script connected it)
    if source not in configs:
        try:
            configs[source] = _load(source)
        except HotplugError:
            configs[source] = None  # edited since; its daemon still has the old one
    cfg = configs[source]
    disk = cfg.disk(device.devid) if cfg is not None else None
    if disk is None:
        return None
    mode = await _read(xs, f"{be}/mode") or "r"
    name = await _domain_name(xs, device.frontend_domid)
    return Attachment(device.frontend_domid, _shown(name, device.frontend_domid), device.devid,
                      storage_key(disk.path), writable(disk, mode))


async def _ints(xs: XenStore, path: str) -> list[int]:
    try:
        return [int(n) for n in await xs.directory(path) if n.isdigit()]
    except XenStoreError as e:
        if e.errno in (errno.ENOENT, errno.EACCES):
            return []
        raise


# ---------------------------------------------------------------------- remove

async def remove(xs: XenStore, device: BackendDevice) -> str:
    """Take away what `add` wrote; the daemon released the device when it closed."""
    be = device.path
    state = await _read(xs, f"{be}/state")
    for key in _OUR_NODES:
        try:
            await xs.rm(f"{be}/{key}")
        except XenStoreError as e:
            if e.errno not in (errno.ENOENT, errno.EACCES):
                raise
    if state is None:
        return f"{device.kind}/{device.frontend_domid}/{device.devid}: backend dir already gone"
    note = "" if state.strip() == "6" else f" (backend state {state.strip()}: libxl forced the removal)"
    return f"{device.kind}/{device.frontend_domid}/{device.devid}: removed{note}"


# ---------------------------------------------------------------------- command

async def run(action: str, xenbus_path: str | None, *, xenstore: str | None = None,
              sys_module: Path = SYS_MODULE, control_dir: Path = CONTROL_DIR, out: TextIO = sys.stderr) -> int:
    """One hotplug action, start to end; messages on `out` (libxl's log)."""
    from ..xen.xenstore import XenStoreConnectionError, open_xenstore

    try:
        device = parse_xenbus_path(xenbus_path)
    except HotplugError as e:
        print(f"{PROG}: {action}: error: {e.message}", file=out)
        return EXIT_USAGE
    try:
        with trio.fail_after(DEADLINE):
            async with open_xenstore(xenstore) as xs:
                if action == "add":
                    summary = await add(xs, device, sys_module=sys_module, control_dir=control_dir, warn=out)
                else:
                    summary = await remove(xs, device)
    except HotplugError as e:
        print(f"{PROG}: {action} {device.path}: error: {e.message}", file=out)
        return EXIT_FAILURE
    except trio.TooSlowError:
        print(f"{PROG}: {action} {device.path}: error: xenstore did not answer within {DEADLINE:.0f} s", file=out)
        return EXIT_FAILURE
    except XenStoreError as e:
        print(f"{PROG}: {action} {device.path}: error: xenstore refused: {e}", file=out)
        return EXIT_FAILURE
    except XenStoreConnectionError as e:
        print(f"{PROG}: {action} {device.path}: error: xenstore connection lost: {e}", file=out)
        return EXIT_FAILURE
    except OSError as e:  # connecting
        print(f"{PROG}: {action} {device.path}: error: cannot reach xenstored: {e}", file=out)
        return EXIT_FAILURE
    print(f"{PROG}: {action}: {summary}", file=out)
    return EXIT_OK


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="libxl's hotplug script for disks served by xenblk-vhost (xl disk line: "
        "script=block-xenblk-vhost, target=/etc/xenblk-vhost/<domain>.yaml). libxl runs it with "
        "XENBUS_PATH set; `add` checks that xenblk-vhost serves the device as the YAML file says and "
        "writes hotplug-status, `remove` cleans up. Exit 0 on success, 1 with hotplug-error written "
        "otherwise.")
    add_arguments(parser)
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=("add", "remove"), help="what libxl asks")
    parser.add_argument("--xenstore", metavar="PATH",
                        help="xenstored socket or xenbus device (default: $XENSTORED_PATH, the usual "
                        "sockets, /dev/xen/xenbus)")
    parser.add_argument("--control-dir", metavar="DIR", type=Path, default=CONTROL_DIR,
                        help=f"where the daemons' control sockets (control*.sock) are (default {CONTROL_DIR})")


def run_from_args(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> int:
    env = os.environ if environ is None else environ
    return trio.run(lambda: run(args.action, env.get("XENBUS_PATH"), xenstore=args.xenstore,
                                control_dir=args.control_dir))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    return run_from_args(args)
