"""YAML per domain: typed objects on good input, `FILE:LINE: key: reason` on bad."""

import socket
import textwrap

import pytest

from xenblk_vhost.config import ConfigError, load_config, load_configs, parse_size


@pytest.fixture
def disk_img(tmp_path):
    img = tmp_path / "disk.img"
    img.write_bytes(b"\0" * 4096)
    return img


def write(tmp_path, text, name="dom.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def problems(path):
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(p) for p in info.value.problems]


def test_full_disk_is_read_into_typed_values(tmp_path, disk_img):
    path = write(tmp_path, f"""
        domain:
          name: web1
        disks:
          - vdev: xvdb
            driver: io_uring
            path: {disk_img}
            direct: true
            readonly: true
            queues: 2
            ring_page_order: 3
            max_indirect_segments: 64
            data_path: map
            persistent_grants: false
            discard: false
            limits: {{max_inflight: 64, memory: 16MiB}}
            properties: {{num-entries: 128}}
        """)
    cfg = load_config(path)
    assert (cfg.name, cfg.domid) == ("web1", None)
    (disk,) = cfg.disks
    assert disk.vdev == 51728 and disk.name == "xvdb"
    assert (disk.driver, disk.path, disk.direct, disk.readonly) == ("io_uring", str(disk_img), True, True)
    assert (disk.queues, disk.ring_page_order, disk.max_indirect_segments) == (2, 3, 64)
    assert (disk.data_path, disk.persistent_grants, disk.discard) == ("map", False, False)
    assert (disk.max_inflight, disk.memory) == (64, 16 << 20)
    assert disk.blkio_properties() == {"path": str(disk_img), "direct": True, "read-only": True,
                                       "num-entries": 128}
    assert cfg.matches(7, "web1") and not cfg.matches(7, "web2")


def test_defaults_and_relative_path(tmp_path, disk_img):
    path = write(tmp_path, """
        domain: {domid: 3}
        disks:
          - {vdev: 51712, driver: io_uring, path: disk.img}
        """)
    cfg = load_config(path)
    disk = cfg.disks[0]
    assert disk.path == str(disk_img)
    assert (disk.queues, disk.ring_page_order, disk.max_indirect_segments, disk.data_path) == (4, 4, 256, "copy")
    assert cfg.matches(3, None) and not cfg.matches(4, None)


def test_every_problem_is_reported_with_file_line_and_key(tmp_path, disk_img):
    path = write(tmp_path, f"""
        domain:
          name: web1
        disks:
          - vdev: xvda
            driver: io_uring
            path: {disk_img}
            queuez: 2
            ring_page_order: 9
            readonly: "yes"
          - vdev: xvda
            driver: floppy
            path: /nonexistent
        """)
    got = problems(path)
    assert f"{path}:7: disks[0].queuez: unknown key (did you mean 'queues'?)" in got
    assert f"{path}:8: disks[0].ring_page_order: must be between 0 and 4, got 9" in got
    assert f"{path}:9: disks[0].readonly: must be true or false, got a string" in got
    assert any(p.startswith(f"{path}:11: disks[1].driver: must be one of io_uring") for p in got)
    assert len(got) == 4


def test_missing_storage_and_wrong_kind_are_refused(tmp_path, disk_img):
    path = write(tmp_path, f"""
        domain: {{name: a}}
        disks:
          - {{vdev: xvda, driver: io_uring, path: /no/such.img}}
          - {{vdev: xvdb, driver: virtio-blk-vhost-user, path: {disk_img}}}
        """)
    assert problems(path) == [
        f"{path}:3: disks[0].path: /no/such.img: no such file (file or block device expected)",
        f"{path}:4: disks[1].path: {disk_img}: not a vhost-user-blk unix socket",
    ]


