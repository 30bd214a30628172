"""Async xenstore client on trio (implements `interfaces.XenStore`).

    from xenblk_vhost.xen.xenstore import open_xenstore

    async with open_xenstore() as xs:          # or open_xenstore("/path/to/socket")
        await xs.write("/local/domain/5/device/vbd/51712/state", "1")
        state = await xs.read("/local/domain/5/device/vbd/51712/state")    # b"1"
        names = await xs.directory("/local/domain")                        # ["0", "5"]
        await xs.mkdir(path); await xs.rm(path)
        perms = await xs.get_perms(path)                                   # [Permission, ...]
        await xs.set_perms(path, [Permission(0, False, False), Permission(5, True, False)])
        home = await xs.get_domain_path(5)                                 # "/local/domain/5"

        async with xs.transaction() as t:      # same read/write/... methods on t
            await t.write(a, "1"); await t.write(b, "2")
        # committed on leaving the block; aborted if the block raises.
        # A conflict raises XenStoreError(errno.EAGAIN): use transact() to retry.

        result = await xs.transact(some_async_fn)    # some_async_fn(t) -> result, retried on EAGAIN

        async with xs.watch("/local/domain/5/device") as events:
            async for path in events:          # first: the path itself (registration fire)
                ...

Where it connects (as libxenstore does): the `path` argument, else
$XENSTORED_PATH, else /run/xenstored/socket, else /var/run/xenstored/socket,
else /dev/xen/xenbus. A unix socket is connected to; anything else (the
xenbus character device) is opened read-write and spoken to with the same
wire protocol through a non-blocking fd.

Behaviour worth knowing:
- Any number of tasks may call at once: each request carries its own
  req_id and one reader task (in a nursery owned by open_xenstore) hands
  every reply to its caller and every watch event to its watch, by token.
- Errors from xenstored raise XenStoreError(errno, name, path), e.g.
  XenStoreError(ENOENT, "ENOENT", "/x"). A lost connection makes every
  pending and later call, and every watch, raise XenStoreConnectionError.
- Values: read() returns bytes; write() takes str (UTF-8) or bytes.
- Watch tokens are unique per client (one is made up if not given); a watch
  is removed (UNWATCH) when its block exits.
- Slow watch consumers: each watch buffers at most `max_pending` events
  (default 256). On overflow the queued events are replaced by ONE event for
  the watched path itself -- "something below here changed, look again" --
  and a warning is logged. Xenstore watches are level hints anyway (the
  consumer reads the current state), so this loses no state, only detail;
  the reader task never blocks on a consumer.
- Cancellation is safe: a cancelled call's reply is discarded when it
  comes; a transaction left by an exception or cancellation is aborted and
  a watch unregistered without waiting for the answer.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TypeVar

import trio

from .._groups import reraise_alone
from .interfaces import Permission, XenStoreError, XenStoreOps
from .xs_wire import ERROR_NAMES, PAYLOAD_MAX, Message, Op, Reader, WireError, encode_str, join_args, split_strings

log = logging.getLogger(__name__)

T = TypeVar("T")

XENBUS_DEVICE = "/dev/xen/xenbus"
DEFAULT_SOCKETS = ("/run/xenstored/socket", "/var/run/xenstored/socket")
DEFAULT_MAX_PENDING_EVENTS = 256
DEFAULT_TRANSACT_ATTEMPTS = 16
_DIRECTORY_PART_RESTARTS = 16
_RECEIVE_SIZE = 65536


class XenStoreConnectionError(ConnectionError):
    """The connection to xenstored is gone (closed by us, by xenstored, or broken)."""


class XenStoreRetriesExhausted(XenStoreError):
    """transact() kept conflicting (EAGAIN) for all its attempts."""

    def __init__(self, attempts: int) -> None:
        super().__init__(errno.EAGAIN, "EAGAIN")
        self.attempts = attempts

    def __str__(self) -> str:
        return f"[Errno {errno.EAGAIN}] EAGAIN: transaction still conflicting after {self.attempts} attempts"


def xenstore_path(path: str | None = None) -> str:
    """Where to connect: the argument, $XENSTORED_PATH, the first daemon socket that exists, or xenbus."""
    if path:
        return path
    env = os.environ.get("XENSTORED_PATH")
    if env:
        return env
    for candidate in DEFAULT_SOCKETS:
        if os.path.exists(candidate):
            return candidate
    return XENBUS_DEVICE


async def _open_stream(path: str) -> trio.abc.Stream:
    mode = os.stat(path).st_mode
    if stat.S_ISSOCK(mode):
        return await trio.open_unix_socket(path)
    if not stat.S_ISCHR(mode):
        # A regular file would "work" (reads at EOF, writes appended): say what it is instead.
        raise OSError(errno.ENOTSOCK, "neither xenstored's socket nor the xenbus device", path)
    # The xenbus device: same protocol through read()/write(); FdStream makes the fd
    # non-blocking and waits on it with trio, so no thread is involved.
    return trio.lowlevel.FdStream(os.open(path, os.O_RDWR | os.O_CLOEXEC))


@asynccontextmanager
async def open_xenstore(path: str | None = None) -> AsyncIterator[XenStoreClient]:
    """Connect, run the reader task for the block, close everything on the way out."""
    where = xenstore_path(path)
    stream = await _open_stream(where)
    client = XenStoreClient(stream, where)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._read_replies)
            try:
                yield client
            finally:
                await client.close()  # ends the reader task, so the nursery can exit
    except BaseExceptionGroup as group:
        # The reader task handles its own errors, so a lone exception is the
        # caller's own (raised in the block): give it back as itself.
        reraise_alone(group)
        raise


def _decode(payload: bytes) -> str:
    return payload.rstrip(b"\0").decode("utf-8", "surrogateescape")


class _Operations:
    """The data base calls, shared by the client and a transaction (which adds its tx_id)."""

    async def _call(self, op: Op, payload: bytes, path: str | None) -> bytes:
        raise NotImplementedError

    async def read(self, path: str) -> bytes:
        return await self._call(Op.READ, join_args(path), path)

    async def write(self, path: str, value: str | bytes) -> None:
        # The value is not NUL-terminated: it runs to the end of the payload.
        await self._call(Op.WRITE, join_args(path) + encode_str(value), path)

    async def mkdir(self, path: str) -> None:
        await self._call(Op.MKDIR, join_args(path), path)

    async def rm(self, path: str) -> None:
        """Remove path and everything below it; fine if it does not exist (its parent must)."""
        await self._call(Op.RM, join_args(path), path)

    async def exists(self, path: str) -> bool:
        try:
            await self.read(path)
        except XenStoreError as e:
            if e.errno == errno.ENOENT:
                return False
            raise
        return True

    async def directory(self, path: str) -> list[str]:
        """Child names of path; lists longer than one message are fetched with DIRECTORY_PART."""
        try:
            return split_strings(await self._call(Op.DIRECTORY, join_args(path), path))
        except XenStoreError as e:
            if e.errno != errno.E2BIG:
                raise
        return await self._directory_in_parts(path)

    async def _directory_in_parts(self, path: str) -> list[str]:
        # Each part starts with the node's generation; if it changes between parts,
        # the list changed under us and we start again.
        for _ in range(_DIRECTORY_PART_RESTARTS):
            listing = b""
            generation = None
            while True:
                reply = await self._call(Op.DIRECTORY_PART, join_args(path, str(len(listing))), path)
                gen, _, part = reply.partition(b"\0")
                if generation is None:
                    generation = gen
                elif gen != generation:
                    break
                listing += part
                # The list ends with an empty name, i.e. two NULs in a row (or a lone NUL if empty).
                if listing == b"\0" or listing.endswith(b"\0\0"):
                    return split_strings(listing[:-1])
                if not part:
                    raise XenStoreError(errno.EIO, "EIO", path)  # no progress: malformed reply
        raise XenStoreError(errno.EAGAIN, "EAGAIN", path)

    async def get_perms(self, path: str) -> list[Permission]:
        return [Permission.decode(s) for s in split_strings(await self._call(Op.GET_PERMS, join_args(path), path))]

    async def set_perms(self, path: str, perms: Sequence[Permission]) -> None:
        if not perms:
            raise ValueError("a node needs at least its owner's permission entry")
        await self._call(Op.SET_PERMS, join_args(path, *(p.encode() for p in perms)), path)

    async def get_domain_path(self, domid: int) -> str:
        return _decode(await self._call(Op.GET_DOMAIN_PATH, join_args(str(domid)), None))


class Transaction(_Operations):
    """A transaction handle: the data base calls, all inside one xenstore transaction."""

    def __init__(self, client: XenStoreClient, tx_id: int) -> None:
        self._client = client
        self.tx_id = tx_id
        self._open = True

    async def _call(self, op: Op, payload: bytes, path: str | None) -> bytes:
        if not self._open:
            raise RuntimeError(f"transaction {self.tx_id} has ended")
        return await self._client._request(op, payload, tx_id=self.tx_id, path=path)


class WatchEvents:
    """The async iterator a watch yields: fired paths, oldest first."""

    def __init__(self, path: str, token: str, max_pending: int) -> None:
        self.path = path
        self.token = token
        self._max_pending = max_pending
        self._queue: deque[str] = deque()
        self._wakeup = trio.lowlevel.ParkingLot()
        self._error: BaseException | None = None
        self._closed = False
        self.coalesced = 0  # how many times overflow collapsed the queue

    def __aiter__(self) -> WatchEvents:
        return self

    async def __anext__(self) -> str:
        while not self._queue:
            if self._error is not None:
                raise self._error
            if self._closed:
                raise StopAsyncIteration
            await self._wakeup.park()
        return self._queue.popleft()

    def _push(self, path: str) -> None:
        if self._closed:
            return
        if len(self._queue) >= self._max_pending:
            # Overflow: one event for the watched path stands for everything queued,
            # this new event included. Never block the reader, never drop unlogged.
            self.coalesced += 1
            log.warning(
                "watch %r (token %r): %d events not consumed; coalesced into one event for %r",
                self.path, self.token, len(self._queue) + 1, self.path,
            )
            self._queue.clear()
            self._queue.append(self.path)
        else:
            self._queue.append(path)
        self._wakeup.unpark_all()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._wakeup.unpark_all()

    def _close(self) -> None:
        self._closed = True
        self._wakeup.unpark_all()


class _Reply:
    __slots__ = ("done", "message", "error")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.message: Message | None = None
        self.error: BaseException | None = None


class XenStoreClient(_Operations):
    """One connection to xenstored. Get one from open_xenstore()."""

    def __init__(self, stream: trio.abc.Stream, where: str) -> None:
        self.path = where
        self._stream = stream
        self._send_lock = trio.Lock()
        self._pending: dict[int, _Reply] = {}
        self._ignored: set[int] = set()  # req_ids of fire-and-forget requests
        self._watches: dict[str, WatchEvents] = {}
        self._req_ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self._error: XenStoreConnectionError | None = None

    # ---- public API beyond the data base calls ------------------------------------------

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[Transaction]:
        """Commit on normal exit (EAGAIN on conflict); abort if the block raises or is cancelled."""
        reply = await self._request(Op.TRANSACTION_START, join_args(""))
        t = Transaction(self, int(_decode(reply)))
        try:
            yield t
        except BaseException:
            t._open = False
            await self._send_and_forget(Op.TRANSACTION_END, join_args("F"), tx_id=t.tx_id)
            raise
        t._open = False
        await self._request(Op.TRANSACTION_END, join_args("T"), tx_id=t.tx_id)

    async def transact(
        self, fn: Callable[[Transaction], Awaitable[T]], *, attempts: int = DEFAULT_TRANSACT_ATTEMPTS
    ) -> T:
        """Run fn(t) in a transaction, again from the start while it conflicts (EAGAIN)."""
        for _ in range(attempts):
            try:
                async with self.transaction() as t:
                    result = await fn(t)
                return result
            except XenStoreError as e:
                if e.errno != errno.EAGAIN:
                    raise
                log.debug("transaction conflicted, retrying")
            await trio.lowlevel.checkpoint()
        raise XenStoreRetriesExhausted(attempts)

    @asynccontextmanager
    async def watch(
        self, path: str, token: str | None = None, *, max_pending: int = DEFAULT_MAX_PENDING_EVENTS
    ) -> AsyncIterator[WatchEvents]:
        """Watch path and everything below it; yields an async iterator of fired paths."""
        if token is None:
            token = f"xenblk-vhost-{next(self._tokens)}"
            while token in self._watches:
                token = f"xenblk-vhost-{next(self._tokens)}"
        elif token in self._watches:
            raise ValueError(f"watch token {token!r} is already in use on this connection")
        if max_pending < 1:
            raise ValueError("max_pending must be at least 1")
        events = WatchEvents(path, token, max_pending)
        # Routed before WATCH is sent: the first event may overtake the reply (the
        # xenbus device answers WATCH itself, events come from the kernel's watch).
        self._watches[token] = events
        try:
            await self._request(Op.WATCH, join_args(path, token), path=path)
        except BaseException:
            self._watches.pop(token, None)
            raise
        try:
            yield events
        finally:
            self._watches.pop(token, None)
            events._close()
            await self._send_and_forget(Op.UNWATCH, join_args(path, token))

    async def control(self, *args: str) -> bytes:
        """CONTROL (dom0 only): an implementation-specific command, e.g. control("print", "hi")."""
        return await self._request(Op.CONTROL, join_args(*args))

    async def introduce_domain(self, domid: int, gfn: int, port: int) -> None:
        await self._request(Op.INTRODUCE, join_args(str(domid), str(gfn), str(port)))

    async def release_domain(self, domid: int) -> None:
        await self._request(Op.RELEASE, join_args(str(domid)))

    async def is_domain_introduced(self, domid: int) -> bool:
        return _decode(await self._request(Op.IS_DOMAIN_INTRODUCED, join_args(str(domid)))) == "T"

    async def reset_watches(self) -> None:
        """Drop every watch and transaction of this connection on the xenstored side."""
        await self._request(Op.RESET_WATCHES, join_args(""))

    @property
    def closed(self) -> bool:
        return self._error is not None

    async def close(self) -> None:
        """Close the connection: pending calls and watches raise XenStoreConnectionError. Idempotent."""
        self._lose("connection closed by this client")
        await self._stream.aclose()

    # ---- requests and replies -----------------------------------------------------------

    async def _call(self, op: Op, payload: bytes, path: str | None) -> bytes:
        return await self._request(op, payload, path=path)

    def _new_req_id(self) -> int:
        while True:
            req_id = next(self._req_ids) & 0xFFFFFFFF
            if req_id and req_id not in self._pending and req_id not in self._ignored:
                return req_id

    async def _request(self, op: Op, payload: bytes, *, tx_id: int = 0, path: str | None = None) -> bytes:
        if len(payload) > PAYLOAD_MAX:
            raise XenStoreError(errno.E2BIG, "E2BIG", path)  # as libxenstore: never send it
        if self._error is not None:
            raise self._error
        req_id = self._new_req_id()
        reply = self._pending[req_id] = _Reply()
        try:
            await self._send(Message(op, req_id, tx_id, payload))
            await reply.done.wait()
        finally:
            self._pending.pop(req_id, None)
        if reply.error is not None:
            raise reply.error
        msg = reply.message
        assert msg is not None
        if msg.type == Op.ERROR:
            name = _decode(msg.payload)
            raise XenStoreError(ERROR_NAMES.get(name, errno.EINVAL), name, path)
        if msg.type != op:
            self._lose(f"xenstored answered {op.name} with message type {msg.type}")
            raise XenStoreConnectionError(f"{self.path}: protocol error: reply of type {msg.type} to {op.name}")
        return msg.payload

    async def _send(self, msg: Message) -> None:
        data = msg.encode()
        async with self._send_lock:
            if self._error is not None:
                raise self._error
            # Shielded: a message cut in half by cancellation would desynchronise
            # the stream for everyone. Messages are small; close() unblocks it.
            with trio.CancelScope(shield=True):
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                    raise self._lose(f"send failed: {e}") from e

    async def _send_and_forget(self, op: Op, payload: bytes, *, tx_id: int = 0) -> None:
        """Cleanup requests (abort, unwatch): send even when cancelled, ignore the answer."""
        if self._error is not None:
            return
        req_id = self._new_req_id()
        self._ignored.add(req_id)
        with trio.CancelScope(shield=True):
            try:
                await self._send(Message(op, req_id, tx_id, payload))
            except XenStoreConnectionError:
                self._ignored.discard(req_id)

    async def _read_replies(self) -> None:
        """The reader task: route every incoming message until the connection ends."""
        reader = Reader()
        while True:
            try:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                self._lose(f"receive failed: {e}")
                return
            if not data:
                self._lose("xenstored closed the connection")
                return
            reader.feed(data)
            try:
                messages = reader.messages()
            except WireError as e:
                self._lose(f"malformed message from xenstored: {e}")
                await self._stream.aclose()
                return
            for msg in messages:
                self._route(msg)

    def _route(self, msg: Message) -> None:
        if msg.type == Op.WATCH_EVENT:
            fields = msg.payload.split(b"\0")
            if len(fields) < 2:
                log.warning("malformed watch event %r dropped", msg.payload)
                return
            path = fields[0].decode("utf-8", "surrogateescape")
            token = fields[1].decode("utf-8", "surrogateescape")
            events = self._watches.get(token)
            if events is None:
                log.debug("event %r for token %r with no watch (already removed)", path, token)
                return
            events._push(path)
            return
        reply = self._pending.get(msg.req_id)
        if reply is not None:
            reply.message = msg
            reply.done.set()
        elif msg.req_id in self._ignored:
            self._ignored.discard(msg.req_id)
        else:
            log.debug("reply to req_id %d nobody waits for (caller cancelled)", msg.req_id)

    def _lose(self, reason: str) -> XenStoreConnectionError:
        """Fail everything once: pending calls, watches, and every later call. The error they get."""
        if self._error is not None:
            return self._error
        error = self._error = XenStoreConnectionError(f"xenstore connection to {self.path} lost: {reason}")
        for reply in self._pending.values():
            if not reply.done.is_set():  # an answer that already came still counts
                reply.error = error
                reply.done.set()
        for events in self._watches.values():
            events._fail(error)
        self._ignored.clear()
        return error


async def read_or_none(xs: XenStoreOps, path: str) -> bytes | None:
    """The node's value, or None if it is absent (ENOENT) or unreadable to us (EACCES).

    Both mean "not there" to a backend: a guest hiding a key in its own
    directory has not written it, and a driver domain may not read other
    domains' nodes (their names, say)."""
    try:
        return await xs.read(path)
    except XenStoreError as e:
        if e.errno in (errno.ENOENT, errno.EACCES):
            return None
        raise
