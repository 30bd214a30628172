"""The simulated hypervisor: domains, their memory and grant tables, event channels.

Run it as its own process (it must not share a thread with anything that
makes hypercalls, since those block):

    python -m xenblk_vhost.sim.hypervisor --socket /run/sim-xen.sock

It prints "ready" on stdout once it listens and runs until SIGTERM/SIGINT.
From trio code, `async with hypervisor_process(path):` starts and stops
one; from plain scripts, `with running_hypervisor(path):`. `serve(path)`
runs one inside any trio nursery (`await nursery.start(serve, path)`) when
every client lives in another process; a client in the serving process is
refused (`Hypercalls` checks the listener's pid) rather than deadlocked.

What it owns (`Hypervisor`, pure state, no I/O besides creating kernel objects):
- domains: dom0 exists from the start (the backend's domain, no memory);
  `create_domain(pages, grant_frames)` gives a new domid (never reused).
  A domain's memory is a memfd of `pages` frames; its v1 grant table a memfd
  of `grant_frames` frames; Xen's private active-grant table a third memfd.
  Destroying a domain closes its event channels (their peers become
  unbound, as in Xen) and drops the hypervisor's references: memory that
  someone still has mapped stays valid for them, as a dying domain's pages
  stay while foreign mappings exist, but new maps and copies fail.
- event channels with Xen's rules (xen/common/event_channel.c):
  alloc_unbound(domid, remote) -> a port only `remote` may bind;
  bind_interdomain(domid, remote, port) -> a new local port, EINVAL unless
  the remote port is unbound and reserved for us, ESRCH for an unknown
  domain; the new local port starts pending ("we may have lost
  notifications"); closing one end makes the other unbound.
  Each allocated port P has two eventfds: P's own pending, and a "slot"
  that is the pending of whatever binds to P. Both ends get their own
  eventfd to wait on and the peer's to kick, so a notify is one eventfd
  write, never a round trip here. The guest keeps kicking P's slot across
  re-binds, so a backend that unbinds and binds again is reachable without
  the guest knowing; kicks sent while unbound land in the slot, and the
  next bind marks the new port pending anyway, so nothing observable is
  added.
- gntdev unmap notifications (IOCTL_GNTDEV_SET_UNMAP_NOTIFY): registered
  here, so that if the backend process dies the byte is still cleared and
  the event still sent, as the kernel does when it tears down the mapping.
"""

from __future__ import annotations

import argparse
import array
import errno
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from ..xen.interfaces import PAGE_SIZE
from .gntdev import ForeignDomain
from .grant_table import active_table_bytes, grant_table_bytes
from .hypercall import DOMAIN_ALIVE, DOMAIN_DEAD, DOMID_FIRST_RESERVED, MAX_MESSAGE, STATUS_PAGE_SIZE
from .pin_ledger import LEDGER_BYTES, read_ledger

MAX_DOMAIN_PAGES = 1 << 20  # 4 GiB of simulated guest memory
MAX_GRANT_FRAMES = 64  # Xen's default max_grant_frames
MAX_PORTS = 4096

UNBOUND = "unbound"
INTERDOMAIN = "interdomain"


def _error(code: int, message: str) -> OSError:
    return OSError(code, message)


@dataclass
class Port:
    domid: int
    port: int
    owner: int  # connection that allocated or bound it
    state: str
    remote_domid: int
    remote_port: int = 0
    # Only ports made by alloc_unbound own eventfds (see the module doc);
    # a port made by bind_interdomain uses its peer's.
    pending_fd: int = -1
    slot_fd: int = -1
    # Unmap notifications that will send on this port hold it open, as
    # gntdev's evtchn_get() does: closing it only marks it, and the last
    # notification to fire closes it.
    holds: int = 0
    closing: bool = False


@dataclass
class Domain:
    domid: int
    pages: int
    grant_frames: int
    memory_fd: int = -1
    grant_fd: int = -1
    active_fd: int = -1
    ports: dict[int, Port] = field(default_factory=dict)
    next_port: int = 1  # port 0 is never valid in Xen


@dataclass
class UnmapNotify:
    owner: int
    domid: int  # the mapping domain (ours, the notifier)
    foreign_domid: int
    clear: tuple[int, int] | None  # (frame, byte offset) in the foreign domain's memory
    event_port: int | None  # a port of `domid`


