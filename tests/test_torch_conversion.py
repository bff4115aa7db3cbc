"""from_torch / to_torch / convert: step-for-step equality with torch.nn.BatchNorm*."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm

CASES = [
    (nn.BatchNorm1d, (6,), {}),
    (nn.BatchNorm1d, (6, 5), {"momentum": 0.3}),
    (nn.BatchNorm2d, (4, 3, 3), {}),
    (nn.BatchNorm2d, (4, 3, 3), {"momentum": None}),
    (nn.BatchNorm2d, (4, 3, 3), {"affine": False}),
    (nn.BatchNorm2d, (4, 3, 3), {"track_running_stats": False}),
    (nn.BatchNorm3d, (3, 2, 3, 2), {"eps": 1e-3, "momentum": None, "affine": False}),
]


def _batches(feature_shape, steps=20, seed=0, smallest=3):
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = smallest + step % 4
        scale = 1.0 + step % 3
        yield torch.randn((batch, *feature_shape), generator=generator) * scale + step * 0.1


@pytest.mark.parametrize(("torch_class", "feature_shape", "kwargs"), CASES)
def test_from_torch_follows_torch_step_for_step(torch_class, feature_shape, kwargs):
    torch.manual_seed(1)
    reference = torch_class(feature_shape[0], **kwargs)
    if reference.affine:
        with torch.no_grad():
            reference.weight.uniform_(0.5, 1.5)
            reference.bias.uniform_(-0.5, 0.5)
    layer = batchnorm.from_torch(reference)
    reference.train()
    layer.train()
    for x in _batches(feature_shape):
        x_ref = x.clone().requires_grad_()
        x_ours = x.clone().requires_grad_()
        y_ref, y_ours = reference(x_ref), layer(x_ours)
        torch.testing.assert_close(y_ours, y_ref, rtol=1e-6, atol=1e-6)
        upstream = torch.cos(torch.arange(y_ref.numel(), dtype=torch.float32)).reshape(y_ref.shape)
        (y_ref * upstream).sum().backward()
        (y_ours * upstream).sum().backward()
        torch.testing.assert_close(x_ours.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
        if reference.track_running_stats:
            torch.testing.assert_close(
                layer.moving_mean, reference.running_mean, rtol=1e-6, atol=1e-6
            )
            torch.testing.assert_close(
                layer.moving_variance, reference.running_var, rtol=1e-6, atol=1e-6
            )
    if reference.affine:
        torch.testing.assert_close(layer.gamma.grad, reference.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.beta.grad, reference.bias.grad, rtol=1e-5, atol=1e-5)
    reference.eval()
    layer.eval()
    x = next(_batches(feature_shape, steps=1, seed=5))
    torch.testing.assert_close(layer(x), reference(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("torch_class", "feature_shape", "kwargs"), CASES)
def test_to_torch_round_trip_is_exact(torch_class, feature_shape, kwargs):
    reference = torch_class(feature_shape[0], **kwargs)
    for x in _batches(feature_shape, steps=3):
        reference(x)
    layer = batchnorm.from_torch(reference)
    layer.build((2, *feature_shape))  # fixes the input rank, without a step
    back = batchnorm.to_torch(layer)
    assert type(back) is torch_class
    assert (back.momentum, back.eps, back.affine, back.track_running_stats) == (
        reference.momentum,
        reference.eps,
        reference.affine,
        reference.track_running_stats,
    )
    expected = reference.state_dict()
    if reference.momentum is not None:
        expected.pop("num_batches_tracked", None)  # only the cumulative average keeps the count
    actual = back.state_dict()
    actual.pop("num_batches_tracked", None) if reference.momentum is not None else None
    assert actual.keys() == expected.keys()
    for key, value in actual.items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


@pytest.mark.parametrize(("torch_class", "feature_shape", "kwargs"), CASES)
def test_converted_back_before_any_call_keeps_the_class(torch_class, feature_shape, kwargs):
    """A layer converted from torch and not called since has no input rank, but its class says
    which torch class it came from: `convert(convert(model), to="torch")` raised "has not seen
    an input ... pass `dims`" (and `convert` takes no `dims`)."""
    reference = torch_class(feature_shape[0], **kwargs)
    for x in _batches(feature_shape, steps=2):
        reference(x)
    model = nn.Sequential(reference)
    back = batchnorm.convert(batchnorm.convert(copy.deepcopy(model)), to="torch")
    assert type(back[0]) is torch_class
    for key, value in back[0].state_dict().items():
        if key != "num_batches_tracked" or reference.momentum is None:
            torch.testing.assert_close(value, reference.state_dict()[key], rtol=0, atol=0)


