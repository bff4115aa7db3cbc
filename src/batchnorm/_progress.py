"""A one-line progress bar on stderr for long passes over data (no dependency)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """``label: [#####     ] 12/40 batches`` redrawn in place; silent unless ``stream`` is a TTY.

    Redraws at most every 0.1 s; ``total=None`` shows only the count.
    """

    def __init__(
        self, label: str, total: int | None, enabled: bool = True, stream: TextIO | None = None
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = enabled and bool(getattr(self.stream, "isatty", lambda: False)())
        self.label, self.total, self.count = label, total, 0
        self._last_draw = 0.0

    def update(self, steps: int = 1) -> None:
        self.count += steps
        now = time.monotonic()
        if self.enabled and (now - self._last_draw >= 0.1 or self.count == self.total):
            self._last_draw = now
            self._draw()

    def _draw(self) -> None:
        if self.total:
            filled = min(20, 20 * self.count // self.total)
            bar = f"[{'#' * filled}{' ' * (20 - filled)}] {self.count}/{self.total}"
        else:
            bar = str(self.count)
        self.stream.write(f"\r{self.label}: {bar} batches")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.count:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()
