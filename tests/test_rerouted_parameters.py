"""gamma and beta rerouted by torch.nn.utils.parametrize (a positive gamma, a constrained
offset) or torch.nn.utils.prune (network slimming prunes batch norm scales): ``layer.gamma`` is
then computed from another parameter (``parametrizations.gamma.original``, ``gamma_orig``),
differentiably. The layer read gamma from its ``_parameters``, where a rerouted gamma is not:
it normalised without gamma (outputs off by the whole scale) and the parameter behind it got no
gradient.

Oracle: torch's ``nn.BatchNorm2d`` with the same parametrization or pruning on its weight and
bias and Keras' conventions mapped (momentum 1 - 0.99, eps 1e-3, the unbiased moving variance
that torch stores).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import batchnorm
from batchnorm import BatchNormalization, freeze, unfreeze


class Positive(nn.Module):
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value.abs() + 0.5


class Halved(nn.Module):
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value / 2


def _pair(reroute: str = "parametrize") -> tuple[BatchNormalization, nn.BatchNorm2d]:
    torch.manual_seed(0)
    ours = BatchNormalization(8, axis=1, moving_variance_estimator="unbiased")
    theirs = nn.BatchNorm2d(8, eps=1e-3, momentum=0.01)
    with torch.no_grad():
        gamma, beta = torch.empty(8).uniform_(-2, 2), torch.empty(8).uniform_(-1, 1)
        ours.gamma.copy_(gamma), ours.beta.copy_(beta)
        theirs.weight.copy_(gamma), theirs.bias.copy_(beta)
    for module, (scale, offset) in ((ours, ("gamma", "beta")), (theirs, ("weight", "bias"))):
        if reroute == "parametrize":
            parametrize.register_parametrization(module, scale, Positive())
            parametrize.register_parametrization(module, offset, Halved())
        else:  # the smallest half of each, by magnitude
            prune.l1_unstructured(module, scale, amount=0.5)
            prune.l1_unstructured(module, offset, amount=0.5)
    return ours, theirs


def _behind(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter that ``name`` is computed from."""
    if parametrize.is_parametrized(module, name):
        return module.parametrizations[name].original
    return getattr(module, f"{name}_orig")


