"""`xenblk-vhost ctl`: a running daemon's disks, from its control socket (tap-ctl's place).

    xenblk-vhost ctl list                       every daemon's configured domains and their disks
    xenblk-vhost ctl status web1[/xvda]         one domain or disk in detail (connection, offer, counters)
    xenblk-vhost ctl pause web1[/xvda]          quiesce for a snapshot: returns once nothing is in flight
    xenblk-vhost ctl resume web1[/xvda]
    xenblk-vhost ctl detach web1/xvdb           the backend closes the disk and releases its storage
    xenblk-vhost ctl reload                     the daemon re-reads its files: what changed, or why not
    xenblk-vhost ctl stats [web1]               the counters table (also `xenblk-vhost stats`)
    xenblk-vhost ctl upgrade [web1]             hand the disks over to a fresh exec of the daemon
                                                (also `xenblk-vhost upgrade`): the installed code
    ... --json                                  the daemon's answer as JSON instead

One subcommand of the main command rather than seven: these all talk to a
daemon that is already running (the others start something), they share
how the daemon is found, and `pause`/`detach` at the top level would read
as acting on the daemon itself.

Which daemon: --control PATH, else every control*.sock in the default
directory (/run/xenblk-vhost as root: the systemd instances'
control-<instance>.sock and the default control.sock) as the hotplug script
looks. `list` and `stats` ask them all; the others need one daemon: the
only one running, or the one whose files configure the domain named.

Exit status: 0 done; 1 the daemon could not be reached or refused (not
attached, did not drain in time...); 2 bad arguments, or a reload refused
because the files do not validate (the lines follow, as `check` prints them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable

from ..control_protocol import ControlError, ControlRefused, control_sockets, default_control_dir, request_control
from ..exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from .stats_command import render_table, vbd_prefix

# How long the client waits beyond the daemon's own timeout for pause/detach.
REPLY_MARGIN = 5.0
# upgrade: the new daemon's start-up (daemon/handover.py READY_TIMEOUT) and the drain, then its
# control socket (bound once the old daemon has exited).
UPGRADE_REPLY_TIMEOUT = 420.0
UPGRADE_ANSWER_TIMEOUT = 60.0


class _Usage(Exception):
    """Which daemon to ask cannot be decided from the arguments."""


def add_control_arguments(p: argparse.ArgumentParser, *, nested: bool = False) -> None:
    """--control and --json; `nested` (a ctl command's): given after the command's name they win,
    given before it (ctl --control X list) they stay (argparse: SUPPRESS, no default of its own)."""
    help_control = ("the daemon's control socket (default: every control*.sock in /run/xenblk-vhost as root, "
                    "$XDG_RUNTIME_DIR/xenblk-vhost otherwise: the only daemon, or the one configuring the domain "
                    "named)")
    help_json = "print the daemon's answer as JSON"
    if nested:
        p.add_argument("--control", metavar="PATH", default=argparse.SUPPRESS, help=help_control)
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=help_json)
    else:
        p.add_argument("--control", metavar="PATH", default=None, help=help_control)
        p.add_argument("--json", action="store_true", help=help_json)


def add_parser(sub, common: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """`ctl` and its commands; `common`: options every command of the main parser takes (logging)."""
    ctl = sub.add_parser(
        "ctl", help="ask or tell a running daemon: list, status, pause, resume, detach, reload, stats",
        description="Talk to a running `xenblk-vhost run` over its control socket. DOMAIN is a domain as its "
        "YAML file names it (or its domid); DOMAIN/VDEV one of its disks (xvda, 51712).")
    add_control_arguments(ctl)
    cmds = ctl.add_subparsers(dest="ctl_command", metavar="COMMAND")

    def command(name: str, help: str, description: str, *, target: str | None = None,
                func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
        p = cmds.add_parser(name, help=help, description=description, parents=[common] if common else [])
        add_control_arguments(p, nested=True)
        if target == "optional":
            p.add_argument("target", nargs="?", metavar="DOMAIN", help="only this domain (and find its daemon)")
        elif target:
            p.add_argument("target", metavar=target)
        p.set_defaults(ctl_func=func)
        return p

    command("list", "configured domains, present or not, and each disk's state",
            "Every configured domain of every daemon (or the one --control names), whether it runs now and its "
            "domid, and each of its disks: xenbus state, rings, data path, paused, storage, last error.",
            func=_list)
    command("status", "one domain or disk in detail",
            "A domain's disks (or one disk) in detail: what the frontend connected with (protocol, rings, ring "
            "order, event channels, persistent grants), what the vbd offers and its per-ring counters.",
            target="DOMAIN[/VDEV]", func=_status)
    p = command("pause", "quiesce a domain's disks (or one) for a snapshot",
                "Stop taking requests from the guest and wait until none is in flight, on every attached disk "
                "of DOMAIN (or DOMAIN/VDEV): when it returns, the storage holds everything the guest was told "
                "is written and receives nothing more until `resume`. The guest's I/O waits meanwhile (no "
                "error). All or nothing: if a disk does not drain within --timeout, every one is resumed and "
                "the command fails. A pause lasts until resume (across the guest reconnecting), not across a "
                "restart of the daemon.", target="DOMAIN[/VDEV]", func=_pause)
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long in-flight requests may take to finish (default 30)")
    command("resume", "take requests again after pause", "Undo `pause`: the disks serve the requests the guest "
            "queued meanwhile, then go on.", target="DOMAIN[/VDEV]", func=_resume)
    p = command("detach", "close a disk from the backend's side and release its storage",
                "What `xl block-detach` makes the backend do, started from ours: the disk goes Closing, the "
                "guest's frontend closes it (its I/O fails from then on: unmount it first), the rings are "
                "drained and unmapped, the storage is released, the backend goes Closed. The toolstack's "
                "entries stay until `xl block-detach` or the domain's end removes them; a frontend that "
                "starts over is served again.", target="DOMAIN/VDEV", func=_detach)
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="how long the guest may take to let go (default 10, libxl's)")
    command("reload", "re-read the daemon's files and apply them",
            "Re-read and validate the daemon's YAML files (as `check` does, storage included) and apply them: "
            "new domains and disks are served as their devices appear; a disk a guest has attached keeps "
            "what it connected with until its next connect. Prints what changed; exit 2 with `check`'s lines "
            "if the files do not validate (the running configuration is kept). systemd's ExecReload.",
            target="optional", func=_reload)
    command("upgrade", "hand the disks over to a fresh exec of the daemon (the installed code)",
            UPGRADE_DESCRIPTION, target="optional", func=_upgrade)
    command("stats", "per-vbd, per-ring counters (blkback's names)",
            "The counters of every vbd (or DOMAIN's): requests by operation (rd_req, wr_req, f_req = flushes "
            "and barriers, ds_req = discards), oo_req (times requests waited for a free slot), sectors read and "
            "written, requests in flight, persistent grants and error responses. Counters start at zero when "
            "the frontend connects.", target="optional", func=_stats)
    ctl.set_defaults(func=lambda args: main(args, ctl))
    return ctl


UPGRADE_DESCRIPTION = (
    "Start a new daemon from the code installed now, with the running one's command line; once it has "
    "started (imports, files checked, /dev/xen and xenstore), the running one stops taking requests, answers "
    "what is in flight, releases the rings and the storage, and the new one takes every disk over: the guests "
    "stay Connected and their I/O waits only for that drain and the takeover, not for a start-up. Under "
    "systemd the new process becomes the unit's main process (MAINPID=). If the new daemon cannot start (a "
    "file that does not validate, a broken install), it says why and the running one serves on (exit 1). "
    "Prints both process ids and the drain; returns once the new daemon answers on the control socket.")


def add_upgrade_alias(sub) -> argparse.ArgumentParser:
    """`xenblk-vhost upgrade`: the operator's word for `ctl upgrade`."""
    p = sub.add_parser("upgrade", help="hand a running daemon's disks over to a fresh exec of it (= ctl upgrade)",
                       description=UPGRADE_DESCRIPTION)
    add_control_arguments(p)
    p.add_argument("target", nargs="?", metavar="DOMAIN", help="the daemon that configures this domain")
    p.set_defaults(func=lambda args: run(args, _upgrade))
    return p


def add_stats_alias(sub) -> argparse.ArgumentParser:
    """`xenblk-vhost stats`: what `ctl stats` prints (kept from before `ctl`)."""
    p = sub.add_parser("stats", help="print a running daemon's per-vbd, per-ring counters (= ctl stats)",
                       description="The same as `xenblk-vhost ctl stats`.")
    add_control_arguments(p)
    p.add_argument("target", nargs="?", metavar="DOMAIN", help="only this domain (and find its daemon)")
    p.set_defaults(func=lambda args: run(args, _stats))
    return p


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if getattr(args, "ctl_func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    return run(args, args.ctl_func)


def run(args: argparse.Namespace, func: Callable[[argparse.Namespace], int]) -> int:
    try:
        return func(args)
    except ControlRefused as e:
        print(f"xenblk-vhost ctl: {e.reply.get('error', 'refused')}", file=sys.stderr)
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return e.exit_status if e.exit_status is not None else EXIT_FAILURE
    except _Usage as e:
        print(f"xenblk-vhost ctl: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ControlError as e:
        print(f"xenblk-vhost ctl: {e}", file=sys.stderr)
        return EXIT_FAILURE


# ---------------------------------------------------------------------- which daemon

def _candidates(args: argparse.Namespace) -> list[str]:
    if args.control:
        return [args.control]
    directory = default_control_dir()
    if directory is None:
        raise _Usage("no default control socket directory for a non-root user without XDG_RUNTIME_DIR; "
                     "pass --control PATH")
    found = control_sockets(directory)
    if not found:
        raise ControlError(f"no daemon answers in {directory} (no control*.sock there): is xenblk-vhost running? "
                           f"(systemctl status 'xenblk-vhost@*')")
    return found


def _ask_all(args: argparse.Namespace, command: str) -> list[tuple[str, dict]]:
    """(socket, reply) of every daemon found; silent ones are named on stderr (an error if none answers)."""
    answers, silent = [], []
    for path in _candidates(args):
        try:
            answers.append((path, request_control(path, command)))
        except ControlRefused:
            raise
        except ControlError as e:
            silent.append(str(e))
    for reason in silent:
        print(f"xenblk-vhost ctl: skipped: {reason}", file=sys.stderr)
    if not answers:
        raise ControlError(silent[0] if len(silent) == 1 else "no daemon answered")
    return answers


def _domain_of(target: str) -> str:
    return target.rpartition("/")[0] if "/" in target else target


def _configures(listing: dict, domain: str) -> bool:
    return any(domain in (d.get("domain"), str(d.get("domid"))) for d in listing.get("domains", []))


def _one_daemon(args: argparse.Namespace, target: str | None) -> str:
    """The socket of the one daemon to ask: --control, the only one, or the one configuring target's domain."""
    found = _candidates(args)
    if len(found) == 1:
        return found[0]
    answering = _ask_all(args, "list")  # a dead daemon's socket left behind is no candidate
    live = [path for path, _ in answering]
    if target is None:
        if len(live) == 1:
            return live[0]
        raise _Usage(f"{len(live)} daemons answer here ({', '.join(live)}): name a domain or give --control PATH")
    domain = _domain_of(target)
    owners = [path for path, listing in answering if _configures(listing, domain)]
    if len(owners) != 1:
        which = "none of" if not owners else "several of"
        raise ControlError(f"{which} the daemons here ({', '.join(live)}) configure {domain!r}"
                           + ("" if owners else ": see `xenblk-vhost ctl list`"))
    return owners[0]


def _print_json(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


# ---------------------------------------------------------------------- commands

def _when(at: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) if at else "?"


def _list(args: argparse.Namespace) -> int:
    answers = _ask_all(args, "list")
    if args.json:
        _print_json({"daemons": [{"control": path, **reply} for path, reply in answers]})
        return EXIT_OK
    print(render_list(answers))
    return EXIT_OK


_LIST_COLUMNS = ("DOMAIN", "DOMID", "DISK", "STATE", "RINGS", "DATA", "STORAGE", "LAST ERROR")


def render_list(answers: list[tuple[str, dict]]) -> str:
    out = []
    for path, reply in answers:
        # Which daemon, always: a list is read to find where a domain is served.
        out.append(f"# {path}: pid {reply.get('pid')}, xenblk-vhost {reply.get('version')}, "
                   f"up {_duration(reply.get('uptime_s'))}")
        rows = [list(_LIST_COLUMNS)]
        for dom in reply.get("domains", []):
            domid = str(dom["domid"]) if dom.get("present") else "-"
            if not dom.get("disks"):
                rows.append([dom["domain"], domid, "-", "no disks", "-", "-", "-", "-"])
            for disk in dom.get("disks", []):
                state = disk["state"] if dom.get("present") or disk.get("device") else "domain not running"
                if disk.get("paused"):
                    state += ", paused"
                link = disk.get("storage")
                if link and link.get("state") != "connected":
                    state += f", storage {link['state']}"
                if not disk.get("configured"):
                    state += ", not configured"
                storage = f"{disk['driver']} {disk['path']}" if disk.get("driver") else "-"
                error = disk.get("last_error")
                rows.append([dom["domain"], domid, disk["vdev"], state, str(disk.get("rings") or "-"),
                             disk.get("data_path") or "-", storage,
                             f"{_when(error.get('at'))} {error.get('message')}" if error else "-"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(_LIST_COLUMNS) - 1)]
        for r in rows:
            out.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths)) + "  " + r[-1])
        if len(rows) == 1:
            out.append("(no domain configured)")
    return "\n".join(out)


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "?"
    s = int(seconds)
    return f"{s // 86400}d{s % 86400 // 3600}h" if s >= 86400 else f"{s // 3600}h{s % 3600 // 60:02d}m" \
        if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def _status(args: argparse.Namespace) -> int:
    path = _one_daemon(args, args.target)
    reply = request_control(path, "status", fields={"target": args.target})
    if args.json:
        _print_json({"control": path, **reply})
        return EXIT_OK
    print(render_status(reply["domain"]))
    return EXIT_OK


def render_storage_link(link: dict) -> str:
    """The storage link (backend/datapath/storage_link.py) in one line."""
    state = link.get("state")
    if state == "connected":
        line = "storage link: connected"
    else:
        held = "requests held" if state == "reconnecting" else "requests answered ERROR"
        line = (f"storage link: {str(state).upper()} for {link.get('away_s') or 0:.1f} s ({held}; "
                f"{link.get('attempts', 0)} failed attempt(s), last: {link.get('last_error')})")
    if link.get("losses"):
        line += (f"; lost {link['losses']} time(s), reconnected {link.get('reconnects', 0)}, "
                 f"{link.get('retried', 0)} request(s) run again")
    return line


def render_status(dom: dict) -> str:
    running = f"running as domid {dom['domid']}" if dom.get("present") else "not running"
    out = [f"{dom['domain']}: {running} (configured in {dom['config']})"]
    for disk in dom.get("disks", []):
        head = f"  {disk['vdev']}: {disk['state']}"
        if disk.get("device"):
            head += f" ({disk['device']})"
        if disk.get("paused"):
            head += ", PAUSED"
        out.append(head)
        if disk.get("driver"):
            out.append(f"    storage: {disk['driver']} {disk['path']}")
        link = disk.get("storage")
        if link:
            out.append("    " + render_storage_link(link))
        elif not disk.get("configured"):
            out.append("    storage: none (this vdev is not in the file: the device was refused)")
        f = disk.get("features")
        if f:
            ro = ", read-only" if f["read_only"] else ""
            out.append(f"    offers: {f['sectors']} sectors of {f['sector_size']} B{ro}, "
                       f"{f['max_queues']} queues, ring order {f['max_ring_page_order']}, "
                       f"{f['max_indirect_segments']} indirect segments, {f['data_path']} data path"
                       f"{', persistent grants' if f['persistent'] else ''}{', discard' if f['discard'] else ''}")
        c = disk.get("connection")
        if c:
            rings = ", ".join(f"#{r['index']} order {r['order']} port {r['event_channel']}" for r in c["rings"])
            out.append(f"    connected: protocol {c['protocol']}, {len(c['rings'])} ring(s): {rings}"
                       f"{', persistent grants' if c['persistent_grants'] else ''}")
        stats = disk.get("stats")
        if stats and stats.get("rings"):
            snap = {"vbds": [{"domain": dom["domain"], "vdev": disk["vdev"], "device": disk["device"],
                              "state": "", "rings": stats["rings"], "total": stats["total"]}]}
            out.extend("    " + line.removeprefix(vbd_prefix(snap["vbds"][0]))
                       for line in render_table(snap).splitlines()[1:])
        error = disk.get("last_error")
        if error:
            out.append(f"    last error: {_when(error.get('at'))} {error.get('message')}")
    return "\n".join(out)


def _act(args: argparse.Namespace, command: str, verb: Callable[[dict], str], timeout: float | None = None) -> int:
    """pause, resume, detach: one daemon, one line per disk."""
    fields: dict = {"target": args.target}
    wait = None
    if timeout is not None:
        if not 0 < timeout <= 3600:
            raise _Usage("--timeout must be a number of seconds between 0 and 3600")
        fields["timeout"] = timeout
        wait = timeout + REPLY_MARGIN
    path = _one_daemon(args, args.target)
    reply = request_control(path, command, fields=fields, **({"timeout": wait} if wait else {}))
    if args.json:
        _print_json({"control": path, **reply})
        return EXIT_OK
    for disk in reply.get("disks", []):
        print(f"{reply['domain']}/{disk['vdev']}: {verb(disk)}")
    return EXIT_OK


def _pause(args: argparse.Namespace) -> int:
    return _act(args, "pause", lambda d: f"paused (nothing in flight after {d['drained_after_s']:.3f} s)",
                args.timeout)


def _resume(args: argparse.Namespace) -> int:
    return _act(args, "resume", lambda d: "resumed" if d["was_paused"] else "resumed (was not paused)")


def _detach(args: argparse.Namespace) -> int:
    return _act(args, "detach", lambda d: f"detached: {d['state']} after {d['seconds']:.3f} s, storage released",
                args.timeout)


def _reload(args: argparse.Namespace) -> int:
    path = _one_daemon(args, args.target)
    reply = request_control(path, "reload", timeout=60.0)  # validating storage may take a while
    if args.json:
        _print_json({"control": path, **reply})
        return EXIT_OK
    changes = reply.get("changes", [])
    print(f"reloaded {path}: " + (f"{len(changes)} change(s)" if changes else "nothing changed"))
    for line in changes:
        print(f"  {line}")
    return EXIT_OK


def _upgrade(args: argparse.Namespace) -> int:
    path = _one_daemon(args, args.target)
    reply = request_control(path, "upgrade", timeout=UPGRADE_REPLY_TIMEOUT)
    new = reply.get("successor")
    # The new daemon binds the control socket once the old one has exited: wait for it to answer.
    deadline = time.monotonic() + UPGRADE_ANSWER_TIMEOUT
    answering = None
    while time.monotonic() < deadline:
        try:
            answering = request_control(path, "list").get("pid")
        except ControlError:
            answering = None
        if answering == new:
            break
        time.sleep(0.05)
    if args.json:
        _print_json({"control": path, **reply, "answering": answering})
    else:
        print(f"upgraded {path}: pid {reply.get('predecessor')} -> pid {new}; disks drained in "
              f"{reply.get('drain_s', 0) * 1000:.1f} ms")
        if reply.get("successor_startup"):
            print(f"  the new daemon before the hand-over: {reply['successor_startup']}")
    if answering != new:
        print(f"xenblk-vhost ctl: the new daemon (pid {new}) took the disks over but does not answer on {path} "
              f"after {UPGRADE_ANSWER_TIMEOUT:g} s (see its log)", file=sys.stderr)
        return EXIT_FAILURE
    return EXIT_OK


def _stats(args: argparse.Namespace) -> int:
    answers = [(path, request_control(path, "stats"))
               for path in ([_one_daemon(args, args.target)] if args.target else [])] or _ask_all(args, "stats")
    if args.target:
        domain = _domain_of(args.target)
        for _, snap in answers:
            snap["vbds"] = [v for v in snap.get("vbds", []) if domain in (v.get("domain"), str(v.get("domid")))]
    if args.json:
        _print_json({"daemons": [{"control": path, **snap} for path, snap in answers]})
        return EXIT_OK
    for path, snap in answers:
        if len(answers) > 1:
            print(f"# {path}")
        print(render_table(snap))
    return EXIT_OK
