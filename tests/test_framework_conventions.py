"""Convention options, presets, Caffe blobs and Keras 1's sample-wise mode, against plain formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import batchnorm
from batchnorm import BatchNormalization


def _data(shape, steps, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(1.0 + k, 1.0 + k % 3, size=(shape[0] + k % 3, *shape[1:])) for k in range(steps)
    ]


def _channel_moments(x, axis):
    axes = tuple(i for i in range(x.ndim) if i != axis)
    count = x.size // x.shape[axis]
    return x.mean(axis=axes), x.var(axis=axes), count


# ---------------------------------------------------------------- moving_variance_estimator
@pytest.mark.parametrize(
    ("estimator", "shape", "bessel"),
    [("biased", (6, 3, 4, 4), False), ("unbiased", (6, 3), True), ("auto", (6, 3), False)],
)
def test_estimator_chooses_the_stored_variance(estimator, shape, bessel):
    layer = BatchNormalization(axis=1, momentum=0.0, moving_variance_estimator=estimator)
    x = _data(shape, 1)[0]
    layer(torch.tensor(x, dtype=torch.float64).float(), training=True)
    _, variance, count = _channel_moments(x, 1)
    expected = variance * count / (count - 1) if bessel else variance
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected, rtol=1e-5)


# ---------------------------------------------------------------- moving_average="debiased"
def test_debiased_average_with_momentum_one_is_the_plain_average_of_all_batches():
    layer = BatchNormalization(axis=-1, momentum=1.0, moving_average="debiased", dtype="float64")
    batches = _data((5, 4), 7)
    for x in batches:
        layer(torch.tensor(x), training=True)
    means = [x.mean(axis=0) for x in batches]
    variances = [x.var(axis=0) for x in batches]
    np.testing.assert_allclose(layer.moving_mean.numpy(), np.mean(means, axis=0), rtol=1e-12)
    np.testing.assert_allclose(
        layer.moving_variance.numpy(), np.mean(variances, axis=0), rtol=1e-12
    )
    assert float(layer.moving_average_weight) == 7.0


def test_checkpoint_resumes_the_debiased_average_exactly():
    batches = [torch.tensor(x, dtype=torch.float32) for x in _data((8, 3), 6, seed=2)]
    layer = BatchNormalization(momentum=0.9, moving_average="debiased")
    for x in batches[:3]:
        layer(x, training=True)
    resumed = BatchNormalization(momentum=0.9, moving_average="debiased")
    resumed.load_state_dict(layer.state_dict())
    for x in batches[3:]:
        layer(x, training=True)
        resumed(x, training=True)
    for key, value in layer.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


# ---------------------------------------------------------------- use_global_stats
def test_use_global_stats_true_normalises_with_moving_statistics_and_keeps_them():
    layer = BatchNormalization(3, axis=1, use_global_stats=True, epsilon=1e-3)
    with torch.no_grad():
        layer.moving_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
        layer.moving_variance.copy_(torch.tensor([4.0, 0.25, 1.0]))
        layer.gamma.copy_(torch.tensor([2.0, 1.0, 0.5]))
    layer.train()
    x = torch.randn(5, 3, 2, 2)
    y = layer(x)
    mean, variance = layer.moving_mean.view(1, 3, 1, 1), layer.moving_variance.view(1, 3, 1, 1)
    expected = (x - mean) / torch.sqrt(variance + 1e-3) * layer.gamma.view(1, 3, 1, 1)
    torch.testing.assert_close(y, expected)
    assert torch.equal(layer.moving_mean, torch.tensor([1.0, -1.0, 0.5]))
    y.sum().backward()
    assert layer.gamma.grad is not None and layer.beta.grad is not None


@pytest.mark.parametrize("training", [False, torch.tensor(False)])
def test_use_global_stats_false_uses_batch_statistics_in_inference_without_updating(training):
    layer = BatchNormalization(4, use_global_stats=False, epsilon=1e-3, momentum=0.5)
    x = torch.tensor(_data((6, 4), 1)[0], dtype=torch.float32)
    y = layer(x, training=training)
    mean, variance, _ = _channel_moments(x.double().numpy(), 1)
    expected = (x.double().numpy() - mean) / np.sqrt(variance + 1e-3)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(layer.moving_mean, torch.zeros(4))
    layer(x, training=True)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * mean, rtol=1e-6)


@pytest.mark.parametrize("training", [False, torch.tensor(False), True, torch.tensor(True)])
@pytest.mark.parametrize("option", ["renorm", "adjustment"])
def test_use_global_stats_false_inference_leaves_out_renorm_and_the_adjustment(option, training):
    """An inference call with use_global_stats=False normalises with the batch statistics; renorm's
    r, d and the adjustment belong to training calls (r = 1, d = 0 at inference). It normalised
    with the renorm moving statistics instead (off by up to 4.8). Training calls keep both."""
    kwargs = (
        {"renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}}
        if option == "renorm"
        else {"adjustment": lambda shape: (torch.full((4,), 2.0), torch.full((4,), 0.5))}
    )
    layer = BatchNormalization(4, use_global_stats=False, epsilon=1e-3, momentum=0.5, **kwargs)
    for _ in range(3):  # renorm statistics away from the batch's
        layer(torch.randn(16, 4) * 3 + 2, training=True)
    x = torch.tensor(_data((6, 4), 1)[0], dtype=torch.float32)
    reference = layer.state_dict()
    y = layer(x, training=training)
    mean, variance, _ = _channel_moments(x.double().numpy(), 1)
    normalised = (x.double().numpy() - mean) / np.sqrt(variance + 1e-3)
    if not bool(training):
        np.testing.assert_allclose(y.detach().numpy(), normalised, rtol=1e-5, atol=1e-5)
        for key, value in layer.state_dict().items():
            assert torch.equal(value, reference[key]), key
    elif option == "adjustment":
        np.testing.assert_allclose(y.detach().numpy(), 2 * normalised + 0.5, rtol=1e-5, atol=1e-5)
    else:  # a training call is corrected towards the renorm statistics
        assert np.abs(y.detach().numpy() - normalised).max() > 0.1


# ---------------------------------------------------------------- presets
@pytest.mark.parametrize("framework", ["keras", "keras3", "torch", "caffe", "flax"])
def test_like_sets_the_preset_and_overrides_win(framework):
    preset = batchnorm.FRAMEWORK_PRESETS[framework]
    layer = BatchNormalization.like(framework, 3)
    for key, value in preset.items():
        if key.endswith("_initializer"):
            assert layer.get_config()[key]["class_name"].lower() == value, key
        else:
            assert getattr(layer, key) == value, key
    assert BatchNormalization.like(framework, 3, epsilon=0.5).epsilon == 0.5
    assert tuple(layer.moving_mean.shape) == (3,)


def test_like_torch_matches_torch_batch_norm():
    reference = torch.nn.BatchNorm2d(3)
    layer = BatchNormalization.like("torch", 3)
    for x in _data((4, 3, 2, 2), 5):
        x = torch.tensor(x, dtype=torch.float32)
        torch.testing.assert_close(layer(x, training=True), reference(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.moving_variance, reference.running_var, rtol=1e-6, atol=1e-6)


def test_porting_table_lists_every_preset_and_is_in_the_readme():
    table = batchnorm.porting_table()
    for framework in batchnorm.FRAMEWORK_PRESETS:
        assert f'`"{framework}"`' in table
    readme = (__import__("pathlib").Path(__file__).resolve().parents[1] / "README.md").read_text(
        encoding="utf-8"
    )
    assert table in readme, "README's porting table is stale: paste batchnorm.porting_table()"


def test_unknown_framework_and_bad_options_are_named():
    with pytest.raises(
        ValueError, match=r"`framework` must be one of .*Received: framework='mxnet'"
    ):
        BatchNormalization.like("mxnet")  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"`moving_variance_estimator` must be one of .*Received: .*='sample'"
    ):
        BatchNormalization(moving_variance_estimator="sample")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`moving_average` must be one of .*Received: .*='sma'"):
        BatchNormalization(moving_average="sma")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"`use_global_stats` must be None, True or False"):
        BatchNormalization(use_global_stats="yes")  # type: ignore[arg-type]


def test_config_round_trips_the_convention_options():
    layer = BatchNormalization.like("caffe", 2, use_global_stats=False)
    clone = BatchNormalization.from_config(layer.get_config())
    for key in ("moving_variance_estimator", "moving_average", "use_global_stats", "momentum"):
        assert getattr(clone, key) == getattr(layer, key)
    assert "moving_average" not in BatchNormalization(2).get_config()


def test_keras3_preset_has_no_fused_path_and_counts_mask_values_fully():
    """Keras 3 has no fused path and casts the mask to bool; the preset said neither, so a
    rank-4 layer took tf-keras' fused path, and a float mask weighed positions."""
    preset = batchnorm.FRAMEWORK_PRESETS["keras3"]
    assert (preset["fused"], preset["mask_weights"]) == (False, False)
    for framework in ("keras", "torch", "caffe", "flax"):
        layer = BatchNormalization.like(framework, 3)
        assert layer.mask_weights is True, framework
    layer = BatchNormalization.like("keras3", axis=1)
    layer.build((2, 3, 4, 4))
    assert layer.fused is False
    assert layer._stored_estimator(layer.fused) == "biased"
    config = layer.get_config()
    assert (config["fused"], config["mask_weights"]) == (False, False)
    clone = BatchNormalization.from_config(config)
    assert (clone.fused, clone.mask_weights) == (False, False)
    assert "mask_weights=False" in repr(layer)
    assert "mask_weights" not in BatchNormalization(2).get_config()
    assert BatchNormalization.like("keras3", 3, mask_weights=True).mask_weights is True
    # The porting table's columns do not change: Keras 3 stores the biased variance.
    assert (
        '| Keras 3 | `"keras3"` | -1 | 0.99 (0.99) | 0.001 | biased |' in batchnorm.porting_table()
    )


