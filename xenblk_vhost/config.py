"""One YAML file per domain, read into validated, typed, immutable objects.

A file names its domain and its disks::

    domain:
      name: web1            # survives reboots and new domids; or `domid: 5`
    disks:
      - vdev: xvda          # or 51712
        driver: io_uring    # any libblkio driver
        path: /var/lib/xen/web1.img
        direct: true
        readonly: false
        queues: 4                 # most rings offered (multi-queue-max-queues)
        ring_page_order: 4        # largest ring offered (max-ring-page-order)
        max_indirect_segments: 256
        data_path: copy           # copy | map
        persistent_grants: true   # feature-persistent, both data paths
        ring_workers: inline      # inline | process (each ring in a process of its own)
        discard: true
        limits: {max_inflight: 128, memory: 64MiB}   # per ring
        properties: {num-entries: 256}               # passed to libblkio as is

Everything is checked before anything starts; every problem is reported at
once as `FILE:LINE: key: reason`. That includes the storage: each disk's path
must exist and be the kind of thing its driver opens. `check_storage=False`
(`xenblk-vhost check --no-storage`) leaves that one check out, for files
written on another machine than the one they will serve on (examples, a
configuration repository, a storage node whose sockets appear only when its
storage daemon starts); `run` always checks.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .vdev import VdevError, parse_vdev, vdev_name

DRIVERS = {
    "io_uring": "file or block device",
    "nvme-io_uring": "NVMe character device (/dev/ngXnY)",
    "virtio-blk-vhost-user": "vhost-user-blk unix socket",
    "virtio-blk-vhost-vdpa": "vhost-vdpa character device",
    "virtio-blk-vfio-pci": "PCI device sysfs path",
}
DATA_PATHS = ("copy", "map")
# inline: every ring in the service's process (one core for all); process: each ring of a connection
# in a worker process of its own (backend/datapath/process_vbd.py), opt-in until measured everywhere.
RING_WORKERS = ("inline", "process")

# Defaults. `copy` works with every driver (vhost-user needs its buffers in
# shared memory regions, which grant-mapped pages are not); see README for the
# measurements behind data_path and the limits.
DEFAULT_QUEUES = 4
DEFAULT_RING_PAGE_ORDER = 4
DEFAULT_MAX_INDIRECT_SEGMENTS = 256
DEFAULT_MAX_INFLIGHT = 256
DEFAULT_MEMORY = 64 << 20
MAX_RING_PAGE_ORDER = 4
MAX_INDIRECT_SEGMENTS = 8 * 512
MAX_QUEUES = 64


@dataclass(frozen=True)
class DiskConfig:
    vdev: int
    driver: str
    path: str
    direct: bool = False
    # virtio-blk-vhost-user only: a second export of the same node. A storage daemon serves one
    # client per export, so a new daemon taking over (upgrade) connects to whichever of path and
    # handover_path the running one does not use, while it still serves (daemon/handover.py).
    handover_path: str | None = None
    readonly: bool = False
    queues: int = DEFAULT_QUEUES
    ring_page_order: int = DEFAULT_RING_PAGE_ORDER
    max_indirect_segments: int = DEFAULT_MAX_INDIRECT_SEGMENTS
    data_path: str = "copy"
    persistent_grants: bool = True
    ring_workers: str = "inline"
    discard: bool = True
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    memory: int = DEFAULT_MEMORY
    properties: tuple[tuple[str, Any], ...] = ()
    # Where in the file (for problems found later, e.g. libblkio refusing a property);
    # not part of what the disk is: a reload that only moves lines changes nothing.
    line: int = field(default=0, compare=False)
    property_lines: tuple[tuple[str, int], ...] = field(default=(), compare=False)

    @property
    def name(self) -> str:
        return vdev_name(self.vdev)

    def blkio_properties(self) -> dict[str, Any]:
        """Properties for libblkio: path, direct, read-only, then the pass-through ones."""
        props: dict[str, Any] = {"path": self.path}
        if self.direct:
            props["direct"] = True
        if self.readonly:
            props["read-only"] = True
        props.update(self.properties)
        return props


@dataclass(frozen=True)
class DomainConfig:
    source: str
    name: str | None
    domid: int | None
    disks: tuple[DiskConfig, ...] = field(default_factory=tuple)

    def disk(self, vdev: int) -> DiskConfig | None:
        return next((d for d in self.disks if d.vdev == vdev), None)

    def matches(self, domid: int, name: str | None) -> bool:
        if self.domid is not None:
            return self.domid == domid
        return name is not None and name == self.name

    @property
    def label(self) -> str:
        """How the operator names the domain: its name, or its domid when the file gives one."""
        return self.name if self.name is not None else str(self.domid)


@dataclass(frozen=True)
class Problem:
    source: str
    line: int
    key: str
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.line > 0 else self.source  # the file as a whole
        return f"{where}: {self.key}: {self.reason}"


class ConfigError(Exception):
    def __init__(self, problems: Iterable[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


# ---------------------------------------------------------------- YAML with line numbers

class _Mapping(dict):
    """A YAML mapping that remembers where it and each of its keys stand."""

    line: int = 0
    key_lines: dict


class _Sequence(list):
    line: int = 0
    item_lines: list


# A domain's file nests 4 deep (disks, a disk, limits or properties). PyYAML's composer recurses per
# level and its scanner slows quadratically with open flow collections ('[' * 4000 took seconds),
# so a file nested deeper than this is refused as soon as the composer gets there.
MAX_YAML_DEPTH = 32


class _LineLoader(yaml.SafeLoader):
    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested too deeply (more than {MAX_YAML_DEPTH} levels)",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_object(self, node, deep=False):
        # PyYAML builds some scalars with Python calls that raise a bare ValueError: int() past
        # its 4,300-digit limit, datetime() for 2001-13-01 or a +99:00 offset. Give those the
        # node's place, as the YAML errors have.
        try:
            return super().construct_object(node, deep)
        except ValueError as e:
            shown = repr(node.value[:40] if isinstance(node.value, str) else node.tag)
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {shown}: {e}", node.start_mark) from None


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> _Mapping:
    loader.flatten_mapping(node)
    out = _Mapping()
    out.line = node.start_mark.line + 1
    out.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        if not isinstance(key, str):
            raise _YamlProblem(line, str(key), "keys must be strings")
        if key in out:
            raise _YamlProblem(line, key, f"duplicate key (first at line {out.key_lines[key]})")
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_lines[key] = line
    return out


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> _Sequence:
    out = _Sequence(loader.construct_object(child, deep=True) for child in node.value)
    out.line = node.start_mark.line + 1
    out.item_lines = [child.start_mark.line + 1 for child in node.value]
    return out


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


class _YamlProblem(Exception):
    def __init__(self, line: int, key: str, reason: str):
        self.line, self.key, self.reason = line, key, reason


# ---------------------------------------------------------------- validation

_SIZE = re.compile(r"^\s*(\d+)\s*(|k|ki|kib|kb|m|mi|mib|mb|g|gi|gib|gb)\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1 << 20, "g": 1 << 30}


def parse_size(value: Any) -> int:
    """Bytes from an int or a string like '64MiB' / '512k' (binary units)."""
    if isinstance(value, bool):
        raise ValueError("a size is needed, not a boolean")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2)[:1].lower()]
    raise ValueError(f"{value!r} is not a size (e.g. 67108864, 64MiB, 512k)")


class _Checker:
    """Collects problems for one file; each check reports `FILE:LINE: key: reason`."""

    def __init__(self, source: str):
        self.source = source
        self.problems: list[Problem] = []

    def problem(self, line: int, key: str, reason: str) -> None:
        self.problems.append(Problem(self.source, line, key, reason))

    def mapping(self, value: Any, line: int, key: str) -> _Mapping | None:
        if isinstance(value, _Mapping):
            return value
        self.problem(line, key, f"must be a mapping, got {_type_name(value)}")
        return None

    def unknown_keys(self, mapping: _Mapping, allowed: Iterable[str], where: str) -> None:
        allowed = set(allowed)
        for key in mapping:
            if key not in allowed:
                hint = _closest(key, allowed)
                self.problem(mapping.key_lines[key], f"{where}{key}",
                             "unknown key" + (f" (did you mean {hint!r}?)" if hint else ""))

    def typed(self, mapping: _Mapping, key: str, kind: type, default: Any, where: str,
              lo: int | None = None, hi: int | None = None, choices: Iterable[str] | None = None) -> Any:
        if key not in mapping:
            return default
        value, line, name = mapping[key], mapping.key_lines[key], f"{where}{key}"
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            self.problem(line, name, f"must be an integer, got {_type_name(value)}")
            return default
        if kind is bool and not isinstance(value, bool):
            self.problem(line, name, f"must be true or false, got {_type_name(value)}")
            return default
        if kind is str and not isinstance(value, str):
            self.problem(line, name, f"must be a string, got {_type_name(value)}")
            return default
        if lo is not None and value < lo or hi is not None and value > hi:
            self.problem(line, name, f"must be between {lo} and {hi}, got {value}")
            return default
        if choices is not None and value not in choices:
            hint = _closest(value, set(choices))
            self.problem(line, name, f"must be one of {', '.join(choices)}, got {value!r}"
                         + (f" (did you mean {hint!r}?)" if hint else ""))
            return default
        return value


def _type_name(value: Any) -> str:
    if value is None:
        return "nothing"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            _Mapping: "a mapping", _Sequence: "a list"}.get(type(value), type(value).__name__)


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    found = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.6)
    return found[0] if found else None


# The file's schema, key by key (docs/man/xenblk-vhost.yaml.5 documents each one; tests/test_manpages.py
# compares the page with these and with the defaults and bounds above and below).
ROOT_KEYS = ("domain", "disks")
DOMAIN_KEYS = ("name", "domid")
DISK_KEYS = ("vdev", "driver", "path", "handover_path", "direct", "readonly", "queues", "ring_page_order",
             "max_indirect_segments", "data_path", "persistent_grants", "ring_workers", "discard", "limits",
             "properties")
LIMIT_KEYS = ("max_inflight", "memory")
MAX_DOMID = 0x7FEF  # DOMID_FIRST_RESERVED - 1
MAX_INFLIGHT_LIMIT = 65536
MIN_MEMORY = 1 << 20


def _check_target(check: _Checker, driver: str, path: str, line: int, key: str) -> None:
    """The storage a disk names must exist, and be the kind of thing its driver opens."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        hint = ("; is the storage daemon that exports it running? (systemctl status 'qemu-storage-daemon@*')"
                if driver == "virtio-blk-vhost-user" else "")
        check.problem(line, key, f"{path}: no such file ({DRIVERS[driver]} expected{hint})")
        return
    except OSError as e:
        check.problem(line, key, f"{path}: {e.strerror}")
        return
    mode = st.st_mode
    ok = {
        "io_uring": stat.S_ISREG(mode) or stat.S_ISBLK(mode),
        "nvme-io_uring": stat.S_ISCHR(mode),
        "virtio-blk-vhost-user": stat.S_ISSOCK(mode),
        "virtio-blk-vhost-vdpa": stat.S_ISCHR(mode),
        "virtio-blk-vfio-pci": stat.S_ISDIR(mode),
    }[driver]
    if not ok:
        check.problem(line, key, f"{path}: not a {DRIVERS[driver]}")


