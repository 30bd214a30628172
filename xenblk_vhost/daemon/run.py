"""`xenblk-vhost run CONFIG...`: serve the configured domains' disks until told to stop.

    status = run_command(args)     # the process's exit status (exit_codes.py)

Start-up, in order, each failure one line with its hint:
  1. the files, as `check` validates them (libblkio properties included): exit 2 and check's lines;
  2. /dev/xen/gntdev and /dev/xen/evtchn (or --sim), then xenstored, which must answer within
     XENSTORE_ANSWER_TIMEOUT: exit 2 (preflight.StartupError: not on Xen, module not loaded,
     xenstored unreachable with what was tried, --xenstore on a regular file);
  3. the control socket and metrics endpoint: exit 1 if refused (another daemon has the socket);
  4. the service, then `ready` on stdout and READY=1 (with STATUS=) to systemd.

Serving: SIGHUP, or `xenblk-vhost ctl reload` (what the unit's ExecReload
runs), re-reads the files in a worker thread (a hung file system never
stalls the rings) and applies them; the control socket answers `ctl`
(observability/control_commands.py); the watchdog task pings systemd from
the event loop.

How it ends:
  `upgrade`           (ctl upgrade, daemon/handover.py) a new daemon is exec'd and starts while this one
                      serves; once it is ready every device drains and is released, systemd is told
                      MAINPID=<new>, the new one takes the devices over, this one exits 0. Started that
                      way ($XENBLK_VHOST_HANDOVER_FD), run tells the old one when it is ready (or why
                      it cannot start: the old one serves on), and binds the control socket and metrics
                      once the old one has exited.
  SIGTERM/SIGINT      every device drains (in-flight requests answered), unmaps and unbinds;
                      exit 0. xenstore is left as it is: guests see a pause, and a daemon
                      started later takes them over.
  xenstored lost      one line; every device drains; exit 1, so that systemd (Restart=on-failure)
                      starts a new daemon, which takes the devices over. Not reconnecting here:
                      a xenstored that went away lost our watches and transactions, and the
                      takeover path of a fresh process is the one that is tested.
  other OSError       "stopped: ..." and exit 1.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
from contextlib import AsyncExitStack

import trio

from .._groups import leaves
from ..config import ConfigError, Problem
from ..exit_codes import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from ..xen.interfaces import XenStoreError
from ..xen.xenstore import XenStoreConnectionError, open_xenstore
from . import logs
from .handover import PREPARE_TIMEOUT, Predecessor, Upgrader
from .heap import freeze_startup_heap, no_collection
from .preflight import (
    StartupError,
    check_xenstore_argument,
    explain_xenstore_failure,
    load_checked,
    open_platform_explained,
)
from .startup_clock import StartupClock
from .systemd import Notifier

log = logging.getLogger("xenblk_vhost")

XENSTORE_ANSWER_TIMEOUT = 10.0
# After a hand-over: how long the control socket waits for the devices' takeovers (they go first).
TAKEOVER_FIRST_TIMEOUT = 30.0


def status_line(service) -> str:
    """systemd's STATUS=: what an operator wants from `systemctl status` at a glance."""
    devices = list(service.devices.values())
    connected = sum(1 for d in devices if d.vbd is not None and d.vbd.serving)
    paused = sum(1 for d in devices if d.paused)
    failing = sum(1 for d in devices if d.last_error is not None)
    text = f"{len(service.configs)} domain(s) configured, {connected} disk(s) connected"
    if paused:
        text += f", {paused} paused"
    if failing:
        text += f", {failing} with an error (xenblk-vhost ctl list)"
    return text


