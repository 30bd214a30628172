"""Fuzz target: the xenstore wire codec, on a stream cut into reads at the fuzzer's choice.

Properties:
  - Reader raises only WireError, and does so exactly when the stream holds a header whose length
    exceeds XENSTORE_PAYLOAD_MAX (4096) (an oracle reading the 16-byte headers itself);
  - the messages come out in order, unaltered, none invented: a prefix of the oracle's list, all of
    it when the stream has no bad header; however the stream is cut into reads;
  - Message.encode() gives back exactly the bytes each message was read from (the stream's prefix),
    and refuses a payload over 4096 with WireError;
  - split_strings never raises and join_args(*split_strings(p)) is p with its single trailing NUL
    (surrogateescape keeps bytes that are not UTF-8).
"""

from __future__ import annotations

from xenblk_vhost.xen.xs_wire import Message, Reader, WireError, join_args, split_strings

from .bytes_reader import ByteReader

PAYLOAD_MAX = 4096


def oracle(stream: bytes) -> tuple[list[tuple[int, int, int, bytes]], bool]:
    """The complete messages at the start of stream, and whether a bad header follows them."""
    out, pos = [], 0
    while len(stream) - pos >= 16:
        mtype, req_id, tx_id, length = (int.from_bytes(stream[pos + k:pos + k + 4], "little") for k in (0, 4, 8, 12))
        if length > PAYLOAD_MAX:
            return out, True
        if len(stream) - pos - 16 < length:
            break
        out.append((mtype, req_id, tx_id, stream[pos + 16:pos + 16 + length]))
        pos += 16 + length
    return out, False


def one_input(data: bytes) -> None:
    r = ByteReader(data)
    cuts = sorted({r.uint(2) for _ in range(r.below(8))})
    stream = r.rest()
    want, bad = oracle(stream)
    reader = Reader()
    got: list[Message] = []
    raised = False
    start = 0
    for end in [*cuts, len(stream)]:
        if end < start:
            continue
        reader.feed(stream[start:end])
        start = end
        try:
            got += reader.messages()
        except WireError:
            raised = True
            break
    assert raised == bad, f"WireError {raised}, oracle says bad header {bad}"
    assert [(m.type, m.req_id, m.tx_id, m.payload) for m in got] == want[:len(got)], "messages differ from the oracle"
    if not bad:
        assert len(got) == len(want), f"{len(got)} messages delivered, {len(want)} complete in the stream"
    encoded = b"".join(m.encode() for m in got)
    assert stream.startswith(encoded), "a message does not encode back to the bytes it was read from"
    for m in got:
        p = m.payload
        parts = split_strings(p)
        assert join_args(*parts) == (p if p.endswith(b"\0") else p + b"\0") if p else parts == []
    big = Message(1, 2, 3, stream[:PAYLOAD_MAX + 1])
    try:
        big.encode()
    except WireError:
        assert len(big.payload) > PAYLOAD_MAX
    else:
        assert len(big.payload) <= PAYLOAD_MAX


def seeds():
    watch = Message(15, 0, 0, join_args("/local/domain/7/device/vbd/51712/state", "tok"))
    reply = Message(2, 7, 0, b"4")
    error = Message(16, 8, 0, b"ENOENT\0")
    directory = Message(1, 9, 0, b"0\x001\x00\xff\xfe\x00")
    stream = b"".join(m.encode() for m in (watch, reply, error, directory))
    yield bytes([2]) + (5).to_bytes(2, "little") + (40).to_bytes(2, "little") + stream
    yield bytes([0]) + reply.encode() + (1, 0, 0, 5000).__repr__().encode()
    yield bytes([0]) + b"".join(x.to_bytes(4, "little") for x in (2, 1, 0, 4097))
