"""The interpreter's garbage collector kept out of a takeover's pause.

A full collection walks every object the daemon holds (after start-up, the imported modules, the
configuration, the devices' prepared takeovers: some 10^5 objects). Natively that is tens of ms; on a
dom0 under emulation (the TCG rig) it is half a second and more, and one falling between a hand-over's
release and the rings serving again stretched the guests' pause (0.65 s between the rings' set-up and
their start, twice in one run). So, once the start-up is done and before the pause:

  * collect once and freeze what survives (gc.freeze: later collections never walk the start-up's
    objects again, which also shortens every collection for the daemon's life), then
  * no automatic collection until the takeovers are done (what the takeover allocates is bounded:
    a few objects per ring), the collector enabled again after.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


def freeze_startup_heap() -> None:
    """Collect what start-up left as garbage, then move every object alive to the permanent
    generation (never walked by a collection again)."""
    gc.collect()
    gc.freeze()


@contextmanager
def no_collection() -> Iterator[None]:
    """No automatic collection inside (the collector's state as before, after)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


__all__ = ["freeze_startup_heap", "no_collection"]
