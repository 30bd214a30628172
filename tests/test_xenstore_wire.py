"""The wire codec against Xen's own xs_wire.h (Debian libxen-dev), compiled by gcc at test time."""

import errno
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xenblk_vhost.xen import xs_wire
from xenblk_vhost.xen.xs_wire import HEADER, Message, Op, Reader, WireError, join_args, split_strings

XS_WIRE_H = "/usr/include/xen/io/xs_wire.h"

# Every XS_* message type the 4.17 header defines, by the Python name we use for it.
_TYPES = {
    "CONTROL": "XS_CONTROL", "DIRECTORY": "XS_DIRECTORY", "READ": "XS_READ", "GET_PERMS": "XS_GET_PERMS",
    "WATCH": "XS_WATCH", "UNWATCH": "XS_UNWATCH", "TRANSACTION_START": "XS_TRANSACTION_START",
    "TRANSACTION_END": "XS_TRANSACTION_END", "INTRODUCE": "XS_INTRODUCE", "RELEASE": "XS_RELEASE",
    "GET_DOMAIN_PATH": "XS_GET_DOMAIN_PATH", "WRITE": "XS_WRITE", "MKDIR": "XS_MKDIR", "RM": "XS_RM",
    "SET_PERMS": "XS_SET_PERMS", "WATCH_EVENT": "XS_WATCH_EVENT", "ERROR": "XS_ERROR",
    "IS_DOMAIN_INTRODUCED": "XS_IS_DOMAIN_INTRODUCED", "RESUME": "XS_RESUME", "SET_TARGET": "XS_SET_TARGET",
    "RESET_WATCHES": "XS_RESET_WATCHES", "DIRECTORY_PART": "XS_DIRECTORY_PART", "INVALID": "XS_INVALID",
}

_PROBE = r"""
#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/io/xs_wire.h>

#define SHOW(name) printf("%s %ld\n", #name, (long)(name))

int main(void)
{
    unsigned int i;
@TYPES@
    SHOW(XS_TYPE_COUNT);
    SHOW(XENSTORE_PAYLOAD_MAX);
    SHOW(XENSTORE_ABS_PATH_MAX);
    SHOW(XENSTORE_REL_PATH_MAX);
    SHOW(XS_WATCH_PATH);
    SHOW(XS_WATCH_TOKEN);
    printf("sizeof %zu\n", sizeof(struct xsd_sockmsg));
    printf("offsets %zu %zu %zu %zu\n", offsetof(struct xsd_sockmsg, type), offsetof(struct xsd_sockmsg, req_id),
           offsetof(struct xsd_sockmsg, tx_id), offsetof(struct xsd_sockmsg, len));
    for (i = 0; i < sizeof(xsd_errors) / sizeof(xsd_errors[0]); i++)
        printf("error %s %d\n", xsd_errors[i].errstring, xsd_errors[i].errnum);
    return 0;
}
"""


@pytest.fixture(scope="module")
def header_facts(tmp_path_factory):
    """Run the probe; return ({name: value}, [(error name, errno)], sizeof, offsets)."""
    work = tmp_path_factory.mktemp("xs_wire_probe")
    src = work / "probe.c"
    src.write_text(_PROBE.replace("@TYPES@", "\n".join(f"    SHOW({c});" for c in _TYPES.values())))
    exe = work / "probe"
    subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    values, errors, sizeof, offsets = {}, [], None, None
    for line in lines:
        words = line.split()
        if words[0] == "error":
            errors.append((words[1], int(words[2])))
        elif words[0] == "sizeof":
            sizeof = int(words[1])
        elif words[0] == "offsets":
            offsets = [int(w) for w in words[1:]]
        else:
            values[words[0]] = int(words[1])
    return values, errors, sizeof, offsets


def test_message_types_match_header(header_facts):
    values, _, _, _ = header_facts
    assert {name: int(Op[name]) for name in _TYPES} == {name: values[c] for name, c in _TYPES.items()}
    # And we define no type the header lacks (RESTRICT=20 is gone upstream).
    assert {op.name for op in Op} == set(_TYPES)
    assert xs_wire.TYPE_COUNT == values["XS_TYPE_COUNT"]


def test_limits_match_header(header_facts):
    values, _, _, _ = header_facts
    assert (xs_wire.PAYLOAD_MAX, xs_wire.ABS_PATH_MAX, xs_wire.REL_PATH_MAX) == (
        values["XENSTORE_PAYLOAD_MAX"], values["XENSTORE_ABS_PATH_MAX"], values["XENSTORE_REL_PATH_MAX"])
    assert (xs_wire.WATCH_PATH, xs_wire.WATCH_TOKEN) == (values["XS_WATCH_PATH"], values["XS_WATCH_TOKEN"])


def test_header_layout_matches_struct(header_facts):
    _, _, sizeof, offsets = header_facts
    assert HEADER.size == sizeof == 16
    packed = HEADER.pack(0x11111111, 0x22222222, 0x33333333, 0x44444444)
    assert [packed[o:o + 4] for o in offsets] == [bytes([n] * 4) for n in (0x11, 0x22, 0x33, 0x44)]


def test_error_table_matches_header(header_facts):
    _, errors, _, _ = header_facts
    # Same names, same order (xenstored indexes this array), same errno values as the C library's.
    assert list(xs_wire.ERROR_NAMES.items()) == errors
    assert all(getattr(errno, name) == num for name, num in errors)


def test_encode_decode_roundtrip():
    msg = Message(Op.WRITE, 7, 3, join_args("/a/b") + b"value\0with nul")
    data = msg.encode()
    assert data[:16] == HEADER.pack(11, 7, 3, len(msg.payload))
    reader = Reader()
    reader.feed(data)
    assert reader.messages() == [msg]


def test_oversized_payload_refused_both_ways():
    with pytest.raises(WireError):
        Message(Op.WRITE, 1, 0, b"x" * 4097).encode()
    assert len(Message(Op.WRITE, 1, 0, b"x" * 4096).encode()) == 16 + 4096
    reader = Reader()
    reader.feed(HEADER.pack(Op.READ, 1, 0, 4097))
    with pytest.raises(WireError):
        reader.messages()


def test_strings():
    assert join_args("a", b"b", "") == b"a\0b\0\0"
    assert split_strings(b"") == []
    assert split_strings(b"one\0two\0") == ["one", "two"]
    # Bytes that are not UTF-8 survive a round trip instead of raising.
    odd = split_strings(b"\xff\xfe\0")
    assert join_args(*odd) == b"\xff\xfe\0"


_messages = st.lists(
    st.builds(Message, st.sampled_from(list(Op)), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
              st.binary(max_size=300)),
    max_size=8,
)


@settings(max_examples=60, deadline=None)
@given(_messages, st.data())
def test_reader_reassembles_any_chunking(messages, data):
    stream = b"".join(m.encode() for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=10)))
    reader, out, start = Reader(), [], 0
    for cut in cuts + [len(stream)]:
        reader.feed(stream[start:cut])
        out.extend(reader.messages())
        start = cut
    assert out == messages
