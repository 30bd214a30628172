"""The reference frontend as a scriptable guest process, for the end-to-end tests.

`python -m xenblk_vhost.sim.blkfront` runs one workload and exits; the
libxl-sequence tests need to act between steps (close, reconnect, wait for
a resize or a detach, read the data back). This process attaches to a
simulated domain, connects to xenstored as that domain, and drives the
Blkfront (xenblk_vhost.sim.blkfront) of each of the domain's vbds by JSON
commands on stdin, one JSON answer per line on stdout. One process per
domain, as one guest kernel: the guest's page and grant allocators live in
the process, so two processes on one domain would hand out the same pages.

Every command takes an optional "dev" (a devid; default: the first):

    connect {options?}        -> {negotiated, disk, sectors}
    write {sector, sectors, seed}          pattern(seed) over the range
    verify {sector, sectors, seed} -> {equal}
    read_digest {sector, sectors}  -> {sha256}
    flush / discard {sector, sectors}
    close                     -> {errors}   the guest unplugs (Closing, Closed)
    reconnect                 -> {negotiated, disk, sectors}
    wait_resize {timeout}     -> {sectors, resizes}
    wait_closed {timeout}     -> {errors}   the backend closed (detach)
    report                    -> front.report()
    workloads {devs, requests, depth, seed, region_sectors?, max_sectors?, seconds?, final_verify?}
                              run_workload on each dev at once
                              -> {devid: WorkloadResult.as_dict()}
    exit
Errors answer {"error": "<exception repr>"}.

    async with frontend_agent(world, domid, [51712, 51728]) as fe:
        await fe.call("connect", dev=51712)
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import trio

from xenblk_vhost.blkif.constants import SECTOR_SIZE
from xenblk_vhost.sim.blkfront import Blkfront
from xenblk_vhost.sim.blkfront_config import BlkfrontOptions
from xenblk_vhost.sim.blkfront_workload import Workload, run_workload
from xenblk_vhost.sim.guest import Guest, pattern
from xenblk_vhost.sim.json_lines import LineReader, agent_process, reply, serve_commands
from xenblk_vhost.sim.xenstore_guest import open_guest_xenstore


def sector_pattern(seed: int, sectors: int) -> bytes:
    return pattern(seed, sectors * SECTOR_SIZE)


def _summary(front: Blkfront) -> dict:
    return {"negotiated": front.negotiated.as_dict() if front.negotiated else None,
            "disk": vars(front.disk) if front.disk else None, "sectors": front.sectors}


async def _workloads(fronts: dict[int, Blkfront], a: dict) -> dict:
    results = {}

    async def one(devid: int) -> None:
        w = Workload(requests=int(a.get("requests", 200)), depth=int(a.get("depth", 8)),
                     seed=int(a.get("seed", 1)) + devid, region_sectors=int(a.get("region_sectors", 0)),
                     max_sectors=int(a.get("max_sectors", 64)), seconds=float(a.get("seconds", 0.0)),
                     final_verify=bool(a.get("final_verify", True)), stall_s=float(a.get("stall_s", 0.0)),
                     **({"mix": tuple((op, int(w)) for op, w in a["mix"])} if a.get("mix") else {}))
        results[str(devid)] = (await run_workload(fronts[devid], w)).as_dict()

    async with trio.open_nursery() as nursery:
        for devid in a["devs"]:
            nursery.start_soon(one, int(devid))
    return results


async def _serve(fronts: dict[int, Blkfront], first: int, cmd: str, a: dict) -> dict:
    if cmd == "workloads":
        return await _workloads(fronts, a)
    front = fronts[int(a.get("dev", first))]
    if cmd == "connect":
        await front.connect()
        return _summary(front)
    if cmd == "reconnect":
        await front.reconnect()
        return _summary(front)
    if cmd == "write":
        await front.write(int(a["sector"]), sector_pattern(int(a["seed"]), int(a["sectors"])))
        return {}
    if cmd == "verify":
        data = await front.read(int(a["sector"]), int(a["sectors"]))
        return {"equal": data == sector_pattern(int(a["seed"]), int(a["sectors"]))}
    if cmd == "read_digest":
        return {"sha256": hashlib.sha256(await front.read(int(a["sector"]), int(a["sectors"]))).hexdigest()}
    if cmd == "flush":
        await front.flush()
        return {}
    if cmd == "discard":
        await front.discard(int(a["sector"]), int(a["sectors"]))
        return {}
    if cmd == "close":
        await front.close()
        return {"errors": front.errors}
    if cmd == "wait_resize":
        with trio.fail_after(float(a.get("timeout", 10))):
            sectors = await front.wait_resize()
        return {"sectors": sectors, "resizes": front.resizes}
    if cmd == "wait_closed":
        with trio.fail_after(float(a.get("timeout", 10))):
            await front.wait_closed()
        return {"errors": front.errors, "backend_state": front.backend_state, "state": front.state}
    if cmd == "report":
        return front.report()
    raise ValueError(f"unknown command {cmd!r}")


async def _main(hypervisor: str, xenstore: str, domid: int, devids: list[int], options: dict) -> None:
    guest = Guest.attach(hypervisor, domid)
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    try:
        async with open_guest_xenstore(domid, xenstore) as xs:
            async with trio.open_nursery() as nursery:
                fronts = {d: Blkfront(xs, guest, d, BlkfrontOptions(**options), nursery) for d in devids}
                reply({"ready": True})

                async def handle(cmd: str, req: dict) -> dict:
                    try:
                        return await _serve(fronts, devids[0], cmd, req)
                    except Exception as e:  # report and keep taking commands
                        return {"error": repr(e)}

                await serve_commands(stdin, handle)
                nursery.cancel_scope.cancel()
    finally:
        await stdin.aclose()
        guest.close()


class AgentCallError(RuntimeError):
    pass


class FrontendAgent:
    def __init__(self, proc: trio.Process) -> None:
        self.proc = proc
        self._reader = LineReader(proc.stdout, "frontend agent")

    async def _line(self) -> dict:
        return json.loads(await self._reader.line())

    async def call(self, cmd: str, *, timeout: float = 30.0, **args: Any) -> dict:
        with trio.fail_after(timeout):
            await self.proc.stdin.send_all((json.dumps({"cmd": cmd, **args}) + "\n").encode())
            reply = await self._line()
        if "error" in reply:
            raise AgentCallError(f"{cmd}: {reply['error']}")
        return reply


@asynccontextmanager
async def frontend_agent(world, domid: int, devids: int | list[int], **options: Any) -> AsyncIterator[FrontendAgent]:
    """The guest's frontends for its vbds, in their own process, for the block."""
    devids = [devids] if isinstance(devids, int) else list(devids)
    argv = [sys.executable, __file__, world.hypervisor_path, world.xenstore_path,
            str(domid), ",".join(map(str, devids)), json.dumps(options)]
    async with agent_process(argv, grace=10) as proc:
        agent = FrontendAgent(proc)
        with trio.fail_after(30):
            hello = await agent._line()
        assert hello == {"ready": True}
        yield agent


if __name__ == "__main__":
    hv, xs_path, dom, dev, opts = sys.argv[1:6]
    trio.run(_main, hv, xs_path, int(dom), [int(d) for d in dev.split(",")], json.loads(opts))
