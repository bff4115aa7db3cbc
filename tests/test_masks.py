"""Masks: what is accepted as weights, and masks that leave channels without any sample."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import BatchNormalization
from batchnorm.functional import BatchNormStatistics, batch_norm, moments
from tests.backends import torch_ops_and_kernels
from tests.numpy_reference import reference_train_step


def _layer_state(layer: BatchNormalization) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in layer.state_dict().items()}


def _assert_state_equal(before: dict[str, torch.Tensor], layer: BatchNormalization) -> None:
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        ([1.0] * 8, TypeError, r"`mask` must be a torch.Tensor .* Received: mask of type list"),
        (np.ones(8), TypeError, r"`mask` must be a torch.Tensor .* Received: mask of type ndarray"),
        (
            torch.ones(8, dtype=torch.complex64),
            TypeError,
            r"`mask` must hold real weights .* Received: mask.dtype=torch.complex64",
        ),
        (
            torch.tensor([1.0, float("nan"), 1, 1, 1, 1, 1, 1]),
            ValueError,
            r"`mask` must hold finite weights >= 0 .* Received: a mask with NaN values",
        ),
        (
            torch.tensor([1.0, -1, 1, 1, 1, 1, 1, float("inf")]),
            ValueError,
            r"Received: a mask with negative and infinite values",
        ),
        (
            torch.ones(8, device="meta"),
            ValueError,
            r"`mask` must be on the device of `x` .* Received: mask.device=meta for x.device=cpu",
        ),
    ],
)
@pytest.mark.parametrize("fused", [False, None])
def test_bad_masks_raise_and_change_nothing(mask, error, match, fused):
    layer = BatchNormalization(3, fused=fused, moving_average="debiased")
    layer(torch.randn(8, 3), training=True)
    before = _layer_state(layer)
    with pytest.raises(error, match=match):
        layer(torch.randn(8, 3) + 5, training=True, mask=mask)
    _assert_state_equal(before, layer)


def test_functional_moments_checks_mask_values():
    with pytest.raises(ValueError, match=r"Received: a mask with negative values"):
        moments(torch.randn(4, 3), [0], mask=-torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"Received: mask.device=meta for x.device=cpu"):
        moments(torch.randn(4, 3), [0], mask=torch.ones(4, 1, device="meta"))


@pytest.mark.parametrize("moving_average", ["ema", "debiased"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_all_zero_mask_leaves_moving_statistics_unchanged(moving_average, dtype):
    # As an empty batch: nothing was seen, so nothing is averaged in (not 0 / 0 = 0).
    layer = BatchNormalization(4, fused=False, moving_average=moving_average, dtype=dtype)
    layer(torch.randn(16, 4, dtype=dtype) * 3 + 2, training=True)
    before = _layer_state(layer)
    for mask in (torch.zeros(16), torch.zeros(16, dtype=torch.bool)):
        for _ in range(2):  # the second call takes the layer's direct path on CPU
            y = layer(torch.randn(16, 4, dtype=dtype), training=True, mask=mask)
            assert torch.isfinite(y).all()
            _assert_state_equal(before, layer)


def test_all_zero_mask_through_the_functional_core():
    statistics = BatchNormStatistics(torch.full((3,), 0.5), torch.full((3,), 2.0))
    _, new = batch_norm(
        torch.randn(6, 5, 3), statistics, training=True, mask=torch.zeros(6, 5), momentum=0.5
    )
    assert torch.equal(new.moving_mean, statistics.moving_mean)
    assert torch.equal(new.moving_variance, statistics.moving_variance)


def test_a_channel_masked_out_entirely_keeps_its_statistics():
    # Keras' mask broadcasts along the last axis: with the channel axis first, a mask row of
    # zeros for channel 1 leaves that channel without samples, while the others update.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 4)) * 2 + 1
    mask = (rng.random((5, 3)) > 0.3).astype(np.float64)
    mask[:, 1] = 0.0
    layer = BatchNormalization(3, axis=1, momentum=0.75, fused=False, dtype="float64")
    with torch.no_grad():
        layer.moving_mean.fill_(0.25)
        layer.moving_variance.fill_(4.0)
    layer(torch.tensor(x), training=True, mask=torch.tensor(mask))
    weights = np.broadcast_to(mask[:, :, None], x.shape)
    for channel in (0, 2):
        w = weights[:, channel]
        mean = (w * x[:, channel]).sum() / w.sum()
        variance = (w * (x[:, channel] - mean) ** 2).sum() / w.sum()
        assert layer.moving_mean[channel].item() == pytest.approx(0.75 * 0.25 + 0.25 * mean)
        assert layer.moving_variance[channel].item() == pytest.approx(0.75 * 4.0 + 0.25 * variance)
    assert layer.moving_mean[1].item() == 0.25
    assert layer.moving_variance[1].item() == 4.0


def test_partial_masks_still_match_the_float64_reference():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((12, 4)) * 3 + 5
    weights = (rng.random(12) > 0.4).astype(np.float64)
    layer = BatchNormalization(4, momentum=0.9, fused=False, dtype="float64")
    y = layer(torch.tensor(x), training=True, mask=torch.tensor(weights))
    expected_y, expected_mean, expected_variance = reference_train_step(
        x,
        np.zeros(4),
        np.ones(4),
        None,
        None,
        axes=(1,),
        momentum=0.9,
        epsilon=1e-3,
        weights=weights[:, None],
    )
    np.testing.assert_allclose(y.detach().numpy(), expected_y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected_mean, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected_variance, rtol=1e-12)


@pytest.mark.parametrize("ghost", [None, 2])
def test_unbiased_moving_variance_with_a_weight_count_between_one_and_two(ghost):
    """n / (n - 1) for a weighted count n in (1, 2): the torch-op step clamped n - 1 to 1, so
    the factor was n (0.4286 stored where the kernels and the formula give 0.5714)."""
    if ghost is None:
        x = torch.tensor([[0.0], [1.0], [5.0]], dtype=torch.float64)
        mask = torch.tensor([1.0, 0.75, 0.0], dtype=torch.float64)
    else:  # ghost counts 2, 2, 2, 1: their mean is 1.75
        x = torch.arange(16, dtype=torch.float64).reshape(8, 2) ** 1.5
        mask = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.float64)

    def run() -> list[torch.Tensor]:
        layer = BatchNormalization(
            axis=-1,
            momentum=0.0,
            moving_variance_estimator="unbiased",
            virtual_batch_size=ghost,
            dtype="float64",
        )
        layer(x, training=True, mask=mask)
        return [layer.moving_variance]

    torch_ops, kernels = torch_ops_and_kernels(run)
    groups = 1 if ghost is None else x.shape[0] // ghost
    weights = mask.numpy().reshape(-1, groups).T if ghost else mask.numpy()[None]
    values = (
        x.numpy().reshape(-1, groups, x.shape[1]).transpose(1, 0, 2) if ghost else x.numpy()[None]
    )
    variances, counts = [], []
    for w, v in zip(weights, values, strict=True):
        mean = (w[:, None] * v).sum(0) / w.sum()
        variances.append((w[:, None] * (v - mean) ** 2).sum(0) / w.sum())
        counts.append(w.sum())
    count = np.mean(counts)
    expected = np.mean(variances, axis=0) * count / (count - 1)
    for result in (torch_ops, kernels):
        np.testing.assert_allclose(result[0].numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize(("shape", "axis"), [((4, 5, 3), -1), ((4, 3, 5), 1), ((6, 3), -1)])
def test_a_mask_that_requires_grad_is_differentiated_as_tf_keras_does(shape, axis):
    """tf-keras differentiates the batch statistics with respect to the mask's weights
    (tf.nn.weighted_moments); the CPU kernels read them as constants, so a float mask that
    requires grad got None (axis=-1, per-position masks) while the composed ops differentiated
    it. Now such a mask takes the composed ops, on the layer's first and repeated calls; checked
    against autograd through the weighted-moments formula in float64."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    mask = (torch.rand(shape[:-1], dtype=torch.float64) + 0.2).requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    channels = shape[axis]
    layer = BatchNormalization(channels, axis=axis, dtype="float64")
    for _ in range(2):  # the first call and the layer's repeated-call shortcut
        mask.grad = None
        (layer(x, training=True, mask=mask) * dy).sum().backward()
        ours = mask.grad
        assert ours is not None

        reference_mask = mask.detach().clone().requires_grad_()
        weights = reference_mask.unsqueeze(-1).expand(shape)  # Keras: broadcast along the last axis
        dims = [d for d in range(len(shape)) if d != axis % len(shape)]
        total = weights.sum(dims, keepdim=True)
        mean = (weights * x).sum(dims, keepdim=True) / total
        variance = (weights * (x - mean) ** 2).sum(dims, keepdim=True) / total
        y = (x - mean) / torch.sqrt(variance + 1e-3)
        (y * dy).sum().backward()
        torch.testing.assert_close(ours, reference_mask.grad, rtol=1e-10, atol=1e-12)


