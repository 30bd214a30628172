"""deploy/: the systemd units, the Containerfile, the compose file and the
storage-node option files, checked as far as this machine allows.

Here, in the default suite, nothing is built or started in a container
(scripts/build-containers.sh and tests/containers_check.py do that, from
.ci/run: the first build takes minutes): the Containerfile's RUN steps are compared with
scripts/install-deps.sh (same pin files, same apt commands, packages it
installs too), its qemu-storage-daemon ENTRYPOINT is run as written, and the
compose file is checked for what must agree (targets, devices, shared
paths, the hotplug shim's container name). The units pass
`systemd-analyze verify` without a word, and what they run is run: the
xenblk-vhost unit's ExecStart speaks sd_notify as Type=notify needs (READY,
RELOADING/READY around its ExecReload, which is synchronous and fails on
a bad file, STOPPING on stop, WATCHDOG pings), the qsd unit's
ExecStartPre/ExecStart/ExecStartPost sequence has the sockets listening
when it returns. Paths under /run, /etc and /var/lib are moved into a
scratch directory; nothing else in the files is changed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio
import yaml

from storage_support.patterns import pattern_range, read_file
from xenblk_vhost.cli import build_parser
from xenblk_vhost.config import load_config
from xenblk_vhost.hotplug.install import _HOTPLUG_ENV, shim_text
from xenblk_vhost.sim.world import open_world
from xenblk_vhost.storage import StorageDevice

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
UNIT = DEPLOY / "systemd" / "xenblk-vhost@.service"
QSD_UNIT = DEPLOY / "systemd" / "qemu-storage-daemon@.service"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
COMPOSE = DEPLOY / "compose.yaml"
INSTALL_DEPS = ROOT / "scripts" / "install-deps.sh"
XENBLK_VHOST = Path(sys.executable).parent / "xenblk-vhost"
BS = 4096
PLACES = {"/run/xenblk-vhost/": "run", "/etc/xenblk-vhost/": "etc", "/var/lib/xen/images/": "images"}


@pytest.fixture
def scratch():
    top = Path(tempfile.mkdtemp(prefix="xv-", dir="/tmp"))  # short: unix socket paths
    for sub in ("run/vhost-user", "etc/qsd", "images"):
        (top / sub).mkdir(parents=True)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def localize(text: str, top: Path) -> str:
    for prefix, sub in PLACES.items():
        text = text.replace(prefix, f"{top}/{sub}/")
    return text


def unit_entries(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as {section: [(key, value), ...]}, repeated keys kept in order."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        key, _, value = line.partition("=")
        current.append((key.strip(), value.strip()))
    return sections


def values(entries, key: str) -> list[str]:
    return [v for k, v in entries if k == key]


def systemd_command(line: str, top: Path, instance: str) -> list[str]:
    """An Exec line as systemd runs it: %i expanded, $$ a literal $, quotes removed."""
    line = localize(line.replace("%i", instance), top).replace("$$", "$")
    return shlex.split(line.replace("/usr/local/bin/xenblk-vhost", str(XENBLK_VHOST)))


# ------------------------------------------------------------------ systemd

@pytest.mark.parametrize("unit, instance", [(UNIT, "web1"), (QSD_UNIT, "db1")])
def test_units_pass_systemd_analyze_verify_without_a_word(tmp_path, unit, instance):
    assert shutil.which("systemd-analyze"), "systemd-analyze (Debian: systemd) is needed to check the units"
    # The command must exist for verify to be satisfied: point it at this checkout's.
    text = unit.read_text().replace("/usr/local/bin/xenblk-vhost", str(XENBLK_VHOST))
    copy = tmp_path / unit.name.replace("@.", f"@{instance}.")
    copy.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (0, "", "")


def test_backend_unit_allows_what_a_xen_backend_needs():
    service = unit_entries(UNIT)["Service"]
    allowed = values(service, "DeviceAllow")
    for node in ("/dev/xen/gntdev rw", "/dev/xen/evtchn rw", "/dev/xen/xenbus rw", "block-* rw"):
        assert node in allowed
    assert values(service, "DevicePolicy") == ["closed"]
    assert values(service, "PrivateDevices") in ([], ["no"])  # would hide /dev/xen
    assert "AF_UNIX" in values(service, "RestrictAddressFamilies")[0].split()  # xenstored, vhost-user, sd_notify
    assert values(service, "Restart") == ["on-failure"]
    unit = unit_entries(UNIT)["Unit"]
    after = " ".join(values(unit, "After")).split()
    assert {"xen.service", "xenstored.service", "qemu-storage-daemon@%i.service"} <= set(after)
    assert values(unit, "Before") == ["xendomains.service"]
    # The qsd unit orders itself the same way round.
    assert "xenblk-vhost@%i.service" in values(unit_entries(QSD_UNIT)["Unit"], "Before")


async def test_backend_units_execstart_speaks_sd_notify_as_type_notify_needs(scratch):
    service = unit_entries(UNIT)["Service"]
    assert values(service, "Type") == ["notify"]
    assert values(service, "RestartPreventExitStatus") == ["2"]  # a bad file or machine: no restart loop
    watchdog = values(service, "WatchdogSec")
    assert watchdog and float(watchdog[0].rstrip("s")) >= 10
    image = scratch / "images" / "web1.img"
    with open(image, "wb") as f:
        f.truncate(8 << 20)
    yaml_path = scratch / "etc" / "web1.yaml"
    yaml_path.write_text(
        localize((ROOT / "config" / "file-disk.yaml").read_text(), scratch).replace("direct: true", "direct: false"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(scratch / "notify"))
    notify.settimeout(0)
    # What systemd passes with WatchdogSec= (here 1 s, to see several pings quickly).
    env = dict(os.environ, NOTIFY_SOCKET=str(scratch / "notify"), WATCHDOG_USEC="1000000")
    env.update(dict(v.split("=", 1) for v in values(service, "Environment")))
    async with open_world(scratch / "w") as world:
        (exec_start,) = values(service, "ExecStart")
        argv = systemd_command(exec_start, scratch, "web1") + ["--xenstore", world.xenstore_path,
                                                              "--sim", world.hypervisor_path]
        proc = await trio.lowlevel.open_process(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready = await _notification(notify, "READY=1")
            assert "STATUS=1 domain(s) configured, 0 disk(s) connected" in ready
            # Watchdog pings keep coming, from the event loop, every half WatchdogSec.
            pings = [time.monotonic()]
            for _ in range(3):
                await _notification(notify, "WATCHDOG=1")
                pings.append(time.monotonic())
            assert all(b - a < 0.9 for a, b in zip(pings[1:], pings[2:])), pings
            # The control socket the unit names answers `ctl` and `stats`.
            control = re.search(r"--control (\S+)", " ".join(argv)).group(1)
            assert control == f"{scratch}/run/control-web1.sock"
            stats = await trio.to_thread.run_sync(lambda: subprocess.run(
                [str(XENBLK_VHOST), "stats", "--control", control, "--json"], capture_output=True, text=True))
            assert stats.returncode == 0, stats.stderr
            assert json.loads(stats.stdout)["daemons"][0]["vbds"] == []  # serving, no guest attached
            # ExecReload is synchronous: it fails, with check's lines, when the file does not validate...
            (reload,) = values(service, "ExecReload")
            reload_argv = systemd_command(reload, scratch, "web1")
            good = yaml_path.read_text()
            yaml_path.write_text(good.replace("queues: 4", "queues: 0"))
            done = await trio.to_thread.run_sync(lambda: subprocess.run(reload_argv, capture_output=True, text=True))
            assert done.returncode == 2, done.stderr
            assert "reload refused" in done.stderr and "queues: must be between 1 and 64, got 0" in done.stderr
            assert "RELOADING=1" in await _notification(notify, "RELOADING=1")
            assert "READY=1" in await _notification(notify, "READY=1")
            # ...and succeeds, saying what changed, when it does.
            yaml_path.write_text(good.replace("queues: 4", "queues: 2"))
            done = await trio.to_thread.run_sync(lambda: subprocess.run(reload_argv, capture_output=True, text=True))
            assert done.returncode == 0, done.stderr
            assert "web1/xvda: queues changed" in done.stdout
            await _notification(notify, "READY=1")
            proc.send_signal(signal.SIGTERM)  # systemctl stop
            assert "STOPPING=1" in await _notification(notify, "STOPPING=1")
            stop_timeout = float(values(service, "TimeoutStopSec")[0].rstrip("s"))
            with trio.fail_after(stop_timeout):
                assert await proc.wait() == 0  # success: Restart=on-failure does not restart it
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    notify.close()


async def _notification(sock: socket.socket, wanted: str, timeout: float = 20.0) -> str:
    """The next datagram with the line `wanted` (others, e.g. watchdog pings, are skipped)."""
    with trio.fail_after(timeout):
        while True:
            try:
                message = sock.recv(4096).decode()
            except BlockingIOError:
                await trio.sleep(0.02)
                continue
            if wanted in message.splitlines():
                return message


def test_qsd_units_start_sequence_returns_with_the_sockets_listening(scratch):
    service = unit_entries(QSD_UNIT)["Service"]
    assert values(service, "Type") == ["exec"]
    assert values(service, "RuntimeDirectoryPreserve") == ["yes"]  # shared with xenblk-vhost: kept at stop
    args = scratch / "etc" / "qsd" / "db1.args"
    args.write_text(localize((DEPLOY / "storage-node" / "db1.args").read_text(), scratch))
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", str(scratch / "images" / "db1.qcow2"), "16M"], check=True
    )
    (scratch / "run" / "qsd-db1.pid").write_text("99999\n")  # stale, from a crash: ExecStartPre removes it
    for pre in values(service, "ExecStartPre"):
        subprocess.run(systemd_command(pre, scratch, "db1"), check=True)
    (start,) = values(service, "ExecStart")
    qsd = subprocess.Popen(systemd_command(start, scratch, "db1"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for post in values(service, "ExecStartPost"):
            subprocess.run(systemd_command(post, scratch, "db1"), check=True, timeout=30)
        assert (scratch / "run" / "qsd-db1.pid").read_text().strip() == str(qsd.pid)
        # Started = serving: the export a YAML file names takes I/O now.
        yaml_disk = load_config(_localized_example(scratch, "vhost-user-qsd.yaml")).disks[0]
        with StorageDevice.open("virtio-blk-vhost-user", {"path": yaml_disk.path}, 1) as dev:
            _write_read(dev, 100, seed=6)
        assert _qmp(scratch / "run" / "qsd-db1.qmp", "query-block-exports")[0]["id"] == "db1-xvda"
    finally:
        qsd.terminate()
        out = qsd.communicate(timeout=10)[0].decode()
    assert qsd.returncode == 0, out


def _localized_example(top: Path, name: str) -> Path:
    path = top / "etc" / name
    path.write_text(localize((ROOT / "config" / name).read_text(), top))
    return path


def _write_read(dev: StorageDevice, block: int, seed: int) -> None:
    region = dev.alloc_mem_region(8 * BS)
    q = dev.queues[0]
    region.view[:] = pattern_range(block, 8, seed=seed)
    q.write(block * BS, region.addr, 8 * BS, 1)
    q.flush(2)
    assert sorted(q.do_io(2, timeout=20)) == [(1, 0), (2, 0)]
    region.view[:] = bytes(8 * BS)
    q.read(block * BS, region.addr, 8 * BS, 3)
    assert q.do_io(1, timeout=20) == [(3, 0)]
    assert bytes(region.view) == pattern_range(block, 8, seed=seed)


def _qmp(path: Path, command: str):
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(path))
        f = s.makefile("rwb")
        f.readline()  # greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            reply = json.loads(f.readline())
        return reply["return"]


# ------------------------------------------------------------------ Containerfile

def containerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """{stage name: [(INSTRUCTION, arguments), ...]}, continuation lines joined."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        if word == "FROM":
            m = re.match(r"(\S+) AS (\S+)$", rest)
            assert m, line
            current = stages.setdefault(m.group(2), [("FROM", m.group(1))])
        elif current is not None:
            current.append((word, rest.strip()))
    return stages


