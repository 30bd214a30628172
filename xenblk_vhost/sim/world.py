"""A whole simulated Xen host for tests, benchmarks and the demo.

    async with open_world(tmp_dir) as world:
        guest = await world.create_guest("guest1", pages=8192)
        vbd = await world.add_vbd(guest.domid, VbdConfig(vdev="xvda", target="/srv/disk.img"))
        backend = await world.start_process([... a backend ...], name="backend")  # waits for "ready"
        result = await world.run_frontend(guest.domid, vbd.devid, requests=10_000, depth=32)
        await world.detach_vbd(vbd); await world.destroy_guest(guest.domid)
    # every process stopped, every domain destroyed, xenstored and the hypervisor gone

What runs where: the simulated hypervisor is always its own process (its
callers block on it); xenstored runs in this process (a trio task) or,
with xenstored="process", as `python -m xenblk_vhost.sim.xenstored`; the
reference frontend always runs in its own process (`python -m
xenblk_vhost.sim.blkfront`), as a guest kernel would; backends are
whatever process the caller starts. `world.xs` is the toolstack's (dom0's)
xenstore connection; the toolstack functions of toolstack.py write
exactly what libxl would.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio

from ..xen.xenstore import XenStoreClient, open_xenstore
from . import toolstack
from .blkfront_config import BlkfrontOptions
from .hypercall import Hypercalls
from .hypervisor import hypervisor_process
from .processes import CollectedProcess
from .toolstack import VbdConfig, VbdPaths
from .xenstored import serve_xenstored


@dataclass(frozen=True)
class GuestDomain:
    domid: int
    name: str
    pages: int
    grant_frames: int


class ManagedProcess(CollectedProcess):
    """A child process of the world: its stdout collected line by line."""

    async def wait_line(self, predicate, timeout: float) -> str:
        """The first stdout line (seen so far or to come) satisfying predicate."""
        with trio.fail_after(timeout):
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    if predicate(line):
                        return line
                seen = len(self.lines)
                if self.eof:
                    raise RuntimeError(f"{self.name} exited (rc={self.proc.returncode}) "
                                       f"without the line expected; output: {self.lines[-5:]}")
                await self._changed.wait()

    async def wait(self, timeout: float) -> int:
        """Wait for exit (and the end of its output); the exit status."""
        with trio.fail_after(timeout):
            while not self.eof:
                await self.changed()
            return await self.proc.wait()

    def last_json(self) -> dict:
        for line in reversed(self.lines):
            if line.startswith("{"):
                return json.loads(line)
        raise ValueError(f"{self.name} printed no JSON; output: {self.lines[-5:]}")


class World:
    def __init__(self, workdir: Path, nursery: trio.Nursery, xs: XenStoreClient,
                 xenstore_path: str, hypervisor_path: str) -> None:
        self.workdir = workdir
        self.xs = xs
        self.xenstore_path = xenstore_path
        self.hypervisor_path = hypervisor_path
        self._nursery = nursery
        self._hc = Hypercalls(hypervisor_path)
        self.guests: dict[int, GuestDomain] = {}
        self.processes: list[ManagedProcess] = []

    # ---- domains -----------------------------------------------------------------------

    async def create_guest(self, name: str, *, pages: int = 8192, grant_frames: int = 32,
                           domain_type: str = "pvh") -> GuestDomain:
        """A new domain in the hypervisor, and libxl's nodes for it in xenstore."""
        reply, _ = self._hc.call("create_domain", pages=pages, grant_frames=grant_frames)
        guest = GuestDomain(reply["domid"], name, pages, grant_frames)
        self.guests[guest.domid] = guest
        await toolstack.create_domain_nodes(self.xs, guest.domid, name, domain_type=domain_type,
                                            max_memkb=pages * 4)
        return guest

    async def destroy_guest(self, domid: int, *, timeout: float = toolstack.LIBXL_DESTROY_TIMEOUT) -> dict:
        """`xl destroy`: the toolstack removes devices and nodes, Xen kills the
        domain, and xenstored, seeing it die, fires @releaseDomain."""
        outcomes = await toolstack.destroy_domain(self.xs, domid, timeout=timeout)
        self._hc.call("destroy_domain", domid=domid)
        self.guests.pop(domid, None)
        await self.xs.release_domain(domid)
        return outcomes

    def hypervisor_counters(self) -> dict[str, int]:
        """The simulated Xen's own counters (pins_repaired: grant pins of backends killed inside a pin or
        unpin, put right when they died: sim/pin_ledger.py)."""
        return self._hc.call("counters")[0]

    # ---- devices -----------------------------------------------------------------------

    async def add_vbd(self, domid: int, cfg: VbdConfig) -> VbdPaths:
        return await toolstack.add_vbd(self.xs, domid, cfg)

    async def attach_vbd(self, domid: int, cfg: VbdConfig, timeout: float = toolstack.LIBXL_INIT_TIMEOUT) -> VbdPaths:
        return await toolstack.attach_vbd(self.xs, domid, cfg, timeout)

    async def detach_vbd(self, paths: VbdPaths, *, timeout: float = toolstack.LIBXL_DESTROY_TIMEOUT):
        return await toolstack.detach_vbd(self.xs, paths, timeout=timeout)

    # ---- processes ---------------------------------------------------------------------

    async def start_process(self, argv: Sequence[str], *, name: str, ready: str | None = "ready",
                            timeout: float = 30.0, env: dict | None = None) -> ManagedProcess:
        """Start a child; if `ready` is given, wait for that stdout line."""
        proc = await trio.lowlevel.open_process(
            list(argv), stdout=subprocess.PIPE, env=dict(os.environ, **(env or {})))
        managed = ManagedProcess(name, proc)
        self.processes.append(managed)
        self._nursery.start_soon(managed._collect)
        if ready is not None:
            try:
                await managed.wait_line(lambda line: line.strip() == ready, timeout)
            except BaseException:
                await managed.stop()
                raise
        return managed

    def frontend_argv(self, domid: int, devid: int, options: BlkfrontOptions = BlkfrontOptions(), *,
                      requests: int = 1000, depth: int = 16, mix: str | None = None, max_sectors: int = 64,
                      seed: int = 1, final_verify: bool = True, wait_detach: float = 0.0,
                      region_sectors: int = 0, seconds: float = 0.0, stop_file: str = "") -> list[str]:
        argv = [sys.executable, "-m", "xenblk_vhost.sim.blkfront",
                "--hypervisor", self.hypervisor_path, "--xenstore", self.xenstore_path,
                "--domid", str(domid), "--devid", str(devid),
                "--max-indirect-segments", str(options.max_indirect_segments),
                "--max-queues", str(options.max_queues),
                "--max-ring-page-order", str(options.max_ring_page_order),
                "--protocol", options.protocol or "none",
                "--initial-index", str(options.initial_index),
                "--state-timeout", str(options.state_timeout),
                "--requests", str(requests), "--depth", str(depth), "--max-sectors", str(max_sectors),
                "--seed", str(seed), "--region-sectors", str(region_sectors), "--seconds", str(seconds)]
        if stop_file:
            argv += ["--stop-file", stop_file]
        if not options.feature_persistent:
            argv.append("--no-persistent")
        if options.skip_init_wait:
            argv.append("--skip-init-wait")
        if mix:
            argv += ["--mix", mix]
        if not final_verify:
            argv.append("--no-final-verify")
        if wait_detach:
            argv += ["--wait-detach", str(wait_detach)]
        return argv

    async def start_frontend(self, domid: int, devid: int, options: BlkfrontOptions = BlkfrontOptions(),
                             **workload) -> ManagedProcess:
        """The reference frontend in its own process, as the guest's kernel."""
        return await self.start_process(self.frontend_argv(domid, devid, options, **workload),
                                        name=f"blkfront-d{domid}-{devid}", ready=None)

    async def run_frontend(self, domid: int, devid: int, options: BlkfrontOptions = BlkfrontOptions(), *,
                           timeout: float = 120.0, **workload) -> dict:
        """Start the frontend, wait for it to finish, return its JSON report
        (with "returncode" added)."""
        proc = await self.start_frontend(domid, devid, options, **workload)
        rc = await proc.wait(timeout)
        out = proc.last_json()
        out["returncode"] = rc
        return out

    # ---- teardown ----------------------------------------------------------------------

    async def _shutdown(self) -> None:
        with trio.CancelScope(shield=True):
            for p in reversed(self.processes):
                await p.stop()
            for domid in list(self.guests):
                try:
                    self._hc.call("destroy_domain", domid=domid)
                except (OSError, ConnectionError):
                    pass
            self.guests.clear()
            self._hc.close()


