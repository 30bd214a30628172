"""Build the compiled kernels (native.h, *.c here) as _xenblk_native, and libblkio's calls as _xenblk_blkio.

    python -m xenblk_vhost.native [--dest DIR] [--force]

cffi API mode: gcc compiles the C sources beside this file into one
extension. scripts/install-deps.sh runs this; `xenblk_vhost.native.load()`
runs it too when the module is missing or older than its sources, so a
fresh checkout works without a separate step (a few seconds, once). It
does nothing when the module in DEST was built from the same sources
(a hash stamp beside it). Where it goes: build_dir() below.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cffi_build import CffiModule

HERE = Path(__file__).resolve().parent
MODULE = "_xenblk_native"
HEADER = "native.h"
C_SOURCES = ("sim_grant_copy.c", "pack_segments.c", "intake_kernel.c", "journal_kernel.c", "lane_kernel.c",
             "pgrant_table.c")
SOURCES = (HEADER, *C_SOURCES, "build.py")  # and cffi_build.py, which CffiModule stamps itself
NATIVE = CffiModule(MODULE, HERE, HEADER, C_SOURCES,
                    stamped=(HERE / "build.py", HERE / "copy_seg.h", HERE / "lane_entry.h"))
# libblkio's request-queueing calls (blkio_calls.h says why), a module of its own: it links libblkio,
# which the kernels above (the simulator's copy, the intake) must not need.
BLKIO_MODULE = "_xenblk_blkio"
# The ring engine (ring_engine.c) lives here too, with the kernels it chains (compiled in again: a
# module cannot call into another's C).
BLKIO = CffiModule(BLKIO_MODULE, HERE, "blkio_calls.h", ("blkio_calls.c", "ring_engine.c", *C_SOURCES),
                   stamped=(HERE / "build.py", HERE / "lane_slot.h", HERE / "native.h", HERE / "copy_seg.h",
                           HERE / "lane_entry.h"),
                   libraries=("blkio",))


class NativeBuildError(RuntimeError):
    """The compiled kernels could not be built (the message carries gcc's or cffi's words)."""


def build_dirs() -> list[Path]:
    """Where a built module may be, in the order looked at: beside the sources (a checkout, an editable
    install, or a package built at install time), then the user's cache."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return [HERE / "_build", cache / "xenblk-vhost" / "native"]


def build_dir() -> Path:
    """Where to build: beside the sources when that is writable, else the user's cache."""
    if os.access(HERE, os.W_OK):
        return HERE / "_build"
    return build_dirs()[1]


def find_built(module: CffiModule = NATIVE) -> Path | None:
    """An up-to-date module in any of build_dirs() (a read-only one too: a sandboxed daemon's), or None."""
    for d in build_dirs():
        try:
            found = module.built(d)
        except OSError:  # unreadable (ProtectHome=): not there for us
            continue
        if found is not None:
            return found
    return None


def sources_digest() -> str:
    return NATIVE.sources_digest()


def built_module(dest: Path) -> Path | None:
    """The up-to-date kernels' module file in dest, or None."""
    return NATIVE.built(dest)


def build(dest: Path | None = None, force: bool = False, module: CffiModule = NATIVE) -> Path:
    """Compile into dest (default build_dir()) unless up to date; the module's path."""
    dest = dest or build_dir()
    try:
        return module.build(dest, force)[0]
    except Exception as e:  # cffi's compile errors carry gcc's output
        raise NativeBuildError(f"building {module.name} from {HERE} failed (gcc, cffi and libblkio-dev are "
                               f"install dependencies: scripts/install-deps.sh): {e}") from e


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, help=f"where the module goes (default {build_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args(argv)
    for module in (NATIVE, BLKIO):
        try:
            target = build(args.dest, args.force, module)
        except NativeBuildError as e:
            print(f"xenblk_vhost.native.build: {e}", file=sys.stderr)
            return 1
        print(f"xenblk_vhost.native.build: {module.name}: {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
