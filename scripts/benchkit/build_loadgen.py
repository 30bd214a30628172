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
import hashlib
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODULE = "_xenblk_bench"
SOURCES = ("loadgen.c", "loadgen.h", "build_loadgen.py")


def sources_digest() -> str:
    h = hashlib.sha256(sysconfig.get_config_var("EXT_SUFFIX").encode())  # a new Python needs a new build
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    return h.hexdigest()


def built(dest: Path) -> bool:
    stamp = dest / f"{MODULE}.sha256"
    return (stamp.exists() and stamp.read_text().strip() == sources_digest()
            and any(dest.glob(f"{MODULE}.*.so")))


def build(dest: Path, force: bool = False) -> Path | None:
    """Compile into dest; None when it was already up to date."""
    if not force and built(dest):
        return None
    import cffi

    ffi = cffi.FFI()
    ffi.cdef((HERE / "loadgen.h").read_text())
    ffi.set_source(MODULE, "#include <stdint.h>\n#include \"loadgen.h\"\n",
                   sources=[str(HERE / "loadgen.c")], include_dirs=[str(HERE)],
                   libraries=["blkio", "pthread"],
                   extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"])
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xenblk-bench-build-") as tmp:
        so = Path(ffi.compile(tmpdir=tmp))
        for old in dest.glob(f"{MODULE}.*.so"):
            old.unlink()
        target = dest / so.name
        shutil.copy(so, target)
    (dest / f"{MODULE}.sha256").write_text(sources_digest() + "\n")
    return target


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
