"""Building blocks of the backend's end-to-end tests.

The simulated hypervisor is its own process and xenstored runs in the test
process (xenblk_vhost.sim.world); the reference frontend runs in a guest
process (frontend_agent.py); the real backend (Service) runs either in the
test process, with its own xenstore connection and Platform as a backend
process would have them, or as `xenblk-vhost run --sim` (see run_backend).
"""

from __future__ import annotations

import errno
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from xenblk_vhost.backend.xenbus.service import Service
from xenblk_vhost.config import DomainConfig, load_config
from xenblk_vhost.sim import open_sim
from xenblk_vhost.sim.world import World
from xenblk_vhost.xen.interfaces import XenStoreError
from xenblk_vhost.xen.xenstore import open_xenstore

MiB = 1 << 20


def disk_image(directory: Path, name: str = "disk.img", size: int = 16 * MiB) -> Path:
    path = directory / name
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def write_config(directory: Path, name: str, disks: Iterable[str], *, by: str = "name") -> Path:
    """A domain's YAML file; each disk is the inside of a flow mapping, e.g.
    "vdev: xvda, driver: io_uring, path: /x.img"."""
    who = f"name: {name}" if by == "name" else f"domid: {name}"
    body = "".join(f"  - {{{d}}}\n" for d in disks)
    path = directory / f"{name}.yaml"
    path.write_text(f"domain: {{{who}}}\ndisks:\n{body}")
    return path


def domain_config(directory: Path, name: str, disks: Iterable[str], **kw) -> DomainConfig:
    return load_config(write_config(directory, name, disks, **kw))


@asynccontextmanager
async def backend_service(world: World, configs: Iterable[DomainConfig], **kw) -> AsyncIterator[Service]:
    """The real backend in this process: its own xenstore connection and Platform."""
    with open_sim(world.hypervisor_path) as platform:
        async with open_xenstore(world.xenstore_path) as xs:
            service = Service(xs, platform, configs, **kw)
            async with trio.open_nursery() as nursery:
                await nursery.start(service.run)
                yield service
                nursery.cancel_scope.cancel()


async def read_text(xs, path: str) -> str | None:
    try:
        return (await xs.read(path)).decode()
    except XenStoreError as e:
        if e.errno == errno.ENOENT:
            return None
        raise


async def tree(xs, path: str) -> dict[str, str]:
    """Every node below path as {relative path: value}."""
    out: dict[str, str] = {}

    async def walk(p: str, rel: str) -> None:
        try:
            names = await xs.directory(p)
        except XenStoreError as e:
            if e.errno == errno.ENOENT:
                return
            raise
        for n in names:
            value = await read_text(xs, f"{p}/{n}")
            if value is not None:
                out[rel + n] = value
            await walk(f"{p}/{n}", f"{rel}{n}/")

    await walk(path, "")
    return out


async def wait_node(xs, path: str, wanted, timeout: float = 10.0) -> str | None:
    """Until the node's value satisfies wanted(value) (value None when absent)."""
    with trio.fail_after(timeout):
        async with xs.watch(path) as events:
            async for _ in events:
                value = await read_text(xs, path)
                if wanted(value):
                    return value


def state_is(n: int):
    return lambda v: v is not None and v.strip() == str(n)