def test_a_mask_that_requires_grad_under_no_grad_takes_the_kernels():
    layer = BatchNormalization(3, fused=False)
    x, mask = torch.randn(8, 3), torch.rand(8).requires_grad_()
    with torch.no_grad():
        y = layer(x, training=True, mask=mask)
    assert not y.requires_grad


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1.0], [0.0], [1.0], [0.5]]),  # per sequence: (N, 1)
        torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0]),  # per step, shared by the batch: (L,)
        torch.tensor(1.0),
        torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.25]]),  # (1, L)
    ],
)
def test_a_mask_that_broadcasts_to_keras_shape_is_taken_as_tf_keras_takes_it(mask, axis):
    """tf-keras takes any mask broadcastable to x after its expand_dims(mask, -1): a (N, 1)
    per-sequence mask of (N, L, C) data was refused here. It gives the same as the mask
    expanded to x's shape without its last axis."""
    torch.manual_seed(0)
    x = torch.randn(4, 5, 5) * 2 + 1
    channels = x.shape[axis]
    layer = BatchNormalization(channels, axis=axis, fused=False)
    expected_layer = BatchNormalization(channels, axis=axis, fused=False)
    y = layer(x, training=True, mask=mask)
    expected = expected_layer(x, training=True, mask=mask.expand(4, 5))
    torch.testing.assert_close(y, expected)
    torch.testing.assert_close(layer.moving_mean, expected_layer.moving_mean)
    torch.testing.assert_close(layer.moving_variance, expected_layer.moving_variance)


