"""A simulated guest kept busy through daemon restarts and hand-overs, and what its pauses say.

What tests/test_handover.py, scripts/bench_handover.py and scripts/bench_startup.py share:

    image, config = write_busy_disk(workdir, "bench", queues=2)    # a file disk, io_uring
    backend = await world.start_process(run_argv(world, config), name="backend-0")
    front = await start_busy_frontend(world, domid, devid, stop_file=workdir / "stop")
    ...                                                              # restarts, upgrades
    spanning(pauses, moment), covering(pauses, start, end)          # the workload's pauses
    print(workload_verdict(front.last_json(), rc))

The pauses are the workload's (sim/blkfront_workload.py): the guest's longest stretches with requests
in flight and none answered, {"start": wall clock, "seconds": ...}, longest first.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import trio

from ..xen.xenbus import XenbusState, parse_state
from ..xen.xenstore import read_or_none

BUSY_MIX = "write=45,read=45,flush=5,discard=5"


def write_busy_disk(workdir: Path, domain: str, *, queues: int = 2, size: int = 64 << 20) -> tuple[Path, Path]:
    """A sparse disk image and the one-disk configuration serving it (io_uring): (image, config)."""
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size)
    config = workdir / f"{domain}.yaml"
    config.write_text(f"domain: {{name: {domain}}}\ndisks:\n"
                      f"  - {{vdev: xvda, driver: io_uring, path: {image}, queues: {queues}}}\n")
    return image, config


def run_argv(world, config: Path, *extra: str, tree: str | None = None) -> list[str]:
    """`xenblk-vhost run` on the world's xenstore and hypervisor, its stderr in its stdout (the World
    reads both as lines). tree: an older checkout whose package is imported instead (PYTHONPATH comes
    before the venv's editable finder, and the world's directory, not a checkout, is the working one)."""
    argv = [sys.executable, "-m", "xenblk_vhost", "run", str(config),
            "--xenstore", world.xenstore_path, "--sim", world.hypervisor_path, *extra]
    env = ["env", f"PYTHONPATH={tree}"] if tree else []
    return ["sh", "-c", 'cd "$1" && shift && exec "$@" 2>&1', "sh", str(world.workdir), *env, *argv]


async def start_busy_frontend(world, vbd, *, stop_file: Path, depth: int = 16, mix: str = BUSY_MIX,
                              timeout: float = 60.0):
    """The guest's verifying workload on vbd (the toolstack's VbdPaths), running until stop_file
    exists (however long the events it must span take on a loaded machine); returned once the
    frontend is Connected, i.e. its workload under way. A fixed sleep was not enough: at load 14 the
    frontend's own start-up (an interpreter, its imports) outlasted it, and a benchmark's first restart
    came before the guest's first request, so nothing measured it."""
    front = await world.start_frontend(vbd.domid, vbd.devid, requests=10**9, depth=depth, stop_file=str(stop_file),
                                       mix=mix)
    state = f"{vbd.frontend}/state"
    with trio.fail_after(timeout):
        async with world.xs.watch(state) as events:
            async for _ in events:
                if parse_state(await read_or_none(world.xs, state)) == XenbusState.CONNECTED:
                    return front
            raise AssertionError("unreachable: a watch ends only when closed")


async def wait_exited(pid: int, timeout: float = 60.0) -> None:
    """Until pid is gone or a zombie (a daemon this process did not start: a hand-over's successor)."""
    with trio.fail_after(timeout):
        while True:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        return
            except (FileNotFoundError, ProcessLookupError):
                return
            await trio.sleep(0.01)


async def terminate(pid: int, timeout: float = 60.0) -> None:
    """SIGTERM pid (if it is still there) and wait_exited."""
    try:
        os.kill(pid, 15)
    except ProcessLookupError:
        return
    await wait_exited(pid, timeout)


def spanning(pauses: list[dict], moment: float, slack: float = 0.001) -> list[dict]:
    """The pauses under way at `moment` (its end within `slack`), longest first."""
    return [p for p in pauses if p["start"] <= moment <= p["start"] + p["seconds"] + slack]


def covering(pauses: list[dict], start: float, end: float) -> list[dict]:
    """The pauses that cover all of [start, end]: nothing was answered in it."""
    return [p for p in pauses if p["start"] <= start and p["start"] + p["seconds"] >= end]


def overlapping(pauses: list[dict], start: float, end: float) -> list[dict]:
    """The pauses with any part in [start, end]."""
    return [p for p in pauses if p["start"] <= end and p["start"] + p["seconds"] >= start]


def workload_verdict(result: dict, rc: int | None) -> str:
    """One line: what the workload did and whether the guest saw anything wrong."""
    w = result.get("workload", {})
    return (f"workload: {w.get('requests')} requests, ok={result.get('ok')}, "
            f"mismatches={len(w.get('mismatches', []))}, errors={w.get('errors')}, "
            f"frontend errors={result.get('front', {}).get('errors')}, exit {rc}")


__all__ = ["BUSY_MIX", "covering", "overlapping", "run_argv", "spanning", "start_busy_frontend", "terminate",
           "wait_exited", "workload_verdict", "write_busy_disk"]
