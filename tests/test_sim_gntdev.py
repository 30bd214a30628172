"""The simulated gntdev against a guest in another process.

The hypervisor runs as its own process, the guest as another (the scriptable
guest agent), and this test process is the backend: it sees the guest only
through the Gntdev interface, exactly as the backend will. Expected statuses
are Xen's (xen/common/grant_table.c), not ours.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import trio

from xenblk_vhost.sim import open_sim
from xenblk_vhost.sim.grant_table import GTF_permit_access, GTF_reading, GTF_readonly, GTF_writing
from xenblk_vhost.sim.guest import guest_agent, pattern
from xenblk_vhost.sim.hypercall import Hypercalls
from xenblk_vhost.xen.interfaces import PAGE_SIZE, CopySegment, Gntdev, GrantMapError, GrantMapping, GrantStatus


async def test_maps_show_the_guests_pages_and_pin_them(hv_socket, platform):
    gntdev = platform.gntdev
    assert isinstance(gntdev, Gntdev)
    async with guest_agent(hv_socket) as g:
        f = (await g.call("alloc", n=3))["frames"]
        for frame, seed in zip(f, (11, 12, 13)):
            await g.call("fill", frame=frame, seed=seed)
        ro = (await g.call("grant", frame=f[0], domid=0, readonly=True))["gref"]
        rw1 = (await g.call("grant", frame=f[1], domid=0, readonly=False))["gref"]
        rw2 = (await g.call("grant", frame=f[2], domid=0, readonly=False))["gref"]

        m_ro = gntdev.map_grants(g.domid, [ro], readonly=True)
        m_rw = gntdev.map_grants(g.domid, [rw1, rw2], readonly=False)
        assert isinstance(m_ro, GrantMapping) and m_ro.npages == 1 and m_rw.npages == 2
        assert m_ro.buffer.readonly and not m_rw.buffer.readonly
        assert bytes(m_ro.buffer) == pattern(11)
        assert bytes(m_rw.buffer[:PAGE_SIZE]) == pattern(12)
        assert bytes(m_rw.buffer[PAGE_SIZE:]) == pattern(13)  # contiguous across two guest frames

        # what Xen shows the guest while mapped, and what it refuses the guest
        assert (await g.call("entry", gref=ro))["flags"] == GTF_permit_access | GTF_readonly | GTF_reading
        assert (await g.call("entry", gref=rw1))["flags"] == GTF_permit_access | GTF_reading | GTF_writing
        assert (await g.call("end_access", gref=ro)) == {"ok": False}
        assert (await g.call("end_access", gref=rw2)) == {"ok": False}

        # writes through a RW map land in the guest's page, seen by the guest process
        m_rw.buffer[PAGE_SIZE + 100 : PAGE_SIZE + 107] = b"backend"
        ctypes.memmove(m_rw.addr + 5, b"addr!", 5)
        assert bytes.fromhex((await g.call("read", frame=f[2], offset=100, length=7))["hex"]) == b"backend"
        assert bytes.fromhex((await g.call("read", frame=f[1], offset=5, length=5))["hex"]) == b"addr!"
        # and the guest's later writes show through our map (shared, not a copy)
        await g.call("write", frame=f[0], offset=0, hex=b"guest".hex())
        assert bytes(m_ro.buffer[:5]) == b"guest"

        view = m_ro.buffer[:10]
        with pytest.raises(BufferError):
            m_ro.close()  # a live view must not dangle
        assert (await g.call("entry", gref=ro))["flags"] & GTF_reading  # nothing was released
        view.release()
        m_ro.close()
        m_ro.close()  # idempotent
        m_rw.close()
        assert (await g.call("entry", gref=ro))["flags"] == GTF_permit_access | GTF_readonly
        assert (await g.call("entry", gref=rw1))["flags"] == GTF_permit_access
        for ref in (ro, rw1, rw2):
            assert (await g.call("end_access", gref=ref)) == {"ok": True}
        with pytest.raises(GrantMapError):
            gntdev.map_grants(g.domid, [ro], readonly=True)  # revoked


async def test_refused_maps_fail_whole_and_leak_no_pin(hv_socket, platform):
    gntdev = platform.gntdev
    async with guest_agent(hv_socket) as g:
        f = (await g.call("alloc", n=2))["frames"]
        rw = (await g.call("grant", frame=f[0], domid=0, readonly=False))["gref"]
        ro = (await g.call("grant", frame=f[1], domid=0, readonly=True))["gref"]
        other = (await g.call("grant", frame=f[1], domid=5, readonly=False))["gref"]
        cases = [
            ([ro], False, "general_error"),  # read-only grant mapped writable
            ([rw, ro], False, "general_error"),  # ...after a good one, which must be rolled back
            ([other], True, "general_error"),  # granted to domain 5, not us
            ([300], True, "general_error"),  # never granted
            ([4 * 512 + 3], True, "bad_gntref"),  # beyond the 4-frame table
        ]
        for refs, readonly, why in cases:
            with pytest.raises(GrantMapError) as e:
                gntdev.map_grants(g.domid, refs, readonly=readonly)
            assert e.value.errno == errno.EINVAL and why in str(e.value), (refs, str(e.value))
        assert (await g.call("entry", gref=rw))["flags"] == GTF_permit_access
        assert (await g.call("entry", gref=ro))["flags"] == GTF_permit_access | GTF_readonly
        await g.call("raw_entry", gref=40, flags=GTF_permit_access, domid=0, frame=10_000)  # beyond guest memory
        with pytest.raises(GrantMapError, match="bad_page"):
            gntdev.map_grants(g.domid, [40], readonly=True)
        assert (await g.call("entry", gref=40))["flags"] == GTF_permit_access
        with pytest.raises(GrantMapError, match="bad_domain"):
            gntdev.map_grants(4000, [rw], readonly=True)
        # the read-only grant does map read-only
        m = gntdev.map_grants(g.domid, [ro], readonly=True)
        m.close()


WRITER = textwrap.dedent(
    """
    import ctypes, sys
    from xenblk_vhost.sim import open_sim
    p = open_sim(sys.argv[1])
    m = p.gntdev.map_grants(int(sys.argv[2]), [int(sys.argv[3])], readonly=True)
    print(bytes(m.buffer[:4]).hex(), flush=True)
    ctypes.memset(m.addr, 0x55, 16)   # must fault: the map is PROT_READ
    print("wrote", flush=True)
    """
)


async def test_writing_through_a_readonly_map_faults_and_leaves_the_guest_page_alone(hv_socket):
    async with guest_agent(hv_socket) as g:
        [frame] = (await g.call("alloc", n=1))["frames"]
        await g.call("fill", frame=frame, seed=5)
        ro = (await g.call("grant", frame=frame, domid=0, readonly=True))["gref"]
        proc = await trio.run_process(
            [sys.executable, "-c", WRITER, hv_socket, str(g.domid), str(ro)],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
        assert proc.returncode == -signal.SIGSEGV, proc.stderr.decode()
        assert proc.stdout.decode().split() == [pattern(5)[:4].hex()]
        assert (await g.call("check", frame=frame, seed=5)) == {"equal": True}
        # the dead backend's pin is the documented gap; the page itself is intact


async def test_grant_copy_moves_data_both_ways_with_xens_per_segment_status(hv_socket, platform):
    gntdev = platform.gntdev
    local = ctypes.create_string_buffer(8 * PAGE_SIZE)
    base = ctypes.addressof(local)
    async with guest_agent(hv_socket) as g:
        f = (await g.call("alloc", n=3))["frames"]
        await g.call("fill", frame=f[0], seed=21)
        await g.call("fill", frame=f[1], seed=22)
        await g.call("fill", frame=f[2], seed=23)
        ro = (await g.call("grant", frame=f[0], domid=0, readonly=True))["gref"]
        rw = (await g.call("grant", frame=f[1], domid=0, readonly=False))["gref"]
        ro2 = (await g.call("grant", frame=f[2], domid=0, readonly=True))["gref"]
        other = (await g.call("grant", frame=f[2], domid=5, readonly=False))["gref"]
        await g.call("raw_entry", gref=41, flags=GTF_permit_access, domid=0, frame=999_999)
        local[PAGE_SIZE : PAGE_SIZE + 1024] = pattern(99, 1024)
        local[2 * PAGE_SIZE : 3 * PAGE_SIZE] = b"\xee" * PAGE_SIZE
        d = g.domid
        segs = [
            CopySegment(False, d, ro, 0, base, PAGE_SIZE),  # guest RO page -> local
            CopySegment(True, d, rw, 512, base + PAGE_SIZE, 1024),  # local -> guest RW page
            CopySegment(True, d, ro2, 0, base + 2 * PAGE_SIZE, 64),  # into a read-only grant
            CopySegment(False, d, other, 0, base + 3 * PAGE_SIZE, 64),  # granted to domain 5
            CopySegment(False, d, 300, 0, base + 3 * PAGE_SIZE, 64),  # never granted
            CopySegment(False, d, 4 * 512, 0, base + 3 * PAGE_SIZE, 64),  # beyond the table
            CopySegment(False, 4000, ro, 0, base + 3 * PAGE_SIZE, 64),  # no such domain
            CopySegment(False, d, ro, 4000, base + 3 * PAGE_SIZE, 200),  # crosses the guest page
            CopySegment(False, d, 41, 0, base + 3 * PAGE_SIZE, 64),  # frame outside guest memory
            CopySegment(True, d, ro2, 0, base, 0),  # zero length: nothing to check
            CopySegment(False, d, rw, 100, base + 4 * PAGE_SIZE + 7, 300),  # unaligned local side
        ]
        statuses = gntdev.grant_copy(segs)
        S = GrantStatus
        assert statuses == [
            S.OKAY, S.OKAY, S.GENERAL_ERROR, S.GENERAL_ERROR, S.GENERAL_ERROR, S.BAD_GNTREF,
            S.BAD_DOMAIN, S.BAD_COPY_ARG, S.BAD_PAGE, S.OKAY, S.OKAY,
        ]
        assert local.raw[:PAGE_SIZE] == pattern(21)
        guest_rw = bytes.fromhex((await g.call("read", frame=f[1], offset=0, length=PAGE_SIZE))["hex"])
        assert guest_rw[512:1536] == pattern(99, 1024)
        assert guest_rw[:512] == pattern(22)[:512] and guest_rw[1536:] == pattern(22)[1536:]
        assert local.raw[4 * PAGE_SIZE + 7 : 4 * PAGE_SIZE + 307] == guest_rw[100:400]
        assert (await g.call("check", frame=f[2], seed=23)) == {"equal": True}  # the refused write did nothing
        assert local.raw[3 * PAGE_SIZE : 4 * PAGE_SIZE] == b"\0" * PAGE_SIZE  # refused reads did nothing
        # copies do not pin: the guest can revoke right after
        assert (await g.call("end_access", gref=ro)) == {"ok": True}
        assert gntdev.grant_copy([segs[0]]) == [S.GENERAL_ERROR]
        assert gntdev.grant_copy([]) == []


async def test_destroyed_domain_fails_new_grants_but_mapped_memory_stays(hv_socket, platform):
    gntdev = platform.gntdev
    local = ctypes.create_string_buffer(PAGE_SIZE)
    async with guest_agent(hv_socket) as g:
        [frame] = (await g.call("alloc", n=1))["frames"]
        await g.call("fill", frame=frame, seed=31)
        ref = (await g.call("grant", frame=frame, domid=0, readonly=True))["gref"]
        seg = CopySegment(False, g.domid, ref, 0, ctypes.addressof(local), PAGE_SIZE)
        assert gntdev.grant_copy([seg]) == [GrantStatus.OKAY]
        m = gntdev.map_grants(g.domid, [ref], readonly=True)
        await g.call("destroy")
        assert gntdev.grant_copy([seg]) == [GrantStatus.BAD_DOMAIN]
        with pytest.raises(GrantMapError, match="bad_domain"):
            gntdev.map_grants(g.domid, [ref], readonly=True)
        assert bytes(m.buffer) == pattern(31)  # a dying domain's mapped pages stay
        m.close()


async def test_unmap_notify_clears_the_byte_and_sends_the_event_on_close(hv_socket, platform):
    async with guest_agent(hv_socket) as g:
        [frame] = (await g.call("alloc", n=1))["frames"]
        await g.call("write", frame=frame, offset=10, hex="ff")
        ref = (await g.call("grant", frame=frame, domid=0, readonly=False))["gref"]
        port = (await g.call("evtchn_alloc", remote=0))["port"]
        ch = platform.evtchn.bind_interdomain(g.domid, port)
        m = platform.gntdev.map_grants(g.domid, [ref], readonly=False)
        m.set_unmap_notify(clear_byte=10, event_port=ch.local_port)
        assert (await g.call("pending", port=port)) == {"pending": False}
        assert m.buffer[10] == 0xFF
        m.close()
        assert (await g.call("read", frame=frame, offset=10, length=1))["hex"] == "00"
        assert (await g.call("pending", port=port)) == {"pending": True}
        ro = platform.gntdev.map_grants(g.domid, [ref], readonly=True)
        with pytest.raises(OSError) as e:
            ro.set_unmap_notify(clear_byte=0)  # the kernel refuses CLEAR_BYTE on a read-only map
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            ro.set_unmap_notify(event_port=9999)  # not a port of ours
        assert e.value.errno == errno.EINVAL
        ro.close()
        ch.close()


CRASHER = textwrap.dedent(
    """
    import sys, time
    from xenblk_vhost.sim import open_sim
    p = open_sim(sys.argv[1])
    ch = p.evtchn.bind_interdomain(int(sys.argv[2]), int(sys.argv[4]))
    m = p.gntdev.map_grants(int(sys.argv[2]), [int(sys.argv[3])], readonly=False)
    m.set_unmap_notify(clear_byte=4096 - 1, event_port=ch.local_port)
    print("armed", flush=True)
    time.sleep(60)
    """
)


async def test_unmap_notify_still_happens_when_the_backend_is_killed(hv_socket):
    async with guest_agent(hv_socket) as g:
        [frame] = (await g.call("alloc", n=1))["frames"]
        await g.call("write", frame=frame, offset=PAGE_SIZE - 1, hex="01")
        ref = (await g.call("grant", frame=frame, domid=0, readonly=False))["gref"]
        port = (await g.call("evtchn_alloc", remote=0))["port"]
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", CRASHER, hv_socket, str(g.domid), str(ref), str(port)], stdout=subprocess.PIPE
        )
        try:
            line = b""
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(64)
                assert chunk, "backend died before arming"
                line += chunk
            assert line == b"armed\n"
            assert (await g.call("read", frame=frame, offset=PAGE_SIZE - 1, length=1))["hex"] == "01"
            assert (await g.call("pending", port=port)) == {"pending": False}
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proc.stdout.aclose()
        # the hypervisor notices the dead connection and acts for the kernel;
        # one more round trip on our side orders us after its cleanup
        for _ in range(200):
            if (await g.call("port_status", port=port))["state"] == "unbound":
                break
            await trio.sleep(0.01)
        assert (await g.call("port_status", port=port))["state"] == "unbound"
        assert (await g.call("read", frame=frame, offset=PAGE_SIZE - 1, length=1))["hex"] == "00"
        assert (await g.call("pending", port=port)) == {"pending": True}


def test_gntdev_close_unmaps_everything(hv_socket):
    from xenblk_vhost.sim.guest import Guest

    # The guest in this process is fine here: only the backend's close is under test.
    guest = Guest.create(hv_socket, pages=4)
    try:
        [frame] = guest.alloc_pages(1)
        ref = guest.grant_access(frame, 0, False)
        p = open_sim(hv_socket)
        p.gntdev.map_grants(guest.domid, [ref], readonly=False)
        p.gntdev.map_grants(guest.domid, [ref], readonly=True)
        assert guest.grant_entry(ref).flags == GTF_permit_access | GTF_reading | GTF_writing
        p.close()
        assert guest.grant_entry(ref).flags == GTF_permit_access
        assert guest.end_access(ref)
    finally:
        guest.destroy()
    assert os.path.exists(hv_socket)


# A backend killed *inside* a pin or unpin (the sim does Xen's work in the backend's process, so a
# SIGKILL can land there, as it cannot inside Xen). The crasher makes the kill land exactly there.
MID_PIN_CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from xenblk_vhost.sim import open_sim, grant_table, pin_ledger
    hv, domid, ref, port, where = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    p = open_sim(hv)
    p.evtchn.bind_interdomain(domid, port)  # unbound by the hypervisor after it released our pins
    def die(*_a, **_k):
        os.kill(os.getpid(), signal.SIGKILL)
    def then_die(method):
        def wrapped(*a):
            method(*a)
            die()
        return wrapped
    if where == "pin":  # the pin count raised, the in-use flags not yet set
        grant_table.ActiveTable.add = then_die(grant_table.ActiveTable.add)
    elif where == "confirm":  # pinned, our ledger entry still pending
        pin_ledger.PinLedger.confirm = die
    else:  # "unpin": the pin count dropped, the flags not yet cleared
        m = p.gntdev.map_grants(domid, [ref], readonly=False)
        grant_table.ActiveTable.sub = then_die(grant_table.ActiveTable.sub)
        m.close()
    p.gntdev.map_grants(domid, [ref], readonly=False)
    """
)


