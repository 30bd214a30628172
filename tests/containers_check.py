"""The container images of deploy/container/Containerfile, run (scripts/build-containers.sh builds
them, then runs this file; not part of the default suite, whose name pattern it does not match:
the first build takes minutes).

- xenblk-vhost's image: its command, `check` on the examples it ships, and `demo` (simulated Xen,
  the backend on io_uring, a guest verifying every byte) inside the container, no /dev/xen, with
  compose.yaml's seccomp=unconfined (the default profile refuses io_uring).
- qemu-storage-daemon's image, run as deploy/compose.yaml's `qsd` service says (its command, its
  network mode, its three volumes with their host sides moved under the test's directory, ready
  when its healthcheck passes; the ENTRYPOINT reading the shipped deploy/storage-node/db1.args),
  exports db1's qcow2 image as a vhost-user-blk socket; the backend on this host, configured by
  the shipped config/vhost-user-qsd.yaml (only its socket's directory moved), serves a simulated
  guest from it: what the guest writes is read back, and is in the qcow2 image afterwards.

    XENBLK_IMAGE=localhost/xenblk-vhost:0.1.0 XENBLK_QSD_IMAGE=localhost/xenblk-vhost-qsd:0.1.0 \\
        .venv/bin/pytest tests/containers_check.py
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import trio
import yaml

from e2e_support.fixtures import backend_service
from e2e_support.frontend_agent import frontend_agent, sector_pattern
from xenblk_vhost.config import load_config
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("XENBLK_IMAGE", "localhost/xenblk-vhost:0.1.0")
QSD_IMAGE = os.environ.get("XENBLK_QSD_IMAGE", "localhost/xenblk-vhost-qsd:0.1.0")
SIZE = 64 << 20


def podman(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module", autouse=True)
def images_exist():
    for image in (IMAGE, QSD_IMAGE):
        assert podman("image", "exists", image).returncode == 0, f"{image}: run scripts/build-containers.sh"


def test_the_image_runs_its_command_and_checks_its_examples():
    done = podman("run", "--rm", "--network", "none", IMAGE, "--version")
    assert (done.returncode, done.stdout) == (0, "xenblk-vhost 0.1.0\n"), done.stderr
    examples = sorted(p.name for p in (ROOT / "config").glob("*.yaml"))
    done = podman("run", "--rm", "--network", "none", IMAGE, "check", "--no-storage",
                  *[f"/usr/local/share/doc/xenblk-vhost/examples/{name}" for name in examples])
    assert done.returncode == 0, done.stderr
    assert len([line for line in done.stdout.splitlines() if ": ok: " in line]) == len(examples)


def test_the_demo_runs_inside_the_container():
    """No /dev/xen and no network; compose.yaml's security options for the xenblk-vhost service: podman's
    default seccomp profile, like Docker's, refuses io_uring (blkio_start(io_uring): ENOSYS, seen here)."""
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())["services"]["xenblk-vhost"]
    assert compose["security_opt"] == ["seccomp=unconfined"]
    started = time.monotonic()
    done = podman("run", "--rm", "--network", "none", *[f"--security-opt={o}" for o in compose["security_opt"]],
                  IMAGE, "demo", "--seconds", "2", "--json")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["counters_agree"], summary["failure"]) == (True, True, None), summary
    assert summary["driver"] == "io_uring" and summary["iops"] > 0
    print(f"demo in the container: {summary['iops']} IOPS, {time.monotonic() - started:.1f} s with start-up")


# deploy/compose.yaml's host directories, moved under the test's own directory.
HOST_DIRS = {"/etc/xenblk-vhost/qsd": "qsd", "/var/lib/xen/images": "images", "/run/xenblk-vhost/vhost-user": "vu"}


@pytest.fixture
def qsd_container(tmp_path):
    """db1's qemu-storage-daemon in its container, as deploy/compose.yaml's `qsd` service says:
    its command, network mode and volumes (host sides moved under tmp_path), ready when its
    healthcheck's command succeeds in the container."""
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())["services"]["qsd"]
    assert compose["image"] == QSD_IMAGE.removeprefix("localhost/")
    volumes = []
    for volume in compose["volumes"]:
        host, inside, *mode = volume.split(":")
        assert host in HOST_DIRS, f"compose.yaml mounts {host}: add it to HOST_DIRS"
        (tmp_path / HOST_DIRS[host]).mkdir(exist_ok=True)
        volumes += ["-v", ":".join([str(tmp_path / HOST_DIRS[host]), inside, *mode])]
    (tmp_path / "qsd" / "db1.args").write_text((ROOT / "deploy/storage-node/db1.args").read_text())
    image = tmp_path / "images" / "db1.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE)], check=True)
    name = f"xenblk-qsd-check-{os.getpid()}"
    done = podman("run", "-d", "--name", name, "--network", compose["network_mode"], *volumes,
                  QSD_IMAGE, *compose["command"])
    assert done.returncode == 0, done.stderr
    try:
        kind, *health = compose["healthcheck"]["test"]
        assert kind == "CMD"
        deadline = time.monotonic() + 30
        while podman("exec", name, *health).returncode != 0:
            state = podman("inspect", "--format", "{{.State.Status}}", name).stdout.strip()
            logs = podman("logs", name)
            assert state == "running", logs.stdout + logs.stderr
            assert time.monotonic() < deadline, "not healthy after 30 s"
            time.sleep(0.2)
        socket = tmp_path / "vu" / "db1-xvda.sock"
        assert socket.is_socket()
        yield socket, image, name
    finally:
        podman("rm", "-f", "-t", "10", name)


async def test_the_qsd_container_serves_the_hosts_backend(qsd_container, tmp_path):
    socket, image, name = qsd_container
    shipped = (ROOT / "config/vhost-user-qsd.yaml").read_text()
    assert "/run/xenblk-vhost/vhost-user/db1-xvda.sock" in shipped
    yaml_file = tmp_path / "db1.yaml"
    yaml_file.write_text(shipped.replace("/run/xenblk-vhost/vhost-user/db1-xvda.sock", str(socket)))
    cfg = load_config(yaml_file)
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("db1")
        async with backend_service(world, [cfg]):
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(yaml_file)))
            async with frontend_agent(world, guest.domid, vbd.devid) as fe:
                connected = await fe.call("connect")
                assert connected["sectors"] == SIZE // 512
                await fe.call("write", sector=4096, sectors=256, seed=11)
                await fe.call("flush")
                assert (await fe.call("verify", sector=4096, sectors=256, seed=11))["equal"]
                assert (await fe.call("close"))["errors"] == []
    # Stopped (qsd closes the image cleanly), the qcow2 file holds what the guest wrote.
    assert podman("stop", "-t", "10", name).returncode == 0
    raw = tmp_path / "db1.raw"
    await trio.to_thread.run_sync(lambda: subprocess.run(
        ["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True))
    with open(raw, "rb") as f:
        f.seek(4096 * 512)
        assert f.read(256 * 512) == sector_pattern(11, 256)
