"""fold / fold_weights: folded inference models against the original model and torch's fusion."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

import batchnorm
from batchnorm import BatchNormalization, FoldedBatchNorm, fold, fold_weights
from batchnorm.tools._batch_norm_modules import is_batch_norm
from tests.test_convert_activation import BatchNormAct2d


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics and affine parameters in every batch norm."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if not is_batch_norm(module):
                continue
            names = ("running_mean", "running_var", "weight", "bias")
            if isinstance(module, BatchNormalization):
                names = ("moving_mean", "moving_variance", "gamma", "beta")
            for name in names:
                tensor = getattr(module, name, None)
                if tensor is None or torch.nn.parameter.is_lazy(tensor):
                    continue
                shape = tensor.shape
                if "var" in name:
                    tensor.copy_(torch.rand(shape, generator=generator) * 2 + 0.3)
                else:
                    tensor.copy_(torch.randn(shape, generator=generator))
    return model


class Block(nn.Module):
    """Residual block: conv-BN-ReLU, grouped conv-BN, then the skip connection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = BatchNormalization(channels, axis=1, epsilon=1e-5)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(channels)
        self.depthwise = nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False)
        self.bn3 = BatchNormalization(axis=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(x + self.bn3(self.depthwise(y)))


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.block = Block(8)
        self.up = nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2, bias=False)
        self.up_bn = BatchNormalization(axis=1)
        # Channels-last head: Linear over the last axis, our batch norm on axis -1.
        self.project = nn.Linear(8, 6)
        self.project_bn = BatchNormalization(axis=-1, momentum=0.9)
        self.head = nn.Linear(6, 4, bias=False)
        self.head_bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        x = torch.relu(self.up_bn(self.up(x)))
        x = self.project_bn(self.project(x.permute(0, 2, 3, 1)))
        return self.head_bn(self.head(torch.relu(x).mean(dim=(1, 2))))


def built_resnet() -> SmallResNet:
    torch.manual_seed(0)
    model = SmallResNet()
    model(torch.randn(4, 3, 6, 6))  # builds our layers
    return randomise(model).eval()


def test_fold_small_resnet_matches_original_and_leaves_no_batch_norm():
    model = built_resnet()
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    result = fold(model, example_input=x)
    assert sorted(result.folded) == sorted(
        [
            ("stem.0", "stem.1"),
            ("block.conv1", "block.bn1"),
            ("block.conv2", "block.bn2"),
            ("block.depthwise", "block.bn3"),
            ("up", "up_bn"),
            ("project", "project_bn"),
            ("head", "head_bn"),
        ]
    )
    assert result.not_folded == {}
    assert not any(is_batch_norm(m) for m in result.model.modules())
    assert isinstance(result.model.block.bn1, FoldedBatchNorm)
    with torch.no_grad():
        folded = result.model(x)
    assert (folded - expected).abs().max() < 1e-5
    assert result.max_difference is not None and result.max_difference < 1e-5
    assert result.max_difference == pytest.approx(float((folded - expected).abs().max()))
    assert model.block.bn1.moving_mean.abs().sum() > 0  # the original keeps its layers
    assert isinstance(model.block.bn1, BatchNormalization)
    assert "folded 7 batch norm(s)" in str(result)


def test_fold_on_channels_last_memory_format():
    model = built_resnet().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 6, 6).to(memory_format=torch.channels_last)
    result = fold(model, x)
    assert result.not_folded == {} and result.max_difference < 1e-5


@pytest.mark.parametrize(
    "conv_type",
    [
        nn.Conv1d,
        nn.Conv2d,
        nn.Conv3d,
        nn.ConvTranspose1d,
        nn.ConvTranspose2d,
        nn.ConvTranspose3d,
    ],
)
@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ours", [True, False])
def test_fold_every_convolution_type(conv_type, groups, bias, ours):
    dims = int(conv_type.__name__[-2])
    torch_norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims]
    norm = BatchNormalization(6, axis=1, epsilon=1e-4) if ours else torch_norm(6)
    model = randomise(nn.Sequential(conv_type(4, 6, 3, groups=groups, bias=bias), norm)).eval()
    x = torch.randn(2, 4, *([5] * dims))
    result = fold(model, x)
    assert result.folded == [("0", "1")]
    assert result.max_difference < 1e-5


