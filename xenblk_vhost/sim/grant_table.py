"""The v1 grant table: the guest writes it, the simulated Xen checks it.

Layout and flags are Xen's public ABI (xen/include/public/grant_table.h,
checked against the header by tests): an array of

    struct grant_entry_v1 { uint16_t flags; domid_t domid; uint32_t frame; };

in the guest's own grant-table frames, which the guest and Xen share. The
guest fills domid and frame, then sets flags (GTF_permit_access, optionally
GTF_readonly) as Linux's gnttab does; Xen sets GTF_reading/GTF_writing while
a grant is mapped and clears them on unmap, which is how the guest's revoke
(end_access) knows it must wait.

The checks follow Xen's grant_table.c (read at xen-project/xen c447b7308b):
- map_grant_ref / acquire_grant_for_copy: ref beyond the table ->
  GNTST_bad_gntref;
- _set_status_v1, when the entry is not already pinned: type must be
  exactly GTF_permit_access (for maps also without GTF_sub_page) and domid
  must be ours, else GNTST_general_error; a write to a GTF_readonly entry
  -> GNTST_general_error ("Attempt to write-pin a r/o grant entry"). Xen
  does *not* answer GNTST_permission_denied for these; that code is for
  XSM refusals.
- the frame must be a page of the guest (get_paged_frame) else GNTST_bad_page.

Xen's private "active" grant table (pin counts, the frame captured at the
first pin) lives in a separate shared memory that only the Xen side (the
simulated gntdev in backend processes) maps, never the guest.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from ..xen.interfaces import PAGE_SIZE, GrantStatus
from . import _atomic

GTF_invalid = 0
GTF_permit_access = 1
GTF_accept_transfer = 2
GTF_transitive = 3
GTF_type_mask = 3
GTF_readonly = 1 << 2
GTF_reading = 1 << 3
GTF_writing = 1 << 4
GTF_sub_page = 1 << 8

ENTRY = struct.Struct("<HHI")  # flags, domid, frame
ENTRY_SIZE = ENTRY.size
ENTRIES_PER_FRAME = PAGE_SIZE // ENTRY_SIZE
# Linux guests never hand out refs 0..7 (GNTTAB_NR_RESERVED_ENTRIES: console, xenstore).
GNTTAB_NR_RESERVED_ENTRIES = 8

_OKAY = int(GrantStatus.OKAY)
_GENERAL_ERROR = int(GrantStatus.GENERAL_ERROR)
_BAD_GNTREF = int(GrantStatus.BAD_GNTREF)

# Active entry: u32 pin counts (readers in the low half, writers in the high
# half, as Xen's GNTPIN_hstr/hstw fields), u32 frame captured at first pin.
_ACTIVE = struct.Struct("<II")
ACTIVE_ENTRY_SIZE = _ACTIVE.size
_READ_PIN = 1
_WRITE_PIN = 1 << 16
_COMBO = struct.Struct("<HH")  # flags and domid read as the one u32 Xen compares and swaps


class GrantEntry(NamedTuple):
    flags: int
    domid: int
    frame: int


class SharedGrantTable:
    """A v1 grant table over shared memory (a writable buffer and its address).

    `buf` and `addr` must name the same bytes: Python-level reads go through
    the buffer, atomic updates through the address.
    """

    def __init__(self, buf, addr: int, nr_frames: int):
        self._buf = buf
        self._atomic = _atomic.AtomicMemory(addr)
        self.nr_entries = nr_frames * ENTRIES_PER_FRAME

    def entry(self, ref: int) -> GrantEntry:
        return GrantEntry(*ENTRY.unpack_from(self._buf, ref * ENTRY_SIZE))

    # -- the guest's side (Linux gnttab_grant_foreign_access_ref / end_foreign_access_ref, v1) --

    def grant(self, ref: int, domid: int, frame: int, *, readonly: bool) -> None:
        """Publish a grant: domid and frame first, then flags, so Xen never sees a half-written entry."""
        self._check_ref(ref)
        struct.pack_into("<HI", self._buf, ref * ENTRY_SIZE + 2, domid, frame)
        struct.pack_into("<H", self._buf, ref * ENTRY_SIZE, GTF_permit_access | (GTF_readonly if readonly else 0))

    def try_end_access(self, ref: int) -> bool:
        """Revoke a grant unless Xen has it mapped (GTF_reading/GTF_writing): atomic, like Linux."""
        self._check_ref(ref)
        offset = ref * ENTRY_SIZE
        combo = struct.unpack_from("<I", self._buf, offset)[0]
        while True:
            if combo & (GTF_reading | GTF_writing):
                return False
            ok, combo = self._atomic.cas32(offset, combo, combo & 0xFFFF0000)
            if ok:
                return True

    def _check_ref(self, ref: int) -> None:
        if not 0 <= ref < self.nr_entries:
            raise IndexError(f"grant ref {ref} outside a table of {self.nr_entries} entries")

    # -- Xen's side --

    def check_for_copy(self, ref: int, ldomid: int, write: bool, active: ActiveTable) -> tuple[int, int]:
        """(GNTST status, frame) for one grant-copy access, checked as acquire_grant_for_copy does.

        Copies do not pin: the entry is checked, not marked GTF_reading (see
        the package docs for what that leaves out).
        """
        if not 0 <= ref < self.nr_entries:
            return _BAD_GNTREF, 0
        flags, domid, frame = ENTRY.unpack_from(self._buf, ref * ENTRY_SIZE)
        if (flags & GTF_type_mask) == GTF_permit_access and domid == ldomid:
            if write and flags & GTF_readonly and not active.writers(ref):
                return _GENERAL_ERROR, 0
            return _OKAY, frame
        # Xen only checks type and domid of an entry that is not already
        # pinned; a pinned one is used through its active entry.
        pins, pinned_frame = active.get(ref)
        if not pins:
            return _GENERAL_ERROR, 0
        if write and not pins >> 16 and flags & GTF_readonly:
            return _GENERAL_ERROR, 0
        return _OKAY, pinned_frame

    def pin(self, ref: int, ldomid: int, write: bool, active: ActiveTable) -> tuple[int, int]:
        """Pin for a map (map_grant_ref): (status, frame). Sets GTF_reading, and GTF_writing if write."""
        if not 0 <= ref < self.nr_entries:
            return _BAD_GNTREF, 0
        inc = _WRITE_PIN if write else _READ_PIN
        before = active.add(ref, inc)
        if not before or (write and not before >> 16):
            status = self._set_status(ref, ldomid, write, check_type=not before)
            if status != _OKAY:
                active.sub(ref, inc)
                return status, 0
            if not before:
                active.set_frame(ref, self.entry(ref).frame)
        return _OKAY, active.frame(ref)

    def unpin(self, ref: int, write: bool, active: ActiveTable) -> None:
        """Drop a map's pin; clear GTF_writing with the last writer, GTF_reading with the last pin."""
        after = active.sub(ref, _WRITE_PIN if write else _READ_PIN)
        clear = 0
        if not after >> 16:
            clear |= GTF_writing
        if not after:
            clear |= GTF_reading
        if clear:
            self._atomic.fetch_and16(ref * ENTRY_SIZE, 0xFFFF & ~clear)

    def repair_pins(self, ref: int, active: ActiveTable, seen: int, reads: int, writes: int) -> bool:
        """After a backend died inside a pin or unpin of ref (pin_ledger.py): set the pin counts, seen
        as `seen` a moment ago, to the reads and writes the live backends hold, and the entry's in-use
        flags to match (what Xen's state would be had the kill come before or after, not inside).
        False, changing nothing, if the counts moved meanwhile (a live pin or unpin: look again)."""
        swapped, _ = active.cas(ref, seen, reads * _READ_PIN + writes * _WRITE_PIN)
        if not swapped:
            return False
        want = (GTF_reading if reads or writes else 0) | (GTF_writing if writes else 0)
        offset = ref * ENTRY_SIZE
        combo = struct.unpack_from("<I", self._buf, offset)[0]
        while combo & (GTF_reading | GTF_writing) != want:
            _, combo = self._atomic.cas32(offset, combo, combo & ~(GTF_reading | GTF_writing) | want)
        return True

    def _set_status(self, ref: int, ldomid: int, write: bool, *, check_type: bool) -> int:
        """Xen's _set_status_v1 for a map: check, then set the in-use flags with compare-and-swap."""
        offset = ref * ENTRY_SIZE
        combo = struct.unpack_from("<I", self._buf, offset)[0]
        for _ in range(5):  # Xen gives up on an entry the guest keeps changing
            flags, domid = combo & 0xFFFF, combo >> 16
            if check_type and ((flags & (GTF_type_mask | GTF_sub_page)) != GTF_permit_access or domid != ldomid):
                return _GENERAL_ERROR
            new = flags | GTF_reading
            if write:
                if flags & GTF_readonly:
                    return _GENERAL_ERROR
                new |= GTF_writing
            ok, combo = self._atomic.cas32(offset, combo, (combo & 0xFFFF0000) | new)
            if ok:
                return _OKAY
        return _GENERAL_ERROR


