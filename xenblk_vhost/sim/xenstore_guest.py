"""Connect to the simulated xenstored as a guest domain.

    async with open_guest_xenstore(5, socket_path) as xs:
        await xs.write("device/vbd/51712/state", "1")   # relative to /local/domain/5

The connection is an ordinary `XenStoreClient`; its first request is the
sim-only CONTROL "sim-domid" command, after which the simulated xenstored
applies the permission checks of an unprivileged domain to it. Against a
real xenstored this fails (unknown control command), as it should: there a
guest reaches xenstore through its own kernel, never a dom0 socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from xenblk_vhost.xen.xenstore import XenStoreClient, open_xenstore

from .xenstore_core import SIM_DOMID_COMMAND


@asynccontextmanager
async def open_guest_xenstore(domid: int, path: str | None = None) -> AsyncIterator[XenStoreClient]:
    """A client connection that the simulated xenstored treats as domain `domid`."""
    async with open_xenstore(path) as xs:
        await xs.control(SIM_DOMID_COMMAND, str(domid))
        yield xs
