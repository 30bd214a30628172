"""The shared ring: free-running indices, slot copies, event-index notification.

A blkif ring is 2**order contiguous 4 KiB pages (order 0..4): a 64-byte
header (req_prod, req_event, rsp_prod, rsp_event, then padding) and
ring_entries(abi, order) slots of the ABI's entry size. Indices are
free-running 32-bit unsigned counters; a slot is index & (size - 1), and
every difference of two indices is taken modulo 2**32, as C's unsigned
arithmetic does, so wrap-around at 2**32 needs no special case.

BackRing is the backend's side (ring.h BACK_RING_* macros), FrontRing the
frontend's (used by the simulator's reference frontend and hostile tests).
Both work over a writable memoryview of the ring pages; the shared indices
are read and written through a native-mode struct on that view (one 4-byte
access each, never torn: see _IDX), the private ones
(req_cons/rsp_prod_pvt, req_prod_pvt/rsp_cons) are plain attributes.
tests/test_blkif_ring.py runs the same index states through Xen's ring.h
macros compiled by gcc and checks that every decision here matches.

Memory ordering. ring.h puts xen_rmb() between reading req_prod and reading
the slots, xen_wmb() before publishing a producer index, and xen_mb()
between publishing our index (or event index) and reading the other side's.
We run on x86 (TSO): loads are not reordered with loads nor stores with
stores, and CPython performs each struct access on the view as its own
memory access in program order, so program order gives us rmb and wmb. TSO
does reorder a store with a later load from another location, which is
exactly what xen_mb() forbids (without it, both ends can miss each other's
update and the ring stalls with work pending). full_barrier() supplies it:
acquiring and releasing a private CPython lock executes lock-prefixed atomic
instructions (glibc semaphores; no system call when uncontended), which are
full fences on x86. Porting to a weakly ordered architecture would need real
barriers in place of program order.

Public API:
    RingOverflow                      the other end published an impossible index
    BackRing(view, abi, order)        attaches like blkback (BACK_RING_ATTACH at rsp_prod)
        .size, .req_cons, .rsp_prod_pvt
        .requests_available() -> int  (RING_REQUEST_PROD_OVERFLOW check + blkback's bound)
        .nr_unconsumed_requests() -> int
        .take_slots(max_count) -> (bytes, n)   private copy of up to n slots
        .put_response(id, op, status)
        .push_responses() -> bool notify
        .final_check_for_requests() -> bool more_to_do
    FrontRing(view, abi, order, init=True)
        .size, .req_prod_pvt, .rsp_cons
        .free_requests() -> int, .claim_request_slot() -> offset
        .push_requests() -> bool notify
        .responses_available() -> int  (RING_RESPONSE_PROD_OVERFLOW check)
        .take_responses(max_count) -> list[Response]
        .final_check_for_responses() -> bool more_to_do
    ring_bytes(order) -> int          bytes of a 2**order page ring
    full_barrier()                    xen_mb() for x86
"""

from __future__ import annotations

import struct
import sys
import threading

from .abi import SRING, SRING_ENTRIES_OFFSET, Abi, layout, ring_entries
from .constants import U32_MASK, XEN_PAGE_SIZE
from .response import Response

_M = U32_MASK
# Native mode ("@I"): CPython's _struct reads and writes a native int with a
# 4-byte memcpy, one aligned load or store on x86, so a req_prod the frontend
# is updating cannot be read torn (a spurious "bogus ring"), nor our rsp_prod
# seen half-written. The "<I" routines assemble bytes one at a time; CPython
# happens to swap the native ones in for them on little-endian hosts, but that
# is an implementation detail we do not lean on. Native order is the wire
# order only on little-endian hosts.
if sys.byteorder != "little":
    raise ImportError("blkif rings are little-endian: port the shared index access first")
_IDX = struct.Struct("@I")
_REQ_PROD = SRING.offset("req_prod")
_REQ_EVENT = SRING.offset("req_event")
_RSP_PROD = SRING.offset("rsp_prod")
_RSP_EVENT = SRING.offset("rsp_event")
_new = tuple.__new__


_fence_lock = threading.Lock()


def full_barrier() -> None:
    """xen_mb(): order our earlier stores before our later loads (see above)."""
    _fence_lock.acquire()
    _fence_lock.release()


class RingOverflow(Exception):
    """A producer index that cannot be right: the other end is bogus.

    Halt this ring (log, stop processing, keep the rest of the service up),
    as blkback does with "Frontend provided bogus ring requests".
    """

    def __init__(self, what: str, prod: int, base: int, size: int) -> None:
        super().__init__(
            f"bogus {what}: {prod} - {base} = {(prod - base) & _M} exceeds ring size {size}"
        )
        self.prod = prod
        self.base = base
        self.size = size


class RingStateError(RuntimeError):
    """Our own side broke a ring invariant (a bug, never the guest's doing)."""


def ring_bytes(order: int) -> int:
    return XEN_PAGE_SIZE << order


