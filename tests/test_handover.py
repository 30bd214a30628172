"""`xenblk-vhost upgrade`: a new daemon takes a busy guest's disks over from the running one
(daemon/handover.py), end to end against `run --sim`.

The guest (the reference frontend, its own process) runs a verifying workload the whole time; the
daemon is upgraded several times under it. Every request is answered exactly once (the frontend
fails a second answer for an id, and a lost one never completes) with the right data (every read
is verified), and the new daemon's start-up is never inside the guest's pause: the guest is answered
while its successor starts (the pauses are printed with -s; scripts/bench_handover.py measures them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import trio

from e2e_support.fixtures import disk_image, state_is, wait_node, write_config
from xenblk_vhost.daemon.startup_clock import parse_summary
from xenblk_vhost.sim.busy_guest import covering, overlapping, run_argv, start_busy_frontend, terminate, write_busy_disk
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world

# The target is 50 ms: measured 40-50 ms on this 2-core machine at load 4, 50-160 ms at load 7,
# 40-450 ms at load 10 (the guest also stalls ~0.2 s there with no hand-over at all). A bound in seconds,
# even one relative to the start-up measured in the same run, failed at load 10-17: the pause is the
# drain and the takeover, which a loaded machine stretches as it likes. What the test holds whatever the
# load is the design's point, an event and not a duration: the guest is answered while the new daemon
# starts (a restart's pause contains that start-up; an upgrade's must not).
UPGRADES = 3


async def upgrade(control, *extra: str) -> subprocess.CompletedProcess:
    return await trio.run_process([sys.executable, "-m", "xenblk_vhost", "upgrade", "--control", str(control),
                                   *extra], capture_stdout=True, capture_stderr=True, check=False)


async def test_upgrade_hands_a_busy_guest_over_exactly_once_without_a_startup_pause(tmp_path):
    img, cfg = write_busy_disk(tmp_path, "busy", queues=2)
    control = tmp_path / "control.sock"
    last_pid = None
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("busy")
        first = await world.start_process(run_argv(world, cfg, "--control", str(control)), name="backend")
        last_pid = first.proc.pid
        try:
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img)))
            stop = tmp_path / "stop"  # the workload runs until every upgrade is done, however long they take
            front = await start_busy_frontend(world, vbd, stop_file=stop,
                                              mix="write=40,read=40,flush=6,discard=10")
            await trio.sleep(1.5)
            windows = []
            for _ in range(UPGRADES):
                before = time.time()
                done = await upgrade(control, "--json")
                assert done.returncode == 0, done.stderr
                reply = json.loads(done.stdout)
                windows.append((before, time.time(), reply))
                assert reply["predecessor"] == last_pid and reply["answering"] == reply["successor"]
                last_pid = reply["successor"]
                # Connected again (today's takeover writes InitWait first: backend/xenbus/device.py).
                assert await wait_node(world.xs, f"{vbd.backend}/state", state_is(4)) == "4"
                await trio.sleep(1.5)
            stop.touch()
            assert first.proc.returncode == 0  # the first daemon exited by itself (its successors hold its stdout)
            assert await front.wait(60) == 0
            result = front.last_json()
        finally:
            if last_pid is not None:
                await terminate(last_pid, 30)
    load = result["workload"]
    # Exactly once, right data: the frontend fails on a second answer or a wrong id, reads verify.
    assert result["ok"] and load["ok"] and not load["mismatches"] and not load["errors"], load
    assert result["front"]["errors"] == []
    assert load["requests"] > 1000 and load["by_op"]["flush"] > 0 and load["by_op"]["discard"] > 0
    pauses = load["pauses"]  # longest first, the longest 200 of the run
    figures = []
    for before, after, reply in windows:
        assert any(before <= p["start"] <= after for p in pauses), "the guest's I/O was not under way then"
        startup = parse_summary(reply["successor_startup"])["total"]
        # The new daemon ran from its exec to its ready message, just before the old one stopped taking
        # requests (handed_over_at). A pause covering all of that is the start-up pause this test forbids;
        # one that long is among the recorded pauses unless 200 longer ones are.
        started, ready = reply["handed_over_at"] - startup, reply["handed_over_at"]
        assert len(pauses) < 200 or pauses[-1]["seconds"] < startup, "a start-up pause could be unrecorded"
        assert not covering(pauses, started, ready), (reply, covering(pauses, started, ready))
        # The pause of the hand-over itself (from the old daemon's last intake to the reply), for the figures.
        figures.append((max((p["seconds"] for p in overlapping(pauses, ready, after)), default=0.0), startup,
                        reply["drain_s"]))
    print(f"\nupgrade pauses (s): {[round(f[0], 4) for f in figures]}; the new daemons' start-ups (s), every one "
          f"answered through: {[f[1] for f in figures]}; drains (s): {[f[2] for f in figures]}; longest pauses "
          f"overall: {[round(p['seconds'], 4) for p in pauses[:5]]}; load {os.getloadavg()[0]:.1f}")


async def test_an_upgrade_to_a_daemon_that_cannot_start_leaves_the_running_one_serving(tmp_path):
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "d", [f"vdev: xvda, driver: io_uring, path: {img}"])
    control = tmp_path / "control.sock"
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("d")
        first = await world.start_process(run_argv(world, cfg, "--control", str(control)), name="backend")
        vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img)))
        # The file no longer validates: the new daemon says so and exits; nothing was stopped.
        cfg.write_text(cfg.read_text().replace("io_uring", "no-such-driver"))
        done = await upgrade(control)
        assert done.returncode == 1
        said = done.stderr.decode()
        assert "upgrade refused" in said and "driver" in said, said
        assert first.proc.returncode is None
        result = await world.run_frontend(guest.domid, vbd.devid, requests=300, depth=8)
        assert result["ok"], result  # served by the first daemon, still running
        assert first.proc.returncode is None


async def test_an_upgrade_over_vhost_user_connects_the_other_export_before_the_old_daemon_stops(tmp_path):
    """A vhost-user server takes one client per export: with the node exported twice (handover_path), each
    new daemon opens the export the running one does not use, and maps the rings, while the running one
    still serves; the guest's verifying workload goes on through the upgrades, every request answered once."""
    from storage_support.qsd import StorageDaemon

    img, _ = write_busy_disk(tmp_path, "vu", queues=2)
    qsd = StorageDaemon(tmp_path / "qsd")
    first_export = qsd.add_file_export("a", image=img, num_queues=2)
    second_export = qsd.add_second_export("b", first_export)
    cfg = write_config(tmp_path, "vu", [f"vdev: xvda, driver: virtio-blk-vhost-user, path: {first_export.socket}, "
                                        f"handover_path: {second_export.socket}, queues: 2"])
    control = tmp_path / "control.sock"
    last_pid = None
    qsd.start()
    with qsd:
        async with open_world(tmp_path / "w") as world:
            guest = await world.create_guest("vu")
            first = await world.start_process(run_argv(world, cfg, "--control", str(control)), name="backend")
            last_pid = first.proc.pid
            try:
                vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img)))
                stop = tmp_path / "stop"
                front = await start_busy_frontend(world, vbd, stop_file=stop)
                for _ in range(2):
                    await trio.sleep(0.5)
                    done = await upgrade(control, "--json")
                    assert done.returncode == 0, done.stderr
                    last_pid = json.loads(done.stdout)["successor"]
                stop.touch()
                assert await front.wait(60) == 0
                result = front.last_json()
            finally:
                if last_pid is not None:
                    await terminate(last_pid, 30)
        prepared = [line.split("storage ")[1].split(" opened")[0] for line in first.lines
                    if "takeover prepared while the running daemon serves" in line]
        assert prepared == [str(second_export.socket), str(first_export.socket)], [
            line for line in first.lines if "takeover" in line]
    load = result["workload"]
    assert result["ok"] and load["ok"] and not load["mismatches"] and not load["errors"], load
    assert result["front"]["errors"] == []


