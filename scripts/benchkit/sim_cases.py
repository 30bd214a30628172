"""One run of a workload on the simulated hypervisor: the bridge, or the null responder.

Three processes: the simulated hypervisor (control only, started by the
caller), the guest (guest.py: the compiled load generator) and this one,
the backend side. What the backend side costs is this process's CPU time
(getrusage) over the requests it served, so nothing the guest does counts.

    run_bridge(...)  xenblk-vhost's Vbd (the real datapath: intake, data
                     path, libblkio, responses) serves the guest's rings,
                     in trio, in this process
    run_null(...)    loadgen.c's null responder serves them instead (one C
                     thread, answers OKAY without I/O): the load
                     generator's ceiling for that workload

Measurement hooks, all outside the datapath and only here:
  * a Sampler (profile.py) through the measured run: the share of the
    backend's CPU spent in the simulated hypervisor's grant copy (which
    runs in this process, where real Xen does it in a hypercall: reported
    apart), and with --profile where the rest goes;
  * CountingEvtchn counts the backend's wake-ups on its event channels
    and the notifications it sends; CountingQueue its completion-fd reaps.
Their cost is per sample, per wake-up or per batch, never per request
(bench.py --no-hooks leaves them all out, to measure that).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import trio

from .profile import SIM_COPY
from .workloads import DIRECT_SEGMENTS, Workload, parse_path, ring_slots

GUEST_SCRIPT = Path(__file__).resolve().with_name("guest.py")


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


@dataclass(frozen=True)
class Timing:
    warmup: float   # seconds run before measuring
    seconds: float  # seconds measured


# ---------------------------------------------------------------- the guest process

class GuestProcess:
    """guest.py for one workload; see its docstring for the line protocol."""

    def __init__(self, hv_socket: str, w: Workload, *, parts: int, persistent: bool, span_bytes: int,
                 timing: Timing, fill: bool = False):
        spec = {"op": w.op, "pattern": w.pattern, "bs": w.bs, "qd": w.qd, "order": w.order, "rings": w.rings,
                "parts": parts, "persistent": persistent, "span_bytes": span_bytes, "warmup": timing.warmup,
                "seconds": timing.seconds, "fill": fill}
        self.proc = subprocess.Popen([sys.executable, str(GUEST_SCRIPT), "--socket", hv_socket,
                                      "--spec", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.hello = self._line("set-up")

    def _line(self, what: str) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(10)
            raise RuntimeError(f"the benchmark guest exited (status {self.proc.returncode}) before its {what} line")
        return json.loads(line)

    def send(self, word: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        r = self._line("result")
        if r["rc"]:
            raise RuntimeError(f"the load generator failed: {os.strerror(-r['rc'])} ({r})")
        if r["bad_responses"]:
            raise RuntimeError(f"{r['bad_responses']} responses carried ids never sent")
        return r

    async def result_async(self) -> dict:
        """result(), awaited in trio (no thread): the backend keeps running meanwhile."""
        stream = trio.lowlevel.FdStream(os.dup(self.proc.stdout.fileno()))
        buf = b""
        try:
            while not buf.endswith(b"\n"):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    raise RuntimeError("the benchmark guest exited before its result line")
                buf += chunk
        finally:
            await stream.aclose()
        r = json.loads(buf)
        if r["rc"]:
            raise RuntimeError(f"the load generator failed: {os.strerror(-r['rc'])} ({r})")
        return r

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send("bye")
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# ---------------------------------------------------------------- measurement hooks

class _Wrapper:
    """Delegates what it does not define to the wrapped object; methods are looked up once
    (bound into the instance), so the datapath's calls through it cost nothing extra."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        value = getattr(self._inner, name)
        if callable(value):
            setattr(self, name, value)  # (values, such as properties, are read afresh each time)
        return value


class CountingPort(_Wrapper):
    """An EventChannel that counts wake-ups (wait() returning) and notify() calls."""

    def __init__(self, inner, counts: dict):
        super().__init__(inner)
        self._counts = counts

    async def wait(self) -> None:
        await self._inner.wait()
        self._counts["wakeups"] += 1

    def notify(self) -> None:
        self._counts["notifies"] += 1
        self._inner.notify()


class CountingQueue(_Wrapper):
    """A storage Queue whose wait_io() counts its returns (completion-fd wake-ups) and completions."""

    def __init__(self, inner, counts: dict):
        super().__init__(inner)
        self._counts = counts

    async def wait_io(self, *args, **kwargs):
        done = await self._inner.wait_io(*args, **kwargs)
        self._counts["reaps"] += 1
        self._counts["reaped"] += done if type(done) is int else len(done)  # (count=True: how many)
        return done


class CountingEvtchn(_Wrapper):
    def __init__(self, inner, counts: dict):
        super().__init__(inner)
        self.counts = counts

    def bind_interdomain(self, domid: int, remote_port: int):
        return CountingPort(self._inner.bind_interdomain(domid, remote_port), self.counts)


# ---------------------------------------------------------------- the bridge

