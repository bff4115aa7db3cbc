"""What the CPU kernels need to know about an input signature, worked out once.

An input signature is ``(shape, strides, dtype, channel axes, ghost batches or not)``. Its
:class:`CpuPlan` holds the canonical ``(rows, channels, inner)`` layout
(:mod:`batchnorm.functional._canonical_layout`), the row blocks, the compiled kernels for that
layout (the ``rows`` or ``narrow`` build for channels last, ``planes`` otherwise:
:func:`batchnorm.kernels._jit.layout_for`), and how to allocate an output
laid out like the input. Plans are kept per signature, so a call with a signature seen before
does no layout search, no kernel choice and no shape arithmetic: on a (32, 64) batch that work
cost more than the kernel itself.

Also here: NumPy views of the long-lived per-channel tensors (parameters and buffers), kept by
tensor, for the same reason.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.autograd.forward_ad as forward_ad

from batchnorm import kernels
from batchnorm.functional import _output_memory as output_memory
from batchnorm.functional._canonical_layout import (
    CanonicalLayout,
    canonical_layout,
    canonical_weights,
    inverse_permutation,
)
from batchnorm.kernels import _ahead as ahead
from batchnorm.kernels._jit import Kernel, LayoutKernel, layout_for

KERNEL_DTYPES = (torch.float32, torch.float64)
# Half precision, read and written by the kernels as its bits (batchnorm.kernels._half): float16
# as uint16, bfloat16 as int16; computed in float32.
HALF_BITS: dict[torch.dtype, type] = {torch.float16: np.uint16, torch.bfloat16: np.int16}
# The dtypes whose tensors the kernels read (and write) through a NumPy view, without a copy.
VIEWED_DTYPES = (*KERNEL_DTYPES, *HALF_BITS)
NO_WEIGHTS: dict[torch.dtype, np.ndarray] = {
    torch.float32: np.zeros((1, 1), np.float32),
    torch.float64: np.zeros((1, 1), np.float64),
}


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels compute in for data of ``dtype``: float32 for half precision."""
    return torch.float32 if dtype in HALF_BITS else dtype


def kernels_can_read(x: torch.Tensor) -> bool:
    """Whether the kernels can read a call's tensors through NumPy: ``x`` is not a functorch
    wrapper (``vmap``, ``grad``, ``jacrev``, ...), and no transform is active either, under which
    the layer's parameters may be wrappers of their own (``torch.func.functional_call`` puts
    them in the layer) even when ``x`` is a plain tensor captured by the function. Wrappers have
    no storage for NumPy to view: those calls take the torch ops, which the transforms see
    through.

    Nor inside ``torch.jit.trace``: the tracer records torch operators only, so a kernel's output
    would enter the TorchScript graph as a constant (and the tracer turns sizes into tensors,
    which Numba cannot type: the trace failed with a TypingError). Traced calls take the torch
    ops, which a TorchScript file keeps (it loads without this package).

    Nor for a batched tensor of the older vmap (:func:`storageless`). Nor inside
    ``torch.autograd.forward_ad.dual_level()``: the kernels' autograd functions have no
    forward-mode derivative (a dual input raised NotImplementedError), the torch ops have.

    Nor while a dispatch mode is active (``FakeTensorMode``, ``FlopCounterMode``, memory
    trackers: every ``TorchDispatchMode``), which must see each operator; a fake input failed
    with ".numpy() is not supported for tensor subclasses". Nor for a tensor subclass that
    dispatches in Python (``DTensor``, ``FakeTensor``): :func:`dispatched_in_python`.
    """
    return not (
        torch._C._are_functorch_transforms_active()
        or storageless(x)
        or dispatched_in_python(x)
        or torch._C._get_tracing_state() is not None
        or forward_ad._current_level >= 0
    )


_FUNCTORCH_WRAPPED = torch._C._functorch.is_functorch_wrapped_tensor
_LEGACY_BATCHED = torch._C._functorch.is_legacy_batchedtensor
_DISPATCH_KEYS = torch._C._dispatch_keys
_PYTHON_KEY = torch._C.DispatchKey.Python


