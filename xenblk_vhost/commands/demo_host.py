"""The simulated Xen host the demo runs on: hypervisor, xenstored, dom0's nodes, guest domains.

    async with open_sim_host(workdir) as host:
        domid = await host.create_guest("demo")
        vbd = await host.attach_vbd(domid, VbdConfig(vdev="xvda", target=path))
        host.hypervisor_path, host.xenstore_path       # for the backend and the guest process
        await host.detach_vbd(vbd); await host.destroy_guest(domid)
    # every guest destroyed, xenstored and the hypervisor stopped

The same pieces as xenblk_vhost.sim.world.open_world (which tests and
benchmarks use), assembled so that the hypervisor runs in its own session:
a Ctrl-C on the demo's terminal must not stop it under the guest's feet
(see processes.py). xenstored runs in this process, as a trio task.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from ..sim import toolstack
from ..sim.hypercall import Hypercalls
from ..sim.toolstack import VbdConfig, VbdPaths
from ..sim.xenstored import serve_xenstored
from ..xen.xenstore import XenStoreClient, open_xenstore
from .processes import helper_process

DETACH_TIMEOUT = 10.0


class SimHost:
    def __init__(self, xs: XenStoreClient, hypercalls: Hypercalls, hypervisor_path: str,
                 xenstore_path: str) -> None:
        self.xs = xs  # the toolstack's (dom0's) connection
        self.hypervisor_path = hypervisor_path
        self.xenstore_path = xenstore_path
        self._hc = hypercalls
        self.guests: set[int] = set()

    async def create_guest(self, name: str, *, pages: int = 8192, grant_frames: int = 32) -> int:
        """A new domain, and libxl's nodes for it; its domid."""
        reply, _ = self._hc.call("create_domain", pages=pages, grant_frames=grant_frames)
        domid = reply["domid"]
        self.guests.add(domid)
        await toolstack.create_domain_nodes(self.xs, domid, name, max_memkb=pages * 4)
        return domid

    async def attach_vbd(self, domid: int, cfg: VbdConfig) -> VbdPaths:
        """libxl's device add: the nodes, then wait for the backend's InitWait."""
        return await toolstack.attach_vbd(self.xs, domid, cfg)

    async def detach_vbd(self, paths: VbdPaths):
        return await toolstack.detach_vbd(self.xs, paths, timeout=DETACH_TIMEOUT)

    async def destroy_guest(self, domid: int) -> None:
        """`xl destroy`: devices and nodes removed, the domain killed, @releaseDomain fired."""
        self.guests.discard(domid)
        await toolstack.destroy_domain(self.xs, domid, timeout=DETACH_TIMEOUT)
        self._hc.call("destroy_domain", domid=domid)
        await self.xs.release_domain(domid)

    def _kill_guests(self) -> None:
        for domid in list(self.guests):
            try:
                self._hc.call("destroy_domain", domid=domid)
            except (OSError, ConnectionError):
                pass
        self.guests.clear()


@asynccontextmanager
async def open_sim_host(workdir: str | Path) -> AsyncIterator[SimHost]:
    workdir = Path(workdir)
    # Short names: a unix socket's path must fit in 108 bytes.
    hv_path, xs_path = str(workdir / "hv.sock"), str(workdir / "xs.sock")
    argv = [sys.executable, "-m", "xenblk_vhost.sim.hypervisor", "--socket", hv_path]
    async with helper_process(argv, name="simulated hypervisor", ready="ready"):
        async with serve_xenstored(xs_path):
            async with open_xenstore(xs_path) as xs:
                await toolstack.create_dom0_nodes(xs)
                hc = Hypercalls(hv_path)
                host = SimHost(xs, hc, hv_path, xs_path)
                try:
                    yield host
                finally:
                    with trio.CancelScope(shield=True):
                        host._kill_guests()
                        hc.close()
