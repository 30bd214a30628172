"""Which device the hotplug script is run for, and which YAML file it names.

libxl (tools/libs/light/libxl_linux.c, get_hotplug_env) sets
XENBUS_PATH=backend/<kind>/<domid>/<devid>, relative to the backend
domain's xenstore home (dom0's, or a driver domain's under `xl devd`), and
writes `params` before running the script (libxl_disk.c, device_disk_add):
the xl line's target verbatim for backendtype=phy, "<format>:<target>" for
backendtype=tap ("aio:" for raw).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..vdev import vdev_name
from .checks import HotplugError

KINDS = ("vbd", "vbd3")  # phy, tap (Xen >= 4.19); qdisk has no hotplug script

_PATH = re.compile(r"^(?:/local/domain/(\d+)/)?backend/([a-z0-9_]+)/(\d+)/(\d+)$")
# What libxl__device_disk_string_of_format writes before the target for tap.
_TAP_PREFIX = re.compile(r"^(aio|vhd|qcow2?|qed|raw):")


@dataclass(frozen=True)
class BackendDevice:
    path: str  # as libxl gave it (relative paths are below our own xenstore home)
    kind: str
    frontend_domid: int
    devid: int

    @property
    def vdev(self) -> str:
        return vdev_name(self.devid)

    def __str__(self) -> str:
        return f"{self.kind}-{self.frontend_domid}-{self.devid} ({self.vdev})"


def parse_xenbus_path(path: str | None) -> BackendDevice:
    """The device named by XENBUS_PATH; HotplugError if it is not a disk we can serve."""
    if not path:
        raise HotplugError("XENBUS_PATH is not set: this script is run by libxl (or `xl devd`) "
                           "for a disk whose xl line says script=...")
    m = _PATH.match(path.rstrip("/"))
    if m is None:
        raise HotplugError(f"XENBUS_PATH={path!r} is not a backend/<kind>/<domid>/<devid> path")
    kind = m.group(2)
    if kind not in KINDS:
        raise HotplugError(f"XENBUS_PATH={path!r}: backend kind {kind!r} is not served by xenblk-vhost "
                           f"through a hotplug script (use backendtype=phy, or tap on Xen >= 4.19)")
    return BackendDevice(path=path.rstrip("/"), kind=kind, frontend_domid=int(m.group(3)), devid=int(m.group(4)))


def config_path(device: BackendDevice, params: str) -> str:
    """The YAML file named by `params`: tap's format prefix removed, an absolute path required
    (the script runs in whatever directory libxl runs in)."""
    target = params.strip()
    if device.kind == "vbd3":
        target = _TAP_PREFIX.sub("", target, count=1)
    if not target:
        raise HotplugError("params is empty: the xl disk line needs target=/etc/xenblk-vhost/<domain>.yaml "
                           "(last on the line)")
    if not os.path.isabs(target):
        raise HotplugError(f"params {params!r} is not an absolute path: the xl disk line's target must be "
                           f"the domain's xenblk-vhost YAML file, e.g. target=/etc/xenblk-vhost/<domain>.yaml")
    return target
