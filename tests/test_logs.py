"""Where log records go and how they look (daemon/logs.py): journald natively with fields, the journal's
stream with `<N>` priority prefixes, JSON lines, plain lines; --log-level in any case on every command.
The real journald is in tests/test_systemd_unit.py; here its doors are checked one by one."""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys

import pytest

from e2e_support.fixtures import disk_image, write_config
from xenblk_vhost import log_context
from xenblk_vhost.cli import build_parser
from xenblk_vhost.daemon import logs
from xenblk_vhost.sim.toolstack import VbdConfig
from xenblk_vhost.sim.world import open_world


def record(handler: logging.Handler, level: int, message: str, **fields) -> None:
    logger = logging.getLogger("xenblk_vhost.test")
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.DEBUG)
    with log_context.bound(**fields):
        logger.log(level, message)


def test_json_lines_carry_level_priority_and_the_device_fields():
    out = io.StringIO()
    handler = logs.choose_handler(json_lines=True, stream=out)
    record(handler, logging.ERROR, "vbd-5-51712: 19 no disk configured", domain="web1", domid=5, vdev="xvdb")
    line = json.loads(out.getvalue())
    assert (line["level"], line["priority"], line["logger"]) == ("error", 3, "xenblk_vhost.test")
    assert line["message"] == "vbd-5-51712: 19 no disk configured"
    assert (line["DOMAIN"], line["DOMID"], line["VDEV"]) == ("web1", "5", "xvdb")
    record(handler, logging.INFO, "outside any device")
    assert "DOMAIN" not in json.loads(out.getvalue().splitlines()[1])


def test_the_journal_stream_is_recognised_by_device_and_inode(tmp_path):
    with open(tmp_path / "stderr", "w") as stream:
        st = os.fstat(stream.fileno())
        assert logs.stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not logs.stderr_is_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        assert not logs.stderr_is_journal(stream, {})


def test_journald_natively_with_fields_or_priority_prefixes_without_the_module(tmp_path):
    with open(tmp_path / "stderr", "w+") as stream:
        st = os.fstat(stream.fileno())
        environ = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        sent = []
        native = logs.choose_handler(stream=stream, environ=environ, journal_send=lambda m, **f: sent.append((m, f)))
        record(native, logging.WARNING, "ring halted", domain="db1", vdev="xvda", device="vbd-7-51712")
        [(message, fields)] = sent
        assert message == "ring halted"
        assert (fields["PRIORITY"], fields["SYSLOG_IDENTIFIER"], fields["DOMAIN"], fields["VDEV"],
                fields["DEVICE"]) == ("4", "xenblk-vhost", "db1", "xvda", "vbd-7-51712")
        # Without python-systemd: the stream, every line of a record prefixed (a traceback too).
        prefixed = logs.choose_handler(stream=stream, environ=environ, journal_send=None)
        try:
            raise ValueError("boom")
        except ValueError:
            logger = logging.getLogger("xenblk_vhost.test2")
            logger.propagate, logger.handlers = False, [prefixed]
            logger.exception("failed")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines[0] == "<3>ERROR xenblk_vhost.test2: failed"
    assert len(lines) > 2 and all(line.startswith("<3>") for line in lines)


def test_plain_lines_on_a_terminal_have_a_time():
    out = io.StringIO()
    record(logs.choose_handler(stream=out, environ={}), logging.INFO, "hello")
    assert out.getvalue().rstrip().endswith(" INFO xenblk_vhost.test: hello")
    assert out.getvalue()[:4].isdigit()


@pytest.mark.parametrize("argv", [
    ["--log-level", "DEBUG", "check", "x.yaml"], ["check", "x.yaml", "--log-level", "Warning"],
    ["run", "x.yaml", "--log-level", "ERROR", "--log-json"], ["ctl", "list", "--log-level", "info"],
    ["stats", "--log-level", "debug"], ["demo", "--log-level", "INFO"],
])
def test_log_level_in_any_case_on_every_command(argv):
    args = build_parser().parse_args(argv)
    assert args.log_level in logs.LEVELS


def test_a_wrong_log_level_is_refused():
    with pytest.raises(argparse.ArgumentTypeError, match="one of debug, info, warning, error"):
        logs.parse_level("loud")


async def test_run_with_log_json_names_the_domain_and_disk_on_a_devices_lines(tmp_path):
    img = disk_image(tmp_path)
    cfg = write_config(tmp_path, "jsonlog", [f"vdev: xvda, driver: io_uring, path: {img}"])
    argv = [sys.executable, "-m", "xenblk_vhost", "--log-json", "run", str(cfg), "--control", "none"]
    async with open_world(tmp_path / "w") as world:
        guest = await world.create_guest("jsonlog")
        backend = await world.start_process(
            ["sh", "-c", 'exec "$@" 2>&1', "sh", *argv, "--xenstore", world.xenstore_path,
             "--sim", world.hypervisor_path], name="backend")
        await world.attach_vbd(guest.domid, VbdConfig(vdev="xvda", target=str(img)))
        line = await backend.wait_line(lambda line: "Initialising -> InitWait" in line, 10)
        backend.proc.terminate()
        assert await backend.wait(30) == 0
    entry = json.loads(line)
    assert (entry["DOMAIN"], entry["VDEV"], entry["DOMID"], entry["level"]) == ("jsonlog", "xvda", str(guest.domid),
                                                                              "info")
    assert all(json.loads(line) for line in backend.lines if line.startswith("{"))
