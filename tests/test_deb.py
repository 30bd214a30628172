"""scripts/build-deb.sh: the .deb is built, installed by dpkg into a scratch root, and what it
installed runs at the paths it installed it to.

The package is built once for the module (~15 s with pip's cache warm, a minute cold).
dpkg installs it with `--root` and `--force-script-chrootless` (its maintainer scripts run
with DPKG_ROOT set, as they must support), `--force-depends` (the scratch root has no
libblkio1 or python3 of its own). Then, in a mount namespace of their own, the scratch
root's /usr and /etc are laid over the machine's (read-only overlays: the machine's
python3 and libblkio1 are the dependencies), so /usr/bin/xenblk-vhost, the venv under
/usr/lib/xenblk-vhost and /etc/xen/scripts/block-xenblk-vhost are where an installed
package has them: `--version`, `check` on an example, the compiled kernels loaded from the
package's own build (no fallback to the Python engine), the hotplug shim's usage and refusal,
the packaged unit under `systemd-analyze verify`, the man pages under `man`, and the whole
stack (`demo`) from the packaged venv. Removal and purge leave nothing behind.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from xenblk_vhost import __version__

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "scripts" / "build-deb.sh"
PREFIX = "/usr/lib/xenblk-vhost"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="dpkg --root and mount namespaces need root")


@pytest.fixture(scope="module")
def deb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("deb")
    done = subprocess.run([str(BUILD), "--output", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    path = Path(done.stdout.strip().splitlines()[-1])
    assert path.parent == out and path.is_file()
    return path


def _dpkg(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["dpkg", f"--root={root}", "--force-script-chrootless", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def installed(deb, tmp_path_factory) -> Path:
    """A scratch root with the package installed by dpkg."""
    root = tmp_path_factory.mktemp("root")
    admin = root / "var" / "lib" / "dpkg"
    for sub in ("info", "updates", "triggers"):
        (admin / sub).mkdir(parents=True)
    (admin / "status").write_text("")
    done = _dpkg(root, "--force-depends", "-i", str(deb))
    assert done.returncode == 0, done.stdout + done.stderr
    return root


def _in_root(root: Path, script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a shell script with the scratch root's /usr and /etc (and units) over the machine's."""
    lay = textwrap.dedent(f"""\
        set -e
        mount -t overlay overlay -o lowerdir={root}/usr:/usr /usr
        mount -t overlay overlay -o lowerdir={root}/etc:/etc /etc
        mount -t overlay overlay -o lowerdir={root}/lib/systemd:/usr/lib/systemd /usr/lib/systemd
        """)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"  # the package's command, not a venv's or pyenv's
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", lay + script],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          cwd="/")  # not the checkout: `python3 -c` would import its xenblk_vhost


