"""The native backend (torch's own batch-norm kernels), run on the CPU where CI runs, and on CUDA
when a GPU is present (those tests are skipped otherwise)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import BatchNormalization
from batchnorm.functional import (
    NATIVE,
    NUMBA_CPU,
    TORCH_OPS,
    backend_for,
    force_backend,
    register_backend,
)
from tests.numpy_reference import reference_train_step
from tests.snippets import run_program

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.fixture
def native_on_cpu():
    register_backend("cpu", NATIVE)
    yield
    register_backend("cpu", NUMBA_CPU)


@pytest.fixture
def calls(monkeypatch):
    """How many times each native entry point ran."""
    counts = {"train_batch": 0}
    original = NATIVE.train_batch

    def counting(*args, **kwargs):
        counts["train_batch"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(NATIVE, "train_batch", counting)
    return counts


def _from_torch_pair(module: torch.nn.Module, dtype: torch.dtype):
    module = module.to(dtype)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.normal_()
    return module, batchnorm.from_torch(module)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("make", "shape", "channels_last"),
    [
        (lambda: torch.nn.BatchNorm1d(6), (16, 6), False),
        (lambda: torch.nn.BatchNorm1d(6), (8, 6, 5), False),
        (lambda: torch.nn.BatchNorm2d(6), (4, 6, 5, 3), False),
        (lambda: torch.nn.BatchNorm2d(6), (4, 6, 5, 3), True),
        (lambda: torch.nn.BatchNorm3d(6), (2, 6, 3, 2, 4), False),
    ],
)
def test_native_follows_torch_step_for_step(
    native_on_cpu, calls, make, shape, channels_last, dtype
):
    torch.manual_seed(0)
    theirs, ours = _from_torch_pair(make(), dtype)
    tolerance = 1e-5 if dtype == torch.float32 else 1e-12
    for _ in range(5):
        x = torch.randn(shape, dtype=dtype) * 2 + 3
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x_ours = x.clone().requires_grad_()
        x_theirs = x.clone().requires_grad_()
        y_ours, y_theirs = ours(x_ours), theirs(x_theirs)
        torch.testing.assert_close(y_ours, y_theirs, rtol=tolerance, atol=tolerance)
        (y_ours * y_ours.detach().cos()).sum().backward()
        (y_theirs * y_theirs.detach().cos()).sum().backward()
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(ours.gamma.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.moving_mean, theirs.running_mean, rtol=tolerance, atol=0)
        torch.testing.assert_close(ours.moving_variance, theirs.running_var, rtol=tolerance, atol=0)
    ours.eval()
    theirs.eval()
    x = torch.randn(shape, dtype=dtype)
    torch.testing.assert_close(ours(x), theirs(x), rtol=tolerance, atol=tolerance)
    assert calls["train_batch"] == 5


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("moving_average", ["ema", "debiased"])
def test_native_statistics_follow_the_float64_reference(
    native_on_cpu, calls, estimator, moving_average
):
    # The layer's own moving-average rules are applied to the native kernel's batch statistics.
    rng = np.random.default_rng(0)
    layer = BatchNormalization(
        5,
        momentum=0.75 if moving_average == "ema" else 1.0,
        moving_variance_estimator=estimator,
        moving_average=moving_average,
        dtype="float64",
    )
    x = rng.normal(4.0, 3.0, (9, 5))
    y = layer(torch.tensor(x), training=True)
    expected_y, mean, variance = reference_train_step(
        x,
        np.zeros(5),
        np.ones(5),
        None,
        None,
        axes=(1,),
        momentum=0.75,
        epsilon=1e-3,
        unbiased=estimator == "unbiased",
    )
    if moving_average == "debiased":  # the first debiased step replaces the initial values
        mean = x.mean(0)
        variance = x.var(0, ddof=1 if estimator == "unbiased" else 0)
    np.testing.assert_allclose(y.detach().numpy(), expected_y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-12)
    assert calls["train_batch"] == 1


@pytest.mark.parametrize(
    ("kwargs", "shape", "call"),
    [
        ({"axis": -1}, (6, 4), {"mask": torch.tensor([1.0, 0, 1, 1, 0, 1])}),
        ({"axis": -1, "virtual_batch_size": 2}, (6, 4), {}),
        ({"axis": -1, "renorm": True}, (6, 4), {}),
        ({"axis": [1, 2]}, (6, 4, 3), {}),
        ({"axis": -1}, (1, 4), {}),
        (
            {"axis": 1, "adjustment": lambda s: (torch.rand(s[0], 4, 1) + 0.5, torch.zeros(1))},
            (6, 4, 2),
            {},
        ),
    ],
)
def test_what_native_kernels_cannot_express_takes_the_composed_ops(
    native_on_cpu, calls, kwargs, shape, call
):
    torch.manual_seed(1)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    native_layer = BatchNormalization(dtype="float64", fused=False, **kwargs)
    seed_state = torch.random.get_rng_state()
    y_native = native_layer(x, training=True, **call)
    register_backend("cpu", None)
    torch.random.set_rng_state(seed_state)
    composed_layer = BatchNormalization(dtype="float64", fused=False, **kwargs)
    y_composed = composed_layer(x, training=True, **call)
    register_backend("cpu", NATIVE)
    torch.testing.assert_close(y_native, y_composed, rtol=1e-12, atol=1e-12)
    for a, b in zip(native_layer.get_weights(), composed_layer.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    assert calls["train_batch"] == 0


def test_one_value_per_channel_gives_beta_and_a_zero_gradient(native_on_cpu, calls):
    layer = BatchNormalization(3, beta_initializer="ones")
    x = torch.randn(1, 3, requires_grad=True)
    y = layer(x, training=True)
    assert torch.equal(y, torch.ones(1, 3))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(1, 3))
    assert calls["train_batch"] == 0


def test_native_double_backward_and_tensor_training_flag(native_on_cpu, calls):
    torch.manual_seed(2)
    layer = BatchNormalization(3, axis=1, dtype="float64")
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)

    def output(x, gamma):
        layer.gamma.data = gamma.detach()
        return torch.func.functional_call(
            layer, {"gamma": gamma}, (x,), {"training": torch.tensor(True)}
        )

    gamma = torch.rand(3, dtype=torch.float64, requires_grad=True) + 0.5
    assert torch.autograd.gradcheck(output, (x, gamma))
    assert torch.autograd.gradgradcheck(output, (x, gamma))
    assert calls["train_batch"] > 0


def test_native_compiles_without_graph_breaks(native_on_cpu):
    layer = BatchNormalization(4, axis=1)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(8, 4, 3)
    reference = BatchNormalization(4, axis=1)
    torch.testing.assert_close(compiled(x, training=True), reference(x, training=True))
    torch.testing.assert_close(layer.moving_variance, reference.moving_variance)


def test_backend_choice_by_device_and_override():
    cpu = torch.zeros(2, 3)
    assert backend_for(cpu) is NUMBA_CPU
    assert backend_for(torch.zeros(2, 3, device="meta")) is NATIVE
    try:
        force_backend("torch")
        assert backend_for(cpu) is TORCH_OPS
        force_backend("native")
        assert backend_for(cpu) is NATIVE
    finally:
        force_backend(None)
    with pytest.raises(ValueError, match=r"`name` must be one of .* Received: name='cudnn'"):
        force_backend("cudnn")
    assert backend_for(cpu) is NUMBA_CPU


def test_environment_variable_forces_a_backend():
    program = (
        "import torch, batchnorm; from batchnorm.functional import backend_for; "
        "layer = batchnorm.BatchNormalization(3); x = torch.randn(4, 3); "
        "layer(x, training=True); layer(x, training=True); "
        "direct = layer.__dict__.get('_direct_calls'); "
        "print(backend_for(x).name, direct is not None and direct(x, True) is not None)"
    )
    result = run_program(program, BATCHNORM_BACKEND="native")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["native", "False"]


# ------------------------------------------------------------------------------------ CUDA
@CUDA
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("backend", ["native", "torch"])
def test_cuda_training_and_inference_follow_float64(dtype, backend):
    register_backend("cuda", None if backend == "native" else TORCH_OPS)
    try:
        torch.manual_seed(3)
        layer = BatchNormalization(8, axis=1, momentum=0.5, device="cuda")
        x = torch.randn(16, 8, 6, 6, device="cuda") * 3 + 2
        y = layer(x.to(dtype), training=True)
        assert y.dtype == dtype
        reference = BatchNormalization(8, axis=1, momentum=0.5, dtype="float64")
        expected = reference(x.double().cpu(), training=True)
        tolerance = {torch.float16: 3e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}[dtype]
        torch.testing.assert_close(y.double().cpu(), expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(
            layer.moving_variance.double().cpu(), reference.moving_variance, rtol=1e-3, atol=1e-3
        )
        y = layer(x.to(dtype), training=False)
        expected = reference(x.double().cpu(), training=False)
        torch.testing.assert_close(y.double().cpu(), expected, rtol=tolerance, atol=tolerance)
    finally:
        register_backend("cuda", None)


@CUDA
def test_cuda_ill_conditioned_float32_variance():
    torch.manual_seed(4)
    x = 1000 + 0.01 * torch.randn(64, 16, 8, 8, device="cuda")
    layer = BatchNormalization(
        16, axis=1, momentum=0.0, moving_variance_estimator="biased", device="cuda"
    )
    layer(x, training=True)
    exact = x.double().var(dim=(0, 2, 3), correction=0)
    relative = ((layer.moving_variance.double() - exact).abs() / exact).max().item()
    assert relative <= 1e-5, relative


@CUDA
def test_cuda_compiles_fullgraph():
    layer = BatchNormalization(8, axis=1, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 8, 5, device="cuda")
    y = compiled(x, training=torch.tensor(True, device="cuda"))
    assert y.shape == x.shape and torch.isfinite(y).all()