def _memfd(name: str, size: int) -> int:
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def _kick(fd: int) -> None:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass  # counter saturated: it is pending already


class Hypervisor:
    """The hypervisor's state. Every method is synchronous and atomic with respect to the others."""

    def __init__(self) -> None:
        self.status_fd = _memfd("sim-xen-status", STATUS_PAGE_SIZE)
        self.domains: dict[int, Domain] = {0: Domain(0, 0, 0)}
        self._set_status(0, DOMAIN_ALIVE)
        self._next_domid = 1
        self._notifies: dict[int, UnmapNotify] = {}
        self._tokens = itertools.count(1)
        self._pin_ledgers: dict[int, int] = {}  # owner -> memfd of the grant pins it holds (pin_ledger.py)
        self.pins_repaired = 0  # refs whose pins a process died in the middle of (_repair_pins)

    def _set_status(self, domid: int, state: int) -> None:
        os.pwrite(self.status_fd, bytes([state]), domid)

    def domain(self, domid: int) -> Domain:
        dom = self.domains.get(domid)
        if dom is None:
            raise _error(errno.ESRCH, f"no domain {domid}")
        return dom

    # ---- domains ----

    def create_domain(self, pages: int, grant_frames: int) -> Domain:
        if not (1 <= pages <= MAX_DOMAIN_PAGES and 1 <= grant_frames <= MAX_GRANT_FRAMES):
            raise _error(errno.EINVAL, f"bad domain size: {pages} pages, {grant_frames} grant frames")
        if self._next_domid >= DOMID_FIRST_RESERVED:
            raise _error(errno.ENOSPC, "out of domids")
        domid = self._next_domid
        self._next_domid += 1
        dom = Domain(domid, pages, grant_frames)
        dom.memory_fd = _memfd(f"sim-dom{domid}-memory", pages * PAGE_SIZE)
        dom.grant_fd = _memfd(f"sim-dom{domid}-grant-table", grant_table_bytes(grant_frames))
        dom.active_fd = _memfd(f"sim-dom{domid}-active-grants", active_table_bytes(grant_frames))
        self.domains[domid] = dom
        self._set_status(domid, DOMAIN_ALIVE)
        return dom

    def destroy_domain(self, domid: int) -> None:
        if domid == 0:
            raise _error(errno.EPERM, "dom0 cannot be destroyed")
        dom = self.domain(domid)
        for port in list(dom.ports):
            self.close_port(domid, port, force=True)
        self._set_status(domid, DOMAIN_DEAD)
        del self.domains[domid]
        for fd in (dom.memory_fd, dom.grant_fd, dom.active_fd):
            os.close(fd)

    # ---- event channels ----

    def _new_port(self, dom: Domain, **kw: Any) -> Port:
        if len(dom.ports) >= MAX_PORTS:
            raise _error(errno.ENOSPC, f"domain {dom.domid} is out of event channels")
        port = Port(dom.domid, dom.next_port, **kw)
        dom.next_port += 1
        dom.ports[port.port] = port
        return port

    def alloc_unbound(self, domid: int, remote_domid: int, owner: int) -> tuple[Port, int, int]:
        """EVTCHNOP_alloc_unbound. Returns (port, fd to wait on, fd to kick)."""
        dom = self.domain(domid)
        if not 0 <= remote_domid < DOMID_FIRST_RESERVED:
            raise _error(errno.EINVAL, f"bad remote domid {remote_domid}")
        port = self._new_port(dom, owner=owner, state=UNBOUND, remote_domid=remote_domid)
        port.pending_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        port.slot_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return port, port.pending_fd, port.slot_fd

    def bind_interdomain(self, domid: int, remote_domid: int, remote_port: int, owner: int) -> tuple[Port, int, int]:
        """EVTCHNOP_bind_interdomain. Returns (local port, fd to wait on, fd to kick)."""
        local = self.domain(domid)
        remote = self.domain(remote_domid)  # ESRCH, as rcu_lock_domain_by_any_id failing
        rport = remote.ports.get(remote_port)
        if rport is None:
            raise _error(errno.EINVAL, f"domain {remote_domid} has no port {remote_port}")
        if rport.state != UNBOUND or rport.remote_domid != domid:
            raise _error(errno.EINVAL, f"port {remote_port} of domain {remote_domid} is not unbound for domain {domid}")
        if rport.slot_fd < 0:
            # An end left unbound by its peer closing (see module doc): Xen
            # would allow binding it; the simulation has no eventfd for it.
            raise _error(
                errno.EINVAL, f"port {remote_port} of domain {remote_domid} cannot be re-bound in the simulation"
            )
        lport = self._new_port(
            local, owner=owner, state=INTERDOMAIN, remote_domid=remote_domid, remote_port=remote_port
        )
        rport.state = INTERDOMAIN
        rport.remote_port = lport.port
        _kick(rport.slot_fd)  # the new local port starts pending, as in Xen
        return lport, rport.slot_fd, rport.pending_fd

    def close_port(self, domid: int, port: int, *, force: bool = False) -> None:
        """EVTCHNOP_close: the peer, if any, becomes unbound (for us)."""
        dom = self.domain(domid)
        p = dom.ports.get(port)
        if p is None or (p.closing and not force):
            raise _error(errno.EINVAL, f"domain {domid} has no port {port}")
        if p.holds and not force:
            p.closing = True
            return
        del dom.ports[port]
        if p.state == INTERDOMAIN:
            peer_dom = self.domains.get(p.remote_domid)
            peer = peer_dom.ports.get(p.remote_port) if peer_dom else None
            if peer is not None and peer.state == INTERDOMAIN and peer.remote_domid == domid:
                peer.state = UNBOUND
                peer.remote_port = 0
        for fd in (p.pending_fd, p.slot_fd):
            if fd >= 0:
                os.close(fd)

    def _peer_pending_fd(self, domid: int, port: int) -> int:
        """The eventfd a notify on (domid, port) would kick, or -1 if it would be dropped."""
        dom = self.domains.get(domid)
        p = dom.ports.get(port) if dom else None
        if p is None or p.state != INTERDOMAIN:
            return -1
        if p.slot_fd >= 0:
            return p.slot_fd
        peer_dom = self.domains.get(p.remote_domid)
        peer = peer_dom.ports.get(p.remote_port) if peer_dom else None
        return peer.pending_fd if peer is not None else -1

    def port_status(self, domid: int, port: int) -> dict:
        p = self.domain(domid).ports.get(port)
        if p is None:
            return {"state": "closed"}
        return {"state": p.state, "remote_domid": p.remote_domid, "remote_port": p.remote_port}

    # ---- unmap notifications ----

    def set_unmap_notify(self, owner: int, domid: int, foreign_domid: int, clear, event_port) -> int:
        if event_port is not None:
            p = self.domain(domid).ports.get(event_port)
            if p is None or p.closing:
                raise _error(errno.EINVAL, f"domain {domid} has no port {event_port}")  # evtchn_get failing
            p.holds += 1
        token = next(self._tokens)
        self._notifies[token] = UnmapNotify(owner, domid, foreign_domid, tuple(clear) if clear else None, event_port)
        return token

    def _release_hold(self, n: UnmapNotify) -> None:
        if n.event_port is None:
            return
        dom = self.domains.get(n.domid)
        p = dom.ports.get(n.event_port) if dom else None
        if p is not None:
            p.holds -= 1
            if p.closing and not p.holds:
                self.close_port(n.domid, n.event_port, force=True)

    def cancel_unmap_notify(self, token: int) -> None:
        """Forget a notification without acting (the ioctl replacing an earlier one)."""
        n = self._notifies.pop(token, None)
        if n is None:
            raise _error(errno.ENOENT, f"no unmap notification {token}")
        if n.event_port is not None:
            self._release_hold(n)

    def fire_unmap_notify(self, token: int, *, clear_done: bool) -> None:
        n = self._notifies.pop(token, None)
        if n is None:
            raise _error(errno.ENOENT, f"no unmap notification {token}")
        if n.clear is not None and not clear_done:
            dom = self.domains.get(n.foreign_domid)
            if dom is not None:
                frame, offset = n.clear
                if 0 <= frame < dom.pages:
                    os.pwrite(dom.memory_fd, b"\0", frame * PAGE_SIZE + offset)
        if n.event_port is not None:
            fd = self._peer_pending_fd(n.domid, n.event_port)
            if fd >= 0:
                _kick(fd)
            self._release_hold(n)

    # ---- connections ----

    def pin_ledger(self, owner: int) -> int:
        """The memfd where `owner`'s gntdev lists the grants it holds mapped (one per connection)."""
        fd = self._pin_ledgers.get(owner)
        if fd is None:
            fd = self._pin_ledgers[owner] = _memfd(f"sim-pins-{owner}", LEDGER_BYTES)
        return fd

    def _release_pins(self, owner: int) -> None:
        """The kernel unmaps a dying process's grant mappings (gntdev's release): unpin what it listed."""
        fd = self._pin_ledgers.pop(owner, None)
        if fd is None:
            return
        try:
            held = read_ledger(fd)
            for domid, pins in held.items():
                dom = self.domains.get(domid)
                if dom is None or dom.domid == 0:
                    continue  # destroyed meanwhile: its tables went with it
                tables = ForeignDomain(domid, dom.pages, dom.grant_frames, os.dup(dom.memory_fd),
                                       os.dup(dom.grant_fd), os.dup(dom.active_fd))
                try:
                    inside = set()
                    for ref, write, pending in pins:
                        if pending:
                            inside.add(ref)  # killed inside this pin or unpin
                        else:
                            tables.table.unpin(ref, write, tables.active)
                    for ref in sorted(inside):
                        self._repair_pins(tables, domid, ref)
                        self.pins_repaired += 1
                finally:
                    tables.retire()
        finally:
            os.close(fd)

    def _repair_pins(self, tables: ForeignDomain, domid: int, ref: int) -> None:
        """Recompute ref's pin counts and in-use flags from what the live backends list (pin_ledger.py).

        The counts are read before the ledgers, and swapped only if unchanged: a live pin or unpin
        lists its entry (pending) before it touches the counts, so one that ran meanwhile either shows
        in the ledgers or makes the swap fail, and we look again. A live entry pending means a pin or
        unpin under way (a few microseconds): wait it out, up to 2 s."""
        deadline = time.monotonic() + 2.0
        while True:
            seen = tables.active.counts(ref)
            reads = writes = busy = 0
            for fd in self._pin_ledgers.values():
                for r, write, pending in read_ledger(fd).get(domid, ()):
                    if r == ref:
                        busy += pending
                        writes += write and not pending
                        reads += not write and not pending
            if busy and time.monotonic() < deadline:
                time.sleep(0.0005)
                continue
            if busy:
                print(f"sim hypervisor: grant {ref} of domain {domid}: a live backend's pin stayed pending 2 s; "
                      "counting it as not pinned", file=sys.stderr)
            if tables.table.repair_pins(ref, tables.active, seen, reads, writes):
                return

    def disconnect(self, owner: int) -> None:
        """A client went away (exited or crashed): do what its kernel would on process exit."""
        self._release_pins(owner)
        for token, n in list(self._notifies.items()):
            if n.owner == owner:
                self.fire_unmap_notify(token, clear_done=False)
        for dom in list(self.domains.values()):
            for p in list(dom.ports.values()):
                if p.owner == owner and not p.closing:
                    self.close_port(dom.domid, p.port)

    def close(self) -> None:
        for domid in [d for d in self.domains if d != 0]:
            self.destroy_domain(domid)
        for p in list(self.domains[0].ports):
            self.close_port(0, p, force=True)
        os.close(self.status_fd)

    # ---- the request table ----

    def handle(self, owner: int, req: dict) -> tuple[dict, list[int]]:
        op = req.get("op")
        if op == "hello":
            return {"pid": os.getpid()}, [self.status_fd]
        if op == "create_domain":
            dom = self.create_domain(int(req["pages"]), int(req.get("grant_frames", 4)))
            return {"domid": dom.domid}, []
        if op == "destroy_domain":
            self.destroy_domain(int(req["domid"]))
            return {}, []
        if op == "list_domains":
            return {"domains": sorted(self.domains)}, []
        if op == "counters":
            return {"pins_repaired": self.pins_repaired}, []
        if op in ("guest_memory", "foreign_domain"):
            dom = self.domain(int(req["domid"]))
            if dom.domid == 0:
                raise _error(errno.EINVAL, "dom0 has no simulated memory")
            fds = [dom.memory_fd, dom.grant_fd] + ([dom.active_fd] if op == "foreign_domain" else [])
            return {"pages": dom.pages, "grant_frames": dom.grant_frames}, fds
        if op == "evtchn_alloc_unbound":
            port, wait_fd, kick_fd = self.alloc_unbound(int(req["domid"]), int(req["remote_domid"]), owner)
            return {"port": port.port}, [wait_fd, kick_fd]
        if op == "evtchn_bind_interdomain":
            port, wait_fd, kick_fd = self.bind_interdomain(
                int(req["domid"]), int(req["remote_domid"]), int(req["remote_port"]), owner
            )
            return {"port": port.port}, [wait_fd, kick_fd]
        if op == "evtchn_close":
            self.close_port(int(req["domid"]), int(req["port"]))
            return {}, []
        if op == "evtchn_status":
            return self.port_status(int(req["domid"]), int(req["port"])), []
        if op == "pin_ledger":
            return {"bytes": LEDGER_BYTES}, [self.pin_ledger(owner)]
        if op == "unmap_notify_set":
            token = self.set_unmap_notify(
                owner, int(req["domid"]), int(req["foreign_domid"]), req.get("clear"), req.get("event_port")
            )
            return {"token": token}, []
        if op == "unmap_notify_cancel":
            self.cancel_unmap_notify(int(req["token"]))
            return {}, []
        if op == "unmap_notify_fire":
            self.fire_unmap_notify(int(req["token"]), clear_done=bool(req.get("clear_done")))
            return {}, []
        raise _error(errno.ENOSYS, f"unknown hypercall {op!r}")


