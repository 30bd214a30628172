"""The benchmark's guest: a simulated domain whose rings a compiled loop keeps busy.

Run by the backend side (sim_cases.py) as its own process, so that none of
its work lands on the backend's CPU time:

    python scripts/benchkit/guest.py --socket HV_SOCKET --spec JSON

It creates the domain, and per ring: the ring pages (granted, initialised
as blkfront does), an unbound event channel for dom0, `qd` I/Os' worth of
data pages (granted read-only for writes, as blkfront does unless grants
are persistent). An I/O is `parts` requests when the backend's segment
limit is below its size (as blkfront splits); a request of more than 11
segments is indirect, with one indirect page listing them. Every request
is built once, as a template; the loop (loadgen.c lg_run) only sets the
sector.

Protocol on stdin/stdout (one JSON line each way):
    -> {"domid", "rings": [{"ring_refs", "port"}]}     the backend connects
    <- "go"
    -> {"completed", "seconds", "total", "errors", ..., "cpu_s"}   lg_run's result
    <- "bye"                                           the backend let go: destroy
"""

from __future__ import annotations

import argparse
import json
import resource
import struct
import sys

from _xenblk_bench import ffi, lib

from xenblk_vhost.blkif.abi import Abi, layout
from xenblk_vhost.blkif.constants import OP_INDIRECT, OP_READ, OP_WRITE
from xenblk_vhost.blkif.ring import FrontRing
from xenblk_vhost.sim.guest import Guest

PAGE = 4096
SEGMENTS_PER_INDIRECT_PAGE = PAGE // 8
GRANTS_PER_FRAME = PAGE // 8
RESERVED_GRANTS = 8  # GNTTAB_NR_RESERVED_ENTRIES
_SEGMENT = struct.Struct("<IBB2x")  # struct blkif_request_segment