def test_a_layer_pickled_before_mask_weights_existed_weighs_its_mask():
    layer = BatchNormalization(3)
    state = layer.__getstate__()
    del state["_mask_weights"]
    restored = BatchNormalization.__new__(BatchNormalization)
    restored.__setstate__(state)
    assert restored.mask_weights is True


# ---------------------------------------------------------------- Caffe
class CaffeBatchNorm:
    """caffe/src/caffe/layers/batch_norm_layer.cpp, in float64, written from the formulas."""

    def __init__(self, channels, maf=0.999, eps=1e-5):
        self.blobs = [np.zeros(channels), np.zeros(channels), np.zeros(1)]
        self.maf, self.eps = maf, eps

    def forward(self, x, use_global_stats):
        mean_sum, var_sum, s = self.blobs
        if use_global_stats:
            factor = 0.0 if s[0] == 0 else 1.0 / s[0]
            mean, var = mean_sum * factor, var_sum * factor
        else:
            mean, var, m = _channel_moments(x, 1)
            self.blobs[2] = s * self.maf + 1
            self.blobs[0] = mean + self.maf * mean_sum
            self.blobs[1] = (m / (m - 1)) * var + self.maf * var_sum
        view = (1, -1) + (1,) * (x.ndim - 2)
        return (x - mean.reshape(view)) / np.sqrt(var.reshape(view) + self.eps)


