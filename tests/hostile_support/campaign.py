"""Two guests on one service: mallory runs every hostile attack, alice works.

The real Service runs in this process (its own xenstore connection and
simulated Platform, as a backend process has them); mallory's frontend runs
here too, driving its ring raw (xenblk_vhost.sim.hostile), with racer
processes for the races; alice's frontend is its own process running a
verifying workload the whole time, timing every request.

What is checked, per attack and for the whole run:
  * every answer mallory got was one it could get (Outcome.wrong), every
    request answered unless the attack halts the ring, pages untouched;
  * mallory's disk outside its write window byte-identical, its size the
    same (an out-of-range write would show there, or grow the file);
  * alice's workload verified (every read what was written), her region
    outside the workload byte-identical, her worst request latency;
  * the service alive, its tasks, fds, grant mappings (per domain) and RSS
    sampled every 20 ms: the maxima against the idle baseline;
  * at the end mallory's domain vanishes with requests in flight: the
    service lives on, mallory's mappings are all released, alice goes on.

`run_campaign(...)` returns a Report; scripts/hostile_campaign.py prints it
as the README's table; tests/test_hostile_guests.py asserts on it.
"""

from __future__ import annotations

import gc
import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from e2e_support.fixtures import backend_service, domain_config
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.blkif.constants import OP_READ, SECTOR_SIZE
from xenblk_vhost.sim.blkfront import open_blkfront
from xenblk_vhost.sim.blkfront_config import BlkfrontOptions
from xenblk_vhost.sim.guest import Guest
from xenblk_vhost.sim.hostile import ATTACKS, Attack, Outcome, Target
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world
from xenblk_vhost.sim.xenstore_guest import open_guest_xenstore

MiB = 1 << 20
DISK = 16 * MiB
WINDOW_SECTORS = 2048  # mallory writes only its first MiB
ALICE_REGION = 4096  # alice's workload stays in her first 2 MiB; the rest must never change
RING_MEMORY = 4 * MiB  # mallory's limits.memory (per ring)
RING_INFLIGHT = 32  # mallory's limits.max_inflight


def _patterned(path: Path, seed: int) -> Path:
    block = hashlib.sha256(str(seed).encode()).digest() * 128  # 4 KiB
    with open(path, "wb") as f:
        for i in range(DISK // len(block)):
            f.write(i.to_bytes(8, "little") + block[8:])
    return path


def _digest(path: Path, start: int) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data[start:]).hexdigest()


def _rss() -> int:
    """This process's resident memory less the simulated guests' memory mapped in it: mallory's frontend
    runs here and fills her own pages, and the map path maps them (each mapping of a page counted again),
    up to her whole ring in flight - tens of MiB some runs, none of it the service's. (VmRSS counted
    them: the test's bound failed once in a full suite at +34 MiB on the map path, +2-3 MiB usual.)"""
    total = guests = 0
    in_guest = False
    with open("/proc/self/smaps") as f:
        for line in f:
            if line[0] in "0123456789abcdef":  # a mapping's header: its address range, ..., its name
                in_guest = "/memfd:sim-dom" in line and "-memory" in line
            elif line.startswith("Rss:"):
                kib = int(line.split()[1])
                total += kib
                if in_guest:
                    guests += kib
    return (total - guests) * 1024


def _tasks() -> int:
    def walk(task) -> int:
        return 1 + sum(walk(t) for n in task.child_nurseries for t in n.child_tasks)
    return walk(trio.lowlevel.current_root_task())


@dataclass
class Row:
    name: str
    record: str
    runs: int = 0
    outcome: Outcome = field(default_factory=Outcome)
    out_of_range: int = 0  # attacks after which mallory's disk changed outside its window


@dataclass
class Peak:
    baseline: int = 0
    peak: int = 0
    after: int = 0

    def see(self, value: int) -> None:
        self.peak = max(self.peak, value)


