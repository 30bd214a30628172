"""The demo's parts without the stack: progress drawing, request shapes, content checks, summary verdicts."""

from __future__ import annotations

import io
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from xenblk_vhost.blkif.constants import MAX_SEGMENTS_PER_REQUEST
from xenblk_vhost.demo.command import DemoOptions, DemoUsageError
from xenblk_vhost.demo.progress import Progress, render_bar
from xenblk_vhost.demo.storage_daemon import qsd_argv
from xenblk_vhost.demo.summary import backend_agrees, build_summary, render_text
from xenblk_vhost.demo.workload import (
    ExpectedContent,
    Plan,
    WorkloadReport,
    request_shape,
    segments_of,
    shape_of,
)

# ---------------------------------------------------------------- progress

def test_bar_fills_with_the_fraction_and_clamps():
    assert render_bar(0.0, 10) == "[..........]"
    assert render_bar(0.5, 10) == "[#####.....]"
    assert render_bar(1.7, 10) == "[##########]"
    assert render_bar(-1, 4) == "[....]"


def test_on_a_terminal_the_bar_is_redrawn_in_place_at_most_every_redraw_interval():
    out = io.StringIO()
    p = Progress(10.0, stream=out, is_tty=True, label="demo", redraw_interval=0.1)
    assert p.update(1.0, "a", now=100.0)
    assert not p.update(1.05, "b", now=100.05)  # too soon
    assert p.update(1.2, "c", now=100.2)
    p.finish()
    text = out.getvalue()
    assert text == "\rdemo: [##......................]  1.0/10 s  a\x1b[K" \
                   "\rdemo: [###.....................]  1.2/10 s  c\x1b[K\n"


def test_elsewhere_whole_lines_every_line_interval_and_phase_messages_on_their_own_line():
    out = io.StringIO()
    p = Progress(10.0, stream=out, is_tty=False, line_interval=2.0)
    assert p.update(0.5, "x", now=0.0)
    assert not p.update(1.0, "y", now=1.0)
    assert p.update(2.5, "z", now=2.0)
    assert p.update(2.6, "forced", now=2.1, force=True)
    p.message("phase")
    p.finish()  # nothing to end: lines are complete already
    assert out.getvalue().splitlines() == [" 0.5/10 s  x", " 2.5/10 s  z", " 2.6/10 s  forced", "phase"]
    assert "\r" not in out.getvalue()


def test_disabled_progress_writes_nothing():
    out = io.StringIO()
    p = Progress(1.0, stream=out, is_tty=True, enabled=False)
    assert not p.update(0.5, "x", now=0.0)
    p.message("m")
    p.finish()
    assert out.getvalue() == ""


def test_a_stream_that_is_not_a_terminal_is_detected():
    assert Progress(1.0, stream=io.StringIO()).is_tty is False


# ---------------------------------------------------------------- request shapes

def _plan(max_segments: int, align: int) -> Plan:
    return Plan(ops=("read",), op_weights=(1,), shapes=(), shape_weights=(), max_segments=max_segments,
                align=align, at_rest=ExpectedContent(0, 0, "at-rest"), lanes=())


@given(seed=st.integers(0, 2**32), shape=st.sampled_from(["single_segment", "multi_segment", "indirect"]),
       max_segments=st.integers(12, 256), align=st.sampled_from([1, 8]))
def test_a_request_has_exactly_the_shape_asked_for(seed, shape, max_segments, align):
    nr, first_sect = request_shape(random.Random(seed), _plan(max_segments, align), shape)
    assert nr % align == 0 and nr > 0 and first_sect % align == 0 and 0 <= first_sect < 8
    assert shape_of(nr, first_sect) == shape
    assert segments_of(nr, first_sect) <= max_segments


def test_shape_boundaries():
    assert shape_of(8, 0) == "single_segment" and shape_of(1, 7) == "single_segment"
    assert shape_of(2, 7) == "multi_segment"
    assert shape_of(MAX_SEGMENTS_PER_REQUEST * 8, 0) == "multi_segment"
    assert shape_of(MAX_SEGMENTS_PER_REQUEST * 8, 1) == "indirect"


# ---------------------------------------------------------------- content checks

def test_reads_are_checked_where_known_and_mismatches_located():
    region = ExpectedContent(100, 4, "lane 0")
    report = WorkloadReport()
    region.record(101, b"A" * 512 + b"B" * 512)
    assert region.check(100, b"?" * 512 + b"A" * 512 + b"B" * 512 + b"?" * 512, report) == 2
    assert (report.sectors_verified, report.mismatches) == (2, 0)
    assert region.check(101, b"A" * 512 + b"C" * 512, report) == 1
    assert report.mismatches == 1
    assert report.mismatch_samples == [{"sector": 102, "where": "lane 0", "expected": "42" * 16, "got": "43" * 16}]
    region.forget(102, 1)
    assert region.check(101, b"A" * 512 + b"C" * 512, report) == 1 and report.mismatches == 1
    assert not region.any_known(102, 2) and region.any_known(101, 1)