def test_caffe_preset_follows_caffe_blobs_through_training_and_test():
    caffe = CaffeBatchNorm(3, maf=0.9)
    layer = BatchNormalization.like("caffe", 3, momentum=0.9, dtype="float64")
    # Before any step the blobs and their scale factor are 0: mean 0, variance 0 (x / sqrt(eps));
    # the preset started the moving variance at 1 (x / sqrt(1 + eps)).
    x = _data((2, 3, 2, 2), 1, seed=3)[0]
    for frozen in (
        layer,
        BatchNormalization.like("caffe", 3, dtype="float64", use_global_stats=True),
    ):
        np.testing.assert_allclose(
            frozen(torch.tensor(x), training=False).numpy(), caffe.forward(x, True), rtol=1e-10
        )
    for x in _data((4, 3, 2, 2), 6, seed=4):
        y = layer(torch.tensor(x), training=True)
        np.testing.assert_allclose(y.numpy(), caffe.forward(x, False), rtol=1e-10, atol=1e-10)
    mean_sum, var_sum, s = caffe.blobs
    np.testing.assert_allclose(layer.moving_average_weight.numpy(), s[0])
    np.testing.assert_allclose(layer.moving_mean.numpy() * s[0], mean_sum, rtol=1e-10)
    np.testing.assert_allclose(layer.moving_variance.numpy() * s[0], var_sum, rtol=1e-10)
    x = _data((5, 3, 2, 2), 1, seed=9)[0]
    np.testing.assert_allclose(
        layer(torch.tensor(x), training=False).numpy(), caffe.forward(x, True), rtol=1e-10
    )


@pytest.mark.parametrize("scale_factor", [0.0, 3.7])
def test_from_caffe_reproduces_the_blobs_and_continues_their_average(scale_factor):
    caffe = CaffeBatchNorm(3)
    rng = np.random.default_rng(0)
    caffe.blobs = [
        rng.normal(size=3) * scale_factor,
        rng.uniform(1, 2, 3) * scale_factor,
        np.array([scale_factor]),
    ]
    gamma, beta = rng.normal(size=3), rng.normal(size=3)
    layer = batchnorm.from_caffe(*caffe.blobs, gamma=gamma, beta=beta)
    layer = layer.double()
    view = (1, 3, 1, 1)
    x = _data((4, 3, 2, 2), 1, seed=1)[0]
    expected = caffe.forward(x, True) * gamma.reshape(view) + beta.reshape(view)
    np.testing.assert_allclose(
        layer(torch.tensor(x), training=False).detach().numpy(), expected, rtol=1e-6, atol=1e-6
    )
    layer(torch.tensor(x), training=True)
    caffe.forward(x, False)
    np.testing.assert_allclose(
        layer.moving_mean.numpy() * caffe.blobs[2][0], caffe.blobs[0], rtol=1e-6
    )
    np.testing.assert_allclose(
        layer.moving_variance.numpy() * caffe.blobs[2][0], caffe.blobs[1], rtol=1e-6
    )


