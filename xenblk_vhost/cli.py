"""Command line entry point: `xenblk-vhost`.

    xenblk-vhost check CONFIG...      validate, exit 0 or 2 (--no-storage: not the storage paths)
    xenblk-vhost run CONFIG... [--xenstore PATH] [--sim SOCKET] [--control PATH] [--metrics HOST:PORT]
                                      serve (daemon/run.py)
    xenblk-vhost ctl list|status|pause|resume|detach|reload|stats   a running daemon (observability/ctl_command.py)
    xenblk-vhost stats                the counters table (= ctl stats)
    xenblk-vhost upgrade              hand a running daemon's disks over to a fresh exec of it (= ctl upgrade;
                                      daemon/handover.py)
    xenblk-vhost hotplug add|remove   libxl's hotplug script (xenblk_vhost/hotplug/)
    xenblk-vhost install-hotplug      write /etc/xen/scripts/block-xenblk-vhost
    xenblk-vhost demo [--seconds N] [--driver D] [--queues N] [--data-path P] [--json]   (demo/command.py)
    xenblk-vhost -xen-domid N ...     exec'd by libxl as a PV device model (device_model/)

Every command takes --log-level (debug, info, warning, error; any case) and
--log-json, before or after its name (daemon/logs.py decides where the
lines go: journald with fields and priorities, or stderr).
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .daemon import logs
from .exit_codes import EXIT_OK, EXIT_USAGE

COMMANDS = ("check", "run", "ctl", "stats", "upgrade", "demo", "hotplug", "install-hotplug")


def _cmd_check(args: argparse.Namespace) -> int:
    from .config import ConfigError
    from .daemon.preflight import load_checked

    try:
        configs = load_checked(args.config, check_storage=not args.no_storage)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    unchecked = " (storage not checked)" if args.no_storage else ""
    for cfg in configs:
        who = f"domain {cfg.name!r}" if cfg.name is not None else f"domid {cfg.domid}"
        disks = ", ".join(f"{d.name} ({d.driver} {d.path}{', ro' if d.readonly else ''})" for d in cfg.disks)
        print(f"{cfg.source}: ok: {who}: {disks}{unchecked}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from .daemon.run import run_command

    return run_command(args)


def _logging_options(default: str | None) -> argparse.ArgumentParser:
    """--log-level/--log-json, on the main parser (default set) and on every command (SUPPRESS: a
    value given after the command's name wins, one given before it stays)."""
    p = argparse.ArgumentParser(add_help=False)
    keep = argparse.SUPPRESS if default is None else None
    p.add_argument("--log-level", type=logs.parse_level, metavar="LEVEL",
                   default=keep if keep else default,
                   help="debug, info, warning or error, in any case (default info)")
    p.add_argument("--log-json", action="store_true", default=keep if keep else False,
                   help="log one JSON object per line on stderr (ts, level, priority, logger, message, "
                   "DOMAIN, VDEV...)")
    return p


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The command line; with `only`, just that command's part of it (main() builds the one it
    will use: `ctl`, run by hand and by systemd's ExecReload, then imports no trio, no YAML
    parser, no simulator; the man page and --help build them all)."""
    common = _logging_options(None)
    parser = argparse.ArgumentParser(
        prog="xenblk-vhost", parents=[_logging_options("info")],
        description=(
            "Userspace Xen block backend: serves guests' xen-blkfront rings "
            "from any libblkio driver (io_uring, nvme-io_uring, virtio-blk-vhost-user)."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, **kw) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[common], **kw)

    if only in (None, "check", "run"):
        _add_check_and_run(command)
    _add_operator_commands(sub, common, only)
    return parser


def _add_check_and_run(command) -> None:
    check = command(
        "check",
        help="validate configuration files and exit",
        description="Validate YAML domain files without starting anything, the storage included (each path "
        "exists and is what its driver opens; libblkio accepts the driver and every pass-through property, "
        "checked without connecting). Exit 0 if all are valid, 2 with one `FILE:LINE: key: reason` line per "
        "problem otherwise.",
    )
    check.add_argument("config", nargs="+", metavar="CONFIG", help="a domain's YAML file")
    check.add_argument("--no-storage", action="store_true",
                       help="check everything but the storage: do not require each disk's path (image, "
                       "block device, vhost-user socket) to exist yet, e.g. on another machine or before "
                       "the storage daemon has started (`run` always checks it)")
    check.set_defaults(func=_cmd_check)
    run = command(
        "run",
        help="serve the configured domains' disks",
        description="Validate the YAML files (exit 2 on a problem, as `check`), check /dev/xen and xenstored "
        "(exit 2 with one line and a hint if this is not a dom0 or driver domain, a module is not loaded or "
        "xenstored cannot be reached), then serve every configured domain's vbd (backendtype=phy) and vbd3 "
        "(backendtype=tap) disks until SIGTERM or SIGINT (exit 0; in-flight requests are answered first). "
        "SIGHUP or `xenblk-vhost ctl reload` reloads the files: a changed disk applies when its frontend next "
        "connects. Losing xenstored drains every disk and exits 1 (systemd starts a new daemon, which takes "
        "the disks over). Prints `ready` on stdout once serving; under systemd (Type=notify) sends READY=1, "
        "STATUS= lines and, with WatchdogSec=, WATCHDOG=1 from the event loop.",
    )
    run.add_argument("config", nargs="+", metavar="CONFIG", help="a domain's YAML file")
    run.add_argument("--xenstore", metavar="PATH",
                     help="xenstored socket or xenbus device (default: $XENSTORED_PATH, the usual sockets, "
                     "/dev/xen/xenbus)")
    run.add_argument("--sim", metavar="SOCKET", help="use the simulated hypervisor listening on SOCKET")
    run.add_argument("--journal-dir", metavar="DIR",
                     help="keep each ring's in-flight journal in DIR (default: $XENBLK_VHOST_JOURNAL_DIR or "
                     "/run/xenblk-vhost/journal; tmpfs): a daemon started after a crash takes the live rings over "
                     "from it, answering every request the guest issued exactly once")
    run.add_argument("--no-journal", action="store_true",
                     help="serve without the in-flight journal (a crash may then lose or repeat in-flight requests)")
    _add_run_observability_arguments(run)
    run.set_defaults(func=_cmd_run)


def _add_run_observability_arguments(run) -> None:
    """run --control PATH, --metrics HOST:PORT (xenblk_vhost/observability/endpoints.py)."""
    from .observability.endpoints import add_run_arguments

    add_run_arguments(run)


class _WithCommon:
    """A subparsers action whose add_parser gives every parser the common options."""

    def __init__(self, sub, common: argparse.ArgumentParser) -> None:
        self._sub = sub
        self._common = common

    def add_parser(self, name: str, **kw) -> argparse.ArgumentParser:
        kw["parents"] = [*kw.get("parents", []), self._common]
        return self._sub.add_parser(name, **kw)


def _add_operator_commands(sub, common: argparse.ArgumentParser, only: str | None = None) -> None:
    """`ctl` and `stats` (observability/), `demo` (demo/), `hotplug` and `install-hotplug` (hotplug/)."""
    sub_common = _WithCommon(sub, common)
    if only in (None, "ctl", "stats", "upgrade"):
        from .observability import ctl_command

        ctl_command.add_parser(sub_common, common)
        ctl_command.add_stats_alias(sub_common)
        ctl_command.add_upgrade_alias(sub_common)
    if only in (None, "demo"):
        from .demo import command as demo_command

        demo_command.add_parser(sub_common)
    if only not in (None, "hotplug", "install-hotplug"):
        return
    from .hotplug import install, script

    hotplug = sub_common.add_parser(
        "hotplug", help="libxl's hotplug script for our disks (run by libxl with XENBUS_PATH set)",
        description=script.build_parser().description)
    script.add_arguments(hotplug)
    hotplug.set_defaults(func=lambda args: script.run_from_args(args))
    inst = sub_common.add_parser(
        "install-hotplug", help="install the hotplug script as /etc/xen/scripts/block-xenblk-vhost",
        description="Write the shim libxl runs for disks whose xl line says script=block-xenblk-vhost, "
        "and print those xl disk lines.")
    install.add_arguments(inst)
    inst.set_defaults(func=install.run_from_args)


def _command_in(argv: list[str]) -> str | None:
    """The command argv names (after any --log-level/--log-json), else None: the whole parser."""
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in COMMANDS:
            return word
        if word == "--log-level":
            i += 2
        elif word.startswith("--log-level=") or word == "--log-json":
            i += 1
        else:
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from .device_model import is_qemu_invocation

    if is_qemu_invocation(argv):
        from .device_model import run

        return run.main(argv)
    parser = build_parser(_command_in(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    logs.configure(args.log_level, json_lines=args.log_json)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