@dataclass
class Report:
    data_path: str
    rounds: int
    rows: dict[str, Row] = field(default_factory=dict)
    crashes: int = 0  # the service's task ended, or alice's device stopped being served
    alice_ok: bool = True
    alice_requests: int = 0
    alice_errors: list = field(default_factory=list)
    alice_max_latency_s: float = 0.0
    alice_mean_latency_s: float = 0.0
    alice_untouched: bool = True
    alice_quiet_max_latency_s: float = 0.0  # the same workload before any attack
    rss: Peak = field(default_factory=Peak)
    fds: Peak = field(default_factory=Peak)
    tasks: Peak = field(default_factory=Peak)
    maps: Peak = field(default_factory=Peak)  # live grant mappings of mallory's domain
    maps_after_vanish: int = -1
    vanish_in_flight: int = 0
    mallory_close_error: str = ""
    storm_cpu_share: float = 0.0  # this process's CPU / wall during the notify storm
    elapsed_s: float = 0.0

    @property
    def unanswered(self) -> int:
        return sum(r.outcome.unanswered for r in self.rows.values())

    @property
    def wrong(self) -> list[str]:
        return [f"{r.name}: {w}" for r in self.rows.values() for w in r.outcome.wrong]

    @property
    def out_of_range(self) -> int:
        return sum(r.out_of_range for r in self.rows.values()) + sum(
            r.outcome.changed_pages for r in self.rows.values()) + (0 if self.alice_untouched else 1)


def _mallory_maps(platform, domid: int) -> int:
    return sum(1 for m in list(platform.gntdev._maps) if m.domid == domid)


async def run_campaign(workdir: Path, *, rounds: int = 1, data_path: str = "copy",
                       attacks: list[Attack] | None = None, alice_batch: int = 40) -> Report:
    attacks = ATTACKS if attacks is None else attacks
    report = Report(data_path=data_path, rounds=rounds)
    started = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    bad_img = _patterned(workdir / "mallory.img", 1)
    good_img = _patterned(workdir / "alice.img", 2)
    extra = f", data_path: {data_path}, limits: {{max_inflight: {RING_INFLIGHT}, memory: {RING_MEMORY}}}"
    configs = [domain_config(workdir, "mallory", [f"vdev: xvda, driver: io_uring, path: {bad_img}{extra}"]),
               domain_config(workdir, "alice", [f"vdev: xvda, driver: io_uring, path: {good_img}"])]
    mallory_outside = _digest(bad_img, WINDOW_SECTORS * SECTOR_SIZE)
    alice_outside = _digest(good_img, ALICE_REGION * SECTOR_SIZE)

    async with open_world(workdir / "world") as world:
        mallory = await world.create_guest("mallory")
        alice = await world.create_guest("alice")
        async with backend_service(world, configs) as service:
            platform = service._platform
            bad = await world.attach_vbd(mallory.domid, VbdConfig(vdev="xvda", target=str(bad_img)))
            good = await world.attach_vbd(alice.domid, VbdConfig(vdev="xvda", target=str(good_img)))
            async with frontend_agent(world, alice.domid, good.devid) as alice_fe:
                await alice_fe.call("connect")
                work = {"devs": [good.devid], "requests": alice_batch, "depth": 4,
                        "region_sectors": ALICE_REGION, "max_sectors": 32, "final_verify": False}
                quiet = (await alice_fe.call("workloads", **work, seed=99))[str(good.devid)]
                report.alice_quiet_max_latency_s = quiet["max_latency_s"]
                if not quiet["ok"]:
                    report.alice_ok = False
                    report.alice_errors += quiet["errors"] + quiet["mismatches"]
                guest = Guest.attach(world.hypervisor_path, mallory.domid)
                try:
                    await _attack_while_alice_works(world, service, platform, guest, mallory.domid, bad,
                                                    bad_img, mallory_outside, alice_fe, good.devid, work,
                                                    attacks, rounds, report)
                finally:
                    guest.close()
                closed = await alice_fe.call("close")
                if closed["errors"]:
                    report.alice_ok = False
                    report.alice_errors += closed["errors"]
    report.alice_untouched = _digest(good_img, ALICE_REGION * SECTOR_SIZE) == alice_outside
    report.elapsed_s = time.monotonic() - started
    return report


