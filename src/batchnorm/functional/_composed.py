"""The composed torch-op path, eager or through ``torch.compile``: one switch for every backend
that falls back on it.

The composed ops (:class:`~batchnorm.functional._torch_ops.TorchOpsBackend`) run what no native
kernel expresses: masks, ghost batches, renorm, several channel axes, per-element adjustments. Eager,
each is a chain of small operations (sums in float64, a centring pass, an rsqrt, the affine
steps), several passes over the input. :func:`compile_composed` runs the same functions through
``torch.compile`` (``fullgraph=True``: they trace without graph breaks), which fuses the chain into
a few kernels: a masked (64, 256, 512) step went from 290 ms to 36 ms on the 2-core CPU.

Each new input signature (shapes, strides, dtypes, devices, ``requires_grad``, grad mode and the
non-tensor arguments) compiles once, a few seconds each (``dynamic=False``: dynamic shapes
specialise size-1 dimensions wrongly in the ghost-batch reshapes), into a compilation of its own:
a copy of the function with its own code object, hence its own Dynamo cache. One ``torch.compile``
per function shared Dynamo's ``recompile_limit`` (8) among every shape, and with
``fullgraph=True`` the 9th raised ``FailOnRecompileLimitHit`` (a model with 9 layers of distinct
widths). Past :data:`SIGNATURES_PER_FUNCTION` signatures of one function, or where Dynamo still
hits a limit, the call runs the eager composed ops, with one warning.

Calls that ``torch.compile`` cannot take run eagerly as well (:func:`runs_eagerly`): inside an
outer ``torch.compile`` trace (it compiles them itself), under ``torch.func`` transforms,
``torch.autograd.forward_ad``, ``torch.jit.trace``, a dispatch mode (``FakeTensorMode``,
``FlopCounterMode``) or on tensor subclasses that dispatch in Python.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import torch

from batchnorm.functional._activation import Activation
from batchnorm.functional._backend import Moments
from batchnorm.functional._cpu_plan import kernels_can_read
from batchnorm.functional._torch_ops import TORCH_OPS, TorchOpsBackend

# Compilations kept per function: each holds its graph and kernels, so the memory stays bounded.
SIGNATURES_PER_FUNCTION = 64


def runs_eagerly(arguments: tuple[Any, ...]) -> bool:
    """Whether a call with ``arguments`` takes the eager composed ops rather than a compilation.

    Inside an outer ``torch.compile`` trace, which compiles them itself. Under ``torch.func``
    transforms (``vmap``, ``grad``, ``functional_call`` per-sample gradients): Dynamo refused
    them ("Unsupported functorch tracing attempt"). Inside ``forward_ad.dual_level()``: the
    compiled function has no forward-mode derivative ("You must implement the jvp function").
    Inside ``torch.jit.trace``, which cannot trace a Dynamo-optimised function. While a dispatch
    mode is active or a tensor argument dispatches in Python (``FakeTensorMode``,
    ``FlopCounterMode``, ``DTensor``): the mode must see each operator, and ``fullgraph=True``
    found no compiled frames. Also for the batched tensors of the older vmap.
    """
    # The same reasons the Numba kernels cannot read a call (x is always among the arguments).
    return torch.compiler.is_compiling() or not all(map(kernels_can_read, _tensors(arguments)))


def _tensors(arguments: tuple[Any, ...]) -> list[torch.Tensor]:
    """The tensors among ``arguments``, those inside tuples (:class:`Moments`) included."""
    found: list[torch.Tensor] = []
    for argument in arguments:
        if isinstance(argument, torch.Tensor):
            found.append(argument)
        elif isinstance(argument, tuple):
            found.extend(_tensors(argument))
    return found


def signature(arguments: tuple[Any, ...]) -> Hashable:
    """What a compilation is specialised on: each tensor's shape, strides, dtype, device and
    ``requires_grad``, the other arguments' values, and the grad mode. Dynamo guards on a few
    things more; a difference there recompiles inside the same compilation."""

    def described(argument: Any) -> Any:
        if isinstance(argument, torch.Tensor):
            return (
                tuple(argument.shape),
                argument.stride(),
                argument.dtype,
                argument.device,
                argument.requires_grad,
            )
        if isinstance(argument, tuple):
            return tuple(described(item) for item in argument)
        return argument

    return (torch.is_grad_enabled(), tuple(described(argument) for argument in arguments))


def _own_copy(function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` with a code object of its own: Dynamo keeps its cache (and counts its
    recompilations) per code object."""
    code = function.__code__.replace()
    copy = types.FunctionType(
        code, function.__globals__, function.__name__, function.__defaults__, function.__closure__
    )
    copy.__kwdefaults__ = function.__kwdefaults__
    copy.__qualname__ = function.__qualname__
    return copy


