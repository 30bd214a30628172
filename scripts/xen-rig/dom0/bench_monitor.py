#!/usr/bin/env python3
"""The bench scenario's dom0 side: CPU per fio job and per backend, then the table.

    bench_monitor.py idle SECONDS                     dom0's CPU rate doing nothing (JSON)
    bench_monitor.py follow --console LOG --guest NAME --disk xvda=blkback ... \
        [--daemon-pid PID] --out FILE [--timeout S]
    bench_monitor.py table --idle-json FILE --out DIR RESULTS.json...
    bench_monitor.py clock                            what a clock read costs in this dom0 (JSON)

`follow` tails a guest's console (xenconsoled's log). At each
XENBLK-FIO-BEGIN DISK JOB it reads dom0's CPU counters (/proc/stat: user,
nice, system, irq, softirq of every CPU; so kernel blkback's threads, the
loop device's workers and interrupt work all count) and the CPU time of the
xenblk-vhost daemon (with all its threads, io_uring workers included); at
XENBLK-FIO-END it reads them again. The guest prints fio's JSON report
after END. When the guest is done (or gone) it writes the per-job figures
of its disks to FILE. `table` merges such files (one per guest) into
DIR/results.json and DIR/summary.txt: per job, each backend's IOPS, MB/s,
completion latency p50/p99, dom0 CPU per I/O (and net of dom0's idle rate),
the daemon's CPU, and every backend's ratio to kernel blkback (the disk
labelled "blkback").

With --daemon-pid it also asks the daemon's control socket for its
counters (`ctl stats`) just before BEGIN and just after END, so each
xenblk-vhost row says how its requests were served in that job: by the ring
engine, in the engine's own poll, how many requests per return of that poll
to Python, spurious wake-ups. With --profiler (run.sh --profile) it runs
py-spy on the daemon through each job of each of its disks (raw collapsed
stacks, DIR/LABEL.JOB.txt) and writes the functions with most samples next
to them (.top.txt): py-spy costs dom0 CPU, so the figures of such a run are
for finding where the time goes, not for comparing. (Without C frames: with
them, py-spy stops the process for each sample, and under TCG it took 20
samples in a 10 s job.) With --perf-jobs (run.sh --perf) it runs `perf record -a` on all of
dom0 through those jobs of every disk, blkback's too, and writes perf's report of each next to the
others (DIR/LABEL.JOB.txt: by process, then by process, library and function): where dom0's CPU
goes, the kernel's part (syscalls, hypercalls: samples land where Xen returns) included.

Under TCG absolute figures mean little; ratios measured in one boot, with
the same guest and the same jobs, are the point.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
REFERENCE = "blkback"
QUIET_CHECK_S = 60  # no console line for this long (longer than a job): check the guest still exists
# The daemon's ring counters read per job (observability/snapshot.py's "total" of each vbd).
RING_COUNTERS = ("rd_req", "wr_req", "engine_req", "poll_req", "poll_returns", "spurious_wakeups", "oo_req",
                 "engine_syscalls", "engine_sleeps", "copy_segs_mapped", "copy_segs_xen")
PROFILE_RATE = 50  # py-spy samples per second (TCG: more costs the daemon a visible share of a CPU)
PROFILE_TOP = 40  # functions listed in each .top.txt
PROCESSES_SHOWN = 5  # per job and backend: the processes that spent most of dom0's CPU
PERF_RATE = 199  # perf's samples per second per vCPU (cpu-clock: a PV dom0 has no PMU)
PERF_SCRATCH = Path("/run/xenblk-rig")  # perf's data files (tmpfs: the share's 9p is slow), reports go to DIR


def dom0_cpu_seconds() -> tuple[float, float, float]:
    """(busy, steal, user): CPU seconds dom0 spent busy (user, nice, system, irq, softirq; not idle,
    iowait, steal), seconds its vCPUs wanted to run but Xen ran something else (under TCG: the host
    did not run QEMU), and of busy the user-space part (user, nice: processes' own code, not their
    syscalls, the kernel's grant copies and hypercalls, interrupts), all vCPUs together."""
    with open("/proc/stat") as f:
        fields = f.readline().split()  # "cpu user nice system idle iowait irq softirq steal ..."
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq) / CLK_TCK, steal / CLK_TCK, (user + nice) / CLK_TCK


