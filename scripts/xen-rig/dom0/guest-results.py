#!/usr/bin/env python3
"""Judge one guest run from its console log and a xenstore snapshot.

Reads the guest workload's RESULT/CHECK/XENBLK-GUEST-DONE lines (domu/init),
the frontend and backend xenstore keys dom0 saw once the vbd was Connected,
derives what was negotiated, checks caller expectations, and merges all of it
into a JSON results file (one entry per guest) that later scenarios, e.g. our
backend's, can be compared with. Exit 1 with one line per problem.

Runs with dom0's system python3 (standard library only).
"""
from __future__ import annotations

import argparse
import json
import operator
import os
import re
import sys

# Checks each workload step must produce: a step that silently did nothing
# fails here instead of passing.
STEP_CHECKS = {
    "info": ["blkfront_line"],
    "raw": ["raw_fill", "raw_fill_verify", "raw_write_m1_indirect", "raw_verify_m1_indirect",
            "raw_disk_end_verify", "raw_past_end"],
    "discard": [],  # discard_range or discard_refused, see below
    "fs": ["mkfs", "mount", "umount", "fsck_clean", "fs_contents"],
    "resize": ["resize_seen", "resize_new_end", "resize_new_end_verify", "resize_past_end"],
    "busy": [],  # ends only when a disk fails: judged by the scenario itself
}


def parse_console(path: str) -> tuple[dict[str, str], list[tuple[str, str, str]], str | None]:
    results: dict[str, str] = {}
    checks: list[tuple[str, str, str]] = []
    done = None
    with open(path, errors="replace") as f:
        for raw in f:
            line = raw.rstrip("\r\n").replace("\r", "")
            if line.startswith("RESULT "):
                key, _, value = line[7:].partition("=")
                results[key.strip()] = value.strip()
            elif line.startswith("CHECK "):
                parts = line[6:].split(" ", 2)
                if len(parts) >= 2:
                    checks.append((parts[0], parts[1], parts[2] if len(parts) > 2 else ""))
            elif line.startswith("XENBLK-GUEST-DONE"):
                m = re.search(r"status=(\w+)", line)
                done = m.group(1) if m else "?"
    return results, checks, done


def parse_xenstore(path: str) -> tuple[dict[str, str], dict[str, str]]:
    """xenstore-ls -f output of the frontend then the backend directory."""
    fe: dict[str, str] = {}
    be: dict[str, str] = {}
    with open(path) as f:
        for line in f:
            m = re.match(r'^(/\S+) = "(.*)"', line.rstrip("\n"))
            if not m:
                continue
            key, value = m.groups()
            if "/backend/" in key:
                # /local/domain/0/backend/vbd/<domid>/<devid>/<rel>
                rel = key.split("/", 8)[8] if key.count("/") >= 8 else ""
                if rel:
                    be[rel] = value
            elif "/device/vbd/" in key:
                rel = key.split("/device/vbd/", 1)[1].split("/", 1)
                if len(rel) == 2:
                    fe[rel[1]] = value
    return fe, be


def negotiated(res: dict[str, str], fe: dict[str, str], be: dict[str, str]) -> dict[str, object]:
    """What the two ends agreed on, from both the guest's and the store's view."""
    def num(v, default=None):
        try:
            return int(v)
        except (TypeError, ValueError):
            return default

    hw_kb = num(res.get("queue.max_hw_sectors_kb"))
    return {
        "persistent_grants": res.get("persistent_grants"),
        "indirect_descriptors": res.get("indirect_descriptors"),
        # blkfront bounces data through its own pages when the backend is untrusted
        # or (6.1) whenever persistent grants are in use
        "bounce_buffer": res.get("bounce_buffer"),
        "backend_max_indirect_segments": num(be.get("feature-max-indirect-segments"), 0),
        # blkfront sets max_hw_sectors to segments * 4 KiB
        "segments_per_request": hw_kb // 4 if hw_kb else None,
        "flush": res.get("flush"),
        "write_cache": res.get("queue.write_cache"),
        "discard": res.get("discard"),
        "discard_granularity": num(res.get("queue.discard_granularity")),
        "discard_max_bytes": num(res.get("queue.discard_max_bytes")),
        "ring_order": num(fe.get("ring-page-order"), 0),
        "backend_max_ring_order": num(be.get("max-ring-page-order"), 0),
        "queues": num(fe.get("multi-queue-num-queues"), 1),
        "backend_max_queues": num(be.get("multi-queue-max-queues"), 1),
        "guest_hw_queues": num(res.get("nr_hw_queues")),
        "sectors": num(res.get("sectors")),
        "sector_size": num(be.get("sector-size")),
        "protocol": fe.get("protocol"),
        "backend_persistent": be.get("feature-persistent"),
        "frontend_persistent": fe.get("feature-persistent"),
    }


