"""Compile and run the C probes in tests/probes against Xen's public headers.

The probes are built with the system gcc against /usr/include/xen (Debian
libxen-dev), so what they print is Xen's own view of the ABI, not ours.
Each (source, flags) pair is compiled at most once per test session: the
binaries are cached here by path, in a directory from pytest's
tmp_path_factory.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

PROBES = Path(__file__).resolve().parent.parent / "probes"
XEN_BLKIF_H = Path("/usr/include/xen/io/blkif.h")

_built: dict[tuple[str, tuple[str, ...]], Path] = {}


def compile_probe(tmp_dir: Path, source: str, flags: tuple[str, ...]) -> Path:
    """Build tests/probes/<source> with gcc and `flags`; return the binary."""
    key = (source, flags)
    if key in _built:
        return _built[key]
    gcc = shutil.which("gcc")
    # No skip: these checks are the point of the suite on this machine.
    assert gcc, "gcc is required to check the blkif ABI against Xen's headers"
    assert XEN_BLKIF_H.exists(), f"{XEN_BLKIF_H} missing: install libxen-dev"
    out = tmp_dir / (Path(source).stem + "".join(f.replace("-", "_") for f in flags))
    cmd = [gcc, *flags, "-std=c11", "-O1", "-Wall", "-Wextra", "-Werror",
           "-o", str(out), str(PROBES / source)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"probe build failed: {' '.join(cmd)}\n{res.stderr}"
    _built[key] = out
    return out


def run_probe(binary: Path, stdin: str = "") -> str:
    res = subprocess.run([str(binary)], input=stdin, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"{binary} exited {res.returncode}: {res.stderr}"
    return res.stdout


def parse_key_values(text: str) -> dict[str, str]:
    """key=value lines into a dict; a repeated key is an error."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        key, sep, value = line.partition("=")
        assert sep, f"probe line without '=': {line!r}"
        assert key not in out, f"probe printed {key} twice"
        out[key] = value
    return out