class ActiveTable:
    """Xen's private per-entry pin counts and pinned frame, shared by the Xen-side processes."""

    def __init__(self, buf, addr: int, nr_entries: int):
        self._buf = buf
        self._atomic = _atomic.AtomicMemory(addr)
        self.nr_entries = nr_entries

    def get(self, ref: int) -> tuple[int, int]:
        return _ACTIVE.unpack_from(self._buf, ref * ACTIVE_ENTRY_SIZE)

    def writers(self, ref: int) -> int:
        return self.get(ref)[0] >> 16

    def frame(self, ref: int) -> int:
        return self.get(ref)[1]

    def set_frame(self, ref: int, frame: int) -> None:
        struct.pack_into("<I", self._buf, ref * ACTIVE_ENTRY_SIZE + 4, frame)

    def add(self, ref: int, inc: int) -> int:
        """Add inc to the pin counts; return the counts before."""
        return self._atomic.fetch_add32(ref * ACTIVE_ENTRY_SIZE, inc)

    def counts(self, ref: int) -> int:
        return self.get(ref)[0]

    def cas(self, ref: int, expected: int, desired: int) -> tuple[bool, int]:
        return self._atomic.cas32(ref * ACTIVE_ENTRY_SIZE, expected, desired)

    def sub(self, ref: int, dec: int) -> int:
        """Subtract dec from the pin counts; return the counts after."""
        return self._atomic.fetch_sub32(ref * ACTIVE_ENTRY_SIZE, dec) - dec


def grant_table_bytes(nr_frames: int) -> int:
    return nr_frames * PAGE_SIZE


def active_table_bytes(nr_frames: int) -> int:
    return nr_frames * ENTRIES_PER_FRAME * ACTIVE_ENTRY_SIZE