def test_a_released_daemon_leaves_the_cpu_to_its_successor():
    """After the release the old daemon only frees and closes: every one of its threads (libblkio's,
    trio's, the main one) drops to nice 19 so that it does not slow the new daemon's takeover.
    Checked in a child process, which is lowered for good."""
    probe = """
import json, os, threading
from xenblk_vhost.daemon.handover import RELEASED_NICE, lower_own_cpu_priority
hold = threading.Event()
threading.Thread(target=hold.wait, daemon=True).start()
lower_own_cpu_priority()
print(json.dumps([RELEASED_NICE, [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir('/proc/self/task')]]))
hold.set()
"""
    # started 3 nicer than the suite (land.sh runs it at -10): its threads start somewhere other than 19
    out = subprocess.run(["nice", "-n", "3", sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    nice, threads = json.loads(out)
    assert nice == 19 and len(threads) >= 2
    assert threads == [nice] * len(threads)


def test_a_released_daemon_lowers_its_ring_workers_but_not_its_successor():
    """Its ring worker processes (its children) free their rings after the release too: lowered with
    every thread of theirs and what they started; the successor (also its child) and what the
    successor started keep their priority."""
    probe = """
import json, os, subprocess, sys, time
from xenblk_vhost.daemon.handover import lower_own_cpu_priority
nap = "import time; time.sleep(30)"
sleeper = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {nap!r}]); time.sleep(30)"
worker = subprocess.Popen([sys.executable, '-c', sleeper])
successor = subprocess.Popen([sys.executable, '-c', sleeper])
def below(pid):
    with open(f'/proc/{pid}/task/{pid}/children') as f:
        return [int(c) for c in f.read().split()]
deadline = time.monotonic() + 20
while not (below(worker.pid) and below(successor.pid)) and time.monotonic() < deadline:
    time.sleep(0.02)
lower_own_cpu_priority(spare=successor.pid)
def nices(pid):
    return [os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir(f'/proc/{pid}/task')]
out = {"own": nices(os.getpid()), "worker": nices(worker.pid) + nices(below(worker.pid)[0]),
       "successor": nices(successor.pid) + nices(below(successor.pid)[0])}
for p in (worker, successor):
    for c in below(p.pid):
        os.kill(c, 9)
    p.kill()
print(json.dumps(out))
"""
    out = subprocess.run(["nice", "-n", "3", sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    got = json.loads(out)
    start = os.getpriority(os.PRIO_PROCESS, 0) + 3
    assert start < 19  # (else lowered and untouched look alike)
    assert got["own"] == [19] * len(got["own"])
    assert got["worker"] == [19, 19]  # the worker and the process it started
    assert got["successor"] == [start, start]  # untouched, with what it started
