"""Fuzz target: the frontend's xenstore nodes, read into a ConnectionSpec (blkback's connect_ring).

The input is an Offer (queues, ring order, persistent grants) and a set of nodes under the frontend's
directory, each key drawn from the ones connect_ring reads (also per queue-N/), each value a number,
a protocol name or raw bytes. parse_connection runs over a dict.

Properties:
  - the only exception is FrontendParamError, with the errno blkback's xenbus_dev_fatal would write;
  - success or refusal, the errno, and every field of the ConnectionSpec equal an oracle written from
    the module's documented rules (decimal unsigned only, trailing NULs tolerated, defaults, limits,
    the order the keys are read in, the plain ring-ref fallback for a one-page ring);
  - the error message is one printable line of bounded length, whatever bytes the guest wrote
    (it goes to the log and to the frontend's error node).
"""

from __future__ import annotations

import errno

from xenblk_vhost.backend.xenbus.frontend_params import FrontendParamError, Offer, parse_connection
from xenblk_vhost.blkif.abi import Abi

from .bytes_reader import ByteReader

FE = "/local/domain/7/device/vbd/51712"
U32 = (1 << 32) - 1
MAX_PORT = (1 << 17) - 1
RING_KEYS = ["event-channel", "ring-ref", *(f"ring-ref{i}" for i in range(16))]
VOCABULARY = [  # 166 keys: one byte picks one
    "protocol", "feature-persistent", "multi-queue-num-queues", "ring-page-order", *RING_KEYS,
    *(f"queue-{q}/{k}" for q in range(8) for k in RING_KEYS)]
PROTOCOLS = [b"x86_64-abi", b"x86_32-abi", b"arm-abi", b"x86_64-abi\0", b"X86_64-abi"]
MAX_MESSAGE = 400  # show() keeps 32 of the guest's bytes, at most 5 characters each in the repr


class Refused(Exception):
    def __init__(self, err: int) -> None:
        self.errno = err


def number(nodes: dict[str, bytes], key: str, maximum: int = U32) -> int:
    text = nodes[key].rstrip(b"\0")
    if not 0 < len(text) <= 16 or any(c not in b"0123456789" for c in text) or int(text) > maximum:
        raise Refused(errno.EINVAL)
    return int(text)


def expect(nodes: dict[str, bytes], offer: Offer) -> tuple:
    """(abi, persistent, ((index, refs, port), ...)), or Refused(errno)."""
    protocol = nodes.get("protocol")
    if protocol is None:
        abi = Abi.X86_32
    else:
        abi = {b"x86_64-abi": Abi.NATIVE, b"x86_32-abi": Abi.X86_32}.get(protocol.rstrip(b"\0"))
        if abi is None:
            raise Refused(errno.ENOSYS)
    persistent = False
    if offer.persistent and "feature-persistent" in nodes:
        persistent = number(nodes, "feature-persistent") != 0
    queues = number(nodes, "multi-queue-num-queues") if "multi-queue-num-queues" in nodes else 1
    if not 1 <= queues <= offer.max_queues:
        raise Refused(errno.ENOSYS)
    named = "ring-page-order" in nodes
    order = number(nodes, "ring-page-order") if named else 0
    if order > offer.max_ring_page_order:
        raise Refused(errno.EINVAL)
    rings = []
    for q in range(queues):
        d = "" if queues == 1 else f"queue-{q}/"
        if d + "event-channel" not in nodes:
            raise Refused(errno.EINVAL)
        port = number(nodes, d + "event-channel", MAX_PORT)
        if port == 0:
            raise Refused(errno.EINVAL)
        refs = []
        for i in range(1 << order):
            key = d + (f"ring-ref{i}" if named else "ring-ref")
            if key not in nodes and named and order == 0:
                key = d + "ring-ref"
            if key not in nodes:
                raise Refused(errno.EINVAL)
            refs.append(number(nodes, key))
        rings.append((q, tuple(refs), port))
    return abi, persistent, tuple(rings)


def _value(r: ByteReader) -> bytes:
    mode = r.below(5)
    if mode == 0:
        return str(r.u8()).encode()
    if mode == 1:
        return str(r.uint(5)).encode()
    if mode == 2:
        return r.choice(PROTOCOLS)
    return r.short_bytes(24)


def one_input(data: bytes) -> None:
    r = ByteReader(data)
    offer = Offer(max_queues=1 + r.below(8), max_ring_page_order=r.below(5), persistent=r.flag())
    nodes: dict[str, bytes] = {}
    for _ in range(r.below(64)):
        key = r.choice(VOCABULARY)  # before the value: Python evaluates `d[k()] = v()` right side first
        nodes[key] = _value(r)

    async def read(path: str) -> bytes | None:
        assert path.startswith(FE + "/"), f"read outside the frontend's directory: {path}"
        return nodes.get(path[len(FE) + 1:])

    try:
        want = expect(nodes, offer)
    except Refused as e:
        want = e
    coro = parse_connection(read, FE, 7, offer)
    try:
        coro.send(None)
    except StopIteration as done:
        spec = done.value
        assert not isinstance(want, Refused), f"accepted {nodes} (oracle: errno {want.errno})"
        got = (spec.abi, spec.persistent_grants,
               tuple((ring.index, ring.ring_refs, ring.event_channel) for ring in spec.rings))
        assert got == want, f"{nodes}: {got}, oracle {want}"
        assert spec.frontend_domid == 7
    except FrontendParamError as e:
        assert isinstance(want, Refused), f"refused {nodes} ({e}), oracle accepts: {want}"
        assert e.errno == want.errno, f"{nodes}: errno {e.errno} ({e}), oracle {want.errno}"
        message = str(e)
        assert message.isprintable() and len(message) <= MAX_MESSAGE, f"message {message!r}"
    else:
        raise AssertionError("parse_connection waited for something other than a node read")
    finally:
        coro.close()


def _encode(offer: tuple[int, int, int], nodes: list[tuple[str, int, bytes]]) -> bytes:
    """The input that one_input reads back as this offer and these nodes (mode 3: raw bytes)."""
    out = bytes(offer) + bytes([len(nodes)])
    for key, _mode, value in nodes:
        out += bytes([VOCABULARY.index(key), 3, len(value)]) + value
    return out


def seeds():
    """A one-page single-queue frontend, a multi-queue multi-page one, the legacy fallback, bad values."""
    yield _encode((0, 0, 1), [("protocol", 3, b"x86_64-abi"), ("event-channel", 3, b"12"),
                              ("ring-ref", 3, b"8"), ("feature-persistent", 3, b"1")])
    mq = [("multi-queue-num-queues", 3, b"2"), ("ring-page-order", 3, b"1")]
    for q in range(2):
        mq += [(f"queue-{q}/event-channel", 3, str(20 + q).encode()),
               (f"queue-{q}/ring-ref0", 3, b"100"), (f"queue-{q}/ring-ref1", 3, b"101\0")]
    yield _encode((3, 4, 0), mq)
    yield _encode((0, 0, 0), [("ring-page-order", 3, b"0"), ("event-channel", 3, b"5"), ("ring-ref", 3, b"9")])
    yield _encode((0, 0, 0), [("event-channel", 3, b"131072"), ("ring-ref", 3, b"7")])  # a port past FIFO's
    yield _encode((0, 0, 0), [("event-channel", 3, b"1"), ("ring-ref", 3, b" 7")])
    yield _encode((0, 0, 0), [("protocol", 3, b"arm-abi\n\x1b[31m"), ("ring-ref", 3, b"-1")])
