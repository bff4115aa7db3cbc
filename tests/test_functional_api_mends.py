"""The functional API's edges: compile_composed under transforms and past Dynamo's recompile
limit, register_backend's checks, partial renorm state, renorm_correction's clipping, moments'
axes, force_backend's and fold_weights' errors. Oracles: the eager composed ops
(``compile_composed(False)``) and float64 formulas written out here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch.func import functional_call, grad, stack_module_state, vmap

import batchnorm
from batchnorm.functional import (
    NUMBA_CPU,
    TORCH_OPS,
    BatchNormStatistics,
    _composed,
    _dispatch,
    backend_for,
    batch_norm,
    compile_composed,
    force_backend,
    moments,
    register_backend,
    renorm_correction,
)
from batchnorm.functional._composed import CompiledBySignature, composed_ops


@pytest.fixture
def compiled_composed():
    """compile_composed() with Dynamo's eager backend (it traces as inductor does, without the
    code generation); off again, and Dynamo's caches dropped, afterwards."""
    compile_composed(backend="eager")
    try:
        yield composed_ops()
    finally:
        compile_composed(False)
        torch._dynamo.reset()


def _eager_and_compiled(run):
    """``run()`` with the eager composed ops (the oracle), then after compile_composed()."""
    compile_composed(False)
    eager = run()
    compile_composed(backend="eager")
    try:
        return eager, run(), composed_ops()
    finally:
        compile_composed(False)


def _per_sample_grads():
    torch.manual_seed(1)
    layer = batchnorm.BatchNormalization(4).eval()
    with torch.no_grad():
        layer.gamma.uniform_(0.5, 1.5)
    x = torch.randn(6, 4)

    def loss(params, sample):
        return functional_call(layer, params, (sample[None],)).square().sum()

    return vmap(grad(loss), in_dims=(None, 0))(dict(layer.named_parameters()), x)


def _ensemble():
    torch.manual_seed(2)
    layers = [batchnorm.BatchNormalization(4) for _ in range(3)]
    params, buffers = stack_module_state(layers)
    base = batchnorm.BatchNormalization(4).to("meta")
    x = torch.randn(3, 8, 4)
    return vmap(lambda p, b, xi: functional_call(base, (p, b), (xi,), {"training": True}))(
        params, buffers, x
    )


def _forward_ad():
    torch.manual_seed(3)
    layer = batchnorm.BatchNormalization(4)
    x, tangent = torch.randn(8, 4), torch.randn(8, 4)
    with forward_ad.dual_level():
        y = layer(forward_ad.make_dual(x, tangent), training=True)
        return forward_ad.unpack_dual(y).tangent


def _flop_counted():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(4)
    layer = batchnorm.BatchNormalization(4)
    with FlopCounterMode(display=False):
        return layer(torch.randn(8, 4), training=True)


def _fake():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        y = batchnorm.BatchNormalization(4)(torch.randn(8, 4), training=True)
    return torch.zeros(y.shape, dtype=y.dtype)  # a fake has no values: its shape and dtype


def _jit_traced():
    torch.manual_seed(5)
    layer = batchnorm.BatchNormalization(4).eval()
    with torch.no_grad():
        layer.moving_mean.normal_()
    traced = torch.jit.trace(layer, torch.randn(8, 4), check_trace=False)
    return traced(torch.randn(5, 4) * 2)


def _vmapped_and_grad():
    torch.manual_seed(6)
    x = torch.randn(3, 8, 4)
    state = BatchNormStatistics(torch.zeros(4), torch.ones(4))

    def f(z):
        return batch_norm(z, state, training=True)[0]

    return vmap(f)(x), grad(lambda z: (f(z) * z.sin()).sum())(x[0])