def _disk(check: _Checker, item: Any, line: int, index: int, base: Path,
          check_storage: bool = True) -> DiskConfig | None:
    where = f"disks[{index}]."
    disk = check.mapping(item, line, f"disks[{index}]")
    if disk is None:
        return None
    check.unknown_keys(disk, DISK_KEYS, where)
    before = len(check.problems)
    for required in ("vdev", "driver", "path"):
        if required not in disk:
            check.problem(disk.line, f"{where}{required}", "missing (required)")
    vdev = 0
    if "vdev" in disk:
        try:
            vdev = parse_vdev(disk["vdev"])
        except VdevError as e:
            check.problem(disk.key_lines["vdev"], f"{where}vdev", str(e))
    driver = check.typed(disk, "driver", str, None, where, choices=list(DRIVERS))
    path = check.typed(disk, "path", str, None, where)
    if path is not None and driver is not None:
        if not os.path.isabs(path):
            path = str(base / path)
        if check_storage:
            _check_target(check, driver, path, disk.key_lines["path"], f"{where}path")
    handover_path = check.typed(disk, "handover_path", str, None, where)
    if handover_path is not None:
        if driver is not None and driver != "virtio-blk-vhost-user":
            check.problem(disk.key_lines["handover_path"], f"{where}handover_path",
                          "only for virtio-blk-vhost-user (a second export of the same node); "
                          "other storage is opened twice as it is")
        else:
            if not os.path.isabs(handover_path):
                handover_path = str(base / handover_path)
            if handover_path == path:
                check.problem(disk.key_lines["handover_path"], f"{where}handover_path",
                              "must be another socket than path (a second export of the same node)")
            elif check_storage and driver is not None:
                _check_target(check, driver, handover_path, disk.key_lines["handover_path"],
                              f"{where}handover_path")
    direct = check.typed(disk, "direct", bool, False, where)
    readonly = check.typed(disk, "readonly", bool, False, where)
    queues = check.typed(disk, "queues", int, DEFAULT_QUEUES, where, 1, MAX_QUEUES)
    order = check.typed(disk, "ring_page_order", int, DEFAULT_RING_PAGE_ORDER, where, 0, MAX_RING_PAGE_ORDER)
    indirect = check.typed(disk, "max_indirect_segments", int, DEFAULT_MAX_INDIRECT_SEGMENTS, where,
                           0, MAX_INDIRECT_SEGMENTS)
    data_path = check.typed(disk, "data_path", str, "copy", where, choices=DATA_PATHS)
    persistent = check.typed(disk, "persistent_grants", bool, True, where)
    discard = check.typed(disk, "discard", bool, True, where)
    ring_workers = check.typed(disk, "ring_workers", str, "inline", where, choices=RING_WORKERS)
    if driver is not None and driver.startswith("virtio-blk-vhost") and ring_workers == "process":
        check.problem(disk.key_lines["ring_workers"], f"{where}ring_workers",
                      "process is not supported with virtio-blk-vhost-*: each worker would need a "
                      "connection (a server export) of its own; use inline")
    if driver == "virtio-blk-vhost-user" and data_path == "map":
        check.problem(disk.key_lines["data_path"], f"{where}data_path",
                      "map is impossible with virtio-blk-vhost-user: its buffers must live in "
                      "memory shared with the vhost-user server; use copy")
    max_inflight, memory = DEFAULT_MAX_INFLIGHT, DEFAULT_MEMORY
    if "limits" in disk:
        limits = check.mapping(disk["limits"], disk.key_lines["limits"], f"{where}limits")
        if limits is not None:
            lwhere = f"{where}limits."
            check.unknown_keys(limits, LIMIT_KEYS, lwhere)
            max_inflight = check.typed(limits, "max_inflight", int, DEFAULT_MAX_INFLIGHT, lwhere, 1,
                                           MAX_INFLIGHT_LIMIT)
            if "memory" in limits:
                try:
                    memory = parse_size(limits["memory"])
                    if memory < MIN_MEMORY:
                        raise ValueError(f"{memory} bytes is below the 1MiB minimum")
                except ValueError as e:
                    check.problem(limits.key_lines["memory"], f"{lwhere}memory", str(e))
    properties: tuple[tuple[str, Any], ...] = ()
    property_lines: tuple[tuple[str, int], ...] = ()
    if "properties" in disk:
        props = check.mapping(disk["properties"], disk.key_lines["properties"], f"{where}properties")
        if props is not None:
            for key, value in props.items():
                if key in ("path", "direct", "read-only"):
                    check.problem(props.key_lines[key], f"{where}properties.{key}",
                                  f"set it with the disk's own key ({'readonly' if key == 'read-only' else key})")
                elif not isinstance(value, (str, int, bool)):
                    check.problem(props.key_lines[key], f"{where}properties.{key}",
                                  f"must be a string, integer or boolean, got {_type_name(value)}")
            properties = tuple(props.items())
            property_lines = tuple((key, props.key_lines[key]) for key in props)
    if len(check.problems) > before:
        return None
    return DiskConfig(vdev=vdev, driver=driver, path=path, handover_path=handover_path, direct=direct,
                      readonly=readonly,
                      queues=queues, ring_page_order=order, max_indirect_segments=indirect,
                      data_path=data_path, persistent_grants=persistent, ring_workers=ring_workers,
                      discard=discard,
                      max_inflight=max_inflight, memory=memory, properties=properties, line=disk.line,
                      property_lines=property_lines)


