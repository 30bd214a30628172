"""`xenblk-vhost demo`: the whole stack on a machine without Xen, verified byte for byte.

What runs, all of it under one temporary directory removed at the end:

    simulated hypervisor        its own process and session (sim/world.py, as tests use it)
    simulated xenstored         a task of this process
    qemu-storage-daemon         with --driver virtio-blk-vhost-user: exports the disk file
                                over vhost-user-blk (storage_daemon.py)
    the backend                 the same Service `xenblk-vhost run` runs, in this process,
                                with its own xenstore connection and Platform, configured
                                by an embedded YAML file (validated like any other)
    a guest domain              its own process: the reference frontend (behaves like
                                Linux xen-blkfront) running workload.py (guest.py)

The disk is a sparse file. The run: toolstack creates the domain and adds
the vbd (libxl's nodes), the backend goes InitWait, the guest connects and
runs the timed workload, reads everything back, then the demo reads the
backend's counters, lets the guest close, destroys the domain and stops
everything in reverse order.

Ctrl-C (or SIGTERM): the guest is told to stop; what it had in flight is
answered, the summary of what ran is printed, everything is cleaned up,
exit 130. A second Ctrl-C cancels the orderly stop (still cleaning up).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from ..backend.xenbus.service import Service
from ..config import ConfigError, parse_config
from ..exit_codes import EXIT_USAGE
from ..observability.snapshot import service_snapshot
from ..sim import open_sim
from ..sim.processes import HelperProcess, HelperProcessError, helper_process
from ..sim.toolstack import VbdConfig
from ..xen.xenstore import open_xenstore
from .progress import Progress
from .storage_daemon import StorageDaemonError, vhost_user_export
from .summary import build_summary, render_text

log = logging.getLogger(__name__)

DRIVERS = ("io_uring", "virtio-blk-vhost-user")
DATA_PATHS = ("copy", "map")

DEFAULT_SECONDS = 10.0
DEFAULT_QUEUES = 2
DEFAULT_DISK_MIB = 64
DEFAULT_DEPTH = 16
# What the demo's guest asks for: multi-page rings and Linux blkfront's
# default indirect segments, so that the run shows both at work.
GUEST_RING_PAGE_ORDER = 2
GUEST_MAX_INDIRECT_SEGMENTS = 32
STALL_TIMEOUT = 30.0  # the guest reports twice a second; this long silent means stuck
CLOSE_TIMEOUT = 30.0
MAX_UNIX_SOCKET_PATH = 108  # sun_path, with its terminating NUL

# The backend's configuration: a YAML file like an operator's.
DEMO_CONFIG = """\
domain: {{name: {name}}}
disks:
  - vdev: xvda
    driver: {driver}
    path: {path}
    queues: {queues}
    ring_page_order: 4
    max_indirect_segments: 256
    data_path: {data_path}
    persistent_grants: true
    discard: true
