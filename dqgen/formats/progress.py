"""The progress bar of ``dqgen convert``, shared by its safetensors and GGUF paths."""

from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr (a line per layer when not a terminal)."""

    def __init__(self, total: int, quiet: bool, unit: str = "layers") -> None:
        self.total, self.quiet, self.unit, self.start = total, quiet, unit, time.perf_counter()
        self.tty = sys.stderr.isatty()

    def step(self, done: int, label: str) -> None:
        if self.quiet:
            return
        width = 30
        filled = width * done // self.total
        line = (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {self.unit} "
                f"{time.perf_counter() - self.start:5.1f}s {label}")
        if self.tty:
            sys.stderr.write("\r\033[K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty and not self.quiet:
            sys.stderr.write("\n")
