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
