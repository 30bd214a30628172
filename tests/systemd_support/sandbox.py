"""A real systemd (252, Debian's) as PID 1 of its own namespaces, running only the units a test gives it.

    with systemd_sandbox(tmp_path, {"xenblk-vhost@.service": text, ...}) as sd:
        sd.systemctl("start", "xenblk-vhost@web1")          # a CompletedProcess
        sd.show("xenblk-vhost@web1", "ActiveState")         # "active"
        sd.journal("xenblk-vhost@web1")                     # [journal entries as dicts]
        sd.run(["xenblk-vhost", "ctl", "list"])             # any command inside the namespaces

What is its own: PID, mount, network, IPC, UTS and cgroup namespaces; /run, /dev (a tmpfs with the
usual pseudo devices), /etc/systemd and /lib/systemd/system (tmpfs: only our units and a minimal
journald, Storage=volatile). What it shares with the host: the rest of the file system (the test's
files, this checkout and its venv, the simulator's sockets). Its cgroups live in a tree of their own
(xbv-sandbox-<pid> under this process' cgroup in every hierarchy), removed on the way out with
everything systemd made there; the namespace's PID 1 is SIGKILLed, which ends every process in it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

SYSTEMD = "/lib/systemd/systemd"
CGROUP = Path("/sys/fs/cgroup")

JOURNALD_UNITS = {
    "systemd-journald.socket": """[Unit]
DefaultDependencies=no
Before=sockets.target
[Socket]
ListenDatagram=/run/systemd/journal/socket
ListenStream=/run/systemd/journal/stdout
PassCredentials=yes
SocketMode=0666
Service=systemd-journald.service
""",
    "systemd-journald.service": """[Unit]
DefaultDependencies=no
Requires=systemd-journald.socket
After=systemd-journald.socket
[Service]
ExecStart=/lib/systemd/systemd-journald
Sockets=systemd-journald.socket
Type=notify
RuntimeDirectory=systemd/journal
RuntimeDirectoryPreserve=yes
StandardOutput=null
""",
    "sandbox.target": """[Unit]
