"""SIGKILL the backend under a busy, verifying guest, many times; the guest must not notice but pauses.

    result = await crash_campaign(workdir, kills=200, seed=1)      # scripts/crash_campaign.py
    result = await crash_campaign(workdir, kills=6, seed=1)        # tests/test_crash_campaign.py

The chain, all in the simulator except the storage, which is real:

    guest (reference blkfront, its own process: verifying mixed workload, 2 rings, indirect)
      -> xenblk-vhost run --sim --journal-dir D      (killed with SIGKILL, started again, ...)
      -> qemu-storage-daemon vhost-user-blk -> NBD -> slow_nbd.py: every request completes
         after its own random delay (0..max_delay_ms), so completions come back out of order

One workload call after another runs in the guest (each request one ring
request: reads, writes, flush, barrier, discard; up to 128 KiB, so
indirect requests too; every byte read checked against what the lane last
wrote) while the campaign kills the daemon at a random moment 0..max_life
seconds after it took the rings over (the first one: after `ready`), and
starts the next one at once. The next
daemon takes the rings over from their journals (stays Connected: the guest
never reconnects). At the end: every workload ok, every request answered
(a lost one would hang the workload: the call times out), no byte wrong,
the frontend saw no protocol error (a second response, or one with the
wrong op, disables its ring as Linux's blkfront does), and no daemon had
to discard a journal.

A lost request shows as a stall: a workload with requests in flight and none
answered for STALL_S ends at once, and the campaign prints each outstanding
request (id, op, sector, ring position and slot, age: the guest's view) with
what its ring's journal says of that position (describe_stall). The storage
daemon is supervised (supervise_storage): qemu-storage-daemon 7.2 sometimes
aborts when its client is killed with requests in flight; it is started
again and counted, and the backend must ride that out too.

What "executed twice after its answer was published" would look like here:
a write run again after the guest saw it done and wrote the lane anew
overwrites the newer data (the read-back fails); a request answered twice
is a protocol error the frontend reports. Both are checked.
"""

from __future__ import annotations

import random
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from e2e_support.frontend_agent import frontend_agent
from storage_support.qsd import StorageDaemon
from xenblk_vhost.backend.datapath.journal import JournalCorrupt, read_image
from xenblk_vhost.backend.datapath.journal_file import journal_name
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world

SLOW_NBD = Path(__file__).resolve().parent.parent / "storage_support" / "slow_nbd.py"
STATE_CHANGE = re.compile(r"vbd-\d+-\d+: \S+ -> \S+$")
TAKEOVER = re.compile(r"took the ring over from its journal at rsp_prod \d+: (\d+) answer\(s\) published again, "
                      r"(\d+) request\(s\) run again")