class CompiledBySignature:
    """``function(TORCH_OPS, *arguments)`` compiled once per :func:`signature`, each signature
    in a compilation of its own; eager (one warning) past ``limit`` signatures or a Dynamo
    recompile limit."""

    def __init__(self, function: Callable[..., Any], options: dict[str, Any], limit: int) -> None:
        self.function = function
        self.options = options
        self.limit = limit
        self.compiled: dict[Hashable, Callable[..., Any]] = {}
        self._warned = False
        # Imported here, not with the package: importing torch._dynamo costs 0.65 s.
        from torch._dynamo.exc import FailOnRecompileLimitHit

        self._limit_hit = FailOnRecompileLimitHit

    def __call__(self, *arguments: Any) -> Any:
        key = signature(arguments)
        compiled = self.compiled.get(key)
        if compiled is None:
            if len(self.compiled) >= self.limit:
                self._warn(f"more than {self.limit} input signatures")
                return self.function(TORCH_OPS, *arguments)
            compiled = torch.compile(_own_copy(self.function), **self.options)
            self.compiled[key] = compiled
        try:
            with warnings.catch_warnings():
                # Dynamo inspects ``.grad`` of the non-leaf tensors it is given (a layer's input
                # usually is one): the warning concerns Dynamo, not the caller.
                warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor")
                return compiled(TORCH_OPS, *arguments)
        except self._limit_hit:
            # Raised before anything runs: the eager ops compute the call instead.
            self._warn("Dynamo's recompile limit (torch._dynamo.config.recompile_limit)")
            return self.function(TORCH_OPS, *arguments)

    def _warn(self, reason: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"compile_composed: `{self.function.__name__}` met {reason}; calls with new "
                "input signatures run the eager composed ops (those compiled so far stay "
                "compiled).",
                RuntimeWarning,
                stacklevel=3,
            )


class CompiledTorchOpsBackend(TorchOpsBackend):
    """The composed ops, each compiled with ``torch.compile(**options)`` once per input
    signature; eager where :func:`runs_eagerly` says so."""

    name = "torch-compiled"

    def __init__(self, **options: Any) -> None:
        options = {"fullgraph": True, "dynamic": False, **options}
        self.options = options
        self._batch_moments = CompiledBySignature(
            TorchOpsBackend.batch_moments, options, SIGNATURES_PER_FUNCTION
        )
        self._normalize_batch = CompiledBySignature(
            TorchOpsBackend.normalize_batch, options, SIGNATURES_PER_FUNCTION
        )
        self._normalize = CompiledBySignature(
            TorchOpsBackend.normalize, options, SIGNATURES_PER_FUNCTION
        )

    def batch_moments(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        weights: torch.Tensor | None,
        ghost_batches: int,
    ) -> Moments:
        arguments = (x, axes, weights, ghost_batches)
        if runs_eagerly(arguments):
            return TORCH_OPS.batch_moments(*arguments)
        moments: Moments = self._batch_moments(*arguments)
        return moments

    def normalize_batch(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        moments: Moments,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        epsilon: float,
        weights: torch.Tensor | None,
        ghost_batches: int,
        activation: Activation | None = None,
    ) -> torch.Tensor:
        arguments = (x, axes, moments, scale, offset, epsilon, weights, ghost_batches, activation)
        if runs_eagerly(arguments):
            return TORCH_OPS.normalize_batch(*arguments)
        y: torch.Tensor = self._normalize_batch(*arguments)
        return y

    def normalize(
        self,
        x: torch.Tensor,
        axes: tuple[int, ...],
        mean: torch.Tensor,
        variance: torch.Tensor,
        scale: torch.Tensor | None,
        offset: torch.Tensor | None,
        epsilon: float,
        activation: Activation | None = None,
    ) -> torch.Tensor:
        arguments = (x, axes, mean, variance, scale, offset, epsilon, activation)
        if runs_eagerly(arguments):
            return TORCH_OPS.normalize(*arguments)
        y: torch.Tensor = self._normalize(*arguments)
        return y


_COMPOSED: list[TorchOpsBackend] = [TORCH_OPS]


def compile_composed(enabled: bool = True, **options: Any) -> None:
    """Run the composed torch-op path through ``torch.compile(**options)`` (default
    ``fullgraph=True, dynamic=False``; e.g. ``mode="max-autotune"``), or eagerly again with
    ``enabled=False``. It serves masks, ghost batches, renorm, several channel axes and
    per-element adjustments on every device, and everything on devices without a native kernel.

    Each new input signature compiles once; past :data:`SIGNATURES_PER_FUNCTION` of them per
    function, new ones run eagerly (one warning). Calls under ``torch.func`` transforms, forward
    AD, ``torch.jit.trace`` or dispatch modes run eagerly (:func:`runs_eagerly`).

    Example:
        >>> batchnorm.functional.compile_composed()  # before training
    """
    _COMPOSED[0] = CompiledTorchOpsBackend(**options) if enabled else TORCH_OPS


def composed_ops() -> TorchOpsBackend:
    """The composed torch-op backend in use: eager, or compiled after :func:`compile_composed`."""
    return _COMPOSED[0]