def test_lazy_batch_norm_converts_to_a_lazy_layer():
    reference = nn.LazyBatchNorm2d(momentum=0.2)
    layer = batchnorm.from_torch(reference)
    assert not layer.built
    for x in _batches((3, 4, 4), steps=4):
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.moving_variance, reference.running_var)
    unbuilt = batchnorm.BatchNormalization.like("torch")
    assert isinstance(batchnorm.to_torch(unbuilt, dims=2), nn.LazyBatchNorm2d)


def test_requires_grad_and_mode_are_kept():
    reference = nn.BatchNorm1d(4).eval()
    reference.weight.requires_grad_(False)
    layer = batchnorm.from_torch(reference)
    assert not layer.training
    assert not layer.gamma.requires_grad and layer.beta.requires_grad


def _small_model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Sequential(nn.Flatten(), nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6, momentum=None)),
    )


def test_convert_swaps_every_batch_norm_and_keeps_outputs():
    original = _small_model()
    model = batchnorm.convert(copy.deepcopy(original), to="batchnorm")
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(batchnorm.BatchNormalization) == 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    # Batches of 16 or more: with 3 samples a BatchNorm1d channel can have a batch variance near
    # epsilon, which amplifies one-ulp differences in the Conv/Linear outputs (they vary with the
    # CPU's vector width) a few hundred times, in torch as in this layer.
    for x in _batches((2, 5, 5), steps=5, smallest=16):
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)
    model.eval()
    original.eval()
    x = next(_batches((2, 5, 5), steps=1, seed=3))
    torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)
    back = batchnorm.convert(model, to="torch")
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in back.modules()) == 2
    torch.testing.assert_close(back(x), original(x), rtol=1e-5, atol=1e-5)


def test_convert_keeps_a_shared_batch_norm_shared():
    """A batch norm used at several places (twice in one parent, and in another parent): convert
    replaced it at its first place only, leaving torch's module at the others, so the two no
    longer shared their weights and statistics. Oracle: the torch model, trained alike."""
    torch.manual_seed(0)
    shared = nn.BatchNorm1d(4, momentum=0.01, eps=1e-3)
    original = nn.Sequential(
        nn.Sequential(nn.Linear(4, 4), shared), nn.Linear(4, 4), shared, nn.Sequential(shared)
    )
    model = batchnorm.convert(copy.deepcopy(original), to="batchnorm")
    layer = model[2]
    assert isinstance(layer, batchnorm.BatchNormalization)
    assert model[0][1] is layer and model[3][0] is layer
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    for x in _batches((4,), steps=3, smallest=16):
        torch.testing.assert_close(model(x), original(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.moving_mean, shared.running_mean, rtol=1e-5, atol=1e-6)
    back = batchnorm.convert(model, to="torch")
    assert back[0][1] is back[2] is back[3][0]
    assert isinstance(back[2], nn.BatchNorm1d)


def test_convert_of_a_batch_norm_itself_returns_the_converted_module():
    converted = batchnorm.convert(nn.BatchNorm2d(3))
    assert isinstance(converted, batchnorm.BatchNormalization)


def test_to_torch_lists_everything_torch_cannot_express():
    layer = batchnorm.BatchNormalization(4, axis=1, renorm=True, virtual_batch_size=2)
    layer.build((4, 4, 3, 3))
    with pytest.raises(ValueError, match=r"renorm=True.*virtual_batch_size=2.*stored biased"):
        batchnorm.to_torch(layer)
    channels_last = batchnorm.BatchNormalization.like("torch", axis=-1)
    channels_last.build((2, 5, 5, 3))
    with pytest.raises(ValueError, match=r"channel axes \[3\]"):
        batchnorm.to_torch(channels_last)
    caffe = batchnorm.BatchNormalization.like("caffe", 3)
    with pytest.raises(ValueError, match=r"moving_average='debiased' with momentum=0.999"):
        batchnorm.to_torch(caffe, dims=2)
    with pytest.raises(ValueError, match=r"pass `dims`"):
        batchnorm.to_torch(batchnorm.BatchNormalization.like("torch", 3))
    with pytest.raises(ValueError, match=r"`dims` must be 1, 2 or 3. Received: dims=4"):
        batchnorm.to_torch(batchnorm.BatchNormalization.like("torch", 3), dims=4)


def test_conversion_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"`module` must be a torch.nn.BatchNorm.*Received: Linear"):
        batchnorm.from_torch(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"`layer` must be a batchnorm.BatchNormalization"):
        batchnorm.to_torch(nn.BatchNorm1d(2))  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"`to` must be 'batchnorm' or 'torch'. Received: to='jax'"
    ):
        batchnorm.convert(nn.Sequential(), to="jax")  # type: ignore[arg-type]


