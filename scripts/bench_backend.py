#!/usr/bin/env python3
"""Throughput of the backend datapath on the simulated hypervisor.

    .venv/bin/python scripts/bench_backend.py                    # the default matrix
    .venv/bin/python scripts/bench_backend.py --targets file --paths copy --ops read --seconds 3
    .venv/bin/python scripts/bench_backend.py --profile --targets file --paths copy --ops read

Three processes: the simulated hypervisor (control only), the guest, and
this one, the backend (a Vbd serving the guest's ring). The guest is a
tight loop in its own process: it keeps `qd` 4 KiB requests at random
aligned sectors in flight on its ring with pre-granted pages, publishes them,
and waits on its event channel only when it has nothing to do, so its cost
does not land on the backend's CPU time.

Printed per case: IOPS (requests answered per wall-clock second), backend
us/request (the backend process's user+system CPU time per request: what
the datapath costs, independent of how busy the guest or the machine is),
and oo (times the ring had requests while every request slot was busy).

Targets: `file` is io_uring on a 256 MiB file in the page cache (warmed
before each run); `null` is qemu-storage-daemon's null-co over vhost-user
(copy path only: vhost-user cannot use grant mappings). Paths: copy, map,
map+persistent (file only). Rings: order 0 (32 slots) with QD 32, and
order 4 (512 slots) with QD 128.

With --profile, the backend runs under cProfile and the top functions by
own time are printed after each case (cProfile inflates small functions).
With --sample, a SIGPROF sampler (every 200 us of backend CPU) attributes
the backend's time to the innermost frame's source file (C calls count
for the Python line that made them): where the time goes, undistorted.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import random
import resource
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

BS = 4096
FILE_SIZE = 256 << 20


# ---------------------------------------------------------------- guest process

def guest_main(args) -> None:
    from xenblk_vhost.blkif.abi import Abi, layout
    from xenblk_vhost.blkif.constants import OP_READ, OP_WRITE
    from xenblk_vhost.blkif.ring import FrontRing
    from xenblk_vhost.sim.guest import Guest

    npages = 1 << args.order
    guest = Guest.create(args.socket, pages=npages + args.qd + 16, grant_frames=4)
    ring_frames = guest.alloc_pages(npages)
    assert ring_frames == list(range(ring_frames[0], ring_frames[0] + npages))
    ring_refs = [guest.grant_access(f, 0, readonly=False) for f in ring_frames]
    port = guest.alloc_unbound(0)
    view = guest.memory[ring_frames[0] * BS:(ring_frames[0] + npages) * BS]
    ring = FrontRing(view, Abi.NATIVE, args.order)
    writes = args.op == "write"
    data = guest.alloc_pages(args.qd)
    for f in data:
        guest.page(f)[:] = os.urandom(BS)
    # blkfront grants a write's pages read-only, unless they are persistent grants
    readonly = writes and not args.persistent
    grefs = [guest.grant_access(f, 0, readonly=readonly) for f in data]
    print(json.dumps({"domid": guest.domid, "ring_refs": ring_refs, "port": port.local_port}), flush=True)
    sys.stdin.readline()  # "go"

    lay = layout(Abi.NATIVE)
    pack_hdr = lay.rw_header.pack_into
    seg_off = lay.seg_offset
    import struct
    pack_seg = struct.Struct("<IBB2x").pack_into
    slot_offset = ring.slot_offset
    op = OP_WRITE if writes else OP_READ
    nblocks = args.blocks
    rand = random.Random(1).randrange
    free_ids = list(range(args.qd))
    fd = port.fileno()
    done = 0
    started = time.monotonic()
    end = started + args.seconds
    vbuf = ring.view
    while True:
        while free_ids and ring.free_requests():
            i = free_ids.pop()
            off = slot_offset(ring.req_prod_pvt)
            ring.req_prod_pvt = (ring.req_prod_pvt + 1) & 0xFFFFFFFF
            pack_hdr(vbuf, off, op, 1, 0, i, rand(nblocks) * 8)
            pack_seg(vbuf, off + seg_off, grefs[i], 0, 7)
        if ring.push_requests():
            port.notify()
        rsps = ring.take_responses(ring.size)
        for r in rsps:
            if r.status:
                raise SystemExit(f"request {r.id} failed with {r.status}")
            free_ids.append(r.id)
        done += len(rsps)
        if time.monotonic() >= end:
            break
        if not rsps and not ring.final_check_for_responses():
            if select.select([fd], [], [], 1.0)[0]:
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
    elapsed = time.monotonic() - started
    # let what is in flight finish, so the backend disconnects cleanly
    inflight = args.qd - len(free_ids)
    deadline = time.monotonic() + 10
    while inflight and time.monotonic() < deadline:
        got = ring.take_responses(ring.size)
        inflight -= len(got)
        if not got and not ring.final_check_for_responses():
            select.select([fd], [], [], 0.1)
    print(json.dumps({"done": done, "seconds": elapsed}), flush=True)
    sys.stdin.readline()  # wait until the backend let go of our pages
    view.release()
    guest.destroy()


# ---------------------------------------------------------------- backend side

def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


async def _read_line(fd: int) -> str:
    """One line from the guest, awaited in trio (no thread)."""
    import trio

    stream = trio.lowlevel.FdStream(os.dup(fd))
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            chunk = await stream.receive_some(4096)
            if not chunk:
                raise EOFError("guest exited")
            buf += chunk
    finally:
        await stream.aclose()
    return buf.decode()


class Sampler:
    """Counts, every 200 us of CPU, the source file of the innermost Python frame."""

    def __init__(self) -> None:
        import collections

        self.counts = collections.Counter()

    def _tick(self, _sig, frame) -> None:
        name = frame.f_code.co_filename
        self.counts[os.path.relpath(name, ROOT) if name.startswith(str(ROOT)) else os.path.basename(name)] += 1

    def start(self) -> None:
        import signal

        signal.signal(signal.SIGPROF, self._tick)
        signal.setitimer(signal.ITIMER_PROF, 0.0002, 0.0002)

    def stop(self) -> None:
        import signal

        signal.setitimer(signal.ITIMER_PROF, 0, 0)

    def report(self) -> None:
        total = sum(self.counts.values()) or 1
        print(f"  {total} samples, by innermost source file:")
        for name, n in self.counts.most_common(16):
            print(f"  {100 * n / total:5.1f}%  {name}")


def run_case(hv_socket: str, target: dict, data_path: str, persistent: bool, op: str, order: int, qd: int,
             seconds: float, profile: bool, sample: bool = False) -> dict:
    import trio

    from xenblk_vhost.backend.contract import ConnectionSpec, RingSpec
    from xenblk_vhost.backend.datapath.vbd import Vbd
    from xenblk_vhost.blkif.abi import Abi
    from xenblk_vhost.config import DiskConfig
    from xenblk_vhost.sim import open_sim

    disk = DiskConfig(vdev=51712, driver=target["driver"], path=target["path"], queues=1, ring_page_order=4,
                      data_path=data_path, persistent_grants=persistent, max_inflight=512, memory=64 << 20)
    vbd = Vbd.open(disk)
    platform = open_sim(hv_socket)
    guest = subprocess.Popen(
        [sys.executable, __file__, "--guest-role", "--socket", hv_socket, "--order", str(order), "--qd", str(qd),
         "--op", op, "--seconds", str(seconds), "--blocks", str(target["size"] // BS)]
        + (["--persistent"] if persistent else []),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    result: dict = {}
    try:
        hello = json.loads(guest.stdout.readline())
        spec = ConnectionSpec(hello["domid"], Abi.NATIVE, persistent,
                              (RingSpec(0, tuple(hello["ring_refs"]), hello["port"]),))
        prof = cProfile.Profile() if profile else None
        sampler = Sampler() if sample else None

        async def main():
            async with trio.open_nursery() as n:
                await n.start(vbd.serve, spec, platform)
                cpu0 = _cpu()
                guest.stdin.write("go\n")
                guest.stdin.flush()
                if prof:
                    prof.enable()
                if sampler:
                    sampler.start()
                line = await _read_line(guest.stdout.fileno())
                if sampler:
                    sampler.stop()
                if prof:
                    prof.disable()
                result["cpu"] = _cpu() - cpu0
                result.update(json.loads(line))
                await vbd.disconnect()

        trio.run(main)
        stats = vbd.stats()["total"]
        n = result["done"]
        result.update(iops=n / result["seconds"], us_per_req=1e6 * result["cpu"] / max(n, 1),
                      requests=stats["rd_req"] + stats["wr_req"], errors=stats["errors"], oo=stats["oo_req"])
        guest.stdin.write("bye\n")
        guest.stdin.flush()
        guest.wait(30)
        if prof:
            pstats.Stats(prof).sort_stats("tottime").print_stats(22)
        if sampler:
            sampler.report()
    finally:
        if guest.poll() is None:
            guest.kill()
            guest.wait()
        platform.close()
        vbd.close()
    return result


def warm(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 20):
            pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--guest-role", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--socket")
    p.add_argument("--order", type=int, default=0)
    p.add_argument("--qd", type=int, default=32)
    p.add_argument("--op", default="read")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--blocks", type=int, default=FILE_SIZE // BS)
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--targets", default="file,null")
    p.add_argument("--paths", default="copy,map,map+persistent")
    p.add_argument("--ops", default="read,write")
    p.add_argument("--rings", default="0:32,4:128", help="order:qd pairs")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--sample", action="store_true", help="SIGPROF sampling of the backend, by source file")
    p.add_argument("--gc-threshold", type=int, default=0, help="gc.set_threshold(N) in the backend (0: leave as is)")
    args = p.parse_args()
    if args.guest_role:
        guest_main(args)
        return
    if args.gc_threshold:
        import gc

        gc.set_threshold(args.gc_threshold)

    from storage_support.qsd import StorageDaemon
    from xenblk_vhost.sim.hypervisor import running_hypervisor

    with tempfile.TemporaryDirectory(prefix="bench-backend-") as tmp:
        tmp = Path(tmp)
        sock = str(tmp / "xen.sock")
        targets = {}
        daemon = None
        if "file" in args.targets:
            img = tmp / "disk.img"
            with open(img, "wb") as f:
                for _ in range(FILE_SIZE >> 20):
                    f.write(os.urandom(1 << 20))
            targets["file"] = {"driver": "io_uring", "path": str(img), "size": FILE_SIZE}
        if "null" in args.targets:
            daemon = StorageDaemon(tmp / "qsd")
            export = daemon.add_null_export("null", size=1 << 30, num_queues=1)
            daemon.start()
            targets["null"] = {"driver": "virtio-blk-vhost-user", "path": str(export.socket), "size": 1 << 30}
        try:
            with running_hypervisor(sock):
                print(f"{'target':6} {'path':15} {'op':5} {'ring':9} {'IOPS':>9} {'us/req':>7} {'oo':>5}")
                for tname, target in targets.items():
                    for path in args.paths.split(","):
                        data_path, persistent = ("map", True) if path == "map+persistent" else (path, False)
                        if tname == "null" and data_path == "map":
                            continue
                        for op in args.ops.split(","):
                            for pair in args.rings.split(","):
                                order, qd = (int(x) for x in pair.split(":"))
                                if tname == "file":
                                    warm(target["path"])
                                r = run_case(sock, target, data_path, persistent, op, order, qd, args.seconds,
                                             args.profile, args.sample)
                                assert r["errors"] == 0, r
                                print(f"{tname:6} {path:15} {op:5} o{order}/qd{qd:<4} {r['iops']:9.0f} "
                                      f"{r['us_per_req']:7.2f} {r['oo']:5d}", flush=True)
        finally:
            if daemon is not None:
                daemon.stop()


if __name__ == "__main__":
    main()
