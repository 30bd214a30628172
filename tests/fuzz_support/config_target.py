"""Fuzz target: one domain's YAML file (config.parse_config, storage not looked at).

Properties:
  - the only exception is ConfigError, each problem with a line (0: the file as a whole) within the text;
  - an accepted file is what the module documents: `name` xor `domid` (1..0x7FEF), at least one disk,
    each disk's values within their documented ranges, an absolute path, no map with vhost-user;
  - round trip: the DomainConfig written back as YAML (by PyYAML's emitter, not ours) parses to an
    equal DomainConfig.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from xenblk_vhost.config import DATA_PATHS, DRIVERS, ConfigError, DomainConfig, parse_config

SOURCE = "/etc/xenblk-vhost/fuzz.yaml"
BASE = Path("/var/lib/xen")


def _as_yaml(cfg: DomainConfig) -> str:
    domain = {"name": cfg.name} if cfg.name is not None else {"domid": cfg.domid}
    disks = [{"vdev": d.vdev, "driver": d.driver, "path": d.path, "direct": d.direct, "readonly": d.readonly,
              "queues": d.queues, "ring_page_order": d.ring_page_order,
              "max_indirect_segments": d.max_indirect_segments, "data_path": d.data_path,
              "persistent_grants": d.persistent_grants, "discard": d.discard,
              "limits": {"max_inflight": d.max_inflight, "memory": d.memory},
              **({"properties": dict(d.properties)} if d.properties else {})} for d in cfg.disks]
    return yaml.safe_dump({"domain": domain, "disks": disks}, allow_unicode=True)


def _check_accepted(cfg: DomainConfig) -> None:
    assert (cfg.name is None) != (cfg.domid is None), cfg
    assert cfg.domid is None or 1 <= cfg.domid <= 0x7FEF, cfg.domid
    assert cfg.disks, "accepted without disks"
    for d in cfg.disks:
        assert d.driver in DRIVERS and d.data_path in DATA_PATHS, d
        assert d.path.startswith("/"), d.path
        assert 1 <= d.queues <= 64 and 0 <= d.ring_page_order <= 4 and 0 <= d.max_indirect_segments <= 4096, d
        assert 1 <= d.max_inflight <= 65536 and d.memory >= 1 << 20, d
        assert not (d.driver == "virtio-blk-vhost-user" and d.data_path == "map"), d
        assert all(isinstance(v, (str, int, bool)) for _k, v in d.properties), d.properties
        assert not {"path", "direct", "read-only"} & {k for k, _v in d.properties}, d.properties


def one_input(data: bytes) -> None:
    text = data.decode("utf-8", "replace")
    try:
        cfg = parse_config(text, SOURCE, BASE, check_storage=False)
    except ConfigError as e:
        assert e.problems, "ConfigError without a problem"
        # PyYAML counts \r, \r\n, NEL, LS and PS as line breaks too; it may point just past the end.
        lines = len(re.split("\r\n|[\n\r\x85\u2028\u2029]", text)) + 1
        for p in e.problems:
            assert p.source == SOURCE and 0 <= p.line <= lines, (p, lines)
        return
    _check_accepted(cfg)
    again = parse_config(_as_yaml(cfg), SOURCE, BASE, check_storage=False)
    assert again == cfg, f"round trip changed the config:\n{cfg}\n{again}"


def seeds():
    here = Path(__file__).resolve().parents[2] / "config"
    for path in sorted(here.glob("*.yaml")):
        yield path.read_bytes()
    yield (b"domain: {domid: 5}\ndisks:\n  - {vdev: 51712, driver: io_uring, path: disk.img, data_path: map,\n"
           b"     limits: {memory: 2MiB, max_inflight: 8}, properties: {num-entries: 64}}\n")
    yield b"domain:\n  name: &n web1\ndisks: [{vdev: xvdb, driver: io_uring, path: *n, queues: 0}]\n"
    yield b"domain:\n  name: 2001-13-01\ndisks: []\n"  # PyYAML's datetime() raises ValueError
    yield b"domain: " + b"[" * 2000