def dom0_busy_seconds() -> float:
    return dom0_cpu_seconds()[0]


def process_cpu_seconds(pid: int) -> float | None:
    """user + system CPU seconds of a process and all its threads (None once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def voluntary_switches(pid: str) -> int:
    """Times the process's main thread slept (blocked in a syscall) so far: its wake-ups (a trio loop's, an
    engine's poll), 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def process_table() -> dict[str, tuple[str, float, float, int]]:
    """{pid: (comm, user, system CPU seconds, its main thread's wake-ups)} of every process now (threads
    included in the CPU): who in dom0 spent a job's CPU (the daemon, its ring worker processes, xenstored, the
    loop device's kernel threads...) and how often it woke for it."""
    out = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                text = f.read()
        except OSError:
            continue
        comm = text[text.find("(") + 1:text.rfind(")")]
        rest = text.rsplit(")", 1)[1].split()
        out[entry.name] = (comm, int(rest[11]) / CLK_TCK, int(rest[12]) / CLK_TCK, voluntary_switches(entry.name))
    return out


def busiest(before: dict, after: dict, n: int = PROCESSES_SHOWN) -> dict[str, list[float]]:
    """The n processes that spent the most CPU between two process_table()s: {"comm[pid]": [user s, system s,
    main thread's wake-ups]} (keyed by pid: a kernel worker's comm changes with its work)."""
    spent = {}
    for pid, (comm, u1, s1, w1) in after.items():
        _, u0, s0, w0 = before.get(pid, (comm, 0.0, 0.0, 0))
        if u1 - u0 + s1 - s0 > 0:
            spent[f"{comm.split('-')[0] if comm.startswith('kworker') else comm}[{pid}]"] = [
                round(u1 - u0, 3), round(s1 - s0, 3), max(w1 - w0, 0)]
    return dict(sorted(spent.items(), key=lambda kv: -(kv[1][0] + kv[1][1]))[:n])


def daemon_ring_counters() -> dict[str, dict[str, int]] | None:
    """{vdev: RING_COUNTERS summed over its rings} from the daemon's control socket (None if it does not
    answer: the rows then go without)."""
    from xenblk_vhost.control_protocol import ControlError, default_control_path, request_control
    path = default_control_path()
    if path is None:
        return None
    try:
        stats = request_control(path, "stats")
    except (ControlError, OSError, ValueError):
        return None
    out = {}
    for vbd in stats.get("vbds", []):
        tot = vbd.get("total") or {}
        out[vbd.get("vdev")] = {k: int(tot.get(k, 0)) for k in RING_COUNTERS}
    return out


