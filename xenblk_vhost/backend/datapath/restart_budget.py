"""How often something may be restarted: at most `limit` restarts in any `window` seconds.

A ring worker process that dies is replaced (process_vbd.py), but one that dies again at once
every time (its storage gone, a bug on its first request) must not be restarted in a loop: past
the budget the device goes to its error state, as an in-process datapath failure does.
Sans-I/O: the caller passes the clock.
"""

from __future__ import annotations

import collections


class RestartBudget:
    __slots__ = ("limit", "window", "_times")

    def __init__(self, limit: int, window: float) -> None:
        self.limit = limit
        self.window = window
        self._times: collections.deque[float] = collections.deque()

    @property
    def used(self) -> int:
        """Restarts counted in the current window (as of the last take())."""
        return len(self._times)

    def take(self, now: float) -> bool:
        """Count one restart at `now` if the budget allows it; False (nothing counted) if not."""
        while self._times and now - self._times[0] >= self.window:
            self._times.popleft()
        if len(self._times) >= self.limit:
            return False
        self._times.append(now)
        return True
