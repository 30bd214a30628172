#!/usr/bin/env python3
"""The guest's I/O pause across an upgrade (`xenblk-vhost upgrade`) and across a restart (SIGTERM, new
daemon), measured together on one busy guest.

    .venv/bin/python scripts/bench_handover.py [--runs 5] [--queues 2]

A simulated host (sim.World), one guest whose disk (a file, io_uring) a
verifying workload keeps busy (writes, reads, flushes, discards, 16 in
flight). The daemon is handed over with `xenblk-vhost upgrade` and restarted
(SIGTERM, then `xenblk-vhost run` again), alternately, --runs times each. For
each event it prints the guest's pause (its longest stretch without an
answer spanning the event: sim/blkfront_workload.py measures it in the
guest's process), and for upgrades the old daemon's drain and the new one's
start-up (which the upgrade keeps out of the pause); then the median and
the longest pause of each kind, and the workload's verdict (every read
verified, every request answered once).

Figures only; nothing is asserted (tests/test_handover.py asserts). Say the
machine and its load with them.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from xenblk_vhost.daemon.startup_clock import parse_summary
from xenblk_vhost.sim.busy_guest import (
    run_argv,
    spanning,
    start_busy_frontend,
    terminate,
    wait_exited,
    workload_verdict,
    write_busy_disk,
)
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world


async def bench(args: argparse.Namespace, workdir: Path) -> int:
    image, config = write_busy_disk(workdir, "bench", queues=args.queues)
    control = workdir / "control.sock"
    events: list[dict] = []
    pid = None
    async with open_world(workdir / "world") as world:
        argv = run_argv(world, config, "--control", str(control))
        guest = await world.create_guest("bench")
        backend = await world.start_process(argv, name="backend-0", timeout=60)
        pid = backend.proc.pid
        try:
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(image)))
            stop = workdir / "stop"  # the workload ends once every event is done, however long they took
            front = await start_busy_frontend(world, vbd, stop_file=stop)
            await trio.sleep(args.settle)
            for i in range(2 * args.runs):
                if i % 2 == 0:
                    done = await trio.run_process(
                        [sys.executable, "-m", "xenblk_vhost", "upgrade", "--control", str(control), "--json"],
                        capture_stdout=True, capture_stderr=True, check=False)
                    if done.returncode != 0:
                        print(f"upgrade failed: {done.stderr.decode()}", file=sys.stderr)
                        return 1
                    reply = json.loads(done.stdout)
                    pid = reply["successor"]
                    startup = parse_summary(reply["successor_startup"]).get("total", float("nan"))
                    events.append({"kind": "upgrade", "at": reply["handed_over_at"], "drain": reply["drain_s"],
                                   "startup": startup})
                else:
                    os.kill(pid, signal.SIGTERM)
                    await wait_exited(pid)
                    at = time.time()
                    backend = await world.start_process(argv, name=f"backend-{i}", timeout=60)
                    pid = backend.proc.pid
                    events.append({"kind": "restart", "at": at, "drain": float("nan"),
                                   "startup": time.time() - at})
                await trio.sleep(args.settle)
            stop.touch()
            rc = await front.wait(120)
            result = front.last_json()
        finally:
            if pid is not None:
                await terminate(pid)
    workload = result.get("workload", {})
    pauses = workload.get("pauses", [])
    # The workload reports its longest gaps only (sim/blkfront_workload.py: 200): a gap spanning an
    # event but not among them was shorter than the shortest reported one; that bound is printed.
    floor = min((p["seconds"] for p in pauses), default=0.0)
    for e in events:
        e["pause"] = max((p["seconds"] for p in spanning(pauses, e["at"])), default=float("nan"))
        e["below"] = e["pause"] != e["pause"]  # nothing reported spans it: shorter than `floor`
        if e["below"]:
            e["pause"] = floor
    print(f"guest I/O pause across xenblk-vhost upgrade and restart ({args.runs} each, alternating; sim, io_uring "
          f"file, {args.queues} rings, 16 in flight; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f})")
    print("  event    | guest pause s | old daemon's drain s | new daemon's start-up s (upgrade: before the pause)")
    for e in events:
        pause = f"< {e['pause']:.4f}" if e["below"] else f"{e['pause']:.4f}"
        print(f"  {e['kind']:<8} | {pause:>13} | {e['drain']:20.4f} | {e['startup']:.3f}")
    for kind in ("upgrade", "restart"):
        values = [e["pause"] for e in events if e["kind"] == kind]
        if values:
            below = sum(1 for e in events if e["kind"] == kind and e["below"])
            bound = f"; {below} shorter than the workload's shortest reported gap, counted as it" if below else ""
            print(f"  {kind}: median pause {statistics.median(values) * 1000:.1f} ms, longest "
                  f"{max(values) * 1000:.1f} ms (n={len(values)}{bound})")
    during = {id(p) for e in events for p in spanning(pauses, e["at"])}
    others = [p["seconds"] for p in pauses if id(p) not in during]
    print(f"  longest pause with no event (the machine's own noise): {max(others, default=0) * 1000:.1f} ms")
    print(workload_verdict(result, rc))
    return 0 if result.get("ok") else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="upgrades and restarts each (default 5)")
    p.add_argument("--queues", type=int, default=2, help="rings the guest uses (default 2)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of served I/O between events")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-handover-") as d:
        return trio.run(bench, args, Path(d))


if __name__ == "__main__":
    sys.exit(main())
