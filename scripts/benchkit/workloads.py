"""What bench.py runs: workloads (what the guest asks for) and cases (on which backend).

A workload is the guest's side only: operation, access pattern, request
size, queue depth per ring, ring order, number of rings. The same workload
runs on the bridge (xenblk-vhost on the simulated hypervisor), on the null
responder (the load generator's ceiling) and on raw libblkio (the storage's
own figure), so the three are comparable line by line.
"""

from __future__ import annotations

from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
SECTOR = 512
PAGE = 4096
# Segments per request that fit in a ring slot; bigger requests are indirect
# (BLKIF_MAX_SEGMENTS_PER_REQUEST, xen/io/blkif.h).
DIRECT_SEGMENTS = 11
SEGMENTS_PER_INDIRECT_PAGE = PAGE // 8


@dataclass(frozen=True)
class Workload:
    op: str        # "read" | "write"
    pattern: str   # "rand" | "seq"
    bs: int        # bytes per request
    qd: int        # requests in flight per ring
    order: int     # ring page order (0: 32 slots, 4: 512 slots)
    rings: int     # rings (one storage queue each)

    @property
    def name(self) -> str:
        size = f"{self.bs // MIB}m" if self.bs >= MIB else f"{self.bs // KIB}k"
        return f"{size}-{self.pattern}{self.op}-qd{self.qd}-o{self.order}-r{self.rings}"

    @property
    def pages(self) -> int:
        """Guest pages (segments) per request."""
        return self.bs // PAGE

    @property
    def indirect(self) -> bool:
        return self.pages > DIRECT_SEGMENTS

    @property
    def shape(self) -> tuple:
        """What the null responder's ceiling depends on (not the operation: it touches no data)."""
        return (self.pattern, self.bs, self.qd, self.order, self.rings)

    def __post_init__(self) -> None:
        if self.op not in ("read", "write") or self.pattern not in ("rand", "seq"):
            raise ValueError(f"bad workload {self}")
        if self.bs % PAGE or self.bs <= 0:
            raise ValueError("request size must be a multiple of 4 KiB")
        if self.qd > ring_slots(self.order):
            raise ValueError(f"{self.name}: QD {self.qd} exceeds the {ring_slots(self.order)} slots "
                             f"of an order-{self.order} ring")


def ring_slots(order: int) -> int:
    """__RING_SIZE of a native blkif ring of 2**order pages (64-byte header, 112-byte slots)."""
    n = ((PAGE << order) - 64) // 112
    return 1 << (n.bit_length() - 1)


def _both(pattern: str, bs: int, qd: int, order: int, rings: int) -> list[Workload]:
    return [Workload(op, pattern, bs, qd, order, rings) for op in ("read", "write")]


# The matrix: 4 KiB random read/write at QD 1, 32, 128 (order 0 holds
# 32 slots, so QD128 runs on order 4, with 1 and 2 rings), 128 KiB and 1 MiB
# sequential.
FULL = (
    _both("rand", 4 * KIB, 1, 0, 1)
    + _both("rand", 4 * KIB, 32, 0, 1)
    + _both("rand", 4 * KIB, 128, 4, 1)
    + _both("rand", 4 * KIB, 128, 4, 2)
    + _both("seq", 128 * KIB, 8, 0, 1)
    + _both("seq", 1 * MIB, 8, 0, 1)
)

# --quick: every dimension once (both operations, both orders, 1 and 2
# rings, both big sizes), short runs.
QUICK = (
    Workload("read", "rand", 4 * KIB, 1, 0, 1),
    Workload("read", "rand", 4 * KIB, 32, 0, 1),
    Workload("write", "rand", 4 * KIB, 32, 0, 1),
    Workload("read", "rand", 4 * KIB, 128, 4, 1),
    Workload("read", "rand", 4 * KIB, 128, 4, 2),
    Workload("read", "seq", 128 * KIB, 8, 0, 1),
    Workload("write", "seq", 1 * MIB, 8, 0, 1),
)

# Data paths: copy (+persistent: the frontend's persistent grants mapped, the ring engine
# copying them itself) works on every driver; map (+persistent) only where the storage can
# use any memory (io_uring), not over vhost-user.
PATHS = ("copy", "copy+persistent", "map", "map+persistent")
MAP_CAPABLE_DRIVERS = frozenset({"io_uring", "nvme-io_uring"})


def parse_path(path: str) -> tuple[str, bool]:
    """'map+persistent' -> ('map', True); 'copy' -> ('copy', False)."""
    if path not in PATHS:
        raise ValueError(f"unknown data path {path!r} (one of {', '.join(PATHS)})")
    base, _, persistent = path.partition("+")
    return base, bool(persistent)


def select(workloads, names: str | None) -> list[Workload]:
    """Workloads whose name contains any of the comma-separated substrings (all if None)."""
    if not names:
        return list(workloads)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    chosen = [w for w in workloads if any(n in w.name for n in wanted)]
    if not chosen:
        raise ValueError(f"no workload matches {names!r}; names look like {workloads[0].name}")
    return chosen
