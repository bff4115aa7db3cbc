"""``fold``: an inference copy of a model with each batch norm folded into the layer before it."""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm, remove_spectral_norm
from torch.nn.utils.weight_norm import WeightNorm, remove_weight_norm

from batchnorm.functional._activation import Activation, activate, check_activation
from batchnorm.functional._validation import check_axis_type, check_module
from batchnorm.interop._activation_conversion import describe, is_activated_batch_norm
from batchnorm.interop._frozen_batch_norm import is_frozen_torch_batch_norm
from batchnorm.interop._module_places import module_places
from batchnorm.interop._torch_conversion import _TORCH_FORWARDS
from batchnorm.layers import BatchNormalization
from batchnorm.tools import _batch_norm_modules as bn
from batchnorm.tools._fold_weights import fold_weights
from batchnorm.tools._model_copy import model_copy

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLDABLE_LAYERS = (*_CONVOLUTIONS, *_TRANSPOSED, nn.Linear)
# The forward pre-hooks that compute a weight from others (pruning, torch.nn.utils.weight_norm and
# spectral_norm): folding bakes them in. Any other hook on a pair's modules stops the fold.
_REROUTING_HOOKS = (prune.BasePruningMethod, WeightNorm, SpectralNorm)


@dataclasses.dataclass
class FoldResult:
    """What :func:`fold` did.

    Attributes:
        model: the folded inference copy (eval mode); the original model is untouched.
        folded: ``(layer, batch_norm)`` qualified names of each pair folded; the batch norm's
            place holds a :class:`FoldedBatchNorm` (identity).
        not_folded: ``{batch_norm: reason}`` for each batch norm left in place (inference mode).
        max_difference: largest ``|folded(x) - original(x)|`` over the outputs for
            ``example_input`` (both in eval mode), or None without it or where the outputs
            hold no values to compare (a model on the meta device; ``notes`` says so).
        notes: remarks such as "the model was in training mode".
    """

    model: nn.Module
    folded: list[tuple[str, str]]
    not_folded: dict[str, str]
    max_difference: float | None = None
    notes: list[str] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} batch norm(s):"]
        lines += [f"  {norm} -> {layer}" for layer, norm in self.folded]
        if self.not_folded:
            lines.append(f"not folded ({len(self.not_folded)}):")
            lines += [f"  {bn.display_name(n)}: {why}" for n, why in self.not_folded.items()]
        if self.max_difference is not None:
            lines.append(f"largest difference from the original: {self.max_difference:.3g}")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