# ---- the server ----


async def _serve_connection(hv: Hypervisor, conn: trio.socket.SocketType, owner: int) -> None:
    try:
        while True:
            try:
                data = await conn.recv(MAX_MESSAGE)
            except OSError:
                break
            if not data:
                break
            try:
                reply, fds = hv.handle(owner, json.loads(data))
            except OSError as e:
                reply, fds = {"error": errno.errorcode.get(e.errno or 0, "EIO"), "message": e.strerror or str(e)}, []
            except (KeyError, ValueError, TypeError) as e:
                reply, fds = {"error": "EINVAL", "message": f"malformed request: {e!r}"}, []
            payload = json.dumps(reply).encode()
            try:
                if fds:
                    await conn.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
                else:
                    await conn.send(payload)
            except OSError:
                break
    finally:
        hv.disconnect(owner)
        conn.close()


async def serve(socket_path: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve a fresh hypervisor on socket_path until cancelled."""
    hv = Hypervisor()
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        if os.path.exists(socket_path):
            os.unlink(socket_path)
        await listener.bind(socket_path)
        listener.listen(64)
        task_status.started()
        owners = itertools.count(1)
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_serve_connection, hv, conn, next(owners))
    finally:
        listener.close()
        try:
            os.unlink(socket_path)
        except FileNotFoundError:
            pass
        hv.close()


async def _main(socket_path: str) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve, socket_path)
            print("ready", flush=True)
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xenblk_vhost.sim.hypervisor", description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="unix socket path to listen on")
    args = parser.parse_args(argv)
    trio.run(_main, args.socket)


def _command(socket_path: str) -> list[str]:
    return [sys.executable, "-m", "xenblk_vhost.sim.hypervisor", "--socket", socket_path]


@asynccontextmanager
async def hypervisor_process(socket_path: str) -> AsyncIterator[trio.Process]:
    """Run a hypervisor process for the duration of the block (trio).

    In its own session: a Ctrl-C on the terminal goes to the foreground process
    group, and must not stop the hypervisor under its guests' feet (the demo
    stops its guest first); whoever runs it stops it, here, on the way out."""
    proc = await trio.lowlevel.open_process(_command(socket_path), stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None  # a pipe was asked for
    try:
        line = b""
        while not line.endswith(b"\n"):
            chunk = await proc.stdout.receive_some(64)
            if not chunk:
                raise RuntimeError(f"simulated hypervisor exited before it was ready (rc={await proc.wait()})")
            line += chunk
        if line.strip() != b"ready":
            raise RuntimeError(f"simulated hypervisor said {line!r}")
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.terminate()
            await proc.wait()
            await proc.stdout.aclose()


@contextmanager
def running_hypervisor(socket_path: str) -> Iterator[subprocess.Popen]:
    """Run a hypervisor process for the duration of the block (plain scripts)."""
    proc = subprocess.Popen(_command(socket_path), stdout=subprocess.PIPE)
    assert proc.stdout is not None  # a pipe was asked for
    try:
        line = proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"simulated hypervisor said {line!r} (rc={proc.poll()})")
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.wait()
        proc.stdout.close()


if __name__ == "__main__":
    main()
