#!/usr/bin/env python3
"""Every hostile-frontend attack class N times against the real service, beside a working guest.

    .venv/bin/python scripts/hostile_campaign.py [--rounds N] [--data-path copy|map|both] [--json]

Runs tests/hostile_support/campaign.py (the same harness tests/test_hostile_guests.py
asserts on) and prints the README's Security table: requests tried and answered per
class, wrong answers, out-of-range accesses, crashes, the other guest's worst latency,
and the peaks of memory, fds, tasks and grant mappings against the idle baseline.
Exit status 1 if anything that must be zero is not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from hostile_support.campaign import RING_INFLIGHT, RING_MEMORY, Report, run_campaign  # noqa: E402

MiB = 1 << 20


def table(report: Report) -> str:
    lines = [f"data path: {report.data_path}, rounds: {report.rounds}, {report.elapsed_s:.1f} s",
             "", "| class | public record | runs | requests tried | answered | unanswered | wrong answers "
             "| out-of-range | ring halted | racer rounds |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for row in report.rows.values():
        o = row.outcome
        lines.append(f"| {row.name} | {row.record} | {row.runs} | {o.tried} | {o.answered} | {o.unanswered} "
                     f"| {len(o.wrong)} | {row.out_of_range + o.changed_pages} | {'yes' if o.halted else 'no'} "
                     f"| {o.race_rounds} |")
    total = sum(r.outcome.tried for r in report.rows.values())
    lines += [
        f"| vanish mid-I/O | domain destroyed with requests in flight | 1 | {report.vanish_in_flight} | - | - "
        f"| - | - | - | - |", "",
        f"requests tried: {total + report.vanish_in_flight}; crashes: {report.crashes}; "
        f"out-of-range accesses: {report.out_of_range}; unanswered requests: {report.unanswered}; "
        f"wrong answers: {len(report.wrong)}",
        f"the other guest: {report.alice_requests} verified requests, ok={report.alice_ok}, "
        f"worst latency {report.alice_max_latency_s * 1000:.0f} ms under attack "
        f"(mean {report.alice_mean_latency_s * 1000:.1f} ms; worst {report.alice_quiet_max_latency_s * 1000:.0f} ms "
        f"before the attacks), disk outside its workload untouched={report.alice_untouched}",
        f"memory (RSS of the process running the service and the attacker, the simulated guests' memory "
        f"mapped in it left out): baseline "
        f"{report.rss.baseline / MiB:.1f} MiB, peak {report.rss.peak / MiB:.1f} MiB "
        f"(+{(report.rss.peak - report.rss.baseline) / MiB:.1f} MiB; mallory's ring: limits.memory "
        f"{RING_MEMORY // MiB} MiB, max_inflight {RING_INFLIGHT})",
        f"fds: baseline {report.fds.baseline}, peak {report.fds.peak}, after {report.fds.after}; "
        f"trio tasks: baseline {report.tasks.baseline}, peak {report.tasks.peak}, after {report.tasks.after}; "
        f"mallory's grant mappings: baseline {report.maps.baseline}, peak {report.maps.peak}, "
        f"after {report.maps.after}, after it vanished {report.maps_after_vanish}",
        f"notify storm: this process's CPU {report.storm_cpu_share * 100:.0f} % of a core while the racer kicked",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--data-path", choices=("copy", "map", "both"), default="both")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    paths = ("copy", "map") if args.data_path == "both" else (args.data_path,)
    print(f"machine: {platform.node()} {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    bad = False
    for dp in paths:
        with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
            report = trio.run(lambda: run_campaign(Path(tmp), rounds=args.rounds, data_path=dp))  # noqa: B023
        print(json.dumps(asdict(report), default=str, indent=1) if args.json else table(report))
        print()
        for w in report.wrong[:20]:
            print("WRONG:", w)
        bad |= bool(report.crashes or report.out_of_range or report.unanswered or report.wrong
                    or not report.alice_ok or report.maps_after_vanish)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
