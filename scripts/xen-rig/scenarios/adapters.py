# rig-timeout: 240
"""Our xen adapters against the real thing, inside dom0.

- xenstore (xenblk_vhost.xen.xenstore) against Xen 4.17's C xenstored, over
  its unix socket and over /dev/xen/xenbus: read, write, directory (also one
  too long for a single reply), permissions, transactions (commit, abort, a
  conflict, transact() retrying), watches (registration fire, child events,
  @releaseDomain).
- gntdev (xenblk_vhost.xen.gntdev) on real grants: dom0 grants pages to
  itself through /dev/xen/gntalloc, and we map them (rw, ro, multi-page, a bad
  ref, rw on a read-only grant) and grant-copy to and from them, checking the
  per-segment status Xen gives (a bad ref, an unknown domain, a read-only
  grant must fail their own segment only, with grant_table.c's GNTST_*);
  unmap notifications (a cleared byte, an event to the peer); the cost of a
  32-page grant copy and of a map+unmap, noted.
- evtchn (xenblk_vhost.xen.evtchn): a port allocated unbound on a raw
  /dev/xen/evtchn fd, bound interdomain (domid 0) by our adapter; pending
  right after bind, notify both ways, coalescing, close waking a waiter, a
  notify to a peer that unbound.

The raw gntalloc (dom0/gntalloc.py) and evtchn side is written with
fcntl.ioctl from the kernel headers (not with the adapters' own encoders), so
an encoding mistake in an adapter cannot cancel itself out.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
import struct
import time

import trio

from gntalloc import Gntalloc, ioc_none
from rigcheck import Checks
from xenblk_vhost.xen.evtchn import EvtchnDevice
from xenblk_vhost.xen.gntdev import GntdevDevice
from xenblk_vhost.xen.interfaces import PAGE_SIZE, CopySegment, GrantMapError, GrantStatus, Permission, XenStoreError
from xenblk_vhost.xen.xenstore import open_xenstore

checks = Checks()
BASE = "/xenblk-rig-adapters"
SOCKET = "/run/xenstored/socket"
XENBUS = "/dev/xen/xenbus"


# ---- raw /dev/xen/evtchn (include/uapi/xen/evtchn.h) ----
EVTCHN_BIND_UNBOUND = ioc_none("E", 2, 4)
EVTCHN_NOTIFY = ioc_none("E", 4, 4)


_libc = ctypes.CDLL(None, use_errno=True)


def _ioctl_ret(fd: int, request: int, arg: ctypes.Structure) -> int:
    """ioctl whose return value matters (fcntl.ioctl with a buffer loses it)."""
    r = _libc.ioctl(fd, ctypes.c_ulong(request), ctypes.byref(arg))
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r


class RawPort:
    """An unbound port for domain 0 on its own evtchn fd: the 'frontend' end."""

    def __init__(self) -> None:
        self.fd = os.open("/dev/xen/evtchn", os.O_RDWR | os.O_NONBLOCK)
        self.port = _ioctl_ret(self.fd, EVTCHN_BIND_UNBOUND, ctypes.c_uint(0))

    def notify(self) -> None:
        fcntl.ioctl(self.fd, EVTCHN_NOTIFY, struct.pack("<I", self.port))

    def pending(self, timeout: float) -> list[int]:
        """Ports delivered within timeout (then unmasked, as libxenevtchn does)."""
        r, _, _ = select.select([self.fd], [], [], timeout)
        if not r:
            return []
        try:
            data = os.read(self.fd, 4096)
        except BlockingIOError:
            return []
        ports = [p for (p,) in struct.iter_unpack("<I", data)]
        for p in set(ports):
            os.write(self.fd, struct.pack("<I", p))
        return ports

    def close(self) -> None:
        os.close(self.fd)


# ===================================================================== xenstore


async def _drain(events, quiet: float = 1.0) -> list[str]:
    """Every event that arrives until none came for `quiet` seconds."""
    got = []
    while True:
        with trio.move_on_after(quiet) as scope:
            got.append(await events.__anext__())
        if scope.cancelled_caught:
            return got


@checks.case
async def xenstore_basic_socket():
    await _xenstore_basic(SOCKET)


@checks.case
async def xenstore_basic_xenbus_device():
    # A driver domain has no xenstored socket: the backend then talks through
    # the kernel's xenbus device, which multiplexes dom0's own xenbus ring.
    await _xenstore_basic(XENBUS)


async def _xenstore_basic(where: str):
    with trio.fail_after(30):
        async with open_xenstore(where) as xs:
            base = f"{BASE}/basic-{os.path.basename(where)}"
            if await xs.exists(base):
                await xs.rm(base)
            await xs.write(f"{base}/a", "1")
            checks.eq("read back", await xs.read(f"{base}/a"), b"1")
            value = "état ✓ \x01 spaces and = signs".encode()
            await xs.write(f"{base}/b", value)
            checks.eq("non-ASCII bytes round trip", await xs.read(f"{base}/b"), value)
            await xs.write(f"{base}/empty", "")
            checks.eq("empty value", await xs.read(f"{base}/empty"), b"")
            await xs.mkdir(f"{base}/dir")
            checks.eq("mkdir makes an empty node", await xs.read(f"{base}/dir"), b"")
            checks.eq("directory", sorted(await xs.directory(base)), ["a", "b", "dir", "empty"])
            checks.eq("directory of a leaf", await xs.directory(f"{base}/a"), [])
            e = await checks.araises("read of a missing node", XenStoreError, xs.read(f"{base}/missing"))
            checks.eq("missing node errno", e.errno, errno.ENOENT)
            checks.true(not await xs.exists(f"{base}/missing"), "exists() of a missing node is True")
            checks.eq("domain path of dom0", await xs.get_domain_path(0), "/local/domain/0")
            checks.eq("domain path of domid 7", await xs.get_domain_path(7), "/local/domain/7")
            await xs.rm(base)
            checks.true(not await xs.exists(f"{base}/a"), "rm did not remove the subtree")


@checks.case
async def xenstore_long_directory():
    # More child names than fit in one 4096-byte reply: xenstored answers
    # E2BIG to DIRECTORY and the client must page with DIRECTORY_PART.
    with trio.fail_after(90):
        async with open_xenstore(SOCKET) as xs:
            base = f"{BASE}/long"
            names = [f"child-{i:05d}-padding-name" for i in range(200)]  # ~5 KiB of names

            async def fill(t):
                for n in names:
                    await t.write(f"{base}/{n}", "x")

            await xs.transact(fill)
            paged = []
            whole = xs._directory_in_parts

            async def spy(path):
                paged.append(path)
                return await whole(path)

            xs._directory_in_parts = spy  # to prove the paging path really ran
            got = await xs.directory(base)
            checks.true(paged == [base], "xenstored answered a >4 KiB DIRECTORY in one reply: paging not exercised")
            checks.eq("number of children", len(got), len(names))
            checks.eq("children", sorted(got), names)
            await xs.rm(base)


@checks.case
async def xenstore_permissions():
    with trio.fail_after(30):
        async with open_xenstore(SOCKET) as xs:
            p = f"{BASE}/perms"
            await xs.write(p, "v")
            perms = await xs.get_perms(p)
            checks.note("xenstore.default_perms_of_dom0_node", [x.encode() for x in perms])
            checks.eq("owner of a node dom0 made", perms[0].domid, 0)
            want = [Permission(0, False, False), Permission(5, True, False), Permission(6, True, True)]
            await xs.set_perms(p, want)
            checks.eq("perms after set_perms", await xs.get_perms(p), want)
            # Handing a node to a domain that does not exist is refused (xenstored
            # charges nodes to their owner's quota), and the node keeps its perms.
            e = await checks.araises("chown to a missing domain", XenStoreError,
                                     xs.set_perms(p, [Permission(7, False, False), Permission(0, True, True)]))
            checks.note("xenstore.chown_to_missing_domain_errno", e.strerror)
            checks.eq("perms after the refused chown", await xs.get_perms(p), want)
            # dom0 is privileged: it still writes a node it does not own.
            await xs.write(p, "w")
            checks.eq("privileged write", await xs.read(p), b"w")
            e = await checks.araises("set_perms on a missing node", XenStoreError,
                                     xs.set_perms(f"{BASE}/nope/x", want))
            checks.eq("errno", e.errno, errno.ENOENT)
            await xs.rm(p)


@checks.case
async def xenstore_transactions():
    with trio.fail_after(60):
        async with open_xenstore(SOCKET) as xs, open_xenstore(SOCKET) as other:
            base = f"{BASE}/tx"
            await xs.write(f"{base}/k", "0")
            # Commit: invisible outside until the end, then both writes at once.
            async with xs.transaction() as t:
                await t.write(f"{base}/x", "1")
                await t.write(f"{base}/y", "2")
                checks.eq("tx sees its own write", await t.read(f"{base}/x"), b"1")
                checks.true(not await other.exists(f"{base}/x"), "uncommitted write visible to another connection")
            checks.eq("committed x", await other.read(f"{base}/x"), b"1")
            checks.eq("committed y", await other.read(f"{base}/y"), b"2")
            # Abort: an exception in the block throws the writes away.
            try:
                async with xs.transaction() as t:
                    await t.write(f"{base}/z", "3")
                    raise KeyError("abort me")
            except KeyError:
                pass
            checks.true(not await other.exists(f"{base}/z"), "aborted transaction's write is visible")
            # Conflict: someone else changes a node this transaction read.
            e = None
            try:
                async with xs.transaction() as t:
                    v = await t.read(f"{base}/k")
                    await other.write(f"{base}/k", "other")
                    await t.write(f"{base}/k", str(int(v) + 1))
            except XenStoreError as exc:
                e = exc
            checks.true(e is not None, "conflicting transaction committed without EAGAIN")
            checks.eq("conflict errno", e.errno, errno.EAGAIN)
            checks.eq("the other writer's value survives", await xs.read(f"{base}/k"), b"other")
            # transact(): retried from the start, the second attempt wins.
            attempts = 0

            async def bump(t):
                nonlocal attempts
                attempts += 1
                v = (await t.read(f"{base}/k")).decode()
                if attempts == 1:
                    await other.write(f"{base}/k", "interloper")
                await t.write(f"{base}/k", v + "+1")
                return attempts

            checks.eq("transact result", await xs.transact(bump), 2)
            checks.eq("value after retried transaction", await xs.read(f"{base}/k"), b"interloper+1")
            await xs.rm(base)


@checks.case
async def xenstore_watches():
    with trio.fail_after(60):
        async with open_xenstore(SOCKET) as xs, open_xenstore(SOCKET) as other:
            base = f"{BASE}/watch"
            await xs.write(f"{base}/state", "1")
            async with xs.watch(base, "rig-token") as events:
                checks.eq("registration fire", await events.__anext__(), base)
                await other.write(f"{base}/state", "2")
                checks.eq("event for a changed child", await events.__anext__(), f"{base}/state")
                await other.write(f"{base}/new/deep", "x")
                # xenstored fires for the created node (and may fire for its parent).
                seen = set()
                while f"{base}/new/deep" not in seen:
                    seen.add(await events.__anext__())
                checks.note("xenstore.events_for_write_creating_parent", sorted(seen))
                await other.rm(f"{base}/new")
                gone = await _drain(events)
                checks.note("xenstore.events_for_rm_of_subtree", sorted(gone))
                checks.true(any(p.startswith(f"{base}/new") for p in gone), f"no event for the rm: {gone}")
                # A second watch on a child, with a generated token.
                async with xs.watch(f"{base}/state") as child:
                    checks.eq("child registration fire", await child.__anext__(), f"{base}/state")
                    await other.write(f"{base}/state", "3")
                    checks.eq("child watch event", await child.__anext__(), f"{base}/state")
                    checks.eq("parent watch event too", await _drain(events), [f"{base}/state"])
            # After the block the watch is gone: changes produce nothing.
            async with xs.watch("@releaseDomain") as rel:
                checks.eq("@releaseDomain registration fire", await rel.__anext__(), "@releaseDomain")
            await xs.rm(base)


# ======================================================================= gntdev


def _local(size: int, fill: int | None = None):
    buf = ctypes.create_string_buffer(size)
    if fill is not None:
        ctypes.memset(buf, fill, size)
    return buf, ctypes.addressof(buf)


@checks.case
def gntdev_map():
    ga, dev = Gntalloc(), GntdevDevice()
    try:
        dev.set_max_grants(64)
        refs, mem = ga.alloc(4, writable=True)
        for i in range(4):
            mem[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] = bytes([0x40 + i]) * PAGE_SIZE
        checks.note("gntalloc.refs", refs)
        m = dev.map_grants(0, refs, readonly=False)
        checks.eq("npages", m.npages, 4)
        buf = m.buffer
        checks.eq("mapping length", len(buf), 4 * PAGE_SIZE)
        for i in range(4):
            checks.eq(
                f"page {i} through the mapping", bytes(buf[i * PAGE_SIZE : i * PAGE_SIZE + 8]), bytes([0x40 + i]) * 8
            )
        buf[PAGE_SIZE + 100:PAGE_SIZE + 105] = b"hello"
        checks.eq("write through the mapping reaches the granted page", mem[PAGE_SIZE + 100:PAGE_SIZE + 105], b"hello")
        del buf
        m.close()
        m.close()  # idempotent

        # A single page, read-only, of a writable grant (a WRITE request's data).
        ro = dev.map_grants(0, refs[2:3], readonly=True)
        checks.eq("ro view", bytes(ro.buffer[:4]), bytes([0x42]) * 4)
        checks.true(ro.buffer.readonly, "read-only mapping offers a writable buffer")
        ro.close()

        # A read-only grant: mapping it read-only works, writable must fail.
        rrefs, rmem = ga.alloc(1, writable=False)
        rmem[:6] = b"rogrnt"
        r = dev.map_grants(0, rrefs, readonly=True)
        checks.eq("read-only grant, ro map", bytes(r.buffer[:6]), b"rogrnt")
        r.close()
        e = checks.raises("rw map of a read-only grant", GrantMapError, dev.map_grants, 0, rrefs, readonly=False)
        checks.note("gntdev.rw_map_of_ro_grant", f"{e.errno} {e}")

        # A ref nobody granted.
        e = checks.raises("map of a bad ref", GrantMapError, dev.map_grants, 0, [refs[-1] + 5000], readonly=True)
        checks.note("gntdev.bad_ref_map", f"{e.errno} {e}")
        # Mixed good and bad refs fail as a whole, and leave the good page mappable.
        checks.raises(
            "map of good+bad refs", GrantMapError, dev.map_grants, 0, [refs[0], refs[-1] + 5000], readonly=True
        )
        again = dev.map_grants(0, refs[:1], readonly=True)
        checks.eq("good ref still maps after a failed batch", bytes(again.buffer[:1]), b"\x40")
        again.close()
    finally:
        dev.close()
        ga.close()


@checks.case
def gntdev_grant_copy():
    ga, dev = Gntalloc(), GntdevDevice()
    try:
        refs, mem = ga.alloc(4, writable=True)
        mem[:] = b"\0" * (4 * PAGE_SIZE)
        src, src_addr = _local(4 * PAGE_SIZE)
        for i in range(4 * PAGE_SIZE // 256):
            src[i * 256:(i + 1) * 256] = bytes([i % 251]) * 256
        # local -> guest: a whole page, a sub-page range at an offset, a 512-byte sector.
        segs = [
            CopySegment(True, 0, refs[0], 0, src_addr, PAGE_SIZE),
            CopySegment(True, 0, refs[1], 512, src_addr + PAGE_SIZE, 3584),
            CopySegment(True, 0, refs[2], 3584, src_addr + 2 * PAGE_SIZE, 512),
        ]
        st = dev.grant_copy(segs)
        checks.eq("to-guest statuses", st, [GrantStatus.OKAY] * 3)
        checks.eq("page 0", mem[:PAGE_SIZE], src.raw[:PAGE_SIZE])
        checks.eq("page 1 head untouched", mem[PAGE_SIZE:PAGE_SIZE + 512], b"\0" * 512)
        checks.eq("page 1 range", mem[PAGE_SIZE + 512:2 * PAGE_SIZE], src.raw[PAGE_SIZE:PAGE_SIZE + 3584])
        checks.eq(
            "page 2 tail sector",
            mem[2 * PAGE_SIZE + 3584 : 3 * PAGE_SIZE],
            src.raw[2 * PAGE_SIZE : 2 * PAGE_SIZE + 512],
        )
        # guest -> local, back into a fresh buffer.
        mem[3 * PAGE_SIZE:] = bytes(range(256)) * 16
        dst, dst_addr = _local(2 * PAGE_SIZE, 0xEE)
        st = dev.grant_copy([CopySegment(False, 0, refs[3], 0, dst_addr, PAGE_SIZE),
                             CopySegment(False, 0, refs[1], 512, dst_addr + PAGE_SIZE, 3584)])
        checks.eq("from-guest statuses", st, [GrantStatus.OKAY] * 2)
        checks.eq("copied page 3", dst.raw[:PAGE_SIZE], bytes(range(256)) * 16)
        checks.eq("copied page 1 range", dst.raw[PAGE_SIZE:PAGE_SIZE + 3584], src.raw[PAGE_SIZE:PAGE_SIZE + 3584])
        checks.eq("bytes past the copy untouched", dst.raw[PAGE_SIZE + 3584:], b"\xee" * 512)

        # One bad ref in a batch: its segment fails, its neighbours still copy.
        mem[:] = b"\0" * (4 * PAGE_SIZE)
        bad = refs[-1] + 5000
        st = dev.grant_copy([CopySegment(True, 0, refs[0], 0, src_addr, 512),
                             CopySegment(True, 0, bad, 0, src_addr, 512),
                             CopySegment(True, 0, refs[1], 0, src_addr, 512),
                             CopySegment(False, 0, bad, 0, dst_addr, 512)])
        checks.note(
            "gntdev.copy_bad_ref_statuses",
            [GrantStatus(s).name if s in GrantStatus._value2member_map_ else s for s in st],
        )
        checks.eq("good segments around a bad one", (st[0], st[2]), (GrantStatus.OKAY, GrantStatus.OKAY))
        checks.eq("bad ref segments", (st[1], st[3]), (GrantStatus.BAD_GNTREF, GrantStatus.BAD_GNTREF))
        checks.eq(
            "data of the good segments", (mem[:512], mem[PAGE_SIZE : PAGE_SIZE + 512]), (src.raw[:512], src.raw[:512])
        )
        # Copying into a read-only grant must fail that segment.
        rrefs, rmem = ga.alloc(1, writable=False)
        st = dev.grant_copy([CopySegment(True, 0, rrefs[0], 0, src_addr, 512)])
        checks.note("gntdev.copy_to_ro_grant_status", st)
        checks.eq("copy into a read-only grant (Xen: write-pin of a r/o entry)", st, [GrantStatus.GENERAL_ERROR])
        checks.eq("read-only grant untouched", rmem[:512], b"\0" * 512)
        st = dev.grant_copy([CopySegment(False, 0, rrefs[0], 0, dst_addr, 512)])
        checks.eq("copy out of a read-only grant", st, [GrantStatus.OKAY])
        # A segment crossing its page is refused before the kernel sees it.
        st = dev.grant_copy([CopySegment(True, 0, refs[0], 4000, src_addr, 200),
                             CopySegment(True, 0, refs[0], 0, src_addr, 8)])
        checks.eq("page-crossing segment", st, [GrantStatus.BAD_COPY_ARG, GrantStatus.OKAY])
        # More than the kernel's 16-op hypercall batch, in one call.
        mem[:] = b"\0" * (4 * PAGE_SIZE)
        segs = [CopySegment(True, 0, refs[i % 4], (i // 4) * 512, src_addr + i * 512, 512) for i in range(32)]
        st = dev.grant_copy(segs)
        checks.eq("32-segment batch", st, [GrantStatus.OKAY] * 32)
        for i in range(32):
            off = (i % 4) * PAGE_SIZE + (i // 4) * 512
            checks.eq(f"batch segment {i}", mem[off:off + 512], src.raw[i * 512:(i + 1) * 512])
    finally:
        dev.close()
        ga.close()


@checks.case
def gntdev_copy_from_an_unknown_domain():
    ga, dev = Gntalloc(), GntdevDevice()
    try:
        refs, _ = ga.alloc(1, writable=True)
        dst, dst_addr = _local(PAGE_SIZE)
        # DOMID_FIRST_RESERVED is 0x7FF0: 0x7FEF is an ordinary domid nobody has.
        st = dev.grant_copy([CopySegment(False, 0x7FEF, refs[0], 0, dst_addr, 64),
                             CopySegment(False, 0, refs[0], 0, dst_addr, 64)])
        checks.eq("copy from a domain that does not exist, then a good one", st,
                  [GrantStatus.BAD_DOMAIN, GrantStatus.OKAY])
    finally:
        dev.close()
        ga.close()


@checks.case
async def gntdev_unmap_notify():
    # A ring's mapping tells the frontend when it goes, even when the backend dies:
    # a byte of the page cleared, and/or an event on our bound port.
    ga, dev, ev, raw = Gntalloc(), GntdevDevice(), EvtchnDevice(), RawPort()
    try:
        refs, mem = ga.alloc(1, writable=True)
        mem[7] = 0xFF
        m = dev.map_grants(0, refs, readonly=False)
        m.set_unmap_notify(clear_byte=7)
        m.close()
        checks.eq("byte cleared by the unmap", mem[7], 0)

        ch = ev.bind_interdomain(0, raw.port)
        await trio.to_thread.run_sync(raw.pending, 0.5)  # nothing should be there; drain it if it is
        m = dev.map_grants(0, refs, readonly=False)
        m.set_unmap_notify(event_port=ch.local_port)
        m.close()
        checks.eq("event sent to the peer by the unmap", await trio.to_thread.run_sync(raw.pending, 10), [raw.port])
    finally:
        dev.close()
        ev.close()
        raw.close()
        ga.close()


@checks.case
def gntdev_batch_costs():
    # Figures, not checks: what one 32-page grant copy and one map+unmap cost on this Xen.
    ga, dev = Gntalloc(), GntdevDevice()
    try:
        refs, _ = ga.alloc(32, writable=True)
        dst, dst_addr = _local(32 * PAGE_SIZE)
        segs = [CopySegment(False, 0, ref, 0, dst_addr + i * PAGE_SIZE, PAGE_SIZE) for i, ref in enumerate(refs)]
        reps = 200
        t = time.perf_counter()
        for _ in range(reps):
            checks.eq("32-page copy", dev.grant_copy(segs), [GrantStatus.OKAY] * 32)
        checks.note("gntdev.us_per_32_page_copy", round((time.perf_counter() - t) / reps * 1e6, 1))
        t = time.perf_counter()
        for _ in range(reps):
            dev.map_grants(0, refs[:1], readonly=False).close()
        checks.note("gntdev.us_per_map_unmap_of_1_page", round((time.perf_counter() - t) / reps * 1e6, 1))
    finally:
        dev.close()
        ga.close()


# ======================================================================= evtchn


@checks.case
async def evtchn_interdomain():
    raw = RawPort()
    ev = EvtchnDevice()
    try:
        ch = ev.bind_interdomain(0, raw.port)
        checks.note("evtchn.ports", {"raw_unbound": raw.port, "ours": ch.local_port})
        checks.true(ch.local_port != raw.port, "both ends got the same port")
        # Xen may mark a freshly bound port pending: drain it, and say so.
        initial = False
        with trio.move_on_after(1):
            await ch.wait()
            initial = True
        checks.note("evtchn.event_pending_right_after_bind", initial)
        checks.true(initial, "no event pending right after bind (Xen marks a freshly bound port pending; "
                    "the backend and the simulation count on it)")

        # raw -> ours
        with trio.fail_after(10):
            raw.notify()
            await ch.wait()
        # ours -> raw
        ch.notify()
        got = await trio.to_thread.run_sync(raw.pending, 10)
        checks.eq("raw end got our notify", got, [raw.port])

        # Coalescing: five kicks while we are not waiting are one wake-up, or
        # two: the kernel queues the port once and masks it; kicks while masked
        # leave it pending in Xen, which delivers once more when wait() unmasks.
        for _ in range(5):
            raw.notify()
        await trio.sleep(0.5)
        wakeups = 0
        with trio.move_on_after(1.5):
            while True:
                await ch.wait()
                wakeups += 1
        checks.note("evtchn.wakeups_for_5_notifies_while_not_waiting", wakeups)
        checks.true(1 <= wakeups <= 2, f"five notifications while not waiting gave {wakeups} wake-ups")

        # Several rounds both ways, as a ring would.
        for i in range(20):
            with trio.fail_after(10):
                raw.notify()
                await ch.wait()
            ch.notify()
            checks.eq(f"round {i} reply", await trio.to_thread.run_sync(raw.pending, 10), [raw.port])

        # close() wakes a task blocked in wait().
        woke = []

        async def waiter():
            try:
                await ch.wait()
                woke.append("event")
            except trio.ClosedResourceError:
                woke.append("closed")

        async with trio.open_nursery() as n:
            n.start_soon(waiter)
            await trio.sleep(0.5)
            ch.close()
        checks.eq("waiter after close", woke, ["closed"])
        ch.close()  # idempotent
    finally:
        ev.close()
        raw.close()


@checks.case
async def evtchn_adapter_pair():
    # Both ends through the adapter: the frontend-style bind_unbound_port and
    # the backend-style bind_interdomain.
    ev = EvtchnDevice()
    try:
        a = ev.bind_unbound_port(0)
        b = ev.bind_interdomain(0, a.local_port)
        with trio.move_on_after(1):
            await b.wait()  # possible initial pending event
        for _ in range(5):
            with trio.fail_after(10):
                a.notify()
                await b.wait()
                b.notify()
                await a.wait()
        b.close()
        a.notify()  # to a peer that unbound: Xen drops it, no error
    finally:
        ev.close()


checks.run()
