"""The PV device-model route: xenblk-vhost exec'd by libxl in QEMU's place.

With `device_model_override = "/usr/bin/xenblk-vhost"` and qdisk disks
(`backendtype=qdisk`), libxl (tools/libs/light/libxl_dm.c, 4.17) starts the
override as the PV guest's device model with QEMU's arguments:

    -xen-domid N -no-shutdown
    -chardev socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-N,server=on,wait=off
    -mon chardev=libxl-cmd,mode=control
    -chardev socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-N,server=on,wait=off
    -mon chardev=libxenstat-cmd,mode=control
    -nodefaults -no-user-config -xen-attach -name NAME -vnc none -display none -nographic
    -machine xenpv [device_model_args_pv ...] -m MEM

(with dm_restrict it pre-opens the QMP socket and passes `fd=F` plus -S
instead of `path=`), then:
  * waits up to 60 s for /local/domain/0/device-model/N/state = "running"
    (with -S: asks QMP `query-status` for "prelaunch" and later sends `cont`);
  * connects to the QMP socket, reads the greeting (it records the QEMU
    version), sends `qmp_capabilities`, then `query-chardev` (and
    `query-vnc` if VNC is on); every message ends with "\\r\\n", and every
    command opens a new connection;
  * on destroy sends SIGHUP to the pid in /local/domain/N/image/device-model-pid
    (written by libxl) and cleans the QMP socket and device-model/N up itself.

This module is that device model for block devices only: it serves the
domain's backend/qdisk devices (the same Service and Device as the phy
route, restricted to kind qdisk and this domid) and answers QMP as far as
libxl asks. It exits, releasing every device, on SIGHUP/SIGTERM/SIGINT, on
QMP `quit`, or when the domain's xenstore dir disappears.

Our own options ride along in `device_model_args_pv`:

    device_model_args_pv = [ "--config=/etc/xenblk-vhost/web1.yaml" ]

(repeatable; without one, /etc/xenblk-vhost/<NAME>.yaml), and for tests
`--xenstore PATH` and `--sim SOCKET`. Anything else QEMU would take is
accepted and ignored. An HVM device model (machine xenfv/pc) is refused:
there is no emulated disk here for a firmware to boot from.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket as stdlib_socket
import sys
from dataclasses import dataclass, field

import trio

from .. import __version__
from ..config import ConfigError, DomainConfig, load_configs
from ..xen.interfaces import XenStoreError
from .service import Service, own_domid

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = "/etc/xenblk-vhost"
# What we claim to be: libxl only compares versions for HVM cd-rom changes
# (>= 2.8); Debian 12's QEMU is 7.2.
QEMU_VERSION = {"major": 7, "minor": 2, "micro": 0}
MAX_QMP_BUFFER = 1 << 20
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2

# QEMU options that take a value (so the value is not read as an option).
_OPTIONS_WITH_VALUE = {
    "-xen-domid", "-chardev", "-mon", "-name", "-vnc", "-display", "-machine", "-M", "-m", "-monitor",
    "-serial", "-parallel", "-pidfile", "-device", "-drive", "-smp", "-vga", "-boot", "-k", "-incoming",
    "-global", "-spice", "-usbdevice", "-net", "-netdev", "-runas", "-run-with", "-sandbox", "-object",
    "-cpu", "-accel", "-fw_cfg", "-xen-domid-restrict-off", "-trace", "-D", "-d", "-loadvm", "-option-rom",
    "-append", "-kernel", "-initrd", "-bios",
}


def is_qemu_invocation(argv: list[str]) -> bool:
    """libxl execs the device model with -xen-domid; nothing else does."""
    return "-xen-domid" in argv


class QemuArgsError(ValueError):
    pass


@dataclass(frozen=True)
class QemuArgs:
    domid: int
    name: str | None = None
    qmp_path: str | None = None  # -chardev socket,id=libxl-cmd,path=...
    qmp_fd: int | None = None  # -chardev socket,id=libxl-cmd,fd=...
    paused: bool = False  # -S: "prelaunch" until QMP cont
    machine: str = "xenpv"
    configs: tuple[str, ...] = ()
    xenstore: str | None = None
    sim: str | None = None
    ignored: tuple[str, ...] = field(default=(), compare=False)

    @property
    def probe_only(self) -> bool:
        """libxl's command-line probe (-machine none): QMP only, no devices."""
        return self.machine.split(",")[0] == "none"