class FoldedBatchNorm(nn.Module):
    """Stands where a folded batch norm was and returns its input unchanged, or with the batch
    norm's fused activation applied (extra arguments such as ``training`` or ``mask`` are
    ignored): its affine transform now lives in the layer ``into``."""

    def __init__(self, into: str, activation: Activation | None = None) -> None:
        super().__init__()
        self.into = into
        self.activation = activation

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The input, given by position or as the batch norm takes it by name (``input`` for
        torch's, ``x`` for ours)."""
        x, _ = _norm_input(args, kwargs)
        return activate(x, self.activation)

    def extra_repr(self) -> str:
        if self.activation is None:
            return f"into={self.into!r}"
        parameter = "" if self.activation.parameter is None else f"({self.activation.parameter})"
        return f"into={self.into!r}, activation={self.activation.name}{parameter}"


def _is_norm(module: object) -> bool:
    """A batch norm fold can fold: ours, torch's, or a ``FrozenBatchNorm2d``."""
    return bn.is_batch_norm(module) or bn.is_frozen_batch_norm(module)


class _BatchNormLeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return _is_norm(m) or super().is_leaf_module(m, module_qualified_name)


def fold(
    model: nn.Module,
    example_input: Any = None,
    *,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> FoldResult:
    """An inference copy of ``model`` with every batch norm that directly follows a convolution
    or Linear folded into that layer's weight and bias (see :func:`fold_weights`):

    .. math::
        W' = \\frac{\\gamma}{\\sqrt{v + \\epsilon}} W, \\qquad
        b' = \\frac{\\gamma}{\\sqrt{v + \\epsilon}} (b - m) + \\beta

    with the moving mean ``m`` and variance ``v`` as stored. Pairs are found by ``torch.fx``
    tracing (batch norms are leaves): a ``Conv1d/2d/3d``, ``ConvTranspose1d/2d/3d`` or
    ``Linear`` called once whose output feeds only a batch norm (ours, torch's, or a
    ``FrozenBatchNorm2d`` of torchvision, detectron2 or DETR), grouped and
    depthwise convolutions and layers without bias included. The batch norm's channel axis must
    be the layer's output channel: axis 1 after a convolution, the last axis after a Linear
    (so a Linear on channels-last data followed by ``BatchNormalization(axis=-1)`` folds, a
    Conv2d followed by ``axis=-1`` does not). A torch batch norm after a Linear is taken to see
    2-D input (its channel axis is 1); give ``example_input`` to have ranks checked. Batch norms
    that cannot be folded (batch statistics at inference, several channel axes, shared layers,
    a layer whose output has other users, a layer weight the forward also reads, a forward hook
    on either module...) stay, in inference mode, and are listed with the reason. A batch norm
    registered under several names is replaced at each; a parametrized, pruned or
    weight-normalised layer is folded with the weight it computes (its rerouting baked in).
    timm's ``BatchNormAct2d`` / ``SyncBatchNormAct`` fold keeping what follows the
    normalisation (``act(drop(...))``: the activation in the :class:`FoldedBatchNorm`, or
    ``drop`` and ``act`` as modules after it); any other torch batch-norm subclass overriding
    ``forward`` is not folded (what it computes is unknown).

    Where tracing fails (data-dependent control flow), name the pairs by hand:
    ``pairs=[("features.0", "features.1"), ...]`` as ``(layer, batch_norm)`` qualified names
    from ``model.named_modules()``; no tracing is done then, and you vouch that each batch norm
    takes exactly that layer's output.

    torch's fusers do not fold ``batchnorm.BatchNormalization``; use ``batchnorm.fold``:
    ``torch.fx.experimental.optimization.fuse`` matches only the exact types
    ``nn.BatchNorm1d/2d/3d`` (its ``symbolic_trace`` also fails inside our layer, which refuses
    the tracing Proxy, and on a graph where our layer is a leaf it leaves it in place silently);
    ``torch.ao.quantization.fuse_modules`` raises "did not find fuser method" for
    ``(Conv2d, BatchNormalization)``; ``torch.nn.utils.fusion.fuse_conv_bn_eval`` looks for
    ``running_mean``, which our layer calls ``moving_mean``.

    Args:
        model: the model; it is deep-copied, never modified. A model in training mode is folded
            in eval mode (a warning says so).
        example_input: a tensor, or a tuple of positional inputs; when given, the folded copy is
            checked against the original (both in eval mode) and the ranks seen are checked.
        pairs: hand-named ``(layer, batch_norm)`` pairs instead of tracing.

    Returns:
        A :class:`FoldResult`: ``.model``, ``.folded``, ``.not_folded``, ``.max_difference``.

    Example:
        >>> result = batchnorm.fold(model, torch.randn(1, 3, 32, 32))
        >>> print(result)  # pairs folded, the rest and why  # doctest: +SKIP
        >>> fast_model = result.model
    """
    check_module(model)
    notes: list[str] = []
    if any(module.training for module in model.modules()):
        message = (
            "fold: the model is in training mode; the folded copy is in eval mode (inference "
            "statistics) and the original model is unchanged."
        )
        warnings.warn(message, UserWarning, stacklevel=2)
        notes.append(message)
    folded_model = model_copy(model).eval()
    modules = dict(folded_model.named_modules())
    inputs = None if example_input is None else _as_inputs(example_input)
    reference: Any = None
    ranks: dict[str, int] = {}
    if inputs is not None:
        reference, ranks = _run_recording_ranks(folded_model, inputs)
    if pairs is None:
        candidates, not_folded = _traced_pairs(folded_model, modules)
    else:
        candidates, not_folded = _checked_pairs(pairs, modules)
    folded = []
    for layer_name, norm_name in candidates:
        reason = _why_not_foldable(modules[layer_name], modules[norm_name], layer_name, ranks)
        if reason is not None:
            not_folded[norm_name] = reason
            continue
        _bake_rerouting(modules[layer_name])
        _fold_pair(modules[layer_name], modules[norm_name])
        kept, following = _fused_activation(modules[norm_name])
        replacement: nn.Module = FoldedBatchNorm(layer_name, kept)
        if following:  # timm's drop and an act FoldedBatchNorm cannot compute, as they were
            replacement = nn.Sequential(replacement, *following).eval()
        _replace(folded_model, modules[norm_name], replacement)
        folded.append((layer_name, norm_name))
    not_folded = {name: not_folded[name] for name in modules if name in not_folded}
    max_difference = None
    if inputs is not None and reference is not None:
        with torch.no_grad():
            output = folded_model(*inputs)
        max_difference = _max_difference(reference, output)
        if max_difference is None:
            notes.append("no difference measured: the outputs are on the meta device (no values)")
    return FoldResult(folded_model, folded, not_folded, max_difference, notes)


def _as_inputs(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, tuple) else (example_input,)


def _run_recording_ranks(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[Any, dict[str, int]]:
    """The eval-mode output, and the output rank of each foldable layer / input rank of each BN."""
    ranks: dict[str, int] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, FOLDABLE_LAYERS):
            handles.append(
                module.register_forward_hook(
                    lambda _m, _a, out, name=name: ranks.__setitem__(name, out.ndim)
                )
            )
        elif _is_norm(module):
            handles.append(
                module.register_forward_pre_hook(
                    lambda _m, args, kwargs, name=name: ranks.__setitem__(
                        name, _norm_input(args, kwargs)[0].ndim
                    ),
                    with_kwargs=True,
                )
            )
    try:
        with torch.no_grad():
            return model(*inputs), ranks
    finally:
        for handle in handles:
            handle.remove()


def _traced_pairs(
    model: nn.Module, modules: dict[str, nn.Module]
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    norms = [name for name, module in modules.items() if _is_norm(module)]
    try:
        graph = _BatchNormLeafTracer().trace(model)
    except Exception as error:
        reason = (
            f"torch.fx could not trace the model ({type(error).__name__}: {error}); name the "
            "pairs by hand with fold(model, pairs=[(layer, batch_norm), ...])"
        )
        return [], dict.fromkeys(norms, reason)
    calls = Counter(str(node.target) for node in graph.nodes if node.op == "call_module")
    # Tensors the forward reads from a module itself (a decoder tied to an encoder's weight)
    read = [str(node.target) for node in graph.nodes if node.op == "get_attr"]
    candidates: list[tuple[str, str]] = []
    not_folded: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not _is_norm(modules[str(node.target)]):
            continue
        name = str(node.target)
        problem = _why_not_a_pair(node, modules, calls, read)
        if problem is None:
            source = cast(fx.Node, _norm_input(node.args, node.kwargs)[0])
            candidates.append((str(source.target), name))
        else:
            not_folded[name] = problem
    for name in norms:
        if name not in not_folded and name not in {n for _, n in candidates}:
            not_folded[name] = "not called in the traced forward"
    return candidates, not_folded


def _why_not_a_pair(
    node: fx.Node, modules: dict[str, nn.Module], calls: Counter, read: list[str]
) -> str | None:
    name = str(node.target)
    if calls[name] > 1:
        return f"called {calls[name]} times in the forward"
    source, extra = _norm_input(node.args, node.kwargs)
    if any(value not in (None, False) for value in extra.values()):
        return f"called with arguments {extra} (only the input can be folded)"
    if not isinstance(source, fx.Node) or source.op != "call_module":
        return f"its input comes from {_describe(source)}, not a Conv/ConvTranspose/Linear"
    layer_name = str(source.target)
    layer = modules[layer_name]
    if not isinstance(layer, FOLDABLE_LAYERS):
        return f"its input comes from {layer_name} ({type(layer).__name__}), not a Conv/ConvTranspose/Linear"
    if calls[layer_name] > 1:
        return f"{layer_name} is called {calls[layer_name]} times in the forward"
    if len(source.users) != 1:
        return f"the output of {layer_name} is also used elsewhere"
    for target in read:
        if target.startswith((f"{layer_name}.", f"{name}.")):
            return f"the forward also reads {target} directly, which folding would change"
    return None


def _norm_input(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """A batch norm call's input, positional or by keyword (torch's ``input``, ours ``x``), and
    its other arguments by name."""
    extra = dict(kwargs)
    if args:
        source = args[0]
        extra |= dict(zip(("training", "mask"), args[1:], strict=False))
    else:
        source = extra.pop("input", extra.pop("x", None))
    return source, extra


def _describe(source: Any) -> str:
    if not isinstance(source, fx.Node):
        return repr(source)
    if source.op == "placeholder":
        return f"the model input {source.target}"
    target = getattr(source.target, "__name__", source.target)
    return f"{source.op} {target}"


def _checked_pairs(
    pairs: Any, modules: dict[str, nn.Module]
) -> tuple[list[tuple[str, str]], dict[str, str]]:
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise TypeError(f"`pairs` must be a list of (layer, batch_norm) names. Received: {pairs!r}")
    seen: set[str] = set()
    for pair in pairs:
        if not (
            isinstance(pair, Sequence) and len(pair) == 2 and all(isinstance(n, str) for n in pair)
        ):
            raise TypeError(
                f"Each entry of `pairs` must be a (layer, batch_norm) pair of names. Received: {pair!r}"
            )
        layer_name, norm_name = pair
        for n in pair:
            if n not in modules or n == "":
                raise ValueError(f"`pairs` names a module the model does not have. Received: {n!r}")
        if not isinstance(modules[layer_name], FOLDABLE_LAYERS):
            raise ValueError(
                f"`pairs`: {layer_name} must be a Conv1d/2d/3d, ConvTranspose1d/2d/3d or Linear. "
                f"Received: {type(modules[layer_name]).__name__}"
            )
        if not _is_norm(modules[norm_name]):
            raise ValueError(
                f"`pairs`: {norm_name} must be a batch norm. "
                f"Received: {type(modules[norm_name]).__name__}"
            )
        if norm_name in seen or layer_name in seen:
            raise ValueError(f"`pairs` names a module twice. Received: {pair!r}")
        seen.update(pair)
    candidates = [(str(a), str(b)) for a, b in pairs]
    not_folded = {
        name: "not named in `pairs`"
        for name, module in modules.items()
        if _is_norm(module) and name not in seen
    }
    return candidates, not_folded


def _why_not_foldable(
    layer: nn.Module, norm: nn.Module, layer_name: str, ranks: dict[str, int]
) -> str | None:
    buffers = bn.statistics_buffers(norm)
    for module, role in ((layer, layer_name), (norm, "the batch norm")):
        hooks = [*module._forward_hooks.values(), *module._forward_pre_hooks.values()]
        foreign = [h for h in hooks if not isinstance(h, _REROUTING_HOOKS)]
        if foreign:
            names = ", ".join(getattr(h, "__qualname__", type(h).__name__) for h in foreign)
            return f"{role} has forward hooks that folding would bypass ({names})"
    if _computes_unknown(norm):
        return (
            f"{type(norm).__name__} overrides the batch norm's forward: what it computes "
            "beyond normalising (an activation, say) is unknown, and folding would drop it"
        )
    if isinstance(norm, BatchNormalization) and not norm.built:
        return "not built yet: call the model once or pass example_input"
    if buffers is None or not bn.normalises_with_moving_statistics(norm):
        return "it normalises with batch statistics at inference (no moving statistics used)"
    out_channels = _out_channels(layer)
    if tuple(buffers[0].shape) != (out_channels,):
        return (
            f"its statistics have shape {tuple(buffers[0].shape)}, but {layer_name} has "
            f"{out_channels} output channels"
        )
    rank = ranks.get(layer_name)
    if isinstance(norm, BatchNormalization):
        if rank is None:
            rank = norm._input_rank
        if rank is None and isinstance(layer, (*_CONVOLUTIONS, *_TRANSPOSED)):
            rank = layer.weight.ndim
        axes = check_axis_type(norm.axis)
        if rank is None:
            if axes != [-1]:
                return f"its input rank is unknown for axis={norm.axis}: pass example_input"
        else:
            channel = 1 if not isinstance(layer, nn.Linear) else rank - 1
            if bn.channel_axes(norm, rank) != (channel,):
                return (
                    f"its axis {norm.axis} is not the output-channel axis {channel} of "
                    f"{layer_name} (rank {rank})"
                )
    elif isinstance(layer, nn.Linear) and rank is not None and rank != 2:
        return f"{type(norm).__name__} normalises axis 1 but {layer_name}'s features are axis {rank - 1}"
    return None


def _out_channels(layer: nn.Module) -> int:
    weight = cast(torch.Tensor, layer.weight)
    if isinstance(layer, _TRANSPOSED):
        return int(weight.shape[1] * layer.groups)
    return int(weight.shape[0])


def _bake_rerouting(layer: nn.Module) -> None:
    """Make the layer's weight and bias plain parameters holding the values its parametrizations,
    pruning or ``torch.nn.utils.weight_norm``/``spectral_norm`` compute (in eval mode: no power
    iteration), as ``remove_parametrizations(leave_parametrized=True)`` and ``prune.remove`` do."""
    if parametrize.is_parametrized(layer):
        # A class of the copy's own: a deep copy shares the original's parametrized class, from
        # which removing the last parametrization deletes the property (the original module
        # then had no `weight`).
        shared = type(layer)
        own = {k: v for k, v in vars(shared).items() if k not in ("__dict__", "__weakref__")}
        layer.__class__ = type(shared.__name__, shared.__bases__, own)
    for name in ("weight", "bias"):
        if parametrize.is_parametrized(layer, name):
            parametrize.remove_parametrizations(layer, name, leave_parametrized=True)
    for hook in list(layer._forward_pre_hooks.values()):
        if isinstance(hook, prune.BasePruningMethod):
            prune.remove(layer, hook._tensor_name)  # type: ignore[no-untyped-call]
        elif isinstance(hook, WeightNorm):
            remove_weight_norm(layer, hook.name)
        elif isinstance(hook, SpectralNorm):
            remove_spectral_norm(layer, hook.name)


def _fold_pair(layer: nn.Module, norm: nn.Module) -> None:
    buffers = bn.statistics_buffers(norm)
    assert buffers is not None
    gamma, beta = bn.affine(norm)
    weight, bias = fold_weights(
        cast(torch.Tensor, layer.weight),
        cast("torch.Tensor | None", layer.bias),
        buffers[0],
        buffers[1],
        gamma,
        beta,
        bn.epsilon(norm),
        transposed=isinstance(layer, _TRANSPOSED),
        groups=int(getattr(layer, "groups", 1)),
    )
    requires_grad = bool(layer.weight.requires_grad)
    layer.weight = nn.Parameter(weight, requires_grad=requires_grad)
    layer.bias = nn.Parameter(bias.to(weight.device), requires_grad=requires_grad)


def _computes_unknown(norm: nn.Module) -> bool:
    """A torch batch-norm subclass whose own forward does more than normalise, other than
    timm's batch norms with an activation (:func:`describe` says what they compute) and the
    frozen classes of :func:`batchnorm.freeze` (which normalise with the running statistics)."""
    return (
        isinstance(norm, _BatchNorm)
        and type(norm).forward not in _TORCH_FORWARDS
        and not is_frozen_torch_batch_norm(norm)
        and not is_activated_batch_norm(norm)
    )


def _fused_activation(norm: nn.Module) -> tuple[Activation | None, tuple[nn.Module, ...]]:
    """The activation a batch norm applies after normalising (our layer's ``activation``, or
    timm's ``act`` where one of ours computes it), and the modules that must still follow it
    (timm's ``drop`` and an ``act`` no activation of ours computes)."""
    if is_activated_batch_norm(norm):
        activated = describe(norm)
        options = activated.layer_options
        kept = check_activation(options.get("activation"), options.get("activation_param"))
        return kept, activated.following
    if not isinstance(norm, BatchNormalization):
        return None, ()
    return check_activation(norm.activation, norm.activation_param), ()


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put ``new`` at every place ``old`` sits (:func:`module_places`)."""
    for parent, name, _ in module_places(model, lambda child: child is old):
        setattr(parent, name, new)


def _max_difference(reference: Any, output: Any) -> float | None:
    """The largest ``|output - reference|`` over the tensors of both; None where a tensor has
    no values to compare (the meta device)."""
    pairs = [
        (a, b)
        for a, b in zip(pytree.tree_leaves(reference), pytree.tree_leaves(output), strict=True)
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
    ]
    if any(t.is_meta for pair in pairs for t in pair):
        return None
    differences = [
        float((a.double() - b.double()).abs().max()) if a.numel() else 0.0 for a, b in pairs
    ]
    return max(differences, default=0.0)
