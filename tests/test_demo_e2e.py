"""`xenblk-vhost demo` end to end: both drivers, a corrupted block caught, Ctrl-C, cleanup.

Every run is checked for leftovers: the temporary directory is made under
the test's own TMPDIR (so it must be empty afterwards) and no process may
still mention it on its command line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from xenblk_vhost.demo.command import DemoOptions, DemoRun, run_demo

SECONDS = "1.5"


def leftover_processes(marker: str) -> list[str]:
    """Command lines of live processes mentioning marker (a test's temporary directory)."""
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def assert_cleaned_up(tmp: Path) -> None:
    assert list(tmp.iterdir()) == [], "the demo left its temporary directory"
    assert leftover_processes(str(tmp)) == []


async def run_cli(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return await trio.run_process([sys.executable, "-m", "xenblk_vhost", "demo", *args],
                                  capture_stdout=True, capture_stderr=True, check=False,
                                  env=dict(os.environ, TMPDIR=str(tmp)))


def check_clean_summary(summary: dict) -> None:
    assert summary["ok"] is True and summary["exit_status"] == 0 and summary["failure"] is None
    assert summary["errors"] == {"io": 0, "mismatches": 0, "frontend": 0}
    assert summary["bytes"]["verified"] > 0 and summary["bytes"]["written"] > 0
    # The whole mix ran: every operation and every request shape.
    assert all(summary["ops"][op] > 0 for op in ("read", "write", "flush", "barrier", "discard")), summary["ops"]
    assert all(n > 0 for n in summary["shapes"].values()) and len(summary["shapes"]) == 3
    assert summary["iops"] > 0 and summary["mb_per_s"] > 0
    # The backend counted exactly the ring requests the guest sent.
    assert summary["counters_agree"] is True
    assert summary["backend"]["total"]["errors"] == 0


async def test_demo_io_uring_json_summary(tmp_path):
    result = await run_cli(tmp_path, "--seconds", SECONDS, "--json", "--queues", "2")
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    check_clean_summary(summary)
    assert (summary["driver"], summary["data_path"]) == ("io_uring", "map")  # map: the io_uring default
    assert summary["negotiated"] == {"abi": "x86_64-abi", "queues": 2, "ring_page_order": 2,
                                     "max_indirect_segments": 32, "persistent_grants": True,
                                     "flush": "flush-cache", "discard": True}
    assert len(summary["backend"]["rings"]) == 2
    # Not a terminal: progress is plain lines on stderr, the summary alone on stdout.
    stderr = result.stderr.decode()
    assert "\r" not in stderr and "demo: guest domain" in stderr and " requests " in stderr
    assert_cleaned_up(tmp_path)


async def test_demo_vhost_user_json_summary(tmp_path):
    result = await run_cli(tmp_path, "--seconds", SECONDS, "--json", "--driver", "virtio-blk-vhost-user",
                           "--queues", "1")
    assert result.returncode == 0, result.stderr.decode()
    summary = json.loads(result.stdout)
    check_clean_summary(summary)
    assert (summary["driver"], summary["data_path"]) == ("virtio-blk-vhost-user", "copy")
    negotiated = summary["negotiated"]
    assert (negotiated["queues"], negotiated["ring_page_order"], negotiated["max_indirect_segments"]) == (1, 2, 32)
    assert negotiated["persistent_grants"] is True  # offered on the copy path too (the engine copies them)
    assert "starting qemu-storage-daemon" in result.stderr.decode()
    assert_cleaned_up(tmp_path)


async def test_demo_text_summary_and_map_refused_for_vhost_user(tmp_path):
    refused = await run_cli(tmp_path, "--driver", "virtio-blk-vhost-user", "--data-path", "map")
    assert refused.returncode == 2
    assert b"--data-path map needs --driver io_uring" in refused.stderr and refused.stdout == b""
    result = await run_cli(tmp_path, "--seconds", "1", "--data-path", "copy", "--queues", "1")
    assert result.returncode == 0, result.stderr.decode()
    text = result.stdout.decode()
    assert text.startswith("xenblk-vhost demo: PASSED  (io_uring, copy data path")
    assert "negotiated: ABI x86_64-abi, 1 queue(s), ring order 2, indirect 32, persistent grants yes" in text
    assert "0 mismatches, 0 I/O errors, 0 protocol errors" in text
    assert "counters agree with the guest" in text
    assert_cleaned_up(tmp_path)


async def test_a_block_corrupted_on_disk_mid_run_is_caught(tmp_path):
    """A test hook flips bytes of one at-rest block in the disk file behind everyone's back."""
    corrupted = []

    def corrupt_once(run: DemoRun, report: dict) -> None:
        if corrupted or report["scrub_passes"] < 1:
            return  # once the at-rest region has been written and read back clean
        start, length = run.at_rest
        sector = start + length // 2
        with open(run.image, "r+b") as disk:
            disk.seek(sector * 512)
            good = disk.read(512)
            disk.seek(sector * 512)
            disk.write(bytes(b ^ 0xFF for b in good))
        corrupted.append(sector)

    summary = await run_demo(DemoOptions(seconds=2.0, tmp_parent=str(tmp_path)),
                             run=DemoRun(on_progress=corrupt_once))
    assert corrupted, "the run never reached the point where the hook corrupts"
    assert summary["exit_status"] == 1 and summary["ok"] is False and not summary["interrupted"]
    assert summary["errors"]["mismatches"] >= 1 and summary["errors"]["io"] == 0
    [sector] = corrupted
    assert {"sector": sector, "where": "at-rest"}.items() <= summary["mismatch_samples"][0].items()
    assert_cleaned_up(tmp_path)


async def test_ctrl_c_stops_cleanly_with_a_summary_and_exit_130(tmp_path):
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", "xenblk_vhost", "demo", "--seconds", "60", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ, TMPDIR=str(tmp_path)))
    stderr = b""
    out = b""
    try:
        with trio.fail_after(60):
            # Until the guest has reported I/O (the first progress line), then Ctrl-C.
            while b" requests " not in stderr:
                chunk = await proc.stderr.receive_some(4096)
                assert chunk, f"demo ended early: {stderr.decode()}"
                stderr += chunk
            proc.send_signal(signal.SIGINT)
            async with trio.open_nursery() as nursery:
                async def drain_stderr() -> None:
                    nonlocal stderr
                    while chunk := await proc.stderr.receive_some(4096):
                        stderr += chunk
                nursery.start_soon(drain_stderr)
                while chunk := await proc.stdout.receive_some(65536):
                    out += chunk
            status = await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert status == 130, stderr.decode()
    summary = json.loads(out)
    assert summary["interrupted"] is True and summary["exit_status"] == 130 and summary["failure"] is None
    # What ran before the stop is reported, and it was all right.
    assert summary["ops"]["total"] > 0 and summary["errors"] == {"io": 0, "mismatches": 0, "frontend": 0}
    assert summary["elapsed_s"] < 60
    assert b"stopping" in stderr
    assert_cleaned_up(tmp_path)


async def test_interrupt_during_setup_leaves_nothing(tmp_path):
    run = DemoRun()

    async def interrupt_soon() -> None:
        await trio.sleep(0.3)  # somewhere in the setup: hypervisor, backend or guest starting
        run.interrupt()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(interrupt_soon)
        summary = await run_demo(DemoOptions(seconds=30, tmp_parent=str(tmp_path)), run=run)
    assert summary["interrupted"] and summary["exit_status"] == 130
    assert_cleaned_up(tmp_path)