@pytest.mark.parametrize("where", ["pin", "confirm", "unpin"])
@pytest.mark.parametrize("others", [0, 1])
async def test_a_backend_killed_inside_a_pin_leaves_xens_state_as_if_before_or_after(hv_socket, platform, where,
                                                                                      others):
    """The pin counts and GTF flags end as the live backends' mappings say: no pin leaked (the guest
    can revoke once nobody maps), none lost (not while another backend maps), and the next map of a
    re-granted ref sees the new frame, not the one pinned before the kill."""
    async with guest_agent(hv_socket) as g:
        f = (await g.call("alloc", n=2))["frames"]
        for frame, seed in zip(f, (21, 22)):
            await g.call("fill", frame=frame, seed=seed)
        ref = (await g.call("grant", frame=f[0], domid=0, readonly=False))["gref"]
        port = (await g.call("evtchn_alloc", remote=0))["port"]
        live = platform.gntdev.map_grants(g.domid, [ref], readonly=False) if others else None
        xen = Hypercalls(hv_socket)
        repaired = xen.call("counters")[0]["pins_repaired"]
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", MID_PIN_CRASHER, hv_socket, str(g.domid), str(ref), str(port), where])
        with trio.fail_after(30):
            await proc.wait()
        assert proc.returncode == -signal.SIGKILL
        for _ in range(500):
            if (await g.call("port_status", port=port))["state"] == "unbound":
                break
            await trio.sleep(0.01)
        assert (await g.call("port_status", port=port))["state"] == "unbound"
        assert xen.call("counters")[0]["pins_repaired"] == repaired + 1  # (this ref, put right)
        xen.close()
        if live is not None:
            # still mapped by us: the guest cannot take the page back, and our map still works
            assert (await g.call("entry", gref=ref))["flags"] == GTF_permit_access | GTF_reading | GTF_writing
            assert (await g.call("end_access", gref=ref)) == {"ok": False}
            assert bytes(live.buffer) == pattern(21)
            live.close()
        assert (await g.call("entry", gref=ref))["flags"] == GTF_permit_access
        assert (await g.call("end_access", gref=ref)) == {"ok": True}
        # the guest grants the same ref (its free list is LIFO) for another page: a map shows that page
        assert (await g.call("grant", frame=f[1], domid=0, readonly=False))["gref"] == ref
        m = platform.gntdev.map_grants(g.domid, [ref], readonly=False)
        assert bytes(m.buffer) == pattern(22)
        m.close()
        assert (await g.call("end_access", gref=ref)) == {"ok": True}