async def _attack_while_alice_works(world, service, platform, guest, domid, bad, bad_img, mallory_outside,
                                    alice_fe, alice_dev, work, attacks, rounds, report: Report) -> None:
    attacking = True

    async def alice_works() -> None:
        seed = 1
        while attacking:
            res = (await alice_fe.call("workloads", **work, seed=seed, timeout=120))[str(alice_dev)]
            seed += 1
            report.alice_requests += res["requests"]
            report.alice_max_latency_s = max(report.alice_max_latency_s, res["max_latency_s"])
            report.alice_mean_latency_s += res["total_latency_s"]
            if not res["ok"]:
                report.alice_ok = False
                report.alice_errors += res["errors"] + res["mismatches"]

    async def sample() -> None:
        while True:
            report.rss.see(_rss())
            report.fds.see(len(os.listdir("/proc/self/fd")))
            report.tasks.see(_tasks())
            report.maps.see(_mallory_maps(platform, domid))
            await trio.sleep(0.02)

    async with open_guest_xenstore(domid, world.xenstore_path) as gxs, trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        alice_done = trio.Event()

        async def alice_then_signal() -> None:
            try:
                await alice_works()
            finally:
                alice_done.set()

        try:
            async with open_blkfront(gxs, guest, bad.devid,
                                     BlkfrontOptions(max_queues=1, state_timeout=10)) as front:
                # Objects the earlier tests left for the collector may hold fds: collected now, they
                # cannot close (and lower the count) while mallory attacks.
                gc.collect()
                report.rss.baseline, report.fds.baseline = _rss(), len(os.listdir("/proc/self/fd"))
                nursery.start_soon(alice_then_signal)
                await trio.sleep(0.1)  # alice's task counted in the baseline
                report.tasks.baseline, report.maps.baseline = _tasks(), _mallory_maps(platform, domid)
                report.rss.peak, report.fds.peak = report.rss.baseline, report.fds.baseline
                report.tasks.peak, report.maps.peak = report.tasks.baseline, report.maps.baseline
                for _ in range(rounds):
                    for attack in attacks:
                        await _one_attack(front, guest, world, domid, bad_img, mallory_outside, attack, report)
                gc.collect()  # as for the baseline: only what is still referenced counts
                report.rss.after = _rss()
                report.fds.after = len(os.listdir("/proc/self/fd"))
                report.tasks.after = _tasks()
                report.maps.after = _mallory_maps(platform, domid)
                await _vanish(front, world, platform, domid, report)
        except (trio.TooSlowError, OSError) as e:
            # Closing a frontend whose domain was destroyed under it: its
            # handshake cannot finish, by design. Anything else is a failure.
            if not report.vanish_in_flight:
                raise
            report.mallory_close_error = repr(e)
        attacking = False
        await alice_done.wait()
        nursery.cancel_scope.cancel()
    # The service itself must still be running and serving alice.
    if service._nursery is None:
        report.crashes += 1
    n = report.alice_requests or 1
    report.alice_mean_latency_s /= n


async def _one_attack(front, guest, world, domid, bad_img, mallory_outside, attack: Attack, report: Report) -> None:
    row = report.rows.setdefault(attack.name, Row(attack.name, attack.record))
    [nodes] = front.ring_nodes()
    async with front.raw_ring(0) as raw:
        target = Target(raw=raw, guest=guest, socket_path=world.hypervisor_path, domid=domid,
                        sectors=front.sectors, window=WINDOW_SECTORS,
                        max_indirect=front.negotiated.max_indirect_segments, ring_refs=tuple(nodes.refs),
                        persistent=front.negotiated.persistent)
        outcome = await attack.run(target)
    if attack.name == "notify-storm" and outcome.wall_s:
        report.storm_cpu_share = max(report.storm_cpu_share, outcome.cpu_s / outcome.wall_s)
    row.runs += 1
    row.outcome.add(outcome)
    if outcome.needs_reconnect:  # the ring halted: the guest's way back is a new connection
        await front.close()
        await front.reconnect()
    if _digest(bad_img, WINDOW_SECTORS * SECTOR_SIZE) != mallory_outside:
        row.out_of_range += 1


async def _vanish(front, world, platform, domid, report: Report) -> None:
    """Mallory's domain is destroyed with a ring full of reads in flight."""
    async with front.raw_ring(0) as raw:
        pages = [raw.grant_page() for _ in range(raw.size)]
        slots = []
        for i, page in enumerate(pages):
            buf = bytearray(raw.entry_size)
            raw.encoder.rw(buf, 0, OP_READ, 0x7A000 + i, i * 8, [(page.gref, 0, 7)])
            slots.append(bytes(buf))
        raw.queue(slots)
        raw.publish()
        raw.notify()
        report.vanish_in_flight = len(slots)
        await world.destroy_guest(domid)
        with trio.move_on_after(10):
            while _mallory_maps(platform, domid):
                await trio.sleep(0.05)
        report.maps_after_vanish = _mallory_maps(platform, domid)
        pages.clear()
