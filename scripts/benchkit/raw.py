"""The raw libblkio baseline: the workload straight on the storage, no Xen in between.

The same workload (size, pattern, queue depth per queue, one queue per
ring) on the same target through a libblkio instance of its own, driven
by loadgen.c's raw_run: one thread per queue, each keeping `qd` requests
in flight with blocking blkioq_do_io. What the storage itself delivers,
and the latency it adds, is the yardstick of the bridge's figures.
"""

from __future__ import annotations

import os

from .sim_cases import Timing, cpu_seconds
from .workloads import Workload


def run_raw(target, w: Workload, timing: Timing) -> dict:
    from _xenblk_bench import ffi, lib

    from xenblk_vhost.storage import StorageDevice
    from xenblk_vhost.storage.cdef import ffi as blkio_ffi

    target.prepare()
    dev = StorageDevice.open(target.driver, {"path": target.path}, w.rings, strict_queues=True)
    try:
        region = dev.alloc_mem_region(w.rings * w.qd * w.bs)
        queues = ffi.new("struct raw_queue[]", w.rings)
        for i, (c, q) in enumerate(zip(queues, dev.queues)):
            c.q = ffi.cast("void *", int(blkio_ffi.cast("uintptr_t", q._q)))
            c.buffers = ffi.cast("char *", region.address(i * w.qd * w.bs))
        spec = ffi.new("struct lg_workload *", {
            "qd": w.qd, "unit_sectors": w.bs // 512, "span_units": target.size // w.bs,
            "random": w.pattern == "rand", "write": w.op == "write", "warmup_s": timing.warmup,
            "seconds": timing.seconds, "seed": 1, "max_latency_samples": 1 << 22})
        out = ffi.new("struct lg_result *")
        storage0 = target.cpu_seconds()
        cpu0 = cpu_seconds()
        rc = lib.raw_run(spec, queues, w.rings, out)
        cpu = cpu_seconds() - cpu0
        storage = None if storage0 is None else target.cpu_seconds() - storage0
    finally:
        dev.close()
    if rc:
        raise RuntimeError(f"raw libblkio run failed: {os.strerror(-rc)}")
    total = max(out.total, 1)
    return {"iops": out.completed / out.seconds, "p50_us": out.p50_us, "p99_us": out.p99_us,
            "errors": out.errors, "cpu_us_per_io": 1e6 * cpu / total,
            "storage_cpu_us_per_io": None if storage is None else 1e6 * storage / total}
