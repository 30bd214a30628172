"""The device model's process: QMP, the domain's qdisk devices (the same Service as the phy route), exit.

    main(argv)   what cli.main runs for a -xen-domid command line: exit status (exit_codes.py)

It serves the domain's backend/qdisk devices (Service restricted to kind
qdisk and this domid) and answers QMP as far as libxl asks; it exits,
releasing every device, on SIGHUP/SIGTERM/SIGINT, on QMP `quit`, or when
the domain's xenstore dir disappears.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from contextlib import AsyncExitStack

import trio

from .. import __version__
from ..backend.xenbus.service import Service, own_domid
from ..config import ConfigError, DomainConfig
from ..daemon import logs
from ..daemon.preflight import (
    StartupError,
    check_xenstore_argument,
    explain_xenstore_failure,
    load_checked,
    open_platform_explained,
)
from ..exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ..xen.interfaces import Platform, XenStore, XenStoreError
from ..xen.xenstore import open_xenstore
from .qemu_args import QemuArgs, QemuArgsError, parse_qemu_args
from .qmp import DeviceModelState, open_qmp_listener, serve_qmp

log = logging.getLogger(__name__)

DEFAULT_CONFIG_DIR = "/etc/xenblk-vhost"


def configs_for(args: QemuArgs) -> list[DomainConfig]:
    """The configuration files named (or NAME.yaml), restricted to this domain."""
    paths = list(args.configs) or ([f"{DEFAULT_CONFIG_DIR}/{args.name}.yaml"] if args.name else [])
    if not paths:
        raise QemuArgsError("no --config given and no -name to find one by")
    mine = [c for c in load_checked(paths) if c.matches(args.domid, args.name)]
    if not mine:
        raise QemuArgsError(f"none of {', '.join(paths)} configures domain {args.name!r} (domid {args.domid})")
    return mine


async def _wait_domain_gone(xs: XenStore, domid: int) -> None:
    """The domain's dir removed (destroyed): its `name` node goes with it."""
    path = f"/local/domain/{domid}/name"
    async with xs.watch(path) as events:
        async for _ in events:
            if not await xs.exists(path):
                log.info("domain %d is gone", domid)
                return


async def run_device_model(args: QemuArgs, configs: list[DomainConfig], platform: Platform, xs: XenStore, *,
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


async def _announce_running(xs: XenStore, domid: int, state: DeviceModelState) -> None:
    """device-model/<domid>/state = running, what libxl's spawn waits for
    (QEMU writes it when its run state becomes running: at once, or at cont)."""
    await state.running.wait()
    home = f"/local/domain/{await own_domid(xs)}"
    await xs.write(f"{home}/device-model/{domid}/state", "running")
    log.info("device model for domain %d running", domid)


async def _main(args: QemuArgs, configs: list[DomainConfig]) -> int:
    check_xenstore_argument(args.xenstore)
    with open_platform_explained(args.sim) as platform:
        async with AsyncExitStack() as stack:
            try:
                xs = await stack.enter_async_context(open_xenstore(args.xenstore))
            except OSError as e:
                raise StartupError(explain_xenstore_failure(args.xenstore, e)) from e
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
    # libxl sends our stderr to /var/log/xen/qemu-dm-<domain>.log: plain lines with a time.
    logs.configure("info")
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
    except StartupError as e:
        log.error("device model for domain %d cannot start: %s", args.domid, e)
        return EXIT_USAGE
    except (OSError, XenStoreError) as e:
        log.error("device model for domain %d failed: %s", args.domid, e)
        return EXIT_FAILURE