@asynccontextmanager
async def open_world(workdir: str | Path, *, xenstored: str = "inprocess") -> AsyncIterator[World]:
    """Hypervisor + xenstored (+ dom0's nodes) for the block; all gone after."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    hv_path = str(workdir / "hypervisor.sock")
    xs_path = str(workdir / "xenstored.sock")
    if xenstored not in ("inprocess", "process"):
        raise ValueError("xenstored must be 'inprocess' or 'process'")
    async with hypervisor_process(hv_path):
        async with trio.open_nursery() as nursery:
            if xenstored == "inprocess":
                await nursery.start(_serve_xenstored_task, xs_path)
            else:
                xsd = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "xenblk_vhost.sim.xenstored", "--socket", xs_path])
                nursery.start_soon(_reap, xsd)
                await _wait_for_socket(xs_path, xsd)
            try:
                async with open_xenstore(xs_path) as xs:
                    await toolstack.create_dom0_nodes(xs)
                    world = World(workdir, nursery, xs, xs_path, hv_path)
                    try:
                        yield world
                    finally:
                        await world._shutdown()
            finally:
                nursery.cancel_scope.cancel()


async def _serve_xenstored_task(path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with serve_xenstored(path):
        task_status.started()
        await trio.sleep_forever()


async def _reap(proc: trio.Process) -> None:
    try:
        await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


async def _wait_for_socket(path: str, proc: trio.Process, timeout: float = 10.0) -> None:
    with trio.fail_after(timeout):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"xenstored exited with {proc.returncode}")
            try:
                sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
                with sock:
                    await sock.connect(path)
                return
            except OSError:
                await trio.sleep(0.02)
