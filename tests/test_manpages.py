"""The man pages against the code they describe.

xenblk-vhost(8) is generated from the command line's parser (scripts/manpages.py): the
committed page must be what the generator writes now, so a new option or command cannot be
left out. xenblk-vhost.yaml(5) is written by hand: every key of config.py's schema is
documented, nothing else is, its defaults and ranges are config.py's, and each example
validates. Both must render with groff without a warning.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from xenblk_vhost import __version__, config
from xenblk_vhost.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
MAN = ROOT / "docs" / "man"
PAGE8 = MAN / "xenblk-vhost.8"
PAGE5 = MAN / "xenblk-vhost.yaml.5"


def _groff_plain(page: Path) -> str:
    """The page as `man` shows it, without formatting: what an operator reads."""
    out = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-rLL=200n", "-P-cbou", str(page)],
                         capture_output=True, text=True, check=True)
    assert out.stderr == "", out.stderr
    return out.stdout


def test_groff_is_installed():
    # scripts/install-deps.sh installs groff-base; without it the rendering checks below could not run.
    assert shutil.which("groff"), "groff missing: run scripts/install-deps.sh"


@pytest.mark.parametrize("page", [PAGE8, PAGE5], ids=lambda p: p.name)
def test_page_renders_without_warnings(page):
    text = _groff_plain(page)
    assert "NAME" in text and "SEE ALSO" in text


def test_command_page_is_what_the_generator_writes():
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "manpages.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_generator_check_fails_on_a_stale_page(tmp_path):
    stale = tmp_path / "xenblk-vhost.8"
    page = PAGE8.read_text()
    assert "\\-\\-no\\-storage" in page
    stale.write_text(page.replace("\\-\\-no\\-storage", "\\-\\-no\\-storages"))
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "manpages.py"), "--check", "--output", str(stale)],
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert "stale" in out.stderr


def _walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, option strings) of every option of every (sub)command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*path, name), None
                yield from _walk(child, (*path, name))
        else:
            yield path, action


def test_command_page_names_every_command_and_option():
    """Independent of the generator: every command path is a section and every option string and
    positional's metavar appears in that command's part of the rendered page."""
    text = _groff_plain(PAGE8)
    sections = re.split(r"\n   (?=[a-z])", text)  # subsections: three spaces, then the command
    by_name = {s.splitlines()[0].strip(): s for s in sections[1:]}
    commands = {" ".join(path) for path, action in _walk(build_parser()) if action is None}
    assert commands <= set(by_name), commands - set(by_name)
    for path, action in _walk(build_parser()):
        if action is None or not path:
            continue
        section = by_name[" ".join(path)]
        for word in action.option_strings or [str(action.metavar or "|".join(action.choices or ()))]:
            if word in ("-h", "--help", "--log-level", "--log-json"):
                continue
            # A ctl subcommand's --control/--json are documented once, under ctl.
            where = by_name["ctl"] if path[0] == "ctl" and word in ("--control", "--json") else section
            assert word in where, (path, word)


def test_command_page_version_and_exit_statuses():
    text = _groff_plain(PAGE8)
    assert f"xenblk-vhost {__version__}" in text
    for status in (0, 1, 2, 130):
        assert re.search(rf"^\s+{status}\s", text, re.MULTILINE), status


# ---------------------------------------------------------------- xenblk-vhost.yaml(5)

def _key_entries() -> dict[str, str]:
    """KEY -> its paragraph, from the KEYS section's `.TP` / `.B key` entries."""
    source = PAGE5.read_text()
    keys_section = source.split(".SH KEYS", 1)[1].split(".SH ", 1)[0]
    entries = {}
    for block in keys_section.split(".TP\n")[1:]:
        head, _, body = block.partition("\n")
        assert head.startswith(".B "), head
        key = head[3:].replace("\\-", "-")
        body = re.sub(r"^\.[A-Z]+ ?", "", body, flags=re.MULTILINE).replace("\\-", "-")
        entries[key] = " ".join(body.replace('"', "").split())
    return entries


def _schema_keys() -> set[str]:
    return ({*config.ROOT_KEYS}
            | {f"domain.{k}" for k in config.DOMAIN_KEYS}
            | {f"disks[].{k}" for k in config.DISK_KEYS}
            | {f"disks[].limits.{k}" for k in config.LIMIT_KEYS})


