"""Rate-limited warnings for what guests cause.

A hostile or broken guest can make the backend fail the same way as fast as
it likes (reconnect with a bad ring-ref in a loop, flood a ring with bad
requests). Each failure deserves a line, but the log must not become the
guest's megaphone: warnings a guest causes go through a GuestWarnings,
which lets a burst through per key (per guest domain, say), then one line
per refill interval, and tells how many lines it swallowed when it speaks
again:

    warnings = GuestWarnings(logging.getLogger(__name__))
    warnings.warn(domid, "d%d: bad ring-ref %r", domid, value)
    # ... after the burst:
    # "d5: bad ring-ref 'x' [12 similar warnings about this guest suppressed]"

The clock is injectable so the tests can step it instead of sleeping.
Memory is bounded: at most `max_keys` keys are tracked; the least recently
used is forgotten (a forgotten key starts with a full burst again, which
costs a few lines, never unbounded memory).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_BURST = 5
DEFAULT_INTERVAL = 10.0  # seconds per line once the burst is spent
DEFAULT_MAX_KEYS = 4096


@dataclass
class _Bucket:
    tokens: float
    updated: float
    suppressed: int = 0


class GuestWarnings:
    """A token bucket per key in front of a logger.

    Each key holds up to `burst` tokens and gains one every `interval`
    seconds; a warning spends a token or is counted as suppressed.
    """

    def __init__(self, logger: logging.Logger, *, burst: int = DEFAULT_BURST,
                 interval: float = DEFAULT_INTERVAL, max_keys: int = DEFAULT_MAX_KEYS,
                 clock: Callable[[], float] = time.monotonic, level: int = logging.WARNING) -> None:
        if burst < 1 or interval <= 0 or max_keys < 1:
            raise ValueError("burst and max_keys must be at least 1, interval positive")
        self._log = logger
        self._burst = burst
        self._interval = interval
        self._max_keys = max_keys
        self._clock = clock
        self._level = level
        self._buckets: OrderedDict[Hashable, _Bucket] = OrderedDict()

    def warn(self, key: Hashable, msg: str, *args: object) -> bool:
        """Log msg % args unless `key` has spent its burst; True if it was logged."""
        return self.log(self._level, key, msg, *args)

    def log(self, level: int, key: Hashable, msg: str, *args: object) -> bool:
        """Like warn(), at another level (a guest-triggered info line is limited too)."""
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self._burst), now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            elapsed = max(0.0, now - bucket.updated)
            bucket.tokens = min(float(self._burst), bucket.tokens + elapsed / self._interval)
            bucket.updated = now
        if bucket.tokens < 1.0:
            bucket.suppressed += 1
            return False
        bucket.tokens -= 1.0
        if bucket.suppressed:
            msg = f"{msg} [%d similar warnings suppressed]"
            args = (*args, bucket.suppressed)
            bucket.suppressed = 0
        self._log.log(level, msg, *args)
        return True

    def suppressed(self, key: Hashable) -> int:
        """How many warnings for `key` were swallowed since it last spoke."""
        bucket = self._buckets.get(key)
        return bucket.suppressed if bucket else 0

    def forget(self, key: Hashable) -> None:
        self._buckets.pop(key, None)