def install_deps_packages() -> set[str]:
    text = INSTALL_DEPS.read_text()
    pkgs = set()
    for body in re.findall(r"PKGS\+?=\(([^)]*)\)", text):
        pkgs.update(body.split())
    return pkgs


def run_steps(stage: str) -> list[str]:
    """The shell commands of a stage's RUN instructions, split at &&."""
    return [cmd.strip() for kind, arg in containerfile_stages()[stage] if kind == "RUN" for cmd in arg.split("&&")]


def test_containerfile_pins_libblkio_exactly_as_install_deps_does(tmp_path):
    script = INSTALL_DEPS.read_text()
    default_mirror = re.search(r"mirror=\$\{mirror:-(\S+)\}", script).group(1)
    want = {name: re.search(rf'{name}="(.*?)"\n', script, re.S).group(1).replace("${mirror%/}", default_mirror)
            for name in ("want_src", "want_pref")}
    paths = {"want_src": re.search(r"src=(\S+)", script).group(1),
             "want_pref": re.search(r"pref=(\S+)", script).group(1)}
    (pin_step,) = [arg for kind, arg in containerfile_stages()["base"] if kind == "RUN"]
    # Run the Containerfile's step with /etc/apt moved here.
    (tmp_path / "etc/apt/sources.list.d").mkdir(parents=True)
    (tmp_path / "etc/apt/preferences.d").mkdir(parents=True)
    subprocess.run(["/bin/sh", "-c", pin_step.replace("/etc/apt/", f"{tmp_path}/etc/apt/")], check=True)
    for name, path in paths.items():
        # install-deps.sh writes them with printf '%s\n' "$want_...".
        assert (tmp_path / path.lstrip("/")).read_text() == want[name] + "\n", name


