"""One planted bug per target: proof that the target's properties catch a broken parser.

Each is (object, attribute, value): tests/test_fuzz.py applies it with monkeypatch and replays the
corpus (some input must fail); the runner applies it for a whole campaign when XENBLK_FUZZ_MUTANT
names it (a short campaign must then exit non-zero with a crash file).
"""

from __future__ import annotations

import yaml

from xenblk_vhost.backend.xenbus import frontend_params
from xenblk_vhost.blkif import decode
from xenblk_vhost.config import _LineLoader
from xenblk_vhost.device_model.qmp import JsonStreamSplitter
from xenblk_vhost.observability import control_socket
from xenblk_vhost.xen import xs_wire

_parse_request = control_socket.parse_request


def _parse_request_before_d3(request: bytes, known):
    """Issue 10 D3 as it was: `{"command": []}` reached `command in known` (TypeError: unhashable)."""
    try:
        return _parse_request(request, known)
    except control_socket.BadRequest as e:
        if str(e).startswith("'command' must be a string"):
            raise TypeError("unhashable type: 'list'") from None
        raise


def _feed_each_read_alone(self, data):
    """The QMP splitter before the fix: each read decoded on its own."""
    return self.feed_text(bytes(data).decode("utf-8", "replace"))


MUTANTS = {
    "blkif": (decode, "SECTORS_PER_PAGE", 9),  # last_sect 8 accepted: a segment past its page
    "frontend_params": (frontend_params, "MAX_EVENT_CHANNEL_PORT", 1 << 20),
    "xs_wire": (xs_wire, "PAYLOAD_MAX", 8192),
    "config": (_LineLoader, "construct_object", yaml.SafeLoader.construct_object),  # the ValueError escape
    "control": (control_socket, "parse_request", _parse_request_before_d3),
    "qmp": (JsonStreamSplitter, "feed", _feed_each_read_alone),
}


def apply(name: str) -> None:
    obj, attribute, value = MUTANTS[name]
    setattr(obj, attribute, value)
