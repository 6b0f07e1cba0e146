"""A small progress bar on stderr (no dependency): redrawn in place on a terminal; in a log, one line per tenth
of the work or change of note, so a long run does not flood it."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    def __init__(self, total: int, label: str = "", stream: TextIO | None = None, width: int = 28):
        self.total = max(total, 1)
        self.label = label
        self.stream = stream or sys.stderr
        self.width = width
        self.done = 0
        self.t0 = time.perf_counter()
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last: tuple[int, str] | None = None  # (tenths done, note) of the last line written to a log

    def render(self, note: str = "") -> str:
        frac = min(self.done / self.total, 1.0)
        filled = int(round(frac * self.width))
        bar = "#" * filled + "-" * (self.width - filled)
        elapsed = time.perf_counter() - self.t0
        return f"{self.label} [{bar}] {self.done}/{self.total} {elapsed:6.1f}s {note}".rstrip()

    def update(self, done: int | None = None, note: str = "") -> None:
        """Set (or advance by one) the count and redraw."""
        self.done = self.done + 1 if done is None else done
        line = self.render(note)
        frac = min(self.done / self.total, 1.0)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
        elif (int(10 * frac), note) != self._last:
            self.stream.write(line + "\n")  # logs: a line per tenth or new note
        self._last = (int(10 * frac), note)
        self.stream.flush()

    def close(self, note: str = "done") -> None:
        self.update(self.done, note)
        if self.tty:
            self.stream.write("\n")
        self.stream.flush()
