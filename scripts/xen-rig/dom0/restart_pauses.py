#!/usr/bin/env python3
"""The restart scenario's verdict on pauses and reconnects, from what dom0 and the guest logged.

    restart_pauses.py EVENTS CONSOLE STATES OUT.json

EVENTS   lines "KIND REALTIME" written by dom0 as it acts (KIND: handover,
         kill; or ready, a new daemon serving: not a pause), REALTIME =
         `date +%s.%N`
CONSOLE  the guest's console: "XENBLK-STALL START MS WHAT DEV@POS" for every
         I/O that took at least xenblk.stall_ms (odio -l; START is the
         guest's realtime clock, which Xen keeps with dom0's)
STATES   lines "REALTIME BACKEND-STATE FRONTEND-STATE" sampled by dom0

For each event: the longest guest I/O that was under way at that moment
(started before it, ended after it) is the pause that event caused
(pause_s, from that I/O's start), and how long after the event the last of
those I/Os ended (after_event_s: the part of the stall the event can have
caused; under TCG on a loaded host an I/O may already have waited most of
a second before the event). baseline_longest_s is the longest stall with no
event in it (nor in the time from an event to the daemon serving again):
what the guest sees from the emulation alone in this run. The report gives
the longest pause of each kind, and every xenbus state other than
Connected (4) that either end showed (a reconnect). Prints one line per
kind and writes OUT.json. Exit 0; the scenario decides.
"""

from __future__ import annotations

import json
import sys


def read_events(path: str) -> list[tuple[str, float]]:
    out = []
    for line in open(path):
        parts = line.split()
        if len(parts) == 2:
            out.append((parts[0], float(parts[1])))
    return out


def read_stalls(path: str) -> list[tuple[float, float, str]]:
    out = []
    for line in open(path, errors="replace"):
        at = line.find("XENBLK-STALL ")
        if at < 0:
            continue
        parts = line[at:].split()
        try:
            start, ms = float(parts[1]), float(parts[2])
        except (IndexError, ValueError):
            continue
        out.append((start, ms / 1000.0, " ".join(parts[3:5])))
    return out


def read_states(path: str) -> list[tuple[float, str, str]]:
    out = []
    for line in open(path):
        parts = line.split()
        if len(parts) == 3:
            out.append((float(parts[0]), parts[1], parts[2]))
    return out


PAUSE_KINDS = ("handover", "kill")  # the other events ("ready") only mark time


SERVING_KINDS = ("serving", "ready")  # a daemon serving again: the end of an event's window


def event_windows(events) -> list[tuple[float, float]]:
    """(event, the next daemon serving after it) for each pause event; to the end of time without one."""
    windows = []
    for i, (kind, t) in enumerate(events):
        if kind in PAUSE_KINDS:
            end = next((t2 for k2, t2 in events[i + 1:] if k2 in SERVING_KINDS), float("inf"))
            windows.append((t, end))
    return windows


def analyse(events, stalls, states) -> dict:
    windows = event_windows(events)
    quiet = [d for s, d, _ in stalls if not any(s <= end and s + d >= t for t, end in windows)]
    events = [(k, t) for k, t in events if k in PAUSE_KINDS]
    per_event = []
    for kind, t in events:
        under_way = [(s, d, what) for s, d, what in stalls if s <= t <= s + d]
        pause = max((d for _, d, _ in under_way), default=0.0)
        after = max((s + d - t for s, d, _ in under_way), default=0.0)
        per_event.append({"kind": kind, "at": t, "pause_s": round(pause, 3), "after_event_s": round(after, 3),
                          "ios_stalled": len(under_way)})
    kinds = sorted({k for k, _ in events})
    longest = {k: max((e["pause_s"] for e in per_event if e["kind"] == k), default=0.0) for k in kinds}
    not_connected = [{"at": t, "backend": be, "frontend": fe} for t, be, fe in states if (be, fe) != ("4", "4")]
    counts = {k: sum(1 for e in events if e[0] == k) for k in kinds}
    return {"events": per_event, "longest_pause_s": longest, "counts": counts,
            "baseline_longest_s": round(max(quiet, default=0.0), 3), "baseline_stalls": len(quiet),
            "state_samples": len(states), "not_connected": not_connected[:20],
            "not_connected_samples": len(not_connected)}


def main(argv: list[str]) -> int:
    events_path, console_path, states_path, out_path = argv
    report = analyse(read_events(events_path), read_stalls(console_path), read_states(states_path))
    with open(out_path, "w") as f:
        json.dump(report, f, indent=1)
    for kind, pause in report["longest_pause_s"].items():
        print(f"{kind}: {report['counts'][kind]} events, longest guest I/O pause {pause:.3f} s")
    print(f"no event: {report['baseline_stalls']} guest I/Os over the stall bound, longest "
          f"{report['baseline_longest_s']:.3f} s (the emulation's own noise in this run)")
    print(f"xenbus states sampled {report['state_samples']} times, "
          f"{report['not_connected_samples']} not Connected/Connected")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