OPS = [(">=", operator.ge), ("<=", operator.le), ("!=", operator.ne), ("=", operator.eq),
       (">", operator.gt), ("<", operator.lt)]


def check_expect(spec: str, flat: dict[str, object]) -> str | None:
    sym, fn = next(((s, f) for s, f in OPS if s in spec), (None, None))
    if sym is None:
        return f"bad --expect '{spec}'"
    key, want = spec.split(sym, 1)
    if key not in flat:
        return f"expected {spec}, but '{key}' was not reported"
    got = flat[key]
    if sym in ("=", "!="):
        ok = fn(str(got), want)
    else:
        try:
            ok = fn(float(got), float(want))
        except (TypeError, ValueError):
            return f"expected {spec}, got non-numeric '{got}'"
    return None if ok else f"expected {spec}, got '{got}'"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--name", required=True)
    ap.add_argument("--console", required=True)
    ap.add_argument("--xenstore", required=True)
    ap.add_argument("--steps", default="info,raw,discard,fs")
    ap.add_argument("--json", required=True, help="results file to merge this guest into")
    ap.add_argument("--lifetime", type=float)
    ap.add_argument("--expect", action="append", default=[])
    a = ap.parse_args()

    problems: list[str] = []
    res, checks, done = parse_console(a.console)
    fe, be = ({}, {})
    if os.path.exists(a.xenstore) and os.path.getsize(a.xenstore):
        fe, be = parse_xenstore(a.xenstore)
    else:
        problems.append("no xenstore snapshot: the vbd never reached Connected (4) while dom0 watched")

    if done is None:
        problems.append("no XENBLK-GUEST-DONE line: the guest crashed, hung or its console was lost")
    elif done != "ok":
        problems.append(f"guest reported status={done}")
    for name, status, detail in checks:
        if status == "fail":
            problems.append(f"guest check {name} failed: {detail}")
    seen = {n for n, _, _ in checks}
    for step in a.steps.split(","):
        if step not in STEP_CHECKS:
            problems.append(f"step {step}: the guest workload has no such step (have {', '.join(STEP_CHECKS)})")
        for c in STEP_CHECKS.get(step, []):
            if c not in seen:
                problems.append(f"step {step}: check {c} never ran")
    if "discard" in a.steps.split(",") and not seen & {"discard_range", "discard_refused"}:
        problems.append("step discard: neither discard_range nor discard_refused ran")

    neg = negotiated(res, fe, be)
    flat: dict[str, object] = dict(res)
    flat.update({f"neg.{k}": v for k, v in neg.items()})
    flat.update({f"xs.fe.{k}": v for k, v in fe.items()})
    flat.update({f"xs.be.{k}": v for k, v in be.items()})
    for spec in a.expect:
        err = check_expect(spec, flat)
        if err:
            problems.append(err)

    entry = {
        "ok": not problems,
        "problems": problems,
        "lifetime_s": a.lifetime,
        "negotiated": neg,
        "guest": res,
        "checks": {n: {"status": s, "detail": d} for n, s, d in checks},
        "xenstore_frontend": fe,
        "xenstore_backend": be,
        "expectations": a.expect,
    }
    allres = {}
    if os.path.exists(a.json):
        with open(a.json) as f:
            allres = json.load(f)
    allres[a.name] = entry
    with open(a.json + ".tmp", "w") as f:
        json.dump(allres, f, indent=2, sort_keys=True)
    os.replace(a.json + ".tmp", a.json)

    print(f"guest {a.name}: {len(checks)} checks, negotiated: " +
          ", ".join(f"{k}={v}" for k, v in neg.items() if v is not None))
    for p in problems:
        print(f"PROBLEM guest {a.name}: {p}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
