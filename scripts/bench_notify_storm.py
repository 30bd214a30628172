#!/usr/bin/env python3
"""What a guest that only notifies costs the backend, with the spurious wake-up backoff off and on.

    .venv/bin/python scripts/bench_notify_storm.py [--seconds 3] [--requests 2000]

One run, on the simulated hypervisor (its own process), two guests, each
with its own disk (io_uring on a page-cached file, copy path) served by a
Vbd in this process:

  storm   guest A's event channel is kicked non-stop by a separate process
          (a tight eventfd_write loop on the channel's fd: what a hostile
          frontend's EVTCHNOP_send loop does), nothing on its ring;
  QD1     guest B, well behaved, reads 4 KiB at queue depth 1.

For each mode (backoff "off": no pause ever, the behaviour before
notify_backoff.py; "on": as shipped) it prints:
  idle_pct     this process's CPU over --seconds right after B's QD1 reads,
               both guests connected and silent, in % of a core: what an idle
               backend burns (~0: nothing may poll or spin while idle)
  cpu_pct      this process's CPU (backend, both rings; the storm's process
               excluded) over --seconds of storm with B idle, in % of a core
  wakeups_s    ring A's spurious wake-ups per second over that window
  b_p50/p99    guest B's read latency (us) without the storm, then during it
  a_p50/p99    guest A's own reads during its storm (us): what the
               storming guest pays (at most one pause, MAX_DELAY)
Machine load (loadavg) is printed at the start and the end: compare the two
modes within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the test frontend lives with the tests

from backend_support.frontend import TestFrontend  # noqa: E402
from xenblk_vhost.backend.datapath import notify_backoff  # noqa: E402
from xenblk_vhost.backend.datapath.vbd import Vbd  # noqa: E402
from xenblk_vhost.blkif.constants import OP_READ, RSP_OKAY  # noqa: E402
from xenblk_vhost.config import DiskConfig  # noqa: E402
from xenblk_vhost.sim import open_sim  # noqa: E402
from xenblk_vhost.sim.guest import Guest  # noqa: E402
from xenblk_vhost.sim.hypervisor import running_hypervisor  # noqa: E402

DISK = 16 << 20
STORM = """
import os, sys
fd = int(sys.argv[1])
while True:
    try:
        os.eventfd_write(fd, 1)
    except BlockingIOError:
        pass
    except OSError:
        break
"""


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


async def qd1(front: TestFrontend, page, n: int) -> list[float]:
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        front.rw(0, OP_READ, i & 0xFFFF, (i * 8) % (DISK // 512 - 8), [(page.gref, 0, 7)])
        front.push()
        [rsp] = await front.responses(0, 1)
        out.append(time.perf_counter() - t0)
        assert rsp.status == RSP_OKAY
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] * 1e6


async def one_mode(platform, guests, disks, args) -> dict:
    vbds = [Vbd.open(DiskConfig(vdev=51712, path=str(d), driver="io_uring", queues=1, memory=4 << 20))
            for d in disks]
    fronts = [TestFrontend(g) for g in guests]
    pages = [f.data_page(readonly=False) for f in fronts]
    result: dict = {}
    try:
        async with trio.open_nursery() as n:
            for vbd, front in zip(vbds, fronts):
                await n.start(vbd.serve, front.spec(), platform)
            await qd1(fronts[1], pages[1], 200)  # warm-up
            quiet = await qd1(fronts[1], pages[1], args.requests)
            # Both guests connected, nothing asked: what the backend burns doing nothing (any
            # polling after a burst must stop and sleep, never spin while idle).
            c0, w0 = time.process_time(), time.perf_counter()
            await trio.sleep(args.seconds)
            idle = 100 * (time.process_time() - c0) / (time.perf_counter() - w0)
            kick_fd = fronts[0].rings[0].port.kick_fileno()
            storm = subprocess.Popen([sys.executable, "-c", STORM, str(kick_fd)], pass_fds=[kick_fd])
            try:
                await trio.sleep(0.5)  # the backoff (if any) reaches its steady pause
                s0 = vbds[0].stats()["total"]["spurious_wakeups"]
                c0, w0 = time.process_time(), time.perf_counter()
                await trio.sleep(args.seconds)
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                s1 = vbds[0].stats()["total"]["spurious_wakeups"]
                stormy = await qd1(fronts[1], pages[1], args.requests)
                own = await qd1(fronts[0], pages[0], max(20, args.requests // 20))
            finally:
                storm.kill()
                storm.wait()
            result = {
                "idle_pct": idle, "cpu_pct": 100 * cpu / wall, "wakeups_s": (s1 - s0) / wall,
                "b_quiet": (pct(quiet, 0.5), pct(quiet, 0.99)),
                "b_storm": (pct(stormy, 0.5), pct(stormy, 0.99)),
                "a_own": (pct(own, 0.5), pct(own, 0.99)),
                "b_mean_ratio": statistics.mean(stormy) / statistics.mean(quiet),
            }
            for vbd in vbds:
                await vbd.disconnect()
    finally:
        for f in fronts:
            f.close()
        for vbd in vbds:
            vbd.close()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="storm window measured for CPU")
    ap.add_argument("--requests", type=int, default=2000, help="QD1 reads per latency figure")
    args = ap.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, loadavg {loadavg()} at start; "
          f"backoff: first pause {notify_backoff.FIRST_DELAY * 1e3:g} ms, max {notify_backoff.MAX_DELAY * 1e3:g} ms")
    shipped = notify_backoff.MAX_DELAY
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        disks = []
        for name in ("a.img", "b.img"):
            p = Path(tmp) / name
            p.write_bytes(os.urandom(DISK))
            disks.append(p)
        sock = str(Path(tmp) / "xen.sock")
        with running_hypervisor(sock):
            platform = open_sim(sock)
            guests = [Guest.create(sock, pages=256) for _ in range(2)]
            try:
                for mode in ("off", "on"):
                    notify_backoff.MAX_DELAY = 0.0 if mode == "off" else shipped
                    rows.append((mode, trio.run(one_mode, platform, guests, disks, args)))
            finally:
                notify_backoff.MAX_DELAY = shipped
                for g in guests:
                    g.close()
                platform.close()
    print(f"{'backoff':8} {'idle_pct':>8} {'cpu_pct':>8} {'wakeups_s':>10} {'B p50/p99 quiet us':>19} "
          f"{'B p50/p99 storm us':>19} {'B mean storm/quiet':>19} {'A own p50/p99 us':>17}")
    for mode, r in rows:
        print(f"{mode:8} {r['idle_pct']:8.1f} {r['cpu_pct']:8.1f} {r['wakeups_s']:10.0f} "
              f"{r['b_quiet'][0]:9.0f}/{r['b_quiet'][1]:<9.0f} {r['b_storm'][0]:9.0f}/{r['b_storm'][1]:<9.0f} "
              f"{r['b_mean_ratio']:19.2f} {r['a_own'][0]:8.0f}/{r['a_own'][1]:<8.0f}")
    print(f"loadavg {loadavg()} at end")


if __name__ == "__main__":
    main()
