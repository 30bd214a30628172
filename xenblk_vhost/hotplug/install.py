"""`xenblk-vhost install-hotplug`: put the hotplug script where libxl looks for it.

libxl runs a disk's `script=` as given if it is absolute, else from Xen's
script directory (/etc/xen/scripts on Debian: libxl__abs_path with
XEN_SCRIPT_DIR). The script libxl runs is a two-line shell shim that execs
the Python that has xenblk-vhost installed, so xl lines can say
`script=block-xenblk-vhost` whatever venv or prefix the package lives in,
and reinstalling elsewhere is one more `install-hotplug`:

    #!/bin/sh
    exec '/opt/xenblk-vhost/bin/python3' -I -m xenblk_vhost.hotplug "$@"

-I (isolated): libxl runs it as root from whatever directory it was started
in, and `-m` alone would put that directory first on sys.path (a module
planted there would run as root); -I also ignores PYTHON* variables and the
user's site directory.

With --container NAME the shim runs the script inside the xenblk-vhost
container instead (it reaches xenstore and reads the YAML files there,
passed in as in deploy/compose.yaml): the host needs no Python package.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from pathlib import Path

XEN_SCRIPT_DIR = "/etc/xen/scripts"
DEFAULT_NAME = "block-xenblk-vhost"
MARKER = "# xenblk-vhost hotplug shim"
# What libxl puts in the script's environment (libxl_linux.c get_hotplug_env):
# a container engine passes only what it is told to.
_HOTPLUG_ENV = ("XENBUS_PATH", "XENBUS_TYPE", "XENBUS_BASE_PATH", "script")


class InstallError(Exception):
    pass


def shim_text(*, python: str | None = None, container: str | None = None, engine: str = "docker",
              control_dir: str | None = None) -> str:
    """The shell script libxl runs: hands `add|remove` to xenblk-vhost (with
    --control-dir DIR if the daemons' control sockets are not in the default place)."""
    options = f"--control-dir {shlex.quote(control_dir)} " if control_dir is not None else ""
    if container is not None:
        env = " ".join(f"-e {v}" for v in _HOTPLUG_ENV)
        command = (f"exec {shlex.quote(engine)} exec {env} {shlex.quote(container)} xenblk-vhost hotplug "
                   f"{options}\"$@\"")
        where = f"in the container {container} ({engine})"
    else:
        python = python or sys.executable
        if not os.path.isabs(python):
            raise InstallError(f"the Python interpreter path {python!r} is not absolute")
        command = f"exec {shlex.quote(python)} -I -m xenblk_vhost.hotplug {options}\"$@\""
        where = f"with {python}"
    return (f"#!/bin/sh\n"
            f"{MARKER} (written by `xenblk-vhost install-hotplug`).\n"
            f"# libxl runs it as `<this> add|remove` with XENBUS_PATH set, for disks whose xl line\n"
            f"# says script=...; it runs xenblk-vhost's hotplug check {where}.\n"
            f"{command}\n")


def install(text: str, directory: str = XEN_SCRIPT_DIR, name: str = DEFAULT_NAME, *, force: bool = False) -> Path:
    """Write the shim (mode 0755, atomically). A file there that is not ours is
    kept unless force: it may be a script an operator relies on."""
    folder = Path(directory)
    if not folder.is_dir():
        raise InstallError(f"{folder} is not a directory: is Xen's toolstack installed (Debian: xen-utils-common)? "
                           f"Give --dir, and then script=<absolute path> in the xl disk lines")
    path = folder / name
    if path.exists() and not force:
        try:
            existing = path.read_text(errors="replace")
        except OSError as e:
            raise InstallError(f"{path}: {e.strerror}") from None
        if MARKER not in existing:
            raise InstallError(f"{path} exists and was not written by xenblk-vhost: not replacing it "
                               f"(--force to replace, or --name for another name)")
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def script_reference(path: Path) -> str:
    """What xl's script= needs: the bare name inside Xen's script dir, else the absolute path."""
    return path.name if str(path.parent) == XEN_SCRIPT_DIR else str(path)


def disk_lines(script: str) -> str:
    target = "/etc/xenblk-vhost/<domain>.yaml"
    return ("xl disk lines (the vdev must be one of the YAML file's disks; target= comes last):\n"
            f"  phy route, any Xen:  'vdev=xvda, backendtype=phy, script={script}, target={target}'\n"
            f"  tap route, Xen 4.19+: 'vdev=xvda, backendtype=tap, script={script}, target={target}'\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dir", default=XEN_SCRIPT_DIR, help=f"where to write it (default {XEN_SCRIPT_DIR}, "
                        "where libxl finds script=NAME)")
    parser.add_argument("--name", default=DEFAULT_NAME, help=f"its file name (default {DEFAULT_NAME})")
    parser.add_argument("--container", metavar="NAME",
                        help="run the check inside this running xenblk-vhost container (docker/podman exec) "
                        "instead of with this Python")
    parser.add_argument("--engine", default="docker", choices=("docker", "podman"),
                        help="container engine for --container (default docker)")
    parser.add_argument("--control-dir", metavar="DIR",
                        help="where the daemons' control sockets are, if not /run/xenblk-vhost")
    parser.add_argument("--print", action="store_true", dest="print_only",
                        help="print the script on stdout instead of installing it (e.g. from inside a "
                        "container: ... install-hotplug --container NAME --print > /etc/xen/scripts/...)")
    parser.add_argument("--force", action="store_true", help="replace a file of that name not written by us")


def run_from_args(args: argparse.Namespace) -> int:
    try:
        text = shim_text(container=args.container, engine=args.engine, control_dir=args.control_dir)
        if args.print_only:
            sys.stdout.write(text)
            return 0
        path = install(text, args.dir, args.name, force=args.force)
    except (InstallError, OSError) as e:
        print(f"xenblk-vhost install-hotplug: {e}", file=sys.stderr)
        return 1
    print(f"installed {path}")
    print(disk_lines(script_reference(path)), end="")
    return 0