def interrupt(proc: subprocess.Popen, timeout: float) -> bool:
    """SIGINT a recorder (py-spy and perf write their file on it) and wait for it; killed, and False, if it
    does not end within timeout seconds."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return False
    return True


class Profiler:
    """py-spy on the daemon through each (disk, job) window: raw collapsed stacks into DIR."""

    def __init__(self, binary: str, pid: int, out_dir: Path, labels: dict[str, str]) -> None:
        self.binary, self.pid, self.out_dir, self.labels = binary, pid, out_dir, labels
        self.running: dict[tuple[str, str], tuple[subprocess.Popen, Path]] = {}
        self.problems: list[str] = []
        out_dir.mkdir(parents=True, exist_ok=True)

    def start(self, disk: str, job: str) -> None:
        path = self.out_dir / f"{self.labels.get(disk, disk)}.{job}.txt"
        cmd = [self.binary, "record", "--pid", str(self.pid), "--rate", str(PROFILE_RATE), "--format", "raw",
               "--threads", "--subprocesses", "--nonblocking", "--output", str(path)]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(f"{path}.err", "w"))
        except OSError as e:
            self.problems.append(f"py-spy did not start: {e}")
            return
        self.running[(disk, job)] = (proc, path)

    def stop(self, disk: str, job: str) -> None:
        entry = self.running.pop((disk, job), None)
        if entry is None:
            return
        proc, path = entry
        if not interrupt(proc, 60):
            self.problems.append(f"py-spy for {disk} {job} did not stop")
            return
        if path.exists():
            (path.parent / (path.stem + ".top.txt")).write_text(profile_top(path.read_text()))


class PerfRecorder:
    """`perf record -a` through the (disk, job) windows of the chosen jobs; perf's reports at the end (outside
    every window: a report under TCG takes a while)."""

    def __init__(self, jobs: set[str], out_dir: Path, labels: dict[str, str], scratch: Path = PERF_SCRATCH,
                 binary: str = "perf") -> None:
        self.jobs, self.out_dir, self.labels, self.scratch, self.binary = jobs, out_dir, labels, scratch, binary
        self.running: dict[tuple[str, str], subprocess.Popen] = {}
        self.recorded: list[tuple[Path, Path]] = []  # (data, report)
        self.problems: list[str] = []

    def start(self, disk: str, job: str) -> None:
        if job not in self.jobs:
            return
        name = f"{self.labels.get(disk, disk)}.{job}"
        self.scratch.mkdir(parents=True, exist_ok=True)
        data = self.scratch / f"{name}.perf.data"
        cmd = [self.binary, "record", "-a", "-g", "-e", "cpu-clock", "-F", str(PERF_RATE), "-o", str(data)]
        try:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        except OSError as e:
            self.problems.append(f"perf did not start: {e}")
            return
        self.running[(disk, job)] = proc
        self.recorded.append((data, self.out_dir / f"{name}.txt"))

    def stop(self, disk: str, job: str) -> None:
        proc = self.running.pop((disk, job), None)
        if proc is None:
            return
        if not interrupt(proc, 120):
            self.problems.append(f"perf for {disk} {job} did not stop")

    def reports(self) -> None:
        """perf's report of every window recorded: by process, then by process, library and function."""
        for key in list(self.running):
            self.stop(*key)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for data, report in self.recorded:
            if not data.exists():
                self.problems.append(f"perf wrote no {data.name}")
                continue
            base = [self.binary, "report", "-i", str(data), "--stdio", "--no-children", "-g", "none"]
            parts = []
            for sort, limit in (("comm", "0.5"), ("comm,dso,symbol", "0.3")):
                got = subprocess.run([*base, "--sort", sort, "--percent-limit", limit], capture_output=True,
                                     text=True, timeout=900)
                parts.append(got.stdout if got.returncode == 0 else f"perf report failed: {got.stderr[-2000:]}")
            report.write_text("\n".join(parts))
            data.unlink()


