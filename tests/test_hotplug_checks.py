"""The hotplug script's decisions (pure) and its installation."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from xenblk_vhost.config import load_config
from xenblk_vhost.hotplug.checks import (
    Attachment,
    BackendView,
    HotplugError,
    check_backend,
    check_blkback,
    check_features,
    check_sharing,
    mode_warnings,
    physical_device_path,
    served_disk,
    sharing_conflict,
)
from xenblk_vhost.hotplug.install import InstallError, install, script_reference, shim_text
from xenblk_vhost.hotplug.target import BackendDevice, config_path, parse_xenbus_path


def config(tmp_path, text, name="web1.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return load_config(path, check_storage=False)


def error_of(fn, *args) -> HotplugError:
    with pytest.raises(HotplugError) as info:
        fn(*args)
    return info.value


# ---------------------------------------------------------------- XENBUS_PATH and params

def test_xenbus_path_relative_as_libxl_sets_it_or_absolute():
    d = parse_xenbus_path("backend/vbd/5/51712")
    assert (d.kind, d.frontend_domid, d.devid, d.vdev, d.path) == ("vbd", 5, 51712, "xvda", "backend/vbd/5/51712")
    d = parse_xenbus_path("/local/domain/3/backend/vbd3/7/51728/")
    assert (d.kind, d.frontend_domid, d.devid, d.path) == ("vbd3", 7, 51728, "/local/domain/3/backend/vbd3/7/51728")
    assert "XENBUS_PATH is not set" in error_of(parse_xenbus_path, None).message
    assert "kind 'qdisk' is not served" in error_of(parse_xenbus_path, "backend/qdisk/5/51712").message
    assert "not a backend/<kind>/<domid>/<devid> path" in error_of(parse_xenbus_path, "device/vbd/51712").message
    assert "not a backend/" in error_of(parse_xenbus_path, "backend/vbd/5/xvda").message


def test_params_verbatim_for_phy_format_prefix_removed_for_tap():
    phy = BackendDevice("backend/vbd/5/51712", "vbd", 5, 51712)
    tap = BackendDevice("backend/vbd3/5/51712", "vbd3", 5, 51712)
    assert config_path(phy, "/etc/xenblk-vhost/web1.yaml") == "/etc/xenblk-vhost/web1.yaml"
    assert config_path(tap, "aio:/etc/xenblk-vhost/web1.yaml") == "/etc/xenblk-vhost/web1.yaml"
    assert config_path(tap, "vhd:/etc/x.yaml") == "/etc/x.yaml"
    # phy keeps a colon: the target is the operator's, verbatim.
    assert "not an absolute path" in error_of(config_path, phy, "aio:/etc/x.yaml").message
    assert "not an absolute path" in error_of(config_path, phy, "web1.yaml").message
    assert "params is empty" in error_of(config_path, tap, "aio:").message


# ---------------------------------------------------------------- the checks

def test_served_disk_by_name_by_domid_and_the_mismatches(tmp_path):
    cfg = config(tmp_path, """
        domain: {name: web1}
        disks: [{vdev: xvda, driver: io_uring, path: /srv/a.img}, {vdev: xvdc, driver: io_uring, path: /srv/c.img}]
        """)
    assert served_disk(cfg, 9, "web1", 51712).path == "/srv/a.img"
    assert served_disk(cfg, 9, "web1", 51744).name == "xvdc"
    e = error_of(served_disk, cfg, 9, "db", 51712)
    assert e.message.endswith("configures domain 'web1', but this disk belongs to domain 9 ('db'): "
                              "the xl disk line names another domain's file")
    e = error_of(served_disk, cfg, 9, None, 51712)
    assert "belongs to domain 9 (its name unreadable)" in e.message
    e = error_of(served_disk, cfg, 9, "web1", 51728)
    assert e.message.endswith("has no disk xvdb (device 51728) for domain 'web1'; it configures xvda, xvdc")
    by_id = config(tmp_path, "domain: {domid: 4}\ndisks: [{vdev: 51712, driver: io_uring, path: /a}]\n", "d.yaml")
    assert served_disk(by_id, 4, "anything", 51712).path == "/a"
    assert "configures domid 4" in error_of(served_disk, by_id, 5, "x", 51712).message


def test_blkback_only_matters_for_vbd():
    check_blkback("vbd", False)
    check_blkback("vbd3", True)
    assert "modprobe -r xen-blkback" in error_of(check_blkback, "vbd", True).message


@pytest.mark.parametrize("state", [2, 3, 4])
def test_backend_states_that_are_serving(state):
    check_backend(BackendView(state, None, "w", {}), "/etc/x.yaml")


def test_backend_states_that_fail_the_attach():
    e = error_of(
        check_backend, BackendView(5, "19 no disk configured for this domain as xvdb (device 51728)", "w", {}), "/x"
    )
    assert (
        e.message
        == "the backend reported: 19 no disk configured for this domain as xvdb (device 51728) (state Closing)"
    )
    assert error_of(check_backend, BackendView(6, None, "w", {}), "/x").message == \
        "the backend is closing the device (state Closed)"
    e = error_of(check_backend, BackendView(1, None, "w", {}), "/etc/x.yaml")
    assert (
        "no backend has taken the device (state Initialising)" in e.message
        and "xenblk-vhost run /etc/x.yaml" in e.message
    )
    assert "(state absent)" in error_of(check_backend, BackendView(None, None, "w", {}), "/x").message


def test_features_must_fit_the_files_disk(tmp_path):
    (disk,) = config(tmp_path, """
        domain: {name: web1}
        disks: [{vdev: xvda, driver: io_uring, path: /a, queues: 4, ring_page_order: 3, max_indirect_segments: 64}]
        """).disks
    # The storage may lower queues and indirect segments; the ring order is the file's.
    check_features(disk, {"max-ring-page-order": "3", "multi-queue-max-queues": "2",
                          "feature-max-indirect-segments": "0"}, "/a.yaml")
    e = error_of(check_features, disk, {"max-ring-page-order": "4", "multi-queue-max-queues": "8",
                                        "feature-max-indirect-segments": "x"}, "/a.yaml")
    assert ("(max-ring-page-order is 4 where the file says 3; multi-queue-max-queues is 8 where the file says 4; "
            "feature-max-indirect-segments is 'x')") in e.message
    e = error_of(check_features, disk, {}, "/a.yaml")
    assert "max-ring-page-order is missing; multi-queue-max-queues is missing" in e.message


def _att(domid, storage="/srv/a.img", writable=True, vdev=51712):
    return Attachment(domid, f"d{domid}", vdev, storage, writable)


@pytest.mark.parametrize("mine_rw, other_rw, refused", [
    (True, True, True), (True, False, True), (False, True, True), (False, False, False)])
def test_sharing_between_domains(mine_rw, other_rw, refused):
    mine, other = _att(1, writable=mine_rw), _att(2, writable=other_rw)
    assert (sharing_conflict(mine, [other]) is other) == refused


def test_sharing_within_a_domain_and_other_storage_is_allowed():
    mine = _att(1)
    assert sharing_conflict(mine, [_att(1, vdev=51728), _att(2, storage="/srv/b.img")]) is None
    e = error_of(check_sharing, mine, [_att(2, storage="/srv/b.img"), _att(3, writable=False)])
    assert e.status == "busy"
    assert e.message.startswith(
        "/srv/a.img is already attached to domain d3 as xvda (read-only); xvda would have it read-write"
    )


def test_physical_device_path_only_where_qemu_could_open_it(tmp_path):
    cfg = config(tmp_path, """
        domain: {name: web1}
        disks:
          - {vdev: xvda, driver: io_uring, path: /srv/a.img, readonly: true}
          - {vdev: xvdb, driver: virtio-blk-vhost-user, path: /run/vu/b.sock}
        """)
    file_disk, socket_disk = cfg.disks
    assert physical_device_path("vbd", file_disk) == "/srv/a.img"
    assert physical_device_path("vbd3", file_disk) is None
    assert physical_device_path("vbd", socket_disk) is None
    assert mode_warnings(file_disk, "w") == [
        "the xl line asks for read-write but the file says readonly: xvda is served read-only"]
    assert mode_warnings(file_disk, "r") == [] and mode_warnings(socket_disk, "w") == []


# ---------------------------------------------------------------- installation

def test_install_writes_an_executable_shim_and_keeps_foreign_files(tmp_path):
    path = install(shim_text(python="/opt/xv/bin/python3"), str(tmp_path))
    assert path == tmp_path / "block-xenblk-vhost"
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert path.read_text().splitlines()[-1] == 'exec /opt/xv/bin/python3 -I -m xenblk_vhost.hotplug "$@"'
    # Ours: replaced in place (reinstall after moving the venv).
    install(shim_text(python="/usr/local/venv/bin/python3"), str(tmp_path))
    assert "/usr/local/venv/bin/python3 -I -m xenblk_vhost.hotplug" in path.read_text()
    foreign = tmp_path / "block-custom"
    foreign.write_text("#!/bin/sh\nexit 0\n")
    with pytest.raises(InstallError, match="was not written by xenblk-vhost"):
        install(shim_text(), str(tmp_path), "block-custom")
    assert foreign.read_text() == "#!/bin/sh\nexit 0\n"
    install(shim_text(), str(tmp_path), "block-custom", force=True)
    assert "xenblk_vhost.hotplug" in foreign.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["block-custom", "block-xenblk-vhost"]  # no temp files left
    with pytest.raises(InstallError, match="is not a directory"):
        install(shim_text(), str(tmp_path / "missing"))
    with pytest.raises(InstallError, match="not absolute"):
        shim_text(python="python3")
    assert script_reference(path) == str(path)
    from pathlib import Path
    assert script_reference(Path("/etc/xen/scripts/block-xenblk-vhost")) == "block-xenblk-vhost"


def test_shim_runs_the_hotplug_command_with_this_python(tmp_path):
    path = install(shim_text(), str(tmp_path))
    done = subprocess.run([str(path), "add"], env={"PATH": os.environ["PATH"]}, capture_output=True, text=True)
    # Reached our command (its own usage error), through the shell and this interpreter.
    assert done.returncode == 2 and "xenblk-vhost-hotplug: add: error: XENBUS_PATH is not set" in done.stderr


def test_container_shim_passes_libxls_environment_to_the_engine(tmp_path):
    """The engine is stood in for by a recorder: what argv and environment it gets."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "record.json"
    fake = bindir / "podman"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"names = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == '-e']\n"
                    f"json.dump({{'argv': sys.argv[1:], 'env': {{n: os.environ.get(n) for n in names}}}}, "
                    f"open({str(record)!r}, 'w'))\n")
    fake.chmod(0o755)
    out = subprocess.run([sys.executable, "-m", "xenblk_vhost", "install-hotplug", "--container", "xv",
                          "--engine", "podman", "--print"], capture_output=True, text=True, check=True)
    shim = tmp_path / "block-xenblk-vhost"
    shim.write_text(out.stdout)
    shim.chmod(0o755)
    env = {"PATH": f"{bindir}:{os.environ['PATH']}", "XENBUS_PATH": "backend/vbd/5/51712", "XENBUS_TYPE": "vbd",
           "XENBUS_BASE_PATH": "backend", "script": str(shim)}
    subprocess.run([str(shim), "remove"], env=env, check=True)
    got = json.loads(record.read_text())
    assert got["argv"] == ["exec", "-e", "XENBUS_PATH", "-e", "XENBUS_TYPE", "-e", "XENBUS_BASE_PATH", "-e", "script",
                           "xv", "xenblk-vhost", "hotplug", "remove"]
    assert got["env"] == {k: env[k] for k in ("XENBUS_PATH", "XENBUS_TYPE", "XENBUS_BASE_PATH", "script")}