def _chardev_options(value: str) -> dict[str, str]:
    backend, _, rest = value.partition(",")
    opts = {"backend": backend}
    for item in rest.split(","):
        key, sep, val = item.partition("=")
        if key:
            opts[key] = val if sep else "on"
    return opts


def parse_qemu_args(argv: list[str]) -> QemuArgs:
    """The QEMU arguments libxl gives a device model, plus our own long options."""
    domid = name = qmp_path = qmp_fd = xenstore = sim = None
    machine = "xenpv"
    paused = False
    configs: list[str] = []
    ignored: list[str] = []
    i = 0

    def value_of(opt: str) -> str:
        nonlocal i
        if i + 1 >= len(argv):
            raise QemuArgsError(f"{opt} needs a value")
        i += 1
        return argv[i]

    while i < len(argv):
        arg = argv[i]
        long_opt, eq, inline = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if long_opt in ("--config", "--xenstore", "--sim"):
            val = inline if eq else value_of(long_opt)
            if long_opt == "--config":
                configs.append(val)
            elif long_opt == "--xenstore":
                xenstore = val
            else:
                sim = val
        elif arg == "-xen-domid":
            text = value_of(arg)
            if not text.isdigit():
                raise QemuArgsError(f"-xen-domid {text!r} is not a domain id")
            domid = int(text)
        elif arg == "-name":
            name = value_of(arg).split(",")[0]  # "-name guest=NAME,..." is QEMU's long form
            if name.startswith("guest="):
                name = name[len("guest="):]
        elif arg in ("-machine", "-M"):
            machine = value_of(arg)
        elif arg == "-S":
            paused = True
        elif arg == "-chardev":
            opts = _chardev_options(value_of(arg))
            if opts.get("id") == "libxl-cmd" and opts["backend"] == "socket":
                if "fd" in opts:
                    qmp_fd = int(opts["fd"])
                elif "path" in opts:
                    qmp_path = opts["path"]
        elif arg in _OPTIONS_WITH_VALUE:
            ignored += [arg, value_of(arg)]
        else:
            ignored.append(arg)
        i += 1
    if domid is None:
        raise QemuArgsError("no -xen-domid")
    return QemuArgs(domid=domid, name=name, qmp_path=qmp_path, qmp_fd=qmp_fd, paused=paused, machine=machine,
                    configs=tuple(configs), xenstore=xenstore, sim=sim, ignored=tuple(ignored))


# ---------------------------------------------------------------------- QMP


class DeviceModelState:
    """What QMP reports and changes: the run state, and when to quit."""

    def __init__(self, paused: bool) -> None:
        self.status = "prelaunch" if paused else "running"
        self.quit = trio.Event()
        self.running = trio.Event()
        if not paused:
            self.running.set()

    def cont(self) -> None:
        self.status = "running"
        self.running.set()


def qmp_greeting() -> dict:
    return {"QMP": {"version": {"qemu": dict(QEMU_VERSION), "package": f" (xenblk-vhost {__version__})"},
                    "capabilities": []}}