def test_containerfile_apt_steps_are_install_deps_commands_with_its_packages():
    known = install_deps_packages()
    script = INSTALL_DEPS.read_text()
    assert "apt-get update -q\n" in script and 'apt-get install -y -q --no-install-recommends "${missing[@]}"' in script
    for stage in ("xenblk-vhost", "qemu-storage-daemon"):
        steps = run_steps(stage)
        updates = [s for s in steps if s.startswith("apt-get update")]
        installs = [s for s in steps if s.startswith("apt-get install")]
        assert updates == ["apt-get update -q"], stage
        (install,) = installs
        prefix = "apt-get install -y -q --no-install-recommends "
        assert install.startswith(prefix), install
        packages = [p for p in install[len(prefix):].split() if not p.startswith("${")]
        assert packages and set(packages) <= known, set(packages) - known
    assert "libblkio1" in " ".join(run_steps("xenblk-vhost"))
    # The same post-install check as install-deps.sh.
    assert "ldconfig -p | grep 'libblkio.so.1' >/dev/null" in run_steps("xenblk-vhost")
    assert "ldconfig -p | grep 'libblkio.so.1' >/dev/null" in script
    # Debian 12 everywhere.
    assert re.search(r"^ARG DEBIAN=debian:12-slim$", CONTAINERFILE.read_text(), re.M)


