"""Our cffi declarations against the real /usr/include/blkio.h, compiled by gcc."""

from __future__ import annotations

import re
import struct
import subprocess
from pathlib import Path

import pytest

from xenblk_vhost.storage import cdef
from xenblk_vhost.storage.cdef import ffi

HEADER = Path("/usr/include/blkio.h")

# Functions of blkio.h we deliberately do not declare (see cdef's docstring).
ZONE_OR_SIGNAL_API = re.compile(r"zone|interruptible")


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory) -> dict[str, int]:
    """sizeof/offsetof/enum values as gcc sees them through the installed header."""
    src = tmp_path_factory.mktemp("cdef") / "layout.c"
    fields = {
        "blkio_mem_region": ["addr", "len", "iova", "fd_offset", "fd", "flags"],
        "blkio_completion": ["user_data", "error_msg", "ret"],
    }
    lines = ["#include <stddef.h>", "#include <stdio.h>", "#include <blkio.h>", "int main(void) {"]
    for s, names in fields.items():
        lines.append(f'printf("sizeof {s} %zu\\n", sizeof(struct {s}));')
        for n in names:
            lines.append(f'printf("offsetof {s}.{n} %zu\\n", offsetof(struct {s}, {n}));')
    lines.append('printf("sizeof iovec %zu\\n", sizeof(struct iovec));')
    lines.append('printf("offsetof iovec.iov_len %zu\\n", offsetof(struct iovec, iov_len));')
    for e in ("BLKIO_REQ_FUA", "BLKIO_REQ_NO_UNMAP", "BLKIO_REQ_NO_FALLBACK"):
        lines.append(f'printf("enum {e} %d\\n", (int){e});')
    lines += ["return 0; }"]
    src.write_text("\n".join(lines))
    exe = src.with_suffix("")
    subprocess.run(["gcc", "-o", str(exe), str(src)], check=True, capture_output=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {" ".join(line.split()[:2]): int(line.split()[2]) for line in out.splitlines()}


def test_struct_layouts_match_gcc(c_layout):
    for s in ("blkio_mem_region", "blkio_completion"):
        assert ffi.sizeof(f"struct {s}") == c_layout[f"sizeof {s}"]
        for key, value in c_layout.items():
            if key.startswith(f"offsetof {s}."):
                assert ffi.offsetof(f"struct {s}", key.split(".")[1]) == value, key
    assert (c_layout["sizeof blkio_mem_region"], c_layout["sizeof blkio_completion"]) == (40, 32)


def test_iovec_array_layout_matches_struct_iovec(c_layout):
    from xenblk_vhost.storage.iovec import IOVEC_SIZE

    assert IOVEC_SIZE == c_layout["sizeof iovec"]
    assert c_layout["offsetof iovec.iov_len"] == 8  # IovecArray stores (base, len) as two u64


def test_completion_decoder_matches_struct(c_layout):
    from xenblk_vhost.storage import queue

    decoder = queue._COMPLETION
    assert decoder.size == c_layout["sizeof blkio_completion"]
    # user_data at its offset, ret at its offset: pack through cffi, decode with struct.
    c = ffi.new("struct blkio_completion *")
    c.user_data = ffi.cast("void *", 0x1234_5678_9ABC)
    c.ret = -61
    assert decoder.unpack(bytes(ffi.buffer(c))) == (0x1234_5678_9ABC, -61)
    assert struct.calcsize("=Q") == c_layout["offsetof blkio_completion.error_msg"]


def test_request_flags_match_header(c_layout):
    assert cdef.REQ_FUA == c_layout["enum BLKIO_REQ_FUA"]
    assert cdef.REQ_NO_UNMAP == c_layout["enum BLKIO_REQ_NO_UNMAP"]
    assert cdef.REQ_NO_FALLBACK == c_layout["enum BLKIO_REQ_NO_FALLBACK"]


def _prototypes(text: str) -> dict[str, str]:
    """function name -> normalised prototype, from C declarations."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", text, flags=re.S)
    protos = {}
    for m in re.finditer(r"([A-Za-z_][\w \*]*?\b(\w+)\s*\(([^;{]*?)\))\s*;", text):
        name = m.group(2)
        if name.startswith(("blkio", "free")):
            protos[name] = re.sub(r"\s+", " ", re.sub(r"\s*\*\s*", " *", m.group(1))).strip()
    return protos


def _header_to_ours(name: str, proto: str) -> str:
    """Apply cdef's documented substitution: pointer data/user_data args -> uintptr_t."""
    if name not in cdef.HOT_PATH_FUNCTIONS:
        return proto
    proto = re.sub(r"(const )?void \*(buf|user_data)\b", r"uintptr_t \2", proto)
    return re.sub(r"(const )?struct iovec \*iovec\b", "uintptr_t iovec", proto)


def test_every_declared_function_matches_header_prototype():
    header = _prototypes(HEADER.read_text())
    ours = _prototypes(cdef.CDEF)
    assert len(header) > 30  # the parser really read the header
    for name, proto in ours.items():
        if name == "free":
            continue
        assert name in header, f"{name} is not in blkio.h"
        assert _header_to_ours(name, header[name]) == proto, name


def test_only_zone_and_signal_functions_are_left_out():
    header = _prototypes(HEADER.read_text())
    ours = _prototypes(cdef.CDEF)
    missing = sorted(set(header) - set(ours))
    assert missing and all(ZONE_OR_SIGNAL_API.search(n) for n in missing), missing
