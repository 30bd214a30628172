"""The stats table: a daemon's per-vbd, per-ring counters (`xenblk-vhost ctl stats`, `xenblk-vhost stats`).

    $ xenblk-vhost ctl stats
    web1 xvda  vbd-5-51712  Connected  io_uring /var/lib/xen/web1.img  (map data path)
    web1 xvda    ring  rd_req  wr_req  f_req  ds_req  oo_req  rd_sect  wr_sect  in_flight  pgrants  errors
    web1 xvda       0    1200     830     12       4       0    96000    66400          2      320       0
    web1 xvda   total     ...

Every line starts with the domain's name and the disk's vdev (the YAML's
keys: a guest's domid changes at each boot, its name does not), so a grep
for the domain keeps the whole table of its disks.

Columns are blkback's sysfs statistics (rd_req, wr_req, f_req: flushes and
barriers, ds_req: discards, oo_req: times the ring had requests waiting
while every request slot was busy, rd_sect/wr_sect: 512-byte sectors) plus
requests in flight, persistent grants mapped and error responses.
"""

from __future__ import annotations

from ..xen.xenbus import XenbusState

COLUMNS = (("rd_req", "rd_req"), ("wr_req", "wr_req"), ("f_req", "f_req"), ("ds_req", "ds_req"),
           ("oo_req", "oo_req"), ("rd_sect", "rd_sect"), ("wr_sect", "wr_sect"),
           ("in_flight", "in_flight"), ("persistent_grants", "pgrants"), ("errors", "errors"))


def _row(prefix: str, label: str, counters: dict, widths: list[int]) -> str:
    cells = [f"{label:>6}"] + [f"{counters.get(key, 0):>{w}}" for (key, _), w in zip(COLUMNS, widths)]
    line = prefix + "  ".join(cells)
    return line + ("  HALTED" if counters.get("halted") else "")


def _state(name: str) -> str:
    """The snapshot's state (the enum's name, "CONNECTED") as xenbus prints it ("Connected")."""
    member = XenbusState.__members__.get(str(name))
    return member.label if member is not None else str(name)


def vbd_prefix(vbd: dict) -> str:
    """"web1 xvda  ": who every line of a vbd's table is about."""
    domain = vbd.get("domain") or f"domid {vbd.get('domid')}"
    return f"{domain} {vbd.get('vdev')}  "


def render_table(snapshot: dict) -> str:
    vbds = snapshot.get("vbds", [])
    if not vbds:
        return "no devices (the daemon serves none right now)"
    out = []
    for vbd in vbds:
        prefix = vbd_prefix(vbd)
        where = f"{vbd['driver']} {vbd['path']}" if vbd.get("driver") else "no disk configured"
        path = f"  ({vbd['data_path']} data path)" if vbd.get("data_path") else ""
        paused = "  PAUSED" if vbd.get("paused") else ""
        out.append(f"{prefix}{vbd['device']}  {_state(vbd['state'])}  {where}{path}{paused}")
        rows = [(str(i), ring) for i, ring in enumerate(vbd["rings"])] + [("total", vbd["total"])]
        widths = [max(len(title), *(len(str(r.get(key, 0))) for _, r in rows)) for key, title in COLUMNS]
        out.append(prefix + "  ".join([f"{'ring':>6}"] + [f"{title:>{w}}" for (_, title), w in zip(COLUMNS, widths)]))
        if not vbd["rings"]:
            out.append(f"{prefix}(not connected: no rings)")
        out.extend(_row(prefix, label, counters, widths) for label, counters in rows)
    return "\n".join(out)
