"""The guest side of the simulation: what a guest kernel does with its memory,
its grant table and its event channels.

    guest = Guest.create(socket_path, pages=256)          # a new domain
    [frame] = guest.alloc_pages(1)
    guest.page(frame)[:5] = b"hello"
    gref = guest.grant_access(frame, 0, readonly=True)    # as gnttab_grant_foreign_access
    port = guest.alloc_unbound(0)                         # as EVTCHNOP_alloc_unbound
    port.notify(); await port.wait()
    guest.end_access(gref)                                # False while the backend maps it
    guest.destroy()

The guest runs in its own process in every meaningful test, so the backend
shares nothing with it but kernel objects. For tests that drive a guest
from another process there is a line-oriented agent:

    python -m xenblk_vhost.sim.guest --socket PATH [--pages N | --domid D]

which prints {"domid": D} and then answers one JSON command per line on
stdin with one JSON line on stdout (see `Agent` for the commands);
`GuestAgent` is the trio client for it.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import mmap
import os
import select
import struct
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from ..xen._libc import buffer_address
from ..xen.interfaces import PAGE_SIZE
from .evtchn import SimPort
from .grant_table import GNTTAB_NR_RESERVED_ENTRIES, GrantEntry, SharedGrantTable, grant_table_bytes
from .hypercall import Hypercalls
from .json_lines import LineReader, agent_process, reply, serve_commands


def pattern(seed: int, length: int = PAGE_SIZE) -> bytes:
    """Deterministic, seed-specific bytes for filling and checking pages across processes."""
    out = bytearray()
    counter = 0
    while len(out) < length:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:length])


class Guest:
    """One simulated domain, seen from inside."""

    def __init__(self, hc: Hypercalls, domid: int, *, owns_domain: bool):
        self._hc = hc
        self.domid = domid
        self._owns_domain = owns_domain
        reply, fds = hc.call("guest_memory", domid=domid)
        memory_fd, grant_fd = fds
        try:
            self.npages = reply["pages"]
            self._memory = mmap.mmap(memory_fd, self.npages * PAGE_SIZE, mmap.MAP_SHARED)
            self._grants = mmap.mmap(grant_fd, grant_table_bytes(reply["grant_frames"]), mmap.MAP_SHARED)
        finally:
            os.close(memory_fd)
            os.close(grant_fd)
        self.memory = memoryview(self._memory)
        self.memory_addr = buffer_address(self._memory)
        self.table = SharedGrantTable(self._grants, buffer_address(self._grants), reply["grant_frames"])
        self._free_frames = list(range(self.npages - 1, -1, -1))
        self._free_refs = list(range(self.table.nr_entries - 1, GNTTAB_NR_RESERVED_ENTRIES - 1, -1))
        self._ports: dict[int, SimPort] = {}

    @classmethod
    def create(cls, socket_path: str, *, pages: int = 256, grant_frames: int = 4) -> Guest:
        hc = Hypercalls(socket_path)
        try:
            reply, _ = hc.call("create_domain", pages=pages, grant_frames=grant_frames)
            return cls(hc, reply["domid"], owns_domain=True)
        except BaseException:
            hc.close()
            raise

    @classmethod
    def attach(cls, socket_path: str, domid: int) -> Guest:
        hc = Hypercalls(socket_path)
        try:
            return cls(hc, domid, owns_domain=False)
        except BaseException:
            hc.close()
            raise

    # ---- memory ----

    def alloc_pages(self, n: int) -> list[int]:
        if n > len(self._free_frames):
            raise MemoryError(f"domain {self.domid} has {len(self._free_frames)} free pages, not {n}")
        return [self._free_frames.pop() for _ in range(n)]

    def free_pages(self, frames: list[int]) -> None:
        self._free_frames.extend(frames)

    def page(self, frame: int) -> memoryview:
        if not 0 <= frame < self.npages:
            raise IndexError(f"frame {frame} outside {self.npages} pages")
        return self.memory[frame * PAGE_SIZE : (frame + 1) * PAGE_SIZE]

    def page_addr(self, frame: int) -> int:
        if not 0 <= frame < self.npages:
            raise IndexError(f"frame {frame} outside {self.npages} pages")
        return self.memory_addr + frame * PAGE_SIZE

    # ---- grants ----

    def grant_access(self, frame: int, to_domid: int, readonly: bool) -> int:
        """Grant `to_domid` access to one of our frames; return the grant ref."""
        if not 0 <= frame < self.npages:
            raise IndexError(f"frame {frame} outside {self.npages} pages")
        if not self._free_refs:
            raise OSError(errno.ENOSPC, "grant table full")
        ref = self._free_refs.pop()
        self.table.grant(ref, to_domid, frame, readonly=readonly)
        return ref

    def end_access(self, ref: int) -> bool:
        """Revoke a grant and free its ref, as gnttab_end_foreign_access_ref.

        False (and nothing changed) while the grantee has it mapped
        (GTF_reading/GTF_writing set): the caller must try again later.
        """
        if not self.table.try_end_access(ref):
            return False
        self._free_refs.append(ref)
        return True

    def grant_entry(self, ref: int) -> GrantEntry:
        return self.table.entry(ref)

    # ---- event channels ----

    def alloc_unbound(self, remote_domid: int = 0) -> SimPort:
        reply, fds = self._hc.call("evtchn_alloc_unbound", domid=self.domid, remote_domid=remote_domid)
        port = SimPort(self._hc, self.domid, reply["port"], fds[0], fds[1])
        self._ports[port.local_port] = port
        return port

    def port_status(self, port: int) -> dict:
        return self._hc.call("evtchn_status", domid=self.domid, port=port)[0]

    # ---- lifetime ----

    def destroy(self) -> None:
        """Destroy the domain (like `xl destroy`) and close this view of it."""
        self._hc.call("destroy_domain", domid=self.domid)
        self._owns_domain = False
        self.close()

    def close(self) -> None:
        """Close our view. The domain lives on unless destroy() was called."""
        if self._hc.closed:
            return
        for p in self._ports.values():
            p.close()
        self._ports.clear()
        self.memory.release()
        for m in (self._memory, self._grants):
            try:
                m.close()
            except BufferError:
                pass  # callers still hold page views: unmapped when the last one goes
        self._hc.close()


# ---- the agent: a guest driven over stdin/stdout by another process ----


class Agent:
    """Commands (JSON, one per line), each answered by one JSON line:

    alloc {n}                       -> {frames}
    fill {frame, seed}              page := pattern(seed)
    write {frame, offset, hex}
    read {frame, offset, length}    -> {hex}
    check {frame, seed}             -> {equal}  page == pattern(seed)?
    grant {frame, domid, readonly}  -> {gref}
    raw_entry {gref, flags, domid, frame}   write an entry as a hostile guest would
    entry {gref}                    -> {flags, domid, frame}
    end_access {gref}               -> {ok}
    evtchn_alloc {remote}           -> {port}
    notify {port, count}
    wait {port}                     -> {}   blocks until an event
    pending {port}                  -> {pending}  is an event pending right now?
    echo {port}                     from now on answer every event with a notify
    echo_count {port}               -> {count}  events the echo task has seen
    close_port {port}
    port_status {port}              -> {state, ...}
    destroy / exit
    Errors answer {"error": errno name, "message"}.
    """

    def __init__(self, guest: Guest, nursery: trio.Nursery):
        self.g = guest
        self.nursery = nursery
        self.echo_counts: dict[int, int] = {}

    def _port(self, args: dict) -> SimPort:
        return self.g._ports[int(args["port"])]

    async def _echo(self, port: SimPort) -> None:
        try:
            while True:
                await port.wait()
                self.echo_counts[port.local_port] += 1
                port.notify()
        except trio.ClosedResourceError:
            pass

    async def run(self, cmd: str, a: dict) -> dict:
        g = self.g
        if cmd == "alloc":
            return {"frames": g.alloc_pages(int(a["n"]))}
        if cmd == "fill":
            g.page(int(a["frame"]))[:] = pattern(int(a["seed"]))
            return {}
        if cmd == "write":
            data = bytes.fromhex(a["hex"])
            off = int(a["offset"])
            g.page(int(a["frame"]))[off : off + len(data)] = data
            return {}
        if cmd == "read":
            off = int(a["offset"])
            return {"hex": bytes(g.page(int(a["frame"]))[off : off + int(a["length"])]).hex()}
        if cmd == "check":
            return {"equal": bytes(g.page(int(a["frame"]))) == pattern(int(a["seed"]))}
        if cmd == "grant":
            return {"gref": g.grant_access(int(a["frame"]), int(a["domid"]), readonly=bool(a["readonly"]))}
        if cmd == "raw_entry":
            struct.pack_into(
                "<HHI", g.table._buf, int(a["gref"]) * 8, int(a["flags"]), int(a["domid"]), int(a["frame"])
            )
            return {}
        if cmd == "entry":
            return g.grant_entry(int(a["gref"]))._asdict()
        if cmd == "end_access":
            return {"ok": g.end_access(int(a["gref"]))}
        if cmd == "evtchn_alloc":
            return {"port": g.alloc_unbound(int(a.get("remote", 0))).local_port}
        if cmd == "notify":
            port = self._port(a)
            for _ in range(int(a.get("count", 1))):
                port.notify()
            return {}
        if cmd == "wait":
            await self._port(a).wait()
            return {}
        if cmd == "pending":
            return {"pending": bool(select.select([self._port(a).fileno()], [], [], 0)[0])}
        if cmd == "echo":
            port = self._port(a)
            self.echo_counts[port.local_port] = 0
            self.nursery.start_soon(self._echo, port)
            return {}
        if cmd == "echo_count":
            return {"count": self.echo_counts[int(a["port"])]}
        if cmd == "close_port":
            g._ports.pop(int(a["port"])).close()
            return {}
        if cmd == "port_status":
            return g.port_status(int(a["port"]))
        if cmd == "destroy":
            g.destroy()
            return {}
        raise ValueError(f"unknown command {cmd!r}")


async def _agent_main(args: argparse.Namespace) -> None:
    if args.domid is None:
        guest = Guest.create(args.socket, pages=args.pages, grant_frames=args.grant_frames)
    else:
        guest = Guest.attach(args.socket, args.domid)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    try:
        reply({"domid": guest.domid})
        async with trio.open_nursery() as nursery:
            agent = Agent(guest, nursery)

            async def handle(cmd: str, req: dict) -> dict:
                try:
                    return await agent.run(cmd, req)
                except OSError as e:
                    return {"error": errno.errorcode.get(e.errno or 0, "EIO"), "message": str(e)}
                except (KeyError, ValueError, IndexError, MemoryError) as e:
                    return {"error": "EINVAL", "message": repr(e)}

            await serve_commands(stdin, handle)
            nursery.cancel_scope.cancel()
    finally:
        await stdin.aclose()
        guest.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m xenblk_vhost.sim.guest", description="a scriptable simulated guest"
    )
    parser.add_argument("--socket", required=True, help="the simulated hypervisor's socket")
    parser.add_argument("--pages", type=int, default=256)
    parser.add_argument("--grant-frames", type=int, default=4)
    parser.add_argument("--domid", type=int, help="attach to an existing domain instead of creating one")
    trio.run(_agent_main, parser.parse_args(argv))


class AgentError(OSError):
    pass


class GuestAgent:
    """Drives a `python -m xenblk_vhost.sim.guest` process from trio."""

    def __init__(self, proc: trio.Process, domid: int, reader: LineReader):
        self.proc = proc
        self.domid = domid
        self._reader = reader

    async def call(self, cmd: str, **args: Any) -> dict:
        assert self.proc.stdin is not None  # agent_process opens the pipes
        await self.proc.stdin.send_all((json.dumps({"cmd": cmd, **args}) + "\n").encode())
        reply = json.loads(await self._reader.line())
        if "error" in reply:
            raise AgentError(getattr(errno, reply["error"], errno.EIO), reply.get("message", ""))
        return reply


@asynccontextmanager
async def guest_agent(
    socket_path: str, *, pages: int = 256, grant_frames: int = 4, domid: int | None = None
) -> AsyncIterator[GuestAgent]:
    """A guest in its own process for the duration of the block."""
    cmd = [sys.executable, "-m", "xenblk_vhost.sim.guest", "--socket", socket_path,
           "--pages", str(pages), "--grant-frames", str(grant_frames)]
    if domid is not None:
        cmd += ["--domid", str(domid)]
    async with agent_process(cmd, grace=5) as proc:
        assert proc.stdout is not None  # agent_process opens the pipes
        reader = LineReader(proc.stdout, "guest agent")
        hello = json.loads(await reader.line())
        yield GuestAgent(proc, hello["domid"], reader)


if __name__ == "__main__":
    main()