def test_fold_weights_matches_torch_fusion():
    torch.manual_seed(1)
    for transposed, conv in ((False, nn.Conv2d(3, 5, 3)), (True, nn.ConvTranspose2d(3, 5, 3))):
        norm = randomise(nn.BatchNorm2d(5))
        ours = fold_weights(
            conv.weight,
            conv.bias,
            norm.running_mean,
            norm.running_var,
            norm.weight,
            norm.bias,
            norm.eps,
            transposed=transposed,
        )
        reference = fuse_conv_bn_weights(
            conv.weight,
            conv.bias,
            norm.running_mean,
            norm.running_var,
            norm.eps,
            norm.weight,
            norm.bias,
            transpose=transposed,
        )
        torch.testing.assert_close(ours[0], reference[0].detach(), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ours[1], reference[1].detach(), rtol=1e-6, atol=1e-6)
    linear, norm = nn.Linear(4, 3, bias=False), randomise(nn.BatchNorm1d(3))
    weight, folded_bias = fold_weights(
        linear.weight, None, norm.running_mean, norm.running_var, None, None, 1e-3
    )
    reference = fuse_linear_bn_weights(
        linear.weight,
        torch.zeros(3),
        norm.running_mean,
        norm.running_var,
        1e-3,
        torch.ones(3),
        torch.zeros(3),
    )
    torch.testing.assert_close(weight, reference[0].detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(folded_bias, reference[1].detach(), rtol=1e-6, atol=1e-6)


class Unfoldable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(3, 4, 1)
        self.wrong_axis = BatchNormalization(axis=-1)  # normalises W, not the channels
        self.conv_b = nn.Conv2d(3, 4, 1)
        self.shared_output = nn.BatchNorm2d(4)  # conv_b's output is also used by the skip
        self.after_relu = nn.BatchNorm2d(4)
        self.conv_c = nn.Conv2d(3, 4, 1)
        self.batch_statistics = BatchNormalization(4, axis=1, use_global_stats=False)
        self.conv_d = nn.Conv2d(3, 4, 1)
        self.no_running_stats = nn.BatchNorm2d(4, track_running_stats=False)
        self.unused = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.wrong_axis(self.conv_a(x))
        b = self.conv_b(x)
        b = self.shared_output(b) + b
        c = self.after_relu(torch.relu(b))
        d = self.batch_statistics(self.conv_c(x))
        e = self.no_running_stats(self.conv_d(x))
        return a + c + d + e


def test_unfoldable_batch_norms_stay_in_inference_mode_and_are_listed():
    torch.manual_seed(2)
    model = Unfoldable()
    model(torch.randn(2, 3, 4, 4))
    randomise(model).eval()
    x = torch.randn(3, 3, 4, 4)
    result = fold(model, x)
    assert result.folded == []
    reasons = result.not_folded
    assert set(reasons) == {
        "wrong_axis",
        "shared_output",
        "after_relu",
        "batch_statistics",
        "no_running_stats",
        "unused",
    }
    assert "not the output-channel axis 1" in reasons["wrong_axis"]
    assert "also used elsewhere" in reasons["shared_output"]
    assert "not a Conv/ConvTranspose/Linear" in reasons["after_relu"]
    assert "batch statistics at inference" in reasons["batch_statistics"]
    assert "batch statistics at inference" in reasons["no_running_stats"]
    assert reasons["unused"] == "not called in the traced forward"
    assert not result.model.shared_output.training
    assert result.max_difference == 0.0


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # torch.fx cannot trace this
            x = -x
        return self.norm(self.conv(x))


def test_untraceable_model_folds_with_pairs_named_by_hand():
    model = randomise(DataDependent()).eval()
    x = torch.randn(2, 3, 5, 5)
    traced = fold(model, x)
    assert traced.folded == []
    assert "name the pairs by hand" in traced.not_folded["norm"]
    by_hand = fold(model, x, pairs=[("conv", "norm")])
    assert by_hand.folded == [("conv", "norm")] and by_hand.not_folded == {}
    assert by_hand.max_difference < 1e-5


def test_fold_on_training_model_works_on_a_copy_and_says_so():
    model = built_resnet().train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 6, 6)
    with pytest.warns(UserWarning, match=r"the model is in training mode"):
        result = fold(model, x)
    assert any("training mode" in note for note in result.notes)
    assert model.training and not result.model.training
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert result.max_difference < 1e-5  # compared with the original's inference output