def parse_config(text: str, source: str = "<config>", base: Path | None = None, *,
                 check_storage: bool = True) -> DomainConfig:
    """Validate one domain's YAML; raise ConfigError listing every problem.
    check_storage=False: do not look at the disks' paths (see the module doc)."""
    check = _Checker(source)
    base = base or Path(source).resolve().parent
    try:
        doc = yaml.load(text, Loader=_LineLoader)  # noqa: S506 - _LineLoader is a SafeLoader
    except _YamlProblem as e:
        raise ConfigError([Problem(source, e.line, e.key, e.reason)]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else 0
        raise ConfigError([Problem(source, line, "yaml", f"{e.problem or e.context}")]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(source, 0, "yaml", str(e))]) from None
    except RecursionError:  # PyYAML's parser and constructor recurse once per nesting level
        raise ConfigError([Problem(source, 0, "yaml", "nested too deeply")]) from None
    if doc is None:
        raise ConfigError([Problem(source, 1, "file", "empty: needs `domain` and `disks`")])
    root = check.mapping(doc, 1, "file")
    if root is None:
        raise ConfigError(check.problems)
    check.unknown_keys(root, ROOT_KEYS, "")
    name = domid = None
    if "domain" not in root:
        check.problem(root.line, "domain", "missing (required): give `name` or `domid`")
    else:
        dom = check.mapping(root["domain"], root.key_lines["domain"], "domain")
        if dom is not None:
            check.unknown_keys(dom, DOMAIN_KEYS, "domain.")
            name = check.typed(dom, "name", str, None, "domain.")
            domid = check.typed(dom, "domid", int, None, "domain.", 1, MAX_DOMID)
            if "name" in dom and "domid" in dom:
                check.problem(dom.line, "domain", "give `name` or `domid`, not both")
            elif "name" not in dom and "domid" not in dom:
                check.problem(dom.line, "domain", "needs `name` (preferred) or `domid`")
    disks: list[DiskConfig] = []
    if "disks" not in root:
        check.problem(root.line, "disks", "missing (required): a list of disks")
    elif not isinstance(root["disks"], _Sequence) or not root["disks"]:
        check.problem(root.key_lines["disks"], "disks", "must be a non-empty list of disks")
    else:
        seq = root["disks"]
        for i, (item, line) in enumerate(zip(seq, seq.item_lines)):
            disk = _disk(check, item, line, i, base, check_storage)
            if disk is None:
                continue
            clash = next((d for d in disks if d.vdev == disk.vdev), None)
            if clash is not None:
                check.problem(line, f"disks[{i}].vdev",
                              f"{disk.name} is already used by the disk at line {clash.line}")
                continue
            disks.append(disk)
    if check.problems:
        raise ConfigError(check.problems)
    return DomainConfig(source=source, name=name, domid=domid, disks=tuple(disks))