def profile_top(collapsed: str) -> str:
    """The functions of py-spy's raw output (one "frame;frame;... count" line per stack) with the most samples:
    self (the stack's last frame) and total (anywhere in the stack), per thread and for all."""
    own: collections.Counter = collections.Counter()
    anywhere: collections.Counter = collections.Counter()
    threads: collections.Counter = collections.Counter()
    samples = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        samples += n
        frames = stack.split(";")
        # (--threads: a frame names the thread; --subprocesses: one before it names the process)
        head = 2 if frames[0].startswith("process ") and len(frames) > 1 else 1
        threads[";".join(frames[:head])] += n
        own[frames[-1]] += n
        for frame in set(frames[head:]):
            anywhere[frame] += n
    lines = [f"{samples} samples at {PROFILE_RATE}/s (~{samples / PROFILE_RATE:.1f} s of CPU)", "", "threads:"]
    lines += [f"  {n:6d} {100 * n / max(samples, 1):5.1f}%  {t}" for t, n in threads.most_common()]
    lines += ["", "self (the frame on top of the stack):"]
    lines += [f"  {n:6d} {100 * n / max(samples, 1):5.1f}%  {f}" for f, n in own.most_common(PROFILE_TOP)]
    lines += ["", "total (the frame anywhere in the stack):"]
    lines += [f"  {n:6d} {100 * n / max(samples, 1):5.1f}%  {f}" for f, n in anywhere.most_common(PROFILE_TOP)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- fio's report

def fio_figures(report: dict) -> dict:
    """IOPS, MB/s, completion latency p50/p99 (us) and I/Os of a fio JSON report's one job."""
    job = report["jobs"][0]
    side = job["read"] if job["read"]["total_ios"] else job["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {
        "iops": side["iops"], "MBps": side["bw_bytes"] / 1e6, "ios": side["total_ios"],
        "runtime_s": side["runtime"] / 1e3,
        "p50_us": pct.get("50.000000", 0) / 1e3, "p99_us": pct.get("99.000000", 0) / 1e3,
        "guest_usr_pct": job.get("usr_cpu"), "guest_sys_pct": job.get("sys_cpu"),
    }


class Collector:
    """Consumes one guest's console lines; keeps per (disk, job) CPU windows and fio figures."""

    def __init__(self, labels: dict[str, str], read_counters, ring_counters=None, profiler=None, perf=None):
        self.labels = labels
        self.read_counters = read_counters  # () -> {"t": s, "dom0": s, "xenblk-vhost": s or None}
        self.ring_counters = ring_counters  # () -> daemon_ring_counters()'s dict or None
        self.profiler: Profiler | None = profiler
        self.perf: PerfRecorder | None = perf
        self.ring_open: dict[tuple[str, str], dict] = {}
        self.rings: dict[tuple[str, str], dict] = {}
        self.procs_open: dict[tuple[str, str], dict] = {}
        self.procs: dict[tuple[str, str], dict] = {}
        self.open: dict[tuple[str, str], dict] = {}
        self.windows: dict[tuple[str, str], dict] = {}
        self.figures: dict[tuple[str, str], dict] = {}
        self.jobs: list[str] = []
        self.done: str | None = None
        self.problems: list[str] = []

    def line(self, text: str) -> None:
        text = text.rstrip("\r\n")
        parts = text.split(" ", 3)
        tag = parts[0]
        if tag == "XENBLK-FIO-BEGIN" and len(parts) >= 3:
            key = (parts[1], parts[2])
            # (the daemon's counters and the profiler outside the CPU window where they can be)
            if self.ring_counters is not None:
                self.ring_open[key] = self.ring_counters()
            self.procs_open[key] = process_table()
            self.open[key] = self.read_counters()
            if self.profiler is not None and self.labels.get(parts[1]) != REFERENCE:
                self.profiler.start(*key)
            if self.perf is not None:
                self.perf.start(*key)
            if parts[2] not in self.jobs:
                self.jobs.append(parts[2])
        elif tag == "XENBLK-FIO-END" and len(parts) >= 3:
            key = (parts[1], parts[2])
            start = self.open.pop(key, None)
            if start is None:
                self.problems.append(f"END without BEGIN: {text}")
                return
            end = self.read_counters()
            if self.perf is not None:
                self.perf.stop(*key)
            self.windows[key] = {k: (None if end[k] is None or start[k] is None else end[k] - start[k]) for k in end}
            if key in self.procs_open:
                self.procs[key] = busiest(self.procs_open.pop(key), process_table())
            if self.profiler is not None:
                self.profiler.stop(*key)
            if self.ring_counters is not None:
                before, after = self.ring_open.pop(key, None), self.ring_counters()
                if before and after and parts[1] in before and parts[1] in after:
                    self.rings[key] = {k: after[parts[1]][k] - before[parts[1]][k] for k in RING_COUNTERS}
        elif tag == "XENBLK-FIO-JSON" and len(parts) == 4:
            try:
                self.figures[(parts[1], parts[2])] = fio_figures(json.loads(parts[3]))
            except (ValueError, KeyError, IndexError) as e:
                self.problems.append(f"unreadable fio report for {parts[1]} {parts[2]}: {e}")
        elif tag == "CHECK" and len(parts) >= 3 and parts[2] == "fail":
            self.problems.append(text)
        elif tag.startswith("XENBLK-GUEST-DONE"):
            self.done = text.split("=", 1)[-1]

    def results(self) -> dict:
        """{job: {label: figures and CPU of that job on that disk}}."""
        out: dict = {}
        for job in self.jobs:
            for disk, label in self.labels.items():
                fig, win = self.figures.get((disk, job)), self.windows.get((disk, job))
                if fig is None or win is None:
                    continue
                row = dict(fig, disk=disk, window_s=win["t"], dom0_cpu_s=win["dom0"],
                           dom0_steal_s=win.get("steal"), dom0_user_s=win.get("user"))
                if win.get("xenblk-vhost") is not None:
                    row["daemon_cpu_s"] = win["xenblk-vhost"]
                if (disk, job) in self.rings:
                    row["rings"] = self.rings[(disk, job)]
                if (disk, job) in self.procs:
                    row["processes"] = self.procs[(disk, job)]
                out.setdefault(job, {})[label] = row
        return out


def combine(per_guest: list[dict], idle_rate: float) -> dict:
    """One table from the guests' results: CPU per I/O, and ratios to blkback's row of each job.

    idle_rate: dom0's busy CPU seconds per second with no guest I/O.
    """
    jobs: dict = {}
    for results in per_guest:
        for job, rows in results.items():
            jobs.setdefault(job, {}).update(rows)
    for rows in jobs.values():
        for row in rows.values():
            ios, t = max(row["ios"], 1), row["window_s"]
            row["dom0_cpu_us_per_io"] = 1e6 * row["dom0_cpu_s"] / ios
            row["dom0_cpu_net_us_per_io"] = 1e6 * max(row["dom0_cpu_s"] - idle_rate * t, 0) / ios
            row["dom0_cpu_pct"] = 100 * row["dom0_cpu_s"] / t if t else None
            if row.get("dom0_steal_s") is not None:
                row["dom0_steal_pct"] = 100 * row["dom0_steal_s"] / t if t else None
            if row.get("dom0_user_s") is not None and row["dom0_cpu_s"]:
                row["dom0_user_share_pct"] = 100 * row["dom0_user_s"] / row["dom0_cpu_s"]
            if "daemon_cpu_s" in row:
                row["daemon_cpu_us_per_io"] = 1e6 * row["daemon_cpu_s"] / ios
                row["daemon_cpu_pct"] = 100 * row["daemon_cpu_s"] / t if t else None
        ref = rows.get(REFERENCE)
        if ref:
            for row in rows.values():
                row["iops_vs_blkback"] = row["iops"] / ref["iops"] if ref["iops"] else None
                row["dom0_cpu_vs_blkback"] = (row["dom0_cpu_us_per_io"] / ref["dom0_cpu_us_per_io"]
                                              if ref["dom0_cpu_us_per_io"] else None)
    return {"idle_dom0_cpu_per_s": idle_rate, "jobs": jobs}


def summary(results: dict) -> str:
    lines = [f"{'job':18} {'backend':15} {'IOPS':>8} {'MB/s':>7} {'p50us':>8} {'p99us':>9} "
             f"{'dom0us/IO':>9} {'net':>7} {'dom0%':>6} {'usr%':>5} {'xbv%':>5} {'steal%':>6} {'xIOPS':>6} "
             f"{'xCPU':>6}"]
    for job, rows in results["jobs"].items():
        for label, r in rows.items():
            def f(key, fmt, r=r):
                v = r.get(key)
                return "-" if v is None else format(v, fmt)
            lines.append(f"{job:18} {label:15} {r['iops']:8.0f} {r['MBps']:7.1f} {r['p50_us']:8.0f} "
                         f"{r['p99_us']:9.0f} {r['dom0_cpu_us_per_io']:9.0f} {r['dom0_cpu_net_us_per_io']:7.0f} "
                         f"{f('dom0_cpu_pct', '6.0f')} {f('dom0_user_share_pct', '5.0f')} "
                         f"{f('daemon_cpu_pct', '5.0f')} {f('dom0_steal_pct', '6.0f')} "
                         f"{f('iops_vs_blkback', '6.2f')} {f('dom0_cpu_vs_blkback', '6.2f')}")
    lines.append(f"xIOPS, xCPU: IOPS and dom0 CPU per I/O as a multiple of kernel blkback's (same guest, same "
                 f"job, same boot); net: dom0 CPU per I/O above dom0's idle rate "
                 f"({100 * results['idle_dom0_cpu_per_s']:.1f}% of a CPU); dom0%: busy, all vCPUs (200% = both); "
                 f"usr%: of dom0's busy time, user space (processes' own code; the rest is the kernel: "
                 f"syscalls, grant copies, hypercalls, interrupts); xbv%: the xenblk-vhost process (its "
                 f"tick-based times include steal; not its ring worker processes); steal%: time dom0 "
                 f"wanted a CPU and did not get it (under TCG: a loaded host): figures with much of it are "
                 f"noise.")
    ring_rows = [(job, label, r["rings"]) for job, rows in results["jobs"].items()
                 for label, r in rows.items() if r.get("rings")]
    if ring_rows:
        lines += ["", f"{'job':18} {'backend':15} {'requests':>9} {'engine%':>8} {'poll%':>6} {'req/return':>10} "
                      f"{'spurious':>9} {'oo_req':>7} {'sys/req':>8} {'sleep/req':>9} {'mapped%':>8}"]
        for job, label, c in ring_rows:
            n = c["rd_req"] + c["wr_req"]
            per_return = f"{c['poll_req'] / c['poll_returns']:10.1f}" if c["poll_returns"] else f"{'-':>10}"
            engine_n = max(c["engine_req"], 1)
            segs = c.get("copy_segs_mapped", 0) + c.get("copy_segs_xen", 0)
            mapped = f"{100 * c.get('copy_segs_mapped', 0) / segs:8.1f}" if segs else f"{'-':>8}"
            lines.append(f"{job:18} {label:15} {n:9d} {100 * c['engine_req'] / max(n, 1):8.1f} "
                         f"{100 * c['poll_req'] / max(n, 1):6.1f} {per_return} {c['spurious_wakeups']:9d} "
                         f"{c['oo_req']:7d} {c.get('engine_syscalls', 0) / engine_n:8.2f} "
                         f"{c.get('engine_sleeps', 0) / engine_n:9.2f} {mapped}")
        lines.append("From the daemon's counters around each job (ctl stats): engine%: requests the compiled ring "
                     "engine took; poll%: of them in its own poll (no trio between requests); req/return: requests "
                     "per return of that poll to Python; spurious: wake-ups that found no request; sys/req, "
                     "sleep/req: kernel calls the engine made itself per request it took (each a trip through "
                     "Xen in a PV dom0), and of them its sleeps in poll(); mapped%: of the engine's grant-copy "
                     "segments, those it copied itself from the frontend's persistently mapped pages (the rest "
                     "went to Xen's grant copy).")
    proc_rows = [(job, label, r) for job, rows in results["jobs"].items() for label, r in rows.items()
                 if r.get("processes")]
    if proc_rows:
        lines += ["", f"{'job':18} {'backend':15} the processes that spent most CPU: user+system us per I/O "
                      f"(/ their main thread's wake-ups per second)"]
        for job, label, r in proc_rows:
            ios, t = max(r["ios"], 1), max(r.get("window_s") or 0.0, 1e-9)
            parts = []
            for name, (u, sy, *woke) in r["processes"].items():
                part = f"{name} {1e6 * u / ios:.0f}+{1e6 * sy / ios:.0f}"
                parts.append(part + (f"/{woke[0] / t:.0f}" if woke else ""))
            lines.append(f"{job:18} {label:15} " + ", ".join(parts))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- commands

def cmd_idle(args) -> int:
    t0, c0 = time.monotonic(), dom0_busy_seconds()
    time.sleep(args.seconds)
    t1, c1 = time.monotonic(), dom0_busy_seconds()
    print(json.dumps({"idle_dom0_cpu_per_s": (c1 - c0) / (t1 - t0), "seconds": t1 - t0}))
    return 0


def cmd_clock(args) -> int:
    """What a clock read costs here against a plain syscall (getppid) and a Python call that makes none: under
    a PV dom0 whose TSC Linux marked unstable (the clocksource is then xen's), clock_gettime has no vDSO
    path and goes through the kernel and Xen like any syscall. The ring engine reads the clock per request."""
    def per_call(fn, n=args.calls) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return 1e6 * (time.perf_counter() - t0) / n
    try:
        source = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource").read_text().strip()
    except OSError:
        source = "?"
    print(json.dumps({"clocksource": source, "clock_gettime_us": round(per_call(time.monotonic_ns), 2),
                      "getppid_us": round(per_call(os.getppid), 2), "python_call_us": round(per_call(int), 2)}))
    return 0


class FileWatch:
    """Sleep until a file is written to (inotify), or up to a timeout: the console log is written only at a
    job's edges, so following it costs no wake-up in between (polling it every 0.1 s was 10 wake-ups a second
    of this Python process in every job, blkback's too: 40-60 us of dom0 CPU per QD1 I/O under TCG). Where
    inotify is not to be had, wait() sleeps `fallback` seconds instead."""

    IN_MODIFY, IN_CREATE, IN_CLOEXEC, IN_NONBLOCK = 0x2, 0x100, 0o2000000, 0o4000

    def __init__(self, path: str, fallback: float) -> None:
        self.fallback = fallback
        self.name = os.fsencode(os.path.basename(path))
        self.fd = -1
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.inotify_init1(self.IN_CLOEXEC | self.IN_NONBLOCK)
            if fd >= 0:
                # the directory's: the file may not exist yet, and xenconsoled may create it anew
                if libc.inotify_add_watch(fd, os.fsencode(os.path.dirname(os.path.abspath(path))),
                                          self.IN_MODIFY | self.IN_CREATE) >= 0:
                    self.fd = fd
                else:
                    os.close(fd)
        except (OSError, AttributeError):
            self.fd = -1

    def wait(self, timeout: float) -> None:
        """Until the file is written to (or created), or timeout seconds."""
        if self.fd < 0:
            time.sleep(min(self.fallback, timeout))
            return
        until = time.monotonic() + timeout
        while (left := until - time.monotonic()) > 0:
            if not select.select([self.fd], [], [], left)[0]:
                return
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            # struct inotify_event: wd, mask, cookie, len, then the name. Events of another file of the
            # directory (another guest's log) are not ours: wait on.
            pos = 0
            while pos + 16 <= len(data):
                size = struct.unpack_from("iIII", data, pos)[3]
                if data[pos + 16:pos + 16 + size].rstrip(b"\0") == self.name:
                    return
                pos += 16 + size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def cmd_follow(args) -> int:
    labels = dict(d.split("=", 1) for d in args.disk)

    def counters() -> dict:
        busy, steal, user = dom0_cpu_seconds()
        return {"t": time.monotonic(), "dom0": busy, "steal": steal, "user": user,
                "xenblk-vhost": process_cpu_seconds(args.daemon_pid) if args.daemon_pid else None}

    profiler = None
    if args.profiler and args.daemon_pid:
        profiler = Profiler(args.profiler, args.daemon_pid, Path(args.profile_dir or Path(args.out).parent), labels)
    perf = None
    if args.perf_jobs:
        perf = PerfRecorder(set(args.perf_jobs.split(",")), Path(args.perf_dir or Path(args.out).parent), labels)
    col = Collector(labels, counters, daemon_ring_counters if args.daemon_pid else None, profiler, perf)
    deadline = time.monotonic() + args.timeout
    watch = FileWatch(args.console, args.poll)  # (before the first read: no write goes unnoticed)
    pos, buf = 0, b""
    last_line = time.monotonic()
    while col.done is None and time.monotonic() < deadline:
        try:
            with open(args.console, "rb") as f:
                f.seek(pos)
                chunk = f.read()
        except FileNotFoundError:
            chunk = b""
        pos += len(chunk)
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            col.line(line.decode(errors="replace"))
        if lines:
            last_line = time.monotonic()
            continue
        # Quiet for longer than any job: is the guest still there? (`xl` costs
        # dom0 CPU, so never asked while a job may be running.)
        if args.guest and time.monotonic() - last_line > QUIET_CHECK_S:
            last_line = time.monotonic()
            if subprocess.run(["xl", "domid", args.guest], capture_output=True).returncode != 0:
                col.problems.append(f"guest {args.guest} is gone")
                break
        watch.wait(max(0.0, min(QUIET_CHECK_S, deadline - time.monotonic())))
    watch.close()
    if col.done is None and not col.problems:
        col.problems.append(f"the guest did not finish within {args.timeout:.0f} s")
    elif col.done is not None and col.done != "ok":
        col.problems.append(f"the guest finished with status {col.done}")
    if profiler is not None:
        for key in list(profiler.running):
            profiler.stop(*key)
        col.problems += profiler.problems
    if perf is not None:
        perf.reports()
        col.problems += perf.problems
    missing = [f"{d} {j}" for j in col.jobs for d in labels if (d, j) not in col.figures]
    if missing:
        col.problems.append(f"no fio figures for {', '.join(missing)}")
    Path(args.out).write_text(json.dumps({"jobs": col.results(), "problems": col.problems}, indent=1) + "\n")
    for p in col.problems:
        print(f"bench_monitor: {p}", file=sys.stderr)
    return 1 if col.problems else 0


def cmd_table(args) -> int:
    idle = json.loads(Path(args.idle_json).read_text())["idle_dom0_cpu_per_s"]
    table = combine([json.loads(Path(p).read_text())["jobs"] for p in args.results], idle)
    out = Path(args.out)
    (out / "results.json").write_text(json.dumps(table, indent=1) + "\n")
    text = summary(table)
    (out / "summary.txt").write_text(text)
    print(text, end="")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("idle")
    p.add_argument("seconds", type=float)
    p = sub.add_parser("clock")
    p.add_argument("--calls", type=int, default=20000)
    p = sub.add_parser("follow")
    p.add_argument("--console", required=True)
    p.add_argument("--guest", help="the guest's name: stop if it is gone")
    p.add_argument("--disk", action="append", required=True, help="VDEV=LABEL (label blkback: the reference)")
    p.add_argument("--daemon-pid", type=int, help="the xenblk-vhost process serving the disks")
    p.add_argument("--out", required=True, help="JSON file for this guest's figures")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--profiler", help="py-spy binary: profile the daemon through each job of its disks")
    p.add_argument("--profile-dir", help="where the profiles go (default: --out's directory)")
    p.add_argument("--perf-jobs", help="JOB[,JOB]: perf record all of dom0 through these jobs of every disk")
    p.add_argument("--perf-dir", help="where perf's reports go (default: --out's directory)")
    p.add_argument("--poll", type=float, default=0.1,
                   help="seconds between looks at the console where inotify cannot watch it")
    p = sub.add_parser("table")
    p.add_argument("--idle-json", required=True, help="output of `idle`")
    p.add_argument("--out", required=True, help="directory for results.json and summary.txt")
    p.add_argument("results", nargs="+", help="`follow` outputs")
    args = ap.parse_args(argv)
    return {"idle": cmd_idle, "clock": cmd_clock, "follow": cmd_follow, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
