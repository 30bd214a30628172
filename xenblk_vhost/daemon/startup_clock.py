"""How long `run` took to start, phase by phase, from the exec of the process.

    clock = StartupClock()            # as early as possible; its origin is the kernel's start time
    clock.mark("config")              # each phase's end, in order
    log.info("%s", clock.summary())   # "serving 0.61 s after exec: imports 0.31, config 0.04, ..."

Why it matters: while a daemon starts, the guests whose disks it takes over
wait (a crash's pause is at least this long), so the operator sees it in the
log at every start, and scripts/bench_startup.py reads the same line.

The origin is the process's start time as the kernel recorded it
(/proc/self/stat, field 22, in clock ticks since boot: 10 ms steps), read
against CLOCK_BOOTTIME; where that cannot be read, the clock's creation.
"""

from __future__ import annotations

import os
import re
import time

# summary()'s line, as the hand-over's reply and the log carry it.
SUMMARY = re.compile(r"serving (\S+) s after (?:exec|the start of our code) \((.*)\)")


def process_start_boottime() -> float | None:
    """When this process was started, in CLOCK_BOOTTIME seconds; None if /proc cannot say."""
    try:
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = stat[stat.rindex(b")") + 2:].split()
        ticks = int(fields[19])  # field 22 overall: starttime
        return ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


class StartupClock:
    def __init__(self) -> None:
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        started = process_start_boottime()
        # The tick may round the start time up past now: never a negative phase.
        self._origin = min(started, now) if started is not None else now
        self.exact_origin = started is not None
        self._last = self._origin
        self.phases: list[tuple[str, float]] = []

    def mark(self, phase: str) -> float:
        """End `phase` now; its duration in seconds."""
        now = time.clock_gettime(time.CLOCK_BOOTTIME)
        took, self._last = now - self._last, now
        self.phases.append((phase, took))
        return took

    @property
    def total(self) -> float:
        return self._last - self._origin

    def summary(self) -> str:
        since = "exec" if self.exact_origin else "the start of our code"
        parts = ", ".join(f"{name} {took:.3f}" for name, took in self.phases)
        return f"serving {self.total:.3f} s after {since} ({parts})"


def parse_summary(text: str) -> dict[str, float]:
    """summary()'s figures read back from a text holding it: {"total": s, phase: s, ...}; {} if absent."""
    m = SUMMARY.search(text)
    if m is None:
        return {}
    out = {"total": float(m.group(1))}
    for part in filter(None, m.group(2).split(", ")):
        name, _, value = part.rpartition(" ")
        out[name] = float(value)
    return out


__all__ = ["StartupClock", "parse_summary", "process_start_boottime"]