class _Ring:
    __slots__ = ("view", "abi", "order", "size", "_mask", "_entry", "_get", "_put")

    def __init__(self, view: memoryview, abi: Abi, order: int) -> None:
        size = ring_entries(abi, order)  # also validates order
        view = memoryview(view)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.readonly:
            raise ValueError("ring view must be writable")
        if len(view) < ring_bytes(order):
            raise ValueError(f"ring view is {len(view)} bytes, order {order} needs {ring_bytes(order)}")
        self.view = view
        self.abi = abi
        self.order = order
        self.size = size
        self._mask = size - 1
        self._entry = layout(abi).entry_size
        self._get = _IDX.unpack_from
        self._put = _IDX.pack_into

    @property
    def entry_size(self) -> int:
        """Bytes of one slot (a request or a response)."""
        return self._entry

    def slot_offset(self, idx: int) -> int:
        """Byte offset in the view of the slot that index `idx` names."""
        return SRING_ENTRIES_OFFSET + (idx & self._mask) * self._entry

    # Shared indices: each call is exactly one 4-byte read or write of the page.
    def _shared(self, off: int) -> int:
        return self._get(self.view, off)[0]

    def _set_shared(self, off: int, value: int) -> None:
        # Not Struct.pack_into: CPython's s_pack_internal memsets the
        # destination to zero before writing the field, so the other end can
        # read a transient 0 (a frontend's req_prod of 0 looks bogus and
        # halts the ring; blkfront takes an rsp_prod of 0 as an illegal
        # response count). Item assignment through a uint32 cast is one
        # 4-byte store of the final value (memoryview's pack_single: a
        # fixed-size memcpy).
        self.view[off:off + 4].cast("I")[0] = value & _M

    @property
    def req_prod(self) -> int:
        return self._shared(_REQ_PROD)

    @property
    def req_event(self) -> int:
        return self._shared(_REQ_EVENT)

    @property
    def rsp_prod(self) -> int:
        return self._shared(_RSP_PROD)

    @property
    def rsp_event(self) -> int:
        return self._shared(_RSP_EVENT)

    def _copy_slots(self, start: int, count: int) -> bytes:
        """Copy `count` slots from index `start` out of shared memory.

        One slice per contiguous run: two when the run wraps past the last
        slot. The result holds the slots back to back, entry_size apart.
        """
        first = start & self._mask
        entry = self._entry
        view = self.view
        base = SRING_ENTRIES_OFFSET
        head = min(count, self.size - first)
        a = base + first * entry
        raw = view[a:a + head * entry].tobytes()
        if head < count:
            raw += view[base:base + (count - head) * entry].tobytes()
        return raw


class BackRing(_Ring):
    """The backend's view: consumes requests, produces responses."""

    __slots__ = ("req_cons", "rsp_prod_pvt", "_rsp_pack")

    def __init__(self, view: memoryview, abi: Abi, order: int) -> None:
        super().__init__(view, abi, order)
        # BACK_RING_ATTACH at the shared rsp_prod (what blkback does since it
        # learned to reconnect to a live ring): responses already published
        # stay published; requests after them are still to be consumed.
        rsp_prod = self.rsp_prod
        req_prod = self.req_prod
        self.req_cons = rsp_prod
        self.rsp_prod_pvt = rsp_prod
        self._rsp_pack = layout(abi).response_struct.pack_into
        if (req_prod - rsp_prod) & _M > self.size:
            raise RingOverflow("req_prod at attach", req_prod, rsp_prod, self.size)

    def nr_unconsumed_requests(self) -> int:
        """XEN_RING_NR_UNCONSUMED_REQUESTS: requests we may consume now.

        Bounded both by what the frontend published and by the free response
        slots (a request we consume needs a slot for its response). Unsigned
        32-bit arithmetic throughout, exactly as the macro computes it.
        """
        req = (self.req_prod - self.req_cons) & _M
        rsp = (self.size - ((self.req_cons - self.rsp_prod_pvt) & _M)) & _M
        return req if req < rsp else rsp

    def requests_available(self) -> int:
        """How many requests to consume now, checked as blkback checks.

        Reads req_prod once. Raises RingOverflow if the frontend published
        more requests than the ring can hold (RING_REQUEST_PROD_OVERFLOW).
        Otherwise returns what blkback's loop would consume: up to req_prod,
        stopping where RING_REQUEST_CONS_OVERFLOW says the response slots
        run out.
        """
        rp = self.req_prod
        if (rp - self.rsp_prod_pvt) & _M > self.size:
            raise RingOverflow("req_prod", rp, self.rsp_prod_pvt, self.size)
        req = (rp - self.req_cons) & _M
        rsp = self.size - ((self.req_cons - self.rsp_prod_pvt) & _M)
        if rsp < 0:  # cannot happen unless our own indices were corrupted
            raise RingStateError("consumed more requests than the ring holds")
        return req if req < rsp else rsp

    def request_cons_overflow(self, cons: int) -> bool:
        """RING_REQUEST_CONS_OVERFLOW(cons)."""
        return ((cons - self.rsp_prod_pvt) & _M) >= self.size

    def take_slots(self, max_count: int) -> tuple[bytes, int]:
        """Consume up to max_count requests: (private copy of their slots, n).

        Slot i of the batch is raw[i*entry_size:(i+1)*entry_size]. req_cons
        advances past them. Raises RingOverflow on a bogus req_prod.
        """
        n = self.requests_available()
        if max_count < n:
            n = max_count
        if n <= 0:
            return b"", 0
        raw = self._copy_slots(self.req_cons, n)
        self.req_cons = (self.req_cons + n) & _M
        return raw, n

    def put_response(self, id_: int, op: int, status: int) -> None:
        """Write one response at rsp_prod_pvt (not yet visible to the frontend)."""
        pvt = self.rsp_prod_pvt
        if pvt == self.req_cons:
            raise RingStateError("response without a consumed request to answer")
        self._rsp_pack(self.view, SRING_ENTRIES_OFFSET + (pvt & self._mask) * self._entry,
                       id_, op, status)
        self.rsp_prod_pvt = (pvt + 1) & _M

    def push_responses(self) -> bool:
        """RING_PUSH_RESPONSES_AND_CHECK_NOTIFY: publish, and say whether to kick.

        Notify only if the frontend's rsp_event lies within the responses
        just published, i.e. it asked to be woken at one of them.
        """
        old = self.rsp_prod
        new = self.rsp_prod_pvt
        self._set_shared(_RSP_PROD, new)
        full_barrier()
        return ((new - self.rsp_event) & _M) < ((new - old) & _M)

    def final_check_for_requests(self) -> bool:
        """RING_FINAL_CHECK_FOR_REQUESTS: any work left before we sleep?

        If none, ask for a notification at the next request (req_event =
        req_cons + 1) and look once more, closing the race with a frontend
        that published between our check and our request.
        """
        if self.nr_unconsumed_requests():
            return True
        self._set_shared(_REQ_EVENT, self.req_cons + 1)
        full_barrier()
        return self.nr_unconsumed_requests() > 0


