"""Framework presets: the settings that make :class:`BatchNormalization` behave like another framework.

Every value is in this layer's own (Keras) convention: ``momentum`` weights the OLD moving value,
so PyTorch's ``momentum=0.1`` is ``momentum=0.9`` here and Caffe's
``moving_average_fraction=0.999`` is ``momentum=0.999``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Framework = Literal["keras", "keras3", "torch", "caffe", "flax"]

FRAMEWORK_PRESETS: dict[str, dict[str, Any]] = {
    # tf-keras 2 (tf.keras.layers.BatchNormalization): fused path stores the unbiased variance.
    "keras": {
        "axis": -1,
        "momentum": 0.99,
        "epsilon": 1e-3,
        "moving_variance_estimator": "auto",
        "moving_average": "ema",
        "center": True,
        "scale": True,
        "use_global_stats": None,
    },
    # Keras 3 (keras.layers.BatchNormalization): ops.moments, the biased variance on every path.
    # It has no fused path, so a mask counts on rank-4/5 inputs too (tf-keras' fused path, which
    # fused=None picks there, ignores it), and it casts the mask to bool (`_moments`): any
    # non-zero value counts fully, where tf-keras weighs positions by the values.
    "keras3": {
        "axis": -1,
        "momentum": 0.99,
        "epsilon": 1e-3,
        "moving_variance_estimator": "biased",
        "moving_average": "ema",
        "center": True,
        "scale": True,
        "use_global_stats": None,
        "fused": False,
        "mask_weights": False,
    },
    # torch.nn.BatchNorm2d: channels at dim 1, momentum 0.1 on the new value, unbiased running_var.
    "torch": {
        "axis": 1,
        "momentum": 0.9,
        "epsilon": 1e-5,
        "moving_variance_estimator": "unbiased",
        "moving_average": "ema",
        "center": True,
        "scale": True,
        "use_global_stats": None,
    },
    # Caffe BatchNorm: scale-factor (debiased) average with fraction 0.999, m/(m-1) variance, no
    # gamma/beta (those live in a following Scale layer), global stats in the TEST phase. Its blobs
    # start at 0: with the scale factor s = 0 it normalises with mean 0 and variance 0
    # (x / sqrt(eps)) until the first training step, hence the zero moving variance.
    "caffe": {
        "axis": 1,
        "momentum": 0.999,
        "epsilon": 1e-5,
        "moving_variance_estimator": "unbiased",
        "moving_average": "debiased",
        "moving_variance_initializer": "zeros",
        "center": False,
        "scale": False,
        "use_global_stats": None,
    },
    # flax.linen.BatchNorm: Keras momentum convention, epsilon 1e-5, biased variance.
    "flax": {
        "axis": -1,
        "momentum": 0.99,
        "epsilon": 1e-5,
        "moving_variance_estimator": "biased",
        "moving_average": "ema",
        "center": True,
        "scale": True,
        "use_global_stats": None,
    },
}

_FRAMEWORK_LABELS = {
    "keras": "tf-keras 2",
    "keras3": "Keras 3",
    "torch": "PyTorch",
    "caffe": "Caffe",
    "flax": "Flax (linen)",
}


def preset_kwargs(framework: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The layer arguments of ``framework``'s preset, updated with ``overrides``."""
    if not isinstance(framework, str) or framework not in FRAMEWORK_PRESETS:
        raise ValueError(
            f"`framework` must be one of {', '.join(repr(f) for f in get_args(Framework))}. "
            f"Received: framework={framework!r}"
        )
    return {**FRAMEWORK_PRESETS[framework], **overrides}


def porting_table() -> str:
    """The presets as a Markdown table (the README's "Porting between frameworks" table)."""
    header = (
        "| framework | `like(...)` | axis | momentum here (theirs) | epsilon | moving variance "
        "| moving average | gamma/beta |\n|---|---|---|---|---|---|---|---|"
    )
    rows = [header]
    for framework, preset in FRAMEWORK_PRESETS.items():
        momentum = preset["momentum"]
        theirs = {"torch": f"{1 - momentum:.1f}", "caffe": f"maf {momentum}"}.get(
            framework, f"{momentum}"
        )
        variance = {
            "auto": "unbiased on the fused path, else biased",
            "biased": "biased",
            "unbiased": "unbiased (n/(n-1))",
        }[preset["moving_variance_estimator"]]
        averaging = {"ema": "exponential", "debiased": "debiased (scale factor)"}[
            preset["moving_average"]
        ]
        affine = "yes" if preset["center"] and preset["scale"] else "no (Scale layer)"
        rows.append(
            f'| {_FRAMEWORK_LABELS[framework]} | `"{framework}"` | {preset["axis"]} '
            f"| {momentum} ({theirs}) | {preset['epsilon']:g} | {variance} | {averaging} "
            f"| {affine} |"
        )
    return "\n".join(rows)
