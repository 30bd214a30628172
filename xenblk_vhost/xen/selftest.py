"""Exercise the real gntdev and evtchn adapters on a Xen host, with no guest needed.

    python -m xenblk_vhost.xen.selftest [--domid 0] [--rounds 1000]

Run in dom0 (or a driver domain, giving its domid), as root. The domain
plays both parts: /dev/xen/gntalloc grants our own pages to ourselves (the
"guest" side, as Linux gnttab does for a frontend), and the adapters under
test map and copy them through /dev/xen/gntdev; an unbound port allocated
through one /dev/xen/evtchn open is bound interdomain (to ourselves) through
another. Prints one JSON object per check and a summary; exits 1 if any
check failed. Expected statuses are Xen's (xen/common/grant_table.c).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import os
import select
import sys
import time
import traceback

import trio

from ._libc import IOC_NONE, ioc, ioctl
from .evtchn import EvtchnDevice
from .gntdev import GntdevDevice
from .interfaces import PAGE_SIZE, CopySegment, GrantMapError, GrantStatus

GNTALLOC_PATH = "/dev/xen/gntalloc"
GNTALLOC_FLAG_WRITABLE = 1


class GntallocAllocGrefHeader(ctypes.Structure):
    # struct ioctl_gntalloc_alloc_gref without its variable gref_ids[] tail
    _fields_ = [("domid", ctypes.c_uint16), ("flags", ctypes.c_uint16), ("count", ctypes.c_uint32), ("index", ctypes.c_uint64)]


class GntallocDeallocGref(ctypes.Structure):
    _fields_ = [("index", ctypes.c_uint64), ("count", ctypes.c_uint32)]


# The sizes the kernel's header puts in the numbers include gref_ids[1] (24) and tail padding (16).
IOCTL_GNTALLOC_ALLOC_GREF = ioc(IOC_NONE, "G", 5, ctypes.sizeof(GntallocAllocGrefHeader) + 8)
IOCTL_GNTALLOC_DEALLOC_GREF = ioc(IOC_NONE, "G", 6, ctypes.sizeof(GntallocDeallocGref))


def pattern(seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(PAGE_SIZE))


class SelfGrants:
    """Pages of our own, granted to `domid` through gntalloc (a frontend's part)."""

    def __init__(self, domid: int, count: int, *, writable: bool):
        self._fd = os.open(GNTALLOC_PATH, os.O_RDWR | os.O_CLOEXEC)
        size = ctypes.sizeof(GntallocAllocGrefHeader)
        buf = ctypes.create_string_buffer(size + 4 * count)
        hdr = GntallocAllocGrefHeader.from_buffer(buf)
        hdr.domid, hdr.flags, hdr.count = domid, GNTALLOC_FLAG_WRITABLE if writable else 0, count
        ioctl(self._fd, IOCTL_GNTALLOC_ALLOC_GREF, ctypes.addressof(buf))
        self.index = hdr.index
        self.count = count
        self.refs = list((ctypes.c_uint32 * count).from_buffer(buf, size))
        # our own side of the pages is always writable
        self.memory = mmap.mmap(self._fd, count * PAGE_SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=self.index)

    def page(self, i: int) -> memoryview:
        return memoryview(self.memory)[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]

    def close(self) -> None:
        self.memory.close()
        arg = GntallocDeallocGref(self.index, self.count)
        try:
            ioctl(self._fd, IOCTL_GNTALLOC_DEALLOC_GREF, ctypes.addressof(arg))
        finally:
            os.close(self._fd)


class Report:
    def __init__(self) -> None:
        self.failed = 0
        self.passed = 0

    def check(self, name: str, ok: bool, **detail) -> bool:
        print(json.dumps({"check": name, "ok": bool(ok), **detail}), flush=True)
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        return ok

    def crash(self, name: str) -> None:
        self.check(name, False, error=traceback.format_exc())


def readable(fd: int, timeout: float = 0.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def gntdev_checks(r: Report, domid: int) -> None:
    rw = SelfGrants(domid, 4, writable=True)
    ro = SelfGrants(domid, 1, writable=False)
    dev = GntdevDevice()
    try:
        for i in range(4):
            rw.page(i)[:] = pattern(i)
        ro.page(0)[:] = pattern(9)
        dev.set_max_grants(64)
        r.check("set_max_grants", True)

        m = dev.map_grants(domid, rw.refs, readonly=False)
        r.check("map rw: contents", all(bytes(m.buffer[i * PAGE_SIZE : (i + 1) * PAGE_SIZE]) == pattern(i) for i in range(4)))
        m.buffer[123] = 0xA5
        r.check("map rw: write-through", rw.page(0)[123] == 0xA5)
        m.close()

        m = dev.map_grants(domid, ro.refs, readonly=True)
        r.check("map ro: contents and read-only view", bytes(m.buffer) == pattern(9) and m.buffer.readonly)
        m.close()
        try:
            dev.map_grants(domid, ro.refs, readonly=False).close()
            r.check("map ro grant writable is refused", False)
        except GrantMapError as e:
            r.check("map ro grant writable is refused", True, errno=e.errno)

        try:
            dev.map_grants(domid, [0xFFFFFF0], readonly=True).close()
            r.check("map bad ref is refused", False)
        except GrantMapError as e:
            r.check("map bad ref is refused", True, errno=e.errno)

        local = ctypes.create_string_buffer(4 * PAGE_SIZE)
        base = ctypes.addressof(local)
        segs = [CopySegment(False, domid, ref, 0, base + i * PAGE_SIZE, PAGE_SIZE) for i, ref in enumerate(rw.refs)]
        st = dev.grant_copy(segs)
        r.check("copy guest->local: 4 pages in one batch", st == [0] * 4 and all(local.raw[i * PAGE_SIZE : (i + 1) * PAGE_SIZE] == pattern(i) for i in range(4)), statuses=st)
        local[0:PAGE_SIZE] = pattern(42)
        st = dev.grant_copy([CopySegment(True, domid, rw.refs[1], 256, base + 17, 1000)])
        r.check("copy local->guest, unaligned", st == [0] and bytes(rw.page(1)[256:1256]) == pattern(42)[17:1017], statuses=st)
        S = GrantStatus
        bad = [
            ("into a read-only grant", CopySegment(True, domid, ro.refs[0], 0, base, 64), S.GENERAL_ERROR),
            ("unknown domain", CopySegment(False, 0x7FEF, rw.refs[0], 0, base, 64), S.BAD_DOMAIN),
            ("ref beyond the table", CopySegment(False, domid, 0xFFFFFF0, 0, base, 64), S.BAD_GNTREF),
            ("crossing the page", CopySegment(False, domid, rw.refs[0], 4000, base, 200), S.BAD_COPY_ARG),
        ]
        st = dev.grant_copy([s for _, s, _ in bad] + [segs[0]])
        for (name, _, want), got in zip(bad, st):
            r.check(f"copy {name} -> {want.name}", got == want, status=got)
        r.check("copy: a good segment after bad ones still works", st[-1] == 0, status=st[-1])
        r.check("copy: read-only grant untouched", bytes(ro.page(0)) == pattern(9))

        # unmap notify: clear a byte of the page when the mapping goes
        rw.page(2)[7] = 0xFF
        m = dev.map_grants(domid, [rw.refs[2]], readonly=False)
        m.set_unmap_notify(clear_byte=7)
        m.close()
        r.check("unmap notify clears the byte", rw.page(2)[7] == 0)

        n, reps = 32, 200
        many = SelfGrants(domid, n, writable=True)
        try:
            big = ctypes.create_string_buffer(n * PAGE_SIZE)
            bsegs = [CopySegment(False, domid, ref, 0, ctypes.addressof(big) + i * PAGE_SIZE, PAGE_SIZE) for i, ref in enumerate(many.refs)]
            t = time.perf_counter()
            for _ in range(reps):
                dev.grant_copy(bsegs)
            dt = (time.perf_counter() - t) / reps
            r.check("copy throughput (32 x 4 KiB per ioctl)", True, us_per_batch=round(dt * 1e6, 1), pages_per_s=round(n / dt))
            t = time.perf_counter()
            for _ in range(reps):
                dev.map_grants(domid, many.refs[:1], readonly=False).close()
            dt = (time.perf_counter() - t) / reps
            r.check("map+unmap 1 page", True, us=round(dt * 1e6, 1))
        finally:
            many.close()
    finally:
        dev.close()
        rw.close()
        ro.close()


async def evtchn_checks(r: Report, domid: int, rounds: int) -> None:
    frontend = EvtchnDevice()
    backend = EvtchnDevice()
    try:
        a = frontend.bind_unbound_port(domid)
        b = backend.bind_interdomain(domid, a.local_port)
        r.check("bind_interdomain", b.local_port > 0, unbound=a.local_port, bound=b.local_port)
        with trio.move_on_after(2) as scope:
            await b.wait()
        r.check("a freshly bound port is pending", not scope.cancelled_caught)
        t = time.perf_counter()
        with trio.move_on_after(30) as scope:
            for _ in range(rounds):
                b.notify()
                await a.wait()
                a.notify()
                await b.wait()
        dt = time.perf_counter() - t
        r.check(f"ping-pong x{rounds}", not scope.cancelled_caught, us_per_round_trip=round(dt / rounds * 1e6, 1))
        for _ in range(5):
            b.notify()
        with trio.move_on_after(2) as scope:
            await a.wait()
        await trio.sleep(0.05)  # give any stray second delivery time to arrive
        r.check("five notifies, one wake-up", not scope.cancelled_caught and not readable(a.fileno()))

        # unmap notify by event: closing a mapping kicks the frontend
        g = SelfGrants(domid, 1, writable=True)
        dev = GntdevDevice()
        try:
            m = dev.map_grants(domid, g.refs, readonly=False)
            m.set_unmap_notify(event_port=b.local_port)
            m.close()
            with trio.move_on_after(2) as scope:
                await a.wait()
            r.check("unmap notify sends the event", not scope.cancelled_caught)
        finally:
            dev.close()
            g.close()

        b.close()
        a.notify()  # to an unbound peer: dropped, not an error
        r.check("notify after the peer closed is harmless", True)
    finally:
        backend.close()
        frontend.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m xenblk_vhost.xen.selftest", description=__doc__.splitlines()[0])
    ap.add_argument("--domid", type=int, default=0, help="our own domid (0 in dom0)")
    ap.add_argument("--rounds", type=int, default=1000, help="event channel round trips")
    args = ap.parse_args(argv)
    r = Report()
    try:
        gntdev_checks(r, args.domid)
    except Exception:
        r.crash("gntdev checks")
    try:
        trio.run(evtchn_checks, r, args.domid, args.rounds)
    except Exception:
        r.crash("evtchn checks")
    print(json.dumps({"summary": True, "passed": r.passed, "failed": r.failed}), flush=True)
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
