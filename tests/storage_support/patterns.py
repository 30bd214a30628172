"""Deterministic, block-distinct data so a misplaced block can never compare equal."""

from __future__ import annotations

import hashlib


def block_pattern(block: int, size: int = 4096, seed: int = 0) -> bytes:
    """`size` bytes unique to (seed, block): a SHA-256 chain, cheap enough for tests."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{block}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def pattern_range(first_block: int, count: int, size: int = 4096, seed: int = 0) -> bytes:
    return b"".join(block_pattern(first_block + i, size, seed) for i in range(count))


def read_file(path, offset: int, length: int) -> bytes:
    """Read the backing file directly (not through libblkio), as the reference."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    return data
