"""Helper processes of a command, each in its own session, always stopped.

    async with helper_process(argv, name="hypervisor", ready=b"ready") as child:
        child.lines            # stdout lines so far (when stdout is collected)
        await child.next_line(timeout)
    # stopped: SIGTERM, then SIGKILL after `grace` seconds; reaped

Why a new session: Ctrl-C on a terminal sends SIGINT to the whole
foreground process group. The demo must stop its helpers in order (guest
first, storage daemon last); if they all got SIGINT at once, the storage
daemon would vanish under in-flight I/O and the summary would report
errors the user did not cause. So only the command itself hears the
terminal, and it stops its children itself.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

import trio

DEFAULT_GRACE = 5.0


class HelperProcessError(RuntimeError):
    """A helper process did not start, or exited before it said it was ready."""


class CollectedProcess:
    """A child process whose stdout `_collect` (a task) gathers line by line
    into `lines`; `eof` once its output ended; `changed()` waits for either."""

    def __init__(self, name: str, proc: trio.Process) -> None:
        self.name = name
        self.proc = proc
        self.lines: list[str] = []
        self._changed = trio.Event()
        self.eof = False

    async def _collect(self) -> None:
        assert self.proc.stdout is not None  # collected: a pipe was asked for
        buf = b""
        try:
            while True:
                chunk = await self.proc.stdout.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                *complete, buf = buf.split(b"\n")
                if complete:
                    self.lines.extend(line.decode(errors="replace") for line in complete)
                    self._wake()
        finally:
            if buf:
                self.lines.append(buf.decode(errors="replace"))
            self.eof = True
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def changed(self) -> None:
        """Until a new stdout line or the end of output."""
        if not self.eof:
            await self._changed.wait()

    def signal(self, sig: int) -> None:
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(sig)
            except ProcessLookupError:
                pass

    async def stop(self, grace: float = DEFAULT_GRACE) -> int:
        """SIGTERM, wait up to `grace` seconds, then SIGKILL; the exit status."""
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                self.signal(signal.SIGTERM)
                with trio.move_on_after(grace):
                    await self.proc.wait()
                if self.proc.returncode is None:
                    self.proc.kill()
            status = await self.proc.wait()
        return status


class HelperProcess(CollectedProcess):
    @property
    def pid(self) -> int:
        return self.proc.pid

    async def wait_line(self, predicate, timeout: float, *, start: int = 0) -> int:
        """Index of the first stdout line from `start` on satisfying predicate."""
        with trio.fail_after(timeout):
            seen = start
            while True:
                for i in range(seen, len(self.lines)):
                    if predicate(self.lines[i]):
                        return i
                seen = len(self.lines)
                if self.eof:
                    raise HelperProcessError(
                        f"{self.name} exited (status {await self.proc.wait()}) without the expected output; "
                        f"last lines: {self.lines[-5:]}")
                await self._changed.wait()

    async def send_line(self, text: str) -> None:
        if self.proc.stdin is None:
            raise HelperProcessError(f"{self.name} was started without a stdin pipe")
        try:
            await self.proc.stdin.send_all(text.encode() + b"\n")
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # it exited: nothing to tell it any more


@asynccontextmanager
async def helper_process(argv: Sequence[str], *, name: str, ready: str | None = None,
                         ready_timeout: float = 30.0, collect_stdout: bool = True, stdin: bool = False,
                         stdout_file=None, stderr_file=None, env: dict | None = None,
                         grace: float = DEFAULT_GRACE) -> AsyncIterator[HelperProcess]:
    """Run argv in a new session for the block; if `ready`, wait for that stdout line first."""
    try:
        proc = await trio.lowlevel.open_process(
            list(argv), start_new_session=True,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE if collect_stdout else (stdout_file or subprocess.DEVNULL),
            stderr=stderr_file, env=dict(os.environ, **(env or {})))
    except OSError as e:
        raise HelperProcessError(f"cannot start {name} ({argv[0]}): {e.strerror or e}") from e
    child = HelperProcess(name, proc)
    try:
        async with trio.open_nursery() as nursery:
            if collect_stdout:
                nursery.start_soon(child._collect)
            try:
                if ready is not None:
                    try:
                        await child.wait_line(lambda line: line.strip() == ready, ready_timeout)
                    except trio.TooSlowError:
                        raise HelperProcessError(f"{name} did not say {ready!r} within {ready_timeout:g} s; "
                                                 f"last lines: {child.lines[-5:]}") from None
                yield child
            finally:
                await child.stop(grace)
                nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    await stream.aclose()
