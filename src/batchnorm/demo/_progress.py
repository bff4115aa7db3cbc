"""A small progress bar on stderr, in the spirit of Keras' ``fit`` output.

On a terminal it redraws one line (at most ten times a second); when stderr is not a terminal
(a log file, a pipe, pytest) it writes one line per finished bar and nothing per step.

Example:
    >>> bar = ProgressBar("with BN, epoch 1/3", total=23)
    >>> for step in range(23):
    ...     bar.update(step + 1, loss=0.5)
    >>> bar.close(val_accuracy=0.9)
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

_WIDTH = 24
_REDRAW_SECONDS = 0.1


class ProgressBar:
    """Draws ``label [=====>    ] 12/23 loss 0.4321`` on ``stream`` (default stderr)."""

    def __init__(self, label: str, total: int, stream: TextIO | None = None) -> None:
        self.label = label
        self.total = max(total, 1)
        self.stream = sys.stderr if stream is None else stream
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self._last_draw = 0.0
        self._done = 0
        self._metrics: dict[str, float] = {}

    def _line(self) -> str:
        filled = _WIDTH * self._done // self.total
        arrow = ">" if filled < _WIDTH else ""
        bar = "=" * filled + arrow + " " * (_WIDTH - filled - len(arrow))
        metrics = "  ".join(f"{name} {value:.4f}" for name, value in self._metrics.items())
        return f"{self.label} [{bar}] {self._done}/{self.total}  {metrics}".rstrip()

    def update(self, done: int, **metrics: float) -> None:
        """Record ``done`` finished steps and the current metrics; redraw on a terminal."""
        self._done, self._metrics = done, metrics
        now = time.monotonic()
        if self.interactive and (now - self._last_draw >= _REDRAW_SECONDS or done >= self.total):
            self._last_draw = now
            self.stream.write("\r" + self._line() + "\x1b[K")
            self.stream.flush()

    def close(self, **metrics: float) -> None:
        """Finish the bar with final metrics (added to the step metrics) and end the line."""
        self._metrics = {**self._metrics, **metrics}
        prefix = "\r" if self.interactive else ""
        suffix = "\x1b[K\n" if self.interactive else "\n"
        self.stream.write(prefix + self._line() + suffix)
        self.stream.flush()
