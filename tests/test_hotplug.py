"""The hotplug script run as libxl runs it, against the daemon on the simulated host.

Each test drives the xenstore sequence libxl drives (sim/toolstack.py:
device_disk_add, wait for InitWait), runs the installed shim the way
libxl's device_hotplug does (argv `<script> add|remove`, env XENBUS_PATH
relative to dom0's home plus XENBUS_TYPE, XENBUS_BASE_PATH and script,
stdin /dev/null, 40 s), and checks the nodes it wrote and its exit status.
Detach follows libxl's order: online=0 and Closing, wait for Closed, then
`remove`, then the dir is deleted.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import trio

from e2e_support.fixtures import backend_service, disk_image, domain_config, read_text, tree, write_config
from e2e_support.frontend_agent import frontend_agent
from xenblk_vhost.hotplug.checks import HotplugError
from xenblk_vhost.hotplug.install import install, shim_text
from xenblk_vhost.hotplug.script import add
from xenblk_vhost.hotplug.target import parse_xenbus_path
from xenblk_vhost.observability.control_commands import ControlCommands
from xenblk_vhost.observability.control_socket import ControlSocket
from xenblk_vhost.sim import toolstack
from xenblk_vhost.sim.toolstack import BackendKind, VbdConfig, VbdPaths
from xenblk_vhost.sim.world import open_world

LIBXL_HOTPLUG_TIMEOUT = 40  # libxl_internal.h


def install_shim(directory: Path, *, as_operator: bool = False, control: Path | None = None) -> Path:
    """The shim, written by `xenblk-vhost install-hotplug --dir DIR` (as_operator)
    or by the same function in this process (faster). The daemons' control
    sockets are looked for in `control` (default DIR/control, empty), never
    in this machine's /run/xenblk-vhost."""
    directory.mkdir(exist_ok=True)
    control = control or directory / "control"
    control.mkdir(exist_ok=True)
    if not as_operator:
        return install(shim_text(control_dir=str(control)), str(directory))
    out = subprocess.run([sys.executable, "-m", "xenblk_vhost", "install-hotplug", "--dir", str(directory),
                          "--control-dir", str(control)], capture_output=True, text=True, check=True)
    shim = directory / "block-xenblk-vhost"
    assert f"installed {shim}" in out.stdout
    assert f"'vdev=xvda, backendtype=phy, script={shim}, target=/etc/xenblk-vhost/<domain>.yaml'" in out.stdout
    return shim


async def run_script(world, vbd: VbdPaths, action: str) -> subprocess.CompletedProcess:
    """libxl_device.c device_hotplug + libxl_linux.c libxl__hotplug_disk: the script
    named by the backend's `script` node, with libxl's environment."""
    script = await read_text(world.xs, f"{vbd.backend}/script")
    env = {
        "PATH": os.environ["PATH"],
        "script": script,
        "XENBUS_TYPE": vbd.kind.value,
        "XENBUS_PATH": f"backend/{vbd.kind.value}/{vbd.domid}/{vbd.devid}",
        "XENBUS_BASE_PATH": "backend",
        # dom0's libxenstore finds the daemon's socket; ours is the simulated one.
        "XENSTORED_PATH": world.xenstore_path,
    }
    return await trio.to_thread.run_sync(lambda: subprocess.run(
        [script, action], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=LIBXL_HOTPLUG_TIMEOUT))


async def libxl_detach(world, vbd: VbdPaths, *, force: bool = False) -> subprocess.CompletedProcess:
    """`xl block-detach` with the script: libxl__initiate_device_generic_remove
    (online=0, Closing; forced: the frontend dir removed first, as for a guest
    with no running frontend), wait for Closed, device_hotplug(remove), then
    libxl__device_destroy."""
    async def closing(t) -> None:
        if force:
            await toolstack.path_cleanup(t, vbd.frontend)
        await t.write(f"{vbd.backend}/online", "0")
        await t.write(f"{vbd.backend}/state", "5")

    await world.xs.transact(closing)
    await toolstack.wait_for_state(world.xs, f"{vbd.backend}/state", 6, toolstack.LIBXL_DESTROY_TIMEOUT)
    # The dir still exists while the script runs.
    assert await read_text(world.xs, f"{vbd.backend}/hotplug-status") == "connected"
    result = await run_script(world, vbd, "remove")
    await toolstack.destroy_device(world.xs, vbd)
    return result


