"""The simulated hypervisor process: lifecycle, request handling, cleanup of dead clients."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys

import pytest
import trio

from xenblk_vhost.sim import open_sim
from xenblk_vhost.sim.hypercall import DOMAIN_ABSENT, DOMAIN_ALIVE, DOMAIN_DEAD, Hypercalls
from xenblk_vhost.sim.hypervisor import hypervisor_process, serve


def test_runs_in_the_foreground_until_sigterm_and_removes_its_socket(tmp_path):
    path = str(tmp_path / "xen.sock")
    proc = subprocess.Popen(
        [sys.executable, "-m", "xenblk_vhost.sim.hypervisor", "--socket", path], stdout=subprocess.PIPE
    )
    try:
        assert proc.stdout.readline() == b"ready\n"
        hc = Hypercalls(path)
        assert hc.server_pid == proc.pid
        assert hc.call("list_domains")[0] == {"domains": [0]}
        hc.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not os.path.exists(path)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


async def test_requests_are_checked_and_errors_carry_errno_names(tmp_path):
    path = str(tmp_path / "xen.sock")
    async with hypervisor_process(path):
        hc = Hypercalls(path)
        try:
            with pytest.raises(OSError) as e:
                hc.call("no_such_hypercall")
            assert e.value.errno == errno.ENOSYS
            for bad in ({"pages": 0}, {"pages": 4, "grant_frames": 0}, {"pages": "many"}, {}):
                with pytest.raises(OSError) as e:
                    hc.call("create_domain", **bad)
                assert e.value.errno == errno.EINVAL, bad
            with pytest.raises(OSError) as e:
                hc.call("destroy_domain", domid=0)
            assert e.value.errno == errno.EPERM
            with pytest.raises(OSError) as e:
                hc.call("destroy_domain", domid=77)
            assert e.value.errno == errno.ESRCH
            # not even JSON: the server answers EINVAL and keeps the connection
            hc._sock.sendall(b"\xff{")
            data = hc._sock.recv(4096)
            assert b'"EINVAL"' in data
            domid = hc.call("create_domain", pages=8, grant_frames=1)[0]["domid"]
            assert hc.domain_state(domid) == DOMAIN_ALIVE and hc.domain_alive(domid)
            hc.call("destroy_domain", domid=domid)
            assert hc.domain_state(domid) == DOMAIN_DEAD and not hc.domain_alive(domid)
            assert hc.domain_state(domid + 1) == DOMAIN_ABSENT
            assert hc.call("create_domain", pages=8)[0]["domid"] == domid + 1  # domids are not reused
        finally:
            hc.close()


async def test_a_vanished_client_loses_its_event_channels(tmp_path):
    path = str(tmp_path / "xen.sock")
    async with hypervisor_process(path):
        owner = Hypercalls(path)
        watcher = Hypercalls(path)
        try:
            domid = owner.call("create_domain", pages=4)[0]["domid"]
            reply, fds = owner.call("evtchn_alloc_unbound", domid=domid, remote_domid=0)
            for fd in fds:
                os.close(fd)
            port = reply["port"]
            assert watcher.call("evtchn_status", domid=domid, port=port)[0]["state"] == "unbound"
            owner.close()  # as if the guest process died
            for _ in range(500):  # the server handles the hang-up on its own time
                if watcher.call("evtchn_status", domid=domid, port=port)[0]["state"] == "closed":
                    break
                await trio.sleep(0.01)
            assert watcher.call("evtchn_status", domid=domid, port=port)[0] == {"state": "closed"}
            assert watcher.domain_alive(domid)  # the domain itself outlives the connection
        finally:
            watcher.close()


async def test_clients_refuse_a_hypervisor_in_their_own_process_instead_of_deadlocking(tmp_path):
    path = str(tmp_path / "xen.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(serve, path)
        with pytest.raises(RuntimeError, match="separate process"):
            Hypercalls(path)
        with pytest.raises(RuntimeError):
            open_sim(path)
        nursery.cancel_scope.cancel()
    assert not os.path.exists(path)


def test_no_hypervisor_no_platform(tmp_path):
    with pytest.raises((FileNotFoundError, ConnectionRefusedError)):
        open_sim(str(tmp_path / "nothing.sock"))
    stale = str(tmp_path / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(stale)
    s.close()  # a socket file nobody listens on
    with pytest.raises(ConnectionRefusedError):
        open_sim(stale)