@pytest.mark.parametrize("reroute", ["parametrize", "prune"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_rerouted_gamma_and_beta_follow_torchs_module(reroute, training, memory_format):
    ours, theirs = _pair(reroute)
    ours.train(training), theirs.train(training)
    for step in range(3):  # the second call takes the layer's shortcut where one applies
        x = (torch.randn(16, 8, 5, 5) * 3 + 1).to(memory_format=memory_format)
        ours_x, theirs_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours_y, theirs_y = ours(ours_x), theirs(theirs_x)
        torch.testing.assert_close(ours_y, theirs_y, rtol=1e-5, atol=1e-5)
        upstream = torch.randn_like(x)
        ours_y.backward(upstream), theirs_y.backward(upstream)
        torch.testing.assert_close(ours_x.grad, theirs_x.grad, rtol=1e-4, atol=1e-5)
        for name, torch_name in (("gamma", "weight"), ("beta", "bias")):
            ours_original, theirs_original = _behind(ours, name), _behind(theirs, torch_name)
            assert ours_original.grad is not None, (step, name)
            torch.testing.assert_close(
                ours_original.grad, theirs_original.grad, rtol=1e-4, atol=1e-4
            )
        torch.testing.assert_close(ours.moving_mean, theirs.running_mean)
        torch.testing.assert_close(ours.moving_variance, theirs.running_var)


@pytest.mark.parametrize("reroute", ["parametrize", "prune"])
def test_trainable_and_freeze_reach_the_parameters_behind(reroute):
    ours, _ = _pair(reroute)
    originals = [_behind(ours, n) for n in ("gamma", "beta")]
    ours.trainable = False
    assert not any(p.requires_grad for p in originals)
    ours.trainable = True
    assert all(p.requires_grad for p in originals)
    model = nn.Sequential(ours)
    freeze(model)
    assert not any(p.requires_grad for p in originals)
    unfreeze(model)
    assert all(p.requires_grad for p in originals)


def test_a_parametrized_layer_round_trips_its_state_dict():
    ours, _ = _pair()
    ours(torch.randn(4, 8, 3, 3), training=True)
    state = ours.state_dict()
    assert "parametrizations.gamma.original" in state
    fresh, _ = _pair()
    fresh.load_state_dict(state)
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(fresh(x, training=False), ours(x, training=False), rtol=0, atol=0)


class Doubled(nn.Module):
    """An invertible parametrization: assigning the parametrized tensor writes right_inverse."""

    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value * 2

    def right_inverse(self, value: torch.Tensor) -> torch.Tensor:
        return value / 2


@pytest.mark.parametrize("reroute", ["parametrize", "prune"])
def test_set_weights_and_constraints_write_the_parameters_behind(reroute):
    """set_weights and constraints wrote into the computed gamma, which the next access or call
    computed afresh: they were lost. Oracle: torch's module given the same value the way torch
    writes one (assigning a parametrized weight, loading a pruned one's original)."""
    torch.manual_seed(0)
    ours = BatchNormalization(8, axis=1, moving_variance_estimator="unbiased")
    ours.gamma_constraint = lambda gamma: gamma.clamp(min=0.25)
    theirs = nn.BatchNorm2d(8, eps=1e-3, momentum=0.01)
    if reroute == "parametrize":
        parametrize.register_parametrization(ours, "gamma", Doubled())
        parametrize.register_parametrization(theirs, "weight", Doubled())
    else:
        prune.l1_unstructured(ours, "gamma", amount=0.5)
        prune.l1_unstructured(theirs, "weight", amount=0.5)
        theirs.weight_mask.copy_(ours.gamma_mask)
    gamma, beta = torch.linspace(-1, 2, 8), torch.linspace(-1, 1, 8)
    ours.set_weights([gamma.numpy(), beta.numpy(), torch.zeros(8).numpy(), torch.ones(8).numpy()])
    with torch.no_grad():
        theirs.bias.copy_(beta)
        if reroute == "parametrize":
            theirs.weight = gamma
        else:
            theirs.weight_orig.copy_(gamma)
    expected_gamma = gamma if reroute == "parametrize" else gamma * ours.gamma_mask
    torch.testing.assert_close(torch.from_numpy(ours.get_weights()[0]), expected_gamma)
    x = torch.randn(4, 8, 3, 3)
    torch.testing.assert_close(ours(x, training=True), theirs(x), rtol=1e-5, atol=1e-5)
    # The constraint clamps gamma at 0.25: as if torch's module had been given the clamped value.
    ours.apply_constraints()
    with torch.no_grad():
        clamped = theirs.weight.clamp(min=0.25)
        if reroute == "parametrize":
            theirs.weight = clamped
        else:
            theirs.weight_orig.copy_(clamped)
    torch.testing.assert_close(ours(x, training=True), theirs(x), rtol=1e-5, atol=1e-5)


def test_set_weights_refuses_a_parametrization_without_right_inverse_and_writes_nothing():
    ours, _ = _pair()  # Positive has no right_inverse
    ours(torch.randn(4, 8, 3, 3), training=True)
    before = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    arrays = [torch.full((8,), 3.0).numpy()] * 4
    with pytest.raises(ValueError, match=r"`gamma` is parametrized by Positive.*right_inverse"):
        ours.set_weights(arrays)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_a_parametrized_layer_deep_copies():
    """A parametrized module is deep-copied member by member (parametrize's class copies
    ``__dict__``, past the layer's ``__getstate__``): the layer's lock failed to copy ("cannot
    pickle '_thread.RLock' object"), and so did deepcopy, fold and EMA copies of such a model.
    The copy steps as the original does, on its own parameters, buffers and lock. (A pruned
    module, torch's as ours, cannot be deep-copied after a call: its computed weight is not a
    graph leaf.)"""
    ours, _ = _pair("parametrize")
    x = torch.randn(4, 8, 3, 3)
    ours(x, training=True)
    copied = copy.deepcopy(ours)
    assert copied._update_lock is not ours._update_lock
    for (name, a), (_, b) in zip(ours.named_parameters(), copied.named_parameters(), strict=True):
        assert a is not b and torch.equal(a, b), name
    later = torch.randn(4, 8, 3, 3) * 2 + 1
    torch.testing.assert_close(copied(later, training=True), ours(later, training=True))
    torch.testing.assert_close(copied.moving_variance, ours.moving_variance)
    torch.testing.assert_close(copied(later, training=False), ours(later, training=False))


@pytest.mark.parametrize("reroute", ["Doubled", "Positive", "prune"])
def test_reset_parameters_resets_the_parameters_behind(reroute):
    """``reset_parameters`` skipped a rerouted gamma and beta, so a meta-device model
    (``to_empty`` then ``reset_parameters``) kept uninitialised memory behind them. Oracle:
    torch's module made afresh with the same rerouting, whose originals registration or pruning
    set from the initial values (through right_inverse, or unchanged where there is none)."""
    ours = BatchNormalization(8, axis=1, beta_initializer="ones")
    theirs = nn.BatchNorm2d(8)
    with torch.no_grad():
        theirs.bias.fill_(1.0)
    for module, names in ((ours, ("gamma", "beta")), (theirs, ("weight", "bias"))):
        for name in names:
            if reroute == "prune":
                prune.random_unstructured(module, name, amount=0.5)
            else:
                parametrization = Doubled() if reroute == "Doubled" else Positive()
                parametrize.register_parametrization(module, name, parametrization)
    if reroute == "prune":
        theirs.weight_mask.copy_(ours.gamma_mask), theirs.bias_mask.copy_(ours.beta_mask)
        theirs.weight = theirs.weight_orig * theirs.weight_mask  # as its next call would
        theirs.bias = theirs.bias_orig * theirs.bias_mask
    with torch.no_grad():  # a training run, or to_empty's garbage, moves the parameters behind
        for name in ("gamma", "beta"):
            _behind(ours, name).uniform_(-5, 5)
        ours.moving_mean.fill_(3.0)
    ours.reset_parameters()
    for name, torch_name in (("gamma", "weight"), ("beta", "bias")):
        torch.testing.assert_close(_behind(ours, name), _behind(theirs, torch_name))
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, torch_name))
    torch.testing.assert_close(ours.moving_mean, torch.zeros(8))