def test_a_mask_that_broadcasts_to_nothing_is_refused():
    with pytest.raises(ValueError, match=r"or one that broadcasts to \(4, 5\)"):
        BatchNormalization(3, fused=False)(torch.randn(4, 5, 3), training=True, mask=torch.ones(3))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("path", ["keras mask, channels first", "adjustment inside channels"])
def test_half_precision_input_gradient_on_the_composed_ops_is_rounded_once(dtype, path):
    """The composed ops (Keras masks with the channel axis not last, adjustments varying inside
    a channel) upcast x in each pass; under autograd each cast rounded its share of dx to half
    precision before the shares were added: bfloat16 dx 3.8e-2 off relative to its largest
    value, float16 6.4e-3. Now within one rounding of half precision (float32 arithmetic)."""
    if path == "keras mask, channels first":
        kwargs, call = {}, {"mask": torch.ones(2, 8)}
    else:
        kwargs = {"adjustment": lambda shape: (torch.tensor([[[0.5]], [[2.0]]]), torch.zeros(1))}
        call = {}

    def input_gradient(x, dy, layer_dtype):
        layer = BatchNormalization(8, axis=1, fused=False, dtype=layer_dtype, **kwargs)
        x = x.detach().requires_grad_()
        (layer(x, training=True, **call).double() * dy).sum().backward()
        return x.grad.double()

    errors = []
    for seed in range(8):
        generator = torch.Generator().manual_seed(seed)
        # two values a channel (after global pooling, say): dx's terms cancel
        x = (torch.randn(2, 8, 1, generator=generator) * 2 + 3).to(dtype)
        # the upstream gradient as it reaches a half-precision output
        dy = torch.randn(2, 8, 1, generator=generator).to(dtype).double()
        ours = input_gradient(x, dy, "float32")
        reference = input_gradient(x.double(), dy, "float64")
        errors.append(float((ours - reference).abs().max() / reference.abs().max()))
    assert max(errors) <= torch.finfo(dtype).eps