# torch 2.13 deprecates torch.jit's trace.
@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
@pytest.mark.parametrize(
    "run",
    [
        _vmapped_and_grad,
        _per_sample_grads,
        _ensemble,
        _forward_ad,
        _flop_counted,
        _fake,
        _jit_traced,
    ],
)
def test_compile_composed_runs_transforms_modes_and_traces_eagerly(run):
    """Dynamo refused these calls (functorch transforms, forward AD's missing jvp, dispatch
    modes' "no compiled frames", torch.jit.trace of a Dynamo function): they take the eager
    composed ops, compute what compile_composed(False) computes, and compile nothing."""
    eager, compiled, backend = _eager_and_compiled(run)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    assert all(
        not wrapper.compiled
        for wrapper in (backend._batch_moments, backend._normalize_batch, backend._normalize)
    )


def test_compile_composed_takes_more_shapes_than_dynamos_recompile_limit(compiled_composed):
    """Dynamo's recompile_limit (8) per function, with fullgraph=True: the 9th distinct input
    shape raised FailOnRecompileLimitHit (a model with 9 layers of distinct widths). Each
    signature now compiles on its own, once. Oracle: the eager composed ops, float64."""
    limit = torch._dynamo.config.recompile_limit
    state = BatchNormStatistics(
        torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    )
    for n in range(2, limit + 4):
        torch.manual_seed(n)
        # A Keras mask with the channel axis not last: the composed ops, even on the CPU.
        x, mask = torch.randn(n, 3, 4, dtype=torch.float64), torch.rand(n, 3)
        y, new = batch_norm(x, state, axis=1, training=True, mask=mask)
        weights = mask.double()[..., None].expand_as(x)
        mean = (weights * x).sum((0, 2)) / weights.sum((0, 2))
        variance = (weights * (x - mean[:, None]) ** 2).sum((0, 2)) / weights.sum((0, 2))
        reference = (x - mean[:, None]) / torch.sqrt(variance[:, None] + 1e-3)
        torch.testing.assert_close(y, reference)
        torch.testing.assert_close(new.moving_mean, 0.01 * mean, rtol=1e-12, atol=1e-12)
    assert len(compiled_composed._batch_moments.compiled) == limit + 2
    batch_norm(x, state, axis=1, training=True, mask=mask)  # seen before: nothing compiles
    assert len(compiled_composed._batch_moments.compiled) == limit + 2


def _scaled(backend, x):
    return x.sin() * _FACTOR[0]


_FACTOR = [2.0]


def test_compiled_by_signature_past_its_limits_runs_eagerly_with_one_warning():
    """Past ``limit`` signatures, or where Dynamo still meets its recompile limit inside one
    signature's compilation (here a global it guards on changes), the call runs the function
    eagerly, with one RuntimeWarning, and the signatures compiled so far stay compiled."""
    options = {"fullgraph": True, "dynamic": False, "backend": "eager"}
    wrapper = CompiledBySignature(_scaled, options, limit=2)
    try:
        for n in (1, 2):
            x = torch.randn(n)
            torch.testing.assert_close(wrapper(x), x.sin() * 2.0)
        with pytest.warns(RuntimeWarning, match=r"`_scaled` met more than 2 input signatures"):
            x = torch.randn(3)
            torch.testing.assert_close(wrapper(x), x.sin() * 2.0)
        assert len(wrapper.compiled) == 2
        wrapper(torch.randn(4))  # no second warning (the filter turns warnings into errors)

        other = CompiledBySignature(_scaled, options, limit=4)
        x = torch.randn(2)
        other(x)
        with torch._dynamo.config.patch(recompile_limit=1):
            _FACTOR[0] = 3.0
            with pytest.warns(RuntimeWarning, match=r"recompile limit"):
                torch.testing.assert_close(other(x), x.sin() * 3.0)
    finally:
        _FACTOR[0] = 2.0
        torch._dynamo.reset()


