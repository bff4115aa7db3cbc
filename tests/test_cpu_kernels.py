"""The Numba CPU path against the float64 reference, across layouts, sizes, dtypes and autograd."""

from __future__ import annotations

import copy
import io
import itertools
import warnings

import numpy as np
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

from batchnorm import BatchNormalization
from batchnorm.functional import (
    NUMBA_CPU,
    BatchNormStatistics,
    TorchOpsBackend,
    backend_for,
    batch_norm,
    register_backend,
)
from batchnorm.functional._canonical_layout import canonical_layout
from tests.numpy_reference import reference_train_step


@pytest.fixture
def torch_ops_backend():
    register_backend("cpu", None)
    yield
    register_backend("cpu", NUMBA_CPU)


def test_cpu_tensors_use_the_numba_backend():
    assert backend_for(torch.randn(2, 3)) is NUMBA_CPU


def run_train_step(x, axes, *, ghost=None, mask=None, gamma=None, beta=None, epsilon=1e-3):
    channel_shape = tuple(x.shape[a] for a in axes)
    state = BatchNormStatistics(
        torch.zeros(channel_shape, dtype=torch.float64),
        torch.ones(channel_shape, dtype=torch.float64),
    )
    return batch_norm(
        x,
        state,
        gamma,
        beta,
        axis=list(axes),
        training=True,
        momentum=0.0,
        epsilon=epsilon,
        virtual_batch_size=ghost,
        mask=mask,
    )


LAYOUTS = [
    ((64, 1), (1,)),
    # One channel, one value per row, viewed as planes: 60 of 5, one of 4099 (a prime), and 64
    # of 8192 (threaded row blocks).
    ((6, 50, 1), (2,)),
    ((4099, 1), (1,)),
    ((1 << 19, 1), (1,)),
    ((2, 3), (1,)),
    ((5, 7, 9), (1,)),
    ((5, 7, 9), (2,)),
    ((4, 3, 5, 6), (1,)),
    ((4, 5, 6, 3), (3,)),
    ((2, 1023, 1, 1), (1,)),
    ((3, 7, 1, 1), (1,)),
    ((2, 4, 3, 2, 5), (1,)),
    ((2, 4, 3, 2, 5), (4,)),
    ((3, 4, 5, 6), (1, 3)),
    ((3, 4, 5, 6), (2, 3)),
    ((6, 4), (0,)),
    ((4, 20000), (1,)),
]


