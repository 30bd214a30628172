"""The example configurations under config/: valid, consistent with the
deployment files and the hotplug script, and working end to end.

On a fresh machine none of their storage exists: `check --no-storage`
passes, the strict check names exactly the missing storage. With the
paths moved into a scratch directory where the storage is made (images,
an LV stand-in, qemu-storage-daemon's sockets), the strict check passes and
a guest uses the disks through the daemon, attached the way the examples'
own xl lines say.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from e2e_support.fixtures import backend_service, read_text, tree
from e2e_support.frontend_agent import frontend_agent, sector_pattern
from xenblk_vhost.config import ConfigError, load_config, load_configs
from xenblk_vhost.hotplug.install import DEFAULT_NAME, install, shim_text
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "config").glob("*.yaml"))
ARGS = sorted((ROOT / "deploy" / "storage-node").glob("*.args"))
# Where the examples put things, and where a test puts them instead.
PLACES = {"/var/lib/xen/images/": "images", "/run/xenblk-vhost/vhost-user/": "vu", "/dev/vg0/": "dev",
          "/etc/xenblk-vhost/": "etc"}


@pytest.fixture
def scratch():
    """A short directory (unix socket paths are limited to 107 bytes) with the examples' places."""
    top = Path(tempfile.mkdtemp(prefix="xv-", dir="/tmp"))
    for sub in PLACES.values():
        (top / sub).mkdir()
    yield top
    shutil.rmtree(top, ignore_errors=True)


def localize(text: str, top: Path) -> str:
    for prefix, sub in PLACES.items():
        text = text.replace(prefix, f"{top}/{sub}/")
    return text


def xl_disk_lines(path: Path) -> list[str]:
    """The xl disk specs quoted in an example's comments."""
    return re.findall(r"'(vdev=[^']*)'", path.read_text())


def test_there_are_the_four_examples():
    assert [p.name for p in EXAMPLES] == ["file-disk.yaml", "nbd-vhost-user.yaml", "two-disks.yaml",
                                          "vhost-user-qsd.yaml"]