def load_config(path: str | os.PathLike, *, check_storage: bool = True) -> DomainConfig:
    p = Path(path)
    try:
        if not p.is_file() and p.exists():
            raise ConfigError([Problem(str(p), 0, "file", "not a regular file (give a domain's YAML file)")])
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError([Problem(str(p), 0, "file", "no such file (a domain's YAML file, e.g. "
                                                      "/etc/xenblk-vhost/<domain>.yaml)")]) from None
    except OSError as e:
        raise ConfigError([Problem(str(p), 0, "file", f"cannot read it: {e.strerror or e}")]) from None
    except UnicodeDecodeError as e:
        raise ConfigError([Problem(str(p), 0, "file", f"not UTF-8 text (byte {e.start})")]) from None
    return parse_config(text, source=str(p), base=p.resolve().parent, check_storage=check_storage)


def load_configs(paths: Iterable[str | os.PathLike], *, check_storage: bool = True) -> list[DomainConfig]:
    """Load several files; all problems from all files in one ConfigError."""
    configs, problems = [], []
    for path in paths:
        try:
            configs.append(load_config(path, check_storage=check_storage))
        except ConfigError as e:
            problems.extend(e.problems)
    seen: dict[tuple[str, Any], DomainConfig] = {}
    for cfg in configs:
        key = ("name", cfg.name) if cfg.name is not None else ("domid", cfg.domid)
        if key in seen:
            problems.append(Problem(cfg.source, 1, "domain",
                                    f"the same domain is configured in {seen[key].source}"))
        seen[key] = cfg
    if problems:
        raise ConfigError(problems)
    return configs