def requests_per_io(w: Workload, max_indirect_segments: int) -> int:
    """How many requests a frontend makes of one I/O, given the backend's segment limit.

    The fewest equal parts (a power of two) that each fit: blkfront's own
    split is uneven (126 + 126 + 4), equal parts keep every request alike.
    """
    limit = max(max_indirect_segments, DIRECT_SEGMENTS)
    parts = 1
    while w.pages // parts > limit:
        parts *= 2
    if w.qd * parts > ring_slots(w.order):
        raise ValueError(f"{w.name}: {parts} requests per I/O at QD {w.qd} do not fit an order-{w.order} ring")
    return parts


def run_bridge(hv_socket: str, target, w: Workload, path: str, timing: Timing, *, sampler=None,
               hooks: bool = True, fill: bool = False, journal_dir=None, ring_workers: str = "inline",
               probe=None) -> dict:
    """xenblk-vhost serving the workload; figures from both ends.

    sampler: a profile.Sampler to run through the measured run (the sim
    copy's share comes from it); hooks=False: no wake-up counters either;
    fill: the guest's data pages carry guest.fill_byte(page) (for tests);
    journal_dir: keep the rings' in-flight journals there (scripts/bench_journal.py).
    ring_workers: "process": each ring in a worker process of its own (process_vbd.py); the
    backend's CPU is then this process's plus the workers' (/proc), and neither the sampler nor
    the wake-up counters (they hook this process's objects) apply.
    probe: called with the ring workers' pids ([] inline) once the workload is done, before the
    disconnect, while every ring's memory is still held (scripts/bench_memory.py); its result is
    returned as "probe".
    """
    from benchkit.targets import process_cpu_seconds
    from xenblk_vhost.backend.contract import ConnectionSpec, RingSpec
    from xenblk_vhost.backend.datapath.vbd import Vbd
    from xenblk_vhost.blkif.abi import Abi
    from xenblk_vhost.config import DiskConfig
    from xenblk_vhost.sim import open_sim
    from xenblk_vhost.xen import HypervisorDevices

    data_path, persistent = parse_path(path)
    # What an operator gets by default, but for the ring shape and data path under test.
    disk = DiskConfig(vdev=51712, driver=target.driver, path=target.path, queues=w.rings, ring_page_order=4,
                      data_path=data_path, persistent_grants=persistent, ring_workers=ring_workers)
    in_workers = ring_workers == "process"
    if in_workers:
        sampler, hooks = None, False
    target.prepare()
    vbd = Vbd.open(disk, journal_dir=journal_dir)
    parts = requests_per_io(w, vbd.features.max_indirect_segments)
    sim = open_sim(hv_socket)
    counts = {"wakeups": 0, "notifies": 0, "reaps": 0, "reaped": 0}
    if hooks:
        vbd.storage.queues[:] = [CountingQueue(q, counts) for q in vbd.storage.queues]
        platform = HypervisorDevices(gntdev=sim.gntdev, evtchn=CountingEvtchn(sim.evtchn, counts))
    else:
        platform = sim
    guest = None
    got: dict = {}
    try:
        guest = GuestProcess(hv_socket, w, parts=parts, persistent=persistent, span_bytes=target.size,
                             timing=timing, fill=fill)
        spec = ConnectionSpec(guest.hello["domid"], Abi.NATIVE, persistent, tuple(
            RingSpec(i, tuple(r["ring_refs"]), r["port"]) for i, r in enumerate(guest.hello["rings"])))

        async def main():
            async with trio.open_nursery() as nursery:
                await nursery.start(vbd.serve, spec, platform)
                storage0 = target.cpu_seconds()
                pids = vbd.worker_pids() if in_workers else []

                def backend_cpu() -> float:
                    return cpu_seconds() + sum(process_cpu_seconds(pid) for pid in pids)

                cpu0 = backend_cpu()
                engine0 = _engine_counts(vbd)
                guest.send("go")
                with sampler or nullcontext():
                    got["guest"] = await guest.result_async()
                got["cpu"] = backend_cpu() - cpu0
                engine1 = _engine_counts(vbd)
                got["engine_notifies"] = engine1[0] - engine0[0]
                got["engine_copy"] = engine1[1] - engine0[1]
                got["storage_cpu"] = None if storage0 is None else target.cpu_seconds() - storage0
                got["served"] = _served(vbd)
                if probe is not None:
                    got["probe"] = probe(pids)
                await vbd.disconnect()
                if in_workers:  # their counters arrive every 0.25 s, and last when they stop
                    got["served"] = _served(vbd)

        trio.run(main)
        stats = vbd.stats()["total"]
    finally:
        if guest is not None:
            guest.close()
        platform.close()
        vbd.close()
    g = got["guest"]
    if g["errors"] or stats["errors"]:
        raise RuntimeError(f"{w.name} on {target.name}/{path}: {g['errors']} error responses "
                           f"({stats['errors']} counted by the backend): the figures would mean nothing")
    ios = max(got["served"], 1) / parts  # figures are per I/O of the workload, whatever the split

    cpu_us_per_io = 1e6 * got["cpu"] / ios
    copy_share = sampler.share(SIM_COPY) if sampler is not None else None
    if copy_share is not None and got["cpu"] > 0:  # the engine's copies are C the sampler cannot see
        copy_share = min(1.0, copy_share + got["engine_copy"] / got["cpu"])
    counts["notifies"] += got["engine_notifies"]

    def per_io(x):
        return x / ios if hooks else None

    return {
        "iops": g["completed"] / g["seconds"], "p50_us": g["p50_us"], "p99_us": g["p99_us"],
        "mean_us": g["mean_us"], "requests_per_io": parts,
        "backend_cpu_us_per_io": cpu_us_per_io,
        "sim_copy_us_per_io": None if copy_share is None else copy_share * cpu_us_per_io,
        "sim_copy_share": copy_share,
        "backend_wakeups_per_io": per_io(counts["wakeups"]),
        "backend_reaps_per_io": per_io(counts["reaps"]),
        "backend_notifies_per_io": per_io(counts["notifies"]),
        "storage_cpu_us_per_io": None if got["storage_cpu"] is None else 1e6 * got["storage_cpu"] / ios,
        "loadgen_cpu_us_per_io": 1e6 * g["cpu_s"] / max(g["total"], 1),
        "oo_req": stats["oo_req"], "requests_served": got["served"], "ios_served": ios,
        # how the requests were served: by the ring engine, and by it from its own poll (warm-up included)
        "engine_share": stats.get("engine_req", 0) / max(1, stats["rd_req"] + stats["wr_req"]),
        "poll_share": stats.get("poll_req", 0) / max(1, stats["rd_req"] + stats["wr_req"]),
        "poll_returns_per_io": stats.get("poll_returns", 0) / max(1, stats["rd_req"] + stats["wr_req"]),
        "spurious_per_io": stats.get("spurious_wakeups", 0) / max(1, stats["rd_req"] + stats["wr_req"]),
        # the engine's own kernel calls per request it took (what each costs a PV dom0: the rig)
        "engine_syscalls_per_req": stats.get("engine_syscalls", 0) / max(1, stats.get("engine_req", 0)),
        "ios_completed": g["total"], "probe": got.get("probe"),
    }


