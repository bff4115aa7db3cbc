"""convert / from_torch of batch norms fused with an activation (timm, inplace_abn), and a layer's
activation on the way back to torch.

Neither timm nor inplace_abn is installed: the modules below copy their attributes and forward
(timm 1.0 ``timm/layers/norm_act.py``; inplace_abn 1.1 ``inplace_abn/abn.py`` and, for
InPlaceABN, its kernels' ``|weight| + eps`` scale in ``src/inplace_abn_cpu.cpp``) onto
torch.nn.functional, which is the oracle.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm

TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}
CHANNELS = 3


class BatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.norm_act.BatchNormAct2d: BatchNorm2d, then ``drop``, then ``act``."""

    def __init__(
        self,
        num_features: int,
        *,
        act: nn.Module | None = None,
        drop: nn.Module | None = None,
        **kwargs: object,
    ) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        exponential_average_factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                exponential_average_factor = 1.0 / float(self.num_batches_tracked)
            else:
                exponential_average_factor = self.momentum
        if self.training:
            bn_training = True
        else:
            bn_training = (self.running_mean is None) and (self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            exponential_average_factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


def conv_model_with_dropout_inside_a_batch_norm() -> nn.Sequential:
    """Conv, timm's BatchNormAct2d holding a Dropout as ``drop``, conv, BatchNorm2d; eval mode."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3),
        BatchNormAct2d(4, act=nn.ReLU(), drop=nn.Dropout(0.5)),
        nn.Conv2d(4, 4, 1),
        nn.BatchNorm2d(4),
    ).eval()


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm.layers.norm_act.SyncBatchNormAct: SyncBatchNorm, then ``drop`` and ``act`` if set."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class ABN(nn.Module):
    """inplace_abn.ABN: F.batch_norm, then the named activation."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
    ) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activation
        self.activation_param = activation_param
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_parameter("running_mean", None)
            self.register_parameter("running_var", None)
            self.register_parameter("num_batches_tracked", None)

    def _get_momentum_and_training(self) -> tuple[float, bool]:
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked = self.num_batches_tracked + 1
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked)
        training = self.training or (self.running_mean is None and self.running_var is None)
        return momentum, training

    def _get_running_stats(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        keep = not self.training or self.track_running_stats
        return (self.running_mean, self.running_var) if keep else (None, None)

    def _scale(self) -> torch.Tensor | None:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        momentum, training = self._get_momentum_and_training()
        running_mean, running_var = self._get_running_stats()
        x = F.batch_norm(
            x, running_mean, running_var, self._scale(), self.bias, training, momentum, self.eps
        )
        if self.activation == "relu":
            return F.relu(x)
        if self.activation == "leaky_relu":
            return F.leaky_relu(x, negative_slope=self.activation_param)
        if self.activation == "elu":
            return F.elu(x, alpha=self.activation_param)
        if self.activation == "identity":
            return x
        raise RuntimeError(f"Unknown activation function {self.activation}")


class InPlaceABN(ABN):
    """inplace_abn.InPlaceABN: its kernels scale by ``|weight| + eps`` and know no relu."""

    def _scale(self) -> torch.Tensor | None:
        return None if self.weight is None else self.weight.abs() + self.eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.activation not in ("leaky_relu", "elu", "identity"):
            raise ValueError(f"Unknown activation function {self.activation}")
        return super().forward(x)


class InPlaceABNSync(InPlaceABN):
    """inplace_abn.InPlaceABNSync without torch.distributed: InPlaceABN, plus a ``group``."""

    def __init__(self, num_features: int, group: object = None, **kwargs: object) -> None:
        super().__init__(num_features, **kwargs)  # type: ignore[arg-type]
        self.group = group


def _batches(steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        batch = 3 + step % 3
        scale = 1.0 + step % 2
        shape = (batch, CHANNELS, 4, 3)
        yield torch.randn(shape, generator=generator, dtype=torch.float64) * scale + 0.3 * step


def _randomised(module: nn.Module, *, negative_weights: bool = False) -> nn.Module:
    """``module`` in float64 with affine parameters away from their initial values (and from 0)."""
    module.double()
    generator = torch.Generator().manual_seed(7)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    if weight is not None:
        with torch.no_grad():
            magnitude = torch.rand(CHANNELS, generator=generator, dtype=torch.float64) + 0.5
            weight.copy_(magnitude * torch.tensor([1.0, -1.0, 1.0] if negative_weights else 1.0))
            bias.copy_(torch.rand(CHANNELS, generator=generator, dtype=torch.float64) - 0.5)
    return module


def _randomised_layer(layer: batchnorm.BatchNormalization) -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        layer.gamma.copy_(torch.rand(CHANNELS, generator=generator, dtype=torch.float64) + 0.5)
        layer.beta.copy_(torch.rand(CHANNELS, generator=generator, dtype=torch.float64) - 0.5)


def _affine(module: nn.Module) -> list[torch.Tensor]:
    if isinstance(module, batchnorm.BatchNormalization):
        return [
            t
            for t in (getattr(module, "gamma", None), getattr(module, "beta", None))
            if t is not None
        ]
    return [t for t in (module.weight, module.bias) if t is not None]


def _statistics(module: nn.Module) -> list[torch.Tensor]:
    if isinstance(module, batchnorm.BatchNormalization):
        return [module.moving_mean, module.moving_variance]
    return [t for t in (module.running_mean, module.running_var) if t is not None]


def _the_batch_norm(module: nn.Module) -> nn.Module:
    kinds = (batchnorm.BatchNormalization, nn.modules.batchnorm._BatchNorm, ABN)
    found = [m for m in module.modules() if isinstance(m, kinds)]
    assert len(found) == 1
    return found[0]


def _train_side_by_side(
    reference: nn.Module,
    converted: nn.Module,
    *,
    steps: int = 4,
    in_place: bool = False,
    gradient_factor: torch.Tensor | None = None,
) -> None:
    """Train both with SGD on the same batches, then evaluate: outputs, input and parameter
    gradients and running statistics equal at every step.

    ``in_place``: the converted layer overwrites its input, so it gets a non-leaf copy, and its
    input must hold the output afterwards. ``gradient_factor``: gamma's gradient is weight's
    times this (InPlace-ABN's ``d|w| / dw = sign(w)``).
    """
    layer, reference_batch_norm = _the_batch_norm(converted), _the_batch_norm(reference)
    reference_parameters, layer_parameters = _affine(reference_batch_norm), _affine(layer)
    optimizers = [
        torch.optim.SGD(parameters, lr=0.05)
        for parameters in (reference_parameters, layer_parameters)
        if parameters
    ]
    reference.train()
    converted.train()
    for step, x in enumerate(_batches(steps)):
        x_reference, x_layer = x.clone().requires_grad_(), x.clone().requires_grad_()
        torch.manual_seed(step)  # the same dropout masks
        y_reference = reference(x_reference)
        torch.manual_seed(step)
        layer_input = x_layer * 1.0 if in_place else x_layer
        y_layer = converted(layer_input)
        torch.testing.assert_close(y_layer, y_reference, **TOLERANCE)
        if in_place:
            assert layer_input.data_ptr() == y_layer.data_ptr()
        upstream = torch.cos(torch.arange(x.numel(), dtype=torch.float64)).reshape(x.shape)
        for optimizer in optimizers:
            optimizer.zero_grad()
        (y_reference * upstream).sum().backward()
        (y_layer * upstream).sum().backward()
        torch.testing.assert_close(x_layer.grad, x_reference.grad, **TOLERANCE)
        pairs = zip(layer_parameters, reference_parameters, strict=True)
        for index, (ours, theirs) in enumerate(pairs):
            factor = gradient_factor if index == 0 and gradient_factor is not None else 1.0
            torch.testing.assert_close(ours.grad, theirs.grad * factor, **TOLERANCE)
        _assert_same_statistics(layer, reference_batch_norm)
        for optimizer in optimizers:
            optimizer.step()
    reference.eval()
    converted.eval()
    for x in _batches(2, seed=1):
        # A copy each: InPlace-ABN overwrites its input in inference too when it has no
        # running statistics (batch statistics), and so does the layer.
        torch.testing.assert_close(converted(x.clone()), reference(x.clone()), **TOLERANCE)
    _assert_same_statistics(layer, reference_batch_norm)


def _assert_same_statistics(ours: nn.Module, reference: nn.Module) -> None:
    """Running statistics equal, where the reference keeps them (the layer always does)."""
    expected = _statistics(reference)
    if expected:
        for actual, wanted in zip(_statistics(ours), expected, strict=True):
            torch.testing.assert_close(actual, wanted, **TOLERANCE)


OPTIONS = [
    {},
    {"momentum": None},
    {"momentum": 0.3, "eps": 1e-3, "affine": False},
    {"track_running_stats": False},
]

FUSED_ACTIVATIONS = [
    pytest.param(lambda: nn.ReLU(inplace=True), "relu", None, id="ReLU"),
    pytest.param(lambda: nn.LeakyReLU(0.2), "leaky_relu", 0.2, id="LeakyReLU(0.2)"),
    pytest.param(lambda: nn.LeakyReLU(-0.5), "leaky_relu", -0.5, id="LeakyReLU(-0.5)"),
    pytest.param(lambda: nn.ELU(alpha=0.7), "elu", 0.7, id="ELU(0.7)"),
    pytest.param(nn.Identity, None, None, id="Identity"),
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(("make_act", "activation", "parameter"), FUSED_ACTIVATIONS)
def test_timm_batch_norm_act_becomes_one_layer_with_its_activation(
    make_act, activation, parameter, options
):
    reference = _randomised(BatchNormAct2d(CHANNELS, act=make_act(), **options))
    converted = batchnorm.convert(copy.deepcopy(reference))
    assert isinstance(converted, batchnorm.BatchNormalization)
    assert (converted.activation, converted.activation_param) == (activation, parameter)
    assert converted.memory == "default" and not converted.synchronized
    _train_side_by_side(reference, converted)


def test_from_torch_of_timm_batch_norm_act_sets_the_activation_and_keeps_the_mode():
    reference = _randomised(BatchNormAct2d(CHANNELS, act=nn.ELU(alpha=0.3))).eval()
    layer = batchnorm.from_torch(reference)
    assert (layer.activation, layer.activation_param, layer.training) == ("elu", 0.3, False)
    torch.testing.assert_close(layer.gamma, reference.weight, rtol=0, atol=0)


def test_timm_sync_batch_norm_act_becomes_a_synchronized_layer_with_its_activation():
    reference = _randomised(BatchNormAct2d(CHANNELS, act=nn.LeakyReLU(0.1), momentum=0.2))
    synchronized = SyncBatchNormAct(CHANNELS, momentum=0.2).double()
    synchronized.load_state_dict(reference.state_dict())
    synchronized.act = nn.LeakyReLU(0.1)  # as timm's convert_sync_batchnorm sets it
    layer = batchnorm.from_torch(synchronized)
    assert layer.synchronized and (layer.activation, layer.activation_param) == ("leaky_relu", 0.1)
    # Without torch.distributed the synchronized layer computes as one process.
    _train_side_by_side(reference, layer)


@pytest.mark.parametrize(
    ("make_act", "make_drop"),
    [
        pytest.param(lambda: nn.SiLU(inplace=True), None, id="SiLU"),
        pytest.param(nn.GELU, None, id="GELU"),
        pytest.param(nn.ReLU6, None, id="ReLU6"),  # not nn.ReLU: the exact class is required
        pytest.param(lambda: nn.ELU(alpha=-0.5), None, id="ELU(-0.5)"),  # the layer needs > 0
        pytest.param(lambda: nn.ReLU(inplace=True), lambda: nn.Dropout(0.3), id="Dropout-ReLU"),
        pytest.param(nn.Identity, lambda: nn.Dropout(0.3), id="Dropout"),
    ],
)
def test_timm_activation_the_layer_cannot_compute_is_kept_after_it(make_act, make_drop):
    drop = make_drop() if make_drop is not None else None
    reference = _randomised(BatchNormAct2d(CHANNELS, act=make_act(), drop=drop))
    model = copy.deepcopy(reference)
    converted = batchnorm.convert(model)
    assert isinstance(converted, nn.Sequential)
    assert isinstance(converted[0], batchnorm.BatchNormalization)
    assert converted[0].activation is None
    expected = [m for m in (model.drop, model.act) if type(m) is not nn.Identity]
    assert list(converted)[1:] == expected  # the same modules, not copies
    _train_side_by_side(reference, converted)
    with pytest.raises(ValueError, match=r"from_torch returns one layer.*batchnorm.convert"):
        batchnorm.from_torch(copy.deepcopy(reference))


def test_convert_replaces_timm_modules_inside_a_model():
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Conv2d(CHANNELS, CHANNELS, 3, padding=1),
        BatchNormAct2d(CHANNELS, act=nn.LeakyReLU(0.1)),
        nn.Conv2d(CHANNELS, CHANNELS, 1),
        BatchNormAct2d(CHANNELS, act=nn.SiLU()),
        ABN(CHANNELS, activation="elu", activation_param=0.5),
    ).double()
    model = batchnorm.convert(copy.deepcopy(reference))
    assert isinstance(model[1], batchnorm.BatchNormalization)
    assert model[1].activation == "leaky_relu"
    assert isinstance(model[3], nn.Sequential) and isinstance(model[3][1], nn.SiLU)
    assert isinstance(model[4], batchnorm.BatchNormalization) and model[4].activation == "elu"
    for x in _batches(3):
        torch.testing.assert_close(model(x), reference(x), **TOLERANCE)
    model.eval()
    reference.eval()
    x = next(_batches(1, seed=2))
    torch.testing.assert_close(model(x), reference(x), **TOLERANCE)
    back = batchnorm.convert(model, to="torch")
    assert type(back[1]) is nn.Sequential and type(back[1][0]) is nn.BatchNorm2d
    assert type(back[1][1]) is nn.LeakyReLU and back[1][1].negative_slope == 0.1
    assert type(back[3][0]) is nn.BatchNorm2d and type(back[4][1]) is nn.ELU
    torch.testing.assert_close(back(x), reference(x), **TOLERANCE)


ABN_ACTIVATIONS = [
    ("relu", 0.01, None),  # ABN's default activation_param stays unused, as in ABN
    ("leaky_relu", 0.01, 0.01),
    ("leaky_relu", 0.3, 0.3),
    ("elu", 1.0, 1.0),
    ("elu", 0.4, 0.4),
    ("identity", 0.01, None),
]


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(("activation", "parameter", "layer_parameter"), ABN_ACTIVATIONS)
def test_abn_becomes_a_layer_with_its_activation(activation, parameter, layer_parameter, options):
    reference = _randomised(
        ABN(CHANNELS, activation=activation, activation_param=parameter, **options),
        negative_weights=True,
    )
    converted = batchnorm.convert(copy.deepcopy(reference))
    assert isinstance(converted, batchnorm.BatchNormalization)
    assert (converted.activation, converted.activation_param) == (activation, layer_parameter)
    assert converted.memory == "default"
    if reference.affine:
        torch.testing.assert_close(converted.gamma, reference.weight, rtol=0, atol=0)
    _train_side_by_side(reference, converted)


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize(
    ("activation", "parameter"),
    [("leaky_relu", 0.01), ("leaky_relu", 0.3), ("elu", 0.4), ("identity", 0.01)],
)
def test_in_place_abn_trains_in_place_with_its_absolute_scale(activation, parameter, options):
    reference = _randomised(
        InPlaceABN(CHANNELS, activation=activation, activation_param=parameter, **options),
        negative_weights=True,
    )
    layer = batchnorm.from_torch(copy.deepcopy(reference))
    assert layer.memory == "in_place" and not layer.synchronized
    sign = None
    if reference.affine:
        torch.testing.assert_close(layer.gamma, reference.weight.abs() + reference.eps, **TOLERANCE)
        sign = torch.sign(reference.weight.detach())
    _train_side_by_side(reference, layer, in_place=True, gradient_factor=sign)
    if reference.affine:  # SGD took the same steps on |w| + eps and on gamma (w kept its sign)
        assert torch.equal(torch.sign(reference.weight.detach()), sign)
        torch.testing.assert_close(layer.gamma, reference.weight.abs() + reference.eps, **TOLERANCE)


def test_in_place_abn_sync_becomes_a_synchronized_layer_that_does_not_train_in_place():
    reference = _randomised(
        InPlaceABNSync(CHANNELS, activation="elu", activation_param=0.5), negative_weights=True
    )
    layer = batchnorm.from_torch(copy.deepcopy(reference))
    assert layer.synchronized and layer.memory == "default" and layer.process_group is None
    # Without torch.distributed both compute as one process.
    _train_side_by_side(reference, layer, gradient_factor=torch.sign(reference.weight.detach()))
    with pytest.raises(TypeError, match=r"`process_group` must be.*Received: process_group='g'"):
        batchnorm.from_torch(InPlaceABNSync(CHANNELS, group="g"))  # the group is passed on


def test_layer_with_activation_converts_to_torch_batch_norm_then_activation():
    for activation, parameter, torch_class in [
        ("relu", None, nn.ReLU),
        ("leaky_relu", None, nn.LeakyReLU),
        ("leaky_relu", 0.25, nn.LeakyReLU),
        ("elu", None, nn.ELU),
        ("elu", 0.6, nn.ELU),
    ]:
        layer = batchnorm.BatchNormalization.like(
            "torch", CHANNELS, activation=activation, activation_param=parameter, dtype="float64"
        )
        _randomised_layer(layer)
        layer.build((2, CHANNELS, 4, 3))
        reference = copy.deepcopy(layer)
        back = batchnorm.convert(layer, to="torch")
        assert isinstance(back, nn.Sequential) and len(back) == 2
        assert type(back[0]) is nn.BatchNorm2d and type(back[1]) is torch_class
        if activation == "leaky_relu":
            assert back[1].negative_slope == (0.01 if parameter is None else parameter)
        if activation == "elu":
            assert back[1].alpha == (1.0 if parameter is None else parameter)
        _train_side_by_side(reference, back)


def test_layer_without_activation_still_converts_to_a_plain_torch_batch_norm():
    for activation in (None, "identity"):
        layer = batchnorm.BatchNormalization.like("torch", CHANNELS, activation=activation)
        layer.build((2, CHANNELS, 4, 3))
        assert type(batchnorm.convert(layer, to="torch")) is nn.BatchNorm2d
        assert type(batchnorm.to_torch(layer)) is nn.BatchNorm2d


def test_in_place_layer_converts_to_torch_with_the_same_numbers():
    reference = _randomised(InPlaceABN(CHANNELS, activation="leaky_relu", activation_param=0.2))
    layer = batchnorm.from_torch(copy.deepcopy(reference))
    layer.build((2, CHANNELS, 4, 3))
    back = batchnorm.convert(layer, to="torch")
    assert type(back[0]) is nn.BatchNorm2d and type(back[1]) is nn.LeakyReLU
    _train_side_by_side(reference, back)


def test_to_torch_refuses_to_drop_an_activation():
    layer = batchnorm.BatchNormalization.like("torch", CHANNELS, activation="relu", renorm=True)
    layer.build((2, CHANNELS, 4, 3))
    with pytest.raises(ValueError, match=r"renorm=True.*activation='relu'.*convert\(layer"):
        batchnorm.to_torch(layer)
    model = nn.Sequential(layer)
    with pytest.raises(ValueError, match=r"renorm=True"):
        batchnorm.convert(model, to="torch")
    assert model[0] is layer


def test_timm_round_trip_through_torch_keeps_the_outputs():
    reference = _randomised(BatchNormAct2d(CHANNELS, act=nn.LeakyReLU(0.05), momentum=None))
    layer = batchnorm.convert(copy.deepcopy(reference))
    layer.build((2, CHANNELS, 4, 3))
    back = batchnorm.convert(layer, to="torch")
    again = batchnorm.convert(copy.deepcopy(back))
    assert isinstance(again, nn.Sequential) and isinstance(again[1], nn.LeakyReLU)
    _train_side_by_side(reference, back)


@pytest.mark.parametrize(
    ("module", "message"),
    [
        (
            InPlaceABN(CHANNELS, activation="relu"),
            r"InPlaceABN.*\['leaky_relu', 'elu', 'identity'\].*activation='relu'",
        ),
        (
            InPlaceABNSync(CHANNELS, activation="relu"),
            r"InPlaceABNSync.*Received: activation='relu'",
        ),
        (
            InPlaceABN(CHANNELS, activation="leaky_relu", activation_param=0.0),
            r"invert.*activation_param=0.0",
        ),
        (
            InPlaceABN(CHANNELS, activation="leaky_relu", activation_param=-0.1),
            r"invert.*activation_param=-0.1",
        ),
        (ABN(CHANNELS, activation="gelu"), r"ABN cannot be converted.*Received: activation='gelu'"),
        (ABN(CHANNELS, activation="elu", activation_param=-1.0), r"ABN cannot be converted.*alpha"),
    ],
)
def test_inplace_abn_modules_the_layer_cannot_reproduce_are_refused(module, message):
    with pytest.raises(ValueError, match=message):
        batchnorm.from_torch(module)
    model = nn.Sequential(nn.BatchNorm2d(CHANNELS), module)
    with pytest.raises(ValueError, match=message):
        batchnorm.convert(model)
    assert type(model[0]) is nn.BatchNorm2d  # nothing replaced


def test_unknown_batch_norm_with_an_act_module_is_refused():
    class NormAct(nn.BatchNorm2d):
        def __init__(self, num_features: int) -> None:
            super().__init__(num_features)
            self.act = nn.SiLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(super().forward(x))

    with pytest.raises(ValueError, match=r"NormAct is a torch batch norm with an `act` module"):
        batchnorm.from_torch(NormAct(CHANNELS))
    with pytest.raises(ValueError, match=r"would drop `act`"):
        batchnorm.convert(nn.Sequential(NormAct(CHANNELS)))


def test_a_class_named_abn_without_its_attributes_is_not_taken_for_inplace_abn():
    class ABN(nn.Module):  # a namesake
        pass

    with pytest.raises(TypeError, match=r"`module` must be a torch.nn.BatchNorm.*Received: ABN"):
        batchnorm.from_torch(ABN())
    model = nn.Sequential(ABN())
    assert batchnorm.convert(model) is model and type(model[0]) is ABN
