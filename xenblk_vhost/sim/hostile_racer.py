"""A second guest CPU that rewrites shared memory while the backend reads it.

Double fetch (XSA-155) is a race: the guest changes a request, an indirect
page or a grant entry between the backend's check and its use. A trio task
in the attacking process cannot race the backend (one thread, and in the
tests the backend may share its loop), so the racer is its own process: it
maps the domain's memory and grant table like the guest kernel on another
vCPU, and flips the given bytes between their values as fast as Python
goes until its stdin closes. It can also kick an event channel at every
round (a notify storm, XSA-332) from an fd it inherits.

    python -m xenblk_vhost.sim.hostile_racer SOCKET DOMID SPEC_JSON

SPEC_JSON: {"memory": [[offset, [hex, hex, ...]], ...],   offsets in the domain's memory
            "grants": [[ref, [flags, flags, ...]], ...],  a v1 entry's flags, any value
            "kick_fd": fd or null}
It prints {"ready": true} once mapped, and {"rounds": N} when it stops.
The trio side is `racing(...)`, an async context manager.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import trio

from .grant_table import ENTRY_SIZE
from .guest import Guest

_FLAGS = struct.Struct("<H")
_CHECK_EVERY = 256  # rounds between looks at stdin (a select costs more than a round)


@dataclass
class RaceSpec:
    """What the racer flips: guest memory ranges between byte strings, grant
    entries between flag values; optionally an event channel kicked every round."""

    memory: list[tuple[int, list[bytes]]] = field(default_factory=list)
    grants: list[tuple[int, list[int]]] = field(default_factory=list)
    kick_fd: int | None = None

    def to_json(self) -> str:
        return json.dumps({"memory": [[off, [v.hex() for v in values]] for off, values in self.memory],
                           "grants": [[ref, list(flags)] for ref, flags in self.grants],
                           "kick_fd": self.kick_fd})

    @classmethod
    def from_json(cls, text: str) -> RaceSpec:
        raw = json.loads(text)
        return cls([(int(off), [bytes.fromhex(v) for v in values]) for off, values in raw["memory"]],
                   [(int(ref), [int(f) for f in flags]) for ref, flags in raw["grants"]],
                   raw.get("kick_fd"))


def race(guest: Guest, spec: RaceSpec, should_stop) -> int:
    """Flip everything in spec round after round until should_stop(); the rounds done."""
    mem = guest.memory
    grants = guest.table._buf
    memory = [(off, values, len(values)) for off, values in spec.memory]
    entries = [(ref * ENTRY_SIZE, flags, len(flags)) for ref, flags in spec.grants]
    kick = spec.kick_fd
    rounds = 0
    while True:
        for off, values, n in memory:
            value = values[rounds % n]
            mem[off:off + len(value)] = value
        for off, flags, n in entries:
            _FLAGS.pack_into(grants, off, flags[rounds % n])
        if kick is not None:
            try:
                os.eventfd_write(kick, 1)
            except BlockingIOError:
                pass
        rounds += 1
        if rounds % _CHECK_EVERY == 0 and should_stop():
            return rounds


def main(argv: list[str] | None = None) -> int:
    socket_path, domid, spec_json = (argv if argv is not None else sys.argv[1:])
    spec = RaceSpec.from_json(spec_json)
    guest = Guest.attach(socket_path, int(domid))
    try:
        stdin = sys.stdin.fileno()
        print(json.dumps({"ready": True}), flush=True)
        rounds = race(guest, spec, lambda: bool(select.select([stdin], [], [], 0)[0]))
        print(json.dumps({"rounds": rounds}), flush=True)
    finally:
        guest.close()
    return 0


@dataclass
class Racer:
    rounds: int = 0  # set when the racer has stopped


@asynccontextmanager
async def racing(socket_path: str, domid: int, spec: RaceSpec, *, timeout: float = 30.0) -> AsyncIterator[Racer]:
    """The racer runs for the block (started and mapped when the block begins);
    afterwards `.rounds` says how many rounds of flips it made."""
    argv = [sys.executable, "-m", "xenblk_vhost.sim.hostile_racer", socket_path, str(domid), spec.to_json()]
    pass_fds = (spec.kick_fd,) if spec.kick_fd is not None else ()
    proc = await trio.lowlevel.open_process(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            pass_fds=pass_fds)
    assert proc.stdin is not None and proc.stdout is not None
    stdout = proc.stdout
    racer = Racer()
    out = b""

    async def line() -> dict:
        nonlocal out
        while b"\n" not in out:
            chunk = await stdout.receive_some(4096)
            if not chunk:
                raise RuntimeError(f"racer exited (rc={proc.returncode}) early")
            out += chunk
        first, out = out.split(b"\n", 1)
        return json.loads(first)

    try:
        with trio.fail_after(timeout):
            assert await line() == {"ready": True}
        yield racer
        await proc.stdin.aclose()
        with trio.fail_after(timeout):
            racer.rounds = int((await line())["rounds"])
            await proc.wait()
    finally:
        with trio.CancelScope(shield=True):
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await proc.stdin.aclose()
            await proc.stdout.aclose()


if __name__ == "__main__":
    sys.exit(main())
