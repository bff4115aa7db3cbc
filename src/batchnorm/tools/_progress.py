"""The one progress bar of long passes (recalibrate, the demos, the benchmark): tqdm's.

On a terminal tqdm redraws one line in place (at most ten times a second), with the latest metrics
after the count. Elsewhere (a log file, a pipe, pytest) nothing is drawn per step; a bar made with
``summary=True`` writes one closing line instead, tqdm's format of the final count and metrics, so
that a log keeps the result of each epoch.

Example:
    >>> bar = Progress("with BN  epoch 1/3", total=23, summary=True)
    >>> for step in range(23):
    ...     bar.update(loss=0.5)
    >>> bar.close(val_accuracy=0.9)  # doctest: +SKIP
    with BN  epoch 1/3: 100%|##########| 23/23 [00:00<00:00, ...batch/s, loss 0.5000, val_accuracy 0.9000]
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm


def _is_terminal(stream: TextIO) -> bool:
    return bool(getattr(stream, "isatty", lambda: False)())


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


class Progress:
    """A progress bar over ``total`` steps (``None``: unknown) on ``stream`` (default stderr).

    Args:
        description: the text before the bar.
        total: the number of steps, or None when the length is not known.
        unit: what a step is, shown in the rate (default "batch").
        enabled: False draws nothing anywhere (``progress=False`` of the tools).
        summary: off a terminal, write one closing line (default False: silent).
        stream: where to draw (default ``sys.stderr``).
    """

    def __init__(
        self,
        description: str,
        total: int | None,
        *,
        unit: str = "batch",
        enabled: bool = True,
        summary: bool = False,
        stream: TextIO | None = None,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.description, self.total, self.unit = description, total, unit
        self.count = 0
        self._summary = enabled and summary
        self._metrics: dict[str, float] = {}
        self._start = time.monotonic()
        self._bar = tqdm(
            total=total,
            desc=description,
            unit=unit,
            file=self.stream,
            disable=not (enabled and _is_terminal(self.stream)),
            mininterval=0.1,
            dynamic_ncols=True,
        )

    def update(self, steps: int = 1, **metrics: float) -> None:
        """Count ``steps`` more finished steps; ``metrics`` replace the ones shown."""
        self.count += steps
        if metrics:
            self._metrics = metrics
            self._bar.set_postfix_str(_format_metrics(metrics), refresh=False)
        self._bar.update(steps)

    def close(self, **metrics: float) -> None:
        """End the bar with final ``metrics`` added to the step metrics; idempotent."""
        self._metrics = {**self._metrics, **metrics}
        if not self._bar.disable:
            self._bar.set_postfix_str(_format_metrics(self._metrics), refresh=False)
            self._bar.close()
        elif self._summary:
            self._summary = False
            self.stream.write(self.summary_line() + "\n")
            self.stream.flush()

    def summary_line(self) -> str:
        """The bar's current state as one line of text, in tqdm's format."""
        # tqdm reads total=None as "length unknown" (count and rate only); its stubs say float.
        return tqdm.format_meter(
            self.count,
            self.total,  # type: ignore[arg-type]
            time.monotonic() - self._start,
            prefix=self.description,
            unit=self.unit,
            ascii=True,
            postfix=_format_metrics(self._metrics) or None,
        )