def storageless(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a wrapper without storage for NumPy to view: a functorch wrapper,
    or a batched tensor of the older vmap, which ``torch.autograd.functional.jacobian`` and
    ``hessian`` (``vectorize=True``) and ``torch.autograd.grad(is_grads_batched=True)`` pass to
    a backward as its upstream gradient."""
    return _FUNCTORCH_WRAPPED(tensor) or _LEGACY_BATCHED(tensor)


def dispatched_in_python(tensor: torch.Tensor) -> bool:
    """Whether operators on ``tensor`` go through Python: a dispatch mode is active
    (``FakeTensorMode``, ``FlopCounterMode``, the tracing of ``torch.compile``'s backward), or
    ``tensor`` is a subclass that dispatches in Python (``DTensor``, ``FakeTensor``; a plain
    ``torch.Tensor`` is not tested further). A kernel called directly would bypass them; a
    custom operator goes through them."""
    return torch._C._len_torch_dispatch_stack() > 0 or (
        type(tensor) is not torch.Tensor and _DISPATCH_KEYS(tensor).has(_PYTHON_KEY)
    )


def storage_array(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor of a kernel dtype (half precision: of its bits)."""
    bits = HALF_BITS.get(tensor.dtype)
    if bits is None:
        return tensor.numpy()
    return tensor.view(torch.int16).numpy().view(bits)


class CpuPlan:
    """The layout, row blocks, kernels and output allocation for one input signature."""

    __slots__ = (
        "affine_normalize",
        "ahead_asked",
        "batch_moments",
        "blocks",
        "compute_dtype",
        "dtype",
        "gradient_sums",
        "in_place_backward",
        "inference_backward",
        "input_gradient",
        "inverse",
        "layout",
        "logical_layout",
        "memory",
        "memory_shape",
        "normalize_blocks",
        "shape3",
        "torch_dtype",
        "train_backward",
        "train_backward_activated",
        "train_forward",
        "transpose",
    )

    def __init__(
        self,
        layout: CanonicalLayout,
        sizes: tuple[int, ...],
        dtype: torch.dtype,
        ghost_batches: bool,
    ):
        identity = layout.order == tuple(range(len(layout.order)))
        self.layout = layout
        self.torch_dtype = dtype
        self.dtype = HALF_BITS.get(dtype, np.float64 if dtype == torch.float64 else np.float32)
        self.compute_dtype = np.float64 if dtype == torch.float64 else np.float32
        self.shape3 = (layout.rows, layout.channels, layout.inner)
        self.transpose = None if identity else layout.order
        self.memory_shape = tuple(sizes[d] for d in layout.order)
        self.memory = output_memory.source(self.memory_shape, self.dtype)
        self.inverse = None if identity else inverse_permutation(list(layout.order))
        # (sizes, strides) of a tensor in logical order over memory_shape's contiguous memory
        memory_strides = [math.prod(self.memory_shape[i + 1 :]) for i in range(len(sizes))]
        self.logical_layout = (
            tuple(sizes),
            tuple(memory_strides[layout.order.index(d)] for d in range(len(sizes))),
        )
        elements = layout.rows * layout.channels * layout.inner
        self.blocks = kernels.blocks_for(elements, layout.rows, layout.inner)
        # The normalising pass alone (inference, the general training path) keeps no partial
        # sums and does little per value: it splits rows its own way (more finely in wide,
        # short batches; not below 2^17 values, where the reducing passes already take two
        # blocks: kernels.SUMS_PARALLEL_THRESHOLD).
        self.normalize_blocks = kernels.blocks_for(elements, layout.rows, layout.inner, sums=False)

        build = layout_for(layout.channels, layout.inner, ghost_batches, dtype in HALF_BITS)

        def pick(operation: LayoutKernel) -> Kernel:
            return operation.for_layout(build)

        self.affine_normalize = pick(kernels.affine_normalize)
        self.batch_moments = pick(kernels.batch_moments)
        self.gradient_sums = pick(kernels.gradient_sums)
        self.input_gradient = pick(kernels.batch_norm_input_gradient)
        self.train_forward = pick(kernels.train_forward)
        self.train_backward = pick(kernels.train_backward)
        self.train_backward_activated = pick(kernels.train_backward_activated)
        self.in_place_backward = pick(kernels.in_place_backward)
        self.inference_backward = pick(kernels.inference_backward)
        # Whether a first training step of this plan has asked for its next kernels to be
        # compiled ahead (batchnorm.functional._cpu_training_call.TrainingCall.forward).
        self.ahead_asked = False

    def parallel(self) -> bool:
        """Whether to call the threaded builds: more than one block and more than one thread."""
        return self.blocks > 1 and kernel_threads() > 1

    def canonical(self, array: np.ndarray) -> np.ndarray:
        """An array laid out like the plan's input as ``(rows, channels, inner)``; a view."""
        if self.transpose is not None:
            array = array.transpose(self.transpose)
        return array.reshape(self.shape3)

    def fresh(self, like: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
        """An uninitialised tensor shaped and laid out like ``like`` (the input the plan was made
        for, or its one copy), and its canonical array, from where
        :func:`batchnorm.functional._output_memory.source` says.

        NumPy advises the kernel to back large allocations with transparent huge pages, so
        writing a fresh output takes far fewer page faults than with torch's CPU allocator: on
        the 2-core development machine a new 51 MB output cost 37 ms to fill from
        torch.empty_like and 11 ms from NumPy (5 ms into memory already touched). Large outputs
        reuse the memory of earlier ones that nothing refers to any more
        (:mod:`batchnorm.functional._output_memory`), which avoids even those.

        Outputs from torch's allocator come from ``torch.empty_like`` where the input is in
        logical order: half the Python of ``torch.empty(shape, dtype=...)`` (0.6 us against
        1.2 in a loop), and about 5 us less inside a model, where every torch call from Python
        costs several times its loop figure (see :meth:`kernel_view`).

        The tensor is never a view of another (a permuted one was: autograd then refused an
        in-place operation on a custom function's output, so ``nn.ReLU(inplace=True)`` after a
        channels-last layer failed, "Output 0 of TrainInPlace is a view and is being modified
        inplace"); it has the input's strides from the start.
        """
        array: np.ndarray
        if self.memory == "torch":
            if self.inverse is None:
                if type(like) is torch.Tensor:
                    fresh = torch.empty_like(like, memory_format=torch.contiguous_format)
                else:
                    fresh = torch.empty(self.memory_shape, dtype=self.torch_dtype)
                return fresh, storage_array(fresh).reshape(self.shape3)
            fresh = torch.empty_strided(*self.logical_layout, dtype=self.torch_dtype)
            return fresh, self.canonical(storage_array(fresh))
        if self.memory == "numpy":
            array = np.empty(self.memory_shape, self.dtype)
        else:
            array = output_memory.empty(self.memory_shape, self.dtype)
        logical = array if self.inverse is None else array.transpose(self.inverse)
        if self.torch_dtype in HALF_BITS:  # uint16 or int16 bits, viewed as what they hold
            fresh = torch.from_numpy(logical.view(np.int16)).view(self.torch_dtype)
        else:
            fresh = torch.from_numpy(logical)
        return fresh, array.reshape(self.shape3)

    def kernel_view(self, x: torch.Tensor) -> np.ndarray:
        """x, of the plan's signature and a kernel dtype, as the kernels read it: a canonical
        NumPy view, through ``detach()`` only where x requires grad (``numpy()`` refuses it).

        Inside a model every torch call from Python costs several times its figure in a loop:
        in ``Linear(784, 1000)-ReLU-BN-Linear(10)`` inference at batch 64 on the Intel VM, a
        ``detach()`` added 8-10 us to the batch norm's share of the model's time (0.3 us in a
        loop)."""
        return self.canonical(storage_array(x.detach() if x.requires_grad else x))

    def inference_blocks(self, backward_follows: bool) -> int:
        """The affine kernel's row blocks for an inference call: the normalising pass's own,
        or, where a backward follows (:class:`InferenceWithGradients`), at least the reducing
        passes' (so that each thread of the backward finds its rows of x in its own core's
        cache). On the Intel VM, with the forward in one block and the backward in two,
        inference forward+backward of (64, 1000) took 1.94-1.99x torch's time, (96, 1000)
        2.08-2.09x, (16, 8, 8, 64) 1.74-1.87x; split alike, 1.58-1.63x, 1.52-1.62x and
        1.54-1.56x (2 runs each, alternating)."""
        if backward_follows:
            return max(self.blocks, self.normalize_blocks)
        return self.normalize_blocks

    def normalize_build(self, blocks: int) -> str:
        """The affine kernel's build for ``blocks`` row blocks: ``"parallel"`` with more than
        one block and thread, else ``"serial"`` (the same results)."""
        return "parallel" if blocks > 1 and kernel_threads() > 1 else "serial"

    def normalize(
        self,
        x3: np.ndarray,
        mean: np.ndarray,
        variance: np.ndarray,
        scale: np.ndarray,
        offset: np.ndarray,
        epsilon: float,
        groups: int,
        blocks: int,
        out3: np.ndarray | None,
        code: tuple[int | None, float],
    ) -> None:
        """The affine kernel, ``out3 = f((x3 - mean) / sqrt(variance + epsilon) * scale +
        offset)`` (statistics ``[groups, C]``; ``code``, the activation's ``(code,
        parameter)``), in ``blocks`` row blocks, in :meth:`normalize_build`'s build (the
        threaded one launched by one Python thread at a time, :attr:`Kernel.threaded`)."""
        run = compiled_build(self.affine_normalize, self.normalize_build(blocks) == "parallel")
        run(
            x3,
            mean,
            variance,
            scale,
            offset,
            epsilon,
            groups,
            self.layout.period,
            blocks,
            out3,
            *code,
        )


class Prepared(NamedTuple):
    """One call's input as the kernels read it."""

    plan: CpuPlan
    source: torch.Tensor  # x itself or its one copy, in the kernel dtype
    x3: np.ndarray
    weights: np.ndarray  # a dummy array without a mask
    # True with a mask, None without: None is a type of its own to Numba, and the kernels' mask
    # branches test ``masked is None``, which Numba prunes before compiling (a plain call then
    # compiles without them).
    masked: bool | None
    parallel: bool

    @property
    def layout(self) -> CanonicalLayout:
        return self.plan.layout

    def compiled(self, kernel: Kernel) -> Any:
        """``kernel``'s build for this call (:func:`compiled_build`)."""
        return compiled_build(kernel, self.parallel)


def compiled_build(kernel: Kernel, parallel: bool) -> Any:
    """The kernel's threaded build for a call that runs threaded (one Python thread at a time,
    :attr:`Kernel.threaded`), else its serial one; while a helper compiles builds ahead
    (:mod:`batchnorm.kernels._ahead`), the serial one until the helper has written the threaded
    one, and after the helper compiling the build taken."""
    if ahead.pending:
        return ahead.build_for(kernel, parallel)
    return kernel.threaded if parallel else kernel.serial


def kernel_threads() -> int:
    """Sets the kernels' thread count to torch's, and returns it.

    Numba's OpenMP pool shares the OpenMP runtime with torch: starting it (on the first threaded
    call) set the process's OpenMP thread count back to every core, so a program that had called
    ``torch.set_num_threads(1)`` ran torch's own operators on all cores from then on, and
    the kernels with it. Torch's count is put back when starting the pool changed it.
    """
    threads = torch.get_num_threads()
    if threads == 1:
        return 1
    count = kernels.set_threads(threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return count


# Plans of the input signatures seen. Only plans that view x without a copy are kept: the others
# depend on the copy, made per call.
_PLANS: dict[tuple[object, ...], CpuPlan] = {}
_PLANS_KEPT = 256


def prepare(
    x: torch.Tensor, axes: list[int], weights: torch.Tensor | None, batch_outermost: bool
) -> Prepared:
    """x (and the mask's weights) in canonical layout, with the plan of x's signature."""
    dtype = x.dtype
    if dtype not in VIEWED_DTYPES:
        dtype = torch.float32
        x = x.to(dtype)
    detached = x.detach() if x.requires_grad else x
    key = (detached.shape, detached.stride(), dtype, *axes, batch_outermost)
    plan = _PLANS.get(key)
    if plan is None:
        source, layout = canonical_layout(detached, tuple(axes), batch_outermost)
        plan = CpuPlan(layout, tuple(source.shape), dtype, batch_outermost)
        if not layout.copied:
            if len(_PLANS) >= _PLANS_KEPT:
                _PLANS.clear()
            _PLANS[key] = plan
    else:
        source = detached
    x3 = plan.canonical(storage_array(source))
    parallel = plan.parallel()
    dtype = compute_dtype(dtype)  # of the weights
    if weights is None:
        return Prepared(plan, source, x3, NO_WEIGHTS[dtype], None, parallel)
    return Prepared(plan, source, x3, mask_rows(weights, plan, axes, dtype), True, parallel)


def mask_rows(
    weights: torch.Tensor, plan: CpuPlan, axes: list[int], dtype: torch.dtype
) -> np.ndarray:
    """Weights of one value per position (x's shape, size 1 on the channel axes, or without
    them) as the kernels read them: ``(rows, inner)`` in x's memory order."""
    detached = weights.detach()
    layout = plan.layout
    rank = len(layout.order)
    squeezed = detached.squeeze(tuple(axes)) if detached.dim() == rank else detached
    if layout.order == tuple(range(rank)) and squeezed.is_cpu and squeezed.dtype != torch.bfloat16:
        # x in logical order: the mask's memory order is x's; converted by NumPy, which costs
        # a microsecond where torch's conversion, reshape and copy cost several per call.
        rows = squeezed.numpy().reshape(layout.rows, layout.inner)
        return np.ascontiguousarray(rows, np.float64 if dtype == torch.float64 else np.float32)
    return canonical_weights(squeezed, layout, tuple(axes), dtype).numpy()


def plan_of(x: torch.Tensor, axes: list[int], batch_outermost: bool) -> CpuPlan | None:
    """The plan of x's signature (x float32 or float64), None when x must be copied."""
    plan = prepare(x, axes, None, batch_outermost).plan
    return None if plan.layout.copied else plan


class _TensorMemory:
    """A tensor's memory as NumPy's array interface describes it, and (with ``keep``) the
    tensor, kept alive by the NumPy array made from it (the array's base)."""

    __slots__ = ("__array_interface__", "tensor")

    def __init__(self, tensor: torch.Tensor, keep: bool = True):
        itemsize = tensor.element_size()
        self.tensor = tensor if keep else None
        self.__array_interface__ = {
            "data": (tensor.data_ptr(), False),
            "shape": tuple(tensor.shape),
            "strides": tuple(stride * itemsize for stride in tensor.stride()),
            "typestr": _TYPESTR[tensor.dtype],
            "version": 3,
        }


# NumPy's names of the kernel dtypes (half precision: of its bits, see HALF_BITS).
_TYPESTR = {
    dtype: np.dtype(bits).str
    for dtype, bits in (
        (torch.float32, np.float32),
        (torch.float64, np.float64),
        *HALF_BITS.items(),
    )
}


def resizable_array(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a CPU tensor of a kernel dtype (half precision: of its bits), like
    :func:`storage_array`, that leaves the tensor's storage resizable.

    ``Tensor.numpy()`` marks the storage as not resizable, for good. FSDP frees and refills
    the memory of its unsharded parameters by resizing their storage (``resize_(0)``, then
    back), so a parameter that had been through ``numpy()`` stopped FSDP with "Trying to
    resize storage that is not resizable". Parameters and buffers are viewed through NumPy's
    array interface instead (0.9 us against 0.5 us, and :func:`shared_array` keeps the view).
    The view must not outlive the memory: a kept one is used only while the tensor still
    points at the same memory (:func:`shared_array`).
    """
    return np.asarray(_TensorMemory(tensor))


# NumPy views of the long-lived per-channel tensors (parameters, buffers), by the memory they
# describe: making one costs about a microsecond, four times on every call. The key is the
# whole description (address, shape, strides, dtype), so an entry is right for any live tensor
# that has it, whichever object that is (a freed view's memory taken by the next tensor, ``.data
# =`` on the same object). The arrays do not refer to the tensors: holding them kept deleted
# layers' weights, a sliced hypernetwork output's whole base and gamma's autograd graph alive,
# and the weak references that replaced that made torch.utils.swap_tensors (and with it
# load_state_dict and .to() under torch.__future__.set_swap_module_params_on_conversion) refuse
# every parameter of a layer that had run once. An entry is handed out only for a live tensor
# with its description, so its memory is that tensor's; whoever keeps the array keeps the
# tensor (the layer's shortcut does). Cleared when it grows past _ARRAYS_KEPT.
_ArrayKey = tuple[int, torch.Size, tuple[int, ...], torch.dtype]
_ARRAYS: dict[_ArrayKey, np.ndarray] = {}
_ARRAYS_KEPT = 1024


def shared_array(tensor: torch.Tensor) -> np.ndarray:
    """:func:`resizable_array` of ``tensor``, remembered for the next tensor with the same
    memory, shape, strides and dtype."""
    key = (tensor.data_ptr(), tensor.shape, tensor.stride(), tensor.dtype)
    array = _ARRAYS.get(key)
    if array is not None:
        return array
    array = np.asarray(_TensorMemory(tensor.detach(), keep=False))
    if len(_ARRAYS) >= _ARRAYS_KEPT:
        _ARRAYS.clear()
    _ARRAYS[key] = array
    return array


_CONSTANTS: dict[tuple[int, float, type], np.ndarray] = {}


def constant_channels(channels: int, value: float, dtype: type) -> np.ndarray:
    """A ``[channels]`` array of ``value`` (gamma or beta absent), made once; never written."""
    key = (channels, value, dtype)
    array = _CONSTANTS.get(key)
    if array is None:
        array = np.full(channels, value, dtype)
        if len(_CONSTANTS) >= _ARRAYS_KEPT:
            _CONSTANTS.clear()
        _CONSTANTS[key] = array
    return array
