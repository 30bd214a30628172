"""The demo's guest: `python -m xenblk_vhost.demo.guest`.

A guest kernel's part, in its own process: attach to a simulated domain,
connect the reference frontend (it behaves like Linux xen-blkfront) to one
vbd, run the demo workload, and tell the demo what happens, one JSON
object per stdout line:

    {"event": "connected", "negotiated": {...}, "disk": {...}, "sectors": N}
    {"event": "progress", "report": {...}}         every --progress-interval seconds
    {"event": "finished", "report": {...}}         the workload is over (device still connected)
    {"event": "closed", "frontend_errors": [...]}  the device is closed, every grant taken back
    {"event": "failed", "error": "..."}            could not run

After "finished" it waits for a line `close` on stdin (or the end of
stdin) before closing the device, so that the demo can read the backend's
counters while the rings are still there. SIGTERM or SIGINT stops the
workload early (requests in flight are finished, the final read-back is
skipped) and the device is closed as usual.

Exit status: 0 all verified, 1 a mismatch or an I/O or protocol error,
2 it could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

import trio

from ..sim.blkfront import open_blkfront
from ..sim.blkfront_config import BlkfrontOptions
from ..sim.guest import Guest
from ..sim.xenstore_guest import open_guest_xenstore
from .workload import DemoWorkload, run_demo_workload

CLOSE_WAIT = 60.0  # seconds to wait for `close` before closing anyway


def emit(event: str, **fields) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xenblk_vhost.demo.guest",
                                description="the demo's guest: reference frontend + verifying workload")
    p.add_argument("--hypervisor", required=True)
    p.add_argument("--xenstore", required=True)
    p.add_argument("--domid", type=int, required=True)
    p.add_argument("--devid", type=int, default=51712)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--at-rest-sectors", type=int, default=DemoWorkload.at_rest_sectors)
    p.add_argument("--zeroed", action="store_true", help="the disk is fresh: never-written sectors read as zeros")
    p.add_argument("--progress-interval", type=float, default=0.5)
    p.add_argument("--max-queues", type=int, default=4)
    p.add_argument("--max-ring-page-order", type=int, default=0)
    p.add_argument("--max-indirect-segments", type=int, default=32)
    p.add_argument("--no-persistent", action="store_true")
    return p


async def _wait_for_close() -> None:
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    async with stdin:
        buf = b""
        with trio.move_on_after(CLOSE_WAIT):
            while b"close" not in buf:
                chunk = await stdin.receive_some(64)
                if not chunk:
                    return
                buf += chunk


async def run(args: argparse.Namespace) -> int:
    options = BlkfrontOptions(max_queues=args.max_queues, max_ring_page_order=args.max_ring_page_order,
                              max_indirect_segments=args.max_indirect_segments,
                              feature_persistent=not args.no_persistent)
    workload = DemoWorkload(seconds=args.seconds, depth=args.depth, seed=args.seed,
                            at_rest_sectors=args.at_rest_sectors, progress_interval=args.progress_interval,
                            zeroed=args.zeroed)
    stop = trio.Event()
    report = errors = None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def on_signals() -> None:
                async for _ in signals:
                    stop.set()
                    if report is None and not connected.is_set():
                        nursery.cancel_scope.cancel()  # nothing to finish before the device is up

            connected = trio.Event()
            nursery.start_soon(on_signals)
            guest = Guest.attach(args.hypervisor, args.domid)
            try:
                async with open_guest_xenstore(args.domid, args.xenstore) as xs:
                    async with open_blkfront(xs, guest, args.devid, options) as front:
                        connected.set()
                        assert front.negotiated is not None  # open_blkfront returns it connected
                        emit("connected", negotiated=front.negotiated.as_dict(), disk=vars(front.disk),
                             sectors=front.sectors)
                        report = await run_demo_workload(
                            front, workload, stop=stop,
                            on_progress=lambda r: emit("progress", report=r.as_dict()))
                        emit("finished", report=report.as_dict())
                        await _wait_for_close()
                    errors = front.report()["errors"]
                emit("closed", frontend_errors=errors)
            finally:
                guest.close()
            nursery.cancel_scope.cancel()
    if report is None:
        emit("failed", error="stopped before the device connected")
        return 2
    return 0 if report.ok and not errors else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return trio.run(run, args)
    except Exception as exc:  # report, do not just die: the demo reads stdout
        emit("failed", error=f"{type(exc).__name__}: {exc}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
