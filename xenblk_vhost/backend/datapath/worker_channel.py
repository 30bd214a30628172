"""The control channel between the service and one ring worker process: messages over a socketpair.

A frame is a 4-byte big-endian length, then a pickled dict with an "op" key.
Pickle, not JSON: what crosses is our own frozen dataclasses (DiskConfig,
ConnectionSpec, StorageShape, ReconnectPolicy), and the socket is a
socketpair between the service and the child it exec'd itself, which no
other process can reach; nothing a guest writes travels on it.

Sending never waits: in trio's thread `send()` writes the frame at once when
nothing is queued before it and the socket takes it whole (a ring worker's
trio loop may block in the ring engine's poll right after: a reply left in
the queue would wait for the poll's slice); otherwise, and from another
thread (a logging handler), it queues the frame (or its rest) and the
channel's `run()` task writes the queue in order, so frames never
interleave. Another thread wakes `run()` through trio's token; nothing
polls (an idle channel costs its trio loop no wake-up: under the rig's TCG
each is milliseconds). `receive()` returns None at the peer's end (EOF or
a reset: a killed worker, a vanished parent).
"""

from __future__ import annotations

import collections
import pickle
import socket
import struct
from typing import Any

import trio

_LEN = struct.Struct(">I")
MAX_FRAME = 16 << 20  # a stats snapshot is a few KiB; anything near this is a broken peer


class ChannelClosed(Exception):
    """The peer is gone (EOF, reset) or sent something that is not a frame."""


class WorkerChannel:
    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._raw = sock  # (send()'s direct write; the same socket as trio's)
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._stream = trio.SocketStream(self._sock)
        self._out: collections.deque[bytes] = collections.deque()
        self._wake = trio.Event()
        self._token: trio.lowlevel.TrioToken | None = None  # run()'s loop: other threads wake it through it
        self._buf = bytearray()
        self.closed = False

    def fileno(self) -> int:
        """The socket's fd: readable when the service has spoken (the ring engine's serve wakes on it)."""
        return self._sock.fileno()

    def send(self, msg: dict[str, Any]) -> None:
        """Queue one message; run() writes it. Safe from a logging handler (no await, no trio call
        outside trio's thread)."""
        if self.closed:
            return
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
        frame = _LEN.pack(len(data)) + data
        try:
            trio.lowlevel.current_trio_token()
        except RuntimeError:  # another thread: queued, and run() woken in its own thread
            self._out.append(frame)
            token = self._token
            if token is not None:
                try:
                    token.run_sync_soon(self._wake_run)
                except trio.RunFinishedError:
                    pass  # (the loop is gone: nothing will write it)
            return
        if not self._out:  # (then run() is not in the middle of a frame: it pops a frame once written)
            try:
                written = self._raw.send(frame)
            except OSError:  # full (BlockingIOError), or a broken peer: run()'s write finds out and says so
                written = 0
            if written == len(frame):
                return
            frame = frame[written:]
        self._out.append(frame)
        self._wake.set()

    def _wake_run(self) -> None:
        self._wake.set()  # (in trio's thread: the current event, whichever run() waits on)

    async def run(self) -> None:
        """Write queued frames until cancelled (then what is queued is written, briefly, if it can be)."""
        self._token = trio.lowlevel.current_trio_token()
        try:
            while True:
                while self._out:
                    await self._send_first()
                self._wake = trio.Event()
                if not self._out:  # (a frame another thread queued before the token was there)
                    await self._wake.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            self.closed = True
        finally:
            with trio.move_on_after(1) as scope:
                scope.shield = True
                try:
                    while self._out and not self.closed:
                        await self._send_first()
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    self.closed = True

    async def _send_first(self) -> None:
        # Taken off the queue once written: a cancellation at send_all's checkpoint loses nothing.
        # (A cancellation in the middle of a frame is not possible: send_all on a socket writes it
        # whole or raises with the stream broken.)
        await self._stream.send_all(self._out[0])
        self._out.popleft()

    async def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            try:
                chunk = await self._stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
                raise ChannelClosed(str(e)) from e
            if not chunk:
                raise ChannelClosed("end of stream")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    async def receive(self) -> dict[str, Any] | None:
        """The next message, or None once the peer is gone."""
        try:
            (n,) = _LEN.unpack(await self._read(_LEN.size))
            if n > MAX_FRAME:
                raise ChannelClosed(f"frame of {n} bytes")
            msg = pickle.loads(await self._read(n))
        except ChannelClosed:
            return None
        if not isinstance(msg, dict) or "op" not in msg:
            return None
        return msg

    def close(self) -> None:
        self.closed = True
        self._sock.close()