@pytest.mark.parametrize("where", ["fake", "meta"])
def test_a_float_mask_propagates_shapes_under_fake_tensors_and_on_meta(where):
    """The mask's value check read a fake or meta tensor's values: a float mask failed under
    FakeTensorMode (DataDependentOutputException) and on the meta device (.item()); a bool
    mask, or none, propagated shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    def run():
        layer = BatchNormalization(3, fused=False)
        x, mask = torch.randn(4, 5, 3), torch.rand(4, 5)
        return layer(x, training=True, mask=mask)

    if where == "fake":
        with FakeTensorMode():
            y = run()
    else:
        with torch.device("meta"):
            y = run()
        assert y.is_meta
    assert y.shape == (4, 5, 3)


@pytest.mark.parametrize("offset", [1e4, 1e6])
def test_float_mask_weights_on_the_composed_ops_follow_the_float64_formula(offset):
    torch.manual_seed(0)
    x = torch.randn(8, 4, 16) + offset
    # NCL with axis=1: Keras' mask has the shape of x without its last axis, (N, C), and weighs
    # (sample, channel) positions, which only the composed ops take.
    weights = torch.rand(8, 4) * 0.9 + 0.1
    layer = BatchNormalization(4, axis=1, momentum=0.0)
    y = layer(x, training=True, mask=weights)
    wide = x.double()
    w = weights.double()[:, :, None].expand(8, 4, 16)
    total = w.sum((0, 2), keepdim=True)
    mean = (w * wide).sum((0, 2), keepdim=True) / total
    variance = (w * (wide - mean) ** 2).sum((0, 2), keepdim=True) / total
    expected = (wide - mean) / torch.sqrt(variance + layer.epsilon)
    # Each w * x was rounded to float32 before the float64 sum: 6.6e-3 off at 1e6.
    torch.testing.assert_close(y.double(), expected, rtol=0, atol=2e-6)


# ------------------------------------------------ Keras 3: no fused path, the mask cast to bool
def _keras3_masked_step(x, mask, axis, *, momentum, epsilon):
    """Keras 3.15.1's masked training step, written plainly in float64 from its source
    (keras/src/layers/normalization/batch_normalization.py, ``call`` and ``_moments``): the mask
    gets a last axis, is broadcast to x's shape and cast to bool; the moments are taken over
    the positions it keeps, dividing by their count plus ``backend.epsilon()`` (1e-7); the
    moving statistics start at 0 and 1 and take the biased variance. Returns y (gamma 1, beta
    0), moving_mean, moving_variance."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    keep = np.broadcast_to(np.asarray(mask)[..., None], x.shape).astype(bool)
    reduce = tuple(i for i in range(x.ndim) if i != axis)
    count = keep.sum(axis=reduce, keepdims=True).astype(np.float64)
    mean = np.where(keep, x, 0.0).sum(axis=reduce, keepdims=True) / (count + 1e-7)
    variance = np.where(keep, x - mean, 0.0) ** 2
    variance = variance.sum(axis=reduce, keepdims=True) / (count + 1e-7)
    y = (x - mean) / np.sqrt(variance + epsilon)
    moving_mean = momentum * 0.0 + (1 - momentum) * mean.reshape(-1)
    moving_variance = momentum * 1.0 + (1 - momentum) * variance.reshape(-1)
    return y, moving_mean, moving_variance


