"""Simulated event channels: Evtchn/EventChannel over the simulated hypervisor.

Each end of a channel holds two eventfds handed out by the hypervisor: its
own "pending" (readable = an event is pending) and its peer's, to kick.
notify() is one eventfd write; wait() is trio.lowlevel.wait_readable plus a
read that clears pending. Several notifies before a wait add up in the
eventfd counter and are consumed by one read: one wake-up, as Xen's pending
bit coalesces them. The same class serves the backend (bound with
`SimEvtchn.bind_interdomain`) and the guest (`Guest.alloc_unbound`).
"""

from __future__ import annotations

import os

import trio

from .hypercall import Hypercalls


class SimPort:
    """One end of a simulated interdomain event channel. Implements EventChannel."""

    __slots__ = ("_hc", "domid", "local_port", "_wait_fd", "_kick_fd")

    def __init__(self, hc: Hypercalls, domid: int, port: int, wait_fd: int, kick_fd: int):
        self._hc = hc
        self.domid = domid
        self.local_port = port
        self._wait_fd = wait_fd
        self._kick_fd = kick_fd

    def fileno(self) -> int:
        """The fd that is readable while an event is pending."""
        if self._wait_fd < 0:
            raise trio.ClosedResourceError("event channel is closed")
        return self._wait_fd

    def kick_fileno(self) -> int:
        """The peer's eventfd that notify() writes (for compiled peers: scripts/bench.py)."""
        if self._kick_fd < 0:
            raise trio.ClosedResourceError("event channel is closed")
        return self._kick_fd

    @property
    def closed(self) -> bool:
        return self._wait_fd < 0

    def notify(self) -> None:
        if self._kick_fd < 0:
            raise trio.ClosedResourceError("event channel is closed")
        try:
            os.eventfd_write(self._kick_fd, 1)
        except BlockingIOError:
            pass  # counter saturated: the peer has it pending already

    def engine_notify(self) -> tuple[int, int, int, int, int, int] | None:
        """The ring engine's notify (backend/datapath/ring_engine.py): an eventfd write to the peer's;
        its wait: a read of ours."""
        if self._kick_fd < 0:
            return None
        return 2, self._kick_fd, 0, self.local_port, self._wait_fd, 0

    def _consume(self) -> bool:
        try:
            os.eventfd_read(self.fileno())
        except BlockingIOError:
            return False
        return True

    async def wait(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.fileno())
            if self._consume():
                return

    def close(self) -> None:
        """Close our end (EVTCHNOP_close); the peer's notifies are dropped from now on.

        A task blocked in wait() gets trio.ClosedResourceError.
        """
        if self._wait_fd < 0:
            return
        wait_fd, kick_fd = self._wait_fd, self._kick_fd
        self._wait_fd = self._kick_fd = -1
        try:
            trio.lowlevel.notify_closing(wait_fd)
        except RuntimeError:
            pass  # not inside trio: nobody can be waiting on it
        os.close(wait_fd)
        os.close(kick_fd)
        if not self._hc.closed:
            try:
                self._hc.call("evtchn_close", domid=self.domid, port=self.local_port)
            except (OSError, ConnectionError):
                pass  # the domain or the hypervisor is gone: the port is closed either way


class SimEvtchn:
    """The backend's event channel device in the simulation. Implements Evtchn."""

    def __init__(self, socket_path: str, *, domid: int = 0):
        self._hc = Hypercalls(socket_path)
        self.domid = domid
        self._ports: list[SimPort] = []

    def bind_interdomain(self, domid: int, remote_port: int) -> SimPort:
        reply, fds = self._hc.call(
            "evtchn_bind_interdomain", domid=self.domid, remote_domid=domid, remote_port=remote_port
        )
        port = SimPort(self._hc, self.domid, reply["port"], fds[0], fds[1])
        self._ports = [p for p in self._ports if not p.closed]
        self._ports.append(port)
        return port

    def close(self) -> None:
        for p in self._ports:
            p.close()
        self._ports.clear()
        self._hc.close()
