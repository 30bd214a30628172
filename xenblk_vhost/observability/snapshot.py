"""The running service's devices and their counters, as one JSON-able dict.

One reader for every consumer (the control socket, the Prometheus
collector, the demo): each asks at the moment it needs the figures, and
nothing is counted twice. It runs in the service's trio thread between
two steps of the datapath, so a snapshot is consistent.

    {"version": 1, "pid": 1234, "uptime_s": 12.5,
     "vbds": [{"device": "vbd-5-51712", "kind": "vbd", "domain": "web1", "domid": 5, "devid": 51712,
               "vdev": "xvda", "state": "CONNECTED", "driver": "io_uring", "path": "/x.img",
               "data_path": "copy", "serving": true, "paused": false,
               "rings": [{"oo_req": 0, "rd_req": 10, ..., "in_flight": 0, "persistent_grants": 0,
                          "halted": false}, ...],
               "total": {...the rings summed...}}]}

`domain` is the domain's name (the YAML's key: it survives the new domid of
every guest boot), or its domid for a file that names none.

Counters are the datapath's (backend/datapath/stats.py: blkback's names); they
start from zero at each connection of the frontend, as blkback's do.
"""

from __future__ import annotations

import os
import time

from ..backend.datapath.stats import total
from ..vdev import vdev_name

SNAPSHOT_VERSION = 1


def device_snapshot(device_id, device) -> dict:
    """One device (backend/xenbus/device.py Device) and its vbd's counters, if it has a vbd."""
    entry = {
        "device": str(device_id),
        "kind": device_id.kind,
        "domain": device.domain,
        "domid": device_id.frontend_domid,
        "devid": device_id.devid,
        "vdev": vdev_name(device_id.devid),
        "state": device.state.name,
        "driver": device.disk.driver if device.disk is not None else None,
        "path": device.disk.path if device.disk is not None else None,
        "data_path": None,
        "serving": False,
        "paused": device.paused,
        "rings": [],
    }
    vbd = device.vbd
    if vbd is not None:
        entry["data_path"] = vbd.features.data_path
        entry["serving"] = vbd.serving
        stats = vbd.stats()
        entry["rings"] = stats["rings"]
        entry["total"] = stats["total"]
        entry["storage"] = stats.get("storage")  # the storage link (backend/datapath/storage_link.py)
    else:
        entry["total"] = total([])
    return entry


def service_snapshot(service, *, started: float | None = None) -> dict:
    """Every device of the service, ordered by domain, kind and device id."""
    devices = sorted(service.devices.items(), key=lambda item: (item[0].frontend_domid, item[0].kind,
                                                                item[0].devid))
    return {
        "version": SNAPSHOT_VERSION,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - started, 3) if started is not None else None,
        "vbds": [device_snapshot(did, device) for did, device in devices],
    }
