"""The demo's summary: one dict (printed as JSON with --json) and its text rendering.

    summary = build_summary(setup, connected, report, backend, ...)
    print(render_text(summary))

Keys of the dict (stable: scripts read them):
  ok, exit_status, interrupted, failure
  driver, data_path, queues_requested, disk_bytes, seconds, elapsed_s
  ops {read, write, flush, barrier, discard, total}      the workload's requests
  shapes {single_segment, multi_segment, indirect}        of reads, writes and barriers
  bytes {read, written, verified}
  iops, mb_per_s                                          ring requests and bytes of the timed phase
                                                          (scrub reads included; setup and final read-back not)
  errors {io, mismatches, frontend}, error_samples, mismatch_samples, frontend_errors
  negotiated {abi, queues, ring_page_order, max_indirect_segments, persistent_grants, flush, discard}
  backend {total, rings}                                  the backend's own counters (blkback's names)
  counters_agree, ring_requests                           every ring request the guest sent vs the backend
  final_verify_s, scrub_passes, at_rest
"""

from __future__ import annotations

from ..blkif.constants import OP_FLUSH_DISKCACHE, OP_WRITE_BARRIER
from ..exit_codes import EXIT_FAILURE, EXIT_INTERRUPTED, EXIT_OK

_FLUSH_NAMES = {OP_FLUSH_DISKCACHE: "flush-cache", OP_WRITE_BARRIER: "barrier", None: "none"}


def negotiated_view(negotiated: dict | None) -> dict | None:
    if not negotiated:
        return None
    return {
        "abi": negotiated["protocol"] or "x86_32-abi (default)",
        "queues": negotiated["nr_rings"],
        "ring_page_order": negotiated["ring_page_order"],
        "max_indirect_segments": negotiated["max_indirect_segments"],
        "persistent_grants": negotiated["persistent"],
        "flush": _FLUSH_NAMES.get(negotiated["flush_op"], str(negotiated["flush_op"])),
        "discard": negotiated["feature_discard"],
    }


def backend_agrees(ring_requests: dict | None, backend_total: dict | None) -> bool | None:
    """Whether the backend counted what the guest sent (blkback counts barriers with flushes)."""
    if not backend_total or not ring_requests:
        return None
    return (backend_total["rd_req"] == ring_requests["read"]
            and backend_total["wr_req"] == ring_requests["write"]
            and backend_total["f_req"] == ring_requests["flush"] + ring_requests["barrier"]
            and backend_total["ds_req"] == ring_requests["discard"])


