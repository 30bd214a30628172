"""The contract between the backend and a hypervisor.

Two implementations honour it: the real Linux devices (`xenblk_vhost.xen`:
/dev/xen/gntdev, /dev/xen/evtchn, the xenstored socket) and the simulation
(`xenblk_vhost.sim`). The backend only ever sees these types, so it cannot
tell which one it has.

Conventions:
- Local memory is named by a virtual address (an int) and a length, because
  that is what the gntdev grant-copy ioctl and libblkio take. Callers keep the
  memory alive while an operation uses it.
- Grant references, domids and ports are plain ints.
- Blocking system calls are short (ioctls); waiting is done with trio on file
  descriptors, never in a thread.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeVar, runtime_checkable

if TYPE_CHECKING:
    from .gntdev import CopyBatch

PAGE_SIZE = 4096

T = TypeVar("T")


class GrantStatus(enum.IntEnum):
    """GNTST_* from xen/include/public/grant_table.h."""

    OKAY = 0
    GENERAL_ERROR = -1
    BAD_DOMAIN = -2
    BAD_GNTREF = -3
    BAD_HANDLE = -4
    BAD_VIRT_ADDR = -5
    BAD_DEV_ADDR = -6
    NO_DEVICE_SPACE = -7
    PERMISSION_DENIED = -8
    BAD_PAGE = -9
    BAD_COPY_ARG = -10
    ADDRESS_TOO_BIG = -11
    EAGAIN = -12
    NO_SPACE = -13


class GrantMapError(OSError):
    """Mapping one or more grant references failed (bad ref, domid or permission)."""


@dataclass(frozen=True, slots=True)
class CopySegment:
    """One grant-copy operation: at most one guest page, never crossing it.

    to_guest=True copies local -> guest page (a read request's data);
    to_guest=False copies guest page -> local (a write request's data).
    """

    to_guest: bool
    domid: int
    gref: int
    guest_offset: int  # byte offset inside the granted page
    local_addr: int  # virtual address in this process
    length: int  # bytes, guest_offset + length <= PAGE_SIZE


@runtime_checkable
class GrantMapping(Protocol):
    """A contiguous local view of one or more granted guest pages."""

    @property
    def addr(self) -> int:
        """Virtual address of the first page in this process."""

    @property
    def buffer(self) -> memoryview:
        """The mapped pages (read-only view if mapped readonly)."""

    @property
    def npages(self) -> int: ...

    def set_unmap_notify(self, *, clear_byte: int | None = None, event_port: int | None = None) -> None:
        """IOCTL_GNTDEV_SET_UNMAP_NOTIFY: when this mapping goes away, even because we
        died, zero the byte at offset `clear_byte` (writable mappings only) and/or
        notify our bound local port `event_port`. For ring pages."""

    def close(self) -> None:
        """Unmap. Idempotent. Raises BufferError, and unmaps nothing, while memoryviews
        of `buffer` are still alive (they would dangle)."""


@runtime_checkable
class Gntdev(Protocol):
    def map_grants(self, domid: int, refs: Sequence[int], *, readonly: bool) -> GrantMapping:
        """Map len(refs) granted pages of `domid` contiguously. Raises GrantMapError."""

    def grant_copy(self, segments: Sequence[CopySegment]) -> list[int]:
        """Run every segment in one batch; return a GNTST_* status per segment."""

    def grant_copy_batch(self, batch: CopyBatch) -> None:
        """Run every segment packed in batch (xen/gntdev.py CopyBatch: the kernel's own array) in
        one batch; each segment's GNTST_* status lands in it. The datapath's way: no object per segment."""

    def set_max_grants(self, count: int) -> None: ...

    def close(self) -> None: ...


@runtime_checkable
class EventChannel(Protocol):
    """One bound interdomain event channel (a port of ours tied to the guest's)."""

    @property
    def local_port(self) -> int: ...

    def notify(self) -> None:
        """Kick the remote end. Notifies coalesce while the remote has one pending."""

    async def wait(self) -> None:
        """Return once at least one event arrived since the last wait (then re-armed).

        A wake-up means "look again", never a count: several notifies may give
        one wake-up, and Xen marks a newly bound port pending, so the first
        wait after binding returns at once."""

    def close(self) -> None:
        """Unbind. Idempotent; a task blocked in wait() gets trio.ClosedResourceError."""


@runtime_checkable
class Evtchn(Protocol):
    def bind_interdomain(self, domid: int, remote_port: int) -> EventChannel: ...

    def close(self) -> None: ...


class Platform(Protocol):
    """What the datapath needs from a hypervisor: grant tables and event channels.

    The real devices (`xenblk_vhost.xen.open_real()`) and the simulation
    (`xenblk_vhost.sim.open_sim()`) both give one; the entry points pick it
    (`xenblk_vhost.platforms.open_platform`). Xenstore is not part of it: its
    client is async and opened separately. close() closes event channels
    first (no more wake-ups), then grant mappings; a Platform is also a
    context manager that closes it.
    """

    @property
    def gntdev(self) -> Gntdev: ...

    @property
    def evtchn(self) -> Evtchn: ...

    def close(self) -> None: ...

    def __enter__(self) -> Platform: ...

    def __exit__(self, *exc: object) -> None: ...


class XenStoreError(OSError):
    """An error reply from xenstored: .errno and .strerror carry its name (ENOENT, EACCES...)."""


@dataclass(frozen=True, slots=True)
class Permission:
    """One xenstore permission entry, e.g. 'r5' = domain 5 may read."""

    domid: int
    read: bool
    write: bool

    def encode(self) -> str:
        flag = {(False, False): "n", (True, False): "r", (False, True): "w", (True, True): "b"}
        return f"{flag[(self.read, self.write)]}{self.domid}"

    @classmethod
    def decode(cls, text: str) -> Permission:
        flag, dom = text[0], int(text[1:])
        read, write = {"n": (False, False), "r": (True, False), "w": (False, True), "b": (True, True)}[flag]
        return cls(dom, read, write)


class XenStoreOps(Protocol):
    """The data base calls, which a client and a transaction handle both offer: helpers that only
    read and write take this, and so work inside a transaction or outside it."""

    async def read(self, path: str) -> bytes: ...

    async def write(self, path: str, value: str | bytes) -> None: ...

    async def mkdir(self, path: str) -> None: ...

    async def rm(self, path: str) -> None: ...

    async def exists(self, path: str) -> bool: ...

    async def directory(self, path: str) -> list[str]: ...

    async def get_perms(self, path: str) -> list[Permission]: ...

    async def set_perms(self, path: str, perms: Sequence[Permission]) -> None: ...

    async def get_domain_path(self, domid: int) -> str: ...


class XenStore(XenStoreOps, Protocol):
    """An async xenstore client. Paths are str; values are bytes on read, str|bytes on write.

    A transaction is an async context manager yielding a handle with the same
    read/write/mkdir/rm/directory methods; on leaving without error it commits,
    and raises XenStoreError(EAGAIN) on conflict (callers retry via
    `transact()`).
    """

    def transaction(self) -> AbstractAsyncContextManager[XenStoreTransaction]:
        """`async with xs.transaction() as t:` commits on exit, aborts if the block raises."""

    async def transact(self, fn: Callable[[XenStoreTransaction], Awaitable[T]]) -> T:
        """Run fn(t) in a transaction, retried from the start while it conflicts (EAGAIN)."""

    def watch(self, path: str, token: str | None = None) -> AbstractAsyncContextManager[AsyncIterator[str]]:
        """An async context manager yielding an async iterator of fired paths.

        The first event is the registration's own fire (the path itself), as
        xenstored does. Without a token the client makes up a unique one.
        """

    async def close(self) -> None: ...


class XenStoreTransaction(XenStoreOps, Protocol):
    """The handle `XenStore.transaction()` yields: the data base calls, in one transaction."""