"""
GUEST_NAME = "demo"


class DemoUsageError(ValueError):
    """Options that cannot work together."""


@dataclass(frozen=True)
class DemoOptions:
    seconds: float = DEFAULT_SECONDS
    driver: str = "io_uring"
    queues: int = DEFAULT_QUEUES
    data_path: str | None = None  # None: map for io_uring (zero-copy), copy for vhost-user
    disk_mib: int = DEFAULT_DISK_MIB
    depth: int = DEFAULT_DEPTH
    seed: int = 1
    tmp_parent: str | None = None  # where the temporary directory goes (default: $TMPDIR)

    def resolved_data_path(self) -> str:
        return self.data_path or ("map" if self.driver == "io_uring" else "copy")

    def check(self) -> None:
        if self.driver not in DRIVERS:
            raise DemoUsageError(f"--driver must be one of {', '.join(DRIVERS)}")
        if not (math.isfinite(self.seconds) and 0 < self.seconds <= 3600):
            raise DemoUsageError("--seconds must be more than 0 and at most 3600")
        if not 1 <= self.queues <= 16:
            raise DemoUsageError("--queues must be 1..16")
        if self.data_path not in (None, *DATA_PATHS):
            raise DemoUsageError(f"--data-path must be one of {', '.join(DATA_PATHS)}")
        if self.resolved_data_path() == "map" and self.driver != "io_uring":
            raise DemoUsageError("--data-path map needs --driver io_uring: vhost-user storage reads and "
                                 "writes only memory shared with its server, which grant-mapped guest pages "
                                 "are not (use --data-path copy)")


@dataclass
class DemoRun:
    """A run in progress: what tests and the signal handler may look at or do."""

    workdir: Path | None = None
    image: Path | None = None
    at_rest: tuple | None = None  # (first sector, sectors) the guest writes once and re-reads
    on_progress: Callable[[DemoRun, dict], None] | None = None  # test hook, each guest report
    interrupted: bool = False
    _guest: HelperProcess | None = None
    _all_scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def interrupt(self) -> None:
        """First call: stop in order (summary of what ran). Second: stop at once (cleanup still runs)."""
        if self.interrupted:
            self._all_scope.cancel()
            return
        self.interrupted = True
        if self._guest is not None:
            self._guest.signal(signal.SIGTERM)  # it stops, reports what ran and closes its device
        else:
            self._all_scope.cancel()  # still setting up: nothing ran yet


@asynccontextmanager
async def demo_backend(hypervisor_path: str, xenstore_path: str, configs) -> AsyncIterator[Service]:
    """The backend `run` runs (Service), with its own xenstore connection and Platform."""
    with open_sim(hypervisor_path) as platform:
        async with open_xenstore(xenstore_path) as xs:
            service = Service(xs, platform, configs)
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                try:
                    yield service
                finally:
                    nursery.cancel_scope.cancel()


def guest_argv(opts: DemoOptions, host, domid: int, devid: int) -> list[str]:
    return [sys.executable, "-m", "xenblk_vhost.demo.guest",
            "--hypervisor", host.hypervisor_path, "--xenstore", host.xenstore_path,
            "--domid", str(domid), "--devid", str(devid), "--seconds", str(opts.seconds),
            "--depth", str(opts.depth), "--seed", str(opts.seed), "--max-queues", str(opts.queues),
            "--max-ring-page-order", str(GUEST_RING_PAGE_ORDER),
            "--max-indirect-segments", str(GUEST_MAX_INDIRECT_SEGMENTS),
            "--zeroed"]  # the disk is a fresh sparse file: what was never written reads as zeros


def _progress_detail(report: dict) -> str:
    elapsed = report.get("elapsed_s") or 0.0
    ops = report["timed_requests"]
    errors = report["errors"] + report["mismatches"]
    rate = f"{ops / elapsed:6.0f} IOPS {report['timed_bytes'] / elapsed / 1e6:6.1f} MB/s" if elapsed else ""
    return (f"{report['requests']:7d} requests {rate}  verified {report['bytes_verified'] / (1 << 20):7.1f} MiB  "
            f"errors {errors}")


class _GuestSession:
    """The guest's stdout events, read as they come."""

    def __init__(self, child, run: DemoRun, progress: Progress, seconds: float, state: dict) -> None:
        self.child = child
        self.state = state  # kept current: a hard stop still summarizes what ran
        self.run = run
        self.progress = progress
        self.seconds = seconds
        self.seen = 0
        self.connected: dict | None = None
        self.report: dict | None = None
        self.finished = False
        self.closed: dict | None = None
        self.failed: str | None = None

    def _handle(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "connected":
            self.connected = event
            self.state["negotiated"] = event["negotiated"]
        elif kind in ("progress", "finished"):
            self.report = self.state["report"] = event["report"]
            self.run.at_rest = tuple(self.report["at_rest"])
            verifying = self.report["elapsed_s"] >= self.seconds or kind == "finished"
            self.progress.update(min(self.report["elapsed_s"], self.seconds),
                                 ("verifying  " if verifying and kind != "finished" else "")
                                 + _progress_detail(self.report), force=kind == "finished")
            if self.run.on_progress is not None:
                self.run.on_progress(self.run, self.report)
            self.finished = kind == "finished"
        elif kind == "closed":
            self.closed = event
        elif kind == "failed":
            self.failed = event.get("error", "failed")

    async def until(self, done: Callable[[], bool]) -> None:
        """Handle events until done() or the guest's output ends; a stalled guest is a failure."""
        while True:
            while self.seen < len(self.child.lines):
                line = self.child.lines[self.seen]
                self.seen += 1
                if line.startswith("{"):
                    self._handle(json.loads(line))
            if done() or self.child.eof:
                return
            with trio.move_on_after(STALL_TIMEOUT) as stalled:
                await self.child.changed()
            if stalled.cancelled_caught:
                raise HelperProcessError(f"the guest reported nothing for {STALL_TIMEOUT:g} s")


def _log_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""


def _leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in _leaves(e)]
    return [group]