def _keras_mask(shape, seed, values=(0.0, 0.25, 1.0, 3.0)):
    """A float mask of x's shape without its last axis, with weights other than 0 and 1 and
    every channel keeping positions."""
    rng = np.random.default_rng(seed)
    mask = rng.choice(np.asarray(values), size=shape[:-1])
    mask.reshape(-1)[:2] = (1.0, 0.25)
    return mask.astype(np.float32)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((4, 3, 5, 2), -1), ((4, 2, 3, 5), 1), ((3, 2, 3, 4, 2), -1), ((3, 2, 3, 4, 2), 1)],
)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_like_keras3_uses_the_mask_on_rank_4_and_5_as_keras3(shape, axis, mask_kind):
    """Keras 3 has no fused path: its mask counts on rank-4/5 inputs too. ``like("keras3")``
    left ``fused=None``, so these shapes took tf-keras' fused path, which ignores the mask
    (with a UserWarning) and normalised with every position."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(shape) * 2 + 1).astype(np.float32)
    mask = _keras_mask(shape, seed=4)
    if mask_kind == "bool":
        mask = mask != 0
    layer = BatchNormalization.like("keras3", axis=axis, momentum=0.5)
    y = layer(torch.tensor(x), training=True, mask=torch.tensor(mask))
    assert layer.fused is False
    expected_y, expected_mean, expected_variance = _keras3_masked_step(
        x, mask, axis, momentum=0.5, epsilon=1e-3
    )
    np.testing.assert_allclose(y.detach().numpy(), expected_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), expected_variance, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize(
    ("shape", "axis", "mask_shape"),
    [
        ((16, 3), -1, (16,)),
        ((6, 7, 3), -1, (6, 7)),
        ((6, 7, 3), -1, (6, 1)),  # one weight per sequence, broadcast as tf-keras takes it
        ((6, 3, 7), 1, (6, 3)),  # Keras' mask varies inside a channel: the composed ops
        ((4, 3, 5, 2), -1, (4, 3, 5)),
    ],
)
def test_mask_weights_false_counts_every_nonzero_value_fully_on_every_backend(
    shape, axis, mask_shape
):
    """Keras 3 casts the mask to bool (``ops.cast(mask, "bool")`` in ``_moments``): a weight of
    0.25 or 3 counts as 1. The layer weighed positions by the values (tf-keras'
    ``tf.nn.weighted_moments``), which ``like("keras3")`` could not turn off."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal(shape) * 3 + 2).astype(np.float32)
    mask = _keras_mask((*mask_shape, 1), seed=6)
    expected_y, expected_mean, expected_variance = _keras3_masked_step(
        x, np.broadcast_to(mask, shape[:-1]), axis, momentum=0.9, epsilon=1e-3
    )

    def run() -> list[torch.Tensor]:
        layer = BatchNormalization.like("keras3", axis=axis, momentum=0.9)
        y = layer(torch.tensor(x), training=True, mask=torch.tensor(mask))
        return [y.detach(), layer.moving_mean.clone(), layer.moving_variance.clone()]

    for y, moving_mean, moving_variance in torch_ops_and_kernels(run):
        np.testing.assert_allclose(y.numpy(), expected_y, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(moving_mean.numpy(), expected_mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(moving_variance.numpy(), expected_variance, rtol=1e-5, atol=1e-6)


def test_mask_weights_true_keeps_tf_keras_weighting_by_default():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((12, 4)) * 3 + 5
    weights = _keras_mask((12, 1), seed=8).astype(np.float64)
    layer = BatchNormalization(4, momentum=0.9, dtype="float64")
    assert layer.mask_weights is True
    y = layer(torch.tensor(x), training=True, mask=torch.tensor(weights))
    expected_y, expected_mean, expected_variance = reference_train_step(
        x,
        np.zeros(4),
        np.ones(4),
        None,
        None,
        axes=(1,),
        momentum=0.9,
        epsilon=1e-3,
        weights=weights[:, None],
    )
    np.testing.assert_allclose(y.detach().numpy(), expected_y, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.moving_mean.numpy(), expected_mean, rtol=1e-12)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected_variance, rtol=1e-12)


def test_mask_weights_false_gives_a_mask_no_gradient_and_compiles():
    """Keras 3's bool cast has no gradient; a compiled call sees the same 0/1 mask."""
    rng = np.random.default_rng(9)
    x = torch.tensor((rng.standard_normal((6, 7, 3)) + 1).astype(np.float32))
    values = _keras_mask((6, 7, 1), seed=10)
    mask = torch.tensor(values, requires_grad=True)
    layer = BatchNormalization.like("keras3", 3)
    y = layer(x, training=True, mask=mask)
    (y * torch.linspace(-1, 1, 3)).sum().backward()
    assert mask.grad is None
    expected_y, _, _ = _keras3_masked_step(x.numpy(), values, -1, momentum=0.99, epsilon=1e-3)
    np.testing.assert_allclose(y.detach().numpy(), expected_y, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(BatchNormalization.like("keras3", 3), backend="eager")
    y_compiled = compiled(x, training=True, mask=torch.tensor(values))
    np.testing.assert_allclose(y_compiled.detach().numpy(), expected_y, rtol=1e-5, atol=1e-5)


def test_mask_weights_is_checked_and_bad_masks_are_still_refused():
    with pytest.raises(
        TypeError, match=r"`mask_weights` must be True or False. Received: mask_weights='no'"
    ):
        BatchNormalization(mask_weights="no")  # type: ignore[arg-type]
    layer = BatchNormalization(3, mask_weights=False)
    with pytest.raises(TypeError, match=r"`mask_weights` must be True or False.*=1"):
        layer.mask_weights = 1  # type: ignore[assignment]
    assert layer.mask_weights is False
    layer(torch.randn(8, 3), training=True)
    before = _layer_state(layer)
    with pytest.raises(ValueError, match=r"Received: a mask with negative values"):
        layer(torch.randn(8, 3), training=True, mask=torch.tensor([1.0, -1, 1, 1, 1, 1, 1, 1]))
    with pytest.raises(TypeError, match=r"Received: mask of type list"):
        layer(torch.randn(8, 3), training=True, mask=[1.0] * 8)  # type: ignore[arg-type]
    _assert_state_equal(before, layer)