def test_check_no_storage_passes_on_a_fresh_machine():
    done = subprocess.run([sys.executable, "-m", "xenblk_vhost", "check", "--no-storage", *map(str, EXAMPLES)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == len(EXAMPLES)
    for path, line in zip(EXAMPLES, lines):
        assert line.startswith(f"{path}: ok: domain ") and line.endswith(" (storage not checked)")


def test_the_strict_check_only_misses_the_storage():
    with pytest.raises(ConfigError) as info:
        load_configs(EXAMPLES)
    assert info.value.problems
    for problem in info.value.problems:
        assert problem.key.endswith(".path") and "no such file" in problem.reason, str(problem)


def test_with_their_storage_in_place_the_strict_check_passes(scratch):
    sockets = []
    try:
        for example in EXAMPLES:
            local = scratch / "etc" / example.name
            local.write_text(localize(example.read_text(), scratch))
            for disk in load_config(local, check_storage=False).disks:
                if disk.driver == "virtio-blk-vhost-user":
                    sockets.append(socket.socket(socket.AF_UNIX))
                    sockets[-1].bind(disk.path)  # only its existence and kind matter
                else:
                    Path(disk.path).write_bytes(bytes(1 << 20))  # an image, or the LV's stand-in
            cfg = load_config(local)  # strict
            assert cfg.disks and all(d.path.startswith(str(scratch)) for d in cfg.disks)
    finally:
        for s in sockets:
            s.close()


def test_the_xl_lines_in_the_comments_attach_their_own_disks():
    for example in EXAMPLES:
        cfg = load_config(example, check_storage=False)
        lines = xl_disk_lines(example)
        assert lines, f"{example.name} shows no xl disk line"
        for line in lines:
            items = [item.strip() for item in line.split(",")]
            fields = dict(item.split("=", 1) for item in items)
            # target= eats the rest of the line in xl's parser: it must come last.
            assert items[-1].startswith("target="), line
            assert fields["target"] == f"/etc/xenblk-vhost/{cfg.name}.yaml"
            assert fields["backendtype"] in ("phy", "tap") and fields["script"] == DEFAULT_NAME
            assert cfg.disk(_devid(fields["vdev"])) is not None, line
        # Every disk of the file has its line.
        assert {d.name for d in cfg.disks} <= {dict(i.strip().split("=", 1) for i in ln.split(","))["vdev"]
                                              for ln in lines}


def _devid(vdev: str) -> int:
    from xenblk_vhost.vdev import parse_vdev

    return parse_vdev(vdev)


def qsd_exports(args_file: Path) -> dict[str, str]:
    """export id -> vhost-user socket path, from a qsd options file."""
    text = re.sub(r"#.*", "", args_file.read_text())
    out = {}
    for word in text.split():
        if word.startswith("type=vhost-user-blk,"):
            opts = dict(o.split("=", 1) for o in word.split(","))
            out[opts["id"]] = opts["addr.path"]
    return out


def test_every_vhost_user_disk_has_a_storage_node_export():
    exported = {path for args in ARGS for path in qsd_exports(args).values()}
    for example in EXAMPLES:
        for disk in load_config(example, check_storage=False).disks:
            if disk.driver == "virtio-blk-vhost-user":
                assert disk.path in exported, (
                    f"{example.name} {disk.name}: no deploy/storage-node/*.args exports {disk.path}"
                )
                # queues must not exceed the export's num-queues (the rings map onto qsd's queues)
                args = next(a for a in ARGS if disk.path in qsd_exports(a).values())
                num = re.search(
                    rf"num-queues=(\d+),addr\.type=unix,addr\.path={re.escape(disk.path)}", args.read_text()
                )
                assert num and disk.queues <= int(num.group(1)), (example.name, disk.name)


def start_qsd(args_file: Path, pidfile: Path) -> subprocess.Popen:
    """qemu-storage-daemon with an options file, as qemu-storage-daemon@.service runs it;
    returns once its pid file (written when every export listens) is there."""
    proc = subprocess.Popen(["/bin/sh", "-c", 'exec qemu-storage-daemon --pidfile "$1" $(sed -e "s/#.*//" "$2")',
                             "sh", str(pidfile), str(args_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 15
    while not (pidfile.exists() and pidfile.read_text().strip()):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"qemu-storage-daemon did not start: {proc.communicate()[0].decode()}")
        time.sleep(0.01)
    return proc


async def test_a_guest_uses_the_file_and_qsd_examples_attached_by_their_xl_lines(scratch):
    examples = {"web1": ROOT / "config" / "file-disk.yaml", "db1": ROOT / "config" / "vhost-user-qsd.yaml"}
    yamls = {}
    for name, example in examples.items():
        yamls[name] = scratch / "etc" / f"{name}.yaml"
        yamls[name].write_text(localize(example.read_text(), scratch))
    image = scratch / "images" / "web1.img"
    with open(image, "wb") as f:
        f.truncate(32 << 20)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(scratch / "images" / "db1.qcow2"), "32M"], check=True
    )
    args = scratch / "etc" / "db1.args"
    args.write_text(localize((ROOT / "deploy" / "storage-node" / "db1.args").read_text(), scratch))
    qsd = start_qsd(args, scratch / "qsd-db1.pid")
    install(shim_text(control_dir=str(scratch / "vu")), str(scratch))  # no control socket of this machine's
    try:
        configs = load_configs(yamls.values())  # strict: the image and the socket exist now
        async with open_world(scratch / "w") as world:
            async with backend_service(world, configs):
                for name in ("web1", "db1"):
                    guest = await world.create_guest(name)
                    (line,) = xl_disk_lines(examples[name])
                    fields = dict(item.strip().split("=", 1) for item in line.split(","))
                    vbd = await world.attach_vbd(guest.domid, VbdConfig(
                        vdev=fields["vdev"], target=localize(fields["target"], scratch),
                        script=str(scratch / fields["script"])))
                    done = await _hotplug(world, vbd, "add")
                    assert done.returncode == 0, done.stderr
                    assert await read_text(world.xs, f"{vbd.backend}/hotplug-status") == "connected"
                    async with frontend_agent(world, guest.domid, vbd.devid) as fe:
                        await fe.call("connect")
                        await fe.call("write", sector=4096, sectors=64, seed=3)
                        await fe.call("flush")
                        assert (await fe.call("verify", sector=4096, sectors=64, seed=3))["equal"]
                        assert (await fe.call("close"))["errors"] == []
                    if name == "web1":
                        with open(image, "rb") as f:
                            f.seek(4096 * 512)
                            assert f.read(64 * 512) == sector_pattern(3, 64)
                        assert (await tree(world.xs, vbd.backend))["physical-device-path"] == str(image)
    finally:
        qsd.terminate()
        qsd.wait(10)


async def _hotplug(world, vbd, action: str) -> subprocess.CompletedProcess:
    import trio

    script = await read_text(world.xs, f"{vbd.backend}/script")
    env = {"PATH": os.environ["PATH"], "XENBUS_PATH": f"backend/{vbd.kind.value}/{vbd.domid}/{vbd.devid}",
           "XENBUS_TYPE": vbd.kind.value, "XENBUS_BASE_PATH": "backend", "script": script,
           "XENSTORED_PATH": world.xenstore_path}
    return await trio.to_thread.run_sync(lambda: subprocess.run(
        [script, action], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=40))
