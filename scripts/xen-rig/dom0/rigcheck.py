"""Helpers for Python scenarios (run in dom0 with the venv; dom0/ is on sys.path).

    from rigcheck import Checks
    checks = Checks()

    @checks.case
    def xenstore_roundtrip():
        checks.eq("value", got, want)

    @checks.case
    async def watches():        # async cases run under trio
        ...

    checks.run()                # runs every case, writes $OUT/results.json, exits 1 on any failure

Each case runs even when an earlier one failed, so one broken adapter call
does not hide what the others do on real Xen. A case fails by raising
(AssertionError from the helpers, or anything the code under test raises).
"""
from __future__ import annotations

import inspect
import json
import os
import sys
import time
import traceback

import trio


class CheckFailed(AssertionError):
    pass


class Checks:
    def __init__(self) -> None:
        self.cases: list = []
        self.results: dict[str, dict] = {}
        self.notes: dict[str, object] = {}
        self.out = os.environ.get("OUT", ".")

    def case(self, fn):
        self.cases.append(fn)
        return fn

    # -- assertions: each says what was expected and what real Xen did
    def true(self, cond: bool, msg: str) -> None:
        if not cond:
            raise CheckFailed(msg)

    def eq(self, what: str, got, want) -> None:
        if got != want:
            raise CheckFailed(f"{what}: got {got!r}, expected {want!r}")

    def raises(self, what: str, exc_type, fn, *args, **kw):
        try:
            fn(*args, **kw)
        except exc_type as e:
            return e
        raise CheckFailed(f"{what}: expected {exc_type.__name__}, nothing raised")

    async def araises(self, what: str, exc_type, coro):
        try:
            await coro
        except exc_type as e:
            return e
        raise CheckFailed(f"{what}: expected {exc_type.__name__}, nothing raised")

    def note(self, key: str, value) -> None:
        """Record an observed behaviour of real Xen in results.json (no verdict)."""
        self.notes[key] = value
        print(f"   observed {key} = {value!r}")

    def run(self) -> None:
        failed = 0
        for fn in self.cases:
            name = fn.__name__
            t0 = time.monotonic()
            try:
                if inspect.iscoroutinefunction(fn):
                    trio.run(fn)
                else:
                    fn()
            except BaseException as e:  # noqa: BLE001 - report everything, including KeyboardInterrupt-free cancels
                failed += 1
                detail = f"{type(e).__name__}: {e}"
                self.results[name] = {"status": "fail", "detail": detail, "seconds": round(time.monotonic() - t0, 2)}
                print(f"FAIL {name}: {detail}")
                traceback.print_exc(file=sys.stdout)
                with open(os.path.join(self.out, "failure"), "a") as f:
                    f.write(f"{name}: {detail}\n")
            else:
                self.results[name] = {"status": "ok", "seconds": round(time.monotonic() - t0, 2)}
                print(f"ok   {name} ({self.results[name]['seconds']}s)")
            sys.stdout.flush()
        with open(os.path.join(self.out, "results.json"), "w") as f:
            json.dump({"cases": self.results, "observed": self.notes}, f, indent=2, sort_keys=True, default=str)
        print(f"{len(self.cases) - failed} passed, {failed} failed")
        sys.exit(1 if failed else 0)
