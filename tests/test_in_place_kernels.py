"""memory="in_place" on the CPU kernels (batchnorm.functional._cpu_in_place) against the torch-op
version (batchnorm.functional._in_place), which the composed backend runs: the same output
written over x, the same gradients and statistics, in float64 to rounding."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch

from batchnorm.functional import BatchNormStatistics, _cpu_backend, batch_norm, force_backend
from batchnorm.functional._cpu_in_place import normalize_in_place_kernels
from batchnorm.kernels._in_place_backward import log1p_nonpositive
from batchnorm.kernels._jit import FASTMATH

ACTIVATIONS = [(None, None), ("identity", None), ("leaky_relu", 0.2), ("elu", 0.7)]
LAYOUTS = [
    ((8, 6, 5, 5), (1,)),  # channel planes
    ((40, 7), (1,)),  # rows
    ((8, 5, 5, 6), (3,)),  # channels last
    ((4, 5, 3, 6), (2, 3)),  # two channel axes, adjacent in memory
    ((64, 16, 16, 17), (1,)),  # several row blocks (threaded)
]


def _step(x0, gamma, beta, up, axes, ghost, mask, activation, parameter, memory="in_place"):
    gamma = gamma.clone().requires_grad_()
    beta = beta.clone().requires_grad_()
    leaf = x0.clone().requires_grad_()
    x = leaf * 1.0  # not a leaf: in place is allowed
    channels = tuple(x0.shape[a] for a in axes)
    state = BatchNormStatistics(
        torch.zeros(channels, dtype=x0.dtype), torch.ones(channels, dtype=x0.dtype)
    )
    y, new = batch_norm(
        x,
        state,
        gamma,
        beta,
        axis=list(axes),
        training=True,
        virtual_batch_size=ghost,
        mask=mask,
        activation=activation,
        activation_param=parameter,
        memory=memory,
    )
    assert (y.data_ptr() == x.data_ptr()) == (memory == "in_place")  # written over its input
    (y * up).sum().backward()
    return (
        y.detach().clone(),
        leaf.grad,
        gamma.grad,
        beta.grad,
        new.moving_mean,
        new.moving_variance,
    )


def _record_kernel_runs(monkeypatch):
    """A list that gets, per in-place normalisation, whether the kernels ran it (not torch ops)."""
    ran = []

    def spy(*args):
        y = normalize_in_place_kernels(*args)
        ran.append(y is not None)
        return y

    monkeypatch.setattr(_cpu_backend.NumbaCpuBackend, "normalize_in_place", staticmethod(spy))
    return ran


@pytest.mark.parametrize(("activation", "parameter"), ACTIVATIONS)
@pytest.mark.parametrize(("shape", "axes"), LAYOUTS)
@pytest.mark.parametrize(("ghost", "masked"), [(None, False), (None, True), (2, False), (2, True)])
def test_kernels_match_the_torch_op_version(
    activation, parameter, shape, axes, ghost, masked, monkeypatch
):
    ran = _record_kernel_runs(monkeypatch)
    if ghost and len(axes) > 1:
        pytest.skip("covered with one axis")
    torch.manual_seed(0)
    x0 = torch.randn(shape, dtype=torch.float64) * 2 + 0.5
    channels = tuple(shape[a] for a in axes)
    gamma = torch.randn(channels, dtype=torch.float64) + 1.5
    beta = torch.randn(channels, dtype=torch.float64)
    up = torch.randn(shape, dtype=torch.float64)
    mask = None
    if masked:
        mask = (torch.rand([1 if i in axes else s for i, s in enumerate(shape)]) > 0.3).double()
        mask = mask.squeeze(axes)
    try:
        force_backend("numba")
        ours = _step(x0, gamma, beta, up, axes, ghost, mask, activation, parameter)
        force_backend("torch")
        reference = _step(x0, gamma, beta, up, axes, ghost, mask, activation, parameter)
    finally:
        force_backend(None)
    assert ran == [True]  # the kernels ran the first step, torch ops the second
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * (1 + float(b.abs().max())))


def test_float32_matches_the_default_path():
    torch.manual_seed(1)
    x0 = torch.randn(16, 8, 12, 12) * 3 + 1
    up = torch.randn_like(x0)
    gamma0 = torch.rand(8) + 0.5
    results = []
    for memory in ("in_place", "default"):
        gamma = gamma0.clone().requires_grad_()
        leaf = x0.clone().requires_grad_()
        x = leaf * 1.0
        state = BatchNormStatistics(torch.zeros(8), torch.ones(8))
        y, _ = batch_norm(
            x, state, gamma, None, axis=1, training=True, activation="elu", memory=memory
        )
        (y * up).sum().backward()
        results.append((y.detach().clone(), leaf.grad, gamma.grad))
    (y_in_place, dx_in_place, dgamma_in_place), (y, dx, dgamma) = results
    torch.testing.assert_close(y_in_place, y, rtol=1e-5, atol=1e-5)
    # Sums over 18432 float32 values, recovered from y in one path and from x in the other.
    torch.testing.assert_close(dgamma_in_place, dgamma, rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(dx_in_place, dx, rtol=1e-3, atol=1e-5 * float(dx.abs().max()))


@pytest.mark.parametrize(("activation", "parameter"), ACTIVATIONS[1:])
@pytest.mark.parametrize(("shape", "axes"), [LAYOUTS[i] for i in (0, 1, 2, 4)])
@pytest.mark.parametrize("ghost", [None, 2])
def test_the_output_written_over_x_is_the_default_paths_output(
    activation, parameter, shape, axes, ghost, monkeypatch
):
    # One normalising pass, whether it writes a new tensor or over x (the kernel is told "over
    # x" rather than given x twice, which vectorises: see batchnorm.kernels.affine_normalize):
    # the same values to the bit (elu: see below), for rows, planes and several row blocks.
    ran = _record_kernel_runs(monkeypatch)
    torch.manual_seed(4)
    x0 = torch.randn(shape) * 3 + 1
    channels = tuple(shape[a] for a in axes)
    gamma, beta = torch.rand(channels) + 0.5, torch.randn(channels)
    up = torch.randn(shape)
    outputs = [
        _step(x0, gamma, beta, up, axes, ghost, None, activation, parameter, memory)[0]
        for memory in ("default", "in_place")
    ]
    assert ran == [True]  # the in-place step ran on the kernels
    if activation == "elu":
        # Under autograd the default path applies torch's elu after the kernel (expm1 rounded
        # by the C library, not by the kernels' own): within an ulp.
        torch.testing.assert_close(outputs[1], outputs[0], rtol=2**-23, atol=0)
    else:
        assert torch.equal(outputs[0], outputs[1])


def test_double_backward_is_refused_with_a_clear_error():
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    state = BatchNormStatistics(
        torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    )
    y, _ = batch_norm(x * 1.0, state, axis=-1, training=True, memory="in_place")
    with pytest.raises(RuntimeError, match=r"no double backward.*memory='default'"):
        torch.autograd.grad(y.square().sum(), x, create_graph=True)


def test_batched_backward_is_refused_with_a_clear_error():
    # torch.autograd.grad(is_grads_batched=True) hands the backward a batched gradient without
    # storage; the in-place backward has no torch-op version to send it to.
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    state = BatchNormStatistics(
        torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    )
    y, _ = batch_norm(x * 1.0, state, axis=-1, training=True, memory="in_place")
    upstream = torch.randn(4, 6, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"no batched backward.*memory='default'"):
        torch.autograd.grad(y, x, upstream, is_grads_batched=True)


def test_a_layout_the_kernels_cannot_view_is_written_in_place_by_torch_ops():
    # Channel axes 0 and 2 of a (C0, N, C2) tensor are not adjacent in memory: the kernels would
    # need a copy, so the torch-op version writes x itself.
    torch.manual_seed(3)
    x0 = torch.randn(3, 10, 4, dtype=torch.float64)
    state = BatchNormStatistics(
        torch.zeros(3, 4, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)
    )
    x = x0 * torch.ones((), dtype=torch.float64, requires_grad=True)
    y, _ = batch_norm(x, state, axis=[0, 2], training=True, memory="in_place")
    assert y.data_ptr() == x.data_ptr()
    expected, _ = batch_norm(x0, state, axis=[0, 2], training=True)
    torch.testing.assert_close(y, expected)


def test_an_input_its_producer_saved_is_refused_before_anything_changes():
    from batchnorm import BatchNormalization

    layer = BatchNormalization(3, axis=1, activation="leaky_relu", memory="in_place")
    a = torch.randn(4, 3, 5, 5, requires_grad=True)
    x = torch.sigmoid(a)  # SigmoidBackward keeps its output
    given, statistics = x.detach().clone(), layer.moving_mean.clone()
    with pytest.raises(ValueError, match=r"Received: x saved as SigmoidBackward0\.result"):
        layer(x, training=True)
    assert torch.equal(x, given) and torch.equal(layer.moving_mean, statistics)
    # A convolution keeps its input and weight, not its output: in place is fine after it.
    conv = torch.nn.Conv2d(3, 3, 1)
    layer(conv(a), training=True).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("view", ["unfold", "as_strided", "expand"])
def test_an_input_whose_elements_share_memory_is_refused_before_anything_changes(view):
    """Overlapping windows (unfold) were overwritten element by element: the output was off by
    up to 0.8 from memory='default''s, silently (torch's own in-place operators detect only an
    expanded dimension). Now every such view is refused with a clear error, nothing written."""
    from batchnorm import BatchNormalization

    layer = BatchNormalization(4, axis=-1, memory="in_place")
    storage = torch.randn(40) * 2 + 1
    if view == "unfold":
        x = storage.unfold(0, 4, 2)  # windows of 4 values, 2 apart: (19, 4) with strides (2, 1)
    elif view == "as_strided":
        x = storage.as_strided((8, 4), (1, 1))
    else:
        x = storage[:4].expand(8, 4)
    given, statistics = storage.clone(), layer.moving_mean.clone()
    with pytest.raises(ValueError, match=r"several elements share memory.*Received: x of shape"):
        layer(x, training=True)
    assert torch.equal(storage, given) and torch.equal(layer.moving_mean, statistics)
    # Windows that do not overlap are written in place, as the same values laid out anew.
    apart = storage.unfold(0, 4, 4)
    expected = BatchNormalization(axis=-1)(apart.clone(), training=True)
    y = layer(apart, training=True)
    assert y.data_ptr() == apart.data_ptr()
    torch.testing.assert_close(y, expected)


def test_elu_inverse_log1p_is_accurate_over_its_whole_range():
    # The in-place backward recovers elu's input with a log1p in vector code of its own (not the
    # C library's): within 3 ulp of NumPy's log1p from -1 + 1e-16 to -1e-300, -inf at -1, NaN
    # below -1 and for NaN, and 0 at 0.
    rng = np.random.default_rng(0)
    u = np.concatenate(
        [
            -rng.uniform(0, 1, 100_000),
            -(10.0 ** rng.uniform(-300, 0, 100_000)),
            -1 + 10.0 ** rng.uniform(-16, -0.3, 100_000),
            [-0.5, -0.5 - 2**-40, -0.5 + 2**-40, -1 + 2**-53],
        ]
    )
    out = np.empty_like(u)
    _log1p_each(u, out)
    expected = np.log1p(u)
    error = np.abs(out - expected) / np.spacing(np.abs(expected))
    assert error.max() <= 3.0, (error.max(), u[error.argmax()])
    special = np.array([-1.0, -1.0 - 2**-52, np.nan, 0.0, -0.0])
    out = np.empty_like(special)
    _log1p_each(special, out)
    assert out[0] == -np.inf and np.isnan(out[1]) and np.isnan(out[2])
    assert out[3] == 0.0 and out[4] == 0.0


@numba.njit(fastmath=FASTMATH, error_model="numpy")
def _log1p_each(u, out):  # type: ignore[no-untyped-def]
    for i in range(u.size):
        out[i] = log1p_nonpositive(u[i])