def test_register_backend_checks_both_arguments_before_changing_anything():
    """A string for ``backend`` raised AttributeError after storing it: every later CPU call
    failed. A torch.device was stored as a key no call looks up. Oracle: float64 formula."""
    x = torch.randn(16, 3, dtype=torch.float64) * 2 + 1
    state = BatchNormStatistics(
        torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    )
    with pytest.raises(TypeError, match=r"`backend` must be None or a batch-norm backend.*lacks "):
        register_backend("cpu", "numba")
    with pytest.raises(TypeError, match=r"`device_type` must be .* Received: device_type of type"):
        register_backend(0, TORCH_OPS)
    with pytest.raises(ValueError, match=r"`device_type` must name a device type.*'gpu'"):
        register_backend("gpu", TORCH_OPS)
    assert _dispatch.registered_backend("cpu") is NUMBA_CPU
    y, _ = batch_norm(x, state, training=True)
    reference = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3)
    torch.testing.assert_close(y, reference)
    try:
        register_backend(torch.device("cpu"), TORCH_OPS)
        assert backend_for(x) is TORCH_OPS
        assert set(_dispatch._BACKENDS) <= {"cpu", "cuda", "mps", "xpu", "meta"}
    finally:
        register_backend("cpu", NUMBA_CPU)


def test_force_backend_names_its_argument_and_the_environment_names_the_variable(monkeypatch):
    with pytest.raises(ValueError, match=r"`name` must be one of .* Received: name='gpu'"):
        force_backend("gpu")
    monkeypatch.setenv("BATCHNORM_BACKEND", "gpu")
    with pytest.raises(
        ValueError, match=r"`BATCHNORM_BACKEND` must be one of .* Received: BATCHNORM_BACKEND='gpu'"
    ):
        _dispatch.apply_environment()
    assert _dispatch.registered_backend("cpu") is NUMBA_CPU  # nothing forced


@pytest.mark.parametrize(
    ("fields", "absent"),
    [
        ({"renorm_mean": 0.0, "renorm_stddev": 1.0}, "moving_stddev=None"),
        ({"moving_stddev": 1.0, "renorm_mean": 0.0}, "renorm_stddev=None"),
        ({"moving_stddev": 1.0}, "renorm_mean, renorm_stddev=None"),
        ({"renorm_stddev": 1.0}, "moving_stddev, renorm_mean=None"),
    ],
)
def test_batch_norm_refuses_part_of_the_renorm_state(fields, absent):
    """A bare AssertionError, or (moving_stddev alone) renorm off and moving_stddev dropped
    from the returned state."""
    tensors = {name: torch.full((3,), value) for name, value in fields.items()}
    state = BatchNormStatistics(torch.zeros(3), torch.ones(3), **tensors)
    with pytest.raises(
        ValueError,
        match=r"`statistics` must carry all of moving_stddev, renorm_mean and renorm_stddev "
        rf".*or none of them\. Received: .*{absent}",
    ):
        batch_norm(torch.randn(8, 3), state, training=True)


def _correction_reference(mean, variance, renorm_mean, renorm_stddev, epsilon, clipping):
    """r and d in float64 from the formula (Ioffe 2017, tf-keras' flooring of renorm_stddev)."""
    s = math.sqrt(variance + epsilon)
    s_r = max(renorm_stddev, math.sqrt(epsilon))
    r, d = s / s_r, (mean - renorm_mean) / s_r
    r = min(max(r, clipping.get("rmin") or -math.inf), clipping.get("rmax") or math.inf)
    dmax = clipping.get("dmax")
    d = d if dmax is None else min(max(d, -dmax), dmax)
    return r, d


@pytest.mark.parametrize(
    "clipping",
    [None, {}, {"rmax": None}, {"dmax": None}, {"rmin": None, "rmax": 1.1, "dmax": 0.5}],
)
def test_renorm_correction_reads_none_as_no_bound(clipping):
    """A None entry (tf-keras and batch_norm: no bound) raised inside torch.clamp; None raised
    a TypeError."""
    values = (0.8, 2.0, 0.1, 1.2, 1e-3)  # mean, variance, renorm_mean, renorm_stddev, epsilon
    tensors = [torch.tensor([v], dtype=torch.float64) for v in values[:4]]
    correction = renorm_correction(*tensors, values[4], clipping)
    r, d = _correction_reference(*values, clipping or {})
    torch.testing.assert_close(correction.r, torch.tensor([r], dtype=torch.float64))
    torch.testing.assert_close(correction.d, torch.tensor([d], dtype=torch.float64))