def test_served_by_must_be_the_files_storage(tmp_path):
    from xenblk_vhost.hotplug.checks import check_served_by

    (disk,) = config(tmp_path, "domain: {name: a}\ndisks: [{vdev: xvda, driver: io_uring, path: /srv/a.img}]\n").disks
    check_served_by("/run/xenblk-vhost/control-a.sock", "io_uring", "/srv/a.img", disk, "/etc/a.yaml")
    e = error_of(check_served_by, "/run/c.sock", "virtio-blk-vhost-user", "/run/vu/a.sock", disk, "/etc/a.yaml")
    assert e.message.startswith("the daemon answering on /run/c.sock serves this device from virtio-blk-vhost-user "
                                "/run/vu/a.sock, but /etc/a.yaml says io_uring /srv/a.img")


def test_only_control_sockets_are_asked(tmp_path):
    import socket as socketlib

    from xenblk_vhost.control_protocol import control_sockets

    made = []
    for name in ("control.sock", "control-web1.sock", "qsd-db1.qmp", "db1-xvda.sock"):
        s = socketlib.socket(socketlib.AF_UNIX)
        s.bind(str(tmp_path / name))
        made.append(s)
    (tmp_path / "control-file.sock").write_text("not a socket")
    try:
        assert control_sockets(tmp_path) == [str(tmp_path / "control-web1.sock"), str(tmp_path / "control.sock")]
        assert control_sockets(tmp_path / "missing") == []
    finally:
        for s in made:
            s.close()


