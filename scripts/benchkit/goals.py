"""Issue 13's simulator targets, checked against one bench.py run.

Each goal names the rows it reads; a goal whose rows the run did not
produce (a --workloads filter, --no-raw) says so instead of passing.
Backend CPU is checked as measured, the simulated hypervisor's grant copy
included (the issue allows making that copy cheaper, not leaving it out);
the figure without it is shown beside.
"""

from __future__ import annotations


def _rows(rows, **match):
    return [r for r in rows if all(r.get(k) == v for k, v in match.items())]


def check(rows: list[dict]) -> list[str]:
    """One line per goal and matching row: MET / MISSED, the figure and the bar."""
    out = []

    def cpu_goal(label: str, limit: float, **match) -> None:
        found = [r for r in _rows(rows, **match) if r["pattern"] == "rand" and r["bs"] == 4096]
        if not found:
            out.append(f"  n/a     {label}: no such run")
        for r in found:
            cpu, bare = r["backend_cpu_us_per_io"], r.get("backend_cpu_us_per_io_without_sim_copy")
            out.append(f"  {'MET   ' if cpu <= limit else 'MISSED'}  {label} <= {limit:g} us: {r['target']} "
                       f"{r['data_path']} {r['workload']}: {cpu:.2f} us"
                       + ("" if bare is None else f" ({bare:.2f} without the sim copy)"))

    cpu_goal("backend CPU/IO, QD128 order 4", 2.5, qd=128, ring_order=4, rings=1)
    cpu_goal("backend CPU/IO, QD32 order 0", 4.0, qd=32, ring_order=0, rings=1)
    cpu_goal("backend CPU/IO, QD1", 15.0, qd=1)

    qd1 = [r for r in _rows(rows, qd=1, op="read") if r.get("raw_p50_us") is not None]
    if not qd1:
        out.append("  n/a     QD1 p50 <= raw p50 + 10 us: no QD1 read with a raw baseline")
    for r in qd1:
        added = r["p50_us"] - r["raw_p50_us"]
        out.append(f"  {'MET   ' if added <= 10 else 'MISSED'}  QD1 p50 <= raw p50 + 10 us: {r['target']} "
                   f"{r['data_path']} {r['workload']}: +{added:.1f} us ({r['p50_us']:.1f} vs {r['raw_p50_us']:.1f})")

    seq = [r for r in _rows(rows, pattern="seq") if r.get("ratio") is not None]
    if not seq:
        out.append("  n/a     sequential >= 0.9 x raw: no sequential run with a raw baseline")
    for r in seq:
        out.append(f"  {'MET   ' if r['ratio'] >= 0.9 else 'MISSED'}  sequential >= 0.9 x raw: {r['target']} "
                   f"{r['data_path']} {r['workload']}: {r['ratio']:.3f}")

    pairs = 0
    for two in _rows(rows, rings=2):
        same = {k: two[k] for k in ("target", "data_path", "op", "pattern", "bs", "qd", "ring_order")}
        for one in _rows(rows, rings=1, **same):
            pairs += 1
            gain = two["bridge_iops"] / one["bridge_iops"]
            out.append(f"  {'MET   ' if gain >= 1.5 else 'MISSED'}  2 rings >= 1.5 x 1 ring: {two['target']} "
                       f"{two['data_path']} {two['workload']}: {gain:.2f} x")
    if not pairs:
        out.append("  n/a     2 rings >= 1.5 x 1 ring: no 1-ring/2-ring pair")
    return out
