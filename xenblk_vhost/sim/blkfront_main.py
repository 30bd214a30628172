"""`python -m xenblk_vhost.sim.blkfront`: the reference frontend as a guest process.

Attaches to an existing simulated domain (memory, grant table, event
channels through the hypervisor socket), connects to xenstored as that
domain, drives one vbd through a verifying workload, closes it, and prints
one JSON object on stdout:

    {"ok": ..., "frontend_nodes": {...}, "front": {...negotiated, disk, rings, errors},
     "workload": {...requests, by_op, sectors_verified, mismatches, errors, elapsed_s}}

Exit status 0 when the workload verified and the backend made no protocol
error, 1 otherwise, 2 if the frontend could not run at all (the JSON then
carries "error").
"""

from __future__ import annotations

import argparse
import json
import sys

import trio

from .blkfront import open_blkfront
from .blkfront_config import BlkfrontOptions
from .blkfront_workload import OPS, Workload, run_workload
from .guest import Guest
from .xenstore_guest import open_guest_xenstore


def parse_mix(text: str) -> tuple[tuple[str, int], ...]:
    """"write=45,read=45,flush=5" -> (("write", 45), ...)."""
    out = []
    for item in text.split(","):
        op, _, weight = item.partition("=")
        if op not in OPS or not weight.isdigit():
            raise argparse.ArgumentTypeError(f"bad mix item {item!r} (ops: {', '.join(OPS)})")
        out.append((op, int(weight)))
    return tuple(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m xenblk_vhost.sim.blkfront",
                                description="reference blkif frontend in a simulated guest")
    p.add_argument("--hypervisor", required=True, help="the simulated hypervisor's socket")
    p.add_argument("--xenstore", required=True, help="the simulated xenstored's socket")
    p.add_argument("--domid", type=int, required=True, help="the guest domain to run in")
    p.add_argument("--devid", type=int, default=51712, help="the vbd's device id (51712 = xvda)")
    g = p.add_argument_group("xen-blkfront module parameters")
    g.add_argument("--max-indirect-segments", type=int, default=32)
    g.add_argument("--max-queues", type=int, default=4)
    g.add_argument("--max-ring-page-order", type=int, default=0)
    g.add_argument("--no-persistent", action="store_true", help="feature_persistent=0")
    t = p.add_argument_group("test knobs")
    t.add_argument("--protocol", default="x86_64-abi", choices=["x86_64-abi", "x86_32-abi", "none"])
    t.add_argument("--skip-init-wait", action="store_true")
    t.add_argument("--initial-index", type=lambda v: int(v, 0), default=0)
    t.add_argument("--state-timeout", type=float, default=10.0)
    w = p.add_argument_group("workload")
    w.add_argument("--requests", type=int, default=1000)
    w.add_argument("--depth", type=int, default=16)
    w.add_argument("--mix", type=parse_mix, default=Workload.mix)
    w.add_argument("--max-sectors", type=int, default=64)
    w.add_argument("--region-sectors", type=int, default=0)
    w.add_argument("--seed", type=int, default=1)
    w.add_argument("--no-final-verify", action="store_true")
    w.add_argument("--seconds", type=float, default=0.0,
                   help="stop issuing requests after this long (0: after --requests)")
    w.add_argument("--stop-file", default="", metavar="PATH", help="stop issuing requests once PATH exists")
    w.add_argument("--wait-detach", type=float, default=0.0, metavar="SECONDS",
                   help="after the workload, wait this long for the toolstack to detach "
                        "(backend Closing) instead of closing from the guest")
    return p


def options_from(args: argparse.Namespace) -> BlkfrontOptions:
    return BlkfrontOptions(
        max_indirect_segments=args.max_indirect_segments,
        max_queues=args.max_queues,
        max_ring_page_order=args.max_ring_page_order,
        feature_persistent=not args.no_persistent,
        protocol=None if args.protocol == "none" else args.protocol,
        skip_init_wait=args.skip_init_wait,
        initial_index=args.initial_index,
        state_timeout=args.state_timeout,
    )


def workload_from(args: argparse.Namespace) -> Workload:
    return Workload(requests=args.requests, depth=args.depth, mix=args.mix, max_sectors=args.max_sectors,
                    region_sectors=args.region_sectors, seed=args.seed,
                    final_verify=not args.no_final_verify, seconds=args.seconds,
                    stop_file=args.stop_file)


async def frontend_nodes(xs, fe_path: str) -> dict[str, str]:
    """Every node of the frontend's dir, as {relative path: value}."""
    out: dict[str, str] = {}

    async def walk(path: str, rel: str) -> None:
        for name in await xs.directory(path):
            out[rel + name] = (await xs.read(f"{path}/{name}")).decode()
            await walk(f"{path}/{name}", f"{rel}{name}/")

    await walk(fe_path, "")
    return out


async def run(args: argparse.Namespace) -> dict:
    options = options_from(args)
    workload = workload_from(args)
    guest = Guest.attach(args.hypervisor, args.domid)
    try:
        async with open_guest_xenstore(args.domid, args.xenstore) as xs:
            async with open_blkfront(xs, guest, args.devid, options) as front:
                nodes = await frontend_nodes(xs, front.fe_path)
                result = await run_workload(front, workload)
                if args.wait_detach:
                    with trio.move_on_after(args.wait_detach):
                        await front.wait_closed()
            report = front.report()
    finally:
        guest.close()
    ok = result.ok and not report["errors"]
    return {"ok": ok, "options": options.as_dict(), "frontend_nodes": nodes, "front": report,
            "workload": result.as_dict()}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = trio.run(run, args)
    except Exception as exc:  # report, do not just die: the caller parses stdout
        print(json.dumps({"ok": False, "error": repr(exc)}), flush=True)
        return 2
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