async def test_phy_route_add_connects_the_guest_and_remove_cleans_up(tmp_path):
    img = disk_image(tmp_path)
    yaml_path = write_config(tmp_path, "web1", [f"vdev: xvda, driver: io_uring, path: {img}"])
    shim = install_shim(tmp_path / "scripts", as_operator=True)
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("web1")
        async with backend_service(
            world, [domain_config(tmp_path, "web1", [f"vdev: xvda, driver: io_uring, path: {img}"])]
        ):
            # disk = ['vdev=xvda, backendtype=phy, script=<shim>, target=<yaml>']
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(yaml_path), script=str(shim)))
            assert await read_text(world.xs, f"{vbd.backend}/params") == str(yaml_path)
            done = await run_script(world, vbd, "add")
            assert done.returncode == 0, done.stderr
            assert (f"web1 xvda served from {yaml_path} (io_uring {img}, read-write; checked with the xenstore only: "
                    f"no control socket lists it)") in done.stderr
            nodes = await tree(world.xs, vbd.backend)
            assert nodes["hotplug-status"] == "connected"
            assert nodes["physical-device-path"] == str(img)
            assert "hotplug-error" not in nodes
            # The guest then uses the disk as usual.
            async with frontend_agent(world, guest.domid, vbd.devid) as fe:
                await fe.call("connect")
                await fe.call("write", sector=8, sectors=16, seed=4)
                assert (await fe.call("verify", sector=8, sectors=16, seed=4))["equal"]
                removed = await libxl_detach(world, vbd)
                assert (await fe.call("wait_closed", timeout=10))["errors"] == []
            assert removed.returncode == 0, removed.stderr
            assert "removed" in removed.stderr and "forced" not in removed.stderr
            assert await tree(world.xs, vbd.backend) == {}


async def test_tap_route_vbd3_strips_the_format_and_writes_no_local_path(tmp_path):
    img = disk_image(tmp_path)
    disks = [f"vdev: xvdb, driver: io_uring, path: {img}"]
    yaml_path = write_config(tmp_path, "app", disks)
    shim = install_shim(tmp_path / "scripts")
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("app")
        async with backend_service(world, [domain_config(tmp_path, "app", disks)]):
            # Xen >= 4.19: disk = ['vdev=xvdb, backendtype=tap, script=<shim>, target=<yaml>']
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvdb", target=str(yaml_path),
                                                                 kind=BackendKind.VBD3, script=str(shim)))
            assert vbd.backend.startswith("/local/domain/0/backend/vbd3/")
            assert await read_text(world.xs, f"{vbd.backend}/params") == f"aio:{yaml_path}"
            done = await run_script(world, vbd, "add")
            assert done.returncode == 0, done.stderr
            nodes = await tree(world.xs, vbd.backend)
            assert nodes["hotplug-status"] == "connected"
            # libxl would read it as tapdisk's NBD socket.
            assert "physical-device-path" not in nodes


async def test_a_line_naming_another_domains_file_fails_the_attach(tmp_path):
    imgs = [disk_image(tmp_path, f"{n}.img") for n in ("web1", "db")]
    web1 = write_config(tmp_path, "web1", [f"vdev: xvda, driver: io_uring, path: {imgs[0]}"])
    write_config(tmp_path, "db", [f"vdev: xvda, driver: io_uring, path: {imgs[1]}"])
    shim = install_shim(tmp_path / "scripts")
    configs = [domain_config(tmp_path, n, [f"vdev: xvda, driver: io_uring, path: {i}"])
               for n, i in (("web1", imgs[0]), ("db", imgs[1]))]
    async with open_world(tmp_path / "w") as world:
        db = await world.create_guest("db")
        async with backend_service(world, configs):
            # db's xl config copied from web1's: the daemon serves db from db.yaml,
            # but the operator meant web1.yaml's disk. libxl must not go on.
            vbd = await world.attach_vbd(db.domid, VbdConfig(vdev="xvda", target=str(web1), script=str(shim)))
            done = await run_script(world, vbd, "add")
            assert done.returncode == 1
            why = (f"{web1} configures domain 'web1', but this disk belongs to domain {db.domid} ('db'): "
                   f"the xl disk line names another domain's file")
            nodes = await tree(world.xs, vbd.backend)
            assert (nodes["hotplug-status"], nodes["hotplug-error"]) == ("error", why)
            assert why in done.stderr
            assert "physical-device-path" not in nodes


