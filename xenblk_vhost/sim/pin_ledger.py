"""What a process's simulated gntdev holds mapped, where the hypervisor can read it after the process died.

On Linux, a process that dies with grants mapped through /dev/xen/gntdev
loses nothing to the guest: the kernel's release of the device unmaps them
(Xen clears GTF_reading/GTF_writing), so the guest can take its pages back
and a new backend can map the same ring. The simulated gntdev pins grants
itself, in the guest's shared tables, from the backend's own process; to
give a SIGKILLed backend the same ending, it lists every pin it holds in a
ledger: a memfd the hypervisor made for that connection (`pin_ledger`
hypercall), one 8-byte entry per pinned grant (each change one aligned
8-byte store). When the connection drops, the hypervisor unpins whatever
the ledger still lists.

The pin itself (Xen's work, done here in the backend's process: a pin
count, then the entry's flags, then the pinned frame) is not one
instruction, and a SIGKILL can land inside it, as it cannot inside Xen. So
every entry is written *before* its pin or unpin starts, marked pending
("this grant may or may not be pinned by me"), and the mark is cleared
once the pin is complete (or the entry cleared once the unpin is). A dying
process's pending entries are the refs whose pin counts and flags the
hypervisor must recompute from what every live process lists
(Hypervisor._repair_pins). Without this, a campaign of SIGKILLs on a
backend that maps a thousand grants a life (persistent grants) left, about
once in 200 kills, a pin count without GTF_reading (the guest revoked the
page and the next map got the stale frame: wrong data) or a pin nobody
listed (the grant stayed mapped forever).
"""

from __future__ import annotations

import mmap
import os
import struct

LEDGER_ENTRIES = 1 << 14
LEDGER_BYTES = LEDGER_ENTRIES * 8
_USED = 1 << 63
_WRITE = 1 << 62
_PENDING = 1 << 61  # a pin or unpin of this grant has started and not finished


def _entry(domid: int, ref: int, write: bool) -> int:
    return _USED | (_WRITE if write else 0) | (domid & 0xFFFF) << 32 | (ref & 0xFFFFFFFF)


class PinLedger:
    """The process's side: add() after a pin, remove() before the unpin."""

    def __init__(self, fd: int) -> None:
        try:
            self._mm = mmap.mmap(fd, LEDGER_BYTES, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._words = memoryview(self._mm).cast("Q")
        # Entries are used from the start and reused first, so the ledger stays dense at its
        # head and the hypervisor reads only that far (read_ledger).
        self._free: list[int] = []
        self._next = 0

    def add(self, domid: int, ref: int, write: bool) -> int:
        """Before a pin: a pending entry; its index, or -1 when the ledger is full (that pin is then not
        released on death). confirm() it once pinned, remove() it if the pin was refused."""
        if self._free:
            i = self._free.pop()
        elif self._next < LEDGER_ENTRIES:
            i = self._next
            self._next += 1
        else:
            return -1
        self._words[i] = _entry(domid, ref, write) | _PENDING
        return i

    def confirm(self, i: int) -> None:
        """The pin is complete: the hypervisor unpins it as it is if we die."""
        if i >= 0:
            self._words[i] &= ~_PENDING

    def unpinning(self, i: int) -> None:
        """Before an unpin: pending again (remove() it once unpinned)."""
        if i >= 0:
            self._words[i] |= _PENDING

    def remove(self, i: int) -> None:
        if i >= 0:
            self._words[i] = 0
            self._free.append(i)


def read_ledger(fd: int) -> dict[int, list[tuple[int, bool, bool]]]:
    """The hypervisor's side: {domid: [(ref, write, pending), ...]} still listed."""
    with mmap.mmap(fd, LEDGER_BYTES, mmap.MAP_SHARED, mmap.PROT_READ) as mm:
        data = mm[:].rstrip(b"\0")  # the used head only (the hypervisor serves everyone: be quick)
    data += bytes(-len(data) % 8)
    held: dict[int, list[tuple[int, bool, bool]]] = {}
    for (w,) in struct.iter_unpack("<Q", data):
        if w & _USED:
            held.setdefault((w >> 32) & 0xFFFF, []).append((w & 0xFFFFFFFF, bool(w & _WRITE), bool(w & _PENDING)))
    return held
