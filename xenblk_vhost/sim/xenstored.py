"""A simulated xenstored: the real xs_wire.h protocol on a unix socket, on trio.

Faithful enough that Debian's xenstore-utils (xenstore-read, -write, -ls,
-watch, ...) and our own client (`xenblk_vhost.xen.xenstore`) cannot tell it
from C xenstored 4.17 for what a block backend and frontend do: node tree
with permissions, implicit parents, subtree removal, transactions with
conflict detection, watches (with the registration fire and the
@introduceDomain/@releaseDomain specials), quotas on node size, watches,
transactions and permissions for guest connections.

Run it on its own:

    python -m xenblk_vhost.sim.xenstored --socket /tmp/xs.sock
    XENSTORED_PATH=/tmp/xs.sock xenstore-ls

(foreground; SIGTERM or SIGINT stops it, exit status 0, socket removed).

Or in-process, e.g. from a test:

    async with serve_xenstored(socket_path) as server:
        ...                      # server.socket_path, server.core
    # or: server = await nursery.start(run_xenstored, socket_path)

Every connection is dom0 (privileged). A simulated guest becomes domain N by
sending CONTROL "sim-domid" N as its very first request (see
`xenblk_vhost.sim.xenstore_guest.open_guest_xenstore`); from then on the
permission checks of an unprivileged domain apply to it and it cannot get
privilege back.

What it does not model: see NOT_MODELLED below.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket as stdlib_socket
import stat
import sys
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from xenblk_vhost.xen.xs_wire import Reader, WireError

from .._groups import reraise_alone
from .xenstore_core import Effects, XenstoredCore

# A fixed name: under "python -m" __name__ would be "__main__".
log = logging.getLogger("xenblk_vhost.sim.xenstored")

NOT_MODELLED = """\
- shared-ring connections (domains talk over the socket, naming their domid once);
  no xenstored_domain.c ring, event channel or grant mapping behind INTRODUCE
- per-domain node-count and memory quotas, request rate limiting (wrl_*),
  the transaction node quota; node-size, watch, transaction and permission
  quotas are modelled
- GET_FEATURE/SET_FEATURE/GET_QUOTA/SET_QUOTA (answered ENOSYS, as 4.17 does)
- CONTROL beyond check/log/print/help (no quota, memreport, logfile, live-update)
- dropping a duplicate watch event still queued for the same connection
- permission entries of domains that did not exist when a node was written
  (chk_domain_generation / XS_PERM_IGNORE), orphan nodes kept with -K