def test_convert_to_torch_raises_before_replacing_anything():
    model = nn.Sequential(
        batchnorm.BatchNormalization.like("torch", 3), batchnorm.BatchNormalization(3, renorm=True)
    )
    model[0].build((2, 3, 4, 4))
    model[1].build((2, 4, 4, 3))
    with pytest.raises(ValueError, match="renorm"):
        batchnorm.convert(model, to="torch")
    assert all(isinstance(m, batchnorm.BatchNormalization) for m in model)


def test_sync_batch_norm_converts_to_a_synchronized_layer_and_back():
    reference = nn.SyncBatchNorm(3, momentum=0.2)
    layer = batchnorm.from_torch(reference)
    assert layer.synchronized and layer.process_group is None
    plain = nn.BatchNorm2d(3, momentum=0.2)
    for x in _batches((3, 2, 2), steps=4):  # no process group: the single-process result
        torch.testing.assert_close(layer(x), plain(x), rtol=1e-6, atol=1e-6)
    assert type(batchnorm.to_torch(batchnorm.from_torch(nn.SyncBatchNorm(3)))) is nn.SyncBatchNorm
    layer.build((2, 3, 2, 2))
    back = batchnorm.to_torch(layer)
    assert type(back) is nn.SyncBatchNorm
    torch.testing.assert_close(back.running_var, plain.running_var, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("to", ["batchnorm", "torch"])
def test_convert_carries_the_batch_norms_hooks(to):
    """A forward hook, a forward pre-hook (with kwargs) and a full backward hook on a batch norm
    ran before convert and not after: a hook that changed the output left the converted model
    1.28 off the original."""
    torch.manual_seed(0)
    bn = (
        nn.BatchNorm2d(4)
        if to == "batchnorm"
        else batchnorm.BatchNormalization(
            4, axis=1, momentum=0.9, epsilon=1e-5, moving_variance_estimator="unbiased"
        )
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn).eval()
    calls = []
    bn.register_forward_pre_hook(lambda m, args, kwargs: calls.append("pre"), with_kwargs=True)
    bn.register_forward_hook(lambda m, args, out: out * 2 + 1)
    bn.register_full_backward_hook(lambda m, grad_in, grad_out: calls.append("backward"))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    expected = model(x)
    expected.sum().backward()
    assert calls == ["pre", "backward"]
    converted = batchnorm.convert(copy.deepcopy(model), to=to)
    calls.clear()
    y = converted(x)
    y.sum().backward()
    assert calls == ["pre", "backward"]
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:`torch.nn.utils.weight_norm` is deprecated:FutureWarning")
@pytest.mark.parametrize("wrap", ["weight_norm", "spectral_norm"])
def test_convert_refuses_an_old_style_hooked_scale(wrap):
    """torch.nn.utils.weight_norm(bn) computes bn.weight from weight_g and weight_v in a hook;
    convert took the computed tensor as gamma, so training moved another parameter (after 3
    SGD steps the scales differed by orders of magnitude), silently."""
    bn = getattr(nn.utils, wrap)(nn.BatchNorm2d(4))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bn)
    with pytest.raises(ValueError, match=rf"torch.nn.utils.{wrap}'s forward hook"):
        batchnorm.convert(model)
    assert model[1] is bn


