"""float16/bfloat16 inputs read and written by the CPU kernels as their bits.

Oracle: the conversions must equal torch's on every half value, and a half input must give what
the float32 kernels give on ``x.float()``, rounded as ``.to(half)`` rounds: the half kernels
compute in float32 on the exact float32 values of the input. The statistics and the gamma/beta
gradients (float64 sums of the same values) are bit-equal, except on channel planes, which sum
half data in float32 chunks (batchnorm.kernels._half_sums): there within float32 rounding of
the float64 sums (relative 1e-6 of their scale). y and dL/dx may differ by one half
ulp in a few elements: LLVM may contract a multiply and an add into one rounding in one build
and not in another ("contract" fast-math), which moves a float32 result by an ulp, and the
rounding to half then flips where that result lies near a midpoint.
"""

from __future__ import annotations

import copy

import numba
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings

from batchnorm import BatchNormalization
from batchnorm.kernels._half import narrowed, widened
from tests.numerics_cases import laid_out, numerics_cases
from tests.snippets import run_program

HALF = {torch.bfloat16: np.int16, torch.float16: np.uint16}


@numba.njit
def _widen_all(bits, out):  # type: ignore[no-untyped-def]
    for i in range(bits.shape[0]):
        out[i] = widened(bits[i])


@numba.njit
def _narrow_all(values, out):  # type: ignore[no-untyped-def]
    for i in range(values.shape[0]):
        out[i] = narrowed(values[i], out)


@pytest.mark.parametrize("dtype", list(HALF))
def test_conversions_equal_torchs(dtype):
    check_conversions(dtype)


def check_conversions(dtype: torch.dtype) -> None:
    """widened and narrowed equal torch's conversions on every half bit pattern and on float32
    values of every class."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    widened_values = np.empty(65536, np.float32)
    _widen_all(bits.numpy().view(HALF[dtype]), widened_values)
    expected = bits.view(dtype).float().numpy()
    nan = np.isnan(expected)
    assert (np.isnan(widened_values) == nan).all()
    assert (widened_values[~nan].view(np.int32) == expected[~nan].view(np.int32)).all()

    generator = np.random.default_rng(0)
    # Every float32 bit pattern class: random bits (all exponents, NaN, inf, subnormals), the
    # half values themselves and the midpoints between neighbours (ties to even).
    random_bits = generator.integers(-(2**31), 2**31, 2_000_000, dtype=np.int64).astype(np.int32)
    exact = expected[~nan]
    midpoints = (exact[:-1].astype(np.float64) + exact[1:]) / 2
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3.4e38, 1e-45], np.float32)
    values = np.concatenate(
        [random_bits.view(np.float32), exact, midpoints.astype(np.float32), special]
    )
    narrowed_bits = np.empty(values.shape, HALF[dtype])
    _narrow_all(values, narrowed_bits)
    expected_bits = torch.from_numpy(values).to(dtype).view(torch.int16).numpy()
    nan = np.isnan(values)
    assert (narrowed_bits[~nan].view(np.int16) == expected_bits[~nan]).all()
    back = torch.from_numpy(narrowed_bits.view(np.int16)).view(dtype).float().numpy()
    assert np.isnan(back[nan]).all()


_WITHOUT_F16C = """
import torch
from batchnorm import BatchNormalization
from tests.test_half_kernels import _assert_rounded_from, check_conversions

check_conversions(torch.float16)
torch.manual_seed(0)
x = (torch.randn(6, 3, 4) * 3 + 2).to(torch.float16)
half, single = BatchNormalization(3, axis=1), BatchNormalization(3, axis=1)
for flag in (True, False):
    _assert_rounded_from(half(x, training=flag), single(x.float(), training=flag))
