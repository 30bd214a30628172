"""systemd's notify protocol, from the daemon: READY, RELOADING, STOPPING, STATUS and the watchdog.

    notifier = Notifier.from_environment()        # no-op outside systemd (no $NOTIFY_SOCKET)
    notifier.ready("serving 2 domain(s)")         # READY=1 + STATUS=
    nursery.start_soon(notifier.keep_alive, status)   # WATCHDOG=1 every half WatchdogSec, STATUS= on change
    notifier.reloading(); ...; notifier.ready(...)
    notifier.stopping()

The watchdog pings come from a trio task in the service's nursery, so they
stop when the event loop stops turning: a loop wedged in a blocking call
(a storage daemon that accepts and never answers, a hung NFS read) misses
its pings, and systemd kills the daemon (WatchdogSec=, SIGABRT: faulthandler
prints every thread's stack to the journal first) and starts a new one,
which takes the guests' disks over. A busy loop still pings: every step of
the datapath ends in a checkpoint.

The unit (deploy/systemd/xenblk-vhost@.service) sets Type=notify and
WatchdogSec=; systemd passes WATCHDOG_USEC (and WATCHDOG_PID: only the
process it names pings).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

import trio

log = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._status: str | None = None
        self._sock: socket.socket | None = None
        if address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        environ = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        usec = None
        text = environ.get("WATCHDOG_USEC", "")
        owner = environ.get("WATCHDOG_PID", "")
        if text.isdigit() and int(text) > 0 and (not owner or owner == str(pid)):
            usec = int(text)
        return cls(environ.get("NOTIFY_SOCKET") or None, usec)

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between pings: half of WatchdogSec, as sd_watchdog_enabled(3) advises."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec else None

    def notify(self, *assignments: str) -> None:
        """One datagram of VAR=value lines; failures are logged, never raised (systemd may be gone)."""
        if self._sock is None or not assignments:
            return
        address = self.address or ""
        if address.startswith("@"):
            address = "\0" + address[1:]
        try:
            self._sock.sendto("\n".join(assignments).encode(), address)
        except OSError as e:
            log.debug("sd_notify(%s) failed: %s", ", ".join(assignments), e)

    def _with_status(self, first: str, status: str | None) -> None:
        if status is not None:
            self._status = status
            self.notify(first, f"STATUS={status}")
        else:
            self.notify(first)

    def ready(self, status: str | None = None) -> None:
        self._with_status("READY=1", status)

    def reloading(self) -> None:
        # MONOTONIC_USEC: what Type=notify-reload (systemd 253+) wants with RELOADING=1.
        self.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self, status: str | None = None) -> None:
        self._with_status("STOPPING=1", status)

    def status(self, text: str) -> None:
        if text != self._status:
            self._status = text
            self.notify(f"STATUS={text}")

    async def keep_alive(self, status: Callable[[], str], *, interval: float | None = None) -> None:
        """Until cancelled: WATCHDOG=1 every watchdog_interval (if systemd asked for it) and
        STATUS= whenever status() says something new (checked at the same pace, or every 5 s)."""
        period = interval or self.watchdog_interval or 5.0
        while True:
            text = status()
            if self.watchdog_usec:
                if text != self._status:
                    self._status = text
                    self.notify("WATCHDOG=1", f"STATUS={text}")
                else:
                    self.notify("WATCHDOG=1")
            else:
                self.status(text)
            await trio.sleep(min(period, 5.0))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