def test_convert_of_a_lazy_batch_norm_does_not_carry_its_initialisation_hook():
    """carry_hooks copied LazyModuleMixin's own _infer_parameters pre-hook (a bound method of
    the torch module): the converted layer's first call raised AttributeError
    ('_initialize_hook'), and a lazy round trip back to torch ('initialize_parameters')."""

    def lazy_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d())

    x = torch.randn(2, 3, 5, 5)
    converted = batchnorm.convert(lazy_model())
    assert converted(x).shape == (2, 4, 5, 5) and converted[1].num_features == 4
    back = batchnorm.convert(batchnorm.convert(lazy_model()), to="torch")
    torch.testing.assert_close(back(x), lazy_model()(x))


def test_a_converted_model_that_calls_its_batch_norm_with_input_keeps_working():
    """torch's batch norms name their input `input`; after convert, `self.bn(input=h)` raised
    "unexpected keyword argument 'input'"."""

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(input=self.linear(x))

    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(8, 3)
    expected = model(x)
    converted = batchnorm.convert(model)
    assert isinstance(converted.bn, batchnorm.BatchNormalization)
    torch.testing.assert_close(converted(x), expected)
    with pytest.raises(TypeError, match="as `x` or as `input`"):
        converted.bn(x[:, :1].repeat(1, 4), input=x[:, :1].repeat(1, 4))