class Reloader:
    """SIGHUP and `ctl reload`: the files re-read (in a thread), validated, applied; one at a time."""

    def __init__(self, paths: list[str], service, notifier: Notifier) -> None:
        self._paths = paths
        self._service = service
        self._notifier = notifier
        self._lock = trio.Lock()

    async def reload(self) -> list[str]:
        """What changed; ConfigError (its problems logged here, whoever asked) if refused."""
        async with self._lock:
            self._notifier.reloading()
            try:
                configs = await trio.to_thread.run_sync(load_checked, self._paths)
                return self._service.reload(configs)
            except ConfigError as e:
                for problem in e.problems:
                    log.error("reload refused, keeping the running configuration: %s", problem)
                raise
            except Exception as e:
                # A bug, not the operator's file: still only a refused reload, never the daemon's end.
                log.exception("reload failed, keeping the running configuration")
                source = self._paths[0] if self._paths else "-"
                raise ConfigError([Problem(str(source), 0, "reload", f"failed: {e!r}")]) from e
            finally:
                self._notifier.ready(status_line(self._service))


def journal_option(args: argparse.Namespace) -> dict:
    """Service's open_vbd for --journal-dir/--no-journal (the rings' in-flight journals)."""
    if getattr(args, "no_journal", False):
        return {}
    from pathlib import Path

    from ..backend.datapath.journal_file import default_journal_dir
    from ..backend.xenbus.device import journaled_open_vbd

    directory = Path(args.journal_dir) if getattr(args, "journal_dir", None) else default_journal_dir()
    return {"open_vbd": journaled_open_vbd(directory)}


async def _serve(args: argparse.Namespace, configs: list, notifier: Notifier, clock: StartupClock,
                 predecessor: Predecessor | None) -> int:
    from ..backend.xenbus.service import Service
    from ..observability.endpoints import open_observability

    clock.mark("service imports")
    check_xenstore_argument(args.xenstore)
    with open_platform_explained(args.sim) as platform:
        # Signals are caught from before "ready", so none is lost.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with AsyncExitStack() as stack:
                try:
                    xs = await stack.enter_async_context(open_xenstore(args.xenstore))
                except OSError as e:
                    raise StartupError(explain_xenstore_failure(args.xenstore, e)) from e
                with trio.move_on_after(XENSTORE_ANSWER_TIMEOUT) as probe:
                    try:
                        await xs.read("domid")
                    except XenStoreError:
                        pass  # an answer: xenstored is there
                if probe.cancelled_caught:
                    raise StartupError(f"xenstored at {xs.path} does not answer within "
                                       f"{XENSTORE_ANSWER_TIMEOUT:g} s: is it hung?")
                clock.mark("hypervisor and xenstore")
                observability = None
                hold: trio.Event | None = None
                if predecessor is None:
                    observability = await stack.enter_async_context(open_observability(args))
                    clock.mark("control socket and metrics")
                else:
                    # Taking over from a running daemon: everything that costs time is done before it
                    # stops taking requests (the devices prepare their takeovers: storage opened where
                    # it can be twice, rings mapped); the control socket and metrics port are its until
                    # it exits.
                    from ..backend.datapath import vbd  # noqa: F401 - the datapath loaded now, not in the pause
                    from ..observability import control_commands, control_socket, snapshot  # noqa: F401 - same

                    clock.mark("datapath imports")
                    hold = trio.Event()
                service = Service(xs, platform, configs, hold=hold,
                                  storage_in_use=predecessor.storage_in_use if predecessor is not None else None,
                                  **journal_option(args))
                reloader = Reloader(args.config, service, notifier)
                upgrader = Upgrader(notifier)
                async with trio.open_nursery() as nursery:
                    await nursery.start(upgrader.run_service, service)
                    clock.mark("devices found and watched")
                    if predecessor is not None:
                        assert hold is not None
                        with trio.move_on_after(PREPARE_TIMEOUT) as preparing:
                            await service.prepared()
                        if preparing.cancelled_caught:
                            log.warning("takeovers not prepared within %g s: the rest after the release",
                                        PREPARE_TIMEOUT)
                        freeze_startup_heap()
                        clock.mark("takeovers prepared")
                        with no_collection():  # the guests' pause: from the release to the rings serving
                            released = await predecessor.ready(clock.summary())
                            hold.set()
                            clock.mark("the running daemon's drain")
                            log.info("taking over from the daemon that ran before (its drain: %s s)",
                                     released.get("drain_s", "unknown"))
                            # The guests first: the control socket once every device is taken over.
                            with trio.move_on_after(TAKEOVER_FIRST_TIMEOUT):
                                await service.settled()
                        observability = await _observability_after(predecessor, stack, args, open_observability)
                    if observability is not None:
                        observability.serve(nursery, service, reload=reloader.reload, upgrade=upgrader.upgrade)
                    nursery.start_soon(notifier.keep_alive, lambda: status_line(service))
                    print("ready", flush=True)
                    notifier.ready(status_line(service))
                    log.info("%s", clock.summary())
                    status = await _until_stopped(signals, reloader, upgrader, notifier)
                    nursery.cancel_scope.cancel()
    return status


