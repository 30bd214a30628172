#!/usr/bin/env python3
"""Build the benchmark's compiled loops (loadgen.c) as the module _xenblk_bench.

    .venv/bin/python scripts/benchkit/build_loadgen.py [--dest DIR] [--force]

cffi API mode: gcc compiles loadgen.c against Xen's public headers
(libxen-dev) and libblkio (libblkio-dev) into the running interpreter's
site-packages (or DIR). scripts/install-deps.sh runs it; it does nothing
when the module there was built from the same sources (a hash stamp).
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
from pathlib import Path

from xenblk_vhost.native.cffi_build import CffiModule

HERE = Path(__file__).resolve().parent
MODULE = "_xenblk_bench"
LOADGEN = CffiModule(MODULE, HERE, "loadgen.h", ("loadgen.c",), stamped=(Path(__file__).resolve(),),
                     libraries=("blkio", "pthread"), compile_args=("-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"))


def build(dest: Path, force: bool = False) -> Path | None:
    """Compile into dest; None when it was already up to date."""
    target, compiled = LOADGEN.build(dest, force)
    return target if compiled else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", type=Path, default=Path(sysconfig.get_paths()["platlib"]),
                    help="where the module goes (default: this interpreter's site-packages)")
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = ap.parse_args()
    try:
        target = build(args.dest, args.force)
    except Exception as e:  # cffi's compile errors carry gcc's output
        print(f"build_loadgen: building {MODULE} failed: {e}", file=sys.stderr)
        return 1
    print(f"build_loadgen: {MODULE} " + (f"built: {target}" if target else f"up to date in {args.dest}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