def build_summary(*, driver: str, data_path: str, queues: int, disk_bytes: int, seconds: float,
                  negotiated: dict | None, report: dict | None, backend: dict | None,
                  frontend_errors: list | None, interrupted: bool, failure: str | None) -> dict:
    report = report or {}
    ops = dict(report.get("ops") or dict.fromkeys(("read", "write", "flush", "barrier", "discard"), 0))
    ops["total"] = sum(ops.values())
    elapsed = report.get("elapsed_s", 0.0)
    errors = {"io": report.get("errors", 0), "mismatches": report.get("mismatches", 0),
              "frontend": len(frontend_errors or [])}
    backend_total = (backend or {}).get("total")
    summary = {
        "ok": False,
        "exit_status": EXIT_FAILURE,
        "interrupted": interrupted,
        "failure": failure,
        "driver": driver,
        "data_path": data_path,
        "queues_requested": queues,
        "disk_bytes": disk_bytes,
        "seconds": seconds,
        "elapsed_s": round(elapsed, 3),
        "ops": ops,
        "shapes": report.get("shapes") or {},
        "bytes": {"read": report.get("bytes_read", 0), "written": report.get("bytes_written", 0),
                  "verified": report.get("bytes_verified", 0)},
        "iops": round(report.get("timed_requests", 0) / elapsed, 1) if elapsed else 0.0,
        "mb_per_s": round(report.get("timed_bytes", 0) / elapsed / 1e6, 2) if elapsed else 0.0,
        "errors": errors,
        "error_samples": report.get("error_samples", []),
        "mismatch_samples": report.get("mismatch_samples", []),
        "frontend_errors": frontend_errors or [],
        "negotiated": negotiated_view(negotiated),
        "backend": backend,
        "ring_requests": report.get("ring_requests"),
        "counters_agree": backend_agrees(report.get("ring_requests"), backend_total),
        "final_verify_s": round(report.get("final_verify_s", 0.0), 3),
        "scrub_passes": report.get("scrub_passes", 0),
        "at_rest": report.get("at_rest"),
    }
    clean = failure is None and bool(report) and not any(errors.values())
    if interrupted:
        summary["exit_status"] = EXIT_INTERRUPTED
    elif clean:
        summary["exit_status"] = EXIT_OK
    summary["ok"] = clean and not interrupted
    return summary


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def render_text(s: dict) -> str:
    lines = []
    if s["interrupted"]:
        verdict = "INTERRUPTED"
    else:
        verdict = "PASSED" if s["ok"] else "FAILED"
    lines.append(f"xenblk-vhost demo: {verdict}  ({s['driver']}, {s['data_path']} data path, "
                 f"{_mib(s['disk_bytes'])} disk, {s['elapsed_s']:.1f} s of I/O)")
    if s["failure"]:
        lines.append(f"  failure: {s['failure']}")
    n = s["negotiated"]
    if n:
        lines.append(f"  negotiated: ABI {n['abi']}, {n['queues']} queue(s), ring order {n['ring_page_order']}, "
                     f"indirect {n['max_indirect_segments'] or 'no'}, persistent grants "
                     f"{'yes' if n['persistent_grants'] else 'no'}, flush {n['flush']}, "
                     f"discard {'yes' if n['discard'] else 'no'}")
    ops, shapes = s["ops"], s["shapes"]
    if ops["total"]:
        lines.append("  requests:   " + ", ".join(f"{ops[k]} {k}" for k in ("read", "write", "flush", "barrier",
                                                                            "discard")) + f" ({ops['total']} total)")
        if shapes:
            lines.append(f"  shapes:     {shapes.get('single_segment', 0)} single-segment, "
                         f"{shapes.get('multi_segment', 0)} multi-segment, {shapes.get('indirect', 0)} indirect")
    if s["failure"] and not ops["total"]:
        return "\n".join(lines)  # nothing ran: the failure says it all
    b = s["bytes"]
    final = "skipped" if s["interrupted"] else f"{s['final_verify_s']:.1f} s"
    lines.append(f"  data:       {_mib(b['read'])} read, {_mib(b['written'])} written, {_mib(b['verified'])} "
                 f"verified byte for byte (final read-back {final}, {s['scrub_passes']} at-rest scrub passes)")
    lines.append(f"  rate:       {s['iops']:.0f} IOPS, {s['mb_per_s']:.1f} MB/s")
    e = s["errors"]
    lines.append(f"  errors:     {e['mismatches']} mismatches, {e['io']} I/O errors, {e['frontend']} protocol errors")
    for sample in s["mismatch_samples"][:3]:
        lines.append(f"    mismatch at sector {sample['sector']} ({sample['where']}): expected "
                     f"{sample['expected']}..., got {sample['got']}...")
    for sample in (s["error_samples"] + s["frontend_errors"])[:3]:
        lines.append(f"    {sample}")
    backend = s["backend"]
    if backend and backend.get("total"):
        t = backend["total"]
        agree = {True: "agree with the guest", False: "DO NOT agree with the guest", None: "not compared"}
        lines.append(f"  backend:    rd_req {t['rd_req']}, wr_req {t['wr_req']}, f_req {t['f_req']}, "
                     f"ds_req {t['ds_req']}, oo_req {t['oo_req']}, errors {t['errors']}, "
                     f"{len(backend.get('rings', []))} ring(s): counters {agree[s['counters_agree']]}")
    return "\n".join(lines)
