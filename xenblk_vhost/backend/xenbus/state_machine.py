"""The backend's half of the xenbus handshake, as pure decisions (no I/O).

States are XenbusState (xen/xenbus.py, from xen/include/public/io/xenbus.h). The rules follow
Linux xen-blkback's frontend_changed(): what the backend does when it sees the
frontend in a given state, given its own state and the toolstack's `online`
flag. The device task (backend/xenbus/device.py) performs the actions.
"""

from __future__ import annotations

import enum

from ...xen.xenbus import XenbusState


class Action(enum.Enum):
    NOTHING = "nothing"
    INIT_WAIT = "go InitWait again (frontend reconnecting after we closed)"
    CONNECT = "disconnect any old rings, map the frontend's rings, publish, go Connected"
    CLOSING = "go Closing"
    CLOSE = "drain and disconnect the rings, go Closed"
    CLOSE_AND_REMOVE = "drain and disconnect the rings, go Closed, forget the device"
    REMOVE = "frontend gone: disconnect and forget the device"
    FATAL = "frontend in an impossible state: report the error, go Closing"


def on_frontend_state(frontend: XenbusState, backend: XenbusState, online: bool) -> Action:
    if frontend == XenbusState.INITIALISING:
        return Action.INIT_WAIT if backend == XenbusState.CLOSED else Action.NOTHING
    if frontend in (XenbusState.INITIALISED, XenbusState.CONNECTED):
        # Two watch events in quick succession can skip Initialised; connect once.
        if backend in (XenbusState.CONNECTED,):
            return Action.NOTHING
        if backend in (XenbusState.CLOSING, XenbusState.CLOSED):
            # The frontend must pass through Initialising to reconnect.
            return Action.NOTHING
        return Action.CONNECT
    if frontend == XenbusState.CLOSING:
        return Action.NOTHING if backend == XenbusState.CLOSED else Action.CLOSING
    if frontend == XenbusState.CLOSED:
        return Action.CLOSE if online else Action.CLOSE_AND_REMOVE
    if frontend == XenbusState.UNKNOWN:
        return Action.REMOVE
    if frontend == XenbusState.INIT_WAIT:
        return Action.NOTHING
    return Action.FATAL