def _describe(e: BaseException) -> str:
    if isinstance(e, ConfigError):
        return "; ".join(map(str, e.problems))
    if isinstance(e, trio.TooSlowError):
        return "a step of the demo timed out"
    if isinstance(e, (StorageDaemonError, HelperProcessError)):
        return str(e)
    return f"{type(e).__name__}: {e}"


async def run_demo(opts: DemoOptions, *, progress: Progress | None = None, run: DemoRun | None = None) -> dict:
    """The whole demo; its summary (see summary.py). Raises DemoUsageError for bad options."""
    opts.check()
    run = run or DemoRun()
    progress = progress or Progress(opts.seconds, enabled=False)
    tmp = Path(tempfile.mkdtemp(prefix="xbv-demo-", dir=opts.tmp_parent))
    state: dict[str, Any] = {"negotiated": None, "report": None, "backend": None, "frontend_errors": None,
                             "failure": None}
    try:
        with run._all_scope:
            await _run_in(tmp, opts, progress, run, state)
    except* (StorageDaemonError, HelperProcessError, ConfigError, OSError, trio.TooSlowError) as group:
        state["failure"] = "; ".join(_describe(e) for e in _leaves(group))
    except* Exception as group:  # a bug: say so with its traceback, still clean up and summarize
        log.error("demo failed unexpectedly", exc_info=group)
        state["failure"] = "; ".join(_describe(e) for e in _leaves(group))
    finally:
        progress.finish()
        shutil.rmtree(tmp, ignore_errors=True)
    return build_summary(driver=opts.driver, data_path=opts.resolved_data_path(), queues=opts.queues,
                         disk_bytes=opts.disk_mib << 20, seconds=opts.seconds, negotiated=state["negotiated"],
                         report=state["report"], backend=state["backend"],
                         frontend_errors=state["frontend_errors"], interrupted=run.interrupted,
                         failure=state["failure"])


async def _run_in(tmp: Path, opts: DemoOptions, progress: Progress, run: DemoRun, state: dict) -> None:
    run.workdir = tmp
    if len(os.fsencode(tmp)) + len("/hypervisor.sock") >= MAX_UNIX_SOCKET_PATH:
        raise OSError(f"the temporary directory {tmp} is too long a path for the demo's unix sockets "
                      f"({MAX_UNIX_SOCKET_PATH} bytes at most): set TMPDIR to a shorter directory")
    image = run.image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(opts.disk_mib << 20)
    async with AsyncExitStack() as stack:
        target = image
        if opts.driver == "virtio-blk-vhost-user":
            progress.message(f"starting qemu-storage-daemon (vhost-user-blk, {opts.queues} queue(s))")
            export = await stack.enter_async_context(vhost_user_export(image, tmp, num_queues=opts.queues))
            target = export.socket
        config = parse_config(DEMO_CONFIG.format(name=GUEST_NAME, driver=opts.driver, path=json.dumps(str(target)),
                                                 queues=opts.queues, data_path=opts.resolved_data_path()),
                              source="<demo config>", base=tmp)
        # Imported here, not with the module: `xenblk-vhost` builds every subcommand's parser,
        # and the simulated hypervisor needs libatomic, which a dom0 may not have.
        from ..sim.world import open_world

        host = await stack.enter_async_context(open_world(tmp))
        service = await stack.enter_async_context(demo_backend(host.hypervisor_path, host.xenstore_path, [config]))
        domid = (await host.create_guest(GUEST_NAME)).domid
        vbd = await host.attach_vbd(domid, VbdConfig(vdev="xvda", target=str(target)))
        guest_log = stack.enter_context(open(tmp / "guest.log", "wb"))
        child = await stack.enter_async_context(
            helper_process(guest_argv(opts, host, domid, vbd.devid), name="guest", stdin=True,
                           stderr_file=guest_log))
        progress.message(f"guest domain {domid} running the reference frontend on xvda "
                         f"({opts.driver}, {opts.resolved_data_path()} data path)")
        session = _GuestSession(child, run, progress, opts.seconds, state)
        run._guest = child
        try:
            await session.until(lambda: session.finished or session.failed is not None)
            if session.finished:
                # The rings are still up: the backend's counters include every request.
                for entry in service_snapshot(service)["vbds"]:
                    if entry["domid"] == domid and entry["devid"] == vbd.devid:
                        state["backend"] = {"total": entry["total"], "rings": entry["rings"]}
                await child.send_line("close")
                with trio.move_on_after(CLOSE_TIMEOUT):
                    await session.until(lambda: session.closed is not None)
            if session.closed is not None:
                state["frontend_errors"] = session.closed["frontend_errors"]
            elif session.failed is not None:
                tail = _log_tail(tmp / "guest.log")
                state["failure"] = f"guest: {session.failed}" + (f"; its log: {tail}" if tail else "")
            else:
                status = await child.stop()
                state["failure"] = (f"the guest ended without closing its device (status {status}); "
                                    f"its log: {_log_tail(tmp / 'guest.log')}")
            await child.stop(CLOSE_TIMEOUT)
        finally:
            run._guest = None
        with trio.move_on_after(CLOSE_TIMEOUT) as destroy:
            await host.destroy_guest(domid)
        if destroy.cancelled_caught and state["failure"] is None:
            state["failure"] = "the toolstack could not destroy the guest domain in time"


