"""The backend's handshake decisions, against the cases Linux blkback's frontend_changed() handles."""

import pytest

from xenblk_vhost.backend.xenbus.state_machine import Action, on_frontend_state
from xenblk_vhost.xen.xenbus import XenbusState as S
from xenblk_vhost.xen.xenbus import parse_state


@pytest.mark.parametrize(
    "frontend, backend, online, action",
    [
        (S.INITIALISING, S.INIT_WAIT, True, Action.NOTHING),
        (S.INITIALISING, S.CLOSED, True, Action.INIT_WAIT),  # frontend reconnects (kexec, resume)
        (S.INITIALISED, S.INIT_WAIT, True, Action.CONNECT),
        (S.CONNECTED, S.INIT_WAIT, True, Action.CONNECT),  # watch skipped Initialised
        (S.INITIALISED, S.CONNECTED, True, Action.NOTHING),  # no double connect
        (S.CONNECTED, S.CONNECTED, True, Action.NOTHING),
        (S.CONNECTED, S.CLOSING, True, Action.NOTHING),  # toolstack asked us to close: wait for frontend
        (S.CLOSING, S.CONNECTED, True, Action.CLOSING),
        (S.CLOSING, S.CLOSING, True, Action.CLOSING),
        (S.CLOSING, S.CLOSED, True, Action.NOTHING),
        (S.CLOSED, S.CLOSING, True, Action.CLOSE),
        (S.CLOSED, S.CLOSING, False, Action.CLOSE_AND_REMOVE),  # xl block-detach: online=0
        (S.UNKNOWN, S.CONNECTED, True, Action.REMOVE),  # frontend nodes gone: domain died
        (S.RECONFIGURING, S.CONNECTED, True, Action.FATAL),
    ],
)
def test_decisions(frontend, backend, online, action):
    assert on_frontend_state(frontend, backend, online) is action


@pytest.mark.parametrize("raw, state", [(b"4", S.CONNECTED), (b"6\0", S.CLOSED), (None, S.UNKNOWN),
                                        (b"", S.UNKNOWN), (b"banana", S.UNKNOWN), (b"99", S.UNKNOWN)])
def test_parse_state(raw, state):
    assert parse_state(raw) is state
