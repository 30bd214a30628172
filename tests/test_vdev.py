"""Device names against the numbers in Xen's docs/misc/vbd-interface."""

import pytest

from xenblk_vhost.vdev import VdevError, parse_vdev, vdev_name

# Worked values: xvda = 202<<8 = 51712 is what libxl writes for `xvda`; the rest follow the
# encoding table of vbd-interface (xvd disk<16, partition<16; extended 1<<28 form beyond).
KNOWN = [
    ("xvda", 51712), ("xvdb", 51728), ("xvda1", 51713), ("xvdp15", 202 << 8 | 15 << 4 | 15),
    ("xvdq", 1 << 28 | 16 << 8), ("xvdaa", 1 << 28 | 26 << 8), ("xvda16", 1 << 28 | 16),
    ("sda", 2048), ("sdb3", 8 << 8 | 1 << 4 | 3), ("hda", 768), ("hdb", 768 | 64), ("hdc", 22 << 8),
    ("hdd1", 22 << 8 | 64 | 1), ("d0p1", 51713), ("d0", 51712),
]


@pytest.mark.parametrize("name, number", KNOWN)
def test_known_names(name, number):
    assert parse_vdev(name) == number
    assert parse_vdev(number) == number
    assert parse_vdev(str(number)) == number


@pytest.mark.parametrize("name", [n for n, _ in KNOWN if not n.startswith("d")])
def test_name_round_trips(name):
    assert vdev_name(parse_vdev(name)) == name


@pytest.mark.parametrize("bad", ["xvd", "vda", "sdq", "hde", "xvda0", "xvda256", 0, -1, True, "d0p999",
                                 None, 1.5, ["xvda"], {"xvda": 1}])
def test_bad_names(bad):
    with pytest.raises(VdevError):
        parse_vdev(bad)
