"""Where log lines go and how they look, for every command (`--log-level`, `--log-json`).

    configure("info")                    # once, by the command line, before the command runs
    configure("debug", json_lines=True)  # one JSON object per line on stderr

Where stderr leads decides the form (systemd sets $JOURNAL_STREAM to the
device:inode of the journal stream it gives a service as stderr):

  the journal, and python-systemd installed (Debian: python3-systemd; the
      `journal` extra): each record goes to journald natively
      (systemd.journal.send) with PRIORITY= (3 for an error, 4 a warning...),
      SYSLOG_IDENTIFIER=xenblk-vhost, LOGGER=, CODE_FILE/LINE/FUNC= and the
      device's fields DOMAIN=, DOMID=, VDEV=, DEVICE= (log_context): so
      `journalctl -u xenblk-vhost@web1 -p err DOMAIN=web1 VDEV=xvda` works;
  the journal without the module: one line per record with a `<N>` syslog
      priority prefix (systemd's SyslogLevelPrefix=, on by default), so an
      ERROR is stored at priority 3, not 6 (the fields are lost);
  anything else (a terminal, a file, libxl's qemu-dm log): plain lines
      with a timestamp: `2026-12-05 11:16:02,123 ERROR logger: message`;
  --log-json, wherever stderr goes: {"ts", "level", "priority", "logger",
      "message", and DOMAIN/DOMID/VDEV/DEVICE when bound, "exception"}.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import TextIO

from .. import log_context

LEVELS = ("debug", "info", "warning", "error")
_mode = "plain"  # what configure() chose: plain | json | journal | prefix
IDENTIFIER = "xenblk-vhost"
# syslog priorities (sd-daemon.h's SD_ERR...), by logging level
_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


def priority(levelno: int) -> int:
    for level, prio in sorted(_PRIORITY.items(), reverse=True):
        if levelno >= level:
            return prio
    return 7


def parse_level(text: str) -> str:
    """argparse type for --log-level: any case; one of LEVELS."""
    import argparse

    level = text.strip().lower()
    if level not in LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r}: one of {', '.join(LEVELS)} (any case)")
    return level


def stderr_is_journal(stream: TextIO | None = None, environ=None) -> bool:
    """Whether the stream (stderr) is the journal's: $JOURNAL_STREAM names its device and inode."""
    environ = os.environ if environ is None else environ
    stream = sys.stderr if stream is None else stream
    wanted = environ.get("JOURNAL_STREAM", "")
    dev, sep, ino = wanted.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{dev}:{ino}"


class _ContextFields(logging.Filter):
    """Copies the task's log_context fields onto each record (record.journal_fields)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.journal_fields = dict(log_context.fields())
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(record.created))
            + f".{int(record.msecs):03d}" + time.strftime("%z", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "priority": priority(record.levelno),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(getattr(record, "journal_fields", {}))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class PriorityPrefixFormatter(logging.Formatter):
    """`<N>LEVEL logger: message` for journald's stream (it strips and reads the prefix). A
    multi-line record (a traceback) gets the prefix on every line, so no line falls to info."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JournalHandler(logging.Handler):
    """Native journald records with fields (python-systemd's systemd.journal.send)."""

    def __init__(self, send) -> None:
        super().__init__()
        self._send = send

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self.format(record)
            fields = {f"{k}": v for k, v in getattr(record, "journal_fields", {}).items()}
            self._send(message, PRIORITY=str(priority(record.levelno)), SYSLOG_IDENTIFIER=IDENTIFIER,
                       LOGGER=record.name, CODE_FILE=record.pathname, CODE_LINE=record.lineno,
                       CODE_FUNC=record.funcName, **fields)
        except Exception:
            self.handleError(record)


def _journal_send():
    try:
        from systemd import journal
    except ImportError:
        return None
    return journal.send


_FIND = object()  # choose_handler's journal_send default: python-systemd's, if installed


def choose_handler(*, json_lines: bool = False, stream: TextIO | None = None, environ=None,
                   journal_send=_FIND) -> logging.Handler:
    """The handler for this process's stderr (see the module doc). `journal_send`: how records
    reach journald natively (None: they cannot); by default python-systemd's, if installed."""
    stream = sys.stderr if stream is None else stream
    if json_lines:
        handler: logging.Handler = logging.StreamHandler(stream)
        handler.setFormatter(JsonFormatter())
    elif stderr_is_journal(stream, environ):
        send = _journal_send() if journal_send is _FIND else journal_send
        if send is not None:
            handler = JournalHandler(send)
            handler.setFormatter(logging.Formatter("%(message)s"))
        else:
            handler = logging.StreamHandler(stream)
            handler.setFormatter(PriorityPrefixFormatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.addFilter(_ContextFields())
    return handler


def configure(level: str = "info", *, json_lines: bool = False) -> logging.Handler:
    """Route the root logger to the handler for stderr, at `level` (one of LEVELS, any case)."""
    global _mode
    handler = choose_handler(json_lines=json_lines)
    _mode = ("json" if json_lines else "journal" if isinstance(handler, JournalHandler)
             else "prefix" if isinstance(handler.formatter, PriorityPrefixFormatter) else "plain")
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    return handler


def report_errors(lines, logger: logging.Logger | None = None) -> None:
    """Errors that end a command before it runs (a file's problems, a start-up failure): plain
    lines on a terminal, as `check` prints them; through the log (priority 3, JSON) otherwise."""
    logger = logger or logging.getLogger("xenblk_vhost")
    for line in lines:
        if _mode == "plain":
            print(line, file=sys.stderr)
        else:
            logger.error("%s", line)
