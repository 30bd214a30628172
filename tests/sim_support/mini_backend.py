"""A minimal blkif backend for the reference frontend's cross-process tests.

NOT the real backend (xenblk_vhost.backend): just enough of blkback to
answer, so the frontend, the simulated hypervisor and the blkif codec can
be tested end to end before and independently of it. It serves one vbd
from an in-memory bytearray through the simulated gntdev/evtchn, the blkif
BackRing and decoder, and the xenstore client:

    features before InitWait (max-ring-page-order, multi-queue-max-queues,
    feature-max-indirect-segments); on frontend Initialised: read the ring
    refs / event channels / protocol, map and bind, publish the device,
    Connected; serve READ/WRITE/WRITE_BARRIER/FLUSH/DISCARD/INDIRECT by
    mapping the segments' grants (read-only for data it only reads);
    frontend Closing -> Closing, Closed -> unmap everything, Closed;
    frontend Initialising while Closed -> InitWait (reconnect).

With `persistent` it keeps every data grant mapped (read-write) until
disconnect, as blkback's persistent grants do. Faults can be injected for
the frontend's own tests (see Faults).

Run as a process (prints "ready" once InitWait is written, a JSON summary
on stdout when the frontend has gone, and exits):

    python tests/sim_support/mini_backend.py --hypervisor HV --xenstore XS \\
        --backend /local/domain/0/backend/vbd/1/51712 --sectors 65536 [...]
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

import trio

from xenblk_vhost.blkif.abi import abi_for_protocol
from xenblk_vhost.blkif.constants import (
    OP_WRITE,
    OP_WRITE_BARRIER,
    RSP_ERROR,
    RSP_OKAY,
    SECTOR_SIZE,
)
from xenblk_vhost.blkif.decode import RequestDecoder, decode_segments
from xenblk_vhost.blkif.request import DiscardRequest, IndirectRequest, Rejection
from xenblk_vhost.blkif.ring import BackRing, RingOverflow
from xenblk_vhost.sim import open_sim
from xenblk_vhost.xen.interfaces import XenStoreError
from xenblk_vhost.xen.xenstore import open_xenstore

INITIALISING, INIT_WAIT, INITIALISED, CONNECTED, CLOSING, CLOSED = 1, 2, 3, 4, 5, 6


@dataclass
class Faults:
    """Misbehaviour to inject, for testing that the frontend notices."""

    keep_mapped: bool = False  # never unmap data grants (without persistent grants)
    duplicate_response: bool = False  # answer the second request with the first one's id
    wrong_op: bool = False  # answer with op + 1
    unknown_id: bool = False  # answer with an id nobody used
    keep_ring_mapped: bool = False  # go Closed without unmapping the ring
    never_answer: bool = False  # consume requests, answer none (and still close)
    bogus_rsp_prod: bool = False  # publish rsp_prod far beyond what was answered
    corrupt_reads: bool = False  # flip a bit in the data of every read


@dataclass
class Disk:
    sectors: int
    data: bytearray = field(init=False)
    readonly: bool = False

    def __post_init__(self) -> None:
        self.data = bytearray(self.sectors * SECTOR_SIZE)


@dataclass
class Stats:
    requests: int = 0
    by_op: dict = field(default_factory=dict)
    errors: int = 0
    connections: int = 0
    max_batch: int = 0
    indirect: int = 0
    secure_discards: int = 0


class RingServer:
    """One ring: map, bind, drain, answer."""

    def __init__(self, platform, fe_domid: int, refs: list[int], port: int, abi, order: int,
                 disk: Disk, stats: Stats, persistent: bool, faults: Faults) -> None:
        self.platform = platform
        self.domid = fe_domid
        self.mapping = platform.gntdev.map_grants(fe_domid, refs, readonly=False)
        self.ring = BackRing(self.mapping.buffer, abi, order)
        self.channel = platform.evtchn.bind_interdomain(fe_domid, port)
        self.decoder = RequestDecoder(abi)
        self.entry = self.decoder.layout.entry_size
        self.disk = disk
        self.stats = stats
        self.persistent = persistent
        self.faults = faults
        self.persistent_maps: dict[int, object] = {}
        self.kept: list = []
        self.answered_first = False
        self.first_id: int | None = None
        self.scope = trio.CancelScope()

    async def serve(self) -> None:
        with self.scope:
            try:
                while True:
                    await self.channel.wait()
                    if not self.drain():
                        return
            except trio.ClosedResourceError:
                pass

    def drain(self) -> bool:
        ring = self.ring
        while True:
            try:
                raw, n = ring.take_slots(ring.size)
            except RingOverflow:
                return False
            self.stats.max_batch = max(self.stats.max_batch, n)
            if self.faults.never_answer:
                self.stats.requests += n
                n = 0
            for i in range(n):
                self.handle(raw, i * self.entry)
            if self.faults.bogus_rsp_prod and n:
                ring.rsp_prod_pvt = (ring.rsp_prod_pvt + 1000) & 0xFFFFFFFF
            if n and ring.push_responses():
                self.channel.notify()
            if self.faults.bogus_rsp_prod and n:
                self.channel.notify()
            if not ring.final_check_for_requests():
                return True

    def respond(self, id_: int, op: int, status: int) -> None:
        if self.faults.wrong_op:
            op += 1
        if self.faults.unknown_id:
            id_ = 0xDEAD
        if self.faults.duplicate_response:
            # The second request is answered with the first one's id, which
            # the frontend has already seen answered.
            if self.first_id is None:
                self.first_id = id_
            elif not self.answered_first:
                self.answered_first = True
                id_ = self.first_id
        self.ring.put_response(id_, op, status)

    def handle(self, raw: bytes, off: int) -> None:
        req = self.decoder.decode(raw, off)
        self.stats.requests += 1
        if isinstance(req, Rejection):
            self.stats.errors += 1
            self.respond(req.id, req.op, req.status)
            return
        op = req.indirect_op if isinstance(req, IndirectRequest) else req.op
        self.stats.by_op[op] = self.stats.by_op.get(op, 0) + 1
        try:
            status = self.execute(req)
        except Exception:
            status = RSP_ERROR
        if status != RSP_OKAY:
            self.stats.errors += 1
        self.respond(req.id, req.response_op, status)

    def execute(self, req) -> int:
        disk = self.disk
        if isinstance(req, DiscardRequest):
            self.stats.secure_discards += req.secure
            if req.sector + req.nr_sectors > disk.sectors:
                return RSP_ERROR
            disk.data[req.sector * SECTOR_SIZE:(req.sector + req.nr_sectors) * SECTOR_SIZE] = bytes(
                req.nr_sectors * SECTOR_SIZE)
            return RSP_OKAY
        if isinstance(req, IndirectRequest):
            self.stats.indirect += 1
            pages = self.platform.gntdev.map_grants(self.domid, req.indirect_grefs, readonly=True)
            try:
                decoded = decode_segments(bytes(pages.buffer[:req.segments_bytes]))
            finally:
                pages.close()
            if decoded is None:
                return RSP_ERROR
            segments, nr = decoded
            op, sector = req.indirect_op, req.sector
        else:
            segments, nr, op, sector = req.segments, req.nr_sectors, req.op, req.sector
        if not segments:
            return RSP_OKAY  # an empty flush or barrier: nothing cached here
        if sector + nr > disk.sectors:
            return RSP_ERROR
        write = op in (OP_WRITE, OP_WRITE_BARRIER)
        pos = sector * SECTOR_SIZE
        for gref, first, last in segments:
            view, done = self.page(gref, readonly=write)
            try:
                a, b = first * SECTOR_SIZE, (last + 1) * SECTOR_SIZE
                if write:
                    disk.data[pos:pos + b - a] = view[a:b]
                else:
                    view[a:b] = disk.data[pos:pos + b - a]
                    if self.faults.corrupt_reads:
                        view[a] ^= 1
                pos += b - a
            finally:
                done()
        return RSP_OKAY

    def page(self, gref: int, readonly: bool):
        """(view of the granted page, function to call when done with it)."""
        if self.persistent:
            m = self.persistent_maps.get(gref)
            if m is None:
                m = self.persistent_maps[gref] = self.platform.gntdev.map_grants(self.domid, [gref], readonly=False)
            return m.buffer, lambda: None
        m = self.platform.gntdev.map_grants(self.domid, [gref], readonly=readonly)
        view = m.buffer

        def done() -> None:
            view.release()
            if self.faults.keep_mapped:
                self.kept.append(m)
            else:
                m.close()

        return view, done

    def close(self) -> None:
        self.scope.cancel()
        self.channel.close()
        for m in self.persistent_maps.values():
            m.close()
        self.persistent_maps.clear()
        if not self.faults.keep_ring_mapped:
            self.ring.view.release()  # BackRing's own view of the mapping
            self.mapping.close()


class MiniBackend:
    def __init__(self, xs, platform, be_path: str, disk: Disk, *, max_ring_page_order: int | None = 4,
                 max_queues: int | None = 4, max_indirect_segments: int | None = 256, persistent: bool = False,
                 features: dict | None = None, faults: Faults | None = None) -> None:
        self.xs = xs
        self.platform = platform
        self.be = be_path
        self.disk = disk
        self.max_order = max_ring_page_order
        self.max_queues = max_queues
        self.max_indirect = max_indirect_segments
        self.persistent = persistent
        self.features = features if features is not None else {
            "feature-flush-cache": "1", "feature-barrier": "1", "feature-discard": "1",
            "discard-granularity": "4096", "discard-alignment": "0", "discard-secure": "0"}
        self.faults = faults if faults is not None else Faults()
        self.stats = Stats()
        self.rings: list[RingServer] = []
        self.state = INITIALISING
        self.frontend_seen: list[dict] = []  # what the frontend had written, at each connect

    async def read(self, path: str, default: str | None = None) -> str | None:
        try:
            return (await self.xs.read(path)).decode()
        except XenStoreError:
            return default

    async def switch(self, state: int) -> None:
        self.state = state
        await self.xs.write(f"{self.be}/state", str(state))

    async def switch_if_present(self, state: int) -> None:
        """__xenbus_switch_state: write the state only if the node still exists."""

        async def body(t) -> None:
            if await t.exists(f"{self.be}/state"):
                await t.write(f"{self.be}/state", str(state))

        await self.xs.transact(body)
        self.state = state

    async def publish_features(self) -> None:
        """xen_blkbk_probe: what must be there before InitWait."""
        for key, value in (("feature-max-indirect-segments", self.max_indirect),
                           ("multi-queue-max-queues", self.max_queues),
                           ("max-ring-page-order", self.max_order)):
            if value is not None:  # None: an old backend that does not know the key
                await self.xs.write(f"{self.be}/{key}", str(value))
        await self.switch(INIT_WAIT)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        fe_path = await self.read(f"{self.be}/frontend")
        self.fe_domid = int(await self.read(f"{self.be}/frontend-id"))
        self.fe = fe_path
        await self.publish_features()
        task_status.started()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            async with self.xs.watch(f"{fe_path}/state") as events:
                async for _ in events:
                    fe_state = int(await self.read(f"{fe_path}/state", "0") or 0)
                    if fe_state in (INITIALISED, CONNECTED) and self.state == INIT_WAIT:
                        await self.connect()
                    elif fe_state == CLOSING and self.state not in (CLOSING, CLOSED):
                        await self.switch(CLOSING)
                    elif fe_state == CLOSED and self.state != CLOSED:
                        await self.disconnect()
                        if await self.read(f"{self.be}/online", "0") == "0":
                            break
                    elif fe_state == INITIALISING and self.state == CLOSED:
                        await self.switch(INIT_WAIT)  # the frontend reconnects
                    elif fe_state == 0:
                        # The frontend is gone (domain destroyed, forced detach):
                        # blkback unregisters, and xenbus_dev_remove says Closed
                        # if the toolstack had asked for Closing.
                        self.close_rings()
                        await self.switch_if_present(CLOSED)
                        break
            nursery.cancel_scope.cancel()

    async def connect(self) -> None:
        fe = self.fe
        order = int(await self.read(f"{fe}/ring-page-order", "0"))
        nrings = int(await self.read(f"{fe}/multi-queue-num-queues", "1"))
        protocol = await self.read(f"{fe}/protocol")
        abi = abi_for_protocol(protocol)
        # blkback keeps grants only if both ends want it (connect_ring).
        persistent = self.persistent and await self.read(f"{fe}/feature-persistent") == "1"
        self.frontend_seen.append({"order": order, "queues": nrings, "protocol": protocol,
                                   "persistent": await self.read(f"{fe}/feature-persistent")})
        for q in range(nrings):
            d = fe if nrings == 1 else f"{fe}/queue-{q}"
            if order == 0:
                refs = [int(await self.read(f"{d}/ring-ref"))]
            else:
                refs = [int(await self.read(f"{d}/ring-ref{i}")) for i in range(1 << order)]
            port = int(await self.read(f"{d}/event-channel"))
            self.rings.append(RingServer(self.platform, self.fe_domid, refs, port, abi, order, self.disk,
                                         self.stats, persistent, self.faults))
        for ring in self.rings:
            self.nursery.start_soon(ring.serve)

        async def publish(t) -> None:
            for key, value in self.features.items():
                await t.write(f"{self.be}/{key}", value)
            await t.write(f"{self.be}/feature-persistent", "1" if self.persistent else "0")
            await t.write(f"{self.be}/sectors", str(self.disk.sectors))
            await t.write(f"{self.be}/info", "4" if self.disk.readonly else "0")
            await t.write(f"{self.be}/sector-size", "512")
            await t.write(f"{self.be}/physical-sector-size", "4096")
            await t.write(f"{self.be}/state", str(CONNECTED))

        await self.xs.transact(publish)
        self.state = CONNECTED
        self.stats.connections += 1

    async def resize(self, sectors: int) -> None:
        """xen_vbd_resize: new `sectors` and the state rewritten, in one transaction."""
        self.disk.data.extend(bytes(max(0, sectors - self.disk.sectors) * SECTOR_SIZE))
        self.disk.sectors = sectors

        async def body(t) -> None:
            await t.write(f"{self.be}/sectors", str(sectors))
            await t.write(f"{self.be}/state", str(self.state))

        await self.xs.transact(body)

    def close_rings(self) -> None:
        for ring in self.rings:
            ring.close()
        self.rings = []

    async def disconnect(self) -> None:
        """xen_blkif_disconnect (everything here is answered synchronously), then Closed."""
        self.close_rings()
        await self.switch(CLOSED)


async def main_async(args) -> dict:
    disk = Disk(args.sectors)
    faults = Faults(**{name: True for name in args.fault})
    with open_sim(args.hypervisor) as platform:
        async with open_xenstore(args.xenstore) as xs:
            backend = MiniBackend(xs, platform, args.backend, disk, max_ring_page_order=args.max_ring_page_order,
                                  max_queues=args.max_queues, max_indirect_segments=args.max_indirect_segments,
                                  persistent=args.persistent, faults=faults)
            async with trio.open_nursery() as nursery:
                await nursery.start(backend.run)
                print("ready", flush=True)
    return {"stats": vars(backend.stats), "frontend_seen": backend.frontend_seen}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--hypervisor", required=True)
    p.add_argument("--xenstore", required=True)
    p.add_argument("--backend", required=True, help="the backend dir the toolstack made")
    p.add_argument("--sectors", type=int, default=65536)
    p.add_argument("--max-ring-page-order", type=int, default=4)
    p.add_argument("--max-queues", type=int, default=4)
    p.add_argument("--max-indirect-segments", type=int, default=256)
    p.add_argument("--persistent", action="store_true")
    p.add_argument("--fault", action="append", default=[], choices=list(Faults.__dataclass_fields__))
    args = p.parse_args(argv)
    print(json.dumps(trio.run(main_async, args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
