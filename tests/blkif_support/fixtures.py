"""Session fixtures for the blkif tests (a plugin: tests/conftest.py loads it).

Both compile their probe once per session (see probe.py).
"""

from __future__ import annotations

import pytest

from xenblk_vhost.blkif.abi import Abi

from .probe import compile_probe, parse_key_values, run_probe

# Which gcc build describes which guest ABI: native is x86_64 on our hosts.
PROBE_BITS = {Abi.NATIVE: "64", Abi.X86_64: "64", Abi.X86_32: "32"}


@pytest.fixture(scope="session")
def xen_layouts(tmp_path_factory) -> dict[str, dict[str, str]]:
    """{"64": {...}, "32": {...}}: key=value facts gcc printed from Xen's headers."""
    tmp = tmp_path_factory.mktemp("blkif_probes")
    out = {}
    for bits in ("64", "32"):
        binary = compile_probe(tmp, "blkif_layout.c", (f"-m{bits}",))
        out[bits] = parse_key_values(run_probe(binary))
    return out


@pytest.fixture(scope="session")
def xen_ring_probe(tmp_path_factory):
    """A function: list of input lines -> list of output lines, via ring.h."""
    tmp = tmp_path_factory.mktemp("blkif_ring_probe")
    binary = compile_probe(tmp, "blkif_ring.c", ("-m64",))

    def run(lines: list[str]) -> list[str]:
        out = run_probe(binary, "\n".join(lines) + "\n").splitlines()
        assert len(out) == len(lines), f"probe answered {len(out)} of {len(lines)} states"
        return out

    return run


class ProbeOffsets:
    """Field offsets/sizes of one ABI as gcc reported them, for test-side codecs."""

    def __init__(self, kv: dict[str, str]) -> None:
        self.kv = kv

    def offset(self, struct: str, field: str) -> int:
        return int(self.kv[f"{struct}.{field}.offset"])

    def size(self, struct: str, field: str) -> int:
        return int(self.kv[f"{struct}.{field}.size"])

    def sizeof(self, struct: str) -> int:
        return int(self.kv[f"{struct}.sizeof"])

    def fields(self, struct: str) -> list[str]:
        prefix = struct + "."
        return sorted({k[len(prefix):].rsplit(".", 1)[0] for k in self.kv
                       if k.startswith(prefix) and k.endswith(".offset")})

    def get(self, buf: bytes, struct: str, field: str, signed: bool = False) -> int:
        off = self.offset(struct, field)
        return int.from_bytes(buf[off:off + self.size(struct, field)], "little", signed=signed)

    def put(self, buf: bytearray, struct: str, field: str, value: int, signed: bool = False) -> None:
        off = self.offset(struct, field)
        n = self.size(struct, field)
        buf[off:off + n] = value.to_bytes(n, "little", signed=signed)
