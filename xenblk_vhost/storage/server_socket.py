"""Seeing a vhost-user server hang up: libblkio's socket to it, watched from trio.

libblkio (1.5) does not tell its user that a virtio-blk-vhost-user server
went away: requests in flight simply never complete, and only a timeout
would notice. But the connection is a unix stream socket in our own
process, and a dead server's end closes at once (the kernel does that for a
SIGKILLed process). ServerSocket finds that socket among our fds (the one
whose peer is bound to the export's path: getpeername() of a unix client
socket gives the server's path) and holds a duplicate of it, so

    watch = ServerSocket.find(path)      # right after StorageDevice.open(); None if not found
    await watch.hangup()                 # returns when the server's end is closed
    watch.close()                        # BEFORE the storage is closed (see below)

Only EOF counts: the server sends nothing on this socket unasked (replies
to libblkio's control messages, which libblkio reads itself; none during
I/O); bytes waiting to be read are libblkio's, left alone (peeked, never
read), and the watch then looks again a little later instead of spinning.

The duplicate keeps the connection open: close it before (or with) the
storage instance, or the server never sees us go and refuses the next
client (qemu-storage-daemon serves one client per export).
"""

from __future__ import annotations

import os
import socket
import stat

import trio

DATA_PENDING_RECHECK = 0.5  # seconds between looks while libblkio has unread bytes


class ServerSocket:
    def __init__(self, sock: socket.socket, path: str) -> None:
        self._sock = sock
        self.path = path

    @classmethod
    def find(cls, path: str) -> ServerSocket | None:
        """Our connected unix socket whose peer is bound at `path` (newest fd first), duplicated."""
        wanted = os.fsencode(os.path.abspath(path))
        try:
            fds = sorted((int(n) for n in os.listdir("/proc/self/fd")), reverse=True)
        except OSError:
            return None
        for fd in fds:
            try:
                if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                    continue
                sock = socket.socket(fileno=os.dup(fd))
            except OSError:
                continue  # closed meanwhile, or not ours to look at
            try:
                if sock.family == socket.AF_UNIX and sock.type == socket.SOCK_STREAM:
                    peer = sock.getpeername()
                    peer_b = os.fsencode(peer) if isinstance(peer, str) else bytes(peer)
                    if peer_b == wanted:
                        # Left blocking: the duplicate shares libblkio's open file description, and
                        # O_NONBLOCK on it made libblkio's own control messages fail with EAGAIN.
                        # Every look here is MSG_DONTWAIT.
                        return cls(sock, path)
            except OSError:
                pass  # not connected
            sock.close()
        return None

    async def hangup(self) -> None:
        """Return once the server's end is closed (EOF or a reset)."""
        sock = self._sock
        while True:
            await trio.lowlevel.wait_readable(sock)
            try:
                data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue  # spurious
            except OSError:
                return  # ECONNRESET and the like: gone
            if not data:
                return
            await trio.sleep(DATA_PENDING_RECHECK)  # libblkio's bytes: not ours to read

    def close(self) -> None:
        if self._sock.fileno() < 0:
            return
        try:
            trio.lowlevel.notify_closing(self._sock)
        except RuntimeError:
            pass  # outside trio: nobody waits on it
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0
