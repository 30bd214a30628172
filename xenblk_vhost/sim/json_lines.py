"""JSON commands, one per line, between a test and a scriptable child process.

The child (the guest agent, the e2e frontend agent) reads {"cmd": ..., args}
lines on stdin and writes one JSON answer per line on stdout; the parent
drives it through its pipes. Both sides' plumbing lives here; what the
commands mean, and how errors are reported, stays with each agent.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import trio


def reply(obj: dict) -> None:
    """Write one answer line on stdout (the child's side)."""
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


async def serve_commands(stdin: trio.abc.ReceiveStream, handle: Callable[[str, dict], Awaitable[dict]]) -> None:
    """Answer each command line on `stdin` with `await handle(cmd, args)` until
    end of input or {"cmd": "exit"} (answered {}). Mapping errors to answers is
    the handler's business."""
    buf = b""
    while True:
        while b"\n" not in buf:
            chunk = await stdin.receive_some(65536)
            if not chunk:
                return
            buf += chunk
        line, buf = buf.split(b"\n", 1)
        req = json.loads(line)
        cmd = req.pop("cmd")
        if cmd == "exit":
            reply({})
            return
        reply(await handle(cmd, req))


class LineReader:
    """Whole lines from the child's stdout (the parent's side)."""

    def __init__(self, stream: trio.abc.ReceiveStream, name: str):
        self._stream = stream
        self._name = name
        self._buf = b""

    async def line(self) -> bytes:
        while b"\n" not in self._buf:
            chunk = await self._stream.receive_some(65536)
            if not chunk:
                raise EOFError(f"{self._name} exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line


@asynccontextmanager
async def agent_process(argv: list[str], *, grace: float) -> AsyncIterator[trio.Process]:
    """The child running for the block, with pipes on stdin and stdout. At the
    end it is told to exit (unless the block raised), given `grace` seconds
    after its stdin is closed, then killed."""
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdin is not None and proc.stdout is not None  # pipes were asked for
    try:
        yield proc
        try:
            await proc.stdin.send_all(b'{"cmd": "exit"}\n')
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    finally:
        with trio.CancelScope(shield=True):
            await proc.stdin.aclose()
            with trio.move_on_after(grace):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proc.stdout.aclose()
