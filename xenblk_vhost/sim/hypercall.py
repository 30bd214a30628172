"""The wire between a simulated domain and the simulated hypervisor.

Where a real kernel makes a hypercall, a simulated one sends a request on a
unix SOCK_SEQPACKET socket to the hypervisor process (`hypervisor.py`) and
blocks for the answer, the way a hypercall blocks the vCPU. Requests are
rare control operations (create a domain, bind a channel, look up a
domain's memory); the data path never goes through the socket: memory and
grant tables are shared memfds, and event channels are eventfds, both
handed over as file descriptors (SCM_RIGHTS) so the two processes share
kernel objects and nothing else.

One message per datagram, JSON:
    request  {"op": NAME, ...arguments}
    reply    {...results}  or  {"error": "EINVAL", "message": "..."}, with fds attached.

Because calls block, a process must not serve the hypervisor in the same
thread it calls it from; `Hypercalls` refuses to talk to a hypervisor
running in its own process instead of deadlocking.

Also the hypervisor's status page, mapped read-only by every client: one
byte per domid, so "is this domain alive?" costs no round trip.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import struct
from typing import Any

from ..xen._libc import buffer_address

DOMID_FIRST_RESERVED = 0x7FF0  # xen/include/public/xen.h: ordinary domids are below this
STATUS_PAGE_SIZE = DOMID_FIRST_RESERVED
DOMAIN_ABSENT = 0
DOMAIN_ALIVE = 1
DOMAIN_DEAD = 2

MAX_MESSAGE = 64 * 1024
MAX_FDS = 8


class Hypercalls:
    """A domain's connection to the simulated hypervisor (blocking calls)."""

    def __init__(self, socket_path: str):
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self._sock.connect(socket_path)
            # The listener's pid, from the kernel, before any blocking call.
            server_pid = struct.unpack("3i", self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            if server_pid == os.getpid():
                raise RuntimeError(
                    "the simulated hypervisor runs in this process: its blocking calls would deadlock; "
                    "run it as a separate process (hypervisor_process / python -m xenblk_vhost.sim.hypervisor)"
                )
            hello, fds = self.call("hello")
            try:
                self._status = mmap.mmap(fds[0], STATUS_PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
            finally:
                os.close(fds[0])
        except BaseException:
            self._sock.close()
            raise
        self.server_pid: int = hello["pid"]

    def call(self, op: str, **args: Any) -> tuple[dict, list[int]]:
        """One request, one reply. Raises OSError(errno) for an error reply. The caller owns the fds."""
        self._sock.sendall(json.dumps({"op": op, **args}).encode())
        data, fds, _flags, _addr = socket.recv_fds(self._sock, MAX_MESSAGE, MAX_FDS)
        if not data:
            for fd in fds:
                os.close(fd)
            raise ConnectionResetError(errno.ECONNRESET, "the simulated hypervisor went away")
        reply = json.loads(data)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            code = getattr(errno, reply["error"], errno.EIO)
            raise OSError(code, reply.get("message", reply["error"]))
        return reply, fds

    def domain_state(self, domid: int) -> int:
        if not 0 <= domid < STATUS_PAGE_SIZE:
            return DOMAIN_ABSENT
        return self._status[domid]

    def domain_alive(self, domid: int) -> bool:
        return 0 <= domid < STATUS_PAGE_SIZE and self._status[domid] == DOMAIN_ALIVE

    def alive_flag(self, domid: int) -> tuple[int, int]:
        """(the address of domid's state byte, the value that says alive): domain_alive for compiled
        code, valid until close()."""
        if not 0 <= domid < STATUS_PAGE_SIZE:
            raise ValueError(f"domid {domid} out of range")
        return buffer_address(self._status) + domid, DOMAIN_ALIVE

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def close(self) -> None:
        if self._sock.fileno() >= 0:
            self._sock.close()
            self._status.close()