async def test_a_file_edited_but_not_reloaded_is_caught(tmp_path):
    img = disk_image(tmp_path)
    old = [f"vdev: xvda, driver: io_uring, path: {img}, ring_page_order: 4",
           f"vdev: xvdb, driver: io_uring, path: {img}, readonly: true"]
    running = domain_config(tmp_path, "web1", old)  # what the daemon loaded
    yaml_path = write_config(tmp_path, "web1", [f"vdev: xvda, driver: io_uring, path: {img}, ring_page_order: 2"])
    shim = install_shim(tmp_path / "scripts")
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("web1")
        async with backend_service(world, [running]):
            xvda = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(yaml_path), script=str(shim)))
            done = await run_script(world, xvda, "add")
            assert done.returncode == 1
            assert await read_text(world.xs, f"{xvda.backend}/hotplug-error") == (
                f"the backend serving this device does not follow {yaml_path} (max-ring-page-order is 4 where "
                f"the file says 2): another configuration is running; after editing the file reload the daemon "
                f"(systemctl reload xenblk-vhost@<domain>) and attach again")
            xvdb = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvdb", target=str(yaml_path), script=str(shim),
                                                                 readwrite=False))
            done = await run_script(world, xvdb, "add")
            assert done.returncode == 1
            assert await read_text(world.xs, f"{xvdb.backend}/hotplug-error") == (
                f"{yaml_path} has no disk xvdb (device 51728) for domain 'web1'; it configures xvda")


async def test_the_daemons_control_socket_confirms_the_storage_or_catches_a_changed_path(tmp_path):
    old_img, new_img = disk_image(tmp_path, "old.img"), disk_image(tmp_path, "new.img")
    running = domain_config(tmp_path, "web1", [f"vdev: xvda, driver: io_uring, path: {old_img}"])
    control = Path(tempfile.mkdtemp(prefix="xv-", dir="/tmp"))  # unix socket paths are short
    shim = install_shim(tmp_path / "scripts", control=control)
    # A socket nobody answers on (a daemon that died) is skipped, with a note.
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(control / "control-dead.sock"))
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("web1")
        async with backend_service(world, [running]) as service, trio.open_nursery() as nursery:
            yaml_path = write_config(tmp_path, "web1", [f"vdev: xvda, driver: io_uring, path: {old_img}"])
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(yaml_path), script=str(shim)))
            done = await run_script(world, vbd, "add")
            assert done.returncode == 0, done.stderr
            assert "checked with the xenstore only: no control socket lists it" in done.stderr
            assert f"note: nothing is listening on {control / 'control-dead.sock'}" in done.stderr
            # What `run --control DIR/control-web1.sock` serves (as the systemd unit starts it).
            sock = ControlSocket(str(control / "control-web1.sock"))
            nursery.start_soon(sock.serve, ControlCommands(service).handlers())
            done = await run_script(world, vbd, "add")
            assert done.returncode == 0, done.stderr
            assert f"checked with the daemon at {control / 'control-web1.sock'})" in done.stderr
            assert "note:" not in done.stderr  # the dead socket is no news once the daemon is found
            # The file now names other storage, the daemon was not reloaded: the
            # features are the same, only the daemon can tell.
            yaml_path.write_text(yaml_path.read_text().replace(str(old_img), str(new_img)))
            done = await run_script(world, vbd, "add")
            assert done.returncode == 1
            assert await read_text(world.xs, f"{vbd.backend}/hotplug-error") == (
                f"the daemon answering on {control / 'control-web1.sock'} serves this device from io_uring "
                f"{old_img}, but {yaml_path} says io_uring {new_img}: after editing the file reload the daemon "
                f"(systemctl reload xenblk-vhost@<domain>) and attach again")
            nursery.cancel_scope.cancel()
        sock.close()
    dead.close()
    shutil.rmtree(control)