def _engine_counts(vbd) -> tuple[int, float]:
    """(notifies, seconds of grant copy) the rings' engines made so far (ring_engine.py): in C, out of
    the wrappers' and the sampler's sight. Inline rings only (0 for ring worker processes)."""
    notifies, copy_s = 0, 0.0
    for worker in getattr(vbd, "_workers", []):
        counts = getattr(worker, "engine_counts", None)
        if counts is not None:
            notifies += counts[0]
            copy_s += counts[1]
    return notifies, copy_s


def _served(vbd) -> int:
    t = vbd.stats()["total"]
    return t["rd_req"] + t["wr_req"]


# ---------------------------------------------------------------- the null responder

def run_null(hv_socket: str, w: Workload, timing: Timing, span_bytes: int, parts: int = 1) -> dict:
    """loadgen.c's null responder serving the workload: the load generator's ceiling."""
    from _xenblk_bench import ffi, lib

    from xenblk_vhost.sim import open_sim

    sim = open_sim(hv_socket)
    guest = None
    ports, mappings = [], []
    stop_fd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        guest = GuestProcess(hv_socket, w, parts=parts, persistent=False, span_bytes=span_bytes, timing=timing)
        domid = guest.hello["domid"]
        rings = ffi.new("struct lg_ring[]", w.rings)
        for c, r in zip(rings, guest.hello["rings"]):
            m = sim.gntdev.map_grants(domid, r["ring_refs"], readonly=False)
            mappings.append(m)
            p = sim.evtchn.bind_interdomain(domid, r["port"])
            ports.append(p)
            c.sring = ffi.cast("void *", m.addr)
            c.ring_bytes = len(r["ring_refs"]) * 4096
            c.wait_fd = p.fileno()
            c.kick_fd = p.kick_fileno()
        out = ffi.new("struct nr_result *")
        rc = []
        responder = threading.Thread(target=lambda: rc.append(lib.nr_run(rings, w.rings, stop_fd, out)),
                                     name="null-responder")
        cpu0 = cpu_seconds()
        responder.start()
        guest.send("go")
        try:
            g = guest.result()
        finally:
            os.eventfd_write(stop_fd, 1)
            responder.join()
        cpu = cpu_seconds() - cpu0
        if rc and rc[0]:
            raise RuntimeError(f"the null responder failed: {os.strerror(-rc[0])}")
    finally:
        for p in ports:
            p.close()
        for m in mappings:
            m.close()
        if guest is not None:
            guest.close()  # (destroys the domain: after we let go of its ring)
        sim.close()
        os.close(stop_fd)
    return {"iops": g["completed"] / g["seconds"], "p50_us": g["p50_us"], "p99_us": g["p99_us"],
            "loadgen_cpu_us_per_io": 1e6 * g["cpu_s"] / max(g["total"], 1),
            "responder_cpu_us_per_io": 1e6 * cpu / max(out.served / parts, 1),
            "requests_served": out.served, "ios_completed": g["total"], "notifies": g["notifies"],
            "waits": g["waits"]}
