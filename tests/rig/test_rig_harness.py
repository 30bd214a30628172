"""The real-Xen rig's own pieces, checked without Xen (they run in the unit suite).

The rig itself (scripts/xen-rig/run.sh) needs QEMU and minutes; what can be
checked here is what its verdicts rest on: the guest's O_DIRECT helper finds
corruption and says what it found, the console parser fails a guest that
failed, and the scripts parse.
"""
from __future__ import annotations

import json
import lzma
import os
import subprocess
import sys
from pathlib import Path

import pytest

RIG = Path(__file__).resolve().parents[2] / "scripts" / "xen-rig"


def test_shell_scripts_parse():
    bash = [p for p in RIG.rglob("*.sh")] + [RIG / "dom0-image" / "rig-init"]
    assert len(bash) >= 10, bash
    for p in bash:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, f"{p}: {r.stderr}"
    # The guest's init runs under busybox sh: keep it POSIX (dash is stricter than bash).
    r = subprocess.run(["sh", "-n", str(RIG / "domu" / "init")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- odio


@pytest.fixture(scope="module")
def odio(tmp_path_factory) -> Path:
    exe = tmp_path_factory.mktemp("odio") / "odio"
    subprocess.run(
        ["gcc", "-static", "-O2", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(RIG / "domu" / "odio.c")],
        check=True,
    )
    return exe


@pytest.fixture
def disk(tmp_path) -> Path:
    # O_DIRECT needs a filesystem that supports it (tmpfs does not).
    for base in (tmp_path, Path("/var/tmp")):
        p = base / f"odio-disk-{os.getpid()}.img"
        with open(p, "wb") as f:
            f.truncate(4 << 20)
        try:
            os.close(os.open(p, os.O_RDONLY | os.O_DIRECT))
        except OSError:
            p.unlink()
            continue
        yield p
        p.unlink()
        return
    pytest.fail("no filesystem with O_DIRECT for the odio test")


def run(odio, *args):
    return subprocess.run([str(odio), *map(str, args)], capture_output=True, text=True)


def test_odio_write_verify_parallel_and_unaligned_buffers(odio, disk):
    assert run(odio, "write", disk, 0, "2M", "-s", 1, "-c", "64K", "-j", 4, "-f").returncode == 0
    assert run(odio, "verify", disk, 0, "2M", "-s", 1).returncode == 0
    r = run(odio, "write", disk, 15872, 3584, "-s", 9, "-b", 512, "-d")
    assert r.returncode == 0 and "bufoff=512 dsync: ok" in r.stdout, r.stdout
    assert run(odio, "verify", disk, 15872, 3584, "-s", 9, "-b", 1024).returncode == 0
    assert run(odio, "zero", disk, "2M", "2M").returncode == 0


def test_odio_names_what_it_found(odio, disk):
    run(odio, "write", disk, 0, "1M", "-s", 1)
    run(odio, "write", disk, 4096, 512, "-s", 5)  # a "misplaced" write over sector 8
    r = run(odio, "verify", disk, 0, "1M", "-s", 1)
    assert r.returncode == 1
    assert "MISMATCH at sector 8 (byte 4096): expected this seed, found pattern of seed 5 for sector 8" in r.stderr
    # The right data at the wrong place: sector 8's pattern read where sector 0 is expected.
    with open(disk, "r+b") as f:
        f.seek(4096)
        s8 = f.read(512)
        f.seek(0)
        f.write(s8)
    r = run(odio, "verify", disk, 0, 512, "-s", 5)
    assert r.returncode == 1 and "found pattern of seed 5 for sector 8" in r.stderr, r.stderr
    r = run(odio, "zero", disk, 0, 4096)
    assert r.returncode == 1 and "expected zeros" in r.stderr
    r = run(odio, "verify", disk, "4M", 512)  # past the end of the 4 MiB file
    assert r.returncode == 1 and "short transfer" in r.stderr


def test_odio_reports_every_io_slower_than_its_stall_bound(odio, disk):
    """-l MS: the restart scenario's pause figures come from these lines (dom0/restart_pauses.py)."""
    import time

    before = time.time()
    r = run(odio, "write", disk, 0, "256K", "-s", 2, "-c", "64K", "-j", 2, "-f", "-l", 0)
    assert r.returncode == 0 and "STALL" not in r.stdout  # 0: none reported
    r = run(odio, "write", disk, 0, "256K", "-s", 2, "-c", "64K", "-f", "-l", 1)  # bound 1 ms: most are reported
    stalls = [line.split() for line in r.stdout.splitlines() if line.startswith("odio: STALL ")]
    assert r.returncode == 0
    for _, _, start, ms, op, where in stalls:
        assert before - 1 <= float(start) <= time.time() and float(ms) >= 1.0
        assert op in ("pwrite", "fdatasync") and where.startswith(f"{disk}@")


def test_restart_pauses_are_the_longest_io_under_way_at_each_event(tmp_path):
    events = tmp_path / "events"
    events.write_text("ready 100.0\nhandover 110.0\nready 111.0\nkill 120.0\nready 125.0\n")
    console = tmp_path / "console"
    console.write_text("XENBLK-GUEST-BUSY xvda 1\n"
                       "XENBLK-STALL 109.9 300.0 pwrite /dev/xvda@0\r\n"   # spans the hand-over: 0.3 s
                       "XENBLK-STALL 109.95 200.0 pread /dev/xvda@65536\n"
                       "XENBLK-STALL 119.0 4500.0 fdatasync /dev/xvda@0\n"   # spans the kill: 4.5 s
                       "XENBLK-STALL 130.0 900.0 pwrite /dev/xvda@0\n")      # spans nothing
    states = tmp_path / "states"
    states.write_text("109.0 4 4\n110.1 2 4\n111.0 4 4\n")
    out = tmp_path / "pauses.json"
    r = subprocess.run([sys.executable, str(RIG / "dom0" / "restart_pauses.py"), events, console, states, out],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    assert report["longest_pause_s"] == {"handover": 0.3, "kill": 4.5}
    assert [e["ios_stalled"] for e in report["events"]] == [2, 1]
    # the part after each event: 109.9 + 0.3 - 110 and 119 + 4.5 - 120
    assert [e["after_event_s"] for e in report["events"]] == [0.2, 3.5]
    # the 0.9 s stall at 130 is in no event's window (110-111, 120-125): the run's own noise
    assert report["baseline_longest_s"] == 0.9 and report["baseline_stalls"] == 1
    assert report["not_connected_samples"] == 1 and report["not_connected"][0]["backend"] == "2"
    assert "handover: 1 events, longest guest I/O pause 0.300 s" in r.stdout


def test_odio_rejects_bad_usage(odio, disk):
    assert run(odio, "write", disk, 100, 512).returncode == 2  # unaligned offset
    assert run(odio, "write", disk, 0, 512, "-b", 4096).returncode == 2
    assert run(odio, "frobnicate", disk, 0, 512).returncode == 2


# ---------------------------------------------------------------- guest-results.py

GOOD_CONSOLE = """\
[    1.0] Linux version 6.1.0
XENBLK-GUEST: up
RESULT vcpus=2
CHECK xvda_present ok after 0.1 s
RESULT sectors=131072
RESULT ro=0
RESULT queue.max_hw_sectors_kb=128
RESULT queue.discard_granularity=4096
RESULT queue.discard_max_bytes=67108864
RESULT queue.write_cache=write back
RESULT nr_hw_queues=2
RESULT blkfront_line=blkfront: xvda: flush diskcache: enabled; persistent grants: enabled; indirect descriptors: enabled;
CHECK blkfront_line ok\r
RESULT flush=flush diskcache: enabled
RESULT persistent_grants=enabled
RESULT indirect_descriptors=enabled
CHECK raw_fill ok x
CHECK raw_fill_verify ok x
CHECK raw_write_m1_indirect ok x
CHECK raw_verify_m1_indirect ok x
CHECK raw_disk_end_verify ok x
CHECK raw_past_end ok x
RESULT discard=supported
CHECK discard_range ok x
CHECK mkfs ok
CHECK mount ok
CHECK umount ok
CHECK fsck_clean ok clean
CHECK fs_contents ok 70 files
XENBLK-GUEST-DONE status=ok
"""

XENSTORE = """\
/local/domain/3/device/vbd/51712/backend = "/local/domain/0/backend/vbd/3/51712"
/local/domain/3/device/vbd/51712/ring-page-order = "4"
/local/domain/3/device/vbd/51712/multi-queue-num-queues = "2"
/local/domain/3/device/vbd/51712/protocol = "x86_64-abi"
/local/domain/3/device/vbd/51712/feature-persistent = "1"
/local/domain/3/device/vbd/51712/queue-0/ring-ref0 = "8"
/local/domain/0/backend/vbd/3/51712/feature-max-indirect-segments = "256"
/local/domain/0/backend/vbd/3/51712/max-ring-page-order = "4"
/local/domain/0/backend/vbd/3/51712/multi-queue-max-queues = "2"
/local/domain/0/backend/vbd/3/51712/sector-size = "512"
/local/domain/0/backend/vbd/3/51712/feature-persistent = "1"
"""


def judge(tmp_path, console: str, *expects: str, xenstore: str = XENSTORE):
    (tmp_path / "c.log").write_text(console)
    (tmp_path / "xs.txt").write_text(xenstore)
    cmd = [sys.executable, str(RIG / "dom0" / "guest-results.py"), "--name", "g1", "--console", str(tmp_path / "c.log"),
           "--xenstore", str(tmp_path / "xs.txt"), "--json", str(tmp_path / "results.json")]
    for e in expects:
        cmd += ["--expect", e]
    r = subprocess.run(cmd, capture_output=True, text=True)
    results = json.loads((tmp_path / "results.json").read_text())["g1"]
    return r, results


def test_guest_results_negotiated_and_expectations(tmp_path):
    r, res = judge(tmp_path, GOOD_CONSOLE, "neg.ring_order=4", "neg.queues=2", "neg.segments_per_request=32",
                   "neg.discard_granularity>=512", "neg.persistent_grants=enabled", "xs.be.sector-size=512")
    assert r.returncode == 0, r.stdout
    neg = res["negotiated"]
    assert (neg["ring_order"], neg["queues"], neg["guest_hw_queues"], neg["backend_max_indirect_segments"]) == (
        4,
        2,
        2,
        256,
    )
    assert neg["flush"] == "flush diskcache: enabled" and neg["discard"] == "supported"
    assert res["ok"] is True and res["checks"]["blkfront_line"]["status"] == "ok"


def test_guest_results_fails_on_unmet_expectation(tmp_path):
    r, res = judge(tmp_path, GOOD_CONSOLE, "neg.ring_order=0", "neg.queues>2", "queue.nonexistent=1")
    assert r.returncode == 1
    assert "expected neg.ring_order=0, got '4'" in r.stdout
    assert "expected neg.queues>2, got '2'" in r.stdout
    assert "'queue.nonexistent' was not reported" in r.stdout
    assert res["ok"] is False


@pytest.mark.parametrize(
    "edit, problem",
    [
        (lambda c: c.replace("XENBLK-GUEST-DONE status=ok\n", ""), "no XENBLK-GUEST-DONE line"),
        (
            lambda c: c.replace("CHECK fsck_clean ok clean", "CHECK fsck_clean fail rc=4"),
            "check fsck_clean failed: rc=4",
        ),
        (lambda c: c.replace("CHECK raw_past_end ok x\n", ""), "check raw_past_end never ran"),
        (lambda c: c.replace("CHECK discard_range ok x\n", ""), "neither discard_range nor discard_refused ran"),
        (lambda c: c.replace("status=ok", "status=fail"), "guest reported status=fail"),
    ],
)
def test_guest_results_fails_a_failed_guest(tmp_path, edit, problem):
    r, res = judge(tmp_path, edit(GOOD_CONSOLE))
    assert r.returncode == 1
    assert problem in r.stdout, r.stdout
    assert res["ok"] is False


def test_guest_results_requires_a_connected_snapshot(tmp_path):
    r, res = judge(tmp_path, GOOD_CONSOLE, xenstore="")
    assert r.returncode == 1 and "never reached Connected" in r.stdout


# ---------------------------------------------------------------- extract-vmlinux.py


def test_extract_vmlinux_finds_the_elf_payload(tmp_path):
    elf = b"\x7fELF" + os.urandom(5000)
    bz = b"MZ" + os.urandom(3000) + b"\xfd7zXZ\x00garbage" + lzma.compress(elf, format=lzma.FORMAT_XZ) + os.urandom(100)
    (tmp_path / "bzImage").write_bytes(bz)
    r = subprocess.run([sys.executable, str(RIG / "build" / "extract-vmlinux.py"), str(tmp_path / "bzImage"),
                        str(tmp_path / "vmlinux")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "vmlinux").read_bytes() == elf
    (tmp_path / "bad").write_bytes(b"MZ" + lzma.compress(b"not an elf", format=lzma.FORMAT_XZ))
    r = subprocess.run([sys.executable, str(RIG / "build" / "extract-vmlinux.py"), str(tmp_path / "bad"),
                        str(tmp_path / "v2")], capture_output=True, text=True)
    assert r.returncode != 0 and "no xz or gzip payload" in r.stderr


def test_guest_results_rejects_an_unknown_step(tmp_path):
    (tmp_path / "c.log").write_text(GOOD_CONSOLE)
    (tmp_path / "xs.txt").write_text(XENSTORE)
    r = subprocess.run([sys.executable, str(RIG / "dom0" / "guest-results.py"), "--name", "g", "--console",
                        str(tmp_path / "c.log"), "--xenstore", str(tmp_path / "xs.txt"), "--steps", "info,fsck",
                        "--json", str(tmp_path / "r.json")], capture_output=True, text=True)
    assert r.returncode == 1 and "step fsck: the guest workload has no such step" in r.stdout, r.stdout