@pytest.mark.parametrize(
    ("clipping", "error", "match"),
    [
        ({"dmax": -1.0}, ValueError, r"`clipping` needs dmax >= 0\. Received: clipping="),
        ({"rmaxx": 1.0}, ValueError, r"`clipping` accepts only the keys 'rmin', 'rmax'"),
        ({"rmin": 2.0, "rmax": 1.0}, ValueError, r"`clipping` needs rmax >= rmin"),
        ({"rmax": "2"}, ValueError, r"`clipping\['rmax'\]` must be a number"),
        ([("rmax", 2.0)], TypeError, r"`clipping` must be a dict"),
    ],
)
def test_renorm_correction_checks_clipping_as_batch_norm_does(clipping, error, match):
    """{"dmax": -1} gave d = -1 and an unknown key was ignored."""
    tensors = (torch.zeros(3), torch.ones(3), torch.zeros(3), torch.ones(3))
    with pytest.raises(error, match=match):
        renorm_correction(*tensors, 1e-3, clipping)


def test_moments_over_no_axes_is_the_input_and_zero_variance():
    """tf.nn.moments(x, []) returns (x, 0); it was refused."""
    x = torch.randn(2, 3, dtype=torch.float64)
    mean, variance = moments(x, [])
    torch.testing.assert_close(mean, x, rtol=0, atol=0)
    torch.testing.assert_close(variance, torch.zeros_like(x), rtol=0, atol=0)
    mean, variance = moments(x, (), keepdims=True)
    assert mean.shape == variance.shape == x.shape


@pytest.mark.parametrize(
    ("axes", "error", "match"),
    [
        ([3], ValueError, r"`axes` is out of range .* Received: axes=\[3\]"),
        ([0, -2], ValueError, r"`axes` contains duplicate axes\. Received: axes=\[0, -2\]"),
        (1.5, TypeError, r"`axes` must be an int or a list/tuple of ints\. Received: axes=1.5"),
        ([1.0], TypeError, r"`axes` must be an int or a list/tuple of ints\. Received: axes="),
    ],
)
def test_moments_errors_name_axes(axes, error, match):
    with pytest.raises(error, match=match):
        moments(torch.randn(2, 3), axes)


@pytest.mark.parametrize("epsilon", ["1e-5", None, math.inf, 0.0, -1e-3, math.nan])
def test_fold_weights_checks_epsilon_as_batch_norm_does(epsilon):
    """A string or None raised an unnamed TypeError; inf folded every weight to 0."""
    conv, bn = torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5)
    arguments = (conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.weight, bn.bias)
    with pytest.raises(ValueError, match=r"`epsilon` must be a finite number > 0\. Received: "):
        batchnorm.fold_weights(*arguments, epsilon)


def test_fold_weights_with_a_valid_epsilon_matches_the_formula():
    torch.manual_seed(7)
    weight, bias = torch.randn(5, 3, 2), torch.randn(5)
    mean, variance = torch.randn(5), torch.rand(5) + 0.5
    gamma, beta = torch.randn(5), torch.randn(5)
    folded, folded_bias = batchnorm.fold_weights(weight, bias, mean, variance, gamma, beta, 1e-5)
    scale = gamma.double() / torch.sqrt(variance.double() + 1e-5)
    torch.testing.assert_close(folded, (weight.double() * scale[:, None, None]).float())
    torch.testing.assert_close(
        folded_bias, ((bias.double() - mean.double()) * scale + beta.double()).float()
    )


def test_compiled_backend_is_the_one_composed_ops_returns():
    """The module-level switch the tests above rely on."""
    compile_composed(backend="eager")
    try:
        assert isinstance(composed_ops(), _composed.CompiledTorchOpsBackend)
    finally:
        compile_composed(False)
    assert composed_ops() is TORCH_OPS