def test_fold_errors():
    model = built_resnet()
    with pytest.raises(
        TypeError, match=r"`model` must be an nn.Module. Received: model of type str"
    ):
        fold("model")
    with pytest.raises(ValueError, match=r"`pairs` names a module the model does not have"):
        fold(model, pairs=[("stem.0", "nope")])
    with pytest.raises(ValueError, match=r"`pairs`: stem.2 must be a Conv1d/2d/3d"):
        fold(model, pairs=[("stem.2", "stem.1")])
    with pytest.raises(ValueError, match=r"`pairs`: stem.0 must be a batch norm"):
        fold(model, pairs=[("block.conv1", "stem.0")])
    with pytest.raises(TypeError, match=r"`pairs` must be a list of \(layer, batch_norm\) names"):
        fold(model, pairs="stem.0")
    with pytest.raises(ValueError, match=r"`groups` must be a positive int dividing"):
        fold_weights(
            torch.ones(3, 2, 1),
            None,
            *[torch.ones(4)] * 2,
            None,
            None,
            1e-3,
            transposed=True,
            groups=2,
        )
    with pytest.raises(ValueError, match=r"`mean` must have one value per output channel"):
        fold_weights(torch.ones(3, 2), None, torch.ones(4), torch.ones(3), None, None, 1e-3)


def test_fold_is_exported():
    assert batchnorm.fold is fold and "fold_weights" in batchnorm.__all__


def test_fold_frozen_batch_norms_and_linear_on_3d_input():
    model = randomise(
        nn.Sequential(nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.Linear(5, 4), nn.BatchNorm1d(4))
    )
    batchnorm.freeze(model)
    x = torch.randn(2, 3, 5)
    result = fold(model.eval(), x)
    # BatchNorm1d normalises axis 1 of (N, 4, 4); the Linear's features are axis 2.
    assert result.folded == [("0", "1")]
    assert "normalises axis 1 but 2's features are axis 2" in result.not_folded["3"]
    assert result.max_difference < 1e-5


def test_fold_layers_never_called():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), BatchNormalization(axis=1), nn.Linear(2, 5), BatchNormalization(5)
    ).eval()
    result = fold(model)
    assert result.not_folded == {"1": "not built yet: call the model once or pass example_input"}
    # Built from num_features with axis=-1: the last axis whatever the rank, so it folds.
    assert result.folded == [("2", "3")]
    with torch.no_grad():
        randomise(model)
        x = torch.randn(2, 3, 2, 2)
        folded = fold(model, x)
    assert folded.folded == [("0", "1"), ("2", "3")] and folded.max_difference < 1e-5


