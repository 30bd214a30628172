#!/usr/bin/env python3
"""4 KiB random reads at QD32 through xenblk_vhost.storage; prints kIOPS and us/IO.

Targets:
  file   io_uring on a page-cached file (created under --dir, warmed first)
  null   virtio-blk-vhost-user to a qemu-storage-daemon null-co export
         (started here, stopped at the end)

Modes (all one queue, one thread, 32 x 4 KiB buffers in one memory region):
  raw    the bare cffi calls (lib.blkioq_read + lib.blkioq_do_io, no decoding):
         the floor for any Python binding, for comparison
  batch  queue 32 reads, do_io(min=32, max=32), repeat          (Queue API)
  reap   keep 32 in flight: do_io(min=1, max=32), resubmit each (Queue API)
  trio   keep 32 in flight, await wait_io() on the completion fd (Queue API)

--calls compiled,abi runs each Queue-API mode twice: libblkio's calls through
the compiled wrappers (native/blkio_calls.c, the default) and through cffi's
ABI mode (Queue.select_calls), to measure what the wrappers save.

Runs are interleaved (every target x mode once, then again) and the median
of --reps is printed, so a noisy neighbour hurts every cell alike. Compare
ratios within one run rather than with numbers from another machine.

    .venv/bin/python scripts/bench_storage.py                 # ~2 x 4 x 3 x 2 s
    .venv/bin/python scripts/bench_storage.py --seconds 1 --reps 1 --targets file
    .venv/bin/python scripts/bench_storage.py --modes batch,trio --calls compiled,abi
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from benchkit.targets import LABELS, open_targets  # noqa: E402

from xenblk_vhost.storage import StorageDevice  # noqa: E402
from xenblk_vhost.storage.cdef import ffi, lib  # noqa: E402

BS = 4096
QD = 32
NOFFS = 1 << 16  # precomputed random offsets, cycled


def bench_raw(q, offs, addrs, seconds):
    read, do_io, qq, comps, null = lib.blkioq_read, lib.blkioq_do_io, q._q, q._completions, ffi.NULL
    n = k = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for i in range(QD):
            read(qq, offs[k], addrs[i], BS, i, 0)
            k = (k + 1) & (NOFFS - 1)
        n += do_io(qq, comps, QD, QD, null)
        if time.perf_counter() >= end:
            return n, time.perf_counter() - t0


def bench_batch(q, offs, addrs, seconds):
    read, do_io = q.read, q.do_io
    n = k = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for i in range(QD):
            read(offs[k], addrs[i], BS, i)
            k = (k + 1) & (NOFFS - 1)
        for _tag, ret in do_io(QD, QD):
            if ret:
                raise RuntimeError(f"read failed: {ret}")
        n += QD
        if time.perf_counter() >= end:
            return n, time.perf_counter() - t0


def bench_reap(q, offs, addrs, seconds):
    read, do_io = q.read, q.do_io
    for i in range(QD):
        read(offs[i], addrs[i], BS, i)
    n, k = 0, QD
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        batch = do_io(1, QD)
        for tag, ret in batch:
            if ret:
                raise RuntimeError(f"read failed: {ret}")
            read(offs[k], addrs[tag], BS, tag)
            k = (k + 1) & (NOFFS - 1)
        n += len(batch)
        if time.perf_counter() >= end:
            dt = time.perf_counter() - t0
            do_io(QD, QD)  # drain what is still in flight
            return n, dt


def bench_trio(q, offs, addrs, seconds):
    async def main():
        read, wait_io = q.read, q.wait_io
        for i in range(QD):
            read(offs[i], addrs[i], BS, i)
        n, k = 0, QD
        t0 = time.perf_counter()
        end = t0 + seconds
        while True:
            batch = await wait_io(QD)
            for tag, ret in batch:
                if ret:
                    raise RuntimeError(f"read failed: {ret}")
                read(offs[k], addrs[tag], BS, tag)
                k = (k + 1) & (NOFFS - 1)
            n += len(batch)
            if time.perf_counter() >= end:
                dt = time.perf_counter() - t0
                left = QD
                while left:
                    left -= len(await wait_io(QD))
                return n, dt

    return trio.run(main)


def label(mode: str, flavour: str, calls: list[str]) -> str:
    """A column's name: the mode, and the calls' flavour when the run compares them."""
    return mode if mode == "raw" or len(calls) == 1 else f"{mode}/{flavour}"


MODES = {"raw": bench_raw, "batch": bench_batch, "reap": bench_reap, "trio": bench_trio}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0, help="per run (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions (median reported)")
    ap.add_argument("--size-mib", type=int, default=512, help="page-cached file size (default 512)")
    ap.add_argument("--dir", type=Path, default=None, help="where to put the file and qsd sockets")
    ap.add_argument("--targets", default="file,null")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--calls", default="compiled",
                    help="compiled,abi: the Queue-API modes with libblkio's calls compiled and through cffi's "
                         "ABI mode, in one run (default: compiled)")
    ap.add_argument("--yield-every", type=int, default=None,
                    help="Queue.yield_every for trio mode (default: the library's)")
    args = ap.parse_args(argv)
    targets = args.targets.split(",")
    modes = args.modes.split(",")
    calls = args.calls.split(",")
    if not calls or set(calls) - {"compiled", "abi"}:
        raise SystemExit(f"bench_storage.py: --calls takes compiled and/or abi, not {args.calls!r}")
    # raw is the bare ABI-mode calls whatever --calls says: once per rep
    cells = [(m, c) for m in modes for c in (["abi"] if m == "raw" else calls)]

    rnd = random.Random(1)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, \
            open_targets(targets, Path(tmp), file_size=args.size_mib << 20) as opened:
        devices = {}
        try:
            for name, t in opened.items():
                devices[name] = StorageDevice.open(t.driver, {"path": t.path})
            setups = {}
            for name, dev in devices.items():
                region = dev.alloc_mem_region(QD * BS)
                blocks = dev.capacity // BS
                offs = [rnd.randrange(blocks) * BS for _ in range(NOFFS)]
                if args.yield_every:
                    dev.queues[0].yield_every = args.yield_every
                setups[name] = (dev.queues[0], offs, [region.address(i * BS) for i in range(QD)])

            results: dict[tuple[str, str], list[float]] = {}
            for rep in range(args.reps):
                for name in targets:
                    opened[name].prepare()  # the VM may evict page cache between runs
                    for mode, flavour in cells:
                        q = setups[name][0]
                        if q.select_calls(compiled=flavour == "compiled") != (flavour == "compiled"):
                            raise SystemExit("bench_storage.py: the compiled calls cannot be built here")
                        n, dt = MODES[mode](*setups[name], args.seconds)
                        results.setdefault((name, label(mode, flavour, calls)), []).append(n / dt)
                        print(f"  rep {rep + 1} {name:4} {label(mode, flavour, calls):12} {n / dt / 1e3:7.0f} kIOPS",
                              file=sys.stderr)

            yield_every = next(iter(setups.values()))[0].yield_every if setups else "-"
            print(f"\n4 KiB random read, QD{QD}, 1 queue, median of {args.reps} x {args.seconds:g} s"
                  f" (trio: yield_every={yield_every}; load average before: {load_before})")
            names = [label(m, c, calls) for m, c in cells]
            print(f"{'target':40} " + " ".join(f"{n:>16}" for n in names))
            for name in targets:
                row = []
                for n in names:
                    iops = statistics.median(results[(name, n)])
                    row.append(f"{iops / 1e3:6.0f}k {1e6 / iops:5.2f}us")
                print(f"{LABELS[name]:40} " + " ".join(f"{c:>16}" for c in row))
        finally:
            for dev in devices.values():
                dev.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
