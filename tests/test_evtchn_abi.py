"""The evtchn adapter against the kernel's own header, compiled by gcc, and its
read/unmask protocol against a kernel socket standing in for the device.

There is no /dev/xen here. The device's user protocol is plain fd I/O
(read u32 ports, write a port back to unmask), so a socketpair lets us watch
exactly what the adapter reads and writes; the ioctls are checked by number
and layout against <xen/evtchn.h>.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import socket
import struct
import subprocess

import pytest
import trio
import trio.testing

from xenblk_vhost.xen import evtchn as e

C_PROBE = r"""
#include <stdio.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <xen/xen.h>
#include <xen/event_channel.h>
#include <xen/evtchn.h>
#define P(name, value) printf("%s %lld\n", name, (long long)(value))
#define FIELD(type, member) \
    P(#type "." #member ".offset", offsetof(struct type, member)); \
    P(#type "." #member ".size", sizeof(((struct type *)0)->member))
int main(void) {
    P("IOCTL_EVTCHN_BIND_INTERDOMAIN", IOCTL_EVTCHN_BIND_INTERDOMAIN);
    P("IOCTL_EVTCHN_BIND_UNBOUND_PORT", IOCTL_EVTCHN_BIND_UNBOUND_PORT);
    P("IOCTL_EVTCHN_UNBIND", IOCTL_EVTCHN_UNBIND);
    P("IOCTL_EVTCHN_NOTIFY", IOCTL_EVTCHN_NOTIFY);
    P("IOCTL_EVTCHN_RESET", IOCTL_EVTCHN_RESET);
    P("ioctl_evtchn_bind_interdomain.sizeof", sizeof(struct ioctl_evtchn_bind_interdomain));
    FIELD(ioctl_evtchn_bind_interdomain, remote_domain);
    FIELD(ioctl_evtchn_bind_interdomain, remote_port);
    P("ioctl_evtchn_bind_unbound_port.sizeof", sizeof(struct ioctl_evtchn_bind_unbound_port));
    FIELD(ioctl_evtchn_bind_unbound_port, remote_domain);
    P("ioctl_evtchn_unbind.sizeof", sizeof(struct ioctl_evtchn_unbind));
    FIELD(ioctl_evtchn_unbind, port);
    P("ioctl_evtchn_notify.sizeof", sizeof(struct ioctl_evtchn_notify));
    FIELD(ioctl_evtchn_notify, port);
    P("evtchn_port_t.sizeof", sizeof(evtchn_port_t));
    return 0;
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict[str, int]:
    d = tmp_path_factory.mktemp("evtchn")
    (d / "p.c").write_text(C_PROBE)
    cc = subprocess.run(["gcc", "-Wall", "-Werror", "-o", str(d / "p"), str(d / "p.c")], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    out = subprocess.run([str(d / "p")], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def test_ioctl_numbers_match_the_kernel_header(probe):
    assert e.IOCTL_EVTCHN_BIND_INTERDOMAIN == probe["IOCTL_EVTCHN_BIND_INTERDOMAIN"]
    assert e.IOCTL_EVTCHN_BIND_UNBOUND_PORT == probe["IOCTL_EVTCHN_BIND_UNBOUND_PORT"]
    assert e.IOCTL_EVTCHN_UNBIND == probe["IOCTL_EVTCHN_UNBIND"]
    assert e.IOCTL_EVTCHN_NOTIFY == probe["IOCTL_EVTCHN_NOTIFY"]
    assert e.IOCTL_EVTCHN_RESET == probe["IOCTL_EVTCHN_RESET"]


@pytest.mark.parametrize(
    "cls, name, members",
    [
        (e.EvtchnBindInterdomain, "ioctl_evtchn_bind_interdomain", ["remote_domain", "remote_port"]),
        (e.EvtchnBindUnboundPort, "ioctl_evtchn_bind_unbound_port", ["remote_domain"]),
        (e.EvtchnUnbind, "ioctl_evtchn_unbind", ["port"]),
        (e.EvtchnNotify, "ioctl_evtchn_notify", ["port"]),
    ],
)
def test_struct_layouts_match_the_kernel_header(probe, cls, name, members):
    assert ctypes.sizeof(cls) == probe[f"{name}.sizeof"]
    for m in members:
        desc = getattr(cls, m)
        assert (desc.offset, desc.size) == (probe[f"{name}.{m}.offset"], probe[f"{name}.{m}.size"])


def test_port_encoding_is_an_evtchn_port_t(probe):
    assert e.PORT.size == probe["evtchn_port_t.sizeof"]
    assert e.decode_pending(struct.pack("=3I", 5, 6, 0xFFFFFFFF) + b"\x01") == [5, 6, 0xFFFFFFFF]


def _device_pair(port: int) -> tuple[e.EvtchnPort, socket.socket]:
    """An EvtchnPort on one end of a socketpair; the other end plays the kernel."""
    ours, kernel = socket.socketpair()
    fd = os.dup(ours.fileno())
    ours.close()
    os.set_blocking(fd, False)
    return e.EvtchnPort(fd, port), kernel


async def test_wait_consumes_coalesced_deliveries_and_unmasks_once():
    chan, kernel = _device_pair(17)
    try:
        kernel.sendall(struct.pack("=2I", 17, 17))  # two deliveries queued before we look
        await chan.wait()
        assert kernel.recv(64) == struct.pack("=I", 17)  # exactly one unmask, of our port
        kernel.setblocking(False)
        with pytest.raises(BlockingIOError):
            kernel.recv(64)
        # nothing queued now, so nothing would wake a waiter...
        assert select.select([chan.fileno()], [], [], 0)[0] == []
        # ...until the next delivery
        async with trio.open_nursery() as nursery:
            woke = trio.Event()

            async def waiter():
                await chan.wait()
                woke.set()

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            kernel.send(struct.pack("=I", 17))
            await woke.wait()
    finally:
        chan.close()
        kernel.close()


def test_a_short_read_ends_the_drain(monkeypatch):
    """The device's read hands over every queued port up to the count, so a read that returns less has
    emptied the queue: no second read just to get EAGAIN (a syscall per wake-up, and under a PV dom0 each
    goes through Xen). A full read (256 ports) reads again."""
    chan, kernel = _device_pair(9)
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(e.os, "read", counting_read)
    try:
        kernel.sendall(struct.pack("=3I", 9, 9, 9))
        assert chan._drain() and len(reads) == 1
        assert kernel.recv(64) == struct.pack("=I", 9)
        reads.clear()
        kernel.sendall(struct.pack("=I", 9) * 300)  # more than one read's 256
        assert chan._drain() and len(reads) == 2
        assert select.select([chan.fileno()], [], [], 0)[0] == []  # all consumed
    finally:
        chan.close()
        kernel.close()


async def test_close_wakes_a_blocked_waiter_with_closed_resource_error():
    chan, kernel = _device_pair(3)
    try:
        async with trio.open_nursery() as nursery:
            outcome = []

            async def waiter():
                try:
                    await chan.wait()
                except trio.ClosedResourceError:
                    outcome.append("closed")

            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            chan.close()  # UNBIND fails on a socket (ENOTTY) and is tolerated; the fd is closed
        assert outcome == ["closed"]
        chan.close()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            chan.notify()
    finally:
        kernel.close()


def test_notify_issues_the_ioctl_and_reports_kernel_errors():
    chan, kernel = _device_pair(9)
    try:
        with pytest.raises(OSError) as err:
            chan.notify()  # a socket has no IOCTL_EVTCHN_NOTIFY
        assert err.value.errno == errno.ENOTTY
    finally:
        chan.close()
        kernel.close()


def test_binding_without_the_device_fails_cleanly(tmp_path):
    from xenblk_vhost.xen import open_real

    with pytest.raises(FileNotFoundError):
        open_real(gntdev_path=str(tmp_path / "gntdev"))
    with pytest.raises(FileNotFoundError):
        open_real(gntdev_path="/dev/null", evtchn_path=str(tmp_path / "evtchn"))
    with pytest.raises(FileNotFoundError):
        e.EvtchnDevice(str(tmp_path / "evtchn"))
    null = e.EvtchnDevice("/dev/null")
    with pytest.raises(OSError) as err:
        null.bind_interdomain(1, 5)
    assert err.value.errno == errno.ENOTTY
    null.close()
    with pytest.raises(ValueError):
        null.bind_interdomain(1, 5)
