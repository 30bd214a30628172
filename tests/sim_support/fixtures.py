"""Building blocks for the reference frontend's tests.

The hypervisor is always a separate process (world.py). For speed and to
look inside, the handshake tests run the frontend and the mini backend in
the test process (each with its own xenstore connection: the guest's is
domain N, the backend's dom0); the cross-process tests run both as
processes.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from xenblk_vhost.sim import open_sim
from xenblk_vhost.sim.blkfront import Blkfront, open_blkfront
from xenblk_vhost.sim.blkfront_config import BlkfrontOptions
from xenblk_vhost.sim.guest import Guest
from xenblk_vhost.sim.toolstack import VbdConfig, VbdPaths
from xenblk_vhost.sim.world import World
from xenblk_vhost.sim.xenstore_guest import open_guest_xenstore
from xenblk_vhost.xen.xenstore import open_xenstore

from .mini_backend import Disk, Faults, MiniBackend

MINI_BACKEND = str(Path(__file__).with_name("mini_backend.py"))


@asynccontextmanager
async def mini_backend(world: World, vbd: VbdPaths, *, sectors: int = 16384,
                       **kw) -> AsyncIterator[MiniBackend]:
    """The mini backend, in this process, serving `vbd` until the block ends."""
    platform = open_sim(world.hypervisor_path)
    try:
        async with open_xenstore(world.xenstore_path) as xs:
            backend = MiniBackend(xs, platform, vbd.backend, Disk(sectors), **kw)
            async with trio.open_nursery() as nursery:
                await nursery.start(backend.run)
                yield backend
                nursery.cancel_scope.cancel()
    finally:
        platform.close()


@asynccontextmanager
async def guest_view(world: World, domid: int) -> AsyncIterator[tuple[Guest, object]]:
    """(the guest's kernel view of its domain, its xenstore connection as domain `domid`)."""
    guest = Guest.attach(world.hypervisor_path, domid)
    try:
        async with open_guest_xenstore(domid, world.xenstore_path) as xs:
            yield guest, xs
    finally:
        guest.close()


@asynccontextmanager
async def frontend(world: World, domid: int, vbd: VbdPaths,
                   options: BlkfrontOptions = BlkfrontOptions()) -> AsyncIterator[Blkfront]:
    async with guest_view(world, domid) as (guest, xs):
        async with open_blkfront(xs, guest, vbd.devid, options) as front:
            yield front


async def new_vbd(world: World, *, pages: int = 4096, grant_frames: int = 32,
                  vdev: str = "xvda") -> tuple[int, VbdPaths]:
    guest = await world.create_guest(f"guest-{vdev}", pages=pages, grant_frames=grant_frames)
    vbd = await world.add_vbd(guest.domid, VbdConfig(vdev=vdev, target="/dev/null"))
    return guest.domid, vbd


def mini_backend_argv(world: World, vbd: VbdPaths, *, sectors: int = 16384, persistent: bool = False,
                      max_ring_page_order: int = 4, max_queues: int = 4, faults: tuple[str, ...] = ()) -> list[str]:
    argv = [sys.executable, MINI_BACKEND, "--hypervisor", world.hypervisor_path, "--xenstore",
            world.xenstore_path, "--backend", vbd.backend, "--sectors", str(sectors),
            "--max-ring-page-order", str(max_ring_page_order), "--max-queues", str(max_queues)]
    if persistent:
        argv.append("--persistent")
    for fault in faults:
        argv += ["--fault", fault]
    return argv


__all__ = ["Faults", "MINI_BACKEND", "frontend", "guest_view", "mini_backend", "mini_backend_argv", "new_vbd"]
