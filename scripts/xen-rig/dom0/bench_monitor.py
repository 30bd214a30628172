#!/usr/bin/env python3
"""The bench scenario's dom0 side: CPU per fio job and per backend, then the table.

    bench_monitor.py idle SECONDS                     dom0's CPU rate doing nothing (JSON)
    bench_monitor.py follow --console LOG --guest NAME --disk xvda=blkback ... \
        [--daemon-pid PID] --out FILE [--timeout S]
    bench_monitor.py table --idle-json FILE --out DIR RESULTS.json...

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

Under TCG absolute figures mean little; ratios measured in one boot, with
the same guest and the same jobs, are the point.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
REFERENCE = "blkback"
QUIET_CHECK_S = 60  # no console line for this long (longer than a job): check the guest still exists


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

    def __init__(self, labels: dict[str, str], read_counters):
        self.labels = labels
        self.read_counters = read_counters  # () -> {"t": s, "dom0": s, "xenblk-vhost": s or None}
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
            self.open[(parts[1], parts[2])] = self.read_counters()
            if parts[2] not in self.jobs:
                self.jobs.append(parts[2])
        elif tag == "XENBLK-FIO-END" and len(parts) >= 3:
            start = self.open.pop((parts[1], parts[2]), None)
            if start is None:
                self.problems.append(f"END without BEGIN: {text}")
                return
            end = self.read_counters()
            self.windows[(parts[1], parts[2])] = {k: (None if end[k] is None or start[k] is None else end[k] - start[k])
                                                  for k in end}
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
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- commands

def cmd_idle(args) -> int:
    t0, c0 = time.monotonic(), dom0_busy_seconds()
    time.sleep(args.seconds)
    t1, c1 = time.monotonic(), dom0_busy_seconds()
    print(json.dumps({"idle_dom0_cpu_per_s": (c1 - c0) / (t1 - t0), "seconds": t1 - t0}))
    return 0


def cmd_follow(args) -> int:
    labels = dict(d.split("=", 1) for d in args.disk)

    def counters() -> dict:
        busy, steal, user = dom0_cpu_seconds()
        return {"t": time.monotonic(), "dom0": busy, "steal": steal, "user": user,
                "xenblk-vhost": process_cpu_seconds(args.daemon_pid) if args.daemon_pid else None}

    col = Collector(labels, counters)
    deadline = time.monotonic() + args.timeout
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
        time.sleep(args.poll)
    if col.done is None and not col.problems:
        col.problems.append(f"the guest did not finish within {args.timeout:.0f} s")
    elif col.done is not None and col.done != "ok":
        col.problems.append(f"the guest finished with status {col.done}")
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
    p = sub.add_parser("follow")
    p.add_argument("--console", required=True)
    p.add_argument("--guest", help="the guest's name: stop if it is gone")
    p.add_argument("--disk", action="append", required=True, help="VDEV=LABEL (label blkback: the reference)")
    p.add_argument("--daemon-pid", type=int, help="the xenblk-vhost process serving the disks")
    p.add_argument("--out", required=True, help="JSON file for this guest's figures")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--poll", type=float, default=0.1)
    p = sub.add_parser("table")
    p.add_argument("--idle-json", required=True, help="output of `idle`")
    p.add_argument("--out", required=True, help="directory for results.json and summary.txt")
    p.add_argument("results", nargs="+", help="`follow` outputs")
    args = ap.parse_args(argv)
    return {"idle": cmd_idle, "follow": cmd_follow, "table": cmd_table}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