def test_containerfile_copies_only_what_exists_and_the_ignore_file_lets_through():
    ignore = (DEPLOY / "container" / "Containerfile.dockerignore").read_text().split()
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    for kind, arg in containerfile_stages()["xenblk-vhost"]:
        if kind == "COPY":
            *sources, _dest = arg.split()
            for src in sources:
                assert (ROOT / src).exists() and src in allowed, src


def test_qsd_image_entrypoint_runs_an_options_file_as_written(scratch):
    (entrypoint,) = [json.loads(arg) for kind, arg in containerfile_stages()["qemu-storage-daemon"]
                     if kind == "ENTRYPOINT"]
    args = scratch / "etc" / "qsd" / "app1.args"
    args.write_text(localize((DEPLOY / "storage-node" / "app1.args").read_text(), scratch))
    image = scratch / "images" / "app1-data.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    qsd = subprocess.Popen([*entrypoint, str(args)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        disk = load_config(_localized_example(scratch, "two-disks.yaml"), check_storage=False).disk(51728)
        _wait_listening(disk.path, qsd)
        with StorageDevice.open("virtio-blk-vhost-user", {"path": disk.path}, disk.queues) as dev:
            _write_read(dev, 40, seed=8)
        assert read_file(image, 40 * BS, 8 * BS) == pattern_range(40, 8, seed=8)
    finally:
        qsd.terminate()
        qsd.wait(10)


