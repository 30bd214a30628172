"""Every start-up failure an operator can meet: one line with a hint, exit 2 (no systemd restart loop);
a lost xenstored: one line, every disk drained, exit 1 (systemd starts a new daemon).

The Xen cases run `xenblk-vhost run` for real in a private mount namespace (unshare) whose /sys and /dev
say what an operator's dom0 would: not Xen at all, Xen without the gntdev module, Xen without evtchn.
"""

from __future__ import annotations

import errno
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from e2e_support.fixtures import disk_image, write_config
from xenblk_vhost.daemon.preflight import explain_xen_device_error, explain_xenstore_failure
from xenblk_vhost.sim.world import open_world

RUN = [sys.executable, "-m", "xenblk_vhost", "run"]


def one_error_line(done: subprocess.CompletedProcess) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def run_in_fake_dom0(tmp_path: Path, config: Path, setup: str) -> subprocess.CompletedProcess:
    """`run` in a private mount namespace whose /sys is a tmpfs (and /dev/xen what `setup` makes)."""
    script = f"""set -e
mount -t tmpfs none /sys
mkdir -p /sys/hypervisor
{setup}
exec "$@"
"""
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                           *RUN, str(config)], capture_output=True, text=True, timeout=60)


@pytest.fixture
def config(tmp_path):
    return write_config(tmp_path, "g", [f"vdev: xvda, driver: io_uring, path: {disk_image(tmp_path)}"])


def test_not_on_xen(tmp_path, config):
    done = run_in_fake_dom0(tmp_path, config, "echo kvm > /sys/hypervisor/type")
    assert done.returncode == 2
    assert one_error_line(done) == (
        "xenblk-vhost run: not running on Xen (/sys/hypervisor/type says 'kvm'; /dev/xen/gntdev is missing): "
        "xenblk-vhost runs in dom0 or a driver domain (or against the simulator: run --sim SOCKET)")


@pytest.mark.parametrize("nodes, module", [
    ("", "xen-gntdev"),
    ("mknod /dev/xen/gntdev c 1 3", "xen-evtchn"),  # gntdev there (any char device opens), evtchn not
])
def test_xen_without_a_module(tmp_path, config, nodes, module):
    if not Path("/dev/xen").is_dir():
        # No /dev/xen to mount over here: the namespace gets its own /dev (a tmpfs with null and urandom).
        setup = ("echo xen > /sys/hypervisor/type; mount -t tmpfs none /dev; mknod /dev/null c 1 3; "
                 "chmod 666 /dev/null; mknod /dev/urandom c 1 9; mkdir /dev/xen; " + nodes)
    else:
        setup = "echo xen > /sys/hypervisor/type; mount -t tmpfs none /dev/xen; " + nodes
    done = run_in_fake_dom0(tmp_path, config, setup)
    assert done.returncode == 2, done.stderr
    node = "/dev/xen/gntdev" if module == "xen-gntdev" else "/dev/xen/evtchn"
    assert one_error_line(done) == (
        f"xenblk-vhost run: {node} is missing: the {module} module is not loaded (modprobe {module}; at boot: "
        f"list it in /etc/modules)")


def test_device_errors_explained():
    assert explain_xen_device_error(PermissionError(errno.EACCES, "Permission denied", "/dev/xen/gntdev"),
                                    hypervisor="xen") == (
        "/dev/xen/gntdev: permission denied: run as root (the xenblk-vhost@ unit does)")
    assert explain_xen_device_error(FileNotFoundError(errno.ENOENT, "x", "/dev/xen/gntdev"), hypervisor=None) \
        .startswith("not running on Xen (no /sys/hypervisor/type; /dev/xen/gntdev is missing)")


async def test_xenstored_unreachable_names_what_was_tried(tmp_path, config):
    async with open_world(tmp_path / "w") as world:
        done = await trio.run_process([*RUN, str(config), "--sim", world.hypervisor_path], capture_stdout=True,
                                      capture_stderr=True, check=False,
                                      env={k: v for k, v in __import__("os").environ.items()
                                           if k != "XENSTORED_PATH"})
    assert done.returncode == 2
    line = one_error_line(subprocess.CompletedProcess([], 2, done.stdout.decode(), done.stderr.decode()))
    assert line.startswith("xenblk-vhost run: cannot reach xenstored (")
    for tried in ("/run/xenstored/socket (", "/var/run/xenstored/socket (", "/dev/xen/xenbus ("):
        assert tried in line
    assert "is xenstored running" in line


