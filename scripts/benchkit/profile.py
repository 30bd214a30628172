"""Where the backend's CPU time goes: a SIGPROF sampler with a breakdown by category.

Every millisecond of this process's CPU time (ITIMER_PROF: user + system,
so time spent preempted or asleep never counts; the kernel checks CPU
timers at its tick, so in practice at most HZ samples per CPU-second: 250
on the project's machines, i.e. a 2 s run at full CPU gives ~500 samples,
a share to about +-2%), the signal handler records the Python stack it
interrupted. A C call (a syscall, libblkio, memmove)
counts for the Python function that made it, which is what names it:
SimPort._consume is the event channel's read(2), EpollIOManager.get_events
is epoll_wait(2), Queue.do_io is libblkio's submission (io_uring_enter).

    with Sampler() as s:
        ...                   # the measured window
    s.share(SIM_COPY)         # one category's fraction of the CPU
    s.report(cpu_us_per_io)   # categories and top functions, as text lines

Categories:
"""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

import trio

ROOT = str(Path(__file__).resolve().parents[2])
INTERVAL = 0.001  # s of CPU between samples asked for (the kernel's tick may space them more)
SIM_COPY = "sim grant copy (hypervisor)"
SIM_MAP = "sim grant map/unmap (hypervisor)"

# (category, file suffix, function names or None for any).
# First, a rule matching ANY frame of the stack: everything under these calls
# belongs to them (the simulated hypervisor's copy and map, with their grant
# checks; reaping the completion fd, with the do_io it makes).
ANYWHERE = (
    (SIM_COPY, "xenblk_vhost/sim/gntdev.py", {"grant_copy", "grant_copy_batch"}),
    (SIM_MAP, "xenblk_vhost/sim/gntdev.py", {"map_grants", "close"}),
    ("completion fd: wait_io", "xenblk_vhost/storage/queue.py", {"wait_io"}),
)
# Otherwise the innermost frame that matches a rule decides (first rule wins).
INNERMOST = (
    ("bench hooks", "benchkit/sim_cases.py", None),
    ("bench hooks", "benchkit/profile.py", None),  # the trio counter (--profile)...
    ("bench hooks", "trio/_core/_instrumentation.py", None),  # ...and trio's calls of it
    ("evtchn wait: read(2)", "xenblk_vhost/sim/evtchn.py", {"_consume"}),
    ("evtchn notify: write(2)", "xenblk_vhost/sim/evtchn.py", {"notify"}),
    ("libblkio: queue + do_io", "xenblk_vhost/storage/queue.py", None),
    ("trio: epoll_wait", "trio/_core/_io_epoll.py", {"get_events"}),
    ("trio: scheduling", "trio/", None),
    ("blkif: take, decode, validate", "xenblk_vhost/blkif/", None),
    ("blkif: take, decode, validate", "xenblk_vhost/native/intake.py", None),  # the compiled intake
    ("datapath: grant-copy segments", "xenblk_vhost/backend/datapath/grant_copy.py", None),
    ("datapath: stats, latency", "xenblk_vhost/backend/datapath/stats.py", None),
    ("datapath: ring worker, slots, copy path", "xenblk_vhost/backend/", None),
)
__doc__ += ("\n  anywhere in the stack:" + "".join(
    f"\n    {cat:40} {suffix} {','.join(sorted(names))}" for cat, suffix, names in ANYWHERE)
    + "\n  else the innermost frame matching:" + "".join(
    f"\n    {cat:40} {suffix}{'' if names is None else ' ' + ','.join(sorted(names))}"
    for cat, suffix, names in INNERMOST) + "\n    other                                    anything else\n")


def _matches(rule, filename: str, func: str) -> bool:
    _cat, suffix, names = rule
    return suffix in filename and (names is None or func in names)


def _short(filename: str) -> str:
    if filename.startswith(ROOT):
        return os.path.relpath(filename, ROOT)
    marker = "site-packages/"
    i = filename.find(marker)
    return filename[i + len(marker):] if i >= 0 else os.path.basename(filename)


def classify(frames) -> str:
    """The category of a stack, frames given innermost first as (file, function)."""
    frames = list(frames)
    for rule in ANYWHERE:
        if any(_matches(rule, fn, func) for fn, func in frames):
            return rule[0]
    for fn, func in frames:
        for rule in INNERMOST:
            if _matches(rule, fn, func):
                return rule[0]
    return "other"


