"""Command line entry point: `xenblk-vhost`.

    xenblk-vhost check CONFIG...      validate, exit 0 or 2 (--no-storage: not the storage paths)
    xenblk-vhost hotplug add|remove   libxl's hotplug script (xenblk_vhost/hotplug/)
    xenblk-vhost install-hotplug      write /etc/xen/scripts/block-xenblk-vhost
    xenblk-vhost run CONFIG... [--xenstore PATH] [--sim SOCKET] [--control PATH] [--metrics HOST:PORT]
    xenblk-vhost stats [--control PATH] [--json]   a running daemon's counters (observability/stats_command.py)
    xenblk-vhost demo [--seconds N] [--driver D] [--queues N] [--data-path P] [--json]   (demo/command.py)
    xenblk-vhost -xen-domid N ...     exec'd by libxl as a PV device model (device_model/)
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from . import __version__
from .config import ConfigError, load_configs
from .exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

log = logging.getLogger("xenblk_vhost")



def _load_or_report(paths, check_storage: bool = True) -> list | None:
    """The configs, or None after printing every problem (`FILE:LINE: key: reason`)."""
    try:
        return load_configs(paths, check_storage=check_storage)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return None


def _cmd_check(args: argparse.Namespace) -> int:
    configs = _load_or_report(args.config, check_storage=not args.no_storage)
    if configs is None:
        return EXIT_USAGE
    unchecked = " (storage not checked)" if args.no_storage else ""
    for cfg in configs:
        who = f"domain {cfg.name!r}" if cfg.name is not None else f"domid {cfg.domid}"
        disks = ", ".join(f"{d.name} ({d.driver} {d.path}{', ro' if d.readonly else ''})" for d in cfg.disks)
        print(f"{cfg.source}: ok: {who}: {disks}{unchecked}")
    return EXIT_OK


def _sd_notify(message: str) -> None:
    """Tell systemd (Type=notify) READY=1 / RELOADING=1 / STOPPING=1; no-op outside systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(message.encode(), address)
    except OSError as e:
        log.debug("sd_notify(%s) failed: %s", message, e)


async def _serve(args: argparse.Namespace, configs: list) -> int:
    import trio

    from .backend.xenbus.service import Service
    from .observability.endpoints import open_observability
    from .platforms import open_platform
    from .xen.xenstore import open_xenstore

    with open_platform(sim=args.sim) as platform:
        # Signals are caught from before "ready", so none is lost.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with open_xenstore(args.xenstore) as xs, open_observability(args) as observability:
                service = Service(xs, platform, configs)
                async with trio.open_nursery() as nursery:
                    await nursery.start(service.run)
                    observability.serve(nursery, service)  # control socket, metrics (bound already)
                    print("ready", flush=True)
                    _sd_notify("READY=1")
                    async for sig in signals:
                        if sig == signal.SIGHUP:
                            _sd_notify("RELOADING=1")
                            try:
                                service.reload(load_configs(args.config))
                            except ConfigError as e:
                                for problem in e.problems:
                                    log.error("reload refused, keeping the running configuration: %s", problem)
                            _sd_notify("READY=1")
                            continue
                        # Stop: every device drains (in-flight requests answered),
                        # unmaps and unbinds; xenstore is left as it is, so guests
                        # see a pause and a backend started later takes them over.
                        log.info("%s: stopping", signal.Signals(sig).name)
                        _sd_notify("STOPPING=1")
                        break
                    nursery.cancel_scope.cancel()
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    configs = _load_or_report(args.config)
    if configs is None:
        return EXIT_USAGE
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    import trio

    from .xen.interfaces import XenStoreError
    from .xen.xenstore import XenStoreConnectionError

    try:
        return trio.run(_serve, args, configs)
    except (OSError, XenStoreError, XenStoreConnectionError) as e:
        log.error("stopped: %s", e)
        return EXIT_FAILURE


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
    check.add_argument("--no-storage", action="store_true",
                       help="check everything but the storage: do not require each disk's path (image, "
                       "block device, vhost-user socket) to exist yet, e.g. on another machine or before "
                       "the storage daemon has started (`run` always checks it)")
    check.set_defaults(func=_cmd_check)
    run = sub.add_parser(
        "run",
        help="serve the configured domains' disks",
        description="Validate the YAML files (exit 2 on a problem, as `check`), then serve every "
        "configured domain's vbd (backendtype=phy) and vbd3 (backendtype=tap) disks until SIGTERM or "
        "SIGINT (exit 0). SIGHUP reloads the files: a changed disk applies when its frontend next "
        "connects. Prints `ready` on stdout once serving (and tells systemd, under Type=notify).",
    )
    run.add_argument("config", nargs="+", metavar="CONFIG", help="a domain's YAML file")
    run.add_argument("--xenstore", metavar="PATH",
                     help="xenstored socket or xenbus device (default: $XENSTORED_PATH, the usual sockets, "
                     "/dev/xen/xenbus)")
    run.add_argument("--sim", metavar="SOCKET", help="use the simulated hypervisor listening on SOCKET")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    _add_run_observability_arguments(run)
    run.set_defaults(func=_cmd_run)
    _add_hotplug_commands(sub)
    _add_demo_and_stats_commands(sub)
    return parser


def _add_run_observability_arguments(run) -> None:
    """run --control PATH, --metrics HOST:PORT (xenblk_vhost/observability/endpoints.py)."""
    from .observability.endpoints import add_run_arguments

    add_run_arguments(run)


def _add_demo_and_stats_commands(sub) -> None:
    """`demo` (xenblk_vhost/demo/) and `stats` (xenblk_vhost/observability/)."""
    from .demo import command as demo_command
    from .observability import stats_command

    demo_command.add_parser(sub)
    stats_command.add_parser(sub)


def _add_hotplug_commands(sub) -> None:
    """`hotplug add|remove` (what libxl runs, through the shim) and `install-hotplug` (the shim)."""
    from .hotplug import install, script

    hotplug = sub.add_parser(
        "hotplug", help="libxl's hotplug script for our disks (run by libxl with XENBUS_PATH set)",
        description=script.build_parser().description)
    script.add_arguments(hotplug)
    hotplug.set_defaults(func=lambda args: script.run_from_args(args))
    inst = sub.add_parser(
        "install-hotplug", help="install the hotplug script as /etc/xen/scripts/block-xenblk-vhost",
        description="Write the shim libxl runs for disks whose xl line says script=block-xenblk-vhost, "
        "and print those xl disk lines.")
    install.add_arguments(inst)
    inst.set_defaults(func=install.run_from_args)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .device_model.qemu_args import is_qemu_invocation

    if is_qemu_invocation(argv):
        from .device_model import run

        return run.main(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