print("converted")
"""


def test_float16_converts_on_targets_without_f16c(tmp_path):
    # NUMBA_CPU_NAME=generic compiles for no CPU features (no F16C): LLVM's half conversions
    # would be libcalls Numba cannot link, and the process would abort. The kernels convert on
    # the bits there, with the same results (a cold cache of its own: Numba keys its cache on the
    # CPU features anyway).
    result = run_program(_WITHOUT_F16C, NUMBA_CPU_NAME="generic", NUMBA_CACHE_DIR=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "converted"


@pytest.mark.parametrize("dtype", list(HALF))
def test_a_layer_takes_half_and_float32_inputs_of_one_shape(dtype):
    # The layer's one-call shortcut keeps a plan per input signature; a float32 x and a half x
    # of the same shape and strides need different ones.
    torch.manual_seed(0)
    x = torch.randn(8, 4, 5, 5) * 3 + 2
    mixed = BatchNormalization(4, axis=1)
    for training in (True, False):
        for source in (x, x.to(dtype), x):
            fresh = BatchNormalization(4, axis=1)
            fresh.load_state_dict(mixed.state_dict())
            got = mixed(source, training=training)
            expected = fresh(source, training=training)
            assert got.dtype == source.dtype
            assert torch.equal(got, expected)
            for mixed_buffer, fresh_buffer in zip(mixed.buffers(), fresh.buffers(), strict=True):
                assert torch.equal(mixed_buffer, fresh_buffer)


CASES = {
    "planes": ((8, 16, 12, 12), 1, {}, None),
    "channels_last": ((8, 16, 12, 12), 1, {}, torch.channels_last),
    "rows masked": ((16, 50, 24), -1, {}, "mask"),
    "narrow rows": ((4, 20, 20, 3), -1, {}, None),
    "ghost batches": ((64, 40), -1, {"virtual_batch_size": 16}, None),
    "renorm": ((32, 24), -1, {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}, None),
    "relu": ((8, 16, 12, 12), 1, {"activation": "relu"}, None),
    "threaded": ((16, 32, 32, 32), 1, {}, None),
}
# The cases on the channel-planes kernels, whose sums of half data are float32 chunks.
PLANE_CASES = {"planes", "relu", "threaded"}


def _case_inputs(case, dtype, spread, offset):
    """A case's x (``spread * randn + offset`` in ``dtype``, laid out as the case says), mask
    (or None) and upstream gradient, from seed 0."""
    shape, _, _, extra = CASES[case]
    torch.manual_seed(0)
    x = (torch.randn(shape) * spread + offset).to(dtype)
    if extra is torch.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mask = (torch.rand(shape[:-1]) > 0.3) if extra == "mask" else None
    return x, mask, torch.randn(shape).to(dtype)


def _steps(x, layer, upstream, mask, training):
    """Two training steps then an inference step with gradients; everything they produce."""
    results = []
    for flag in (training, training, False):
        source = x.detach().clone().requires_grad_()
        y = layer(source, training=flag, mask=mask)
        y.backward(upstream)
        results += [y, source.grad, layer.gamma.grad.clone(), layer.beta.grad.clone()]
        layer.gamma.grad = layer.beta.grad = None
    buffers = [b.clone() for b in layer.buffers()]
    return results, buffers


# Each (dtype, layout, path) compiles its own kernels (on a cold cache, seconds apiece): every
# case in bfloat16; float16, whose conversions alone differ (checked above on every value, and
# by the search below on every layout), on one. A tensor flag (the general step's kernels) on
# one layout of each kind.
def _matrix(cases: list[str], tensor_flag: tuple[str, ...], float16: tuple[str, ...]) -> list:
    params = []
    for dtype, names in ((torch.bfloat16, cases), (torch.float16, list(float16))):
        for name in names:
            flags = [True, torch.tensor(True)] if name in tensor_flag else [True]
            for flag in flags:
                label = f"{str(dtype).removeprefix('torch.')}-{name}-{type(flag).__name__}"
                params.append(pytest.param(dtype, name, flag, id=label))
    return params


@pytest.mark.parametrize(
    ("dtype", "case", "training"),
    _matrix(list(CASES), ("planes", "channels_last"), ("planes",)),
)
def test_half_steps_equal_the_float32_kernels_rounded(dtype, case, training):
    # A bool flag takes the layer's one-call shortcut, a tensor flag the general step.
    shape, axis, options, _ = CASES[case]
    x, mask, upstream = _case_inputs(case, dtype, spread=3, offset=2)
    half = BatchNormalization(shape[axis], axis=axis, momentum=0.5, **options)
    single = BatchNormalization(shape[axis], axis=axis, momentum=0.5, **options)
    half_results, half_buffers = _steps(x, half, upstream, mask, training)
    single_results, single_buffers = _steps(x.float(), single, upstream.float(), mask, training)
    for index, (got, expected) in enumerate(zip(half_results, single_results, strict=True)):
        if index % 4 < 2:  # y and dL/dx: half, as the float32 results round
            assert got.dtype == dtype
            assert got.stride() == x.stride()
            _assert_rounded_from(got, expected)
        else:
            _assert_sums_match(got, expected, case in PLANE_CASES)
    for got, expected in zip(half_buffers, single_buffers, strict=True):
        _assert_sums_match(got, expected, case in PLANE_CASES)


def _assert_sums_match(got, expected, planes):
    """Statistics and gamma/beta gradients: float64 sums of the same float32 values, so equal
    to the float32 kernels' to the bit; on channel planes, which sum half data in float32 chunks
    (batchnorm.kernels._half_sums), within float32 rounding of the largest."""
    if not planes:
        assert torch.equal(got, expected)
        return
    scale = expected.double().abs().max()
    torch.testing.assert_close(got.double(), expected.double(), rtol=1e-6, atol=1e-6 * scale)


def _assert_rounded_from(got, single):
    """``got`` is ``single.to(got.dtype)``, but for at most 1% of the elements one ulp off."""
    rounded = single.to(got.dtype)
    differ = got != rounded
    assert differ.float().mean() <= 0.01
    ulp = torch.finfo(got.dtype).eps * single[differ].abs().float()
    tiny = torch.finfo(got.dtype).smallest_normal
    assert (
        (got[differ].float() - single[differ]).abs() <= torch.maximum(ulp, ulp.new_tensor(tiny))
    ).all()


@pytest.mark.parametrize("dtype", list(HALF))
def test_half_steps_compile_and_differentiate_twice(dtype):
    # Traced (aot_eager: the custom operators with their fake implementations) the step equals
    # the eager one; under create_graph the gradient is differentiable again, close to float32's.
    torch.manual_seed(0)
    x = torch.randn(8, 16, 6, 6).to(dtype)
    traced_layer = BatchNormalization(16, axis=1)
    eager_layer = BatchNormalization(16, axis=1)
    traced = torch.compile(lambda t: traced_layer(t, training=True), backend="aot_eager")
    results = []
    for step in (traced, lambda t: eager_layer(t, training=True)):
        source = x.clone().requires_grad_()
        y = step(source)
        y.float().pow(2).sum().backward()
        results.append((y, source.grad))
    for got, expected in zip(*results, strict=True):
        assert got.dtype == dtype
        assert torch.equal(got, expected)
    # The traced step updates the statistics with torch ops, each rounded in float32; the eager
    # one in float64, rounded once: at most an ulp apart.
    for got, expected in zip(traced_layer.buffers(), eager_layer.buffers(), strict=True):
        torch.testing.assert_close(got, expected, rtol=2.4e-7, atol=0)

    second = {}
    for kind in (dtype, torch.float32):
        source = x.to(kind, copy=True).requires_grad_()
        y = BatchNormalization(16, axis=1)(source, training=True)
        (gradient,) = torch.autograd.grad(y.float().pow(3).sum(), source, create_graph=True)
        gradient.float().pow(2).sum().backward()
        second[kind] = source.grad.float()
    # Half the input's precision, relative to the largest second derivative (as before the
    # kernels read half precision: bfloat16 0.9%, float16 0.15%).
    largest = second[torch.float32].abs().max()
    error = (second[dtype] - second[torch.float32]).abs().max()
    assert error <= 4 * torch.finfo(dtype).eps * largest


@pytest.mark.parametrize("activation", [None, "leaky_relu", "elu"])
@pytest.mark.parametrize(
    ("dtype", "case"),
    [
        (torch.bfloat16, "planes"),
        (torch.bfloat16, "channels_last"),
        (torch.bfloat16, "rows masked"),
        (torch.float16, "planes"),
    ],
)
def test_in_place_half_steps_write_over_x_and_follow_the_default_step(dtype, case, activation):
    # memory="in_place" writes the half output over x and rebuilds the normalised input from it
    # in the backward: y equals the default step's, the gradients are within the output's
    # rounding (an ulp of half precision, relative to the largest). elu's derivative below 0,
    # y + alpha, carries y's rounding there (the default step computes alpha * exp(z) from x):
    # at most an ulp of y (< alpha) per element, which beta's gradient sums with |dy|.
    shape, axis, _, _ = CASES[case]
    x, mask, upstream = _case_inputs(case, dtype, spread=2, offset=1)
    results = {}
    for memory in ("in_place", "default"):
        layer = BatchNormalization(shape[axis], axis=axis, activation=activation, memory=memory)
        layer.build(x.shape)
        with torch.no_grad():
            layer.gamma.copy_(torch.linspace(0.5, 1.5, shape[axis]))
        leaf = x.clone().requires_grad_()
        source = leaf * 1  # not a leaf: the in-place step may write over it
        y = layer(source, training=True, mask=mask)
        assert (y.data_ptr() == source.data_ptr()) == (memory == "in_place")
        if memory == "in_place":  # the kernels' pass, not the torch-op fallback
            assert type(y.grad_fn).__name__ == "_InPlaceKernelsBackward"
        y.backward(upstream)
        results[memory] = (y.detach(), leaf.grad, layer.gamma.grad, layer.beta.grad)
    (y, dx, dgamma, dbeta), (y_default, dx_default, dgamma_default, dbeta_default) = (
        results["in_place"],
        results["default"],
    )
    assert y.dtype == dtype and torch.equal(y, y_default)
    eps = torch.finfo(dtype).eps
    assert (dx.float() - dx_default.float()).abs().max() <= eps * dx_default.float().abs().max()
    assert (dgamma - dgamma_default).abs().max() <= eps * dgamma_default.abs().max()
    if activation == "elu":
        others = [i for i in range(len(shape)) if i != axis % len(shape)]
        bound = eps * upstream.float().abs().sum(others)  # alpha = 1
        assert ((dbeta - dbeta_default).abs() <= bound).all()
    else:
        torch.testing.assert_close(dbeta, dbeta_default, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    ("dtype", "case", "training"),
    _matrix(["planes", "channels_last", "rows masked", "renorm", "relu"], ("planes",), ("planes",)),
)
def test_half_layers_equal_float32_layers_rounded(dtype, case, training):
    # A layer converted to half precision (``layer.to(torch.bfloat16)``: parameters and moving
    # statistics in half too) against a float32 layer holding the same values: before each
    # step the float32 layer gets the half layer's buffers, so that both start from the same
    # numbers; the half results are the float32 ones rounded (the moving statistics are
    # computed in float64 and rounded once to half, the float32 ones to float32: at most an ulp
    # of half apart).
    shape, axis, options, _ = CASES[case]
    x, mask, upstream = _case_inputs(case, dtype, spread=3, offset=2)
    single = BatchNormalization(shape[axis], axis=axis, momentum=0.5, **options)
    single.build(x.shape)
    with torch.no_grad():
        single.gamma.copy_(torch.linspace(0.5, 1.5, shape[axis]))
        single.beta.copy_(torch.linspace(-1, 1, shape[axis]))
    half = copy.deepcopy(single).to(dtype)
    with torch.no_grad():  # the values half precision holds
        for kept, copied in zip(half.parameters(), single.parameters(), strict=True):
            copied.copy_(kept)
    eps = torch.finfo(dtype).eps
    for flag in (training, training, False):
        with torch.no_grad():
            for kept, copied in zip(half.buffers(), single.buffers(), strict=True):
                copied.copy_(kept)
        results = []
        for layer, source in ((half, x), (single, x.float())):
            source = source.clone().requires_grad_()
            y = layer(source, training=flag, mask=mask)
            y.backward(upstream.to(source.dtype))
            results.append((y, source.grad, layer.gamma.grad, layer.beta.grad))
            layer.gamma.grad = layer.beta.grad = None
        (y, dx, dgamma, dbeta), (y32, dx32, dgamma32, dbeta32) = results
        for got, expected in ((y, y32), (dx, dx32)):
            assert got.dtype == dtype and got.stride() == x.stride()
            _assert_rounded_from(got, expected)
        for got, expected in ((dgamma, dgamma32), (dbeta, dbeta32)):
            assert got.dtype == dtype
            torch.testing.assert_close(got.float(), expected, rtol=eps, atol=0)
        for got, expected in zip(half.buffers(), single.buffers(), strict=True):
            assert got.dtype == (torch.float64 if got.ndim == 0 else dtype)
            torch.testing.assert_close(got.double(), expected.double(), rtol=eps, atol=0)


def _assert_within_an_ulp(got, single):
    """Each element of ``got`` is ``single`` rounded to its dtype, or an ulp off that."""
    ulp = torch.finfo(got.dtype).eps * single.abs()
    tiny = torch.finfo(got.dtype).smallest_normal
    finite = torch.isfinite(single.to(got.dtype))  # beyond half's range: inf, as .to(half)
    beyond, rounded = got[~finite].float(), single[~finite].to(got.dtype).float()
    largest = torch.finfo(got.dtype).max  # an ulp below inf, where the float32 result is near it
    assert ((beyond == rounded) | (beyond == torch.sign(rounded) * largest)).all()
    error = (got[finite].float() - single[finite]).abs()
    assert (error <= torch.clamp(ulp[finite], min=tiny)).all(), error.max()


@pytest.mark.parametrize("dtype", list(HALF))
@settings(max_examples=25, deadline=None)
@given(case=numerics_cases())
def test_half_search_follows_the_float32_kernels(case, dtype):
    # The float32 search's draws (layouts, masks with far padding, offsets, magnitudes) in half
    # precision, through the shortcut: the statistics are the float32 layer's on the same values,
    # and the outputs its outputs rounded.
    rng = np.random.default_rng(case["seed"])
    shape, axis = case["shape"], case["axis"]
    largest = float(torch.finfo(dtype).max) / 4
    scale = min(case["magnitude"], largest / 10)
    means = rng.normal(size=shape[axis]) * case["offset_ratio"] * scale
    x = rng.normal(size=shape) * scale + np.expand_dims(
        means, [d for d in range(len(shape)) if d != axis]
    )
    mask = None
    if case["mask"] is not None:
        assume(case["mask"] == "per_position" or axis == len(shape) - 1)
        mask = torch.from_numpy(
            rng.uniform(size=[s for d, s in enumerate(shape) if d != axis]) > 0.3
        )
        weights = mask.unsqueeze(-1 if list(mask.shape) == shape[:-1] else axis)
        x = np.where(weights.expand(shape).numpy(), x, case["padding"] * scale)
    assume(np.abs(x).max() < largest)
    x_half = laid_out(x.astype(np.float32), axis, case["layout"]).to(dtype)
    results = []
    for source in (x_half, x_half.float()):
        layer = BatchNormalization(shape[axis], axis=axis, momentum=0.0, fused=False)
        with torch.no_grad():
            y = layer(source, training=True, mask=mask)
            y_inference = layer(source, training=False)
        results.append((y, y_inference, layer.moving_mean, layer.moving_variance))
    (y, y_inference, mean, variance), (y32, y_inference32, mean32, variance32) = results
    # Within float32 rounding of the statistics' scale: channel planes sum half data in float32
    # chunks (batchnorm.kernels._half_sums); elsewhere they are equal to the bit.
    scale = variance32.double().sqrt() + mean32.double().abs()
    assert ((mean.double() - mean32.double()).abs() <= 1e-6 * scale).all(), (mean, mean32)
    torch.testing.assert_close(variance.double(), variance32.double(), rtol=2e-6, atol=0)
    for got, single in ((y, y32), (y_inference, y_inference32)):
        assert got.dtype == dtype
        _assert_within_an_ulp(got, single)


@pytest.mark.parametrize(
    "case", ["outlier first", "scale 1e-18", "scale 1e19", "offset 200", "nan in a channel"]
)
def test_half_planes_sum_in_float32_with_float64_accuracy(case):
    # The half-planes build sums each bfloat16 plane in float32 (batchnorm.kernels._half_sums),
    # centred on the plane, and again in float64 where float32 would lose or overflow the
    # squares and products: statistics and gamma/beta gradients against a float64 reference on
    # the same values. Planes of 300 values: a full chunk and a short one.
    torch.manual_seed(7)
    x = torch.randn(6, 4, 15, 20)
    if case == "outlier first":
        x[0, :, 0, 0] = 1000.0
    elif case == "scale 1e-18":  # squares summing below 1e-30: the float64 sums
        x = x * 1e-18
    elif case == "scale 1e19":  # squares beyond float32's range: the float64 sums
        x = x * 1e19
    elif case == "offset 200":
        x = x + 200.0
    else:
        x[2, 1, 3, 4] = float("nan")
    x = x.to(torch.bfloat16)
    upstream = torch.randn(x.shape).to(torch.bfloat16)
    layer = BatchNormalization(4, axis=1, momentum=0.0, fused=False)
    layer.build(x.shape)
    with torch.no_grad():  # M - (M - v) is v exactly from 0 (from 1, 1e-36 is lost in 1 - v)
        layer.moving_variance.zero_()
    source = x.clone().requires_grad_()
    layer(source, training=True).backward(upstream)
    values = x.double()
    mean = values.mean((0, 2, 3))
    variance = values.var((0, 2, 3), unbiased=False)
    normalised = (values - mean.view(1, -1, 1, 1)) / (variance.view(1, -1, 1, 1) + 1e-3).sqrt()
    dy = upstream.double()
    # (result, float64 reference, the scale its error is measured against)
    expected = {
        "moving_variance": (layer.moving_variance, variance, variance.abs()),
        "moving_mean": (layer.moving_mean, mean, variance.sqrt() + mean.abs()),
        "gamma gradient": (
            layer.gamma.grad,
            (dy * normalised).sum((0, 2, 3)),
            (dy * normalised).abs().sum((0, 2, 3)),
        ),
        "beta gradient": (layer.beta.grad, dy.sum((0, 2, 3)), dy.abs().sum((0, 2, 3))),
    }
    for name, (got, reference, scale) in expected.items():
        got = got.double()
        nan = reference.isnan()
        assert torch.equal(got.isnan(), nan), name
        error = (got - reference).abs()[~nan]
        # float32 storage (2^-24 relative) and sums within float32 rounding of their magnitude
        assert (error <= 1e-6 * scale[~nan] + 1e-300).all(), (name, error, scale)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_follows_torchs_batch_norm(dtype, training):
    """CPU mixed precision (torch.autocast): the convolution before the layer runs in half
    precision, the layer takes its half output as torch's batch norm does (not in autocast's
    lists, so in the input's dtype, float32 statistics). Oracle: nn.BatchNorm2d with Keras'
    conventions mapped: the same output dtype and values (within one half ulp), convolution
    weight gradient and moving statistics."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3)
    ours = torch.nn.Sequential(
        copy.deepcopy(conv),
        BatchNormalization(8, axis=1, moving_variance_estimator="unbiased"),
        torch.nn.ReLU(),
    )
    theirs = torch.nn.Sequential(
        copy.deepcopy(conv), torch.nn.BatchNorm2d(8, eps=1e-3, momentum=0.01), torch.nn.ReLU()
    )
    x = torch.randn(4, 3, 10, 10) * 2 + 1
    results = []
    for model in (ours.train(training), theirs.train(training)):
        with torch.autocast("cpu", dtype=dtype):
            y = model(x)
        y.float().square().sum().backward()
        assert model[0].weight.grad is not None
        results.append((y, model[0].weight.grad, *list(model[1].buffers())[:2]))
    (y_ours, grad_ours, mean_ours, var_ours), (y_theirs, grad_theirs, mean, var) = results
    assert y_ours.dtype == y_theirs.dtype == dtype
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(y_ours.float(), y_theirs.float(), rtol=ulp, atol=ulp)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=1e-2, atol=1e-3)
    assert mean_ours.dtype == torch.float32
    torch.testing.assert_close(mean_ours, mean)
    torch.testing.assert_close(var_ours, var)