def test_build_script_refuses_unknown_arguments():
    done = subprocess.run([str(BUILD), "--bogus"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr


def test_control_fields(deb):
    def field(name: str) -> str:
        return subprocess.run(["dpkg-deb", "--field", str(deb), name], capture_output=True, text=True,
                              check=True).stdout.strip()

    assert field("Package") == "xenblk-vhost"
    assert field("Version") == f"{__version__}-1"
    assert field("Architecture") == subprocess.run(["dpkg", "--print-architecture"], capture_output=True,
                                                   text=True, check=True).stdout.strip()
    depends = [d.strip() for d in field("Depends").split(",")]
    # The venv's site-packages is python3.N's: exactly Debian's python3 of the build.
    major, minor = (int(x) for x in subprocess.run(
        ["/usr/bin/python3", "-c", "import sys; print(*sys.version_info[:2])"],
        capture_output=True, text=True, check=True).stdout.split())
    assert f"python3 (>= {major}.{minor})" in depends and f"python3 (<< {major}.{minor + 1})" in depends
    assert "libblkio1" in depends and "libsystemd0" in depends
    assert "libatomic1" in depends  # the simulator behind `demo` (sim/_atomic.py)
    assert int(field("Installed-Size")) > 1000


def test_conffiles_and_maintainer_scripts(deb, tmp_path):
    subprocess.run(["dpkg-deb", "--control", str(deb), str(tmp_path)], check=True)
    assert (tmp_path / "conffiles").read_text().split() == [
        "/etc/xen/scripts/block-xenblk-vhost", "/etc/modprobe.d/xenblk-vhost.conf"]
    scripts = {name: (tmp_path / name).read_text() for name in ("postinst", "prerm", "postrm")}
    for name, text in scripts.items():
        assert os.access(tmp_path / name, os.X_OK), name
        sh = subprocess.run(["sh", "-n", str(tmp_path / name)], capture_output=True, text=True)
        assert sh.returncode == 0, (name, sh.stderr)
        # Nothing started, enabled or restarted behind the operator's back.
        for verb in ("start", "enable", "restart", "try-restart", "reload-or-restart"):
            assert not re.search(rf"systemctl\s+(\S+\s+)*{verb}\b", text.split("echo")[0]), (name, verb)
        assert "deb-systemd-invoke" not in text and "daemon-reload" in text or name == "prerm"


def test_contents_are_a_production_install(deb):
    listing = subprocess.run(["dpkg-deb", "--contents", str(deb)], capture_output=True, text=True,
                             check=True).stdout
    paths = {line.split()[5].removeprefix(".") for line in listing.splitlines()}
    for path in ("/usr/bin/xenblk-vhost", f"{PREFIX}/bin/python3", "/etc/xen/scripts/block-xenblk-vhost",
                 "/lib/systemd/system/xenblk-vhost@.service", "/lib/systemd/system/qemu-storage-daemon@.service",
                 "/etc/modprobe.d/xenblk-vhost.conf", "/usr/share/man/man8/xenblk-vhost.8.gz",
                 "/usr/share/man/man5/xenblk-vhost.yaml.5.gz", "/usr/share/doc/xenblk-vhost/copyright",
                 "/usr/share/doc/xenblk-vhost/examples/file-disk.yaml", "/etc/xenblk-vhost/qsd/"):
        assert path in paths, path
    site = re.compile(rf"^{PREFIX}/lib/python3\.\d+/site-packages/([^/]+)")
    packages = {m.group(1) for p in paths if (m := site.match(p))}
    assert "xenblk_vhost" in packages and "trio" in packages and "systemd" in packages
    # No test extras, no pip, no editable link to a checkout, no build directory in any file.
    for absent in ("pytest", "hypothesis", "mypy", "ruff", "pip", "_pytest"):
        assert absent not in packages, absent
    assert not any(p.endswith((".pth", "__editable__")) or "__editable__" in p for p in paths)
    assert not any("/tests/" in p for p in paths if "xenblk_vhost" in p)
    # The compiled kernels, built, and the sources native.load() checks them against.
    native = f"{PREFIX}/lib/python3.N/site-packages/xenblk_vhost/native/"
    shipped = {re.sub(r"/python3\.\d+/", "/python3.N/", p).removeprefix(native) for p in paths}
    for name in ("native.h", "intake_kernel.c", "lane_kernel.c", "copy_seg.h", "blkio_calls.h", "lane_slot.h",
                 "_build/_xenblk_native.sha256", "_build/_xenblk_blkio.sha256"):
        assert name in shipped, name
    for module in ("_xenblk_native", "_xenblk_blkio"):
        assert any(re.fullmatch(rf"_build/{module}\.cpython-3\d+-.*\.so", p) for p in shipped), module
    # Byte-compiled here: nothing is written under /usr at run time.
    assert any(re.search(r"/xenblk_vhost/__pycache__/cli\.cpython-3\d+\.pyc$", p) for p in paths)


def test_dpkg_installs_it_and_files_are_in_place(installed):
    status = _dpkg(installed, "--status", "xenblk-vhost")
    assert "Status: install ok installed" in status.stdout
    unit = (installed / "lib/systemd/system/xenblk-vhost@.service").read_text()
    assert "ExecStart=/usr/bin/xenblk-vhost run " in unit
    assert "ExecReload=/usr/bin/xenblk-vhost ctl " in unit
    assert "/usr/local/bin" not in unit
    modprobe = (installed / "etc/modprobe.d/xenblk-vhost.conf").read_text()
    # Shipped inactive: the phy route's blacklist would take blkback from every guest of the host.
    assert "# blacklist xen-blkback" in modprobe
    assert not re.search(r"^\s*blacklist", modprobe, re.MULTILINE)
    shim = (installed / "etc/xen/scripts/block-xenblk-vhost").read_text()
    assert re.search(rf"^exec {PREFIX}/bin/python3 (-\S+ )*-m xenblk_vhost\.hotplug \"\$@\"$", shim, re.MULTILINE), shim
    cfg = (installed / PREFIX.lstrip("/") / "pyvenv.cfg").read_text()
    assert "/tmp" not in cfg and "home = /usr/bin" in cfg


def test_installed_command_runs(installed, tmp_path):
    image = tmp_path / "web1.img"
    image.write_bytes(b"\0" * 4096)
    yaml = tmp_path / "web1.yaml"
    yaml.write_text(f"domain: {{name: web1}}\ndisks:\n  - {{vdev: xvda, driver: io_uring, path: {image}}}\n")
    done = _in_root(installed, f"""
        readlink -f /usr/bin/xenblk-vhost
        head -1 {PREFIX}/bin/xenblk-vhost
        xenblk-vhost --version
        xenblk-vhost check {yaml}
        xenblk-vhost check --no-storage /usr/share/doc/xenblk-vhost/examples/*.yaml
        {PREFIX}/bin/python3 -c 'import xenblk_vhost, sys; print(xenblk_vhost.__file__); print(sys.prefix)'
        """)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{PREFIX}/bin/xenblk-vhost"
    assert lines[1] == f"#!{PREFIX}/bin/python"
    assert lines[2] == f"xenblk-vhost {__version__}"
    assert lines[3] == f"{yaml}: ok: domain 'web1': xvda (io_uring {image})"
    examples = [line for line in lines if line.startswith("/usr/share/doc/xenblk-vhost/examples/")]
    assert len(examples) == 4 and all(": ok: " in line for line in examples)
    assert lines[-2].startswith(f"{PREFIX}/lib/python3") and lines[-1] == PREFIX
    assert done.stderr == ""


# Run by the packaged venv's python: which engine the datapath gets, and where its modules came from.
_ENGINE_PROBE = """\
import logging
from xenblk_vhost import native
from xenblk_vhost.blkif.abi import Abi
from xenblk_vhost.blkif.validate import RequestLimits
from xenblk_vhost.native import build
from xenblk_vhost.native.intake import make_intake
logging.basicConfig(level=logging.WARNING)  # the fallback's warning, if any, on stderr
print(type(make_intake(Abi.NATIVE, RequestLimits(sectors=8))).__name__)
native.load_blkio()
print(build.find_built(build.NATIVE))
print(build.find_built(build.BLKIO))
"""


def test_installed_package_serves_with_its_compiled_kernels(installed, tmp_path):
    """The venv's own built kernels load, from the package's files: the daemon under its unit could
    build them nowhere (ProtectSystem=strict: /usr is read-only, as under these overlays;
    ProtectHome=yes: no cache), and would serve every disk on the Python engine, a warning its
    only sign. An empty cache: a build there (from shipped sources) is not what the package ships."""
    cache = tmp_path / "cache"
    cache.mkdir()
    done = _in_root(installed, f"XDG_CACHE_HOME={cache} {PREFIX}/bin/python3 -c {shlex.quote(_ENGINE_PROBE)}")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""  # no "compiled intake unavailable"
    engine, kernels, blkio = done.stdout.splitlines()
    assert engine == "CompiledIntake"
    native_dir = re.compile(rf"^{PREFIX}/lib/python3\.\d+/site-packages/xenblk_vhost/native/_build/")
    assert native_dir.match(kernels) and native_dir.match(blkio), (kernels, blkio)
    assert list(cache.iterdir()) == []


def test_installed_hotplug_script_runs(installed):
    done = _in_root(installed, """
        /etc/xen/scripts/block-xenblk-vhost --help
        echo "--- add without XENBUS_PATH"
        env -u XENBUS_PATH /etc/xen/scripts/block-xenblk-vhost add || echo "exit $?"
        """)
    assert done.returncode == 0, done.stdout + done.stderr
    usage, _, refused = done.stdout.partition("--- add without XENBUS_PATH\n")
    assert "usage:" in usage and "{add,remove}" in usage
    assert refused.strip().splitlines()[-1] == "exit 2"
    assert "XENBUS_PATH" in done.stderr


def test_installed_unit_verifies_and_man_pages_open(installed, tmp_path):
    assert shutil.which("systemd-analyze") and shutil.which("man")
    done = _in_root(installed, f"""
        mkdir -p {tmp_path}/units
        cp /usr/lib/systemd/system/xenblk-vhost@.service {tmp_path}/units/xenblk-vhost@web1.service
        systemd-analyze verify {tmp_path}/units/xenblk-vhost@web1.service
        echo "--- man 8"
        MANWIDTH=120 man -P cat xenblk-vhost 2>&1 | head -3
        echo "--- man 5"
        MANWIDTH=120 man -P cat 5 xenblk-vhost.yaml 2>&1 | head -3
        """)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr == ""  # verify says nothing about a good unit
    _, _, pages = done.stdout.partition("--- man 8\n")
    page8, _, page5 = pages.partition("--- man 5\n")
    assert "XENBLK-VHOST(8)" in page8, page8
    assert "XENBLK-VHOST.YAML(5)" in page5, page5


@pytest.mark.slow
def test_installed_venv_runs_the_whole_stack(installed):
    """`demo`: simulated Xen, the backend on libblkio's io_uring, a guest verifying every byte, all
    from the packaged venv (trio, cffi, PyYAML, prometheus_client as pip installed them)."""
    done = _in_root(installed, "xenblk-vhost demo --seconds 1 --json", timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert (summary["ok"], summary["counters_agree"], summary["failure"]) == (True, True, None), summary
    assert summary["driver"] == "io_uring" and summary["iops"] > 0
    assert "unavailable" not in done.stderr  # the compiled kernels served it, not the Python fallback


def test_remove_then_purge_leaves_nothing(deb, tmp_path):
    root = tmp_path / "root"
    admin = root / "var" / "lib" / "dpkg"
    for sub in ("info", "updates", "triggers"):
        (admin / sub).mkdir(parents=True)
    (admin / "status").write_text("")
    assert _dpkg(root, "--force-depends", "-i", str(deb)).returncode == 0
    (root / "etc/xenblk-vhost/web1.yaml").write_text("domain: {name: web1}\n")  # the operator's file
    done = _dpkg(root, "--remove", "xenblk-vhost")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (root / "usr/lib/xenblk-vhost").exists() and not (root / "usr/bin/xenblk-vhost").exists()
    assert (root / "etc/xen/scripts/block-xenblk-vhost").exists()  # conffiles stay until purge
    done = _dpkg(root, "--purge", "xenblk-vhost")
    assert done.returncode == 0, done.stdout + done.stderr
    assert not (root / "etc/xen/scripts/block-xenblk-vhost").exists()
    assert not (root / "etc/modprobe.d/xenblk-vhost.conf").exists()
    assert (root / "etc/xenblk-vhost/web1.yaml").exists()  # never the operator's
    left = [p for p in root.rglob("*") if p.is_file() and "var/lib/dpkg" not in str(p)]
    assert left == [root / "etc/xenblk-vhost/web1.yaml"], left


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
