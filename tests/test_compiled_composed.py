"""The composed torch-op path through torch.compile (``compile_composed``): no graph break, the
same numbers as eager."""

from __future__ import annotations

import copy

import pytest
import torch

from batchnorm import BatchNormalization
from batchnorm.functional import NUMBA_CPU, compile_composed, register_backend


@pytest.fixture
def composed_on_cpu():
    register_backend("cpu", None)  # the CPU then runs the composed ops
    yield
    compile_composed(False)
    register_backend("cpu", NUMBA_CPU)


CASES = [
    ({"axis": -1}, (32, 6, 4), {"mask": "keras"}),
    ({"axis": 1}, (32, 6, 4), {"mask": "keras"}),
    ({"axis": -1, "virtual_batch_size": 8}, (32, 5), {}),
    ({"axis": -1, "renorm": True, "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}}, (16, 5), {}),
    ({"axis": [1, 2]}, (8, 3, 4, 2), {}),
]


def _run(kwargs, shape, call, seed):
    torch.manual_seed(seed)
    layer = BatchNormalization(fused=False, **kwargs)
    x = (torch.randn(shape) * 3 + 2).requires_grad_()
    mask = (torch.rand(shape[:-1]) > 0.3).float() if call.get("mask") == "keras" else None
    outputs = []
    for _ in range(2):
        y = layer(x, training=True, mask=mask)
        (y * y.detach().sin()).sum().backward()
        outputs.append(y.detach())
    outputs.append(layer(x, training=False).detach())
    return outputs, x.grad, [p.grad for p in layer.parameters()], layer.get_weights()


@pytest.mark.parametrize(("kwargs", "shape", "call"), CASES)
def test_compiled_composed_path_equals_eager(composed_on_cpu, kwargs, shape, call):
    eager = _run(kwargs, shape, call, seed=5)
    compile_composed(backend="aot_eager")  # traces forward and backward, fullgraph
    compiled = _run(kwargs, shape, call, seed=5)
    for a, b in zip(eager[0], compiled[0], strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(eager[1], compiled[1])
    for a, b in zip(eager[2], compiled[2], strict=True):
        torch.testing.assert_close(a, b)
    for a, b in zip(eager[3], compiled[3], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b))


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_composed_path_with_inductor(composed_on_cpu):
    eager = _run({"axis": -1}, (16, 4, 3), {"mask": "keras"}, seed=6)
    compile_composed()
    compiled = _run({"axis": -1}, (16, 4, 3), {"mask": "keras"}, seed=6)
    for a, b in zip(eager[0], compiled[0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eager[1], compiled[1], rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("checkpointed", [False, True])
def test_renorm_compiled_with_inductor_corrects_with_the_statistics_before_the_step(checkpointed):
    """Inductor's partitioner recomputes cheap values in the backward: renorm's r and d were
    recomputed there from renorm_mean and renorm_stddev, which the forward had already stepped
    in place, and every gradient was off (3e-3 here; aot_eager, which saves them, was right).
    Inside a checkpoint in the compiled graph the backward recomputes everything (1.5e-2 off).
    Oracle: the same model eager, without checkpointing."""
    import copy

    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(0)
    options = {"renorm": True, "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}}
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 4), BatchNormalization(momentum=0.8, **options), torch.nn.Linear(4, 3)
    )
    model[1](torch.randn(2, 4) * 3 + 2, training=True)
    eager = copy.deepcopy(model)
    if checkpointed:
        compiled = torch.compile(lambda v: checkpoint(model, v, use_reentrant=False))
    else:
        compiled = torch.compile(model)
    for step in range(3):
        x, weights = torch.randn(8, 4) + step, torch.randn(8, 3)
        model.zero_grad(), eager.zero_grad()
        (compiled(x) * weights).sum().backward()
        (eager(x) * weights).sum().backward()
        for a, b in zip(model.parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-5)
        for a, b in zip(model[1].buffers(), eager[1].buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("momentum", [1.0, 0.9])
def test_compiled_debiased_average_steps_its_scale_factor(momentum):
    """torch.compile (aot_eager, as inductor) dropped the in-place write into the 0-d float64
    scale factor: it stayed 0, and the moving mean was the last batch's (3.0, not 2.0)."""
    offsets = torch.tensor([[-1.0], [0.0], [0.0], [1.0]])
    batches = [offsets + mean for mean in (1.0, 2.0, 3.0)]
    layers = []
    for compiled in (False, True):
        torch._dynamo.reset()
        layer = BatchNormalization(axis=-1, moving_average="debiased", momentum=momentum)
        layer.build((4, 1))
        call = torch.compile(layer, backend="aot_eager") if compiled else layer
        for x in batches:
            call(x, training=True)
        layers.append(layer)
    eager, compiled_layer = layers
    weight = 3.0 if momentum == 1.0 else 1 + momentum + momentum**2
    assert eager.moving_average_weight.item() == pytest.approx(weight)
    assert compiled_layer.moving_average_weight.item() == pytest.approx(weight)
    torch.testing.assert_close(compiled_layer.moving_mean, eager.moving_mean)
    torch.testing.assert_close(compiled_layer.moving_variance, eager.moving_variance)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compiled_in_place_training_has_the_eager_gradients():
    """A compiled graph took memory="in_place"'s write under no_grad for an identity: gamma and
    beta got no gradient, the layer before a wrong one. Compiled, the step runs out of place."""

    def model(memory: str) -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(
            torch.nn.Linear(4, 5), BatchNormalization(5, memory=memory), torch.nn.Linear(5, 3)
        ).double()

    x = torch.randn(8, 4, dtype=torch.float64) * 2 + 1
    weights = torch.randn(8, 3, dtype=torch.float64)
    results = []
    for memory, compiled in (("default", False), ("in_place", True)):
        torch._dynamo.reset()
        network = model(memory)
        call = torch.compile(network, backend="aot_eager") if compiled else network
        (call(x) * weights).sum().backward()
        norm = network[1]
        results.append(
            [network[0].weight.grad, norm.gamma.grad, norm.beta.grad, norm.moving_mean.clone()]
        )
    for compiled_value, eager_value in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(compiled_value, eager_value, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("training", [False, True])
def test_compiled_layer_on_channel_axes_not_adjacent(training):
    """axis=[1, 3] of NCHW: the custom operators returned their kernels' strides, not the ones
    their fake implementations declare, and the compiled graph's views failed on them."""
    layer = BatchNormalization(axis=[1, 3])
    layer.build((8, 3, 2, 5))
    x = torch.randn(8, 3, 2, 5)

    def run(module: BatchNormalization, inputs: torch.Tensor) -> torch.Tensor:
        return module(inputs, training=training).reshape(8, -1) * 2 + 1

    torch._dynamo.reset()
    eager, traced = copy.deepcopy(layer), copy.deepcopy(layer)
    with torch.no_grad():
        expected = run(eager, x)
        compiled = torch.compile(lambda inputs: run(traced, inputs), backend="aot_eager")(x)
    torch.testing.assert_close(compiled, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(traced.moving_mean, eager.moving_mean)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_fused_layer_given_a_mask_compiles_in_one_graph():
    """The warning that a fused layer ignores its mask stopped fullgraph=True ("Dynamo does not
    know how to trace _warnings.warn"); eager calls still warn."""
    layer = BatchNormalization()
    x, mask = torch.randn(2, 3, 4, 5), torch.rand(2, 3, 4) > 0.5
    with pytest.warns(UserWarning, match="Masking is not supported with `fused=True`"):
        expected = layer(x, training=False, mask=mask)
    torch._dynamo.reset()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, training=False, mask=mask), expected)