def fill_byte(page: int) -> bytes:
    """With spec "fill": the byte the ring's `page`-th data page (request r's i-th is r * pages + i) holds.

    Never 0, and consecutive pages of a request hold consecutive values (mod 255).
    """
    return bytes([page % 255 + 1])


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class BenchGuest:
    """The domain and its rings, set up for one workload."""

    def __init__(self, socket: str, spec: dict):
        self.spec = spec
        qd, order, nrings, parts = spec["qd"], spec["order"], spec["rings"], spec["parts"]
        pages = spec["bs"] // PAGE // parts  # per request
        self.indirect = pages > 11
        per_request = pages + (-(-pages // SEGMENTS_PER_INDIRECT_PAGE) if self.indirect else 0)
        npages = nrings * ((1 << order) + qd * parts * per_request)
        frames = -(-(npages + RESERVED_GRANTS) // GRANTS_PER_FRAME) + 1
        self.guest = Guest.create(socket, pages=npages + 16, grant_frames=frames)
        self.lay = layout(Abi.NATIVE)
        self.rings = [self._make_ring(order) for _ in range(nrings)]

    def _make_ring(self, order: int) -> dict:
        g, spec = self.guest, self.spec
        npages = 1 << order
        ring_frames = g.alloc_pages(npages)
        assert ring_frames == list(range(ring_frames[0], ring_frames[0] + npages)), "ring pages not contiguous"
        refs = [g.grant_access(f, 0, readonly=False) for f in ring_frames]
        # SHARED_RING_INIT, as blkfront does before it publishes the ring
        FrontRing(g.memory[ring_frames[0] * PAGE:(ring_frames[0] + npages) * PAGE], Abi.NATIVE, order)
        port = g.alloc_unbound(0)
        writes = spec["op"] == "write"
        data_readonly = writes and not spec["persistent"]
        nreq, pages = spec["qd"] * spec["parts"], spec["bs"] // PAGE // spec["parts"]
        templates = ffi.new("char[]", nreq * lib.LG_REQUEST_BYTES)
        tbuf = ffi.buffer(templates)
        for rid in range(nreq):  # I/O i is requests i * parts + k
            frames = g.alloc_pages(pages)
            # with "fill", every page its own byte (tests check where, and in what order, writes land)
            if spec.get("fill"):
                for i, f in enumerate(frames):
                    g.memory[f * PAGE:(f + 1) * PAGE] = fill_byte(rid * pages + i) * PAGE
            segs = [(g.grant_access(f, 0, readonly=data_readonly), 0, 7) for f in frames]
            self._template(tbuf, rid, OP_WRITE if writes else OP_READ, segs)
        return {"ring_refs": refs, "port": port, "addr": g.page_addr(ring_frames[0]), "bytes": npages * PAGE,
                "templates": templates}

    def _template(self, tbuf, rid: int, op: int, segs: list) -> None:
        off = rid * lib.LG_REQUEST_BYTES
        if not self.indirect:
            self.lay.rw_header.pack_into(tbuf, off, op, len(segs), 0, rid, 0)
            for i, seg in enumerate(segs):
                _SEGMENT.pack_into(tbuf, off + self.lay.seg_offset + i * _SEGMENT.size, *seg)
            return
        g = self.guest
        grefs = []
        for start in range(0, len(segs), SEGMENTS_PER_INDIRECT_PAGE):
            [frame] = g.alloc_pages(1)
            page = g.page(frame)
            for i, seg in enumerate(segs[start:start + SEGMENTS_PER_INDIRECT_PAGE]):
                _SEGMENT.pack_into(page, i * _SEGMENT.size, *seg)
            page.release()
            grefs.append(g.grant_access(frame, 0, readonly=True))
        grefs += [0] * (8 - len(grefs))
        self.lay.indirect_struct.pack_into(tbuf, off, OP_INDIRECT, op, len(segs), rid, 0, 0, *grefs)

    def hello(self) -> dict:
        return {"domid": self.guest.domid,
                "rings": [{"ring_refs": r["ring_refs"], "port": r["port"].local_port} for r in self.rings]}

    def run(self) -> dict:
        spec = self.spec
        w = ffi.new("struct lg_workload *", {
            "qd": spec["qd"], "unit_sectors": spec["bs"] // 512, "parts": spec["parts"],
            "span_units": spec["span_bytes"] // spec["bs"],
            "random": spec["pattern"] == "rand", "write": spec["op"] == "write",
            "warmup_s": spec["warmup"], "seconds": spec["seconds"], "seed": spec.get("seed", 1),
            "max_latency_samples": spec.get("max_latency_samples", 1 << 22)})
        rings = ffi.new("struct lg_ring[]", len(self.rings))
        for c, r in zip(rings, self.rings):
            c.sring = ffi.cast("void *", r["addr"])
            c.ring_bytes = r["bytes"]
            c.wait_fd = r["port"].fileno()
            c.kick_fd = r["port"].kick_fileno()
            c.templates = r["templates"]
        out = ffi.new("struct lg_result *")
        cpu0 = cpu_seconds()
        rc = lib.lg_run(w, rings, len(self.rings), out)
        cpu = cpu_seconds() - cpu0
        result = {k: getattr(out, k) for k in ("completed", "seconds", "total", "errors", "bad_responses",
                                               "notifies", "waits", "latency_samples", "p50_us", "p99_us", "mean_us")}
        result.update(rc=rc, cpu_s=cpu)
        return result

    def destroy(self) -> None:
        self.guest.destroy()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--socket", required=True)
    ap.add_argument("--spec", required=True, help="JSON: op, pattern, bs, qd, order, rings, parts, persistent, "
                                                  "span_bytes, warmup, seconds[, fill]")
    args = ap.parse_args()
    guest = BenchGuest(args.socket, json.loads(args.spec))
    try:
        print(json.dumps(guest.hello()), flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        print(json.dumps(guest.run()), flush=True)
        sys.stdin.readline()  # "bye": the backend no longer maps our pages
    finally:
        guest.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