@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
def test_training_step_matches_float64_reference(shape, axes):
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, shape)
    channel_shape = tuple(shape[a] for a in axes)
    gamma, beta = rng.uniform(0.5, 2, channel_shape), rng.normal(size=channel_shape)
    y, state = run_train_step(
        torch.tensor(x, dtype=torch.float32),
        axes,
        gamma=torch.tensor(gamma, dtype=torch.float32),
        beta=torch.tensor(beta, dtype=torch.float32),
    )
    expected, mean, variance = reference_train_step(
        x.astype(np.float32),
        np.zeros(channel_shape),
        np.ones(channel_shape),
        gamma,
        beta,
        axes=axes,
        momentum=0.0,
        epsilon=1e-3,
    )
    np.testing.assert_allclose(y.numpy(), expected, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(state.moving_mean.numpy(), mean, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(state.moving_variance.numpy(), variance, rtol=1e-5, atol=1e-7)


def layouts_of(x):
    """The same values in other memory layouts: channels_last, transposed views, a strided slice."""
    yield "contiguous", x
    if x.ndim == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "transposed", x.transpose(0, -1).contiguous().transpose(0, -1)
    wide = torch.stack([x, torch.zeros_like(x)], dim=-1).reshape(*x.shape[:-1], -1)
    yield "strided slice", wide[..., ::2]


@pytest.mark.parametrize("axis", [1, -1])
def test_non_contiguous_inputs_give_identical_results(axis):
    x = torch.randn(6, 5, 4, 3)
    reference = BatchNormalization(axis=axis)(x, training=True)
    for name, variant in layouts_of(x):
        layer = BatchNormalization(axis=axis)
        torch.testing.assert_close(layer(variant, training=True), reference, msg=name)


def test_channels_last_is_a_free_view_and_output_keeps_the_layout():
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    source, layout = canonical_layout(x, (1,), batch_outermost=False)
    assert source is x and not layout.copied
    assert (layout.rows, layout.channels, layout.inner) == (100, 8, 1)
    y = BatchNormalization(axis=1)(x, training=True)
    assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_through_kernels(dtype):
    x = torch.randn(16, 3, 4, 4)
    y, state = run_train_step(x.to(dtype), (1,))
    expected, mean, _ = reference_train_step(
        x.to(dtype).double().numpy(),
        np.zeros(3),
        np.ones(3),
        None,
        None,
        axes=(1,),
        momentum=0.0,
        epsilon=1e-3,
    )
    assert y.dtype == dtype
    np.testing.assert_allclose(
        y.double().numpy(), expected, atol=2e-2 if dtype == torch.bfloat16 else 3e-3
    )
    np.testing.assert_allclose(state.moving_mean.numpy(), mean, atol=1e-6)


def test_ill_conditioned_variance_relative_error():
    rng = np.random.default_rng(1)
    x = (1000.0 + 0.01 * rng.standard_normal((64, 16, 8, 8))).astype(np.float32)
    _, state = run_train_step(torch.tensor(x), (1,))
    exact = x.astype(np.float64).var(axis=(0, 2, 3))
    relative = np.max(np.abs(state.moving_variance.numpy() - exact) / exact)
    assert relative <= 1e-5, relative


def test_repeated_runs_are_bit_identical():
    x = torch.randn(32, 16, 7, 7)
    first = run_train_step(x, (1,))
    for _ in range(3):
        again = run_train_step(x, (1,))
        assert torch.equal(first[0], again[0])
        assert torch.equal(first[1].moving_variance, again[1].moving_variance)


@pytest.mark.parametrize(
    ("shape", "axes", "ghost", "use_mask"),
    [
        ((6, 3, 4), (1,), None, False),
        ((6, 4, 3), (2,), None, True),
        ((8, 3), (1,), 2, False),
        ((4, 2, 3, 3), (1,), 2, False),
        ((6, 3, 2, 2), (1, 3), None, False),
        ((300, 1), (1,), None, True),  # one channel as planes, masked
        ((8, 5, 3), (2,), 2, True),  # channels last, ghost batches and a mask: runs of rows
    ],
)
def test_gradcheck_float64(shape, axes, ghost, use_mask):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    channel_shape = tuple(shape[a] for a in axes)
    gamma = (torch.rand(channel_shape, dtype=torch.float64) + 0.5).requires_grad_()
    beta = torch.randn(channel_shape, dtype=torch.float64, requires_grad=True)
    mask = None
    if use_mask:
        mask = torch.rand([s for i, s in enumerate(shape) if i not in axes]) > 0.3

    def function(x, gamma, beta):
        return run_train_step(x, axes, ghost=ghost, mask=mask, gamma=gamma, beta=beta)[0]

    assert torch.autograd.gradcheck(function, (x, gamma, beta))
    assert torch.autograd.gradgradcheck(function, (x, gamma, beta))


@pytest.mark.parametrize(
    ("shape", "axes"),
    [
        ((5, 4, 3), (1,)),  # channel planes
        ((7, 4), (1,)),  # rows
        ((3, 5, 4), (2,)),  # channels last
        ((3, 4, 2, 5), (1, 3)),  # two channel axes (a copy)
        ((64, 16, 20, 17), (1,)),  # several row blocks (threaded)
        ((9, 40), (1,)),  # rows wider than the virtual rows: the fused pass, rows left over
        ((8195, 40), (1,)),  # the same in several row blocks (threaded)
    ],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    ("affine", "requiring"),
    [(True, "all"), (False, "all"), (True, "x"), (True, "parameters")],
)
def test_inference_gradients_match_torch_ops(
    shape, axes, dtype, affine, requiring, torch_ops_backend
):
    # The kernels' backward (dy * scale * inv in the affine pass, per-channel float64 sums) against
    # the torch ops' float64 formulas, for x, the statistics, gamma and beta; the kernel skips
    # the pass whose results nothing requires.
    torch.manual_seed(6)
    channels = tuple(shape[a] for a in axes)
    x = torch.randn(shape, dtype=dtype) * 2 + 0.5
    stats = [torch.randn(channels, dtype=dtype), torch.rand(channels, dtype=dtype) + 0.5]
    parameters = [torch.rand(channels, dtype=dtype) + 0.5, torch.randn(channels, dtype=dtype)]
    up = torch.randn(shape, dtype=dtype)
    results = []
    # The reference in float64 (torch's own float32 autograd sums in float32).
    for backend, as_type in ((TorchOpsBackend(), torch.float64), (NUMBA_CPU, dtype)):
        inputs = [t.to(as_type) for t in (x, *stats, *parameters)]
        wanted = inputs if affine else inputs[:3]
        wanted = {"all": wanted, "x": wanted[:1], "parameters": wanted[3:]}[requiring]
        for tensor in wanted:
            tensor.requires_grad_()
        scale, offset = inputs[3:] if affine else (None, None)
        y = backend.normalize(inputs[0], axes, inputs[1], inputs[2], scale, offset, 1e-3)
        results.append(torch.autograd.grad((y * up.to(as_type)).sum(), wanted))
    for ours, reference in zip(results[1], results[0], strict=True):
        assert ours.dtype == dtype
        if dtype == torch.float64:
            torch.testing.assert_close(ours, reference, rtol=1e-12, atol=1e-12)
        else:  # float32 results of float64 arithmetic: one rounding
            torch.testing.assert_close(ours, reference.float(), rtol=2e-7, atol=0)


@pytest.mark.parametrize("renorm", [False, True])
def test_kernel_path_equals_torch_ops_path(renorm, torch_ops_backend):
    torch.manual_seed(3)
    x = torch.randn(8, 5, 6)
    outputs = []
    for backend in (None, NUMBA_CPU):
        register_backend("cpu", backend)
        layer = BatchNormalization(5, axis=1, renorm=renorm, renorm_clipping={"rmax": 1.2})
        xg = x.clone().requires_grad_()
        y = layer(xg, training=True)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        outputs.append((y.detach(), xg.grad, layer.gamma.grad, layer.moving_variance.clone()))
    for ours, theirs in zip(outputs[1], outputs[0], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def make_model():
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        BatchNormalization(4, axis=1),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 6 * 6, 2),
    )


def test_model_under_torch_compile_fullgraph():
    torch.manual_seed(0)
    model = make_model()
    reference = make_model()
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(compiled(x), reference(x))
    torch.testing.assert_close(model[1].moving_mean, reference[1].moving_mean)
    compiled(x).sum().backward()
    assert model[1].gamma.grad is not None


def test_model_exports_with_torch_export():
    model = make_model().eval()
    x = torch.randn(2, 3, 6, 6)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))
    assert "batchnorm.normalize" in str(exported.graph)


