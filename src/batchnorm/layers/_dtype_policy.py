"""The layer's ``dtype`` argument: a torch dtype, a Keras dtype name or policy, or a Keras 3 policy dict.

Keras keeps batch-norm parameters in float32 under float16/bfloat16 policies (``_param_dtype``);
only float64 raises them to float64. The compute dtype decides whether tf-keras may fuse.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import torch


class DTypePolicy(NamedTuple):
    name: str
    parameter_dtype: torch.dtype
    compute_dtype: torch.dtype


_POLICIES = {
    "float32": DTypePolicy("float32", torch.float32, torch.float32),
    "float64": DTypePolicy("float64", torch.float64, torch.float64),
    "float16": DTypePolicy("float16", torch.float32, torch.float16),
    "bfloat16": DTypePolicy("bfloat16", torch.float32, torch.bfloat16),
    "mixed_float16": DTypePolicy("mixed_float16", torch.float32, torch.float16),
    "mixed_bfloat16": DTypePolicy("mixed_bfloat16", torch.float32, torch.bfloat16),
}
_TORCH_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
}


def resolve_dtype_policy(dtype: Any) -> DTypePolicy:
    """The policy ``dtype`` names. ``None`` names torch's default dtype when the layer is made:
    Keras' ``None`` is its global policy (``floatx``, float32 unless set), and torch's modules
    take ``torch.get_default_dtype()``; after ``torch.set_default_dtype(torch.float64)`` a
    float32 batch norm among float64 layers lost precision in its moving statistics, and FSDP1
    refuses to flatten parameters of mixed dtypes."""
    if dtype is None:
        return resolve_dtype_policy(torch.get_default_dtype())
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_NAMES:
            raise ValueError(
                "`dtype` must be a floating dtype (float16, bfloat16, float32, float64). "
                f"Received: dtype={dtype}"
            )
        return _POLICIES[_TORCH_NAMES[dtype]]
    if isinstance(dtype, Mapping):
        # Keras 3 writes {"module": "keras", "class_name": "DTypePolicy", "config": {"name": ...}}.
        return resolve_dtype_policy((dtype.get("config") or {}).get("name"))
    if isinstance(dtype, str) and dtype in _POLICIES:
        return _POLICIES[dtype]
    raise ValueError(
        f"`dtype` must be None, a torch floating dtype or one of {sorted(_POLICIES)}. "
        f"Received: dtype={dtype!r}"
    )