Description=the test's sandbox
Wants=systemd-journald.service
""",
}
# What services' default dependencies name (Requires=sysinit.target, Conflicts=shutdown.target...):
# present and empty, so that a unit started by hand finds them.
for _stub in ("sysinit.target", "basic.target", "sockets.target", "shutdown.target", "multi-user.target",
              "network.target", "network-online.target", "local-fs.target"):
    JOURNALD_UNITS[_stub] = f"[Unit]\nDescription={_stub} (empty, in the test's sandbox)\n"

_INNER = """set -e
# The cgroup hierarchies mounted afresh inside the cgroup namespace, so that their root is the
# sandbox's own cgroup: the host's mounts show the host's root, where systemd would make its tree.
mount -t tmpfs cgroup /sys/fs/cgroup
while read -r _ point type opts _; do
  case "$type" in
    cgroup) sub=${point#/sys/fs/cgroup/}; mkdir -p "/sys/fs/cgroup/$sub"
            o=$(echo "$opts" | tr , '\\n' | grep -vE '^(rw|ro|relatime|nosuid|nodev|noexec)$' | paste -sd, -)
            mount -t cgroup -o "$o" cgroup "/sys/fs/cgroup/$sub";;
    cgroup2) sub=${point#/sys/fs/cgroup}; sub=${sub#/}; mkdir -p "/sys/fs/cgroup/$sub"
             mount -t cgroup2 cgroup2 "/sys/fs/cgroup/$sub";;
  esac
done < "$2"
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /dev
for n in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  name=${n%%:*}; rest=${n#*:}; mknod -m 666 /dev/$name c ${rest%%:*} ${rest#*:}
done
mkdir /dev/pts /dev/shm
mount -t tmpfs tmpfs /etc/systemd
mkdir -p /etc/systemd/system /etc/systemd/journald.conf.d
printf '[Journal]\\nStorage=volatile\\n' > /etc/systemd/journald.conf.d/sandbox.conf
mount -t tmpfs tmpfs /lib/systemd/system
cp "$1"/* /lib/systemd/system/
export container=xenblk-vhost-tests
exec /lib/systemd/systemd --system --unit=sandbox.target --log-target=journal --log-level=info
"""


def available() -> str | None:
    """Why a sandbox cannot run here (None: it can)."""
    if os.geteuid() != 0:
        return "needs root (namespaces, mounts)"
    for tool in (SYSTEMD, shutil.which("unshare"), shutil.which("nsenter")):
        if not tool or not os.path.exists(tool):
            return f"{tool or 'unshare/nsenter'} missing"
    return None


def _hierarchies() -> list[Path]:
    """Where this process sits in every mounted cgroup hierarchy (v1 controllers, name=, unified)."""
    out = []
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            base = CGROUP / "unified" if (CGROUP / "unified").is_dir() else CGROUP
        else:
            name = controllers.removeprefix("name=")
            base = CGROUP / name
            if not base.is_dir():
                continue
        out.append(base / path.lstrip("/"))
    return out


class Sandbox:
    def __init__(self, workdir: Path, pid: int, units: Path, cgroups: list[Path]) -> None:
        self.workdir = workdir
        self.pid = pid  # systemd, as the host sees it
        self.units = units
        self._cgroups = cgroups

    def run(self, argv: list[str], *, timeout: float = 60.0, check: bool = False,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
        """A command inside the sandbox's namespaces (its /run, its systemd)."""
        return subprocess.run(["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "-u", "-i", *argv],
                              capture_output=True, text=True, timeout=timeout, check=check, env=env)

    def systemctl(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        return self.run(["systemctl", "--no-pager", *args], timeout=timeout)

    def show(self, unit: str, prop: str) -> str:
        return self.systemctl("show", "-p", prop, "--value", unit).stdout.strip()

    def wait_for(self, unit: str, prop: str, wanted, timeout: float = 30.0) -> str:
        """Poll until wanted(value) (a callable) or value == wanted."""
        test = wanted if callable(wanted) else (lambda v: v == wanted)
        deadline = time.monotonic() + timeout
        while True:
            value = self.show(unit, prop)
            if test(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{unit} {prop}={value!r} after {timeout} s\n{self.log(unit)}")
            time.sleep(0.2)

    def journal(self, unit: str | None = None, *matches: str) -> list[dict]:
        argv = ["journalctl", "--no-pager", "-o", "json", "--all"] + (["-u", unit] if unit else []) + list(matches)
        return [json.loads(line) for line in self.run(argv).stdout.splitlines() if line.strip()]

    def journal_until(self, unit: str, until, *matches: str, timeout: float = 30.0) -> list[dict]:
        """journal(), read again until until(entries) holds: a record reaches journald over its socket
        asynchronously, so what the daemon did after logging it (a xenstore write, an exit) may be seen
        before journalctl sees the record."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.journal(unit, *matches)
            if until(entries):
                return entries
            if time.monotonic() > deadline:
                raise AssertionError(f"the journal of {unit} after {timeout} s does not hold it:\n{self.log(unit)}")
            time.sleep(0.2)

    def manager_log(self) -> str:
        """What systemd itself said (unit failures, watchdog timeouts, restarts): its journal lines."""
        return self.run(["journalctl", "--no-pager", "_PID=1", "-o", "cat"]).stdout

    def log(self, unit: str) -> str:
        return self.run(["journalctl", "--no-pager", "-u", unit, "-o", "short-monotonic"]).stdout

    def install(self, name: str, text: str) -> None:
        """A unit (or a drop-in, name 'x.service.d/y.conf') in /etc/systemd/system, then daemon-reload."""
        target = f"/etc/systemd/system/{name}"
        self.run(["mkdir", "-p", os.path.dirname(target)], check=True)
        staged = self.workdir / name.replace("/", "_")
        staged.write_text(text)
        self.run(["cp", str(staged), target], check=True)
        self.systemctl("daemon-reload")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)  # PID 1 of the namespace: everything in it goes too
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + 10
        for top in self._cgroups:
            for path in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [top]:
                while True:
                    try:
                        path.rmdir()
                        break
                    except FileNotFoundError:
                        break
                    except OSError:  # still has processes for a moment
                        if time.monotonic() > deadline:
                            break
                        time.sleep(0.05)


@contextmanager
def systemd_sandbox(workdir: Path, units: Mapping[str, str], *, boot_timeout: float = 30.0) -> Iterator[Sandbox]:
    workdir.mkdir(parents=True, exist_ok=True)
    unit_dir = workdir / "units"
    unit_dir.mkdir(exist_ok=True)
    for name, text in {**JOURNALD_UNITS, **units}.items():
        (unit_dir / name).write_text(text)
    inner = workdir / "inner.sh"
    inner.write_text(_INNER)
    cgroups = []
    tag = f"xbv-sandbox-{os.getpid()}-{time.monotonic_ns()}"
    for where in _hierarchies():
        try:
            (where / tag).mkdir()
            cgroups.append(where / tag)
        except OSError:
            continue
    procs = " ".join(str(c / "cgroup.procs") for c in cgroups)
    # The shell moves itself into the sandbox's cgroups, then becomes unshare (which makes the cgroup
    # namespace there), whose child becomes systemd.
    launcher = (f'for f in {procs}; do echo $$ > "$f" 2>/dev/null || true; done; '
                f'exec unshare --pid --fork --mount --propagation private --uts --ipc --net --cgroup '
                f'--mount-proc sh "$0" "$1" "$2"')
    console = open(workdir / "console.log", "w")
    # The host's cgroup mounts, read now: inside, /proc is the new namespace's.
    mounts = workdir / "host-mounts"
    mounts.write_text("".join(line + "\n" for line in Path("/proc/self/mounts").read_text().splitlines()
                              if line.split()[1].startswith("/sys/fs/cgroup/")))
    proc = subprocess.Popen(["sh", "-c", launcher, str(inner), str(unit_dir), str(mounts)], stdout=console,
                            stderr=subprocess.STDOUT, start_new_session=True)
    sandbox = None
    try:
        deadline = time.monotonic() + boot_timeout
        pid = None
        while pid is None:
            out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
            pid = int(out[0]) if out else None
            if proc.poll() is not None:
                raise RuntimeError(f"the sandbox ended at once: {(workdir / 'console.log').read_text()}")
            if pid is None:
                if time.monotonic() > deadline:
                    raise RuntimeError("no systemd in the sandbox")
                time.sleep(0.05)
        sandbox = Sandbox(workdir, pid, unit_dir, cgroups)
        while sandbox.systemctl("is-system-running").stdout.strip() not in ("running", "degraded"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"systemd did not come up: {(workdir / 'console.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield sandbox
    finally:
        if sandbox is not None:
            sandbox.close()
        else:
            for c in cgroups:
                try:
                    c.rmdir()
                except OSError:
                    pass
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        console.close()