# torch 2.13 deprecates torch.jit's trace, save and load.
@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
@pytest.mark.parametrize("training", [False, True])
def test_model_traces_with_torch_jit_trace(training):
    """torch.jit.trace records torch ops only, so traced calls take them (a kernel's output
    would be a constant in the graph, and the tracer's tensor sizes failed in Numba's typing):
    the trace, saved and loaded, computes eager's output on another batch size and, in
    training, steps the moving statistics as eager does; the layer's shape checks raise no
    TracerWarning, and it remembers no traced input signature."""
    torch.manual_seed(0)
    model = make_model()
    x = torch.randn(2, 3, 6, 6)
    model(x)
    model.train(training)
    eager = copy.deepcopy(model)
    remembered = vars(model[1]).get("_accepted_input")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        traced = torch.jit.trace(model, x, check_trace=False)
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    # The tracer's sizes are 0-d tensors: the layer must not keep them as its input signature.
    assert vars(model[1]).get("_accepted_input") is remembered
    eager(x)  # the step the trace took
    saved = io.BytesIO()
    torch.jit.save(traced, saved)
    saved.seek(0)
    loaded = torch.jit.load(saved)
    graph = str(loaded.inlined_graph)
    assert "batchnorm::" not in graph and "prim::PythonOp" not in graph
    later = torch.randn(5, 3, 6, 6) * 3 + 1
    torch.testing.assert_close(loaded(later), eager(later))
    buffers = dict(loaded.named_buffers())
    for name in ("moving_mean", "moving_variance"):
        torch.testing.assert_close(buffers[f"1.{name}"], getattr(eager[1], name))