def test_shim_passes_the_control_dir():
    assert shim_text(python="/p/python3", control_dir="/srv/x y").splitlines()[-1] == \
        "exec /p/python3 -I -m xenblk_vhost.hotplug --control-dir '/srv/x y' \"$@\""


def test_the_shim_does_not_import_from_its_working_directory(tmp_path):
    """libxl runs the shim as root from wherever it was started: with `python -m` the current
    directory comes first on sys.path, so a xenblk_vhost package planted in a world-writable cwd
    would run as root (issue 10 D5). The shim runs Python isolated (-I): the planted module is never
    imported and the real script runs (its usage error)."""
    (tmp_path / "scripts").mkdir()
    shim = install(shim_text(python=sys.executable), str(tmp_path / "scripts"))
    cwd = tmp_path / "world-writable"
    planted = cwd / "xenblk_vhost" / "hotplug"
    planted.mkdir(parents=True)
    marker = tmp_path / "planted-ran"
    (cwd / "xenblk_vhost" / "__init__.py").write_text("")
    (planted / "__init__.py").write_text("")
    (planted / "__main__.py").write_text(f"open({str(marker)!r}, 'w').write('root')\n")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(cwd)}
    proc = subprocess.run([str(shim)], cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert not marker.exists(), "the shim imported xenblk_vhost from its working directory"
    assert proc.returncode != 0 and "usage" in proc.stderr.lower()
