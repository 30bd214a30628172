"""Simulated event channels between this process (the backend) and a guest process.

Xen's rules being checked (xen/common/event_channel.c): bind_interdomain
needs an unbound port reserved for us (EINVAL) of an existing domain
(ESRCH) and leaves the new port pending; notifies coalesce while pending;
closing one end makes the other unbound and its notifies are dropped.
"Is an event pending?" is asked with a zero-timeout select on the waiting
fd, so no test depends on timing.
"""

from __future__ import annotations

import errno
import select

import pytest
import trio
import trio.testing

from xenblk_vhost.sim.guest import guest_agent
from xenblk_vhost.sim.hypercall import Hypercalls
from xenblk_vhost.xen.interfaces import EventChannel, Evtchn


@pytest.fixture
def evtchn(platform):
    return platform.evtchn


def pending(chan) -> bool:
    return bool(select.select([chan.fileno()], [], [], 0)[0])


async def bound_pair(g, evtchn):
    port = (await g.call("evtchn_alloc", remote=0))["port"]
    ch = evtchn.bind_interdomain(g.domid, port)
    return port, ch


async def test_ping_pong_many_round_trips(hv_socket, evtchn):
    assert isinstance(evtchn, Evtchn)
    async with guest_agent(hv_socket) as g:
        port, ch = await bound_pair(g, evtchn)
        assert isinstance(ch, EventChannel) and ch.local_port > 0
        assert pending(ch)  # Xen marks a freshly bound port pending
        await ch.wait()
        assert not pending(ch)
        await g.call("echo", port=port)
        rounds = 500
        for _ in range(rounds):
            ch.notify()
            await ch.wait()
        # each notify waited for its answer, so nothing could coalesce
        assert (await g.call("echo_count", port=port)) == {"count": rounds}
        ch.close()


async def test_notifies_coalesce_into_one_wakeup_both_ways(hv_socket, evtchn):
    async with guest_agent(hv_socket) as g:
        port, ch = await bound_pair(g, evtchn)
        await ch.wait()  # the bind's own pending
        for _ in range(5):
            ch.notify()
        assert (await g.call("pending", port=port)) == {"pending": True}
        await g.call("wait", port=port)  # one wake-up takes all five
        assert (await g.call("pending", port=port)) == {"pending": False}
        await g.call("notify", port=port, count=7)
        await ch.wait()
        assert not pending(ch)
        ch.close()


async def test_bind_follows_xens_rules(hv_socket, evtchn):
    async with guest_agent(hv_socket) as g:
        port, ch = await bound_pair(g, evtchn)
        with pytest.raises(OSError) as e:
            evtchn.bind_interdomain(g.domid, port)  # already bound
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            evtchn.bind_interdomain(g.domid, 4000)  # no such port
        assert e.value.errno == errno.EINVAL
        other = (await g.call("evtchn_alloc", remote=7))["port"]
        with pytest.raises(OSError) as e:
            evtchn.bind_interdomain(g.domid, other)  # reserved for domain 7, not us
        assert e.value.errno == errno.EINVAL
        with pytest.raises(OSError) as e:
            evtchn.bind_interdomain(4000, 1)  # no such domain
        assert e.value.errno == errno.ESRCH
        assert (await g.call("port_status", port=port)) == {
            "state": "interdomain",
            "remote_domid": 0,
            "remote_port": ch.local_port,
        }
        ch.close()


async def test_after_close_the_other_sides_notifies_are_dropped(hv_socket, evtchn):
    async with guest_agent(hv_socket) as g:
        port, ch = await bound_pair(g, evtchn)
        await ch.wait()
        # backend unbinds: the guest's port becomes unbound again, for us
        ch.close()
        assert (await g.call("port_status", port=port)) == {"state": "unbound", "remote_domid": 0, "remote_port": 0}
        await g.call("notify", port=port, count=3)  # dropped, not an error
        with pytest.raises(trio.ClosedResourceError):
            ch.notify()
        # a backend that comes back binds the same guest port again
        ch2 = evtchn.bind_interdomain(g.domid, port)
        assert ch2.local_port != ch.local_port
        await ch2.wait()  # pending from the bind (the dropped kicks add nothing more)
        assert not pending(ch2)
        await g.call("notify", port=port)
        await ch2.wait()
        ch2.notify()
        await g.call("wait", port=port)
        # guest closes its end: our notifies go nowhere, and its next port is clean
        await g.call("close_port", port=port)
        hc = Hypercalls(hv_socket)
        try:
            assert hc.call("evtchn_status", domid=0, port=ch2.local_port)[0]["state"] == "unbound"
        finally:
            hc.close()
        ch2.notify()
        port2, ch3 = await bound_pair(g, evtchn)
        assert (await g.call("pending", port=port2)) == {"pending": False}
        ch2.close()
        ch3.close()


async def test_close_wakes_a_blocked_waiter(hv_socket, evtchn):
    async with guest_agent(hv_socket) as g:
        _, ch = await bound_pair(g, evtchn)
        await ch.wait()
        outcome = []
        async with trio.open_nursery() as nursery:

            async def waiter():
                try:
                    await ch.wait()
                except trio.ClosedResourceError:
                    outcome.append("closed")

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            ch.close()
        assert outcome == ["closed"]
        ch.close()  # idempotent


async def test_destroying_the_guest_unbinds_our_port(hv_socket, evtchn):
    hc = Hypercalls(hv_socket)
    try:
        async with guest_agent(hv_socket) as g:
            _, ch = await bound_pair(g, evtchn)
            await g.call("destroy")
            assert hc.call("evtchn_status", domid=0, port=ch.local_port)[0]["state"] == "unbound"
            ch.notify()  # dropped, as Xen drops a notify on an unbound port
            with pytest.raises(OSError) as e:
                evtchn.bind_interdomain(g.domid, 1)
            assert e.value.errno == errno.ESRCH
            ch.close()
    finally:
        hc.close()