class SharedNorm(nn.Module):
    """One batch norm registered under two names (an attribute and a place in a Sequential)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(3, 4, 3), self.norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_a_batch_norm_registered_twice_is_replaced_at_every_place():
    """named_modules() lists the module once, under `norm`: replaced there only, `block.1`
    still ran the batch norm after the folded convolution (1.5 off)."""
    model = randomise(SharedNorm().double()).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    result = fold(model, x)
    assert result.folded == [("block.0", "norm")]
    assert isinstance(result.model.block[1], FoldedBatchNorm)
    assert result.model.block[1] is result.model.norm
    torch.testing.assert_close(result.model(x), model(x), rtol=1e-12, atol=1e-12)


class TiedDecoder(nn.Module):
    """An autoencoder whose decoder reads the encoder's weight (tied weights)."""

    def __init__(self) -> None:
        super().__init__()
        self.encode = nn.Linear(6, 4)
        self.norm = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.norm(self.encode(x)))
        return nn.functional.linear(hidden, self.encode.weight.t())


def test_a_weight_the_forward_also_reads_is_not_folded():
    """Folding rewrites the encoder's weight, which the decoder reads too (1.5 off before)."""
    model = randomise(TiedDecoder()).eval()
    x = torch.randn(5, 6)
    result = fold(model, x)
    assert result.folded == []
    assert result.not_folded == {
        "norm": "the forward also reads encode.weight directly, which folding would change"
    }
    assert result.max_difference == 0.0


def rerouted_conv(kind: str) -> nn.Module:
    """A Conv2d whose weight or bias is computed from other tensors on each call."""
    torch.manual_seed(4)
    conv = nn.Conv2d(3, 4, 3).double()
    if kind == "weight_norm":
        nn.utils.parametrizations.weight_norm(conv)
    elif kind == "spectral_norm":
        nn.utils.parametrizations.spectral_norm(conv)
    elif kind == "softplus_bias":
        nn.utils.parametrize.register_parametrization(conv, "bias", nn.Softplus())
    elif kind == "pruned":
        nn.utils.prune.l1_unstructured(conv, "weight", amount=0.5)
    elif kind == "hooked_weight_norm":
        with pytest.warns(FutureWarning, match="weight_norm"):
            conv = nn.utils.weight_norm(conv)
    elif kind == "hooked_spectral_norm":
        conv = nn.utils.spectral_norm(conv)
    return conv


@pytest.mark.parametrize(
    "kind",
    [
        "weight_norm",
        "spectral_norm",
        "softplus_bias",
        "pruned",
        "hooked_weight_norm",
        "hooked_spectral_norm",
    ],
)
def test_parametrized_pruned_and_hooked_layers_fold_with_their_computed_weight(kind):
    """The computed weight (and bias) is folded, as remove_parametrizations(leave_parametrized=
    True) / prune.remove give it, and the original keeps its rerouting. Before: KeyError
    "attribute 'weight' already exists" (parametrizations), deepcopy's "Only Tensors created
    explicitly by the user" (pruning, torch.nn.utils.weight_norm), or a TypeError."""
    model = nn.Sequential(rerouted_conv(kind), randomise(nn.BatchNorm2d(4).double())).eval()
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    expected = model(x)
    state = copy.deepcopy(model.state_dict())
    result = fold(model, x)
    assert result.folded == [("0", "1")]
    torch.testing.assert_close(result.model(x), expected, rtol=1e-12, atol=1e-12)
    folded_conv = result.model[0]
    assert type(folded_conv) is nn.Conv2d and not folded_conv._forward_pre_hooks
    assert isinstance(folded_conv.weight, nn.Parameter)
    # the original is untouched: same state, same output (a deep copy shares a parametrized
    # class, from which removing the parametrization deleted the original's `weight`)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert model.state_dict().keys() == state.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)


