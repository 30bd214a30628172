"""Compiled kernels: per-request work taken out of the interpreter where profiles said so.

    from xenblk_vhost import native
    mod = native.load()          # the cffi extension: mod.ffi, mod.lib
                                 # NativeBuildError if it cannot be built

What is here (each with a pure-Python reference that tests compare it to):
    native.h, sim_grant_copy.c   the simulated hypervisor's grant copy
                                 (sim/gntdev.py), over the IOCTL_GNTDEV_GRANT_COPY
                                 segment array the datapath fills (xen/copy_batch.py)
    intake_kernel.c, intake.py   the request intake's decode + validate of a batch of
                                 ring slots (blkif/intake.py RequestIntake is the
                                 reference); XENBLK_ENGINE=python|compiled picks it
    pack_segments.c              the copy path's packing of segments (xen/gntdev.py)
    journal_kernel.c, journal.py the ring journal's writer: record_taken, record_answers,
                                 published (backend/datapath/journal.py RingJournal is
                                 the reference); the same engine switch as the intake
    build.py                     cffi API-mode build; install-deps runs it, load()
                                 runs it when the module is missing or stale
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from . import build as _build  # the module stays native.build
from .build import MODULE, NativeBuildError

__all__ = ["NativeBuildError", "enabled", "load", "set_enabled"]

_loaded: ModuleType | None = None

# False: every user of the kernels takes its Python path (the reference, the same results), as if they
# could not be built: scripts/bench.py --engines compiled,python measures both in one run this way.
enabled = True


def set_enabled(flag: bool) -> None:
    global enabled
    enabled = flag


def load() -> ModuleType:
    """The compiled module, built first if needed (once per process; raises NativeBuildError)."""
    global _loaded
    if _loaded is not None:
        return _loaded
    path = _build.find_built() or _build.build()
    spec = importlib.util.spec_from_file_location(MODULE, path)
    if spec is None or spec.loader is None:
        raise NativeBuildError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:
        raise NativeBuildError(f"cannot load {path}: {e}") from e
    sys.modules.setdefault(MODULE, mod)
    _loaded = mod
    return mod