def test_constraints_check_both_weights_before_writing_either():
    """A constraint on gamma (plain) and beta (parametrized without right_inverse): the refusal
    came after gamma had been projected. Now nothing is written."""
    ours = BatchNormalization(8, axis=1)
    ours.gamma_constraint = lambda gamma: gamma.clamp(max=0.5)
    ours.beta_constraint = lambda beta: beta.clamp(max=0.5)
    parametrize.register_parametrization(ours, "beta", Positive())
    before = {name: tensor.clone() for name, tensor in ours.state_dict().items()}
    with pytest.raises(ValueError, match=r"`beta` is parametrized by Positive.*right_inverse"):
        ours.apply_constraints()
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("reroute", ["parametrize", "prune"])
def test_conversions_carry_the_rerouting_over(reroute):
    """convert (and from_torch, to_torch) took the computed scale and offset, the
    parametrization or the mask baked in: a converted model trained on without its constraint
    or its pruning. The converted module computes the same values from copies of the same
    parameters behind them, and trains them as torch's module does."""
    _, theirs = _pair(reroute)
    converted = batchnorm.convert(theirs, to="batchnorm")  # a new module: theirs stays
    assert isinstance(converted, BatchNormalization)
    names = (("gamma", "weight"), ("beta", "bias"))
    for name, torch_name in names:
        assert torch.equal(_behind(converted, name), _behind(theirs, torch_name))
        assert _behind(converted, name) is not _behind(theirs, torch_name)
    if reroute == "prune":
        assert torch.equal(converted.gamma_mask, theirs.weight_mask)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (converted, theirs)]
    for _ in range(2):
        x = torch.randn(16, 8, 5, 5) * 3 + 1
        upstream = torch.randn_like(x)
        for module, optimizer in zip((converted, theirs), optimizers, strict=True):
            optimizer.zero_grad()
            module(x).backward(upstream)
            optimizer.step()
        for name, torch_name in names:
            torch.testing.assert_close(
                _behind(converted, name), _behind(theirs, torch_name), rtol=1e-4, atol=1e-5
            )
            torch.testing.assert_close(getattr(converted, name), getattr(theirs, torch_name))
    back = batchnorm.convert(nn.Sequential(converted), to="torch")[0]
    assert isinstance(back, nn.BatchNorm2d)
    for name, torch_name in names:
        assert torch.equal(_behind(back, torch_name), _behind(converted, name))
    if reroute == "parametrize":
        assert [type(p) for p in back.parametrizations.weight] == [Positive]
    x = torch.randn(4, 8, 5, 5)
    converted.eval(), back.eval()
    torch.testing.assert_close(back(x), converted(x), rtol=1e-5, atol=1e-5)
