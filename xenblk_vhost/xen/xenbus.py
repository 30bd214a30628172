"""XenbusState, from xen/include/public/io/xenbus.h: the one enum every side uses.

The backend's xenbus control plane (backend/xenbus/), the simulated frontend
and toolstack (sim/) and the hotplug script (hotplug/) all read and write
these values in `state` nodes; an IntEnum, so a member compares equal to
the number in the node and str() of a member is that number.
"""

from __future__ import annotations

import enum


class XenbusState(enum.IntEnum):
    UNKNOWN = 0
    INITIALISING = 1
    INIT_WAIT = 2
    INITIALISED = 3
    CONNECTED = 4
    CLOSING = 5
    CLOSED = 6
    RECONFIGURING = 7
    RECONFIGURED = 8

    @property
    def label(self) -> str:
        """The name Xen's tools and xenbus print (xenbus_strstate): "InitWait", "Connected"..."""
        return _LABELS[self]


_LABELS = {
    XenbusState.UNKNOWN: "Unknown", XenbusState.INITIALISING: "Initialising", XenbusState.INIT_WAIT: "InitWait",
    XenbusState.INITIALISED: "Initialised", XenbusState.CONNECTED: "Connected", XenbusState.CLOSING: "Closing",
    XenbusState.CLOSED: "Closed", XenbusState.RECONFIGURING: "Reconfiguring", XenbusState.RECONFIGURED: "Reconfigured",
}


def parse_state(raw: bytes | None) -> XenbusState:
    """A state node's value; missing or garbage counts as Unknown (the domain is going away)."""
    if raw is None:
        return XenbusState.UNKNOWN
    try:
        return XenbusState(int(raw.strip(b"\0").decode("ascii", "replace") or "0"))
    except ValueError:
        return XenbusState.UNKNOWN


def state_label(value: int) -> str:
    """A state's xenbus name, or the number itself for one the enum does not know."""
    try:
        return XenbusState(value).label
    except ValueError:
        return str(value)