def test_xenstore_failure_for_an_explicit_path_or_the_environment():
    e = FileNotFoundError(errno.ENOENT, "No such file or directory", "/x")
    assert explain_xenstore_failure("/x", e) == "cannot reach xenstored at /x (--xenstore): No such file or directory"
    assert explain_xenstore_failure(None, e, environ={"XENSTORED_PATH": "/y"}) == (
        "cannot reach xenstored at $XENSTORED_PATH=/y: No such file or directory")


async def test_xenstore_on_a_regular_file(tmp_path, config):
    """Issue 10: it printed a traceback."""
    regular = tmp_path / "not-a-socket"
    regular.write_text("")
    async with open_world(tmp_path / "w") as world:
        done = await trio.run_process([*RUN, str(config), "--sim", world.hypervisor_path, "--xenstore",
                                       str(regular)], capture_stdout=True, capture_stderr=True, check=False)
    assert done.returncode == 2
    assert done.stderr.decode().strip() == (
        f"xenblk-vhost run: --xenstore {regular}: a regular file: give xenstored's socket (e.g. "
        "/run/xenstored/socket) or the xenbus device (/dev/xen/xenbus)")


def test_check_refuses_libblkio_properties_that_run_would_refuse_at_attach(tmp_path):
    """Issue 10: `check` accepted properties that libblkio then refused when a guest attached."""
    img = disk_image(tmp_path)
    sock_path = tmp_path / "qsd.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock_path))  # a storage daemon's socket (never connected to: nothing is opened)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"""domain: {{name: b}}
disks:
  - vdev: xvda
    driver: io_uring
    path: {img}
    properties:
      num-entries: lots
      no-such-knob: 1
      capacity: 5
  - vdev: xvdb
    driver: virtio-blk-vhost-user
    path: {sock_path}
    properties: {{num-entries: 64, queue-size: 64}}
""")
    for argv in (["check", str(bad)], ["check", "--no-storage", str(bad)], ["run", str(bad), "--sim", "/none"]):
        done = subprocess.run([sys.executable, "-m", "xenblk_vhost", *argv], capture_output=True, text=True,
                              timeout=60)
        assert done.returncode == 2
        lines = done.stderr.splitlines()
        assert f"{bad}:7: disks[0].properties.num-entries: libblkio's io_uring refuses it: Value must be a signed " \
               "32-bit integer" in lines
        assert f"{bad}:8: disks[0].properties.no-such-knob: libblkio's io_uring refuses it: Unknown property " \
               "name" in lines
        assert f"{bad}:9: disks[0].properties.capacity: libblkio's io_uring refuses it: Property is read-only" \
               in lines
        # vhost-user has no num-entries (io_uring's name); queue-size is right (checked once connected).
        assert f"{bad}:13: disks[1].properties.num-entries: libblkio's virtio-blk-vhost-user refuses it: " \
               "Unknown property name" in lines
        assert not any("queue-size" in line for line in lines)
    good = tmp_path / "good.yaml"
    good.write_text(f"domain: {{name: g}}\ndisks:\n  - {{vdev: xvda, driver: io_uring, path: {img}, "
                    "properties: {num-entries: 64}}\n")
    done = subprocess.run([sys.executable, "-m", "xenblk_vhost", "check", str(good)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    listener.close()


async def test_losing_xenstored_is_one_line_every_disk_drained_and_exit_1(tmp_path, config):
    """Issue 10: a 60-line ExceptionGroup. Now: one line, exit 1 so that systemd starts a new daemon."""
    xs_path = str(tmp_path / "xs.sock")
    async with open_world(tmp_path / "w") as world:
        xenstored = await trio.lowlevel.open_process([sys.executable, "-m", "xenblk_vhost.sim.xenstored",
                                                      "--socket", xs_path])
        try:
            with trio.fail_after(20):
                while not Path(xs_path).exists():
                    await trio.sleep(0.05)
            daemon = subprocess.Popen([*RUN, str(config), "--sim", world.hypervisor_path, "--xenstore", xs_path,
                                       "--control", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True)
            try:
                assert (await trio.to_thread.run_sync(daemon.stdout.readline)).strip() == "ready"
                xenstored.send_signal(signal.SIGKILL)
                start = time.monotonic()
                status = await trio.to_thread.run_sync(lambda: daemon.wait(30))
                took = time.monotonic() - start
                err = daemon.stderr.read()
            finally:
                if daemon.poll() is None:
                    daemon.kill()
                    daemon.wait()
        finally:
            if xenstored.returncode is None:
                xenstored.kill()
            await xenstored.wait()
    assert status == 1, err
    errors = [line for line in err.splitlines() if " ERROR " in line or "Traceback" in line]
    assert len(errors) == 1, err
    assert "lost the connection to xenstored" in errors[0] and "exiting with status 1" in errors[0]
    assert "Traceback" not in err and "ExceptionGroup" not in err
    assert took < 10