class Sampler:
    """Counts, every `interval` s of CPU, the Python stack it interrupted (classified afterwards).

    The handler only counts a tuple of code ids (a few us), so the sampler
    can run through every measured run: at <= 1000 samples per CPU-second it
    costs well under 1% of the CPU it measures.
    """

    def __init__(self, interval: float = INTERVAL, *, count_trio: bool = False) -> None:
        """count_trio: also count trio's task steps and epoll waits (a call per step: --profile only)."""
        self.interval = interval
        self._counts: collections.Counter = collections.Counter()  # tuple of id(code) -> samples
        self._codes: dict[int, object] = {}  # id -> code, which also keeps the ids valid
        self.trio = TrioCounter() if count_trio else None

    def _tick(self, _sig, frame) -> None:
        ids = []
        codes = self._codes
        f = frame
        while f is not None:
            code = f.f_code
            i = id(code)
            if i not in codes:
                codes[i] = code
            ids.append(i)
            f = f.f_back
        self._counts[tuple(ids)] += 1

    @property
    def stacks(self) -> dict:
        """{(code, ...) innermost first: samples}."""
        return {tuple(self._codes[i] for i in ids): n for ids, n in self._counts.items()}

    def __enter__(self) -> Sampler:
        if self.trio is not None:
            trio.lowlevel.add_instrument(self.trio)
        self._old = signal.signal(signal.SIGPROF, self._tick)
        signal.setitimer(signal.ITIMER_PROF, self.interval, self.interval)
        return self

    def __exit__(self, *exc) -> None:
        signal.setitimer(signal.ITIMER_PROF, 0, 0)
        signal.signal(signal.SIGPROF, self._old)
        if self.trio is not None:
            trio.lowlevel.remove_instrument(self.trio)

    @property
    def samples(self) -> int:
        return sum(self._counts.values())

    @property
    def categories(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for codes, n in self.stacks.items():
            out[classify((c.co_filename, c.co_name) for c in codes)] += n
        return out

    @property
    def functions(self) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for codes, n in self.stacks.items():
            out[f"{_short(codes[0].co_filename)}:{codes[0].co_name}" if codes else "?"] += n
        return out

    def shares(self) -> dict:
        """{category: fraction of the samples}, largest first."""
        total = max(self.samples, 1)
        return {cat: n / total for cat, n in self.categories.most_common()}

    def share(self, category: str) -> float | None:
        """One category's fraction (None without samples)."""
        return self.categories[category] / self.samples if self.samples else None

    def report(self, cpu_us_per_io: float, ios: float, top: int = 15) -> list[str]:
        """Text lines: trio's counts per I/O, each category's share and its part of the CPU per I/O,
        then the top functions."""
        total = max(self.samples, 1)
        functions = self.functions
        lines = []
        if self.trio is not None:
            t, n = self.trio, max(ios, 1)
            lines.append(f"trio per I/O: {t.steps / n:.3f} task steps, {t.io_waits / n:.3f} epoll_wait "
                         f"({t.blocking_io_waits / n:.3f} that may sleep)")
        lines.append(f"{self.samples} samples; by category "
                     f"(share, and its part of the {cpu_us_per_io:.2f} us of CPU per I/O):")
        for cat, share in self.shares().items():
            lines.append(f"  {100 * share:5.1f}%  {share * cpu_us_per_io:7.2f} us  {cat}")
        lines.append(f"top {top} functions (innermost Python frame; C calls count for their caller):")
        for name, n in functions.most_common(top):
            lines.append(f"  {100 * n / total:5.1f}%  {name}")
        return lines


class TrioCounter(trio.abc.Instrument):
    """trio's scheduling work: task steps run, and I/O waits (epoll_wait; timeout > 0: it may sleep)."""

    def __init__(self) -> None:
        self.steps = self.io_waits = self.blocking_io_waits = 0

    def before_task_step(self, task) -> None:
        self.steps += 1

    def before_io_wait(self, timeout: float) -> None:
        self.io_waits += 1
        if timeout > 0:
            self.blocking_io_waits += 1