@dataclass
class CampaignResult:
    kills: int = 0
    requests: int = 0
    workloads: int = 0
    ok: bool = True
    problems: list[str] = field(default_factory=list)
    takeovers: int = 0  # rings taken over from a journal
    republished: int = 0
    rerun: int = 0
    live_takeovers: int = 0  # devices taken over staying Connected (a daemon killed before it took over: none)
    discarded: int = 0  # journals a daemon refused
    # qemu-storage-daemon died and was started again, as its service manager would (its last log
    # line each time): 7.2 aborts now and then when a vhost-user client is killed with requests in
    # flight (vhost_user_server_ref: Assertion `!server->wait_idle' failed). Not the backend's
    # fault; the backend must ride it out (storage reconnect) with the guest seeing no error.
    storage_crashes: list[str] = field(default_factory=list)
    stalls: int = 0  # workloads ended by STALL_S with requests never answered (describe_stall says which)
    longest_pauses: list[float] = field(default_factory=list)  # the guest's, seconds, longest first
    start_to_ready: list[float] = field(default_factory=list)
    # grant pins the simulated Xen put right after a daemon was killed inside one (sim/pin_ledger.py:
    # Xen's work done in the daemon's own process there, which a SIGKILL can interrupt, as it cannot Xen)
    sim_pins_repaired: int = 0
    elapsed: float = 0.0

    def summary(self) -> str:
        pauses = ", ".join(f"{p:.3f}" for p in self.longest_pauses[:5])
        ready = sorted(self.start_to_ready)
        median = ready[len(ready) // 2] if ready else float("nan")
        return (f"{self.kills} SIGKILLs, {self.requests} requests in {self.workloads} verifying workloads, "
                f"{'OK' if self.ok else 'FAILED'}; rings taken over from journals {self.takeovers} "
                f"({self.republished} answers published again, {self.rerun} requests run again), devices taken "
                f"over Connected {self.live_takeovers}, journals discarded {self.discarded}, stalls {self.stalls}; "
                f"qemu-storage-daemon crashed and restarted {len(self.storage_crashes)} time(s); daemon exec->ready "
                f"median {median:.3f} s (max {max(ready, default=float('nan')):.3f} s); the guest's longest "
                f"pauses {pauses} s; the simulated Xen repaired {self.sim_pins_repaired} grant pin(s) killed "
                f"halfway; {self.elapsed:.0f} s")


def _run_argv(world, config: Path, journal_dir: Path | None) -> list[str]:
    argv = [sys.executable, "-m", "xenblk_vhost", "run", str(config), "--xenstore", world.xenstore_path,
            "--sim", world.hypervisor_path, "--log-level", "info"]
    argv += ["--journal-dir", str(journal_dir)] if journal_dir is not None else ["--no-journal"]
    return ["sh", "-c", 'exec "$@" 2>&1', "sh", *argv]


STALL_S = 60.0


async def supervise_storage(qsd: StorageDaemon, result: CampaignResult, done: trio.Event) -> None:
    """Start qemu-storage-daemon again whenever it dies (Restart=always), noting why it died."""
    assert qsd.process is not None
    log_from = qsd.log_path.stat().st_size if qsd.log_path.exists() else 0
    while not done.is_set():
        await trio.sleep(0.05)
        if qsd.process.poll() is None:
            continue
        with open(qsd.log_path, "rb") as f:
            f.seek(log_from)
            said = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        result.storage_crashes.append(f"exit {qsd.process.returncode}: {said[-1] if said else '(nothing logged)'}")
        await trio.to_thread.run_sync(qsd.restart)
        log_from = qsd.log_path.stat().st_size


def describe_stall(stall: dict, journal_dir: Path | None, domid: int, vdev: str) -> list[str]:
    """One line per request the guest waits for: id, op, sector, ring position and slot, and what the
    ring's journal (as the daemon alive now keeps it) says of that position: taken and unanswered,
    answered (status, response position), or absent (never taken, or answered and published)."""
    lines = []
    for ring in stall["rings"]:
        by_pos: dict[int, str] = {}
        note = "no journal"
        path = journal_dir / journal_name(domid, vdev, ring["ring"]) if journal_dir is not None else None
        if path is not None and path.exists():
            try:
                image = read_image(bytearray(path.read_bytes()))
            except JournalCorrupt as e:
                note = f"journal unreadable: {e}"
            else:
                note = f"journal taken_to {image.taken_to} published {image.published}, {len(image.frames)} frame(s)"
                for fr in image.frames:
                    for i, answer in enumerate(fr.answers):
                        by_pos[fr.position(i)] = ("taken, unanswered" if answer is None else
                                                  f"answered status {answer[0]} at rsp_pos {answer[1]}")
        lines.append(f"ring {ring['ring']}: req_prod {ring['req_prod']} (pvt {ring['req_prod_pvt']}) rsp_prod "
                     f"{ring['rsp_prod']} rsp_cons {ring['rsp_cons']} req_event {ring['req_event']} rsp_event "
                     f"{ring['rsp_event']} broken {ring['broken']}; {note}")
        for q in ring["requests"]:
            lines.append(f"  id {q['id']} op {q['op']} sector {q['sector']} x{q['nr_sectors']} position "
                         f"{q['position']} slot {q['slot']} age {q['age_s']} s: "
                         f"{by_pos.get(q['position'], 'not in the journal')}")
    return lines


async def crash_campaign(workdir: Path, *, kills: int, seed: int = 1, max_life: float = 0.4,
                         max_delay_ms: float = 6.0, queues: int = 2, size: int = 64 << 20,
                         journal: bool = True, plain: bool = False, progress=None) -> CampaignResult:
    """journal=False: the daemons run --no-journal (what the campaign finds then: the issue's failure).
    plain: the guest sends only direct READs and WRITEs (up to 11 pages): the copy path's lane then
    holds whole batches (copy_lane.py), and the kills land among them."""
    rnd = random.Random(seed)
    result = CampaignResult()
    t0 = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    image = workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size)
    nbd_socket = workdir / "nbd.sock"
    with open(workdir / "nbd.log", "wb") as nbd_log:
        nbd = await trio.lowlevel.open_process(
            [sys.executable, str(SLOW_NBD), "--socket", str(nbd_socket), "--image", str(image),
             "--max-delay-ms", str(max_delay_ms), "--seed", str(seed)], stdout=nbd_log)
    try:
        with trio.fail_after(20):
            while not nbd_socket.exists():
                await trio.sleep(0.01)
        with StorageDaemon(workdir / "qsd") as qsd:
            export = qsd.add_nbd_export("slow", nbd_socket=nbd_socket, size=size, num_queues=queues)
            qsd.start()
            await _campaign(workdir, qsd, export.socket, queues, kills, rnd, max_life, result, progress,
                            workdir / "journal" if journal else None, plain)
    finally:
        nbd.kill()
        with trio.CancelScope(shield=True):
            await nbd.wait()
    result.elapsed = time.monotonic() - t0
    return result


