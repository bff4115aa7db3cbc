"""Inputs that broke the CPU kernels' numerics (issue 12), against a float64 reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import BatchNormalization, kernels
from batchnorm.functional import force_backend, register_backend
from batchnorm.functional._cpu_backend import NUMBA_CPU
from batchnorm.kernels._statistics import STREAMED_RUN_BYTES
from tests.numpy_reference import reference_train_gradients
from tests.snippets import run_program


def _reference_moments(x: torch.Tensor, mask: torch.Tensor | None = None):
    x = x.double()
    w = torch.ones(x.shape[:-1], dtype=torch.float64) if mask is None else mask.double()
    w = w.unsqueeze(-1).expand_as(x)
    dims = tuple(range(x.ndim - 1))
    total = w.sum(dims)
    mean = (w * x).sum(dims) / total
    variance = (w * (x - mean) ** 2).sum(dims) / total
    return mean, variance


def _train_once(x: torch.Tensor, mask: torch.Tensor | None = None) -> BatchNormalization:
    layer = BatchNormalization(x.shape[-1], fused=False, momentum=0.0)
    layer(x, training=True, mask=mask)
    return layer


def test_masked_padding_far_from_the_data_does_not_shift_the_statistics():
    torch.manual_seed(0)
    x = torch.randn(16, 50, 8)
    mask = torch.ones(16, 50)
    mask[0, :3] = 0
    mask[:, 40:] = 0
    x[mask == 0] = -1e4
    layer = _train_once(x, mask)
    mean, variance = _reference_moments(x, mask)
    torch.testing.assert_close(layer.moving_mean.double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.moving_variance.double(), variance, rtol=1e-6, atol=0)


@pytest.mark.parametrize("shape", [(4099, 16), (33007, 16), (64, 9, 4, 8)])
def test_inf_and_nan_at_masked_positions_change_no_statistic(shape):
    # A Keras mask on channels-last data: the kernels read four rows at a time, and a row of
    # weight 0 must add exactly nothing whatever it holds, also beside rows that count.
    torch.manual_seed(1)
    x = torch.randn(shape) * 2 + 3
    mask = torch.rand(shape[:-1]) > 0.25
    padded = {}
    for name, value in (("zero", 0.0), ("inf", float("inf")), ("nan", float("nan"))):
        layer = _train_once(x.masked_fill(~mask.unsqueeze(-1), value), mask)
        padded[name] = (layer.moving_mean, layer.moving_variance)
    for name in ("inf", "nan"):
        assert torch.equal(padded[name][0], padded["zero"][0]), name
        assert torch.equal(padded[name][1], padded["zero"][1]), name
    mean, variance = _reference_moments(x, mask)
    torch.testing.assert_close(padded["zero"][0].double(), mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(padded["zero"][1].double(), variance, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize(("shape", "axis"), [((6, 3, 7, 5), 1), ((64, 9, 4, 8), -1)])
def test_inf_and_nan_at_masked_positions_change_no_statistic_in_any_layout(shape, axis, backend):
    # Channel planes and the composed torch ops summed 0 * v: NaN for inf or NaN padding, in
    # the moving statistics from then on, where the rows kernels selected such values to 0.
    torch.manual_seed(3)
    x = torch.randn(shape) * 2 + 3
    channel = axis % x.ndim
    mask = torch.rand([s for i, s in enumerate(shape) if i != channel]) > 0.25
    positions = mask.unsqueeze(channel).expand_as(x)
    force_backend(backend)
    try:
        for value in (float("inf"), float("nan")):
            layer = BatchNormalization(shape[axis], axis=axis, fused=False, momentum=0.0)
            layer(x.masked_fill(~positions, value), training=True, mask=mask)
            kept = x.movedim(channel, -1)[positions.movedim(channel, -1)].reshape(-1, shape[axis])
            mean, variance = _reference_moments(kept)
            torch.testing.assert_close(layer.moving_mean.double(), mean, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(layer.moving_variance.double(), variance, rtol=1e-6, atol=0)
    finally:
        force_backend(None)


@pytest.mark.parametrize("shape", [(1000, 8), (10, 8, 8, 4)])
def test_float32_values_near_3e18_do_not_overflow_the_variance(shape):
    torch.manual_seed(1)
    x = torch.randn(*shape) * 3e18
    layer = _train_once(x)
    _, variance = _reference_moments(x)
    assert torch.isfinite(layer.moving_variance).all()
    torch.testing.assert_close(layer.moving_variance.double(), variance, rtol=1e-5, atol=0)


def test_an_outlier_in_the_first_row_keeps_the_variance_accurate():
    torch.manual_seed(2)
    x = torch.randn(100000, 8)
    x[0] = 1000
    layer = _train_once(x)
    _, variance = _reference_moments(x)
    relative = ((layer.moving_variance.double() - variance) / variance).abs().max()
    assert relative < 1e-6


def test_tensor_training_flag_backward_through_the_layer():
    torch.manual_seed(3)
    layer = BatchNormalization(8, fused=False)
    x = torch.randn(4, 8, requires_grad=True)
    layer(x, training=torch.tensor(True)).pow(2).sum().backward()
    plain = BatchNormalization(8, fused=False)
    x2 = x.detach().clone().requires_grad_()
    plain(x2, training=True).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.moving_mean, plain.moving_mean)


@pytest.mark.parametrize("flag", [True, False])
def test_an_eager_cpu_tensor_flag_runs_one_branch_like_a_bool(flag):
    # Read as a bool, as tf's smart_cond reads an eager tensor: the same output, gradients and
    # buffers as the bool to the bit, and memory="in_place" (which refuses a flag that computes
    # both branches, as both would read x) accepts it.
    torch.manual_seed(5)
    x0 = torch.randn(6, 3, 5) * 2 + 1
    results = []
    for training in (torch.tensor(flag), flag):
        layer = BatchNormalization(3, axis=1, activation="leaky_relu", memory="in_place")
        layer.moving_mean.fill_(0.5)
        source = x0.clone().requires_grad_()
        y = layer(source * 1.0, training=training)
        y.square().sum().backward()
        results.append((y.detach(), source.grad, layer.gamma.grad, *layer.buffers()))
    for from_tensor, from_bool in zip(*results, strict=True):
        assert torch.equal(from_tensor, from_bool)


# Inductor's own import of torch.jit warns (torch 2.13), not our code.
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_tensor_training_flag_backward_under_torch_compile(backend):
    torch.manual_seed(3)
    layer = BatchNormalization(8, fused=False)
    x = torch.randn(4, 8, requires_grad=True)
    step = torch.compile(lambda x, flag: layer(x, training=flag), backend=backend)
    step(x, torch.tensor(True)).pow(2).sum().backward()
    plain = BatchNormalization(8, fused=False)
    x2 = x.detach().clone().requires_grad_()
    plain(x2, training=True).pow(2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(layer.moving_mean, plain.moving_mean)


# Channels-last rows of 128 float32 channels in 16 row blocks of 2305 rows: each block's dy and
# x take more than kernels._statistics.STREAMED_RUN_BYTES, so the gradient sums add two rows
# per update (the runs that fit the caches add four, as every other test's do).
STREAMED_ROWS_SHAPE = (36871, 128)


def test_long_channels_last_blocks_give_the_float64_gradients():
    rows, channels = STREAMED_ROWS_SHAPE
    blocks = kernels.blocks_for(rows * channels, rows, 1)
    assert rows // blocks * 2 * channels * 4 > STREAMED_RUN_BYTES  # the streamed loop runs
    rng = np.random.default_rng(7)
    x = (rng.normal(size=STREAMED_ROWS_SHAPE) * 3 + 5).astype(np.float32)
    upstream = rng.normal(size=STREAMED_ROWS_SHAPE).astype(np.float32)
    gamma = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    layer = BatchNormalization(channels, fused=False)
    with torch.no_grad():
        layer.gamma.copy_(torch.from_numpy(gamma))
    x_grad = torch.from_numpy(x).requires_grad_()
    layer(x_grad, training=True).backward(torch.from_numpy(upstream))
    options = {"axes": (1,), "epsilon": layer.epsilon}
    expected = reference_train_gradients(x, upstream, gamma, **options)
    sizes = reference_train_gradients(x, upstream, gamma, magnitudes=True, **options)
    actual = (x_grad.grad, layer.gamma.grad, layer.beta.grad)
    names = ("dx", "dgamma", "dbeta")
    for name, value, wanted, size in zip(names, actual, expected, sizes, strict=True):
        error = np.abs(value.numpy().astype(np.float64) - wanted)
        # a few float32 roundings of the size of what each result is computed from
        assert np.all(error <= 1e-5 * size), (name, (error / size).max())


@pytest.mark.parametrize("shape, axis", [((1, 8), -1), ((1, 4, 1, 1), 1)])
def test_one_value_per_channel_gives_beta_and_an_exactly_zero_input_gradient(shape, axis):
    torch.manual_seed(4)
    layer = BatchNormalization(shape[axis], axis=axis, fused=False)
    with torch.no_grad():
        layer.gamma.uniform_(1, 2)
        layer.beta.normal_()
    x = torch.randn(*shape, requires_grad=True)
    y = layer(x, training=True)
    view = [shape[i] if i == axis % len(shape) else 1 for i in range(len(shape))]
    torch.testing.assert_close(y, layer.beta.detach().reshape(view).expand(shape))
    y.mul(torch.randn(shape)).sum().backward()
    assert torch.equal(x.grad, torch.zeros(shape))


@pytest.mark.parametrize("backend", ["numba", "torch ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape, axis", [((8, 3), -1), ((6, 4, 1, 1), 1), ((6, 1, 1, 4), -1)])
def test_ghost_batches_of_one_sample_give_beta_and_an_exactly_zero_gradient(
    backend, dtype, shape, axis
):
    # virtual_batch_size=1: every ghost batch holds one value per channel. The kernels shifted
    # each channel by the whole batch's first value, so a sample far from it left rounding in its
    # variance (1.1e4 instead of 0 for float64 values near 1e10) and in its output and gradients.
    torch.manual_seed(6)
    channels = shape[axis]
    x = (torch.randn(shape, dtype=dtype) * 1e10 + 1e10).requires_grad_()
    layer = BatchNormalization(
        channels, axis=axis, virtual_batch_size=1, momentum=0.0, fused=False, dtype=dtype
    )
    with torch.no_grad():
        layer.gamma.uniform_(1, 2)
        layer.beta.normal_()
    if backend == "torch ops":
        register_backend("cpu", None)
    try:
        y = layer(x, training=True)
        y.mul(torch.randn(shape, dtype=dtype)).sum().backward()
    finally:
        register_backend("cpu", NUMBA_CPU)
    view = [channels if i == axis % len(shape) else 1 for i in range(len(shape))]
    assert torch.equal(y, layer.beta.detach().reshape(view).expand(shape))
    assert torch.equal(layer.moving_variance, torch.zeros(channels, dtype=dtype))
    assert torch.equal(x.grad, torch.zeros(shape, dtype=dtype))
    assert torch.equal(layer.gamma.grad, torch.zeros(channels, dtype=dtype))


@pytest.mark.parametrize("shape, axis", [((64, 8), -1), ((16, 4, 5, 6), 1), ((16, 5, 6, 4), -1)])
def test_ghost_batches_far_apart_keep_the_variance_accurate(shape, axis):
    # Four ghost batches at offsets 1e5 apart with unit spread: each is shifted by its own
    # first sample (the whole batch's first one cost the variance 7.6e-6 relative error).
    torch.manual_seed(7)
    x = torch.randn(shape)
    for ghost, offset in enumerate((0.0, 1e5, -1e5, 3e5)):
        x[ghost::4] += offset  # sample o is in ghost batch o % 4
    layer = BatchNormalization(
        shape[axis], axis=axis, virtual_batch_size=shape[0] // 4, momentum=0.0, fused=False
    )
    with torch.no_grad():
        layer(x, training=True)
    x64 = x.double().movedim(axis, -1)
    variance = torch.stack(
        [x64[g::4].reshape(-1, shape[axis]).var(0, unbiased=False) for g in range(4)]
    ).mean(0)
    torch.testing.assert_close(layer.moving_variance.double(), variance, rtol=1e-6, atol=0)


def test_float32_values_near_3e18_keep_the_gamma_gradient():
    torch.manual_seed(5)
    x = torch.randn(1000, 8) * 3e18
    upstream = torch.randn(1000, 8)
    layer = BatchNormalization(8, fused=False, epsilon=1e-5)
    layer(x, training=True).mul(upstream).sum().backward()
    reference = torch.nn.BatchNorm1d(8, eps=1e-5).double()
    reference(x.double()).mul(upstream.double()).sum().backward()
    assert layer.gamma.grad.abs().min() > 0
    torch.testing.assert_close(
        layer.gamma.grad.double(), reference.weight.grad, rtol=1e-4, atol=1e-3
    )


@pytest.mark.parametrize("masked", [True, False])
def test_composed_path_keeps_the_variance_exact_when_the_mean_rounds_in_float32(masked):
    # |mean| / std ~ 1e6: the float32 mean is off by up to half an ulp (0.03 std), which centring
    # on it alone added to the variance (1e-2 relative). A Keras-shaped mask (x without its last
    # axis) with channel axis 1 takes the composed torch-op path; unmasked, it is forced there.
    torch.manual_seed(0)
    x = (1e6 + torch.randn(8, 4, 30, dtype=torch.float64)).float()
    mask = (torch.rand(8, 4) > 0.3).float() if masked else None
    layer = BatchNormalization(4, axis=1, fused=False, momentum=0.0)
    register_backend("cpu", None)
    try:
        layer(x, training=True, mask=mask)
    finally:
        register_backend("cpu", NUMBA_CPU)
    xd = x.double()
    w = torch.ones(8, 4, 30, dtype=torch.float64) if mask is None else mask.double()[..., None]
    w = w.expand_as(xd)
    mean = (w * xd).sum((0, 2)) / w.sum((0, 2))
    variance = (w * (xd - mean[None, :, None]) ** 2).sum((0, 2)) / w.sum((0, 2))
    torch.testing.assert_close(layer.moving_variance.double(), variance, rtol=1e-6, atol=0)
    # The stored mean is float32: one rounding of the float64 mean (half an ulp of 1e6).
    torch.testing.assert_close(layer.moving_mean.double(), mean, rtol=0, atol=0.0313)


def _assert_one_and_two_threads_agree(x, axis, mask=None):
    """One training step and backward, then an inference call and its backward (the layer's
    statistics fixed, gamma and beta learning), on 1 and on 2 threads: the same bits."""
    upstream = torch.randn(x.shape).to(x.dtype)

    def run(threads: int):
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            layer = BatchNormalization(x.shape[axis], axis=axis, momentum=0.5, dtype=x.dtype)
            x_grad = x.clone().requires_grad_()
            y = layer(x_grad, training=True, mask=mask)
            y.backward(upstream)
            trained = (y, x_grad.grad, layer.gamma.grad.clone(), layer.moving_variance)
            layer.gamma.grad = layer.beta.grad = None
            x_inference = x.clone().requires_grad_()
            layer(x_inference, training=False, mask=mask).backward(upstream)
            return (*trained, x_inference.grad, layer.gamma.grad, layer.beta.grad)
        finally:
            torch.set_num_threads(previous)

    for one, two in zip(run(1), run(2), strict=True):
        assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((33007, 16), -1),
        ((33007, 5), -1),
        ((37, 16, 29, 31), 1),
        ((6, 32771), -1),
        ((61, 1001), -1),
        (STREAMED_ROWS_SHAPE, -1),
    ],
)
def test_results_are_bit_identical_for_one_and_two_threads(shape, axis, dtype):
    # Row blocks come from the shape, and their partial sums are added in block order: the
    # threaded build over 2 threads and the serial build give the same bits. The shapes do not
    # divide into the blocks evenly; float64 shows any change in the order of the float64 sums.
    # (6, 32771): one block for the reducing passes, two of three rows for inference's;
    # (61, 1001): two blocks (31 and 30 rows) for the reducing passes and for an inference
    # forward whose backward follows, one for inference alone. STREAMED_ROWS_SHAPE: gradient
    # sums two rows per update.
    torch.manual_seed(0)
    _assert_one_and_two_threads_agree((torch.randn(shape) * 3 + 5).to(dtype), axis)


@pytest.mark.parametrize("threads", [1, 2])
def test_wide_short_batches_normalise_every_row_in_finer_blocks(threads):
    # Inference's normalising pass keeps no partial sums, so it splits the rows of a wide, short
    # batch into blocks the reducing passes do not take (kernels.blocks_for): every row of every
    # block, the odd one of each block included, against the float64 formula.
    torch.manual_seed(4)
    shape = (7, 40009)  # four blocks (one and two rows) for inference, one for the rest
    x = torch.randn(shape) * 2 + 1
    layer = BatchNormalization(shape[1], momentum=0.0)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        layer(x, training=True)
        y = layer(x, training=False)
    finally:
        torch.set_num_threads(previous)
    mean, variance = layer.moving_mean.double(), layer.moving_variance.double()
    expected = (x.double() - mean) / torch.sqrt(variance + layer.epsilon) * layer.gamma.double()
    expected += layer.beta.double()
    torch.testing.assert_close(y.double(), expected, rtol=4e-7, atol=4e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_results_are_bit_identical_for_one_and_two_threads(dtype):
    # The same with a Keras mask (one weight per row), whose rows of weight 0 sit among the
    # four rows the kernels read at a time.
    torch.manual_seed(0)
    x = (torch.randn(33007, 16) * 3 + 5).to(dtype)
    _assert_one_and_two_threads_agree(x, -1, mask=torch.rand(33007) > 0.25)


def test_a_threaded_call_keeps_torchs_thread_count():
    # Numba's OpenMP pool, started by the first threaded call, set the process's OpenMP thread
    # count back to every core: torch.set_num_threads(1) was undone, for torch's own operators
    # and for every later kernel call. A fresh process, where the pool has not started yet.
    program = (
        "import torch\n"
        "from batchnorm import BatchNormalization\n"
        "torch.set_num_threads(1)\n"
        "layer = BatchNormalization(64)\n"
        "x = torch.randn(8192, 64, requires_grad=True)\n"
        "layer(x, training=True).sum().backward()\n"
        "layer(x, training=False)\n"
        "print(torch.get_num_threads())\n"
    )
    result = run_program(program)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["1"]


@pytest.mark.parametrize("layout", ["rows", "planes"])
def test_a_zero_divisor_in_a_kernel_gives_nan_as_torch_does(layout):
    """The kernels compile with NumPy's error model: ``1 / sqrt(variance + epsilon)`` with both 0
    gives inf, and the normalised zero NaN, as torch's own batch norm; Python's model raised
    ZeroDivisionError (and kept every per-channel loop with a division scalar). Reached only by
    calling a kernel directly: the layer and the functional API require ``epsilon > 0``."""
    shape = (4, 3, 1) if layout == "rows" else (4, 3, 5)
    x = np.zeros(shape, np.float32)
    statistic = np.zeros((1, 3))
    out = np.empty_like(x)
    scale, offset = np.ones(3, np.float32), np.zeros(3, np.float32)
    kernels.affine_normalize.serial(
        x, statistic, statistic, scale, offset, 0.0, 1, 4, 1, out, None, 1.0
    )
    expected = torch.nn.functional.batch_norm(
        torch.from_numpy(x), torch.zeros(3), torch.zeros(3), torch.ones(3), torch.zeros(3), eps=0.0
    )
    assert torch.isnan(expected).all()
    assert np.isnan(out).all()


def test_row_blocks_partition_the_rows():
    """Every block's (start, stop) has start <= stop, and the blocks cover each row once: for
    130 rows in 16 blocks of 9, block 15 was (135, 130)."""
    from batchnorm.kernels._jit import block_rows

    for blocks in (1, 2, 3, 16):
        for rows in range(1, 300):
            covered = []
            for block in range(blocks):
                start, stop = block_rows(rows, blocks, block)
                assert 0 <= start <= stop <= rows
                covered.extend(range(start, stop))
            assert covered == list(range(rows)), (rows, blocks)


def test_sixteen_row_blocks_with_empty_last_blocks_count_each_row_once():
    """(130, 8192) channels last takes 16 row blocks of 9 rows, the last one empty: the helpers
    that split a block in halves or quarters ran their remainder loop backwards over the last
    rows. Masked statistics (variance 12% off), inference and activated gradient sums (dbeta
    3.5-12%) and the in-place output (row 129) were wrong, the same with 1 and 2 threads."""
    torch.manual_seed(0)
    rows, channels = 130, 8192
    x, dy = torch.randn(rows, channels), torch.randn(rows, channels)
    xd = x.double()
    mean, variance = xd.mean(0), xd.var(0, unbiased=False)
    z = (xd - mean) / (variance + 1e-3).sqrt()

    masked = BatchNormalization(channels, momentum=0.0)
    masked(x, training=True, mask=torch.ones(rows))
    torch.testing.assert_close(masked.moving_variance.double(), variance, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(masked.moving_mean.double(), mean, rtol=1e-5, atol=1e-6)

    frozen = BatchNormalization(channels)
    frozen(x.clone().requires_grad_(), training=False).backward(dy)
    torch.testing.assert_close(frozen.beta.grad.double(), dy.double().sum(0), rtol=1e-5, atol=1e-4)

    activated = BatchNormalization(channels, momentum=0.0, activation="leaky_relu")
    activated(x.clone().requires_grad_(), training=True).backward(dy)
    expected = (dy.double() * torch.where(z > 0, 1.0, 0.01)).sum(0)
    torch.testing.assert_close(activated.beta.grad.double(), expected, rtol=1e-4, atol=1e-3)

    in_place = BatchNormalization(channels, momentum=0.0, memory="in_place")
    y = in_place(x * 1.0, training=True)
    torch.testing.assert_close(y.double(), z, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scale", [1e100, 1e110, 1e150])
def test_float64_input_gradients_of_the_composed_ops_at_a_huge_spread(scale):
    """torch's rsqrt backward cubes rsqrt(v): at a float64 variance above 1e206 that underflowed
    to 0 and the variance's share of dx was lost (10-24% off). A Keras mask with the channel axis
    not last takes the composed ops; the reference is the float64 formula (and torch's own)."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 16, dtype=torch.float64) * scale
    dy = torch.randn(8, 4, 16, dtype=torch.float64)
    layer = BatchNormalization(4, axis=1, momentum=0.0, fused=False, dtype=torch.float64)
    source = x.clone().requires_grad_()
    layer(source, training=True, mask=torch.ones(8, 4, dtype=torch.bool)).backward(dy)
    expected, _, _ = reference_train_gradients(x.numpy(), dy.numpy(), None, axes=(1,), epsilon=1e-3)
    np.testing.assert_allclose(
        source.grad.numpy(), expected, rtol=0, atol=1e-12 * np.abs(expected).max()
    )
