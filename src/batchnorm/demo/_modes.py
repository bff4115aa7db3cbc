"""``batchnorm demo modes``: training vs inference mode, momentum, and the two ways to freeze.

1. Training normalises with the batch's own statistics; inference with the moving averages.
2. The moving averages follow ``moving = momentum * moving + (1 - momentum) * batch``: after ``t``
   steps a fraction ``momentum**t`` of the initial value remains, so they need about
   ``ln(0.05) / ln(momentum)`` steps to come within 5% (30 steps at 0.9, 300 at 0.99, 3000 at 0.999).
3. ``training=False`` only switches to the moving statistics: gamma and beta still learn.
   ``trainable=False`` (tf-keras 2) freezes gamma and beta AND runs in inference mode even when
   called with ``training=True``.

Example:
    >>> result = run_modes_demo(seed=0, steps=50)
    >>> print(result.text.splitlines()[0])
    batchnorm: training vs inference on data with mean [3, -1, 0.5], std [2, 0.5, 1]
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from batchnorm.demo._plots import plot_modes
from batchnorm.layers import BatchNormalization

MOMENTA = (0.9, 0.99, 0.999)
TRUE_MEAN = (3.0, -1.0, 0.5)
TRUE_STD = (2.0, 0.5, 1.0)
_BATCH = 64


@dataclass
class ModesResult:
    """The printed text and, per momentum, the moving mean/variance of channel 0 after each step."""

    text: str
    moving_mean: dict[float, list[float]] = field(default_factory=dict)
    moving_variance: dict[float, list[float]] = field(default_factory=dict)

    def write(self, out: Path) -> list[Path]:
        path = out / "modes.png"
        variance = TRUE_STD[0] ** 2
        return [plot_modes(self.moving_mean, self.moving_variance, TRUE_MEAN[0], variance, path)]


def _row(label: str, values: torch.Tensor) -> str:
    return f"  {label:<38}" + "  ".join(f"{v:8.3f}" for v in values.tolist())


def steps_to_within(fraction: float, momentum: float) -> int:
    """Steps until ``momentum**t <= fraction``: the moving average's bias is below ``fraction``."""
    return math.ceil(math.log(fraction) / math.log(momentum))


def run_modes_demo(seed: int = 0, steps: int = 3000) -> ModesResult:
    """Train BatchNormalization layers on shifted data and report what each mode does.

    Args:
        seed: seeds the data generator.
        steps: training steps (batches of 64) for the momentum comparison.
    """
    generator = torch.Generator().manual_seed(seed)
    true_mean, true_std = torch.tensor(TRUE_MEAN), torch.tensor(TRUE_STD)

    def batch(size: int = _BATCH) -> torch.Tensor:
        return torch.randn(size, 3, generator=generator) * true_std + true_mean

    result = ModesResult(text="")
    lines = ["batchnorm: training vs inference on data with mean [3, -1, 0.5], std [2, 0.5, 1]", ""]
    x = batch(256)
    fresh = BatchNormalization(3, momentum=0.99)
    lines.append("1. Batch vs moving statistics, before training (moving mean 0, variance 1):")
    inference_mean = fresh(x, training=False).mean(0)  # first: training=True moves the averages
    lines.append(_row("training=True  (batch stats) -> mean", fresh(x, training=True).mean(0)))
    lines.append(_row("training=False (moving stats) -> mean", inference_mean))
    lines.append("")

    layers = {momentum: BatchNormalization(3, momentum=momentum) for momentum in MOMENTA}
    for momentum in MOMENTA:
        result.moving_mean[momentum], result.moving_variance[momentum] = [0.0], [1.0]
    checkpoints = sorted({10, 30, 100, 300, 1000, 3000, steps} & set(range(1, steps + 1)))
    lines.append(
        f"2. Moving mean of channel 0 (true mean {TRUE_MEAN[0]}) while training on batches of "
        f"{_BATCH}:"
    )
    lines.append(f"  {'step':>6}" + "".join(f"  momentum {m:<6}" for m in MOMENTA))
    for step in range(1, steps + 1):
        data = batch()
        for momentum, layer in layers.items():
            layer(data, training=True)
            result.moving_mean[momentum].append(float(layer.moving_mean[0]))
            result.moving_variance[momentum].append(float(layer.moving_variance[0]))
        if step in checkpoints:
            lines.append(
                f"  {step:>6}" + "".join(f"  {result.moving_mean[m][-1]:>15.3f}" for m in MOMENTA)
            )
    lines.append(
        "  within 5% of the data's statistics after about ln(0.05)/ln(momentum) steps: "
        + ", ".join(f"{steps_to_within(0.05, m)} at {m}" for m in MOMENTA)
    )
    lines.append("")

    layer = layers[0.99]
    lines.append(f"3. After {steps} steps at momentum 0.99:")
    lines.append(_row("moving mean", layer.moving_mean))
    lines.append(_row("moving std", layer.moving_variance.sqrt()))
    lines.append(_row("training=True  -> output mean", layer(x, training=True).mean(0)))
    lines.append(_row("training=False -> output mean", layer(x, training=False).mean(0)))
    lines.append(_row("training=True  -> output std", layer(x, training=True).std(0)))
    lines.append(_row("training=False -> output std", layer(x, training=False).std(0)))
    lines.append("")
    lines.extend(_freezing_comparison(layer, batch))
    result.text = "\n".join(lines)
    return result


def _freezing_comparison(
    trained: BatchNormalization, batch: Callable[[], torch.Tensor]
) -> list[str]:
    """One SGD step on shifted data from copies of ``trained``, called three ways."""
    shifted = batch() + 5.0
    lines = [
        "4. One SGD step (lr 0.1, loss mean(y^2)) on data shifted by +5, from copies of that layer:",
        f"  {'':<32}{'gamma moved':>12}{'moving mean moved':>19}{'uses moving stats':>19}",
    ]
    cases = (
        ("training=True", True, True),
        ("training=False", True, False),
        ("trainable=False, training=True", False, True),
    )
    for label, trainable, training in cases:
        layer = BatchNormalization(3, momentum=trained.momentum)
        layer.load_state_dict(trained.state_dict())
        layer.trainable = trainable
        with torch.no_grad():
            inference_output = layer(shifted, training=False)
        gamma, moving_mean = layer.gamma.detach().clone(), layer.moving_mean.clone()
        output = layer(shifted, training=training)
        if output.requires_grad:
            output.square().mean().backward()
            torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1).step()
        uses_moving = torch.allclose(output.detach(), inference_output)
        lines.append(
            f"  {label:<32}"
            f"{float((layer.gamma.detach() - gamma).abs().max()):>12.4f}"
            f"{float((layer.moving_mean - moving_mean).abs().max()):>19.4f}"
            f"{'yes' if uses_moving else 'no':>19}"
        )
    lines.append(
        "  training=False uses the moving statistics, but gamma and beta still learn.\n"
        "  trainable=False freezes gamma and beta and ignores training=True (tf-keras 2):\n"
        "  moving statistics unchanged, frozen layers run in inference mode."
    )
    return lines
