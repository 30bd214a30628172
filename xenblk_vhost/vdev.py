"""Virtual device names <-> the xenstore device number (docs/misc/vbd-interface).

The number is what appears as `<devid>` in `backend/vbd/<domid>/<devid>`:

- `xvdX[N]`, disk < 16 and partition < 16:  202 << 8 | disk << 4 | partition
- `xvdX[N]` beyond that (disk < 2**20, partition < 256): 1 << 28 | disk << 8 | partition
- `sdX[N]`  (disk < 16, partition < 16):  8 << 8 | disk << 4 | partition
- `hdX[N]`  (disk < 4, partition < 64):  hda/hdb major 3, hdc/hdd major 22, disk%2 << 6 | partition
- `dDpP` / `dD` is the Xen-neutral spelling of an xvd disk.

Disk letters count like spreadsheet columns: a=0 ... z=25, aa=26.
"""

from __future__ import annotations

import re

XVD_MAJOR = 202
SD_MAJOR = 8
HD_MAJORS = (3, 22)
EXTENDED = 1 << 28

_NAME = re.compile(r"^(xvd|sd|hd)([a-z]+)([0-9]*)$")
_NEUTRAL = re.compile(r"^d([0-9]+)(?:p([0-9]+))?$")


class VdevError(ValueError):
    pass


def _letters_to_index(letters: str) -> int:
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


def _index_to_letters(index: int) -> str:
    out = ""
    index += 1
    while index:
        index, rem = divmod(index - 1, 26)
        out = chr(ord("a") + rem) + out
    return out


def _xvd(disk: int, partition: int) -> int:
    if disk < 16 and partition < 16:
        return XVD_MAJOR << 8 | disk << 4 | partition
    if disk < (1 << 20) and partition < 256:
        return EXTENDED | disk << 8 | partition
    raise VdevError(f"xvd disk {disk} partition {partition} out of range")


def parse_vdev(value: object) -> int:
    """Device number for a name like 'xvda', 'xvdb1', 'sdc', 'hda', 'd0p1' or a number."""
    if isinstance(value, bool):
        raise VdevError("a device name or number is needed, not a boolean")
    if isinstance(value, int):
        if value <= 0 or value >= 1 << 29:
            raise VdevError(f"device number {value} out of range")
        return value
    if not isinstance(value, str):
        # A YAML file can give anything here: `vdev:` alone is None, `vdev: [a]` a list.
        raise VdevError(f"a device name or number is needed, not {type(value).__name__}")
    text = value.strip()
    if text.isdigit():
        return parse_vdev(int(text))
    m = _NEUTRAL.match(text)
    if m:
        return _xvd(int(m.group(1)), int(m.group(2) or 0))
    m = _NAME.match(text)
    if not m:
        raise VdevError(f"{value!r} is not a virtual device name (xvda, xvdb1, sda, hda, d0p1) or number")
    kind, letters, part_text = m.groups()
    disk = _letters_to_index(letters)
    partition = int(part_text) if part_text else 0
    if part_text and partition == 0:
        raise VdevError(f"{value!r}: partition numbers start at 1")
    if kind == "xvd":
        return _xvd(disk, partition)
    if kind == "sd":
        if disk >= 16 or partition >= 16:
            raise VdevError(f"{value!r}: sd supports disks sda..sdp and partitions < 16")
        return SD_MAJOR << 8 | disk << 4 | partition
    if disk >= 4 or partition >= 64:
        raise VdevError(f"{value!r}: hd supports disks hda..hdd and partitions < 64")
    return HD_MAJORS[disk // 2] << 8 | (disk % 2) << 6 | partition


def vdev_name(number: int) -> str:
    """The canonical name for a device number (inverse of parse_vdev)."""
    if number & EXTENDED:
        disk, partition = (number >> 8) & 0xFFFFF, number & 0xFF
        kind = "xvd"
    else:
        major, minor = number >> 8, number & 0xFF
        if major == XVD_MAJOR:
            kind, disk, partition = "xvd", minor >> 4, minor & 0xF
        elif major == SD_MAJOR:
            kind, disk, partition = "sd", minor >> 4, minor & 0xF
        elif major in HD_MAJORS:
            kind, disk, partition = "hd", HD_MAJORS.index(major) * 2 + (minor >> 6), minor & 0x3F
        else:
            return str(number)
    return f"{kind}{_index_to_letters(disk)}{partition or ''}"
