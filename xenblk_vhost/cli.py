"""Command line entry point: `xenblk-vhost`."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .config import ConfigError, load_configs

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # also: a configuration that does not validate


def _cmd_check(args: argparse.Namespace) -> int:
    try:
        configs = load_configs(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    for cfg in configs:
        who = f"domain {cfg.name!r}" if cfg.name is not None else f"domid {cfg.domid}"
        disks = ", ".join(f"{d.name} ({d.driver} {d.path}{', ro' if d.readonly else ''})" for d in cfg.disks)
        print(f"{cfg.source}: ok: {who}: {disks}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xenblk-vhost",
        description=(
            "Userspace Xen block backend: serves guests' xen-blkfront rings "
            "from any libblkio driver (io_uring, nvme-io_uring, virtio-blk-vhost-user)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    check = sub.add_parser(
        "check",
        help="validate configuration files and exit",
        description="Validate YAML domain files without starting anything. Exit 0 if all are "
        "valid, 2 with one `FILE:LINE: key: reason` line per problem otherwise.",
    )
    check.add_argument("config", nargs="+", metavar="CONFIG", help="a domain's YAML file")
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