def qmp_answer(command: dict, negotiated: bool, state: DeviceModelState) -> tuple[dict, bool]:
    """The reply to one QMP command, and whether capabilities are negotiated after it."""
    execute = command.get("execute")
    reply: dict
    if not isinstance(execute, str):
        reply = {"error": {"class": "GenericError", "desc": "QMP input must be a command ('execute' missing)"}}
    elif execute == "qmp_capabilities":
        if negotiated:
            reply = {"error": {"class": "CommandNotFound",
                               "desc": "Capabilities negotiation is already complete, command ignored"}}
        else:
            reply, negotiated = {"return": {}}, True
    elif not negotiated:
        reply = {"error": {"class": "CommandNotFound",
                           "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    elif execute == "query-chardev":
        reply = {"return": []}  # no serial ptys: libxl then writes no serial/<n>/tty
    elif execute == "query-status":
        reply = {"return": {"status": state.status, "singlestep": False, "running": state.status == "running"}}
    elif execute == "cont":
        state.cont()
        reply = {"return": {}}
    elif execute == "stop":
        reply = {"return": {}}  # nothing to pause: the rings are the guest's, not ours
    elif execute == "query-vnc":
        reply = {"return": {"enabled": False}}
    elif execute == "query-version":
        reply = {"return": qmp_greeting()["QMP"]["version"]}
    elif execute == "query-command-line-options":
        reply = {"return": []}
    elif execute == "quit":
        state.quit.set()
        reply = {"return": {}}
    else:
        reply = {"error": {"class": "CommandNotFound", "desc": f"The command {execute} has not been found"}}
    if "id" in command:
        reply["id"] = command["id"]
    return reply, negotiated


async def _send(stream: trio.SocketStream, obj: dict) -> None:
    await stream.send_all(json.dumps(obj).encode() + b"\r\n")


def split_json_stream(buf: str) -> tuple[list[str | None], str]:
    """Complete top-level JSON texts in buf, and the incomplete rest.

    As QEMU's json-streamer: track brace/bracket nesting (outside strings) and
    cut where it returns to zero; a character outside any object or array is
    a bad token, reported as None (one per run of them) so the caller answers
    a parse error and goes on.
    """
    texts: list[str | None] = []
    depth = 0
    in_string = escaped = False
    start = 0
    i = 0
    while i < len(buf):
        ch = buf[i]
        if depth == 0:
            if ch in "{[":
                depth, start = 1, i
            elif not ch.isspace():
                while i + 1 < len(buf) and not buf[i + 1].isspace() and buf[i + 1] not in "{[":
                    i += 1
                texts.append(None)
            i += 1
            continue
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                texts.append(buf[start:i + 1])
        i += 1
    return texts, (buf[start:] if depth else "")


async def serve_qmp_connection(stream: trio.abc.Stream, state: DeviceModelState) -> None:
    """One QMP client: greeting, then one reply per command, until it hangs up."""
    buf = ""
    negotiated = False
    parse_error = {"error": {"class": "GenericError", "desc": "JSON parse error"}}
    async with stream:
        try:
            await _send(stream, qmp_greeting())
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                texts, buf = split_json_stream(buf + data.decode("utf-8", "replace"))
                for text in texts:
                    try:
                        command = json.loads(text) if text is not None else None
                    except json.JSONDecodeError:
                        command = None
                    if command is None:
                        await _send(stream, parse_error)
                        continue
                    if not isinstance(command, dict):
                        await _send(stream, {"error": {"class": "GenericError",
                                                       "desc": "QMP input must be a JSON object"}})
                        continue
                    reply, negotiated = qmp_answer(command, negotiated, state)
                    log.debug("QMP %s -> %s", command.get("execute"), reply)
                    await _send(stream, reply)
                if len(buf) > MAX_QMP_BUFFER:
                    log.warning("QMP client sent more than %d bytes without a complete command; closing",
                                MAX_QMP_BUFFER)
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def serve_qmp(listener: trio.SocketListener, state: DeviceModelState, *,
                    task_status=trio.TASK_STATUS_IGNORED) -> None:
    async with trio.open_nursery() as nursery:
        task_status.started()
        while True:
            stream = await listener.accept()
            nursery.start_soon(serve_qmp_connection, stream, state)


def open_qmp_listener(args: QemuArgs) -> tuple[trio.SocketListener | None, str | None]:
    """The libxl-cmd monitor socket: libxl's pre-opened fd, or our own at its path
    (a stale file from a previous run is replaced, as QEMU does). None when
    there is no such monitor: `xl devd` starts a driver domain's qdisk backend
    with `-monitor /dev/null` and only waits for "running"."""
    if args.qmp_fd is not None:
        sock = stdlib_socket.socket(fileno=args.qmp_fd)
        sock.setblocking(False)
        return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), None
    if args.qmp_path is None:
        return None, None
    try:
        os.unlink(args.qmp_path)
    except FileNotFoundError:
        pass
    sock = stdlib_socket.socket(stdlib_socket.AF_UNIX, stdlib_socket.SOCK_STREAM)
    try:
        sock.bind(args.qmp_path)
        sock.listen(8)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(trio.socket.from_stdlib_socket(sock)), args.qmp_path


# ---------------------------------------------------------------------- the device model


def configs_for(args: QemuArgs) -> list[DomainConfig]:
    """The configuration files named (or NAME.yaml), restricted to this domain."""
    paths = list(args.configs) or ([f"{DEFAULT_CONFIG_DIR}/{args.name}.yaml"] if args.name else [])
    if not paths:
        raise QemuArgsError("no --config given and no -name to find one by")
    mine = [c for c in load_configs(paths) if c.matches(args.domid, args.name)]
    if not mine:
        raise QemuArgsError(f"none of {', '.join(paths)} configures domain {args.name!r} (domid {args.domid})")
    return mine


async def _wait_domain_gone(xs, domid: int) -> None:
    """The domain's dir removed (destroyed): its `name` node goes with it."""
    path = f"/local/domain/{domid}/name"
    async with xs.watch(path) as events:
        async for _ in events:
            if not await xs.exists(path):
                log.info("domain %d is gone", domid)
                return


async def run_device_model(args: QemuArgs, configs: list[DomainConfig], platform, xs, *,
                           task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve QMP and the domain's qdisk devices until told to stop."""
    state = DeviceModelState(args.paused)
    listener, created = open_qmp_listener(args)
    try:
        async with trio.open_nursery() as nursery:
            if listener is not None:
                await nursery.start(serve_qmp, listener, state)
            if not args.probe_only:
                service = Service(xs, platform, configs, kinds=("qdisk",), only_domid=args.domid)
                await nursery.start(service.run)
                nursery.start_soon(_announce_running, xs, args.domid, state)

                async def stop_when_domain_gone() -> None:
                    await _wait_domain_gone(xs, args.domid)
                    state.quit.set()

                nursery.start_soon(stop_when_domain_gone)
            task_status.started()
            await state.quit.wait()
            nursery.cancel_scope.cancel()
    finally:
        if listener is not None:
            await listener.aclose()
        if created:
            try:
                os.unlink(created)
            except FileNotFoundError:
                pass


async def _announce_running(xs, domid: int, state: DeviceModelState) -> None:
    """device-model/<domid>/state = running, what libxl's spawn waits for
    (QEMU writes it when its run state becomes running: at once, or at cont)."""
    await state.running.wait()
    home = f"/local/domain/{await own_domid(xs)}"
    await xs.write(f"{home}/device-model/{domid}/state", "running")
    log.info("device model for domain %d running", domid)


async def _main(args: QemuArgs, configs: list[DomainConfig]) -> int:
    from ..xen.xenstore import open_xenstore

    if args.sim:
        from ..sim import open_sim

        platform = open_sim(args.sim)
    else:
        from ..xen import open_real

        platform = open_real()
    with platform:
        async with open_xenstore(args.xenstore) as xs:
            with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
                async with trio.open_nursery() as nursery:

                    async def on_signal() -> None:
                        async for sig in signals:
                            # libxl's destroy sends SIGHUP: QEMU exits on it, so do we.
                            log.info("%s: releasing the devices and exiting", signal.Signals(sig).name)
                            nursery.cancel_scope.cancel()
                            return

                    nursery.start_soon(on_signal)
                    await run_device_model(args, configs, platform, xs)  # until quit or domain gone
                    nursery.cancel_scope.cancel()
    return EXIT_OK


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args = parse_qemu_args(argv)
        if args.machine.split(",")[0] not in ("xenpv", "none"):
            raise QemuArgsError(f"machine {args.machine!r}: xenblk-vhost can only be the device model of "
                                "PV/PVH guests (qdisk disks); HVM needs a real QEMU")
        configs = [] if args.probe_only else configs_for(args)
    except ConfigError as e:
        for problem in e.problems:
            print(problem, file=sys.stderr)
        return EXIT_USAGE
    except QemuArgsError as e:
        print(f"xenblk-vhost (device model): {e}", file=sys.stderr)
        return EXIT_USAGE
    log.info("xenblk-vhost %s as the device model of domain %d (%s)", __version__, args.domid, args.name)
    if args.ignored:
        log.debug("ignoring QEMU arguments: %s", " ".join(args.ignored))
    try:
        return trio.run(_main, args, configs)
    except (OSError, XenStoreError) as e:
        log.error("device model for domain %d failed: %s", args.domid, e)
        return EXIT_FAILURE


__all__ = ["QemuArgs", "QemuArgsError", "parse_qemu_args", "is_qemu_invocation", "qmp_answer", "qmp_greeting",
           "run_device_model", "main", "DeviceModelState"]