def test_a_fresh_disk_is_known_to_read_zeros():
    region = ExpectedContent(0, 2, "lane 0")
    report = WorkloadReport()
    region.know_zeros()
    assert region.check(0, bytes(1024), report) == 2
    region.check(0, bytes(512) + b"\1" * 512, report)
    assert report.mismatches == 1 and not report.ok


# ---------------------------------------------------------------- summary

def _report(**over) -> dict:
    r = WorkloadReport()
    r.ops.update(read=5, write=4, flush=1)
    r.ring_requests.update(read=7, write=5, flush=1, barrier=0, discard=0)
    r.sectors_verified = 64
    r.elapsed_s, r.timed_requests, r.timed_bytes = 2.0, 10, 4_000_000
    d = r.as_dict()
    d.update(over)
    return d


def _summary(**kw) -> dict:
    args = dict(driver="io_uring", data_path="map", queues=2, disk_bytes=1 << 26, seconds=2.0,
                negotiated={"protocol": "x86_64-abi", "nr_rings": 2, "ring_page_order": 2,
                            "max_indirect_segments": 32, "persistent": True, "flush_op": 3,
                            "feature_discard": True},
                report=_report(), backend={"total": {"rd_req": 7, "wr_req": 5, "f_req": 1, "ds_req": 0, "oo_req": 0,
                                                     "errors": 0}, "rings": [{}, {}]},
                frontend_errors=[], interrupted=False, failure=None)
    args.update(kw)
    return build_summary(**args)


def test_a_clean_run_passes_with_rates_from_the_timed_phase():
    s = _summary()
    assert (s["ok"], s["exit_status"]) == (True, 0)
    assert (s["iops"], s["mb_per_s"]) == (5.0, 2.0)
    assert s["bytes"]["verified"] == 64 * 512 and s["ops"]["total"] == 10
    assert s["negotiated"]["flush"] == "flush-cache" and s["counters_agree"] is True
    assert render_text(s).startswith("xenblk-vhost demo: PASSED")


@pytest.mark.parametrize("change, status", [
    ({"report": _report(mismatches=1)}, 1),
    ({"report": _report(errors=2)}, 1),
    ({"frontend_errors": ["ring 0: bad response id"]}, 1),
    ({"failure": "qemu-storage-daemon not found"}, 1),
    ({"report": None}, 1),  # nothing ran: not a pass
    ({"interrupted": True}, 130),
    ({"interrupted": True, "report": _report(mismatches=1)}, 130),
])
def test_verdicts(change, status):
    s = _summary(**change)
    assert s["exit_status"] == status and s["ok"] is False


def test_backend_counters_are_compared_with_barriers_counted_as_flushes():
    sent = {"read": 3, "write": 2, "flush": 1, "barrier": 2, "discard": 1}
    assert backend_agrees(sent, {"rd_req": 3, "wr_req": 2, "f_req": 3, "ds_req": 1})
    assert not backend_agrees(sent, {"rd_req": 3, "wr_req": 2, "f_req": 1, "ds_req": 1})
    assert backend_agrees(sent, None) is None


# ---------------------------------------------------------------- options, qsd

@pytest.mark.parametrize("opts, message", [
    (DemoOptions(driver="virtio-blk-vhost-user", data_path="map"), "--data-path map needs --driver io_uring"),
    (DemoOptions(seconds=0), "--seconds"),
    (DemoOptions(seconds=float("nan")), "--seconds"),
    (DemoOptions(queues=0), "--queues"),
])
def test_options_that_cannot_work_are_refused(opts, message):
    with pytest.raises(DemoUsageError, match=message):
        opts.check()


def test_default_data_path_follows_the_driver():
    assert DemoOptions().resolved_data_path() == "map"
    assert DemoOptions(driver="virtio-blk-vhost-user").resolved_data_path() == "copy"


def test_qsd_options_escape_commas_in_paths(tmp_path):
    argv = qsd_argv(tmp_path / "a,b.img", tmp_path / "vu.sock", tmp_path / "qmp.sock", num_queues=3)
    blockdev = argv[argv.index("--blockdev") + 1]
    assert f"filename={tmp_path}/a,,b.img," in blockdev
    assert argv[argv.index("--export") + 1].endswith("writable=on,num-queues=3")


def test_a_run_that_failed_before_any_io_says_only_why():
    s = _summary(report=None, negotiated=None, backend=None, failure="qemu-storage-daemon not found: install it")
    assert render_text(s).splitlines() == [
        "xenblk-vhost demo: FAILED  (io_uring, map data path, 64.0 MiB disk, 0.0 s of I/O)",
        "  failure: qemu-storage-daemon not found: install it"]
