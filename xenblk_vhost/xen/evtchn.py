"""Event channels through Linux's /dev/xen/evtchn (include/uapi/xen/evtchn.h).

One open of the device per bound channel, so every ring task waits on its
own file descriptor with trio and no demultiplexing task is needed.

The device's protocol (drivers/xen/evtchn.c), as libxenevtchn uses it:
- ioctl BIND_INTERDOMAIN returns our local port.
- When the event fires, the kernel masks the port and queues its number;
  read() returns queued ports as u32 each (EAGAIN on a non-blocking fd when
  none). Writing a port number back unmasks it. Until then further events
  on the port stay pending in Xen and are delivered once, after the unmask:
  that is the coalescing.
- ioctl NOTIFY kicks the remote end; UNBIND (or closing the fd) unbinds.
- Xen marks a freshly bound interdomain port pending (EVTCHNOP_bind_interdomain
  "may have lost notifications"), so the first wait after binding returns
  at once. Callers treat every wake-up as "look at the ring", never as a
  count.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

import trio

from ._libc import IOC_NONE, ioc, ioctl

EVTCHN_PATH = "/dev/xen/evtchn"


class EvtchnBindInterdomain(ctypes.Structure):
    _fields_ = [("remote_domain", ctypes.c_uint), ("remote_port", ctypes.c_uint)]


class EvtchnBindUnboundPort(ctypes.Structure):
    _fields_ = [("remote_domain", ctypes.c_uint)]


class EvtchnUnbind(ctypes.Structure):
    _fields_ = [("port", ctypes.c_uint)]


class EvtchnNotify(ctypes.Structure):
    _fields_ = [("port", ctypes.c_uint)]


IOCTL_EVTCHN_BIND_INTERDOMAIN = ioc(IOC_NONE, "E", 1, ctypes.sizeof(EvtchnBindInterdomain))
IOCTL_EVTCHN_BIND_UNBOUND_PORT = ioc(IOC_NONE, "E", 2, ctypes.sizeof(EvtchnBindUnboundPort))
IOCTL_EVTCHN_UNBIND = ioc(IOC_NONE, "E", 3, ctypes.sizeof(EvtchnUnbind))
IOCTL_EVTCHN_NOTIFY = ioc(IOC_NONE, "E", 4, ctypes.sizeof(EvtchnNotify))
IOCTL_EVTCHN_RESET = ioc(IOC_NONE, "E", 5, 0)

PORT = struct.Struct("=I")  # evtchn_port_t as read from and written to the device
_READ_SIZE = 256 * PORT.size


def decode_pending(data: bytes) -> list[int]:
    """Ports queued by the kernel, in arrival order (a trailing partial port cannot occur; ignored)."""
    usable = len(data) - len(data) % PORT.size
    return [p for (p,) in PORT.iter_unpack(data[:usable])]


class EvtchnPort:
    """One bound port on its own /dev/xen/evtchn fd. Implements EventChannel."""

    __slots__ = ("_fd", "local_port", "_notify_arg", "_notify_addr", "_unmask")

    def __init__(self, fd: int, local_port: int):
        self._fd = fd
        self.local_port = local_port
        self._notify_arg = EvtchnNotify(local_port)
        self._notify_addr = ctypes.addressof(self._notify_arg)
        self._unmask = PORT.pack(local_port)

    def fileno(self) -> int:
        if self._fd < 0:
            raise trio.ClosedResourceError("event channel is closed")
        return self._fd

    def notify(self) -> None:
        ioctl(self.fileno(), IOCTL_EVTCHN_NOTIFY, self._notify_addr)

    def engine_notify(self) -> tuple[int, int, int, int, int, int] | None:
        """The ring engine's notify (backend/datapath/ring_engine.py): IOCTL_EVTCHN_NOTIFY for our port;
        its wait: _drain's reads, unmask and reset."""
        if self._fd < 0:
            return None
        return 1, self._fd, IOCTL_EVTCHN_NOTIFY, self.local_port, self._fd, IOCTL_EVTCHN_RESET

    def _drain(self) -> bool:
        """Consume queued deliveries and unmask; True if there was any."""
        fd = self.fileno()
        got = False
        while True:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno != errno.EFBIG:
                    raise
                # The kernel's per-fd queue overflowed; it stops delivering
                # until reset. Reset and count it as an event.
                ioctl(fd, IOCTL_EVTCHN_RESET, 0)
                got = True
                break
            if not data:
                break
            if decode_pending(data):
                got = True
            if len(data) < _READ_SIZE:
                break  # a short read: the queue is empty (a read copies all it holds, up to the count)
        if got:
            os.write(fd, self._unmask)
        return got

    async def wait(self) -> None:
        while True:
            await trio.lowlevel.wait_readable(self.fileno())
            if self._drain():
                return

    def close(self) -> None:
        """Unbind and close. A task blocked in wait() gets trio.ClosedResourceError."""
        if self._fd < 0:
            return
        fd, self._fd = self._fd, -1
        try:
            trio.lowlevel.notify_closing(fd)
        except RuntimeError:
            pass  # not inside trio: nobody can be waiting on it
        try:
            ioctl(fd, IOCTL_EVTCHN_UNBIND, ctypes.addressof(EvtchnUnbind(self.local_port)))
        except OSError:
            pass  # closing the fd unbinds as well (evtchn_release)
        finally:
            os.close(fd)


class EvtchnDevice:
    """Binds event channels, one /dev/xen/evtchn open each. Implements Evtchn."""

    def __init__(self, path: str = EVTCHN_PATH):
        self._path = path
        self._ports: list[EvtchnPort] = []
        self._closed = False
        os.close(self._open())  # fail now, not at the first bind, when there is no such device

    def _open(self) -> int:
        if self._closed:
            raise ValueError("Evtchn is closed")
        return os.open(self._path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def _bind(self, request: int, arg: ctypes.Structure) -> EvtchnPort:
        fd = self._open()
        try:
            port = ioctl(fd, request, ctypes.addressof(arg))
        except BaseException:
            os.close(fd)
            raise
        channel = EvtchnPort(fd, port)
        self._ports = [p for p in self._ports if p._fd >= 0]
        self._ports.append(channel)
        return channel

    def bind_interdomain(self, domid: int, remote_port: int) -> EvtchnPort:
        return self._bind(IOCTL_EVTCHN_BIND_INTERDOMAIN, EvtchnBindInterdomain(domid, remote_port))

    def bind_unbound_port(self, remote_domid: int) -> EvtchnPort:
        """Allocate a fresh port for remote_domid to bind to (the frontend's side; used by self-tests)."""
        return self._bind(IOCTL_EVTCHN_BIND_UNBOUND_PORT, EvtchnBindUnboundPort(remote_domid))

    def close(self) -> None:
        self._closed = True
        for p in self._ports:
            p.close()
        self._ports.clear()