# torch 2.13 deprecates torch.jit's script.
@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
def test_torch_jit_script_is_refused_with_the_ways_that_work():
    """torch.jit.script failed deep in TorchScript's compiler ("Unknown type annotation:
    'nn.Parameter'"). It is refused naming torch.jit.trace, torch.export, torch.compile and
    convert(to='torch'); the last, suggested, scripts and computes what the layer computes."""
    from batchnorm import SampleNormalization, convert

    torch.manual_seed(0)
    model = make_model()
    x = torch.randn(4, 3, 6, 6)
    model(x * 2 + 1)  # a training step: moving statistics away from their initial values
    expected = model.eval()(x)
    with pytest.raises(RuntimeError, match=r"torch.jit.script cannot compile.*torch.jit.trace"):
        torch.jit.script(model)
    scripted = torch.jit.script(convert(copy.deepcopy(model), to="torch"))
    torch.testing.assert_close(scripted(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(RuntimeError, match=r"cannot compile SampleNormalization: .*torch.compile$"):
        torch.jit.script(torch.nn.Sequential(SampleNormalization(axis=1)))


@pytest.mark.parametrize("training", [False, True])
def test_model_traces_with_torch_fx_as_one_module_call(training):
    """torch.fx.symbolic_trace traced into the layer, whose checks branch on x's sizes, and
    failed ("symbolically traced variables cannot be used as inputs to control flow"): the
    layer is one call_module node, as torch's batch norm modules are, and the graph module
    computes and steps as the model does."""
    torch.manual_seed(0)
    model = make_model().train(training)
    eager = copy.deepcopy(model)
    graph_module = torch.fx.symbolic_trace(model)
    calls = [n.target for n in graph_module.graph.nodes if n.op == "call_module"]
    assert calls == ["0", "1", "2", "3", "4"]
    for _ in range(2):
        x = torch.randn(5, 3, 6, 6)
        torch.testing.assert_close(graph_module(x), eager(x), rtol=0, atol=0)
    buffers = dict(graph_module.named_buffers())
    for name in ("moving_mean", "moving_variance"):
        torch.testing.assert_close(buffers[f"1.{name}"], getattr(eager[1], name), rtol=0, atol=0)
    with pytest.raises(TypeError, match="trace a model that contains the layer"):
        torch.fx.symbolic_trace(BatchNormalization(3))


def test_export_of_a_called_model_assigns_no_attribute():
    """A traced call leaves the layer's remembered input signature alone: it holds a buffer,
    and torch.export warned that a tensor attribute was assigned during export."""
    model = make_model().eval()
    x = torch.randn(2, 3, 6, 6)
    model(x)  # builds the layer
    expected = model(x)
    remembered = vars(model[1]).get("_accepted_input")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exported = torch.export.export(model, (x,))
    assert not [w for w in caught if "assigned during export" in str(w.message)]
    assert vars(model[1]).get("_accepted_input") is remembered
    torch.testing.assert_close(exported.module()(x), expected)


def test_a_training_export_leaves_no_fake_tensor_in_the_layer():
    """torch.export traces with fake buffers: the layer kept them in its cache of the moving
    statistics, and a deepcopy of the model after a training-mode export failed ("Cannot
    access data pointer of Tensor (e.g. FakeTensor, FunctionalTensor)"). The exported step,
    with a dynamic batch size, steps the statistics as eager does."""
    torch.manual_seed(0)
    model = make_model()
    model(torch.randn(2, 3, 6, 6))
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(
        model, (torch.randn(4, 3, 6, 6),), dynamic_shapes={"input": {0: batch}}
    )
    eager = copy.deepcopy(model)  # raised
    held = [v for v in vars(model[1]).values() if isinstance(v, tuple)]
    assert not [t for t in itertools.chain(*held) if isinstance(t, FakeTensor)]
    x = torch.randn(7, 3, 6, 6)
    module = exported.module()
    torch.testing.assert_close(module(x), eager(x))
    buffers = dict(module.named_buffers())
    for name in ("moving_mean", "moving_variance"):
        torch.testing.assert_close(buffers[f"1.{name}"], getattr(eager[1], name))


def test_runners_and_block_helpers_are_not_callable_from_python():
    """Runners and block helpers are compiled without a CPython wrapper (only kernels call
    them): calling one from Python says so instead of failing inside Numba."""
    from batchnorm.kernels import _statistics

    x = np.zeros((4, 3, 5), np.float32)
    with pytest.raises(TypeError, match="runner moments_blocks is called from kernels only"):
        _statistics.moments_blocks(x, x, None, np.zeros(3), 1, 4, 1, np.zeros((1, 3, 1, 3)))
    with pytest.raises(TypeError, match="block helpers are called from runners only"):
        _statistics.moments_block(x, x, None, np.zeros(3), 1, 4, 0, 4, np.zeros((3, 1, 3)))


@pytest.mark.parametrize(
    "call", ["layer training", "layer training with a mask", "layer inference", "backend normalize"]
)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_the_autograd_graph_refers_to_x_only_through_saved_tensors(call, memory_format):
    """torch.utils.checkpoint (non-reentrant) drops what save_for_backward saved and recomputes
    it in the backward: anything else on the graph that refers to x (a NumPy view of it on ctx)
    kept each checkpointed batch norm's input in memory until the backward. Here the saved
    tensors are dropped by hooks, and x's memory, and the mask's, must be freed with them
    (a float32 mask: the kernels read a view of it)."""
    import gc
    import weakref

    from batchnorm.functional._cpu_backend import NUMBA_CPU

    layer = BatchNormalization(8, axis=1, fused=False)  # fused=True ignores masks (tf-keras)
    layer(torch.randn(4, 8, 5, 5), training=True)
    channels_last = memory_format == torch.channels_last
    shape = (4, 5, 5, 8) if channels_last else (4, 8, 5, 5)
    memory = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    alive = weakref.ref(memory)
    x = torch.from_numpy(memory)
    x = x.permute(0, 3, 1, 2) if channels_last else x
    assert x.is_contiguous(memory_format=memory_format) and x.data_ptr() == memory.ctypes.data
    del memory
    mask_memory = np.ones((4, 5, 5), np.float32)
    mask_memory[0, 0] = 0.0
    mask_alive = weakref.ref(mask_memory)
    mask = torch.from_numpy(mask_memory) if call.endswith("mask") else None
    del mask_memory

    def unpack(_: object) -> torch.Tensor:
        raise AssertionError("no backward here")

    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: None, unpack):
        if call == "backend normalize":
            y = NUMBA_CPU.normalize(
                x, (1,), layer.moving_mean, layer.moving_variance, layer.gamma, layer.beta, 1e-3
            )
        else:
            y = layer(x, training=call.startswith("layer training"), mask=mask)
    assert y.grad_fn is not None  # gamma and beta learn: a graph was recorded
    del x, mask
    gc.collect()
    assert alive() is None
    assert mask_alive() is None


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(
    "options", [{}, {"activation": "elu"}, {"renorm": True}, {"virtual_batch_size": 2}]
)
def test_non_reentrant_checkpointing_of_a_fresh_layer(training, options):
    """torch.utils.checkpoint (non-reentrant) recomputes the forward in the backward and
    compares how many tensors the two saved. A fresh layer's first call took the general path,
    which saved x once more than the shortcut that the recomputation took (an alias of x as its
    "copy", and the moving statistics in inference): the backward raised CheckpointError.
    Oracle: the same model without checkpointing (the recomputation does not step the moving
    statistics again: tests/test_checkpointing.py)."""
    from torch.utils.checkpoint import checkpoint

    def run(checkpointed):
        torch.manual_seed(0)
        conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        layer = BatchNormalization(4, axis=1, **options)
        x = torch.randn(4, 3, 6, 6, requires_grad=True)

        def block(v):
            return layer(conv(v), training=training)

        y = checkpoint(block, x, use_reentrant=False) if checkpointed else block(x)
        y.pow(2).sum().backward()
        return [x.grad, conv.weight.grad, layer.gamma.grad, *layer.buffers()]

    for found, expected in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(found, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("options", [{}, {"renorm": True}, {"moving_average": "debiased"}])
def test_a_model_exported_in_training_saves_and_loads(options):
    import copy
    import io

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 3, 1), BatchNormalization(3, axis=1, **options)
    ).train()
    model(torch.randn(8, 3, 5, 5))
    buffer = io.BytesIO()
    # The moving update's no_grad block was recorded as a higher-order op whose saved program
    # torch.export.load refused (SpecViolationError).
    torch.export.save(torch.export.export(copy.deepcopy(model), (torch.randn(8, 3, 5, 5),)), buffer)
    buffer.seek(0)
    loaded = torch.export.load(buffer).module()
    for _ in range(2):  # outputs and the stepped statistics follow the eager model
        x = torch.randn(8, 3, 5, 5)
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.state_dict()["1.moving_mean"], model[1].moving_mean)


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_a_fresh_layer_exports_strictly_with_a_dynamic_batch(mode):
    from torch.export import Dim

    layer = getattr(BatchNormalization(4), mode)()
    reference = copy_of(layer)
    # Its lazy-build hook read the symbolic batch size as an int: "You marked B as dynamic but
    # your code specialized it to be a constant (8)".
    exported = torch.export.export(
        layer, (torch.randn(8, 4),), dynamic_shapes=({0: Dim("B", min=2, max=64)},), strict=True
    )
    x = torch.randn(3, 4)
    torch.testing.assert_close(exported.module()(x), reference(x), rtol=1e-5, atol=1e-5)


def copy_of(module):
    import copy

    return copy.deepcopy(module)
