"""Compile a cffi API-mode extension from C sources beside a header, once per change of its sources.

    mod = CffiModule("_xenblk_native", HERE, "native.h", ("a.c", "b.c"), stamped=(Path(__file__),))
    mod.built(dest)          # the up-to-date .so in dest, or None
    mod.build(dest)          # compile unless up to date (one builder at a time: a lock in dest)

What the project's two compiled modules share: the kernels (native/build.py) and the benchmark's
loops (scripts/benchkit/build_loadgen.py). A stamp beside the module holds a hash of its sources,
the files that say how it is built, and the interpreter's extension suffix (a new Python needs a
new build); a module whose stamp differs is out of date. The caller says what a failure means
(cffi's compile errors carry gcc's output).
"""

from __future__ import annotations

import fcntl
import hashlib
import shutil
import sysconfig
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CffiModule:
    name: str
    here: Path  # where the header and the C sources are
    header: str  # the cdef: every declaration Python calls, and the sources' #include
    c_sources: tuple[str, ...]
    stamped: tuple[Path, ...] = ()  # further files whose change means a rebuild (the build's own code)
    libraries: tuple[str, ...] = ()
    compile_args: tuple[str, ...] = ("-O2", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter")
    _builder: tuple[Path, ...] = field(default=(Path(__file__).resolve(),), init=False, repr=False)

    def sources_digest(self) -> str:
        h = hashlib.sha256(sysconfig.get_config_var("EXT_SUFFIX").encode())
        for path in (*(self.here / n for n in (self.header, *self.c_sources)), *self.stamped, *self._builder):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
        return h.hexdigest()

    def stamp(self, dest: Path) -> Path:
        return dest / f"{self.name}.sha256"

    def built(self, dest: Path) -> Path | None:
        """The up-to-date module file in dest, or None."""
        stamp = self.stamp(dest)
        if not stamp.exists() or stamp.read_text().strip() != self.sources_digest():
            return None
        return next(iter(dest.glob(f"{self.name}.*.so")), None)

    def build(self, dest: Path, force: bool = False) -> tuple[Path, bool]:
        """Compile into dest unless up to date: (the module's path, whether it was compiled now).
        Raises what cffi, gcc or the file system raised."""
        dest.mkdir(parents=True, exist_ok=True)
        with open(dest / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then find it built
            if not force and (done := self.built(dest)) is not None:
                return done, False
            import cffi

            ffi = cffi.FFI()
            ffi.cdef((self.here / self.header).read_text())
            prelude = "#include <stdbool.h>\n#include <stddef.h>\n#include <stdint.h>\n"  # what a header may use
            ffi.set_source(self.name, f'{prelude}#include "{self.header}"\n',
                           sources=[str(self.here / c) for c in self.c_sources], include_dirs=[str(self.here)],
                           libraries=list(self.libraries), extra_compile_args=list(self.compile_args))
            with tempfile.TemporaryDirectory(prefix=f"{self.name}-build-") as tmp:
                so = Path(ffi.compile(tmpdir=tmp))
                for old in dest.glob(f"{self.name}.*.so"):
                    old.unlink()
                target = dest / so.name
                shutil.copy(so, target)
            self.stamp(dest).write_text(self.sources_digest() + "\n")
            return target, True


__all__ = ["CffiModule"]
