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

COUNTERS = ("oo_req", "rd_req", "wr_req", "f_req", "ds_req", "rd_sect", "wr_sect", "errors")


class RingStats:
    __slots__ = COUNTERS + ("in_flight", "persistent_grants", "halted")

    def __init__(self) -> None:
        for name in COUNTERS:
            setattr(self, name, 0)
        self.in_flight = 0
        self.persistent_grants = 0
        self.halted = False  # the ring was stopped for a bogus frontend

    def snapshot(self) -> dict[str, int | bool]:
        """A plain dict for the control side to publish (copy: later counting does not change it)."""
        return {name: getattr(self, name) for name in self.__slots__}


def total(snapshots: list[dict[str, int | bool]]) -> dict[str, int | bool]:
    """The vbd's figures: the rings' counters summed (halted: any ring halted)."""
    out: dict[str, int | bool] = {name: 0 for name in COUNTERS + ("in_flight", "persistent_grants")}
    out["halted"] = False
    for snap in snapshots:
        for name, value in snap.items():
            if name == "halted":
                out["halted"] = out["halted"] or bool(value)
            else:
                out[name] += value
    return out
