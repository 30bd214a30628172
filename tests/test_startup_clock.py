"""run's start-up clock (daemon/startup_clock.py) and the guest's pause meter (sim/blkfront_workload.py):
the two figures scripts/bench_startup.py and the hand-over tests read."""

from __future__ import annotations

import subprocess
import sys

from xenblk_vhost.daemon.startup_clock import StartupClock, parse_summary, process_start_boottime
from xenblk_vhost.sim import blkfront_workload
from xenblk_vhost.sim.blkfront_workload import Workload
from xenblk_vhost.sim.busy_guest import covering, overlapping, spanning


def test_the_clock_starts_at_the_exec_not_at_its_creation():
    """What happened before our code ran (the interpreter, a slow import) is counted."""
    code = ("import time; time.sleep(0.3)\n"
            "from xenblk_vhost.daemon.startup_clock import StartupClock\n"
            "c = StartupClock(); c.mark('after the sleep'); print(c.exact_origin, c.total, c.summary())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split(" ", 2)
    assert out[0] == "True"
    assert 0.28 <= float(out[1]) < 30  # the start time is in 10 ms ticks
    assert out[2].startswith("serving ") and "after exec (after the sleep 0." in out[2]


def test_process_start_is_before_now_and_phases_add_up():
    import time

    start = process_start_boottime()
    assert start is not None and start <= time.clock_gettime(time.CLOCK_BOOTTIME)
    c = StartupClock()
    c.mark("one")
    c.mark("two")
    assert [name for name, _ in c.phases] == ["one", "two"]
    assert abs(sum(took for _, took in c.phases) - c.total) < 0.05  # the origin to the first mark is in "one"


def test_the_pause_meter_keeps_the_longest_gaps_between_answers(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(blkfront_workload.time, "time", lambda: now[0])
    meter = blkfront_workload._PauseMeter()
    for step in [0.001, 0.002, 0.5, 0.001, 0.03, 0.001]:
        now[0] += step
        meter.answered()
    report = meter.report()
    assert [round(p["seconds"], 3) for p in report[:3]] == [0.5, 0.03, 0.002]
    assert report[0]["start"] == 100.003  # the last answer before the pause


def test_a_workload_may_be_bounded_by_time():
    assert Workload(seconds=2.5).seconds == 2.5
    try:
        Workload(seconds=-1)
    except ValueError:
        pass
    else:
        raise AssertionError("a negative duration was accepted")


def test_the_summary_reads_back_as_its_figures():
    c = StartupClock()
    c.mark("imports")
    c.mark("config")
    line = f"INFO xenblk_vhost.daemon.run: {c.summary()}\nnext line"
    figures = parse_summary(line)
    assert list(figures) == ["total", "imports", "config"]
    assert figures["total"] == round(c.total, 3) and figures["config"] == round(c.phases[1][1], 3)
    assert parse_summary("no start-up here") == {}


def test_the_busy_guests_pauses_by_moment_and_interval():
    pauses = [{"start": 10.0, "seconds": 2.0}, {"start": 20.0, "seconds": 0.5}]
    assert spanning(pauses, 11.0) == [pauses[0]] and spanning(pauses, 15.0) == []
    assert covering(pauses, 10.5, 11.5) == [pauses[0]] and covering(pauses, 11.5, 12.5) == []
    assert overlapping(pauses, 11.5, 20.1) == pauses