async def test_storage_written_by_one_domain_is_refused_to_another(tmp_path):
    shared = disk_image(tmp_path, "shared.img")
    own = disk_image(tmp_path, "own.img")
    disks = {"a": [f"vdev: xvda, driver: io_uring, path: {shared}"],
             "b": [f"vdev: xvda, driver: io_uring, path: {own}", f"vdev: xvdb, driver: io_uring, path: {shared}"]}
    files = {n: write_config(tmp_path, n, d) for n, d in disks.items()}
    shim = install_shim(tmp_path / "scripts")
    async with open_world(tmp_path / "w") as world:
        a = await world.create_guest("a")
        b = await world.create_guest("b")
        async with backend_service(world, [domain_config(tmp_path, n, d) for n, d in disks.items()]):
            va = await world.attach_vbd(a.domid, VbdConfig(vdev="xvda", target=str(files["a"]), script=str(shim)))
            assert (await run_script(world, va, "add")).returncode == 0
            vb_own = await world.attach_vbd(b.domid, VbdConfig(vdev="xvda", target=str(files["b"]), script=str(shim)))
            assert (await run_script(world, vb_own, "add")).returncode == 0
            # Even read-only: domain a writes it, b would read a changing disk.
            vb = await world.attach_vbd(b.domid, VbdConfig(vdev="xvdb", target=str(files["b"]), script=str(shim),
                                                           readwrite=False))
            done = await run_script(world, vb, "add")
            assert done.returncode == 1
            nodes = await tree(world.xs, vb.backend)
            assert nodes["hotplug-status"] == "busy"
            assert nodes["hotplug-error"] == (
                f"{shared} is already attached to domain a as xvda (read-write); xvdb would have it read-only: "
                f"a disk written by one domain cannot be given to another")
            # Once a's disk is detached (remove clears its hotplug-status), b may have it.
            assert (await libxl_detach(world, va, force=True)).returncode == 0
            done = await run_script(world, vb, "add")
            assert done.returncode == 0, done.stderr
            assert await read_text(world.xs, f"{vb.backend}/hotplug-status") == "connected"
            assert await read_text(world.xs, f"{vb.backend}/hotplug-error") is None


async def test_loaded_blkback_and_a_vanished_dir(tmp_path):
    img = disk_image(tmp_path)
    disks = [f"vdev: xvda, driver: io_uring, path: {img}"]
    yaml_path = write_config(tmp_path, "web1", disks)
    shim = install_shim(tmp_path / "scripts")
    sys_module = tmp_path / "sys-module"
    (sys_module / "xen_blkback").mkdir(parents=True)
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("web1")
        async with backend_service(world, [domain_config(tmp_path, "web1", disks)]):
            vbd = await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(yaml_path), script=str(shim)))
            device = parse_xenbus_path(f"backend/vbd/{vbd.domid}/{vbd.devid}")
            try:
                await add(world.xs, device, sys_module=sys_module)
                raise AssertionError("add succeeded with xen-blkback loaded")
            except HotplugError as e:
                assert e.message.startswith("the kernel's xen-blkback is loaded")
            assert await read_text(world.xs, f"{vbd.backend}/hotplug-status") == "error"
            # The toolstack removed the device meanwhile (xl destroy): remove must not re-create it.
            await toolstack.destroy_device(world.xs, vbd)
            done = await run_script_env(world, vbd, "remove", str(shim))
            assert done.returncode == 0 and "backend dir already gone" in done.stderr
            assert await tree(world.xs, vbd.backend) == {}
            assert await read_text(world.xs, f"/local/domain/0/backend/vbd/{vbd.domid}") is None


async def run_script_env(world, vbd: VbdPaths, action: str, script: str) -> subprocess.CompletedProcess:
    """As run_script, for a device whose dir (and `script` node) is already gone."""
    env = {"PATH": os.environ["PATH"], "XENBUS_PATH": f"backend/{vbd.kind.value}/{vbd.domid}/{vbd.devid}",
           "XENSTORED_PATH": world.xenstore_path}
    return await trio.to_thread.run_sync(lambda: subprocess.run(
        [script, action], env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=40))


def test_usage_errors_exit_2_and_no_xenstored_exits_1_with_the_reason(tmp_path):
    base = {"PATH": os.environ["PATH"], "XENSTORED_PATH": str(tmp_path / "none")}
    done = subprocess.run([sys.executable, "-m", "xenblk_vhost", "hotplug", "add"], env=base,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "XENBUS_PATH is not set" in done.stderr
    # No xenstored to talk to: a failure with the reason, not a traceback.
    done = subprocess.run([sys.executable, "-m", "xenblk_vhost.hotplug", "add"],
                          env={**base, "XENBUS_PATH": "backend/vbd/5/51712"}, capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith("xenblk-vhost-hotplug: add backend/vbd/5/51712: error: cannot reach xenstored")
    assert "Traceback" not in done.stderr
