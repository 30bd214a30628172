"""What a running daemon answers over its control socket: the operator's commands.

    commands = ControlCommands(service, started=time.monotonic(), reload=reload_files)
    nursery.start_soon(control.serve, commands.handlers())

    stats                       every vbd's counters (snapshot.py), as `xenblk-vhost stats` always had
    list                        every configured domain, present or not, and each of its disks: state,
                                rings, data path, paused, last error (kept after the device ended)
    status   target=D[/V]       one domain's (or disk's) entries with what the frontend connected
                                with, what the vbd offers and its per-ring counters
    pause    target=D[/V] timeout=30
                                the snapshot hook: each attached disk takes no new request and the
                                reply comes once nothing is in flight (all of them or none: a disk
                                that does not drain in time leaves every one resumed, and says so)
    resume   target=D[/V]       take requests again
    detach   target=D/V timeout=10
                                the backend closes the disk (Closing, the frontend closes, drained,
                                storage released, Closed), as the toolstack's remove makes it do
    reload                      re-read the daemon's files: what changed, or why not (exit 2)
    upgrade                     hand the disks over to a fresh exec of the daemon (daemon/handover.py):
                                the reply, once the new one has them, names both pids and the drain

A target names a domain as its file does (name, or domid for a file that
gives a domid; a running domain's domid works too) and optionally a disk
by vdev (xvda, 51712). Every refusal is CommandRefused: one line, and the
exit status the command line should give (1: cannot now; 2: the request
or the files are wrong).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Awaitable, Callable

import trio

from .. import __version__
from ..config import ConfigError, DomainConfig
from ..exit_codes import EXIT_FAILURE, EXIT_USAGE
from ..vdev import VdevError, parse_vdev, vdev_name
from .control_socket import CommandRefused, Handler, ReplyThen
from .snapshot import service_snapshot

DEFAULT_PAUSE_TIMEOUT = 30.0
DEFAULT_DETACH_TIMEOUT = 10.0  # libxl's own wait for a vbd to close
MAX_TIMEOUT = 3600.0
MAX_TARGET = 256

# reload(): the files re-read and applied -> what changed (one line each); ConfigError if refused.
Reload = Callable[[], Awaitable[list[str]]]
# upgrade(): handed over -> (the reply's payload, what ends this daemon once the reply is sent);
# an exception (the daemon's HandoverRefused) if the new daemon did not take over.
Upgrade = Callable[[], Awaitable[tuple[dict, Callable[[], None]]]]


def _timeout(request: dict, default: float) -> float:
    value = request.get("timeout", default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= MAX_TIMEOUT \
            or not math.isfinite(value):
        raise CommandRefused(f"timeout must be a number of seconds in (0, {MAX_TIMEOUT:g}]", exit_status=EXIT_USAGE)
    return float(value)


def _error(report) -> dict | None:
    return {"message": report.message, "at": report.at} if report is not None else None


class ControlCommands:
    def __init__(self, service, *, started: float | None = None, reload: Reload | None = None,
                 upgrade: Upgrade | None = None) -> None:
        self._service = service
        self._started = started
        self._reload = reload
        self._upgrade = upgrade

    def handlers(self) -> dict[str, Handler]:
        handlers: dict[str, Handler] = {"stats": self.stats, "list": self.list_domains, "status": self.status,
                                        "pause": self.pause, "resume": self.resume, "detach": self.detach}
        if self._reload is not None:
            handlers["reload"] = self.reload
        if self._upgrade is not None:
            handlers["upgrade"] = self.upgrade
        return handlers

    def _header(self) -> dict:
        uptime = round(time.monotonic() - self._started, 3) if self._started is not None else None
        return {"pid": os.getpid(), "version": __version__, "uptime_s": uptime}

    # ------------------------------------------------------------------ what is there

    def _devices_of(self, label: str) -> dict[int, list]:
        """The running devices of the domain the config labels `label`, by devid."""
        out: dict[int, list] = {}
        for did, device in sorted(self._service.devices.items(), key=lambda item: (item[0].kind, item[0].devid)):
            if self._service.labels.get(did) == label:
                out.setdefault(did.devid, []).append((did, device))
        return out

    def _disk_entry(self, cfg: DomainConfig, devid: int, did, device, *, detail: bool = False) -> dict:
        disk = cfg.disk(devid)
        entry: dict = {
            "vdev": vdev_name(devid), "devid": devid, "configured": disk is not None,
            "driver": disk.driver if disk is not None else None, "path": disk.path if disk is not None else None,
            "device": None, "kind": None, "state": "not attached", "rings": 0, "data_path": None,
            "serving": False, "paused": False, "storage": None,
            "last_error": _error(self._service.last_errors.get((cfg.label, devid))),
        }
        if device is None:
            return entry
        vbd = device.vbd
        entry.update(device=str(did), kind=did.kind, state=device.state.label, paused=device.paused,
                     rings=len(device.connection.rings) if device.connection is not None else 0,
                     data_path=vbd.features.data_path if vbd is not None else None,
                     serving=bool(vbd is not None and vbd.serving))
        if vbd is not None:
            entry["storage"] = vbd.stats().get("storage")  # the storage link: connected, reconnecting...
        if device.last_error is not None:
            entry["last_error"] = _error(device.last_error)
        if detail:
            spec = device.connection
            entry["connection"] = None if spec is None else {
                "protocol": spec.abi.value, "persistent_grants": spec.persistent_grants,
                "rings": [{"index": r.index, "order": r.order, "event_channel": r.event_channel} for r in spec.rings]}
            entry["features"] = dataclasses.asdict(vbd.features) if vbd is not None else None
            entry["stats"] = vbd.stats() if vbd is not None else None
        return entry

    def _domain_entry(self, cfg: DomainConfig, present: dict[str, int], *, vdev: int | None = None,
                      detail: bool = False) -> dict:
        if cfg.domid is not None:
            domid = cfg.domid if cfg.domid in present.values() else None
        else:
            domid = present.get(cfg.name) if cfg.name is not None else None
        devices = self._devices_of(cfg.label)
        # The configured disks, then devices the file does not have (refused, their error kept).
        refused = {devid for label, devid in self._service.last_errors if label == cfg.label}
        devids = [d.vdev for d in cfg.disks] + sorted((set(devices) | refused) - {d.vdev for d in cfg.disks})
        disks = []
        for devid in devids:
            if vdev is not None and devid != vdev:
                continue
            running = devices.get(devid) or [(None, None)]
            disks += [self._disk_entry(cfg, devid, did, device, detail=detail) for did, device in running]
        return {"domain": cfg.label, "name": cfg.name, "domid": domid, "present": domid is not None,
                "config": cfg.source, "disks": disks}

    async def list_domains(self, request: dict) -> dict:
        present = await self._service.domain_ids()
        return {**self._header(), "domains": [self._domain_entry(c, present) for c in self._service.configs]}

    def _target(self, request: dict, *, need_vdev: bool = False) -> tuple[DomainConfig, int | None]:
        """The config a request's `target` (DOMAIN[/VDEV]) names, and the devid if it names a disk."""
        target = request.get("target")
        if not isinstance(target, str) or not target or len(target) > MAX_TARGET:
            raise CommandRefused("name a domain (as its YAML file does) or a disk: DOMAIN or DOMAIN/VDEV",
                                 exit_status=EXIT_USAGE)
        domain, sep, vdev_text = target.rpartition("/") if "/" in target else (target, "", "")
        devid = None
        if sep:
            try:
                devid = parse_vdev(vdev_text)
            except VdevError as e:
                raise CommandRefused(f"{target}: {e}", exit_status=EXIT_USAGE) from None
        elif need_vdev:
            raise CommandRefused(f"{target}: name the disk too (DOMAIN/VDEV, e.g. {target}/xvda)",
                                 exit_status=EXIT_USAGE)
        configs = self._service.configs
        cfg = next((c for c in configs if c.label == domain), None)
        # A running domain's domid. isascii: "²" is a digit to isdigit() but not to int().
        if cfg is None and domain.isascii() and domain.isdigit():
            running = {self._service.labels.get(did) for did in self._service.devices
                       if did.frontend_domid == int(domain)}
            cfg = next((c for c in configs if c.label in running), None)
        if cfg is None:
            known = ", ".join(c.label for c in configs) or "none"
            raise CommandRefused(f"{domain!r} is not configured in this daemon (configured: {known})")
        if devid is not None and cfg.disk(devid) is None and devid not in self._devices_of(cfg.label):
            raise CommandRefused(f"{cfg.label} has no disk {vdev_name(devid)} (configured: "
                                 f"{', '.join(d.name for d in cfg.disks)})")
        return cfg, devid

    async def status(self, request: dict) -> dict:
        cfg, devid = self._target(request)
        present = await self._service.domain_ids()
        return {**self._header(), "domain": self._domain_entry(cfg, present, vdev=devid, detail=True)}

    def _attached(self, cfg: DomainConfig, devid: int | None, what: str) -> list[tuple]:
        devices = [pair for d, pairs in self._devices_of(cfg.label).items() if devid is None or d == devid
                   for pair in pairs]
        if not devices:
            which = f"{cfg.label}/{vdev_name(devid)} is" if devid is not None else f"no disk of {cfg.label} is"
            raise CommandRefused(f"{which} attached: nothing to {what}")
        return devices

    # ------------------------------------------------------------------ acting

    async def pause(self, request: dict) -> dict:
        cfg, devid = self._target(request)
        timeout = _timeout(request, DEFAULT_PAUSE_TIMEOUT)
        devices = self._attached(cfg, devid, "pause")
        took: dict[str, float] = {}
        start = time.monotonic()

        async def pause_one(did, device) -> None:
            await device.pause()
            took[str(did)] = round(time.monotonic() - start, 3)

        with trio.move_on_after(timeout):
            async with trio.open_nursery() as nursery:
                for did, device in devices:
                    nursery.start_soon(pause_one, did, device)
        if len(took) < len(devices):
            # All or nothing: a snapshot of half a domain's disks is no snapshot. Those cut
            # short resumed themselves (Device.pause); resume the ones that made it.
            late = [f"{vdev_name(did.devid)} ({_in_flight(device)} in flight)"
                    for did, device in devices if str(did) not in took]
            for did, device in devices:
                if str(did) in took:
                    await device.resume()
            raise CommandRefused(f"{cfg.label}: not paused: {', '.join(late)} still had requests in the "
                                 f"storage after {timeout:g} s; every disk resumed")
        return {"domain": cfg.label, "disks": [
            {"vdev": vdev_name(did.devid), "device": str(did), "paused": True, "drained_after_s": took[str(did)]}
            for did, device in devices]}

    async def resume(self, request: dict) -> dict:
        cfg, devid = self._target(request)
        out = []
        for did, device in self._attached(cfg, devid, "resume"):
            was = device.paused
            await device.resume()
            out.append({"vdev": vdev_name(did.devid), "device": str(did), "paused": False, "was_paused": was})
        return {"domain": cfg.label, "disks": out}

    async def detach(self, request: dict) -> dict:
        cfg, devid = self._target(request, need_vdev=True)
        timeout = _timeout(request, DEFAULT_DETACH_TIMEOUT)
        out = []
        start = time.monotonic()
        for did, device in self._attached(cfg, devid, "detach"):
            with trio.move_on_after(max(0.0, timeout - (time.monotonic() - start))) as scope:
                await device.detach()
            if scope.cancelled_caught:
                raise CommandRefused(
                    f"{cfg.label}/{vdev_name(did.devid)}: the frontend has not closed after {timeout:g} s (backend "
                    f"{device.state.label}): the disk is released as soon as the guest lets go (is it mounted?)")
            out.append({"vdev": vdev_name(did.devid), "device": str(did), "state": device.state.label,
                        "seconds": round(time.monotonic() - start, 3)})
        return {"domain": cfg.label, "disks": out}

    async def reload(self, request: dict) -> dict:
        assert self._reload is not None
        try:
            changes = await self._reload()
        except ConfigError as e:
            raise CommandRefused("reload refused: the files do not validate; the running configuration is kept",
                                 exit_status=EXIT_USAGE, problems=[str(p) for p in e.problems]) from None
        except OSError as e:
            raise CommandRefused(f"reload refused: {e}", exit_status=EXIT_FAILURE) from None
        return {"changes": changes, "domains": [c.label for c in self._service.configs]}

    async def upgrade(self, request: dict) -> dict:
        assert self._upgrade is not None
        try:
            payload, then = await self._upgrade()
        except CommandRefused:
            raise
        except Exception as e:  # the new daemon did not take over: this one serves on (or says it exits)
            raise CommandRefused(f"upgrade refused: {e}", exit_status=EXIT_FAILURE) from None
        return ReplyThen(payload, then)

    async def stats(self, request: dict) -> dict:
        await refresh_stats(self._service)
        return service_snapshot(self._service, started=self._started)


async def refresh_stats(service) -> None:
    """Every vbd's counters brought up to now (ring worker processes asked for theirs, all at once)."""
    async with trio.open_nursery() as nursery:
        for device in list(service.devices.values()):
            if device.vbd is not None:
                nursery.start_soon(device.vbd.refresh_stats)


def _in_flight(device) -> int:
    return device.vbd.stats()["total"]["in_flight"] if device.vbd is not None else 0
