"""Per-ring counters, named and counted as Linux blkback's sysfs statistics.

blkback (xenbus.c VBD_SHOW_ALL) publishes oo_req, rd_req, wr_req, f_req,
ds_req, rd_sect, wr_sect per vbd; we keep them per ring (the Vbd sums them)
and add what a userspace operator also wants to see: errors answered,
requests in flight, and persistent grants mapped.

Counting follows blkback: a request is counted (rd_req/wr_req/f_req/ds_req
and its sectors) when it is dispatched to the storage, not when it is
rejected; `errors` counts every response whose status is not OKAY,
rejections included. f_req counts flushes and barriers alike (blkback's
st_f_req). oo_req counts the times the ring had requests waiting while every
request slot of the pool was busy (blkback's "out of requests").

Plain attributes in __slots__: the datapath increments them directly.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

COUNTERS = ("oo_req", "rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect", "errors", "spurious_wakeups",
            "engine_req", "poll_req", "poll_returns", "engine_syscalls", "engine_sleeps", "copy_segs_mapped",
            "copy_segs_xen")

# Request latency, from taking a request off the ring to putting its response
# on it, counted in buckets with these upper bounds (seconds); the last bucket
# counts everything slower.
LATENCY_BOUNDS = (25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 0.1, 0.25, 1.0)


class LatencyHistogram:
    __slots__ = ("counts", "sum")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BOUNDS) + 1)
        self.sum = 0.0

    def observe(self, now: float, slots) -> None:
        """A batch of answered requests: one clock read (`now`) for all of them."""
        counts = self.counts
        total = 0.0
        last = None
        elapsed = 0.0
        bucket = 0
        for slot in slots:
            taken = slot.taken_at
            if not taken:
                continue  # untimed: a request the ring engine took without a clock read (its lat_every)
            if taken != last:  # (a batch's requests share their clock read: one bisect for a run of them)
                last = taken
                elapsed = now - taken
                bucket = bisect_left(LATENCY_BOUNDS, elapsed)
            total += elapsed
            counts[bucket] += 1
        self.sum += total

    def snapshot(self) -> dict:
        return {"bounds": list(LATENCY_BOUNDS), "counts": list(self.counts), "sum": self.sum}


class RingStats:
    __slots__ = COUNTERS + ("in_flight", "persistent_grants", "halted", "latency")
    # COUNTERS, set to 0 by __init__ (named here for the type checker)
    oo_req: int
    rd_req: int
    wr_req: int
    f_req: int
    ds_req: int
    rd_sect: int
    wr_sect: int
    errors: int
    spurious_wakeups: int  # event-channel wake-ups that found no request (notify_backoff.py)
    engine_req: int  # requests the compiled ring engine took off the ring (ring_engine.py): the rest went the
    #                  reference way (flushes, discards, barriers, rejections, a failed copy...)
    poll_req: int  # of those, taken in the engine's own poll (no trio between the event and the answer)
    poll_returns: int  # times the engine's poll came back to Python (every second while busy; idle, every second
    #                    in a ring worker process and never in the service's thread; or for something it leaves
    #                    to the reference path): poll_req / poll_returns requests per stay in C
    engine_syscalls: int  # kernel calls the engine made itself (ring_engine.c's struct xb_engine says which): per
    #                       request, the floor of what a PV dom0 pays for it (each a trip through Xen)
    engine_sleeps: int  # of those, the engine's sleeps in poll()
    copy_segs_mapped: int  # grant-copy segments the engine copied itself, to or from persistently mapped pages
    copy_segs_xen: int  # those it handed to Xen's grant copy (not mapped, or no persistent grants)

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        self.in_flight = 0
        self.persistent_grants = 0
        self.halted = False  # the ring was stopped for a bogus frontend
        self.latency = LatencyHistogram()

    def snapshot(self) -> dict:
        """A plain dict for the control side to publish (copy: later counting does not change it)."""
        out = {name: getattr(self, name) for name in self.__slots__ if name != "latency"}
        out["latency"] = self.latency.snapshot()
        return out


def total(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """The vbd's figures: the rings' counters summed (halted: any ring halted)."""
    out: dict[str, Any] = {name: 0 for name in COUNTERS + ("in_flight", "persistent_grants")}
    out["halted"] = False
    latency = LatencyHistogram().snapshot()
    for snap in snapshots:
        for name, value in snap.items():
            if name == "halted":
                out["halted"] = out["halted"] or bool(value)
            elif name == "latency":
                latency["counts"] = [a + b for a, b in zip(latency["counts"], value["counts"])]
                latency["sum"] += value["sum"]
            else:
                out[name] += value
    out["latency"] = latency
    return out
