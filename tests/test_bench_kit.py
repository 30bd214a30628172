"""The benchmark's instruments (scripts/benchkit), checked for correctness, never for speed.

A benchmark whose load generator sent malformed requests, lost or doubled
completions, wrote nothing or wrote it in the wrong place would print
figures that mean nothing: these tests run each instrument for a fraction
of a second and check what it did, exactly.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from benchkit import workloads as wl  # noqa: E402
from benchkit.guest import fill_byte  # noqa: E402
from benchkit.profile import SIM_COPY, Sampler, classify  # noqa: E402
from benchkit.raw import run_raw  # noqa: E402
from benchkit.sim_cases import Timing, requests_per_io, run_bridge, run_null  # noqa: E402
from benchkit.targets import Target  # noqa: E402

SHORT = Timing(warmup=0.02, seconds=0.15)
KIB = 1024


def test_compiled_loops_are_built_by_install_deps():
    # scripts/install-deps.sh builds them into the venv (build_loadgen.py).
    import _xenblk_bench

    assert _xenblk_bench.lib.LG_REQUEST_BYTES == 112  # sizeof(struct blkif_request), x86_64


@pytest.fixture
def file_target(tmp_path) -> Target:
    size = 2 << 20
    p = tmp_path / "disk.img"
    p.write_bytes(bytes(size))
    return Target("file", "io_uring", str(p), size)


# ---------------------------------------------------------------- the load generator and the null responder

@pytest.mark.parametrize("w, parts", [
    (wl.Workload("read", "rand", 4 * KIB, 1, 0, 1), 1),
    (wl.Workload("write", "rand", 4 * KIB, 32, 0, 1), 1),   # the whole ring in flight
    (wl.Workload("read", "rand", 4 * KIB, 16, 4, 2), 1),    # two rings, one thread
    (wl.Workload("write", "seq", 1024 * KIB, 8, 0, 1), 4),  # indirect, split in 4
], ids=lambda x: x.name if isinstance(x, wl.Workload) else f"x{x}")
def test_generator_accounts_for_every_request(hv_socket, w, parts):
    r = run_null(hv_socket, w, SHORT, 64 << 20, parts)
    assert r["ios_completed"] > w.qd * w.rings
    # Nothing lost, nothing doubled: every I/O was `parts` requests, each answered once
    # (a response for an id not in flight fails the run inside run_null).
    assert r["requests_served"] == r["ios_completed"] * parts
    assert r["iops"] > 0 and 0 < r["p50_us"] <= r["p99_us"]


def test_generator_refuses_a_split_the_ring_cannot_hold(hv_socket):
    w = wl.Workload("read", "seq", 1024 * KIB, 16, 0, 1)  # 16 I/Os x 4 requests > 32 slots
    with pytest.raises(RuntimeError, match="Invalid argument"):
        run_null(hv_socket, w, SHORT, 64 << 20, 4)


def test_requests_per_io_follows_the_backend_limit():
    big = wl.Workload("write", "seq", 1024 * KIB, 8, 0, 1)
    assert requests_per_io(big, 256) == 1
    assert requests_per_io(big, 126) == 4  # vhost-user's 126 segments: 4 x 64 pages
    assert requests_per_io(wl.Workload("read", "rand", 44 * KIB, 4, 0, 1), 0) == 1  # 11 segments: direct
    with pytest.raises(ValueError, match="do not fit"):
        requests_per_io(wl.Workload("write", "seq", 1024 * KIB, 16, 0, 1), 126)


# ---------------------------------------------------------------- the bridge

@pytest.mark.parametrize("path", ["copy", "copy+persistent", "map", "map+persistent"])
def test_bridge_writes_land_where_and_as_the_guest_sent_them(hv_socket, file_target, path):
    # 128 KiB sequential writes (indirect requests) over a 2 MiB file: every
    # 4 KiB block must end up holding one of the guest's pages, and each
    # request's 32 pages in order (their bytes are consecutive).
    # A run lasts a time, and a loaded machine may not wrap round in 0.15 s (16 I/Os): what decides is
    # the count, so a run that did not wrap is done again, longer (each run starts at the file's start).
    w = wl.Workload("write", "seq", 128 * KIB, 4, 0, 1)
    for seconds in (SHORT.seconds, 1.0, 5.0):
        r = run_bridge(hv_socket, file_target, w, path, Timing(SHORT.warmup, seconds), fill=True, sampler=Sampler())
        assert r["requests_served"] >= r["ios_completed"] > 0
        if r["ios_completed"] > file_target.size // w.bs:
            break
    assert r["ios_completed"] > file_target.size // w.bs, r  # wrapped round at least once
    data = Path(file_target.path).read_bytes()
    pages = w.bs // 4096
    for off in range(0, len(data), w.bs):
        first = data[off]
        assert first != 0, f"extent at {off} never written"
        for i in range(pages):
            page = data[off + i * 4096:off + (i + 1) * 4096]
            want = fill_byte(first - 1 + i)
            assert page == want * 4096, f"page {i} of the extent at {off}: {page[:4]!r}..., want {want!r}"


def test_bridge_reads_report_figures_and_the_sim_copy_share(hv_socket, file_target):
    # 128 KiB reads: the simulated copy (compiled: a memcpy) is then a fifth to a half of the backend's CPU.
    # The sampler counts CPU time (a sample per tick of it), so a loaded machine gives a 1 s run few samples
    # (once none of them in the copy at load 17): the runs go on, one sampler through all of them, until it
    # holds SAMPLES; at a share of a fifth, all of them outside the copy is a 1e-19 chance.
    SAMPLES, MOST_RUNS = 200, 30
    w = wl.Workload("read", "rand", 128 * KIB, 8, 0, 1)
    sampler = Sampler()
    for _ in range(MOST_RUNS):
        r = run_bridge(hv_socket, file_target, w, "copy", Timing(0.05, 1.0), sampler=sampler)
        assert r["requests_served"] >= r["ios_completed"] > 0
        assert r["backend_cpu_us_per_io"] > 0 and r["iops"] > 0
        assert r["backend_notifies_per_io"] > 0
        if sampler.samples >= SAMPLES:
            break
    assert sampler.samples >= SAMPLES, f"{sampler.samples} samples of the backend's CPU in {MOST_RUNS} runs"
    # the copy path copies every read out through the simulated hypervisor
    assert 0 < r["sim_copy_share"] < 1, sampler.shares()
    assert r["sim_copy_us_per_io"] == pytest.approx(r["sim_copy_share"] * r["backend_cpu_us_per_io"])


def test_bridge_without_hooks_reports_no_hook_figures(hv_socket, file_target):
    w = wl.Workload("read", "rand", 4 * KIB, 4, 0, 1)
    for seconds in (SHORT.seconds, 1.0, 5.0):  # a window in which a starved backend answered nothing: again
        r = run_bridge(hv_socket, file_target, w, "copy", Timing(SHORT.warmup, seconds), hooks=False)
        if r["iops"] > 0:
            break
    assert r["iops"] > 0
    assert r["sim_copy_share"] is None and r["backend_wakeups_per_io"] is None


def test_bridge_with_rings_in_worker_processes(hv_socket, file_target):
    """--ring-workers process: two rings served by two worker processes; the figures count every
    request the workers served (their counters come back over the control channel) and their CPU."""
    w = wl.Workload("write", "seq", 128 * KIB, 4, 0, 2)
    r = run_bridge(hv_socket, file_target, w, "copy", SHORT, fill=True, ring_workers="process")
    assert r["requests_served"] >= r["ios_completed"] > 0
    assert r["iops"] > 0 and r["backend_cpu_us_per_io"] > 0
    assert r["sim_copy_share"] is None and r["backend_wakeups_per_io"] is None  # hooks are this process's
    data = Path(file_target.path).read_bytes()
    assert any(data[off] for off in range(0, len(data), w.bs)), "nothing written by the workers"


@pytest.mark.parametrize("workers", ["inline", "process"])
def test_bridge_probe_sees_the_rings_still_held(hv_socket, file_target, workers):
    """bench_memory.py's probe: called once the workload is done and before the disconnect, with the
    live ring workers' pids (none inline), while each ring's journal file is still there."""
    import os

    w = wl.Workload("write", "rand", 4 * KIB, 8, 0, 2)
    jdir = Path(file_target.path).parent / "journals"
    seen = []

    def probe(pids):
        seen.append(([os.path.exists(f"/proc/{p}") for p in pids], sorted(f.name for f in jdir.iterdir())))
        return "probed"

    r = run_bridge(hv_socket, file_target, w, "copy", SHORT, hooks=False, journal_dir=jdir, ring_workers=workers,
                   probe=probe)
    assert r["probe"] == "probed" and len(seen) == 1
    alive, journals = seen[0]
    assert alive == ([True, True] if workers == "process" else [])
    assert len(journals) == 2  # one per ring, removed at the disconnect
    assert list(jdir.iterdir()) == []


# ---------------------------------------------------------------- raw libblkio

def test_raw_baseline_writes_and_counts(file_target):
    w = wl.Workload("write", "rand", 4 * KIB, 8, 0, 2)  # two queues, two threads
    r = run_raw(file_target, w, SHORT)
    assert r["iops"] > 0 and r["errors"] == 0 and r["p50_us"] > 0
    assert r["cpu_us_per_io"] > 0 and r["storage_cpu_us_per_io"] is None  # io_uring: no daemon


# ---------------------------------------------------------------- the profile's categories

@pytest.mark.parametrize("frames, category", [
    ([("/x/xenblk_vhost/sim/grant_table.py", "check_for_copy"), ("/x/xenblk_vhost/sim/gntdev.py", "grant_copy"),
      ("/x/xenblk_vhost/backend/datapath/grant_copy.py", "run_copy")], SIM_COPY),
    ([("/x/xenblk_vhost/sim/evtchn.py", "_consume"), ("/x/xenblk_vhost/sim/evtchn.py", "wait")],
     "evtchn wait: read(2)"),
    ([("/v/site-packages/trio/_core/_io_epoll.py", "get_events"), ("/v/site-packages/trio/_core/_run.py", "run")],
     "trio: epoll_wait"),
    ([("/x/xenblk_vhost/storage/queue.py", "do_io"), ("/x/xenblk_vhost/storage/queue.py", "wait_io")],
     "completion fd: wait_io"),
    ([("/x/xenblk_vhost/storage/queue.py", "read"), ("/x/xenblk_vhost/backend/datapath/ring_worker.py", "_start")],
     "libblkio: queue + do_io"),
    ([("/x/xenblk_vhost/blkif/decode.py", "decode"),
      ("/x/xenblk_vhost/backend/datapath/ring_worker.py", "_intake_loop")],
     "blkif: take, decode, validate"),
    ([("/x/xenblk_vhost/backend/datapath/grant_copy.py", "segment"),
      ("/x/xenblk_vhost/backend/datapath/copy_path.py", "_copy")], "datapath: grant-copy segments"),
    ([("/usr/lib/python3.11/struct.py", "pack")], "other"),
])
def test_profile_categories(frames, category):
    assert classify(frames) == category


def test_ring_scaling_compares_two_rings_with_one_ring_inline_and_in_a_worker():
    import bench

    def row(rings, mode, iops, cpu):
        return {"target": "file", "data_path": "copy", "engine": "compiled", "op": "read", "pattern": "rand",
                "bs": 4096, "qd": 128, "ring_order": 4, "rings": rings, "ring_workers": mode,
                "workload": f"4k-randread-qd128-o4-r{rings}", "bridge_iops": iops,
                "backend_cpu_us_per_io": cpu, "loadgen_ceiling_iops": 15e6}

    lines = bench.ring_scaling([row(1, "inline", 100e3, 5.0), row(1, "process", 125e3, 5.0),
                                row(2, "inline", 90e3, 5.0), row(2, "process", 250e3, 6.0)])
    assert lines[0].startswith("rings on their own cores")
    assert "0.90 x one ring inline (100.0k), 0.72 x one ring in a worker (125.0k); backend 0.45 cores" in lines[1]
    assert "2.50 x one ring inline (100.0k), 2.00 x one ring in a worker (125.0k); backend 1.50 cores" in lines[2]
    assert bench.ring_scaling([row(2, "process", 250e3, 6.0)]) == []  # nothing to compare with
