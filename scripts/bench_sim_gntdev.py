#!/usr/bin/env python3
"""Throughput of the simulated gntdev: grant copy in 32-page batches, and map/unmap.

    .venv/bin/python scripts/bench_sim_gntdev.py [--seconds 2] [--batch 32]

Starts its own simulated hypervisor process, a guest domain (in this
process: only the backend side is timed), grants `batch` pages, and times
SimGntdev.grant_copy of one batch (guest->local, as for a WRITE request;
local->guest, as for a READ), then map+unmap of one page and of `batch`
pages. Prints the median of several runs; figures move with machine load.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from xenblk_vhost.sim.gntdev import SimGntdev  # noqa: E402
from xenblk_vhost.sim.guest import Guest  # noqa: E402
from xenblk_vhost.sim.hypervisor import running_hypervisor  # noqa: E402
from xenblk_vhost.xen.interfaces import PAGE_SIZE, CopySegment  # noqa: E402


def timed(fn, seconds: float, runs: int = 5) -> tuple[float, float]:
    """Median (wall, CPU) seconds per call of fn over `runs` runs of about seconds/runs each.

    CPU time (this process only) is the steadier figure on a shared machine:
    it leaves out the time we wait for a core.
    """
    wall, cpu = [], []
    for _ in range(runs):
        n = 0
        start, cstart = time.perf_counter(), time.process_time()
        deadline = start + seconds / runs
        while True:
            for _ in range(20):
                fn()
            n += 20
            now = time.perf_counter()
            if now >= deadline:
                break
        wall.append((now - start) / n)
        cpu.append((time.process_time() - cstart) / n)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    ap.add_argument("--batch", type=int, default=32, help="pages per grant-copy batch")
    args = ap.parse_args()
    batch = args.batch

    with tempfile.TemporaryDirectory() as d, running_hypervisor(os.path.join(d, "xen.sock")) as _hv:
        sock = os.path.join(d, "xen.sock")
        guest = Guest.create(sock, pages=batch + 8, grant_frames=1)
        frames = guest.alloc_pages(batch)
        refs = [guest.grant_access(f, 0, False) for f in frames]
        gntdev = SimGntdev(sock)
        local = ctypes.create_string_buffer(batch * PAGE_SIZE)
        base = ctypes.addressof(local)
        read_in = [CopySegment(False, guest.domid, r, 0, base + i * PAGE_SIZE, PAGE_SIZE) for i, r in enumerate(refs)]
        write_out = [CopySegment(True, guest.domid, r, 0, base + i * PAGE_SIZE, PAGE_SIZE) for i, r in enumerate(refs)]
        assert gntdev.grant_copy(read_in) == [0] * batch and gntdev.grant_copy(write_out) == [0] * batch

        t_in = timed(lambda: gntdev.grant_copy(read_in), args.seconds)
        t_out = timed(lambda: gntdev.grant_copy(write_out), args.seconds)
        t_map1 = timed(lambda: gntdev.map_grants(guest.domid, refs[:1], readonly=False).close(), args.seconds)
        t_mapn = timed(lambda: gntdev.map_grants(guest.domid, refs, readonly=False).close(), args.seconds)

        print(f"simulated gntdev, {batch} x 4 KiB per batch, median of 5 runs "
              f"({os.cpu_count()} cpus, load {os.getloadavg()[0]:.2f})")
        print("                            wall us   cpu us   pages/s (cpu)   GB/s (cpu)")
        for name, (w, c) in (("grant copy guest->local", t_in), ("grant copy local->guest", t_out)):
            print(f"  {name}: {w * 1e6:8.1f} {c * 1e6:8.1f}   {batch / c:12.0f}   "
                  f"{batch * PAGE_SIZE / c / 1e9:8.2f}   per batch")
        print(f"  map+unmap 1 page:        {t_map1[0] * 1e6:8.1f} {t_map1[1] * 1e6:8.1f}")
        print(f"  map+unmap {batch} pages:      {t_mapn[0] * 1e6:8.1f} {t_mapn[1] * 1e6:8.1f}   "
              f"({t_mapn[1] / batch * 1e6:.1f} cpu us/page)")
        gntdev.close()
        guest.destroy()


if __name__ == "__main__":
    main()