async def _campaign(workdir: Path, qsd: StorageDaemon, vhost_socket: Path, queues: int, kills: int, rnd: random.Random,
                    max_life: float, result: CampaignResult, progress, journal_dir: Path | None,
                    plain: bool = False) -> None:
    config = workdir / "crash.yaml"
    config.write_text("domain: {name: crash}\ndisks:\n"
                      f"  - {{vdev: xvda, driver: virtio-blk-vhost-user, path: {vhost_socket}, queues: {queues}}}\n")
    async with open_world(workdir / "world") as world:
        guest = await world.create_guest("crash", pages=16384)

        async def start(i: int):
            t = time.monotonic()
            backend = await world.start_process(_run_argv(world, config, journal_dir), name=f"backend-{i}",
                                                timeout=120)
            result.start_to_ready.append(time.monotonic() - t)
            return backend

        backends = [await start(0)]
        vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(vhost_socket)))
        async with frontend_agent(world, guest.domid, vbd.devid) as fe:
            await fe.call("connect")
            done = trio.Event()

            async def guest_io() -> None:
                call = 0
                while not done.is_set():
                    call += 1
                    # 8 MiB: the final read-back of every lane stays short however often the daemon dies;
                    # a request lost would hang the call: the timeout says so.
                    # stall_s: a request never answered ends the call with what is outstanding, long
                    # before its timeout (the longest honest pause is a daemon's start-up: seconds).
                    out = await fe.call("workloads", devs=[vbd.devid], requests=100000, depth=24, seconds=2.0,
                                        max_sectors=88 if plain else 256, region_sectors=16384,
                                        seed=rnd.getrandbits(20), stall_s=STALL_S, timeout=600,
                                        **({"mix": [["write", 1], ["read", 1]]} if plain else {}))
                    w = out[str(vbd.devid)]
                    if w.get("stall"):
                        result.stalls += 1
                        result.problems.append(f"workload {call} stalled; the daemon then: {backends[-1].name} "
                                               f"(alive: {backends[-1].proc.returncode is None}), its last lines: "
                                               f"{backends[-1].lines[-8:]}")
                        result.problems += describe_stall(w["stall"], journal_dir, guest.domid, "xvda")
                    result.workloads += 1
                    result.requests += w["requests"]
                    result.longest_pauses.extend(p["seconds"] for p in w.get("pauses", []))
                    if not w["ok"] or w["mismatches"] or w["errors"]:
                        result.ok = False
                        result.problems.append(f"workload {call}: ok={w['ok']} mismatches={w['mismatches'][:3]} "
                                               f"errors={w['errors'][:3]} failed={w['failed']}")
                        done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(guest_io)
                nursery.start_soon(supervise_storage, qsd, result, done)
                await trio.sleep(0.5)
                for i in range(1, kills + 1):
                    if done.is_set():
                        break
                    if i > 1:
                        # Killed once serving (its rings taken over): a daemon killed inside its
                        # vhost-user connect can leave qemu-storage-daemon refusing every later
                        # client (seen after ~110 such kills), which is the storage's problem to fix.
                        try:
                            await backends[-1].wait_line(lambda line: "took the live connection over" in line, 60)
                        except (trio.TooSlowError, RuntimeError) as e:
                            result.ok = False
                            result.problems.append(f"{backends[-1].name} did not take the device over in 60 s "
                                                   f"({e!r}); its last lines: {backends[-1].lines[-20:]}")
                            qsd_log = workdir / "qsd" / "qsd.log"
                            if qsd_log.exists():
                                result.problems.append(f"qsd log: {qsd_log.read_text(errors='replace')[-600:]}")
                            break
                    await trio.sleep(rnd.random() * max_life)
                    backends[-1].proc.send_signal(signal.SIGKILL)
                    await backends[-1].wait(30)
                    result.kills += 1
                    backends.append(await start(i))
                    if progress is not None and i % 10 == 0:
                        took = sum(1 for b in backends for line in b.lines if TAKEOVER.search(line))
                        progress(f"{i} kills, {result.workloads} workloads ({result.requests} requests) verified, "
                                 f"{took} ring takeovers so far")
                await trio.sleep(0.5)  # the last daemon serves a while unkilled
                done.set()
            before_close = len(backends[-1].lines)  # the guest's close makes the last daemon go Closed
            report = await fe.call("report")
            if report.get("errors"):
                result.ok = False
                result.problems.append(f"frontend errors: {report['errors'][:5]}")
            closed = await fe.call("close")
            if closed.get("errors"):
                result.ok = False
                result.problems.append(f"frontend errors at close: {closed['errors'][:5]}")
        backends[-1].proc.send_signal(signal.SIGTERM)
        await backends[-1].wait(30)
        result.sim_pins_repaired = world.hypervisor_counters()["pins_repaired"]
        for b in backends:
            for line in b.lines:
                m = TAKEOVER.search(line)
                if m:
                    result.takeovers += 1
                    result.republished += int(m.group(1))
                    result.rerun += int(m.group(2))
                elif "took the live connection over" in line:
                    result.live_takeovers += 1
                elif "journal" in line and "discarded" in line:
                    result.discarded += 1
                    result.problems.append(f"{b.name}: {line.strip()}")
                elif " ERROR " in line or " CRITICAL " in line:
                    result.ok = False
                    result.problems.append(f"{b.name}: {line.strip()}")
                elif "Traceback" in line:
                    result.ok = False
                    result.problems.append(f"{b.name}: a traceback: {line.strip()}")
        if result.discarded or result.stalls:
            result.ok = False
        # No daemon after the first one switched the device's state (a restart killed before its
        # takeover leaves it to the next one): the guest was never shown InitWait or Connected again.
        if not any(STATE_CHANGE.search(line) for line in backends[0].lines):
            result.ok = False
            result.problems.append("the first daemon's state changes were not recognised: the check is blind")
        for b in backends[1:]:
            for line in b.lines[:before_close] if b is backends[-1] else b.lines:
                if STATE_CHANGE.search(line):
                    result.ok = False
                    result.problems.append(f"{b.name} changed the xenbus state: {line.strip()}")
        if not result.live_takeovers:
            result.ok = False
            result.problems.append("no restart took the device over Connected")
    result.longest_pauses.sort(reverse=True)

