#!/usr/bin/env python3
"""How fast is our xenstore client against the simulated xenstored?

    .venv/bin/python scripts/bench_xenstore.py [--quick]

Runs the simulated xenstored as its own process (as it would run beside the
backend) and prints request rates for: sequential reads (one round trip
each), reads from 32 concurrent tasks on one connection, 5-write
transactions, writes with a watch draining events, and -- for scale -- one
`xenstore-read` process per read. Figures only; nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import trio

from xenblk_vhost.xen.xenstore import open_xenstore


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:10.0f}/s  ({seconds / count * 1e6:8.1f} us each, n={count})"


async def bench(socket_path: str, scale: float) -> None:
    async with open_xenstore(socket_path) as xs:
        await xs.write("/bench/value", "x" * 64)

        n = int(2000 * scale)
        t0 = time.perf_counter()
        for _ in range(n):
            await xs.read("/bench/value")
        print("sequential read          ", rate(n, time.perf_counter() - t0))

        n, tasks = int(4000 * scale), 32

        async def reader(count):
            for _ in range(count):
                await xs.read("/bench/value")

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(reader, n // tasks)
        print(f"read, {tasks} tasks           ", rate(n, time.perf_counter() - t0))

        n = int(300 * scale)

        async def five_writes(t):
            for k in range(5):
                await t.write(f"/bench/tx/{k}", "1")

        t0 = time.perf_counter()
        for _ in range(n):
            await xs.transact(five_writes)
        print("transaction of 5 writes  ", rate(n, time.perf_counter() - t0))

        n = int(1000 * scale)
        async with xs.watch("/bench/w") as events:
            await events.__anext__()
            t0 = time.perf_counter()
            for i in range(n):
                await xs.write("/bench/w/node", str(i))
                await events.__anext__()
            print("write + its watch event  ", rate(n, time.perf_counter() - t0))

    env = dict(os.environ, XENSTORED_PATH=socket_path)
    n = int(50 * scale)
    t0 = time.perf_counter()
    for _ in range(n):
        await trio.run_process(["xenstore-read", "/bench/value"], env=env, capture_stdout=True)
    print("xenstore-read process    ", rate(n, time.perf_counter() - t0))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a fifth of the iterations")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "xs.sock")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "xenblk_vhost.sim.xenstored", "--socket", path], stderr=subprocess.PIPE
        )
        try:
            daemon.stderr.readline()  # the "listening" line: it is ready
            print(f"python {sys.version.split()[0]}, trio {trio.__version__}, daemon pid {daemon.pid}")
            trio.run(bench, path, 1.0 if not args.quick else 0.2)
        finally:
            daemon.terminate()
            daemon.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
