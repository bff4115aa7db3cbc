"""A short demonstration of training vs inference mode, printed with numbers.

Training normalises with the batch's own statistics and moves the moving averages toward them;
inference uses the moving averages; ``trainable=False`` freezes everything and runs inference.
"""

from __future__ import annotations

import torch

from batchnorm._batch_normalization import BatchNormalization


def _row(label: str, values: torch.Tensor) -> str:
    return f"  {label:<34}" + "  ".join(f"{v:8.3f}" for v in values.tolist())


def run_modes_demo(seed: int = 0, steps: int = 200) -> str:
    """Train one layer on shifted data and report what each mode does; returns the printed text."""
    generator = torch.Generator().manual_seed(seed)
    true_mean = torch.tensor([3.0, -1.0, 0.5])
    true_std = torch.tensor([2.0, 0.5, 1.0])

    def batch(size: int) -> torch.Tensor:
        return torch.randn(size, 3, generator=generator) * true_std + true_mean

    layer = BatchNormalization(3, momentum=0.99)
    lines = ["batchnorm: training vs inference on data with mean [3, -1, 0.5], std [2, 0.5, 1]", ""]
    x = batch(256)
    lines.append("Before training (moving mean 0, moving variance 1):")
    lines.append(_row("training=True  -> output mean", layer(x, training=True).mean(0)))
    lines.append(_row("training=False -> output mean", layer(x, training=False).mean(0)))
    for step in range(1, steps + 1):
        layer(batch(64), training=True)
        if step in (10, 50, steps):
            lines.append(
                _row(f"after {step:>3} steps: moving mean", layer.moving_mean)
                + "   (momentum 0.99: horizon ~100 steps)"
            )
    lines.append("")
    lines.append(_row("moving std", layer.moving_variance.sqrt()))
    lines.append(_row("training=True  -> output std", layer(x, training=True).std(0)))
    lines.append(_row("training=False -> output std", layer(x, training=False).std(0)))
    frozen = layer.moving_mean.clone()
    layer.trainable = False
    layer(batch(64) + 100.0, training=True)
    changed = not torch.equal(frozen, layer.moving_mean)
    lines.append("")
    lines.append(
        "trainable=False: called with training=True on shifted data, moving statistics "
        + ("CHANGED (bug)" if changed else "unchanged: frozen layers run in inference mode")
    )
    return "\n".join(lines)