def test_nbd_options_file_reaches_an_nbd_server(scratch):
    text = localize((DEPLOY / "storage-node" / "batch1.args").read_text(), scratch)
    image = scratch / "images" / "batch1.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The file names a documentation address: only loopback is ever contacted here.
    text = text.replace("server.host=192.0.2.10,server.port=10809", f"server.host=127.0.0.1,server.port={port}")
    assert "192.0.2." not in re.sub(r"#.*", "", text)
    args = scratch / "etc" / "qsd" / "batch1.args"
    args.write_text(text)
    nbd = subprocess.Popen(["qemu-nbd", "--format=raw", "--persistent", "--bind", "127.0.0.1", "--port", str(port),
                            "--export-name", "batch1", str(image)], stderr=subprocess.DEVNULL)
    qsd = None
    try:
        _wait_tcp(port, nbd)
        qsd = subprocess.Popen(["/bin/sh", "-c", 'exec qemu-storage-daemon $(sed -e "s/#.*//" "$1")', "sh", str(args)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        disk = load_config(_localized_example(scratch, "nbd-vhost-user.yaml"), check_storage=False).disks[0]
        _wait_listening(disk.path, qsd)
        with StorageDevice.open("virtio-blk-vhost-user", {"path": disk.path}, disk.queues) as dev:
            _write_read(dev, 1000, seed=9)
        assert read_file(image, 1000 * BS, 8 * BS) == pattern_range(1000, 8, seed=9)
    finally:
        for proc in (qsd, nbd):
            if proc is not None:
                proc.terminate()
                proc.wait(10)


def _wait_listening(path: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{path} never listened: {proc.communicate()[0].decode()}") from None
            time.sleep(0.01)


def _wait_tcp(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, "qemu-nbd did not listen"
            time.sleep(0.01)


# ------------------------------------------------------------------ compose

def test_compose_file_agrees_with_the_images_the_examples_and_the_hotplug_shim():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"qsd", "xenblk-vhost"}
    stages = containerfile_stages()
    for svc in services.values():
        build = svc["build"]
        assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == CONTAINERFILE
        assert build["target"] in stages
    backend, qsd = services["xenblk-vhost"], services["qsd"]
    assert backend["devices"] == ["/dev/xen/gntdev", "/dev/xen/evtchn", "/dev/xen/xenbus"]
    mounts = {m.split(":")[1]: m.split(":") for m in backend["volumes"]}
    assert mounts["/run/xenstored"][0] == "/run/xenstored"
    # Same path inside and outside: YAML files, hotplug script and host agree.
    for svc in (backend, qsd):
        for m in svc["volumes"]:
            host, inside = m.split(":")[:2]
            assert host == inside, m
    shared = "/run/xenblk-vhost/vhost-user"
    assert shared in mounts and shared in {m.split(":")[1] for m in qsd["volumes"]}
    # The backend's command is a valid `xenblk-vhost run` on a mounted YAML file...
    args = build_parser().parse_args(backend["command"])
    assert args.command == "run"
    (yaml_path,) = args.config
    assert any(yaml_path.startswith(inside + "/") for inside in mounts)
    # ...whose example's socket is the one qsd's health check waits for, exported by qsd's options file.
    example = load_config(ROOT / "config" / "vhost-user-qsd.yaml", check_storage=False)
    assert yaml_path == f"/etc/xenblk-vhost/{example.name}.yaml"
    socket_path = example.disks[0].path
    assert qsd["healthcheck"]["test"] == ["CMD", "test", "-S", socket_path]
    (qsd_args,) = qsd["command"]
    assert socket_path in (DEPLOY / "storage-node" / Path(qsd_args).name).read_text()
    assert backend["depends_on"] == {"qsd": {"condition": "service_healthy"}}
    # The hotplug shim for this deployment execs into the container by this name.
    shim = shim_text(container=backend["container_name"])
    assert f" {backend['container_name']} xenblk-vhost hotplug \"$@\"" in shim
    assert all(f"-e {v}" in shim for v in _HOTPLUG_ENV)
    # Stopping gives the drain at least what the systemd unit gives it.
    assert backend["stop_grace_period"] == values(unit_entries(UNIT)["Service"], "TimeoutStopSec")[0]