@pytest.mark.parametrize("where", ["layer", "norm"])
def test_a_pair_with_a_forward_hook_is_not_folded(where):
    """A forward hook on the layer (it saw the layer's output) or the batch norm (it no longer
    runs) would be bypassed: the output was 0.97 off."""
    model = randomise(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))).eval()

    def doubled(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * 2

    model[0 if where == "layer" else 1].register_forward_hook(doubled)
    result = fold(model, torch.randn(2, 3, 6, 6))
    owner = "0" if where == "layer" else "the batch norm"
    assert result.not_folded == {
        "1": f"{owner} has forward hooks that folding would bypass ({doubled.__qualname__})"
    }
    assert result.max_difference == 0.0


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d as its source writes it (detection backbones):
    statistics and affine parameters are buffers, always used."""

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        return x * scale + bias


def test_frozen_batch_norm_2d_of_detection_backbones_folds():
    """Traced into before (not a torch.nn leaf), it was neither folded nor listed."""
    torch.manual_seed(6)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, bias=False), FrozenBatchNorm2d(4, eps=1e-3), nn.ReLU()
    ).double()
    generator = torch.Generator().manual_seed(1)
    for name in ("weight", "bias", "running_mean"):
        getattr(model[1], name).copy_(torch.randn(4, generator=generator))
    model[1].running_var.copy_(torch.rand(4, generator=generator) + 0.2)
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    result = fold(model.eval(), x)
    assert result.folded == [("0", "1")] and isinstance(result.model[1], FoldedBatchNorm)
    assert result.max_difference < 1e-12


class _KeywordInput(nn.Module):
    def __init__(self, ours: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = BatchNormalization(4, axis=1) if ours else nn.BatchNorm2d(4)
        self.ours = ours

    def forward(self, x):
        y = self.conv(x)
        return self.bn(x=y) if self.ours else self.bn(input=y)


@pytest.mark.parametrize("ours", [False, True])
@pytest.mark.parametrize("how", ["traced", "example input", "pairs and example input"])
def test_a_batch_norm_given_its_input_by_keyword_folds(ours, how):
    """bn(input=y) / bn(x=y): fold read the input at args[0] (IndexError with an example
    input) or counted the keyword input as an extra argument ("only the input can be
    folded")."""
    torch.manual_seed(0)
    model = _KeywordInput(ours)
    model.train()
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6) * 2 + 1)
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    if how == "traced":
        result = fold(model)
    elif how == "example input":
        result = fold(model, x)
    else:
        result = fold(model, x, pairs=[("conv", "bn")])
    assert result.folded == [("conv", "bn")] and result.not_folded == {}
    torch.testing.assert_close(result.model(x), expected, rtol=1e-5, atol=1e-5)


class _ScaledBatchNorm(nn.BatchNorm2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return 2.0 * super().forward(input)


@pytest.mark.parametrize(
    ("act", "drop"),
    [
        (nn.LeakyReLU(0.2), None),
        (nn.ReLU(), None),
        (nn.SiLU(), None),  # no activation of ours computes it: kept as a module
        (nn.LeakyReLU(0.2), nn.Dropout(0.5)),  # a drop: kept, identity in eval
    ],
)
def test_a_timm_batch_norm_with_activation_folds_keeping_its_activation(act, drop):
    """fold folded timm's BatchNormAct2d as a plain batch norm and dropped its act (2.7 off)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4, act=act, drop=drop)).eval()
    with torch.no_grad():
        model[1].bias.normal_()
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 8, 8)
    expected = act(torch.nn.utils.fusion.fuse_conv_bn_eval(model[0], model[1])(x))
    for result in (fold(model), fold(model, x), fold(model, pairs=[("0", "1")])):
        assert result.folded == [("0", "1")]
        torch.testing.assert_close(result.model(x), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(result.model(x), model(x), rtol=1e-5, atol=1e-5)


def test_a_batch_norm_subclass_overriding_forward_is_not_folded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), _ScaledBatchNorm(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    for result in (fold(model, x), fold(model, pairs=[("0", "1")])):
        assert result.folded == []
        assert "overrides the batch norm's forward" in result.not_folded["1"]
        torch.testing.assert_close(result.model(x), model(x), rtol=0, atol=0)


def test_fold_on_the_meta_device_reports_no_difference():
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).eval()
        x = torch.randn(2, 3, 5, 5)
    result = fold(model, x)
    assert result.folded == [("0", "1")]
    assert result.max_difference is None
    assert any("meta device" in note for note in result.notes)
    assert "largest difference" not in str(result)
