"""What `xenblk-vhost run` serves beside the backend: the control socket and the metrics endpoint.

    add_run_arguments(run_parser)                        # --control PATH|none, --metrics HOST:PORT
    async with open_observability(args) as observability:  # binds both: errors come out here, plain
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            observability.serve(nursery, service, reload=reload)   # tasks answering on what was bound
    # sockets closed, the control socket's file removed

Binding comes first so that a refusal is an ordinary error of `run`
(OSError: "stopped: ...", exit 1) rather than one from inside the
service's nursery. The control socket is on by default; its default path
is best effort: when another daemon already answers there, or the
directory cannot be made, this one logs why and runs without one (an
explicit --control is never best effort). --control none turns it off.
--metrics is off unless given.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from ..control_protocol import ControlError, default_control_path
from .listen_address import MetricsAddressError, parse_listen_address

if TYPE_CHECKING:
    from .control_commands import Reload, Upgrade
    from .control_socket import ControlSocket

# What serves (trio, prometheus_client) is imported when `run` serves, not when the command
# line is parsed: `xenblk-vhost ctl` builds the same parser and must start quickly.

log = logging.getLogger(__name__)

CONTROL_OFF = ("none", "off")


class ObservabilityError(OSError):
    """An endpoint asked for explicitly cannot be served."""


def _listen_address(text: str) -> tuple[str, int]:
    try:
        return parse_listen_address(text)
    except MetricsAddressError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--control", metavar="PATH", default=None,
                        help="unix socket answering `xenblk-vhost ctl` and `stats` (mode 0600; default "
                        "/run/xenblk-vhost/control.sock as root, $XDG_RUNTIME_DIR/xenblk-vhost/control.sock "
                        "otherwise; `none` for no socket)")
    parser.add_argument("--metrics", metavar="HOST:PORT", type=_listen_address, default=None,
                        help="serve Prometheus metrics at http://HOST:PORT/metrics (e.g. 127.0.0.1:9477; "
                        "port 0 picks a free one, logged; off by default)")


def _open_control(requested: str | None) -> ControlSocket | None:
    from .control_socket import ControlSocket

    if requested is not None:
        if requested.lower() in CONTROL_OFF:
            return None
        try:
            return ControlSocket(requested)
        except ControlError as e:
            raise ObservabilityError(f"--control: {e}") from e
    path = default_control_path()
    if path is None:
        log.warning("no control socket: not root and XDG_RUNTIME_DIR is unset (give --control PATH)")
        return None
    try:
        return ControlSocket(path)
    except ControlError as e:
        log.warning("no control socket: %s", e)
        return None


class Observability:
    def __init__(self, control: ControlSocket | None, listeners: list | None) -> None:
        self.control = control
        self.metrics_listeners = listeners
        self._started = time.monotonic()

    def serve(self, nursery, service, *, reload: Reload | None = None, upgrade: Upgrade | None = None) -> None:
        from .control_commands import ControlCommands
        from .snapshot import service_snapshot

        def snapshot() -> dict:
            return service_snapshot(service, started=self._started)

        if self.control is not None:
            commands = ControlCommands(service, started=self._started, reload=reload, upgrade=upgrade)
            nursery.start_soon(self.control.serve, commands.handlers())
        if self.metrics_listeners is not None:
            from .metrics import metrics_registry, serve_metrics

            nursery.start_soon(serve_metrics, self.metrics_listeners, metrics_registry(snapshot))

    def close(self) -> None:
        if self.control is not None:
            self.control.close()
        for listener in self.metrics_listeners or ():
            listener.socket.close()


@asynccontextmanager
async def open_observability(args: argparse.Namespace) -> AsyncIterator[Observability]:
    control = _open_control(getattr(args, "control", None))
    listeners = None
    try:
        metrics = getattr(args, "metrics", None)
        if metrics is not None:
            from .metrics import open_metrics_listeners

            listeners = await open_metrics_listeners(*metrics)
        observability = Observability(control, listeners)
    except BaseException:
        if control is not None:
            control.close()
        raise
    try:
        yield observability
    finally:
        observability.close()
