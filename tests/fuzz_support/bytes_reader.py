"""Turning the fuzzer's flat bytes into structured choices, deterministically.

libFuzzer mutates bytes; a target reads fields from them in a fixed order. Running out of bytes is
not an error: every read then returns zeros, so any input is a valid (if short) test case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


class ByteReader:
    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        """n bytes (fewer at the end: padded with zeros)."""
        chunk = self.data[self.pos:self.pos + n]
        self.pos += len(chunk)
        return chunk + bytes(n - len(chunk))

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "little")

    def u8(self) -> int:
        return self.uint(1)

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def below(self, n: int) -> int:
        """An int in 0..n-1 (n <= 65536)."""
        return self.uint(1 if n <= 256 else 2) % n

    def choice(self, items: Sequence[T]) -> T:
        return items[self.below(len(items))]

    def short_bytes(self, limit: int = 64) -> bytes:
        """A length byte, then that many bytes (at most limit)."""
        return self.take(self.u8() % (limit + 1))

    def rest(self) -> bytes:
        chunk = self.data[self.pos:]
        self.pos = len(self.data)
        return chunk

    @property
    def exhausted(self) -> bool:
        return self.pos >= len(self.data)