def test_vhost_user_socket_is_accepted_and_map_refused(tmp_path):
    sock_path = tmp_path / "vu.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(sock_path))
        ok = write(tmp_path, f"""
            domain: {{name: a}}
            disks:
              - {{vdev: xvda, driver: virtio-blk-vhost-user, path: {sock_path}}}
            """, "ok.yaml")
        assert load_config(ok).disks[0].driver == "virtio-blk-vhost-user"
        bad = write(tmp_path, f"""
            domain: {{name: a}}
            disks:
              - {{vdev: xvda, driver: virtio-blk-vhost-user, path: {sock_path}, data_path: map}}
            """, "bad.yaml")
        (problem,) = problems(bad)
        assert problem.startswith(f"{bad}:3: disks[0].data_path: map is impossible with virtio-blk-vhost-user")


def test_vhost_user_handover_path_is_a_second_socket_of_that_disk(tmp_path, disk_img):
    """handover_path: the export a new daemon connects to while the old one serves (one client per export)."""
    first, second = tmp_path / "a.sock", tmp_path / "b.sock"
    with socket.socket(socket.AF_UNIX) as a, socket.socket(socket.AF_UNIX) as b:
        a.bind(str(first))
        b.bind(str(second))
        ok = write(tmp_path, f"""
            domain: {{name: a}}
            disks:
              - {{vdev: xvda, driver: virtio-blk-vhost-user, path: {first}, handover_path: b.sock}}
            """, "ok.yaml")
        disk = load_config(ok).disks[0]
        assert (disk.path, disk.handover_path) == (str(first), str(second))  # relative: the file's directory
        assert disk.blkio_properties() == {"path": str(first)}  # not a libblkio property
        same = write(tmp_path, f"""
            domain: {{name: a}}
            disks:
              - {{vdev: xvda, driver: virtio-blk-vhost-user, path: {first}, handover_path: {first}}}
            """, "same.yaml")
        assert problems(same) == [f"{same}:3: disks[0].handover_path: must be another socket than path "
                                  "(a second export of the same node)"]
        missing = write(tmp_path, f"""
            domain: {{name: a}}
            disks:
              - {{vdev: xvda, driver: virtio-blk-vhost-user, path: {first}, handover_path: {tmp_path}/c.sock}}
            """, "missing.yaml")
        assert problems(missing)[0].startswith(f"{missing}:3: disks[0].handover_path: {tmp_path}/c.sock: no such file")
    other = write(tmp_path, f"""
        domain: {{name: a}}
        disks:
          - {{vdev: xvda, driver: io_uring, path: {disk_img}, handover_path: {disk_img}}}
        """, "other.yaml")
    assert problems(other) == [f"{other}:3: disks[0].handover_path: only for virtio-blk-vhost-user (a second "
                               "export of the same node); other storage is opened twice as it is"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("domain: [\n", ":2: yaml: "),
        ("", ":1: file: empty"),
        ("- a\n", ":1: file: must be a mapping, got a list"),
        ("domain: {name: a}\ndomain: {name: b}\ndisks: []\n", ":2: domain: duplicate key (first at line 1)"),
        ("domain: {name: a, domid: 2}\ndisks: [x]\n", ":1: domain: give `name` or `domid`, not both"),
        ("domain: {name: a}\ndisks: []\n", ":2: disks: must be a non-empty list of disks"),
        ("domain: {name: a}\ndisks:\n  - {driver: io_uring}\n", ":3: disks[0].vdev: missing (required)"),
        ("domain: {name: a}\ndisks:\n  - {vdev: xvdzzzzzzz, driver: io_uring, path: /x}\n", ":3: disks[0].vdev: "),
        # Found by the config fuzzer: `vdev:` with nothing after it is YAML null (a traceback before).
        ("domain: {name: a}\ndisks:\n  - vdev:\n    driver: io_uring\n", ":3: disks[0].vdev: a device name or number"),
        ("domain: {name: a}\ndisks:\n  - {vdev: [xvda], driver: io_uring, path: /x}\n", ":3: disks[0].vdev: a device"),
    ],
)
def test_malformed_files_get_line_numbered_errors(tmp_path, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    got = problems(path)
    assert any(p.startswith(f"{path}{expected}") for p in got), got


def test_same_vdev_twice_and_same_domain_twice(tmp_path, disk_img):
    a = write(tmp_path, f"""
        domain: {{name: a}}
        disks:
          - {{vdev: xvda, driver: io_uring, path: {disk_img}}}
          - {{vdev: 51712, driver: io_uring, path: {disk_img}}}
        """, "a.yaml")
    assert problems(a) == [f"{a}:4: disks[1].vdev: xvda is already used by the disk at line 3"]
    b = write(tmp_path, f"domain: {{name: a}}\ndisks: [{{vdev: xvda, driver: io_uring, path: {disk_img}}}]\n", "b.yaml")
    c = write(tmp_path, f"domain: {{name: a}}\ndisks: [{{vdev: xvdb, driver: io_uring, path: {disk_img}}}]\n", "c.yaml")
    with pytest.raises(ConfigError) as info:
        load_configs([b, c])
    assert str(info.value) == f"{c}:1: domain: the same domain is configured in {b}"


def test_a_file_that_cannot_be_read_is_named_without_a_line_number(tmp_path):
    """Issue 11: it said `missing.yaml:0: file: No such file or directory`."""
    missing = tmp_path / "missing.yaml"
    assert problems(missing) == [f"{missing}: file: no such file (a domain's YAML file, e.g. "
                                 "/etc/xenblk-vhost/<domain>.yaml)"]
    assert problems(tmp_path) == [f"{tmp_path}: file: not a regular file (give a domain's YAML file)"]
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes("domain: {name: caf\xe9}\n".encode("latin-1"))
    assert problems(latin) == [f"{latin}: file: not UTF-8 text (byte 18)"]


def test_a_mistyped_driver_gets_a_did_you_mean(tmp_path, disk_img):
    path = write(tmp_path, f"domain: {{name: a}}\ndisks: [{{vdev: xvda, driver: io-uring, path: {disk_img}}}]\n")
    assert problems(path) == [
        f"{path}:2: disks[0].driver: must be one of io_uring, nvme-io_uring, virtio-blk-vhost-user, "
        "virtio-blk-vhost-vdpa, virtio-blk-vfio-pci, got 'io-uring' (did you mean 'io_uring'?)"]
    path.write_text(path.read_text().replace("io-uring", "nvme"))  # nothing close enough: no guess
    assert problems(path)[0].endswith("got 'nvme'")


def test_reload_changes_are_described_per_domain_and_disk(tmp_path, disk_img):
    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * 4096)
    a = write(tmp_path, f"""
        domain: {{name: web1}}
        disks:
          - {{vdev: xvda, driver: io_uring, path: {disk_img}}}
          - {{vdev: xvdb, driver: io_uring, path: {disk_img}}}
          - {{vdev: xvdc, driver: io_uring, path: {disk_img}}}
        """, "web1.yaml")
    old = load_configs([a])
    write(tmp_path, f"""
        domain: {{name: web1}}
        disks:

          - {{vdev: xvda, driver: io_uring, path: {disk_img}}}
          - {{vdev: xvdb, driver: io_uring, path: {other}, queues: 2, limits: {{memory: 8MiB}}}}
          - {{vdev: xvdd, driver: io_uring, path: {disk_img}}}
        """, "web1.yaml")
    b = write(tmp_path, f"domain: {{domid: 7}}\ndisks: [{{vdev: xvda, driver: io_uring, path: {disk_img}}}]\n",
              "seven.yaml")
    new = load_configs([a, b])
    from xenblk_vhost.config import describe_changes

    # xvda only moved a line down: no change (line numbers are not part of a disk).
    assert describe_changes(old, new, attached={("web1", 51728)}) == [
        "web1/xvdb: path, queues, limits.memory changed; attached now: applies when the guest next connects it",
        "web1/xvdd: added",
        "web1/xvdc: removed",
        f"7: added (xvda) from {b}",
    ]
    assert describe_changes(new, old) == ["web1/xvdb: path, queues, limits.memory changed", "web1/xvdc: added",
                                          "web1/xvdd: removed", "7: removed"]
    assert describe_changes(old, old) == []


