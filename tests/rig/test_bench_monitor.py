"""The bench scenario's dom0 monitor (scripts/xen-rig/dom0/bench_monitor.py), checked without Xen.

What its table rests on: CPU counters read at each job's BEGIN and END
markers, fio's JSON report matched to its disk and job, ratios to kernel
blkback's row of the same job, and a run that went wrong reported as such.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

MONITOR = Path(__file__).resolve().parents[2] / "scripts" / "xen-rig" / "dom0" / "bench_monitor.py"
spec = importlib.util.spec_from_file_location("bench_monitor", MONITOR)
bench_monitor = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_monitor)


def fio_json(rw: str, iops: float, ios: int, p50_ns: int, p99_ns: int, bs: int = 4096) -> str:
    side = {"total_ios": ios, "iops": iops, "bw_bytes": iops * bs, "runtime": 10000,
            "clat_ns": {"percentile": {"50.000000": p50_ns, "99.000000": p99_ns}}}
    idle = {"total_ios": 0, "iops": 0, "bw_bytes": 0, "runtime": 0}
    job = {"jobname": "x", "read": side if rw == "read" else idle, "write": side if rw == "write" else idle,
           "usr_cpu": 1.5, "sys_cpu": 20.0}
    return json.dumps({"fio version": "fio-3.33", "jobs": [job]}, indent=2).replace("\n", "")


class FakeClock:
    """dom0 spends 0.5 s of CPU per 10 s job on blkback's disk, 0.4 s on xenblk-vhost's (all of it the daemon's)."""

    def __init__(self):
        self.t = self.dom0 = self.daemon = self.user = 0.0

    def advance(self, label):
        self.t += 10
        self.dom0 += 0.5 if label == "blkback" else 0.4
        if label != "blkback":
            self.daemon += 0.4
            self.user += 0.1  # (a quarter of the daemon's time in its own code, the rest in the kernel)

    def read(self):
        return {"t": self.t, "dom0": self.dom0, "steal": 0.0, "user": self.user, "xenblk-vhost": self.daemon}


JOBS = (("randread-4k-qd1", "read", {"blkback": 1000, "xbv-copy": 600}),
        ("write-1m-qd8", "write", {"blkback": 50, "xbv-copy": 40}))


def console(clock: FakeClock, col, disk: str, label: str):
    """What one guest with one disk prints, as the collector sees it."""
    for job, rw, iops in JOBS:
        col.line(f"XENBLK-FIO-BEGIN {disk} {job}\r\n")
        clock.advance(label)
        col.line(f"XENBLK-FIO-END {disk} {job}")
        col.line(f"XENBLK-FIO-JSON {disk} {job} {fio_json(rw, iops[label], iops[label] * 10, 250_000, 900_000)}")
        col.line(f"CHECK fio_{disk}_{job} ok")
    col.line("XENBLK-GUEST-DONE status=ok")


def two_guests() -> list[dict]:
    clock = FakeClock()
    out = []
    for label in ("blkback", "xbv-copy"):  # both guests' disk is xvda
        col = bench_monitor.Collector({"xvda": label}, clock.read)
        console(clock, col, "xvda", label)
        assert col.done == "ok" and not col.problems
        out.append(col.results())
    return out


def test_figures_cpu_and_ratios_per_job():
    table = bench_monitor.combine(two_guests(), idle_rate=0.01)
    assert list(table["jobs"]) == ["randread-4k-qd1", "write-1m-qd8"]
    ref, ours = table["jobs"]["randread-4k-qd1"]["blkback"], table["jobs"]["randread-4k-qd1"]["xbv-copy"]
    assert ref["iops"] == 1000 and ours["iops"] == 600
    assert ref["p50_us"] == 250 and ref["p99_us"] == 900
    assert ref["dom0_cpu_us_per_io"] == pytest.approx(1e6 * 0.5 / 10000)
    assert ours["dom0_cpu_us_per_io"] == pytest.approx(1e6 * 0.4 / 6000)
    assert ours["dom0_cpu_net_us_per_io"] == pytest.approx(1e6 * (0.4 - 0.01 * 10) / 6000)
    assert ours["iops_vs_blkback"] == pytest.approx(0.6)
    assert ours["dom0_cpu_vs_blkback"] == pytest.approx((0.4 / 6000) / (0.5 / 10000))
    assert ours["daemon_cpu_pct"] == pytest.approx(4.0)
    assert ours["dom0_user_share_pct"] == pytest.approx(25.0) and ref["dom0_user_share_pct"] == 0
    text = bench_monitor.summary(table)
    assert "randread-4k-qd1    xbv-copy" in text and "0.60" in text


@pytest.mark.parametrize("bad, problem", [
    ("XENBLK-FIO-END xvdc randread-4k-qd1", "END without BEGIN"),
    ("XENBLK-FIO-JSON xvda randread-4k-qd1 {not json", "unreadable fio report"),
    ("CHECK fio_xvdb_write-1m-qd8 fail fio: io_u error on file /dev/xvdb", "io_u error"),
])
def test_what_went_wrong_is_reported(bad, problem):
    col = bench_monitor.Collector({"xvda": "blkback"}, FakeClock().read)
    col.line(bad)
    assert any(problem in p for p in col.problems), col.problems


def test_follow_fails_a_guest_that_failed(tmp_path):
    lines = []

    class Sink:
        def line(self, text):
            lines.append(text)
    console(FakeClock(), Sink(), "xvda", "xbv-copy")
    # the last job produced no report, and the guest says it failed
    lines = [x for x in lines if not x.startswith("XENBLK-FIO-JSON xvda write")]
    lines[-1] = "XENBLK-GUEST-DONE status=fail"
    log = tmp_path / "console.log"
    log.write_text("\n".join(lines) + "\n")
    out = tmp_path / "guest.json"
    rc = bench_monitor.main(["follow", "--console", str(log), "--disk", "xvda=xbv-copy", "--out", str(out),
                             "--timeout", "5", "--poll", "0.01"])
    assert rc == 1
    res = json.loads(out.read_text())
    assert any("status fail" in p for p in res["problems"])
    assert any("no fio figures for xvda write-1m-qd8" in p for p in res["problems"])
    assert "xbv-copy" in res["jobs"]["randread-4k-qd1"] and "write-1m-qd8" not in res["jobs"]


def test_table_merges_the_guests(tmp_path):
    files = []
    for i, results in enumerate(two_guests()):
        files.append(tmp_path / f"g{i}.json")
        files[-1].write_text(json.dumps({"jobs": results, "problems": []}))
    (tmp_path / "idle.json").write_text(json.dumps({"idle_dom0_cpu_per_s": 0.0}))
    assert bench_monitor.main(["table", "--idle-json", str(tmp_path / "idle.json"), "--out", str(tmp_path),
                               *map(str, files)]) == 0
    table = json.loads((tmp_path / "results.json").read_text())
    assert table["jobs"]["write-1m-qd8"]["xbv-copy"]["iops_vs_blkback"] == pytest.approx(0.8)
    assert "write-1m-qd8       blkback" in (tmp_path / "summary.txt").read_text()


bm = bench_monitor  # (the tests below: the ring counters, the process table, the profiler)


def _fio_json(iops: float, ios: int) -> str:
    side = {"iops": iops, "bw_bytes": iops * 4096, "total_ios": ios, "runtime": 10_000,
            "clat_ns": {"percentile": {"50.000000": 1_000_000, "99.000000": 5_000_000}}}
    return json.dumps({"jobs": [{"read": side, "write": {"total_ios": 0}, "usr_cpu": 1.0, "sys_cpu": 2.0}]})


def test_ring_counters_per_job_and_table():
    clock = iter(range(100))
    cpu = {"t": 0.0, "dom0": 0.0, "xenblk-vhost": 0.0}

    def counters():
        t = next(clock)
        return {k: (float(t) if v is not None else None) for k, v in cpu.items()}

    reads = iter([
        {"xvda": dict.fromkeys(bm.RING_COUNTERS, 0)},  # BEGIN
        {"xvda": {"rd_req": 1000, "wr_req": 0, "engine_req": 900, "poll_req": 600, "poll_returns": 60,
                  "spurious_wakeups": 7, "oo_req": 0, "engine_syscalls": 4500, "engine_sleeps": 900,
                  "copy_segs_mapped": 800, "copy_segs_xen": 100}},  # END
    ])
    col = bm.Collector({"xvda": "xbv-copy"}, counters, lambda: next(reads))
    for line in ("XENBLK-FIO-BEGIN xvda randread-4k-qd1", "XENBLK-FIO-END xvda randread-4k-qd1",
                 f"XENBLK-FIO-JSON xvda randread-4k-qd1 {_fio_json(100.0, 1000)}"):
        col.line(line)
    row = col.results()["randread-4k-qd1"]["xbv-copy"]
    assert row["rings"]["engine_req"] == 900 and row["rings"]["poll_returns"] == 60
    assert row["window_s"] == 1.0 and row["daemon_cpu_s"] == 1.0
    text = bm.summary(bm.combine([col.results()], idle_rate=0.0))
    ring_line = [ln for ln in text.splitlines() if ln.startswith("randread-4k-qd1") and "90.0" in ln]
    assert ring_line, text
    assert ring_line[0].split()[2:] == ["1000", "90.0", "60.0", "10.0", "7", "0", "5.00", "1.00", "88.9"]


def test_no_ring_table_without_daemon_counters():
    col = bm.Collector({"xvda": "blkback"}, lambda: {"t": 0.0, "dom0": 0.0, "xenblk-vhost": None})
    for line in ("XENBLK-FIO-BEGIN xvda j", "XENBLK-FIO-END xvda j", f"XENBLK-FIO-JSON xvda j {_fio_json(5.0, 50)}"):
        col.line(line)
    assert "rings" not in col.results()["j"]["blkback"]
    assert "engine%" not in bm.summary(bm.combine([col.results()], idle_rate=0.0))


def test_profile_top_counts_self_and_total():
    raw = ("process 1:\"python\";Thread 1 (active);main (x.py:1);serve (y.py:2);poll (z.py:3) 30\n"
           "process 1:\"python\";Thread 1 (active);main (x.py:1);serve (y.py:2) 10\n"
           "process 1:\"python\";Thread 2 (active);work (w.py:9) 60\n"
           "garbage line\n")
    top = bm.profile_top(raw)
    assert top.startswith("100 samples")
    assert "    30  30.0%  poll (z.py:3)" in top
    assert "    60  60.0%  work (w.py:9)" in top
    total = top.split("total (")[1]
    assert "    40  40.0%  serve (y.py:2)" in total


@pytest.mark.skipif(os.geteuid() != 0, reason="py-spy attaches to another process: root on these machines")
def test_profiler_records_a_process(tmp_path):
    binary = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    assert os.access(binary, os.X_OK), "py-spy comes with the bench extra (scripts/install-deps.sh)"
    busy = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: sum(range(1000))"])
    try:
        prof = bm.Profiler(binary, busy.pid, tmp_path, {"xvda": "xbv-copy"})
        prof.start("xvda", "job")
        time.sleep(1.5)
        prof.stop("xvda", "job")
        assert not prof.problems
        top = (tmp_path / "xbv-copy.job.top.txt").read_text()
        assert "<module> (<string>" in top, top
    finally:
        busy.kill()
        busy.wait()


def test_busiest_processes_by_pid():
    """CPU spent between two process tables, per pid (a kernel worker's name changes with its work item), the
    busiest first; a process that appeared meanwhile counts whole."""
    before = {"10": ("xenstored", 1.0, 2.0, 40), "11": ("kworker/0:2-events", 0.0, 5.0, 7),
              "12": ("idle", 3.0, 3.0, 0)}
    after = {"10": ("xenstored", 1.5, 2.1, 52), "11": ("kworker/0:2-mm_percpu_wq", 0.0, 7.0, 9),
             "12": ("idle", 3.0, 3.0, 0), "13": ("python3", 0.2, 0.1, 3)}
    top = bm.busiest(before, after, n=2)
    assert list(top) == ["kworker/0:2[11]", "xenstored[10]"]
    assert top["kworker/0:2[11]"] == [0.0, 2.0, 2] and top["xenstored[10]"] == [0.5, 0.1, 12]
    assert bm.busiest(before, after)["python3[13]"] == [0.2, 0.1, 3]
    mine = bm.process_table()[str(os.getpid())]
    assert mine[0].startswith(("python", "pytest")) and mine[1] + mine[2] > 0
    time.sleep(0.01)  # (a sleep is a voluntary switch of this, the main thread)
    assert bm.process_table()[str(os.getpid())][3] > mine[3]


def test_process_rows_show_wake_ups_per_second():
    """The process table's lines: user+system us per I/O, then the main thread's wake-ups per second of the
    job (and without them, as an older results.json has them)."""
    results = {"idle_dom0_cpu_per_s": 0.0, "jobs": {"j": {"xbv": {
        "iops": 100.0, "MBps": 0.4, "ios": 1000, "window_s": 10.0, "p50_us": 1.0, "p99_us": 2.0,
        "dom0_cpu_us_per_io": 1.0, "dom0_cpu_net_us_per_io": 1.0,
        "processes": {"xenblk-vhost[5]": [0.1, 0.02, 70], "python[9]": [0.2, 0.4]}}}}}
    line = [ln for ln in bm.summary(results).splitlines() if ln.startswith("j ") and "[5]" in ln][0]
    assert line.endswith("xenblk-vhost[5] 100+20/7, python[9] 200+400"), line


FAKE_PERF = """#!{python}
import signal, sys, time
args = sys.argv[1:]
if args[0] == "record":
    out = args[args.index("-o") + 1]
    signal.signal(signal.SIGINT, lambda *_: (open(out, "w").write("samples"), sys.exit(0)))
    while True:
        time.sleep(0.05)
elif args[0] == "report":
    data = open(args[args.index("-i") + 1]).read()
    print("report of", data, "by", args[args.index("--sort") + 1])
"""


def test_perf_records_the_chosen_jobs_of_every_disk(tmp_path):
    """perf record runs through the chosen jobs' windows only, blkback's disk too, and each window's report
    (by process, then by function) lands in the output directory, its data file gone from the scratch."""
    fake = tmp_path / "perf"
    fake.write_text(FAKE_PERF.format(python=sys.executable))
    fake.chmod(0o755)
    perf = bm.PerfRecorder({"qd1"}, tmp_path / "out", {"xvda": "blkback", "xvdb": "xbv-copy"},
                           scratch=tmp_path / "scratch", binary=str(fake))
    clock = iter(range(100))
    col = bm.Collector({"xvda": "blkback", "xvdb": "xbv-copy"},
                       lambda: {"t": float(next(clock)), "dom0": 0.0, "xenblk-vhost": None}, perf=perf)
    for disk in ("xvda", "xvdb"):
        for job in ("qd1", "qd32"):
            col.line(f"XENBLK-FIO-BEGIN {disk} {job}")
            time.sleep(0.3)  # (the fake's handler installed)
            col.line(f"XENBLK-FIO-END {disk} {job}")
    perf.reports()
    assert not perf.problems
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["blkback.qd1.txt", "xbv-copy.qd1.txt"]
    text = (tmp_path / "out" / "xbv-copy.qd1.txt").read_text()
    assert "report of samples by comm\n" in text and "by comm,dso,symbol" in text
    assert not list((tmp_path / "scratch").iterdir())


def test_following_the_console_sleeps_until_it_is_written(tmp_path):
    """The console's follower wakes when its file is written (inotify on the directory: the file may be
    created afresh), not for another file of the directory, and not before."""
    log = tmp_path / "guest-x.log"
    watch = bm.FileWatch(str(log), fallback=0.05)
    assert watch.fd >= 0, "inotify is available on every Linux these tests run on"
    try:
        t0 = time.monotonic()
        (tmp_path / "other.log").write_text("not ours\n")
        watch.wait(0.4)
        assert time.monotonic() - t0 >= 0.35  # (another guest's log: it slept on)
        timer = threading.Timer(0.2, lambda: log.write_text("XENBLK-FIO-BEGIN xvda j\n"))
        t0 = time.monotonic()
        timer.start()
        watch.wait(10)
        timer.join()
        assert 0.15 <= time.monotonic() - t0 < 5
    finally:
        watch.close()


def test_without_inotify_the_follower_sleeps_its_poll(tmp_path):
    watch = bm.FileWatch(str(tmp_path / "guest.log"), fallback=0.05)
    watch.close()  # (as if inotify were not to be had)
    t0 = time.monotonic()
    watch.wait(10)
    assert 0.04 <= time.monotonic() - t0 < 1
