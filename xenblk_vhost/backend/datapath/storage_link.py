"""The vbd's link to its storage: lost, reconnecting, back; the policy and what it shows.

A storage instance can fail as a whole while a frontend is connected: a
vhost-user server (qemu-storage-daemon) killed or restarted, or no
completion at all for `storage_timeout` seconds. libblkio cannot revive an
instance whose server went away, but a NEW instance on the same socket path
reaches a restarted server: the Vbd (vbd.py) opens one, with backoff, and
hands every ring its new queue (and, on the copy path, a new memory region:
the old one was shared with the dead instance). The frontend sees none of
it beyond latency: no xenbus state change, no guest reconnect.

What happens to requests while the storage is away (ring_worker.py):
  * in flight at the loss: parked, unanswered, and queued again on the new
    instance from their first step (a write whose fate is unknown is written
    again with the same data: the guest had no answer, so no request it
    ordered after it depends on it; block devices may complete concurrent
    requests in any order, so this is one of the orders it accepted);
  * not yet taken: left on the shared ring (the guest's queue waits);
  * after `hold` seconds without storage: everything parked is answered
    RSP_ERROR and later requests too, at once, while reconnecting goes on;
    once back, requests are served again.

StorageLink is the plain state the control socket and metrics read.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

CONNECTED, RECONNECTING, FAILED = "connected", "reconnecting", "failed"

DEFAULT_RECONNECT_HOLD = 30.0  # blk-mq's default request timeout: what a Linux guest waits anyway
DEFAULT_FIRST_DELAY = 0.05
DEFAULT_MAX_DELAY = 2.0


@dataclass(frozen=True)
class ReconnectPolicy:
    """enabled: reconnect at all (else: answer ERROR until the next frontend connection).
    hold: seconds requests wait for the storage to come back before they are answered ERROR.
    first_delay, max_delay: between attempts, doubling from the first to the max."""

    enabled: bool = True
    hold: float = DEFAULT_RECONNECT_HOLD
    first_delay: float = DEFAULT_FIRST_DELAY
    max_delay: float = DEFAULT_MAX_DELAY

    def delays(self):
        """first_delay, doubling, capped at max_delay, forever."""
        delay = self.first_delay
        while True:
            yield delay
            delay = min(delay * 2, self.max_delay)


def worth_logging(attempt: int) -> bool:
    """Attempts 1, 2, 4, 8, ... and then every 64th: a daemon away for an hour logs a few lines, not thousands."""
    return attempt & (attempt - 1) == 0 or attempt % 64 == 0


class StorageLink:
    """What the operator sees of the storage connection (ctl status, metrics)."""

    def __init__(self) -> None:
        self.state = CONNECTED
        self.losses = 0  # times the storage failed as a whole
        self.reconnects = 0  # times a new instance took over
        self.attempts = 0  # failed attempts since the last loss
        self.retried = 0  # requests queued again on a new instance (all losses)
        self.last_error: str | None = None
        self._lost_at: float | None = None

    def lost(self, error: Exception) -> None:
        self.state = RECONNECTING
        self.losses += 1
        self.attempts = 0
        self.last_error = str(error)
        self._lost_at = time.monotonic()

    def attempt_failed(self, error: Exception | str) -> None:
        self.attempts += 1
        self.last_error = str(error)

    def gave_up_holding(self) -> None:
        self.state = FAILED

    def back(self, retried: int) -> float:
        """Reconnected; returns the seconds it was away."""
        away = time.monotonic() - self._lost_at if self._lost_at is not None else 0.0
        self.state = CONNECTED
        self.reconnects += 1
        self.retried += retried
        self._lost_at = None
        return away

    @property
    def away_s(self) -> float | None:
        return None if self._lost_at is None else time.monotonic() - self._lost_at

    def snapshot(self) -> dict:
        away = self.away_s
        return {"state": self.state, "losses": self.losses, "reconnects": self.reconnects,
                "attempts": self.attempts, "retried": self.retried, "last_error": self.last_error,
                "away_s": None if away is None else round(away, 3)}
