"""The reload path (SIGHUP, `ctl reload`) never ends the daemon: whatever goes wrong while reading,
checking or applying the files is a refused reload, logged, and the running configuration stays."""

from __future__ import annotations

import logging

import pytest

from xenblk_vhost.config import ConfigError
from xenblk_vhost.daemon.run import Reloader


class _Notifier:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def reloading(self) -> None:
        self.calls.append("reloading")

    def ready(self, status: str) -> None:
        self.calls.append("ready")


class _Service:
    devices: dict = {}
    configs: list = []

    def __init__(self, fail: Exception | None = None) -> None:
        self.fail = fail
        self.applied: list = []

    def reload(self, configs):
        if self.fail is not None:
            raise self.fail
        self.applied.append(configs)
        return []


async def test_a_file_that_is_not_utf8_is_a_refused_reload(tmp_path, caplog):
    cfg = tmp_path / "d.yaml"
    cfg.write_bytes(b"domain: {name: d}\ndisks: \xff\xfe\n")
    service, notifier = _Service(), _Notifier()
    with pytest.raises(ConfigError, match="not UTF-8"):
        await Reloader([str(cfg)], service, notifier).reload()
    assert service.applied == [] and notifier.calls == ["reloading", "ready"]
    assert any("reload refused" in r.getMessage() and "not UTF-8" in r.getMessage() for r in caplog.records)


async def test_an_unexpected_failure_while_applying_is_a_refused_reload(tmp_path, caplog):
    """A bug in applying (here: the service raising) is logged with its traceback and answered as a
    refused reload; it does not escape to the daemon's nursery (before: it ended the daemon)."""
    img = tmp_path / "d.img"
    img.write_bytes(b"\0" * 4096)
    cfg = tmp_path / "d.yaml"
    cfg.write_text(f"domain: {{name: d}}\ndisks:\n  - {{vdev: xvda, driver: io_uring, path: {img}}}\n")
    service, notifier = _Service(fail=RuntimeError("boom")), _Notifier()
    with caplog.at_level(logging.ERROR):
        with pytest.raises(ConfigError, match="boom"):
            await Reloader([str(cfg)], service, notifier).reload()
    assert notifier.calls == ["reloading", "ready"]
    assert any(r.exc_info and "reload failed" in r.getMessage() for r in caplog.records)
