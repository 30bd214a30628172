#!/usr/bin/env python3
"""Issue 12's crash proof: SIGKILL `xenblk-vhost run` N times under a busy, verifying guest on out-of-order storage.

    scripts/crash_campaign.py [--kills 200] [--seed 1] [--max-life 0.4] [--max-delay-ms 6] [--no-journal] [--plain]

Runs tests/e2e_support/crash_campaign.py (read it for the chain and the
checks): the simulated guest's verifying workload (2 rings, reads, writes,
flush, barrier, discard, indirect) on qemu-storage-daemon -> NBD ->
slow_nbd.py (every request completes after its own random delay); the
daemon killed at a random moment 0..max-life s after it took the rings over, a new
one started at once, `--kills` times. Prints one line per 10 kills and the
summary; exit 0 when nothing was lost, repeated or corrupted and every
restart took the device over Connected. `--no-journal`: the same without
the journal, to see what it prevents (expect FAILED). `--plain`: the guest
sends only direct reads and writes (up to 11 pages), so that the copy
path's lane holds whole batches (README step 13) when the kills come. Each
daemon is killed once it has taken the rings over.

qemu-storage-daemon 7.2 (Debian 12) now and then aborts when its
vhost-user client is killed with requests in flight
(`vhost_user_server_ref: Assertion '!server->wait_idle' failed`,
util/vhost-user-server.c): then every later client is refused
(ECONNREFUSED). The campaign starts it again at once, as its service
manager would, and counts it ("qemu-storage-daemon crashed and restarted N
time(s)", with its last log line); the backend must ride it out (storage
reconnect, or its takeover retried) with the guest seeing only a pause.

A workload with requests in flight and none answered for 60 s ends the
campaign at once, printing every outstanding request (id, op, sector, ring
position and slot, age) and what its ring's journal says of that position
(taken and unanswered, answered with status and response position, or
absent), with the daemon's last lines.

The default suite runs 5 kills of the same (tests/test_crash_campaign.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from e2e_support.crash_campaign import crash_campaign  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=200)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--max-life", type=float, default=0.4, help="kill within this many seconds of the takeover")
    p.add_argument("--max-delay-ms", type=float, default=6.0, help="the storage's longest per-request delay")
    p.add_argument("--no-journal", action="store_true", help="the daemons run without the journal")
    p.add_argument("--plain", action="store_true", help="only direct reads and writes (the copy lane's batches)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="crash-campaign-") as d:
        result = trio.run(lambda: crash_campaign(Path(d), kills=args.kills, seed=args.seed, max_life=args.max_life,
                                                 max_delay_ms=args.max_delay_ms, journal=not args.no_journal,
                                                 plain=args.plain,
                                                 progress=lambda s: print(s, flush=True)))
    print(f"crash campaign (sim; {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f} at the end): {result.summary()}")
    for problem in result.problems[:80]:
        print(f"  problem: {problem}")
    for crash in result.storage_crashes:
        print(f"  qemu-storage-daemon died (started again): {crash}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
