"""Fuzz target: a QMP client's byte stream, cut into reads, served by the device model's QMP server.

serve_qmp_connection runs over an in-memory stream; the client sends the bytes in the fuzzer's chunks,
then hangs up.

Properties:
  - the connection's task returns normally (nothing the client sends raises out of it);
  - the server's output is the greeting, then "\\r\\n"-terminated JSON objects, each a `return` or an
    `error` with a class and a description, carrying the command's `id` when it had one;
  - one reply per item the stream holds: an oracle scanner (the whole stream decoded at once, brackets
    counted outside strings, a run of stray characters counted once) gives the count;
  - how the stream is cut into reads changes nothing: the replies equal those to the stream in one read.
"""

from __future__ import annotations

import json

import trio
import trio.testing

from xenblk_vhost.device_model.qmp import DeviceModelState, serve_qmp_connection

from .bytes_reader import ByteReader


def expected_items(text: str) -> int:
    """Top-level texts plus runs of stray characters, scanning the whole decoded stream."""
    items = depth = 0
    in_string = escaped = stray = False
    for ch in text:
        if depth == 0:
            if ch in "{[":
                depth, stray = 1, False
            elif ch.isspace():
                stray = False
            elif not stray:
                stray, items = True, items + 1
        elif in_string:
            escaped, in_string = (False, in_string) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            items += depth == 0
    return items


async def _serve(chunks: list[bytes]) -> bytes:
    client, server = trio.testing.memory_stream_pair()
    out = bytearray()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_qmp_connection, server, DeviceModelState(paused=True))
        for chunk in chunks:
            await client.send_all(chunk)
            await trio.testing.wait_all_tasks_blocked()
        await client.send_eof()
        while data := await client.receive_some():
            out += data
    return bytes(out)


def _replies(raw: bytes) -> list[dict]:
    assert raw.endswith(b"\r\n"), raw[-80:]
    messages = [json.loads(line) for line in raw[:-2].split(b"\r\n")]
    assert "QMP" in messages[0], messages[0]
    for m in messages[1:]:
        assert isinstance(m, dict) and (("return" in m) != ("error" in m)), m
        if "error" in m:
            assert isinstance(m["error"].get("class"), str) and isinstance(m["error"].get("desc"), str), m
    return messages[1:]


def one_input(data: bytes) -> None:
    r = ByteReader(data)
    cuts = sorted({r.uint(2) for _ in range(r.below(6))})
    stream = r.rest()
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)]) if b > a]
    whole = _replies(trio.run(_serve, [stream] if stream else []))
    n = expected_items(stream.decode("utf-8", "replace"))
    assert len(whole) == n, f"{len(whole)} replies to {n} items"
    if len(chunks) > 1:
        cut = _replies(trio.run(_serve, chunks))
        assert cut == whole, f"cut at {cuts}: {cut} != {whole}"


def seeds():
    session = [{"execute": "qmp_capabilities", "id": 1}, {"execute": "query-status", "id": "s"},
               {"execute": "cont"}, {"execute": "query-chardev", "id": [1, {"x": "y"}]}, {"execute": "quit"}]
    text = "\r\n".join(json.dumps(c) for c in session).encode()
    yield bytes([2]) + (10).to_bytes(2, "little") + (47).to_bytes(2, "little") + text
    stray = b'{"execute": "qmp_capabilities", "id": "d\xc3\xa9j\xc3\xa0"} garbage [1, 2] "\\"}{"'
    yield bytes([2]) + (4).to_bytes(2, "little") + (stray.index(b"\xa9")).to_bytes(2, "little") + stray
    yield bytes([0]) + b"[" * 70 + b"]" * 70 + b'{"execute": "stop", "id": ' + b"9" * 5000 + b"}"