class _RunningStatisticsBatchNorm(nn.BatchNorm2d):
    """A fine-tuning idiom: always normalise with the running statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
        )


def test_a_subclass_overriding_forward_is_refused_not_converted_as_a_plain_batch_norm():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), _RunningStatisticsBatchNorm(4))
    with pytest.raises(ValueError, match=r"_RunningStatisticsBatchNorm.*overrides forward"):
        batchnorm.convert(model)
    assert isinstance(model[1], _RunningStatisticsBatchNorm)  # nothing replaced
    with pytest.raises(ValueError, match="overrides forward"):
        batchnorm.from_torch(_RunningStatisticsBatchNorm(4))


def test_tracking_switched_off_after_training_keeps_torchs_outputs_and_buffers():
    torch.manual_seed(0)
    module = nn.BatchNorm2d(3)
    for _ in range(5):
        module(torch.randn(8, 3, 4, 4) * 2 + 5)
    module.track_running_stats = False  # torch: batch statistics in training, stored ones in eval
    layer = batchnorm.from_torch(copy.deepcopy(module))
    x = torch.randn(4, 3, 4, 4) * 2 + 5
    for mode in (True, False, True):
        module.train(mode)
        layer.train(mode)
        torch.testing.assert_close(layer(x), module(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.moving_mean, module.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(layer.moving_variance, module.running_var, rtol=0, atol=0)
    back = batchnorm.to_torch(layer).eval()
    torch.testing.assert_close(back(x), module.eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("lazy_class", [nn.LazyBatchNorm1d, nn.LazyBatchNorm2d])
def test_a_lazy_batch_norm_without_any_tensor_converts(lazy_class):
    shape = (4, 3) if lazy_class is nn.LazyBatchNorm1d else (4, 3, 2, 2)
    x = torch.randn(shape)
    expected = lazy_class(affine=False, track_running_stats=False)(x)
    layer = batchnorm.from_torch(lazy_class(affine=False, track_running_stats=False))
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    model = batchnorm.convert(nn.Sequential(lazy_class(affine=False, track_running_stats=False)))
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_a_lazy_batch_norm_keeps_the_dtype_it_materialises_with():
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=torch.float64) * 1e-4 + 1e4
    module = nn.LazyBatchNorm1d(dtype=torch.float64)
    layer = batchnorm.from_torch(nn.LazyBatchNorm1d(dtype=torch.float64))
    module(x)
    layer(x)
    assert layer.moving_mean.dtype == torch.float64
    torch.testing.assert_close(layer.moving_mean, module.running_mean, rtol=1e-14, atol=0)
    assert batchnorm.to_torch(layer).weight.dtype == torch.float64


def test_torch_eps_zero_is_refused_naming_eps():
    with pytest.raises(ValueError, match=r"`eps` must be > 0.*eps=0\.0"):
        batchnorm.from_torch(nn.BatchNorm1d(3, eps=0.0))


def test_keras1_mode2_port_converts_to_torch_whatever_its_variance_estimator():
    torch.manual_seed(0)
    layer = batchnorm.BatchNormalization(4, axis=1, use_global_stats=False)
    module = batchnorm.to_torch(layer, dims=1)
    assert not module.track_running_stats
    x = torch.randn(8, 4)
    torch.testing.assert_close(module(x), layer(x, training=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("to", ["batchnorm", "torch"])
def test_an_optimizer_built_before_convert_keeps_training_gamma_and_beta(to):
    torch.manual_seed(0)

    def model() -> nn.Module:
        torch.manual_seed(0)
        batch_norm = (
            nn.BatchNorm1d(4)
            if to == "batchnorm"
            else batchnorm.BatchNormalization(4, axis=1, moving_variance_estimator="unbiased")
        )
        net = nn.Sequential(nn.Linear(3, 4), batch_norm, nn.ReLU(), nn.Linear(4, 1))
        with torch.no_grad():
            net(torch.randn(8, 3))  # built, so that to_torch knows the rank
        return net

    converted, reference = model(), model()
    optimizer = torch.optim.SGD(converted.parameters(), lr=0.5, momentum=0.9)
    reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=0.9)
    batchnorm.convert(converted, to=to)  # as torch's convert_sync_batchnorm: same Parameters
    for _ in range(5):
        x = torch.randn(16, 3)
        for net, opt in ((converted, optimizer), (reference, reference_optimizer)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for ours, theirs in zip(converted[1].parameters(), reference[1].parameters(), strict=True):
        assert not torch.equal(theirs, torch.ones_like(theirs) * theirs.flatten()[0])
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("to", ["batchnorm", "torch"])
def test_a_model_on_the_meta_device_converts(to):
    with torch.device("meta"):
        norm = (
            nn.BatchNorm2d(4)
            if to == "batchnorm"
            else batchnorm.BatchNormalization(4, axis=1, moving_variance_estimator="unbiased")
        )
        model = nn.Sequential(nn.Conv2d(3, 4, 1), norm)
    if to == "torch":
        norm.build((None, 4, 2, 2))  # the rank gives the torch class
    batchnorm.convert(model, to=to)  # torch.equal of meta tensors raised
    assert all(p.device.type == "meta" for p in model.parameters())


def test_a_frozen_layer_without_global_statistics_converts_keeping_its_statistics():
    """A frozen layer normalises with its moving statistics even where its use_global_stats
    was False; to torch it became a FrozenBatchNorm2d with track_running_stats=False and no
    running statistics, which raised on every call."""
    torch.manual_seed(0)
    layer = batchnorm.BatchNormalization(
        4, axis=1, use_global_stats=False, momentum=0.9, moving_variance_estimator="unbiased"
    )
    with torch.no_grad():
        layer.moving_mean.normal_()
        layer.moving_variance.uniform_(0.5, 2.0)
        layer.gamma.normal_()
        layer.beta.normal_()
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer)
    x = torch.randn(8, 3, 5, 5)
    model(x)
    batchnorm.freeze(model)
    h = model[0](x).detach().double()
    view = (1, -1, 1, 1)
    expected = (h - layer.moving_mean.double().reshape(view)) / torch.sqrt(
        layer.moving_variance.double().reshape(view) + layer.epsilon
    ) * layer.gamma.double().reshape(view) + layer.beta.double().reshape(view)
    converted = batchnorm.convert(copy.deepcopy(model), to="torch")
    statistics = (converted[1].running_mean.clone(), converted[1].running_var.clone())
    for mode in (False, True):
        model.train(mode)
        converted.train(mode)
        torch.testing.assert_close(converted(x).double(), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    batchnorm.unfreeze(model)
    batchnorm.unfreeze(converted)
    model.train()
    converted.train()  # batch statistics in training, as the layer's; never updated
    torch.testing.assert_close(converted(x), model(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(converted[1].running_mean, statistics[0], rtol=0, atol=0)
    torch.testing.assert_close(converted[1].running_var, statistics[1], rtol=0, atol=0)
