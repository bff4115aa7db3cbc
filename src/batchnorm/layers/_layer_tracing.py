"""How tracers that record torch operators see a BatchNormalization layer.

``torch.fx.symbolic_trace`` records the layer as one ``call_module`` node (:func:`fx_leaf_call`);
``torch.jit.trace`` records the composed torch ops that its calls take there
(:func:`batchnorm.functional._cpu_plan.kernels_can_read`); ``torch.compile`` and ``torch.export``
trace the kernels' custom ops. ``torch.jit.script``, which compiles a module's Python source,
cannot compile the layer: it is refused with the ways that work (:func:`refuse_scripting`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.jit._trace import TracerWarning


def fx_leaf_call(
    layer: nn.Module,
    x: torch.fx.Proxy,
    training: bool | torch.Tensor | None,
    mask: torch.Tensor | None,
) -> torch.fx.Proxy:
    """The layer as one ``call_module`` node of a ``torch.fx`` graph, as torch's own modules are.

    ``torch.fx.symbolic_trace`` traces through modules from outside ``torch.nn``, and this
    layer's checks branch on ``x``'s sizes, which a symbolic trace cannot do ("symbolically
    traced variables cannot be used as inputs to control flow"). The graph module calls the
    layer itself, so the call keeps every path (kernels, moving-statistics updates)."""
    tracer = x.tracer
    name = tracer.path_of_module(layer)  # type: ignore[attr-defined]
    if not name:
        raise TypeError(
            "torch.fx traces a BatchNormalization layer as one call of the module around it: "
            "trace a model that contains the layer, or pass it to the tracer as a leaf. "
            f"Received: the layer {getattr(layer, 'name', type(layer).__name__)} as the traced root"
        )
    kwargs = {"training": training, "mask": mask}
    return tracer.create_proxy("call_module", name, (x,), kwargs)


@contextmanager
def without_tracer_warnings() -> Iterator[None]:
    """A layer call inside ``torch.jit.trace``, without the tracer's warnings about its checks.

    The call runs the torch ops (the kernels are invisible to the tracer), and the trace keeps
    its rank, channels, options and mode, as any trace keeps what Python decided; the tracer
    warned at each check that read ``x``'s sizes."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TracerWarning)
        yield


def refuse_scripting(layer: nn.Module, convertible: bool = True) -> None:
    """Raise the error that ``torch.jit.script`` gives a model containing ``layer`` (through
    ``__prepare_scriptable__``, which it calls on every module first). TorchScript compiles a
    module's Python source, and these layers' forwards run Python (kernels, checks, a lazy
    build): scripting failed deep in its compiler ("Unknown type annotation: 'nn.Parameter'").
    ``convertible``: whether ``batchnorm.convert(model, to="torch")`` has a torch module for it."""
    name = getattr(layer, "name", None)
    label = type(layer).__name__ if name is None else f"{type(layer).__name__} {name}"
    convert = (
        ", or batchnorm.convert(model, to='torch') first for torch's scriptable batch norm where "
        "it computes the same"
        if convertible
        else ""
    )
    raise RuntimeError(
        f"torch.jit.script cannot compile {label}: its forward runs "
        "Python that TorchScript cannot compile. Use torch.jit.trace(model.eval(), "
        "example_input) (traced calls record torch ops, and the file loads without this "
        f"package), torch.export or torch.compile{convert}"
    )