@pytest.mark.parametrize("value, expected", [(4096, 4096), ("64MiB", 64 << 20), ("512k", 512 << 10), ("1G", 1 << 30)])
def test_sizes(value, expected):
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", ["lots", True, -1, "1.5G"])
def test_bad_sizes(value):
    with pytest.raises(ValueError):
        parse_size(value)


def test_check_storage_false_skips_only_the_storage_check(tmp_path, disk_img):
    path = write(tmp_path, f"""
        domain: {{name: later}}
        disks:
          - {{vdev: xvda, driver: io_uring, path: /nonexistent/later.img}}
          - {{vdev: xvdb, driver: virtio-blk-vhost-user, path: /nonexistent/later.sock}}
          - {{vdev: xvdc, driver: io_uring, path: {disk_img}, queues: 0}}
        """)
    # Strict (what `run` does): both missing paths are refused.
    assert problems(path) == [
        f"{path}:3: disks[0].path: /nonexistent/later.img: no such file (file or block device expected)",
        f"{path}:4: disks[1].path: /nonexistent/later.sock: no such file (vhost-user-blk unix socket expected; "
        "is the storage daemon that exports it running? (systemctl status 'qemu-storage-daemon@*'))",
        f"{path}:5: disks[2].queues: must be between 1 and 64, got 0",
    ]
    # Without the storage check, every other check still holds.
    with pytest.raises(ConfigError) as info:
        load_configs([path], check_storage=False)
    assert [str(p) for p in info.value.problems] == [f"{path}:5: disks[2].queues: must be between 1 and 64, got 0"]
    path.write_text(path.read_text().replace("queues: 0", "queues: 1"))
    (cfg,) = load_configs([path], check_storage=False)
    assert [(d.name, d.path) for d in cfg.disks] == [
        ("xvda", "/nonexistent/later.img"), ("xvdb", "/nonexistent/later.sock"), ("xvdc", str(disk_img))]


