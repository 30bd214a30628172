"""`xenblk-vhost stats`: a running daemon's per-vbd, per-ring counters, as a table or JSON.

    $ xenblk-vhost stats
    vbd-5-51712 xvda  CONNECTED  io_uring /var/lib/xen/web1.img  (map data path)
      ring   rd_req   wr_req  f_req  ds_req  oo_req    rd_sect    wr_sect  in_flight  pgrants  errors
         0     1200      830     12       4       0      96000      66400          2      320       0
     total     ...

Columns are blkback's sysfs statistics (rd_req, wr_req, f_req: flushes and
barriers, ds_req: discards, oo_req: times the ring had requests waiting
while every request slot was busy, rd_sect/wr_sect: 512-byte sectors) plus
requests in flight, persistent grants mapped and error responses.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..control_protocol import ControlError, default_control_path, request_control
from ..exit_codes import EXIT_FAILURE, EXIT_OK

COLUMNS = (("rd_req", "rd_req"), ("wr_req", "wr_req"), ("f_req", "f_req"), ("ds_req", "ds_req"),
           ("oo_req", "oo_req"), ("rd_sect", "rd_sect"), ("wr_sect", "wr_sect"),
           ("in_flight", "in_flight"), ("persistent_grants", "pgrants"), ("errors", "errors"))


def _row(label: str, counters: dict, widths: list[int]) -> str:
    cells = [f"{label:>6}"] + [f"{counters.get(key, 0):>{w}}" for (key, _), w in zip(COLUMNS, widths)]
    line = "  " + "  ".join(cells)
    return line + ("  HALTED" if counters.get("halted") else "")


def render_table(snapshot: dict) -> str:
    vbds = snapshot.get("vbds", [])
    if not vbds:
        return "no devices (the daemon serves none right now)"
    out = []
    for vbd in vbds:
        where = f"{vbd['driver']} {vbd['path']}" if vbd.get("driver") else "no disk configured"
        path = f"  ({vbd['data_path']} data path)" if vbd.get("data_path") else ""
        out.append(f"{vbd['device']} {vbd['vdev']}  {vbd['state']}  {where}{path}")
        rows = [(str(i), ring) for i, ring in enumerate(vbd["rings"])] + [("total", vbd["total"])]
        widths = [max(len(title), *(len(str(r.get(key, 0))) for _, r in rows)) for key, title in COLUMNS]
        out.append("  " + "  ".join([f"{'ring':>6}"] + [f"{title:>{w}}" for (_, title), w in zip(COLUMNS, widths)]))
        if not vbd["rings"]:
            out.append("  (not connected: no rings)")
        out.extend(_row(label, counters, widths) for label, counters in rows)
    return "\n".join(out)


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "stats",
        help="print a running daemon's per-vbd, per-ring counters",
        description="Ask a running `xenblk-vhost run` over its control socket for its counters: per vbd and "
        "per ring, requests by operation (rd_req, wr_req, f_req = flushes and barriers, ds_req = discards), "
        "oo_req (times requests waited for a free slot), sectors read and written, requests in flight, "
        "persistent grants and error responses. Counters start at zero when the frontend connects.",
    )
    p.add_argument("--control", metavar="PATH", default=None,
                   help="the daemon's control socket (default: /run/xenblk-vhost/control.sock as root, "
                   "$XDG_RUNTIME_DIR/xenblk-vhost/control.sock otherwise)")
    p.add_argument("--json", action="store_true", help="print the whole snapshot as JSON")
    p.set_defaults(func=main)
    return p


def main(args: argparse.Namespace) -> int:
    path = args.control or default_control_path()
    if path is None:
        print("xenblk-vhost stats: no default control socket for a non-root user without XDG_RUNTIME_DIR; "
              "pass --control PATH", file=sys.stderr)
        return EXIT_FAILURE
    try:
        snapshot = request_control(path, "stats")
    except ControlError as e:
        print(f"xenblk-vhost stats: {e}", file=sys.stderr)
        return EXIT_FAILURE
    if args.json:
        print(json.dumps(snapshot, indent=2, sort_keys=True))
    else:
        print(render_table(snapshot))
    return EXIT_OK