# ------------------------------------------------------------------ command line

def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="run the whole stack on a simulated Xen and verify it (no Xen needed)",
        description="Start a simulated hypervisor and xenstored, a guest domain running a reference "
        "frontend (it behaves like Linux xen-blkfront) in its own process, and the real backend serving it "
        "from a temporary sparse disk; run a verifying mixed workload (reads, writes, flush, barrier, "
        "discard; single-segment, multi-segment and indirect requests), then print a summary. "
        "Exit 0 when every byte read back was right, 1 otherwise, 130 after Ctrl-C. "
        "Everything started is stopped and the temporary directory removed.",
    )
    p.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, metavar="N",
                   help=f"how long the workload runs (default {DEFAULT_SECONDS:g}); the final read-back comes after")
    p.add_argument("--driver", choices=DRIVERS, default="io_uring",
                   help="libblkio driver: io_uring on the file, or virtio-blk-vhost-user to a "
                   "qemu-storage-daemon exporting it (default io_uring)")
    p.add_argument("--queues", type=int, default=DEFAULT_QUEUES, metavar="N",
                   help=f"rings (and storage queues) offered and asked for (default {DEFAULT_QUEUES})")
    p.add_argument("--data-path", choices=DATA_PATHS, default=None,
                   help="copy (grant copy into our buffers) or map (grant map, persistent grants; io_uring only); "
                   "default: map for io_uring, copy for virtio-blk-vhost-user")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on stdout")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    opts = DemoOptions(seconds=args.seconds, driver=args.driver, queues=args.queues, data_path=args.data_path)
    try:
        opts.check()
    except DemoUsageError as e:
        print(f"xenblk-vhost demo: {e}", file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    progress = Progress(opts.seconds, label="demo")
    summary = trio.run(_main, opts, progress)
    if args.json:
        print(json.dumps(summary, indent=None, sort_keys=True))
    else:
        print(render_text(summary))
    return summary["exit_status"]


async def _main(opts: DemoOptions, progress: Progress) -> dict:
    run = DemoRun()
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for _ in signals:
                    progress.message("stopping (Ctrl-C again to stop at once)" if not run.interrupted
                                     else "stopping at once")
                    run.interrupt()

            nursery.start_soon(on_signals)
            summary = await run_demo(opts, progress=progress, run=run)
            nursery.cancel_scope.cancel()
    return summary


__all__ = ["DemoOptions", "DemoRun", "DemoUsageError", "add_parser",
           "main", "run_demo"]