async def _observability_after(predecessor: Predecessor, stack: AsyncExitStack, args: argparse.Namespace,
                               open_observability):
    """The control socket and metrics once the daemon we took over from has exited. Not fatal
    here: the disks are ours already, and a daemon that cannot be asked is better than none."""
    if not await predecessor.gone():
        log.warning("the daemon we took over from has not exited; binding the control socket anyway")
    try:
        return await stack.enter_async_context(open_observability(args))
    except OSError as e:
        log.error("no control socket or metrics after the hand-over: %s", e)
        return None


async def _until_stopped(signals, reloader: Reloader, upgrader: Upgrader, notifier: Notifier) -> int:
    """Serve reloads until a signal stops us (0), the disks are handed over (0) or a hand-over
    failed halfway (1: the service manager starts a daemon that takes the disks over)."""
    status = EXIT_OK
    async with trio.open_nursery() as waiting:
        async def on_signals() -> None:
            async for sig in signals:
                if sig == signal.SIGHUP:
                    try:
                        await reloader.reload()
                    except ConfigError:
                        pass  # logged by reload(); the running configuration stays
                    continue
                log.info("%s: stopping", signal.Signals(sig).name)
                notifier.stopping("stopping: draining every disk")
                break
            waiting.cancel_scope.cancel()

        async def on_event(event: trio.Event, exit_status: int) -> None:
            nonlocal status
            await event.wait()
            status = exit_status
            waiting.cancel_scope.cancel()

        waiting.start_soon(on_signals)
        waiting.start_soon(on_event, upgrader.handed_over, EXIT_OK)
        waiting.start_soon(on_event, upgrader.lost, EXIT_FAILURE)
    return status


def run_command(args: argparse.Namespace) -> int:
    clock = StartupClock()
    clock.mark("interpreter and imports")
    # Started by a running daemon to take its disks over (`upgrade`): tell it how our start-up went.
    predecessor = Predecessor.from_environment()
    # A watchdog kill (SIGABRT) or a crash prints every thread's stack first: where the loop was stuck.
    faulthandler.enable()
    try:
        configs = load_checked(args.config)
    except ConfigError as e:
        logs.report_errors(str(p) for p in e.problems)
        if predecessor is not None:
            predecessor.failed("the files do not validate: " + "; ".join(str(p) for p in e.problems))
        return EXIT_USAGE
    clock.mark("configuration")
    notifier = Notifier.from_environment()
    try:
        return trio.run(_serve, args, configs, notifier, clock, predecessor)
    except BaseException as e:  # noqa: B036 - sorted below; what is not ours is raised again
        found = leaves(e)
        startup = [x for x in found if isinstance(x, StartupError)]
        if startup:
            logs.report_errors([f"xenblk-vhost run: {startup[0]}"])
            if predecessor is not None:
                predecessor.failed(str(startup[0]))
            notifier.stopping(f"cannot start: {startup[0]}")
            return EXIT_USAGE
        lost = [x for x in found if isinstance(x, XenStoreConnectionError)]
        if lost:
            log.error("lost the connection to xenstored (%s): every disk was drained; exiting with status %d "
                      "so that the service manager starts a new daemon, which takes the disks over", lost[0],
                      EXIT_FAILURE)
            notifier.stopping(f"lost xenstored: {lost[0]}")
            return EXIT_FAILURE
        if found and all(isinstance(x, (OSError, XenStoreError)) for x in found):
            log.error("stopped: %s", found[0])
            return EXIT_FAILURE
        raise
    finally:
        notifier.close()


__all__ = ["run_command", "status_line", "Reloader", "XENSTORE_ANSWER_TIMEOUT"]