- domain shutdown/crash detection (only explicit RELEASE fires @releaseDomain)
- no tdb file, no persistence, no -R/-N/--priv-domid style options
- outgoing queues are unbounded: a client that never reads grows memory
"""

_RECEIVE_SIZE = 65536


class _ConnectionIO:
    """The socket side of one connection: an outgoing queue drained by a writer task."""

    def __init__(self, conn_id: int, stream: trio.SocketStream) -> None:
        self.id = conn_id
        self.stream = stream
        self.outgoing: deque[bytes] = deque()
        self.wakeup = trio.lowlevel.ParkingLot()
        self.cancel_scope = trio.CancelScope()

    def queue(self, data: bytes) -> None:
        self.outgoing.append(data)
        self.wakeup.unpark_all()

    async def write_forever(self) -> None:
        """Send queued messages in order; a failed send ends the whole connection."""
        while True:
            while not self.outgoing:
                await self.wakeup.park()
            batch = b"".join(self.outgoing)
            self.outgoing.clear()
            try:
                await self.stream.send_all(batch)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                log.debug("connection %d: write failed: %s", self.id, e)
                self.cancel_scope.cancel()
                return


class XenstoredServer:
    """One listening socket and the connections accepted on it."""

    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.core = XenstoredCore()
        self._conns: dict[int, _ConnectionIO] = {}

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    async def listen(self) -> trio.socket.SocketType:
        """Bind and listen (FileExistsError if a live daemon or a non-socket holds the path)."""
        _remove_stale_socket(self.socket_path)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        try:
            await sock.bind(self.socket_path)
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        return sock

    async def serve(self, sock: trio.socket.SocketType | None = None, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept until cancelled; then close every connection and remove the socket."""
        if sock is None:
            sock = await self.listen()
        try:
            listener = trio.SocketListener(sock)
            async with trio.open_nursery() as nursery:
                task_status.started(self)
                while True:
                    stream = await listener.accept()
                    nursery.start_soon(self._serve_connection, stream)
        finally:
            sock.close()
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass

    async def _serve_connection(self, stream: trio.SocketStream) -> None:
        conn_id = self.core.open_connection()
        io = _ConnectionIO(conn_id, stream)
        self._conns[conn_id] = io
        log.debug("connection %d opened", conn_id)
        try:
            with io.cancel_scope:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(io.write_forever)
                    reason = await self._read_requests(io)
                    log.debug("connection %d: %s", conn_id, reason)
                    nursery.cancel_scope.cancel()
        finally:
            self._conns.pop(conn_id, None)
            self.core.close_connection(conn_id)
            stream.socket.close()

    async def _read_requests(self, io: _ConnectionIO) -> str:
        """Handle requests in arrival order until the client goes; return why it ended."""
        reader = Reader()
        while True:
            try:
                data = await io.stream.receive_some(_RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                return f"read failed: {e}"
            if not data:
                return "closed by client"
            reader.feed(data)
            try:
                messages = reader.messages()
            except WireError as e:
                # xenstored drops a client that oversteps the payload limit: the
                # stream cannot be resynchronised.
                log.warning("connection %d dropped: %s", io.id, e)
                return str(e)
            for msg in messages:
                self._apply(self.core.handle(io.id, msg))

    def _apply(self, effects: Effects) -> None:
        for conn_id, msg in effects.messages:
            target = self._conns.get(conn_id)
            if target is not None:
                target.queue(msg.encode())
        for conn_id in effects.disconnect:
            target = self._conns.get(conn_id)
            if target is not None:
                target.cancel_scope.cancel()


def _remove_stale_socket(path: str) -> None:
    """Reuse the path of a socket nobody listens on; refuse a live one or a non-socket."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket")
    probe = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)
        return
    finally:
        probe.close()
    raise FileExistsError(f"{path}: a xenstored is already listening there")


async def run_xenstored(socket_path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """`server = await nursery.start(run_xenstored, path)`: serve until the nursery is cancelled."""
    await XenstoredServer(socket_path).serve(task_status=task_status)


@asynccontextmanager
async def serve_xenstored(socket_path: str) -> AsyncIterator[XenstoredServer]:
    """A running simulated xenstored for the duration of the block."""
    server = XenstoredServer(socket_path)
    sock = await server.listen()  # outside the nursery: a bind error comes out as itself
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, sock)
            try:
                yield server
            finally:
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Our tasks handle their own errors, so a lone exception here is the
        # caller's own (from the block): give it back unwrapped.
        reraise_alone(group)
        raise


async def _main(socket_path: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(run_xenstored, socket_path)
            log.info("simulated xenstored listening on %s (pid %d)", socket_path, os.getpid())
            async for signum in signals:
                log.debug("%s: stopping", signal.Signals(signum).name)
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xenblk_vhost.sim.xenstored",
        description="Simulated xenstored speaking the xs_wire.h protocol on a unix socket.",
        epilog="Not modelled:\n" + NOT_MODELLED,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    parser.add_argument("--verbose", "-v", action="store_true", help="log every connection")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(name)s: %(message)s",
        stream=sys.stderr,
    )
    failures: list[BaseException] = []
    try:
        trio.run(_main, args.socket)
    except* (FileExistsError, PermissionError) as group:
        failures.extend(group.exceptions)  # ("return" is not allowed inside except*)
    for e in failures:
        log.error("%s", e)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
