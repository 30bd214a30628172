import subprocess
import sys

from xenblk_vhost import __version__
from xenblk_vhost.cli import main


def test_version_flag_prints_version():
    out = subprocess.run(
        [sys.executable, "-m", "xenblk_vhost", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == f"xenblk-vhost {__version__}"


def test_help_lists_description(capsys):
    try:
        main(["--help"])
    except SystemExit as e:
        assert e.code == 0
    assert "Xen block backend" in capsys.readouterr().out


def test_check_accepts_a_valid_file_and_refuses_a_broken_one(tmp_path):
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 512)
    good = tmp_path / "good.yaml"
    good.write_text(f"domain: {{name: g}}\ndisks:\n  - {{vdev: xvda, driver: io_uring, path: {img}}}\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("domain: {name: b}\ndisks:\n  - {vdev: xvda, driver: io_uring, path: /none, queues: 0}\n")
    ok = subprocess.run([sys.executable, "-m", "xenblk_vhost", "check", str(good)], capture_output=True, text=True)
    assert ok.returncode == 0 and f"{good}: ok: domain 'g': xvda (io_uring {img})" in ok.stdout
    no = subprocess.run([sys.executable, "-m", "xenblk_vhost", "check", str(good), str(bad)],
                        capture_output=True, text=True)
    assert no.returncode == 2
    assert no.stderr.splitlines() == [
        f"{bad}:3: disks[0].path: /none: no such file (file or block device expected)",
        f"{bad}:3: disks[0].queues: must be between 1 and 64, got 0",
    ]


def test_the_command_line_loads_nothing_only_the_simulator_needs():
    """`xenblk-vhost` builds every subcommand's parser; on a dom0 without libatomic (the rig's)
    that must not load the simulated hypervisor, which needs it (sim/_atomic.py)."""
    code = ("import sys\nfrom xenblk_vhost.cli import build_parser\nbuild_parser()\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('xenblk_vhost.sim'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    heavy = {"xenblk_vhost.sim._atomic", "xenblk_vhost.sim.hypervisor", "xenblk_vhost.sim.grant_table",
             "xenblk_vhost.sim.world"}
    assert not heavy & set(out), out


def test_ctl_loads_no_event_loop_no_yaml_and_no_simulator():
    """`xenblk-vhost ctl` (by hand, and systemd's ExecReload) starts in a fraction of a second: the
    main command builds only its parser. Under the rig's TCG every import costs seconds."""
    code = ("import sys\nfrom xenblk_vhost.cli import build_parser, _command_in\n"
            "assert _command_in(['--log-level', 'debug', 'ctl', 'list']) == 'ctl'\n"
            "build_parser(_command_in(['ctl', 'list'])).parse_args(['ctl', 'list'])\n"
            "heavy = ('trio', 'yaml', 'prometheus_client', 'cffi')\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
            "                      or m.startswith(('xenblk_vhost.demo', 'xenblk_vhost.sim')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == [], out


def test_every_command_is_reachable_when_only_its_parser_is_built():
    for command in ("check", "run", "ctl", "stats", "demo", "hotplug", "install-hotplug"):
        try:
            main([command, "--help"])
        except SystemExit as e:
            assert e.code == 0, command


def test_check_names_a_file_that_is_not_utf8_in_one_line(tmp_path):
    """Bytes that are not UTF-8 (a latin-1 path, a binary file given by mistake): one line, exit 2,
    no traceback (issue 10)."""
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(b"domain: {name: g}\ndisks:\n  - {vdev: xvda, driver: io_uring, path: /srv/caf\xe9.img}\n")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x01" * 64)
    out = subprocess.run([sys.executable, "-m", "xenblk_vhost", "check", str(latin), str(binary)],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.splitlines() == [f"{latin}: file: not UTF-8 text (byte 74)",
                                       f"{binary}: file: not UTF-8 text (byte 0)"]