def test_yaml_page_documents_exactly_the_schema():
    documented = set(_key_entries())
    assert documented == _schema_keys(), (documented - _schema_keys(), _schema_keys() - documented)


def _yaml_value(value) -> str:
    return {True: "true", False: "false"}.get(value, str(value)) if isinstance(value, bool) else str(value)


def test_yaml_page_defaults_are_configs():
    entries = _key_entries()
    defaults = {f.name: f.default for f in fields(config.DiskConfig)}
    checked = 0
    for key, text in entries.items():
        name = key.split(".")[-1]
        m = re.search(r"Default: (\S+?)\.(?:\s|$)", text)
        if name in ("vdev", "driver", "path"):
            assert text.startswith("required"), key
            assert m is None, key
            continue
        if name not in defaults or name in ("properties", "handover_path"):  # optional, no default value
            assert m is None, key
            continue
        assert m, f"{key}: no 'Default: ...' in its entry"
        stated = m.group(1)
        if name == "memory":
            assert config.parse_size(stated) == defaults[name], key
        else:
            assert stated == _yaml_value(defaults[name]), key
        checked += 1
    with_default = set(config.DISK_KEYS + config.LIMIT_KEYS) - {"vdev", "driver", "path", "handover_path", "limits",
                                                                "properties"}
    assert checked == len(with_default) == 11


def test_yaml_page_ranges_are_configs():
    entries = _key_entries()
    ranges = {
        "domain.domid": (1, config.MAX_DOMID),
        "disks[].queues": (1, config.MAX_QUEUES),
        "disks[].ring_page_order": (0, config.MAX_RING_PAGE_ORDER),
        "disks[].max_indirect_segments": (0, config.MAX_INDIRECT_SEGMENTS),
        "disks[].limits.max_inflight": (1, config.MAX_INFLIGHT_LIMIT),
    }
    for key, (lo, hi) in ranges.items():
        assert f"Range: {lo} to {hi}." in entries[key], key
    assert "Minimum: 1MiB." in entries["disks[].limits.memory"]
    assert config.parse_size("1MiB") == config.MIN_MEMORY
    for driver in config.DRIVERS:
        assert f" {driver} " in entries["disks[].driver"], driver
    for data_path in config.DATA_PATHS:
        assert data_path in entries["disks[].data_path"], data_path


def _examples() -> list[str]:
    source = PAGE5.read_text().split(".SH EXAMPLES", 1)[1].split(".SH ", 1)[0]
    blocks = re.findall(r"^\.EX\n(.*?)^\.EE$", source, re.MULTILINE | re.DOTALL)
    return [b.replace("\\-", "-") for b in blocks if b.startswith("domain:")]


def test_yaml_page_examples_validate(tmp_path):
    examples = _examples()
    assert len(examples) == 3
    for i, text in enumerate(examples):
        cfg = config.parse_config(text, source=f"example{i}", base=tmp_path, check_storage=False)
        assert cfg.disks
    # The one spelling every key out states the defaults: it parses to an all-default disk.
    spelled = config.parse_config(examples[2], source="spelled", base=tmp_path, check_storage=False)
    default = config.DiskConfig(vdev=spelled.disks[0].vdev, driver="io_uring", path=spelled.disks[0].path)
    assert spelled.disks[0] == default


def test_yaml_page_mistake_example_is_what_check_says(tmp_path):
    source = PAGE5.read_text()
    shown = re.search(r"^(/etc/xenblk\\-vhost/web1\.yaml:\d+: .*)$", source, re.MULTILINE).group(1).replace("\\-", "-")
    text = "domain:\n  name: web1\ndisks:\n  - vdev: xvda\n    qeues: 2\n    driver: io_uring\n    path: /x.img\n"
    with pytest.raises(config.ConfigError) as err:
        config.parse_config(text, source="/etc/xenblk-vhost/web1.yaml", base=tmp_path, check_storage=False)
    assert [str(p) for p in err.value.problems] == [shown]


def test_yaml_page_version():
    assert f'"xenblk\\-vhost {__version__}"' in PAGE5.read_text().splitlines()[2]
