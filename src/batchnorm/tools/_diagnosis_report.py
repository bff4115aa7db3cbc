"""The report of :func:`batchnorm.diagnose` and ``batchnorm inspect``: one row per batch norm."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

# Thresholds for flagging a layer; each is explained where it is used in `problems`.
MEAN_SHIFT_LIMIT = 0.25
VARIANCE_RATIO_LIMIT = 1.5
GAP_LIMIT = 0.5
SMALL_BATCH = 8


@dataclasses.dataclass
class LayerDiagnosis:
    """The findings for one batch-norm layer (None where not measured).

    Attributes:
        name: qualified module name (or checkpoint prefix).
        kind: class name (``BatchNorm2d``, ``BatchNormalization``...).
        channels: number of channels.
        nan_variance, inf_variance, negative_variance, zero_variance: channel indices (flat)
            whose stored moving variance is NaN, +-Inf, < 0 or exactly 0.
        nonfinite_mean: channels whose moving mean is NaN or Inf.
        mean_shift: ``max_c |moving_mean - mu| / sqrt(sigma^2 + eps)``, the distance of the
            moving mean from the recomputed population mean ``mu`` in population standard
            deviations.
        variance_ratio: ``max_c max(r, 1/r)`` with ``r = (moving_variance + eps) / (sigma^2 + eps)``
            and ``sigma^2`` the population variance in the estimator the layer stores.
        train_inference_gap: RMS over the first batch of ``(y_train - y_inference) / |gamma|``:
            how far, in normalised units, the output with batch statistics is from the output
            with the moving statistics on the same batch.
        gap_samples: samples per channel in that batch.
        frozen_but_updating: the layer looks frozen (gamma/beta with ``requires_grad=False``)
            but its moving statistics changed when the batches ran in the model's current mode.
        samples: samples per channel behind the population statistics (sum of mask weights).
        smallest_batch: the smallest batch (or ghost batch) the layer normalised over.
        momentum: Keras-convention momentum (None: cumulative / debiased average or unknown).
        horizon: ``1 / (1 - momentum)``, the steps the moving average looks back; flagged when
            it exceeds ``steps`` unless the moving statistics are measured to match the
            population (as after :func:`batchnorm.recalibrate`).
        steps: training steps taken, when known (torch's ``num_batches_tracked``, or given).
    """

    name: str
    kind: str
    channels: int
    nan_variance: list[int] = dataclasses.field(default_factory=list)
    inf_variance: list[int] = dataclasses.field(default_factory=list)
    negative_variance: list[int] = dataclasses.field(default_factory=list)
    zero_variance: list[int] = dataclasses.field(default_factory=list)
    nonfinite_mean: list[int] = dataclasses.field(default_factory=list)
    mean_shift: float | None = None
    variance_ratio: float | None = None
    train_inference_gap: float | None = None
    gap_samples: int | None = None
    frozen_but_updating: bool = False
    samples: int | None = None
    smallest_batch: int | None = None
    momentum: float | None = None
    horizon: float | None = None
    steps: int | None = None

    @property
    def problems(self) -> list[str]:
        """One sentence per problem found; empty for a healthy layer."""
        found = []
        for label, channels in (
            ("NaN variance", self.nan_variance),
            ("Inf variance", self.inf_variance),
            ("negative variance", self.negative_variance),
            ("zero variance", self.zero_variance),
            ("NaN/Inf mean", self.nonfinite_mean),
        ):
            if channels:
                found.append(f"{label} in {len(channels)} channel(s) {_short(channels)}")
        # The moving statistics should estimate the population ones; beyond these limits the
        # inference output is visibly shifted / rescaled.
        mean_limit, variance_limit, gap_limit = self.limits
        if self.mean_shift is not None and not self.mean_shift <= mean_limit:
            found.append(
                f"moving mean {self.mean_shift:.3g} std away from the population mean "
                f"(limit {mean_limit:.3g}): recalibrate"
            )
        if self.variance_ratio is not None and not self.variance_ratio <= variance_limit:
            found.append(
                f"moving variance off by a factor {self.variance_ratio:.3g} from the population "
                f"variance (limit {variance_limit:.3g}): recalibrate"
            )
        gap = self.train_inference_gap
        if gap is not None and not gap <= gap_limit:
            found.append(
                f"training and inference outputs differ by {gap:.3g} (RMS, normalised; limit "
                f"{gap_limit:.3g})"
            )
        if self.frozen_but_updating:
            found.append("frozen (gamma/beta requires_grad=False) but its statistics still update")
        # Batch statistics over fewer samples than this are too noisy to train on (Wu & He 2018).
        if self.smallest_batch is not None and self.smallest_batch < SMALL_BATCH:
            found.append(
                f"batch (or ghost batch) of {self.smallest_batch} is too small for stable "
                f"statistics (< {SMALL_BATCH})"
            )
        # A long horizon matters while the moving statistics have not converged: once they
        # match the population (e.g. after recalibrate) it is not flagged.
        steps, horizon = self.steps, self.horizon
        converged = (
            self.mean_shift is not None
            and self.variance_ratio is not None
            and self.mean_shift <= mean_limit
            and self.variance_ratio <= variance_limit
        )
        if (
            horizon is not None
            and steps is not None
            and horizon > steps * (1 + 1e-9)
            and not converged
        ):
            found.append(
                f"momentum {self.momentum:g} averages over ~{self.horizon:.0f} steps but only "
                f"{self.steps} were taken: the initial values still dominate"
            )
        return found

    @property
    def limits(self) -> tuple[float, float, float]:
        """The mean-shift, variance-ratio and gap limits.

        0.25, 1.5 and 0.5, widened by the noise of what they are measured from: three standard
        errors of the population estimate over ``samples`` (``1/sqrt(n)`` for the mean in
        standard deviations, ``sqrt(2/n)`` for the log variance), and for the gap two standard
        deviations of batch-statistics noise over ``gap_samples`` (``sqrt(1.5/n)``: the mean
        error ``1/n`` plus the scale error ``1/(2n)`` on unit-variance activations).
        """
        mean_limit, variance_limit, gap_limit = MEAN_SHIFT_LIMIT, VARIANCE_RATIO_LIMIT, GAP_LIMIT
        if self.samples:
            mean_limit += 3 / math.sqrt(self.samples)
            variance_limit *= math.exp(3 * math.sqrt(2 / self.samples))
        if self.gap_samples:
            gap_limit += 2 * math.sqrt(1.5 / self.gap_samples)
        return mean_limit, variance_limit, gap_limit

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: non-finite floats become None; ``problems`` included."""
        entries = dataclasses.asdict(self)
        for key, value in entries.items():
            if isinstance(value, float) and not math.isfinite(value):
                entries[key] = None
        entries["problems"] = self.problems
        return entries


@dataclasses.dataclass
class DiagnosisReport:
    """Rows of :class:`LayerDiagnosis`; ``str(report)`` is a table, ``to_dict()`` JSON-ready."""

    layers: list[LayerDiagnosis]
    batches: int | None = None

    @property
    def problems(self) -> dict[str, list[str]]:
        """``{layer: [problem, ...]}`` for the layers with a problem."""
        return {row.name: row.problems for row in self.layers if row.problems}

    @property
    def healthy(self) -> bool:
        return not self.problems

    def __getitem__(self, name: str) -> LayerDiagnosis:
        for row in self.layers:
            if row.name == name:
                return row
        raise KeyError(f"No batch-norm layer named {name!r} in the report")

    def to_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "healthy": self.healthy,
            "layers": [row.to_dict() for row in self.layers],
        }

    def __str__(self) -> str:
        header = ["layer", "type", "C", "mean shift", "var ratio", "gap", "batch", "horizon/steps"]
        rows = [header]
        for row in self.layers:
            rows.append(
                [
                    row.name or "<model>",
                    row.kind,
                    str(row.channels),
                    _number(row.mean_shift),
                    _number(row.variance_ratio),
                    _number(row.train_inference_gap),
                    "-" if row.smallest_batch is None else str(row.smallest_batch),
                    _horizon(row),
                ]
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        problems = self.problems
        if problems:
            lines.append("")
            lines.append(f"problems in {len(problems)} of {len(self.layers)} layer(s):")
            for name, found in problems.items():
                lines += [f"  {name or '<model>'}: {problem}" for problem in found]
        else:
            lines.append(f"no problem found in {len(self.layers)} layer(s)")
        return "\n".join(lines)


def variance_findings(mean: torch.Tensor, variance: torch.Tensor) -> dict[str, list[int]]:
    """Channel indices (flattened) with NaN / Inf / negative / zero variance or non-finite mean."""
    variance = variance.detach().to(torch.float64).reshape(-1).cpu()
    mean = mean.detach().to(torch.float64).reshape(-1).cpu()

    def where(condition: torch.Tensor) -> list[int]:
        return [int(i) for i in torch.nonzero(condition).reshape(-1)]

    return {
        "nan_variance": where(torch.isnan(variance)),
        "inf_variance": where(torch.isinf(variance)),
        "negative_variance": where(variance < 0),
        "zero_variance": where(variance == 0),
        "nonfinite_mean": where(~torch.isfinite(mean)),
    }


def _short(channels: list[int]) -> str:
    shown = ", ".join(str(c) for c in channels[:8])
    return f"[{shown}{', ...' if len(channels) > 8 else ''}]"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _horizon(row: LayerDiagnosis) -> str:
    if row.horizon is None:
        return "-"
    return f"{row.horizon:.0f}/{'?' if row.steps is None else row.steps}"