@pytest.mark.parametrize("text, problem", [
    # Each escaped parse_config as a bare exception (found writing the config fuzz target), which
    # `check` printed as a traceback and a SIGHUP reload did not catch.
    ("domain: {domid: " + "1" * 5000 + "}\n", "1: yaml: cannot read '1111111111"),   # int()'s digit limit
    ("domain:\n  name: 2001-13-01\n", "2: yaml: cannot read '2001-13-01': month must be in 1..12"),
    ("domain:\n  name: 2001-02-30\n", "2: yaml: cannot read '2001-02-30': day is out of range for month"),
    ("domain: {name: 2001-01-01 00:00:00 +99:00}\n", "1: yaml: cannot read '2001-01-01 00:00:00 +99:00'"),
    ("[" * 5000, ": yaml: nested too deeply"),                                          # RecursionError
    ("domain: " + "{a: " * 3000 + "1" + "}" * 3000 + "\n", ": yaml: nested too deeply"),
    # PyYAML's scanner is quadratic in open flow collections: 4,000 '[' took seconds before the
    # depth limit refused them at the 33rd (found by the config fuzz target: a 25 s timeout)
    ("disks: " + "[" * 4000, "1: yaml: nested too deeply (more than 32 levels)"),
])
def test_yaml_values_python_cannot_build_are_problems(tmp_path, text, problem):
    path = tmp_path / "dom.yaml"
    path.write_text(text)
    found = problems(path)
    assert len(found) == 1 and found[0].startswith(f"{path}") and problem in found[0], found
