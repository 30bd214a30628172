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
    journal_kernel.c             the ring journal's writer: record_taken, record_answers,
                                 published (backend/datapath/journal.py RingJournal is
                                 the reference; backend/datapath/journal_compiled.py
                                 calls it); the same engine switch as the intake
    lane_kernel.c                the copy path's lane: plain READ/WRITE requests stashed per
                                 slot and their grant copies packed a batch at a time
                                 (backend/datapath/copy_lane.py; CopyBatch.add_sector_ranges
                                 is the reference); xb_queue_lane in blkio_calls.c queues
                                 their storage requests in one call (lane_slot.h)
    blkio_calls.c                libblkio's request-queueing calls and do_io, direct
                                 (storage/queue.py; a module of its own, _xenblk_blkio,
                                 loaded by load_blkio(); cffi's ABI mode is the reference)
    build.py                     cffi API-mode build; install-deps runs it, load()
                                 runs it when the module is missing or stale
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

from . import build as _build  # the module stays native.build
from .build import BLKIO, NATIVE, NativeBuildError
from .cffi_build import CffiModule

__all__ = ["NativeBuildError", "enabled", "load", "load_blkio", "set_enabled"]

_loaded: dict[str, ModuleType] = {}

# False: every user of the kernels takes its Python path (the reference, the same results), as if they
# could not be built: scripts/bench.py --engines compiled,python measures both in one run this way.
enabled = True


def set_enabled(flag: bool) -> None:
    global enabled
    enabled = flag


def load() -> ModuleType:
    """The compiled kernels, built first if needed (once per process; raises NativeBuildError)."""
    return _load(NATIVE)


def load_blkio() -> ModuleType:
    """libblkio's compiled calls (blkio_calls.h), built first if needed (raises NativeBuildError)."""
    return _load(BLKIO)


def _load(module: CffiModule) -> ModuleType:
    if (mod := _loaded.get(module.name)) is not None:
        return mod
    path = _build.find_built(module) or _build.build(module=module)
    spec = importlib.util.spec_from_file_location(module.name, path)
    if spec is None or spec.loader is None:
        raise NativeBuildError(f"cannot load {path}")
    mod = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(mod)
    except ImportError as e:
        raise NativeBuildError(f"cannot load {path}: {e}") from e
    sys.modules.setdefault(module.name, mod)
    _loaded[module.name] = mod
    return mod