# ---------------------------------------------------------------- what a reload changes

# DiskConfig fields as the YAML spells them (the others have the same name).
_YAML_KEYS = {"max_inflight": "limits.max_inflight", "memory": "limits.memory"}


def _changed_keys(old: DiskConfig, new: DiskConfig) -> list[str]:
    return [_YAML_KEYS.get(f.name, f.name) for f in fields(DiskConfig)
            if f.compare and getattr(old, f.name) != getattr(new, f.name)]


def describe_changes(old: Iterable[DomainConfig], new: Iterable[DomainConfig], *,
                     attached: frozenset[tuple[str, int]] | set[tuple[str, int]] = frozenset()) -> list[str]:
    """What going from `old` to `new` changes, one line per domain or disk, for the operator.

    `attached`: the (domain label, devid) of disks a guest has attached now. A
    running disk keeps what it connected with until its frontend next
    connects (Service.reload), and the lines say so.
    """
    before = {c.label: c for c in old}
    after = {c.label: c for c in new}
    lines = []
    for label, cfg in after.items():
        prev = before.get(label)
        if prev is None:
            lines.append(f"{label}: added ({', '.join(d.name for d in cfg.disks)}) from {cfg.source}")
            continue
        for disk in cfg.disks:
            was = prev.disk(disk.vdev)
            live = (label, disk.vdev) in attached
            if was is None:
                lines.append(f"{label}/{disk.name}: added")
            elif keys := _changed_keys(was, disk):
                lines.append(f"{label}/{disk.name}: {', '.join(keys)} changed"
                             + ("; attached now: applies when the guest next connects it" if live else ""))
        for disk in prev.disks:
            if cfg.disk(disk.vdev) is None:
                lines.append(f"{label}/{disk.name}: removed"
                             + ("; attached now: served until the guest next connects it"
                                if (label, disk.vdev) in attached else ""))
    for label in before:
        if label not in after:
            live = any(lab == label for lab, _ in attached)
            lines.append(f"{label}: removed" + ("; its attached disks are served until they next connect"
                                                if live else ""))
    return lines