class FrontRing(_Ring):
    """The frontend's view: produces requests, consumes responses."""

    __slots__ = ("req_prod_pvt", "rsp_cons", "_rsp_unpack", "_rsp_size")

    def __init__(self, view: memoryview, abi: Abi, order: int, *, init: bool = True) -> None:
        super().__init__(view, abi, order)
        if init:
            # SHARED_RING_INIT: indices 0, event indices 1, padding zeroed.
            self.view[:SRING_ENTRIES_OFFSET] = bytes(SRING_ENTRIES_OFFSET)
            self._set_shared(_REQ_EVENT, 1)
            self._set_shared(_RSP_EVENT, 1)
            start = 0
        else:
            start = self.req_prod
        self.req_prod_pvt = start
        self.rsp_cons = start
        lay = layout(abi)
        self._rsp_unpack = lay.response_struct.unpack_from
        self._rsp_size = lay.response.size

    def free_requests(self) -> int:
        """RING_FREE_REQUESTS."""
        return self.size - ((self.req_prod_pvt - self.rsp_cons) & _M)

    def claim_request_slot(self) -> int:
        """Byte offset of the slot for the next request; advances req_prod_pvt.

        Write the request there (encode.RequestEncoder) before push_requests().
        """
        if self.free_requests() <= 0:
            raise RingStateError("ring full")
        off = self.slot_offset(self.req_prod_pvt)
        self.req_prod_pvt = (self.req_prod_pvt + 1) & _M
        return off

    def push_requests(self) -> bool:
        """RING_PUSH_REQUESTS_AND_CHECK_NOTIFY."""
        old = self.req_prod
        new = self.req_prod_pvt
        self._set_shared(_REQ_PROD, new)
        full_barrier()
        return ((new - self.req_event) & _M) < ((new - old) & _M)

    def nr_unconsumed_responses(self) -> int:
        """XEN_RING_NR_UNCONSUMED_RESPONSES."""
        return (self.rsp_prod - self.rsp_cons) & _M

    def responses_available(self) -> int:
        """Responses to consume; RingOverflow on RING_RESPONSE_PROD_OVERFLOW."""
        rp = self.rsp_prod
        n = (rp - self.rsp_cons) & _M
        if n > self.size:
            raise RingOverflow("rsp_prod", rp, self.rsp_cons, self.size)
        return n

    def take_responses(self, max_count: int) -> list[Response]:
        """Copy out and consume up to max_count responses."""
        n = min(self.responses_available(), max_count)
        if n <= 0:
            return []
        raw = self._copy_slots(self.rsp_cons, n)
        entry = self._entry
        unpack = self._rsp_unpack
        out = [_new(Response, unpack(raw, i * entry)) for i in range(n)]
        self.rsp_cons = (self.rsp_cons + n) & _M
        return out

    def final_check_for_responses(self) -> bool:
        """RING_FINAL_CHECK_FOR_RESPONSES."""
        if self.nr_unconsumed_responses():
            return True
        self._set_shared(_RSP_EVENT, self.rsp_cons + 1)
        full_barrier()
        return self.nr_unconsumed_responses() > 0
