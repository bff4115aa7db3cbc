"""gamma and beta under torch.nn.utils.parametrize (a positive gamma, a constrained offset):
``layer.gamma`` is then ``f(original)``, computed on each access and differentiable to the
original. The layer read gamma from its ``_parameters``, where a parametrized gamma is not:
it normalised without gamma (outputs off by the whole scale) and the original got no gradient.

Oracle: torch's ``nn.BatchNorm2d`` with the same parametrization on its weight and bias and
Keras' conventions mapped (momentum 1 - 0.99, eps 1e-3, the unbiased moving variance that
torch stores).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from batchnorm import BatchNormalization, freeze, unfreeze


class Positive(nn.Module):
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value.abs() + 0.5


class Halved(nn.Module):
    def forward(self, value: torch.Tensor) -> torch.Tensor:
        return value / 2


def _pair() -> tuple[BatchNormalization, nn.BatchNorm2d]:
    torch.manual_seed(0)
    ours = BatchNormalization(8, axis=1, moving_variance_estimator="unbiased")
    theirs = nn.BatchNorm2d(8, eps=1e-3, momentum=0.01)
    with torch.no_grad():
        gamma, beta = torch.empty(8).uniform_(-2, 2), torch.empty(8).uniform_(-1, 1)
        ours.gamma.copy_(gamma), ours.beta.copy_(beta)
        theirs.weight.copy_(gamma), theirs.bias.copy_(beta)
    for module, (scale, offset) in ((ours, ("gamma", "beta")), (theirs, ("weight", "bias"))):
        parametrize.register_parametrization(module, scale, Positive())
        parametrize.register_parametrization(module, offset, Halved())
    return ours, theirs


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_parametrized_gamma_and_beta_follow_torchs_module(training, memory_format):
    ours, theirs = _pair()
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
            ours_original = ours.parametrizations[name].original
            theirs_original = theirs.parametrizations[torch_name].original
            assert ours_original.grad is not None, (step, name)
            torch.testing.assert_close(
                ours_original.grad, theirs_original.grad, rtol=1e-4, atol=1e-4
            )
        torch.testing.assert_close(ours.moving_mean, theirs.running_mean)
        torch.testing.assert_close(ours.moving_variance, theirs.running_var)


def test_trainable_and_freeze_reach_the_originals():
    ours, _ = _pair()
    originals = [ours.parametrizations[n].original for n in ("gamma", "beta")]
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
