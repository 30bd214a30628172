"""Progress of long work on stderr: a redrawn bar on a terminal, a plain line now and then otherwise.

    progress = Progress(total_s=10.0)               # tty decided from the stream
    progress.update(elapsed_s, "1234 ops  5678 IOPS")  # call as often as you like
    progress.finish()                                # ends the bar's line

On a terminal the bar is redrawn in place (`\\r`, cleared to the end of
the line) at most `redraw_interval` apart; elsewhere (a log, a pipe, CI)
one complete line is written every `line_interval` seconds, so logs stay
readable and small. Nothing is written when `enabled` is False.
`now` is a parameter so that what is drawn when can be tested without
sleeping.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

BAR_WIDTH = 24
REDRAW_INTERVAL = 0.1
LINE_INTERVAL = 2.0


def render_bar(fraction: float, width: int = BAR_WIDTH) -> str:
    """`[#########...............]` for a fraction in [0, 1] (clamped)."""
    fraction = min(1.0, max(0.0, fraction))
    filled = int(round(fraction * width))
    return "[" + "#" * filled + "." * (width - filled) + "]"


def progress_text(elapsed_s: float, total_s: float, detail: str, *, bar: bool) -> str:
    clock = f"{min(elapsed_s, total_s):4.1f}/{total_s:g} s"
    head = f"{render_bar(elapsed_s / total_s if total_s else 1.0)} {clock}" if bar else clock
    return f"{head}  {detail}" if detail else head


class Progress:
    def __init__(self, total_s: float, *, stream: TextIO | None = None, is_tty: bool | None = None,
                 enabled: bool = True, label: str = "",
                 redraw_interval: float = REDRAW_INTERVAL, line_interval: float = LINE_INTERVAL) -> None:
        self.total_s = total_s
        self.stream = stream if stream is not None else sys.stderr
        if is_tty is None:
            isatty = getattr(self.stream, "isatty", None)
            is_tty = bool(isatty and isatty())
        self.is_tty = is_tty
        self.enabled = enabled
        self.label = label
        self._interval = redraw_interval if is_tty else line_interval
        self._last: float | None = None
        self._drawn = False  # a bar is on screen (the line is not ended)

    def update(self, elapsed_s: float, detail: str = "", *, now: float | None = None, force: bool = False) -> bool:
        """Draw if due (or `force`); whether something was written."""
        if not self.enabled:
            return False
        now = time.monotonic() if now is None else now
        if not force and self._last is not None and now - self._last < self._interval:
            return False
        self._last = now
        text = progress_text(elapsed_s, self.total_s, detail, bar=self.is_tty)
        if self.label:
            text = f"{self.label}: {text}"
        if self.is_tty:
            self.stream.write("\r" + text + "\x1b[K")
            self._drawn = True
        else:
            self.stream.write(text + "\n")
        self.stream.flush()
        return True

    def message(self, text: str) -> None:
        """A line of its own (a phase change), not overwritten by the bar."""
        if not self.enabled:
            return
        self.finish()
        self.stream.write((f"{self.label}: " if self.label else "") + text + "\n")
        self.stream.flush()

    def finish(self) -> None:
        """End the bar's line, so what follows starts on a fresh one."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False