def test_from_caffe_without_scale_layer_has_no_gamma_beta():
    layer = batchnorm.from_caffe(np.zeros(2), np.ones(2), np.array([2.0]))
    assert not hasattr(layer, "gamma") and not hasattr(layer, "beta")
    np.testing.assert_allclose(layer.moving_variance.numpy(), [0.5, 0.5])


def test_from_caffe_rejects_mismatched_blobs():
    with pytest.raises(
        ValueError, match=r"must both have shape \(C,\).*variance_blob.shape=\(3,\)"
    ):
        batchnorm.from_caffe(np.zeros(2), np.ones(3), np.ones(1))
    with pytest.raises(ValueError, match=r"`scale_factor_blob` must hold one value.*\(2,\)"):
        batchnorm.from_caffe(np.zeros(2), np.ones(2), np.ones(2))
    with pytest.raises(ValueError, match=r"`gamma` must have the shape of `mean_blob`, \(2,\)"):
        batchnorm.from_caffe(np.zeros(2), np.ones(2), np.ones(1), gamma=np.ones(3))
    with pytest.raises(ValueError, match=r"finite and >= 0. Received: scale_factor_blob=-1.0"):
        batchnorm.from_caffe(np.zeros(2), np.ones(2), -np.ones(1))
    with pytest.raises(TypeError, match=r"`mean_blob` must be an array or tensor of numbers"):
        batchnorm.from_caffe("abc", np.ones(2), np.ones(1))


# ---------------------------------------------------------------- Keras 1 mode=1
@pytest.mark.parametrize("epsilon_in_sqrt", [False, True])
def test_sample_normalization_is_keras_1_mode_1(epsilon_in_sqrt):
    rng = np.random.default_rng(3)
    x = rng.normal(2.0, 3.0, size=(5, 7))
    layer = batchnorm.SampleNormalization(epsilon=0.1, epsilon_in_sqrt=epsilon_in_sqrt).double()
    y = layer(torch.tensor(x))
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor(rng.normal(size=7)))
        layer.beta.copy_(torch.tensor(rng.normal(size=7)))
    y = layer(torch.tensor(x))
    mean = x.mean(axis=-1, keepdims=True)
    variance = x.var(axis=-1, keepdims=True)
    std = np.sqrt(variance + 0.1) if epsilon_in_sqrt else np.sqrt(variance)
    expected = layer.gamma.detach().numpy() * (x - mean) / (std + 0.1) + layer.beta.detach().numpy()
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12)


def test_sample_normalization_errors_and_state_dict():
    layer = batchnorm.SampleNormalization(num_features=4)
    with pytest.raises(
        ValueError, match=r"built for 4 features on axis -1. Received: x.shape=\(2, 5\)"
    ):
        layer(torch.randn(2, 5))
    with pytest.raises(
        ValueError, match=r"`num_features` must be a positive int. Received: num_features=0"
    ):
        batchnorm.SampleNormalization(num_features=0)
    with pytest.raises(TypeError, match=r"`axis` must be an int. Received: axis=\[1\]"):
        batchnorm.SampleNormalization(axis=[1])  # type: ignore[arg-type]
    fresh = batchnorm.SampleNormalization()
    fresh.load_state_dict(layer.state_dict())
    assert fresh.num_features == 4


@pytest.mark.parametrize("call", ["use_global_stats", "inference with a mask that requires grad"])
def test_a_float64_input_to_a_float32_layer_is_normalised_in_float64_on_the_torch_ops(call):
    """The composed ops normalised an inference call with the float32 moving statistics as they
    are (rsqrt of the float32 variance): 8.4e-8 relative error where the kernels give 2e-16."""
    torch.manual_seed(0)
    x = torch.randn(16, 4, dtype=torch.float64) * 3 + 1
    layer = BatchNormalization(4, use_global_stats=True if call == "use_global_stats" else None)
    with torch.no_grad():
        layer.moving_mean.copy_(torch.tensor([0.1, 0.2, 0.3, 0.4]))
        layer.moving_variance.copy_(torch.tensor([0.7, 1.3, 2.9, 0.11]))
    mask = torch.rand(16, dtype=torch.float64).requires_grad_()  # takes the composed ops
    y = layer(x, training=False, mask=mask)
    mean, variance = layer.moving_mean.double(), layer.moving_variance.double()
    expected = (x - mean) / torch.sqrt(variance + layer.epsilon)
    torch.testing.assert_close(y, expected, rtol=1e-14, atol=1e-14)
