#!/usr/bin/env python3
"""How long does `xenblk-vhost run` take from exec to serving a busy guest again?

    .venv/bin/python scripts/bench_startup.py [--runs 5] [--queues 2] [--baseline DIR]

A simulated host (sim.World) with one guest whose disk (a file, io_uring) a
verifying workload keeps busy. The daemon is stopped (SIGTERM: it drains and
leaves the guest Connected) and started again, --runs times. For each start
it prints:
  - the daemon's own phases (its "serving ... after exec" log line: interpreter
    and imports, configuration, service imports, hypervisor and xenstore,
    control socket and metrics, devices found and watched);
  - exec -> `ready` on stdout, as the bench saw it;
  - exec -> the guest's first answer: the end of the guest's longest pause
    that spans the exec (the workload records its pauses, sim/blkfront_workload.py);
  - the guest's whole pause (from its last answer by the old daemon).
then the median of each, and the workload's verdict (it verifies every read).
A crash's pause is at least the exec -> first answer figure.

--baseline DIR: a checkout of an older tree (e.g. `git worktree add /tmp/base
COMMIT`); its daemon (PYTHONPATH=DIR) alternates with this tree's in the same
run, on the same guest, and both get their rows and medians: before/after
figures measured together under the same load.

Figures only; nothing is asserted. Say the machine and its load with them.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from xenblk_vhost.daemon.startup_clock import SUMMARY, parse_summary
from xenblk_vhost.sim.busy_guest import run_argv, spanning, start_busy_frontend, workload_verdict, write_busy_disk
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world


async def bench(args: argparse.Namespace, workdir: Path) -> int:
    image, config = write_busy_disk(workdir, "bench", queues=args.queues)
    starts: list[dict] = []
    async with open_world(workdir / "world") as world:
        guest = await world.create_guest("bench")
        backend = await world.start_process(run_argv(world, config), name="backend-0", timeout=60)
        vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(image)))
        stop = workdir / "stop"  # the workload ends once every restart is done, however long they took
        front = await start_busy_frontend(world, vbd, stop_file=stop)
        await trio.sleep(args.settle)
        trees = [("this tree", None)] + ([("baseline", args.baseline)] if args.baseline else [])
        for i in range(args.runs * len(trees)):
            label, tree = trees[i % len(trees)]
            backend.proc.send_signal(signal.SIGTERM)
            await backend.wait(60)
            t_exec = time.time()
            backend = await world.start_process(run_argv(world, config, tree=tree), name=f"backend-{i + 1}", timeout=60)
            ready = time.time() - t_exec
            if tree is None:  # an older tree may not log its phases
                await backend.wait_line(lambda line: SUMMARY.search(line) is not None, 30)
            starts.append({"tree": label, "exec": t_exec, "ready": ready,
                           "phases": parse_summary("\n".join(backend.lines))})
            await trio.sleep(args.settle)
        stop.touch()
        rc = await front.wait(120)
        result = front.last_json()
    workload = result.get("workload", {})
    pauses = workload.get("pauses", [])
    for s in starts:
        during = spanning(pauses, s["exec"], slack=0)
        if during:
            p = during[0]
            s["first_answer"] = p["start"] + p["seconds"] - s["exec"]
            s["pause"] = p["seconds"]
    print(f"xenblk-vhost run: exec to serving, {args.runs} restarts of a busy guest's daemon "
          f"(sim, io_uring file, {args.queues} queues; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f})")
    names = list(starts[0]["phases"]) if starts and starts[0]["phases"] else []
    print("seconds; phases from the daemon's own log line, the rest as this script and the guest saw them")
    for label in dict.fromkeys(s["tree"] for s in starts):
        header = [label, *names, "exec->ready", "exec->1st answer", "guest pause"]
        print("  " + " | ".join(header))
        rows = []
        for i, s in enumerate(starts):
            if s["tree"] != label:
                continue
            row = [*(s["phases"].get(n, float("nan")) for n in names), s["ready"],
                   s.get("first_answer", float("nan")), s.get("pause", float("nan"))]
            rows.append(row)
            print(f"  {i + 1:>{len(label)}} | " + " | ".join(f"{v:.3f}" for v in row))
        medians = [statistics.median([v for v in col if v == v] or [float("nan")]) for col in zip(*rows)]
        print(f"  {'median':>{len(label)}} | " + " | ".join(f"{v:.3f}" for v in medians))
    print(workload_verdict(result, rc))
    return 0 if result.get("ok") else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="restarts measured (default 5)")
    p.add_argument("--queues", type=int, default=2, help="rings the guest uses (default 2)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds of served I/O between restarts")
    p.add_argument("--baseline", metavar="DIR", help="an older checkout whose daemon alternates with this one's")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as d:
        return trio.run(bench, args, Path(d))


if __name__ == "__main__":
    sys.exit(main())
