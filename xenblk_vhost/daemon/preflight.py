"""What `run` (and `check`) verify before serving, and the one-line errors an operator reads.

    configs = load_checked(paths)               # ConfigError: check's FILE:LINE lines (libblkio included)
    platform = open_platform_explained(sim)     # StartupError: not on Xen, module not loaded, not root
    check_xenstore_argument(path)               # StartupError: --xenstore on a regular file
    explain_xenstore_failure(path, error)       # what was tried for xenstored, and why each failed

A StartupError is one line with its hint; `run` prints it and exits 2
(exit_codes.EXIT_USAGE), which the unit's RestartPreventExitStatus=2 keeps
systemd from retrying: none of these mends itself.

libblkio properties: `check` and `run` create each disk's driver instance
(blkio_create, nothing opened or connected) and set every property the
file passes through, so a name libblkio does not know, a read-only
property or a value of the wrong type is reported at its line, not at the
guest's first attach. Properties libblkio accepts only once connected
(num-entries, queue-size, num-poll-queues) are checked for name and type
without a value's range (that needs the storage).
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from ..config import ConfigError, DomainConfig, Problem, load_configs
from ..platforms import open_platform
from ..xen.interfaces import Platform
from ..xen.xenstore import DEFAULT_SOCKETS, XENBUS_DEVICE

HYPERVISOR_TYPE = "/sys/hypervisor/type"
MODULES = {"gntdev": "xen-gntdev", "evtchn": "xen-evtchn", "xenbus": "xenfs or xen-privcmd"}


class StartupError(Exception):
    """Why the daemon cannot start here, with what to do about it: one line."""


# ---------------------------------------------------------------------- configuration

def property_problems(configs: Iterable[DomainConfig]) -> list[Problem]:
    """What libblkio refuses in each disk's driver and pass-through properties (see the module doc)."""
    from ..storage import Blkio, BlkioError
    from ..storage.device import CONNECTED_STATE_PROPERTIES

    problems = []
    for cfg in configs:
        for index, disk in enumerate(cfg.disks):
            where = f"disks[{index}]"
            try:
                blkio = Blkio(disk.driver)
            except BlkioError as e:
                problems.append(Problem(cfg.source, disk.line, f"{where}.driver",
                                        f"libblkio cannot make a {disk.driver} instance: {e.message or e}"))
                continue
            try:
                lines = dict(disk.property_lines)
                for name, value in disk.properties:
                    try:
                        blkio.set(name, value)
                    except BlkioError as e:
                        if e.errno == errno.ENODEV and name in CONNECTED_STATE_PROPERTIES:
                            continue  # right name and type: its range is checked once connected
                        problems.append(Problem(cfg.source, lines.get(name, disk.line),
                                                f"{where}.properties.{name}",
                                                f"libblkio's {disk.driver} refuses it: {e.message or e}"))
            finally:
                blkio.close()
    return problems


def load_checked(paths: Iterable[str | os.PathLike], *, check_storage: bool = True) -> list[DomainConfig]:
    """load_configs, plus what libblkio refuses (skipped with check_storage=False when libblkio
    itself cannot be loaded: files checked on a machine without it)."""
    configs = load_configs(paths, check_storage=check_storage)
    try:
        problems = property_problems(configs)
    except OSError as e:  # libblkio.so.1 missing
        if not check_storage:
            return configs
        raise ConfigError([Problem(configs[0].source if configs else "-", 0, "libblkio",
                                   f"cannot be loaded ({e}): install libblkio1")]) from None
    if problems:
        raise ConfigError(problems)
    return configs


# ---------------------------------------------------------------------- /dev/xen

def _hypervisor() -> str | None:
    try:
        return Path(HYPERVISOR_TYPE).read_text().strip() or None
    except OSError:
        return None


def explain_xen_device_error(e: OSError, *, hypervisor: str | None | bool = False) -> str:
    """One line: why a /dev/xen device could not be opened and what to do."""
    path = str(e.filename or "/dev/xen")
    hv = _hypervisor() if hypervisor is False else hypervisor
    if isinstance(e, FileNotFoundError):
        if hv != "xen":
            seen = f"{HYPERVISOR_TYPE} says {hv!r}" if hv else f"no {HYPERVISOR_TYPE}"
            return (f"not running on Xen ({seen}; {path} is missing): xenblk-vhost runs in dom0 or a driver "
                    f"domain (or against the simulator: run --sim SOCKET)")
        if not os.path.isdir(os.path.dirname(path)):
            return (f"{os.path.dirname(path)} is missing although this is Xen: load xenfs and the Xen device "
                    f"modules (modprobe xen-gntdev xen-evtchn) or check that udev runs")
        module = MODULES.get(os.path.basename(path), "its")
        return (f"{path} is missing: the {module} module is not loaded (modprobe {module}; at boot: "
                f"list it in /etc/modules)")
    if isinstance(e, PermissionError):
        return f"{path}: permission denied: run as root (the xenblk-vhost@ unit does)"
    return f"{path}: {e.strerror or e}"


def open_platform_explained(sim: str | None) -> Platform:
    """open_platform, its failure as a StartupError (one line and a hint)."""
    try:
        return open_platform(sim=sim)
    except OSError as e:
        if sim is not None:
            raise StartupError(f"--sim {sim}: cannot reach the simulated hypervisor: {e.strerror or e}") from e
        raise StartupError(explain_xen_device_error(e)) from e


# ---------------------------------------------------------------------- xenstored

def check_xenstore_argument(path: str | None) -> None:
    """--xenstore must be a socket or a character device (xenstored's socket, /dev/xen/xenbus)."""
    if not path:
        return
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # explained when the connection fails
    if not (stat.S_ISSOCK(mode) or stat.S_ISCHR(mode)):
        kind = "a directory" if stat.S_ISDIR(mode) else "a regular file" if stat.S_ISREG(mode) else "not a socket"
        raise StartupError(f"--xenstore {path}: {kind}: give xenstored's socket (e.g. /run/xenstored/socket) or "
                           f"the xenbus device ({XENBUS_DEVICE})")


def _candidate_state(path: str) -> str:
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "absent"
    except OSError as e:
        return e.strerror or str(e)
    return "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) else "not a socket"


def explain_xenstore_failure(requested: str | None, error: OSError, environ=None) -> str:
    """One line: the connection to xenstored failed; what was tried (in xenstore_path()'s order)."""
    environ = os.environ if environ is None else environ
    reason = error.strerror or str(error)
    if requested:
        return f"cannot reach xenstored at {requested} (--xenstore): {reason}"
    if environ.get("XENSTORED_PATH"):
        return f"cannot reach xenstored at $XENSTORED_PATH={environ['XENSTORED_PATH']}: {reason}"
    tried = [f"{p} ({_candidate_state(p)})" for p in (*DEFAULT_SOCKETS, XENBUS_DEVICE)]
    return (f"cannot reach xenstored ({reason}); tried {', '.join(tried)}: is xenstored running "
            f"(systemctl status xenstored, or Debian's xen init script)? --xenstore PATH names another")
