"""reset_parameters and reset_running_stats, as torch's batch norm modules have them: what a
model made on the meta device (``torch.device("meta")``, then ``to_empty``: FSDP, large-model
initialisation) calls on each module for its initial values. The layer had neither, so its
weights and moving statistics kept whatever the empty memory held.

Oracle: a layer constructed (and built) the ordinary way with the same arguments, whose
initializers wrote its initial values.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from batchnorm import BatchNormalization


def _counting(shape, dtype=None, device=None):
    """An initializer whose values show the shape it was given (Keras' shape, at the build)."""
    return torch.arange(math.prod(shape), dtype=dtype, device=device).reshape(shape) + len(shape)


_OPTIONS = {
    "plain": {},
    "renorm, debiased": {"renorm": True, "moving_average": "debiased"},
    "initializers": {
        "gamma_initializer": _counting,
        "beta_initializer": "ones",
        "moving_mean_initializer": _counting,
        "moving_variance_initializer": "ones",
    },
    # ghost batches: Keras' weight shape has the batch dims, (1, 1, C, 1, 1) here
    "ghost batches": {"virtual_batch_size": 4, "gamma_initializer": _counting},
}


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in module.state_dict().items()}


@pytest.mark.parametrize("options", list(_OPTIONS))
def test_a_model_made_on_the_meta_device_resets_to_the_initial_values(options):
    kwargs = _OPTIONS[options]
    torch.manual_seed(0)
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormalization(4, axis=1, **kwargs))
    model.to_empty(device="cpu")
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    expected = _state(BatchNormalization(4, axis=1, **kwargs))
    assert _state(model[1]).keys() == expected.keys()
    for name, tensor in _state(model[1]).items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("options", list(_OPTIONS))
def test_reset_running_stats_leaves_gamma_and_beta(options):
    kwargs = _OPTIONS[options]
    x = torch.randn(8, 4, 5, 5) * 3 + 1
    fresh = BatchNormalization(axis=1, **kwargs)
    fresh(x, training=False)  # built on the input: initializers saw Keras' shape
    initial = _state(fresh)
    layer = BatchNormalization(axis=1, **kwargs)
    layer(x, training=True).sum().backward()
    with torch.no_grad():
        layer.gamma.add_(0.5), layer.beta.sub_(0.25)
    trained = _state(layer)
    layer.reset_running_stats()
    for name, tensor in _state(layer).items():
        if name in ("gamma", "beta"):
            assert torch.equal(tensor, trained[name]), name
        else:
            assert torch.equal(tensor, initial[name]), name
    layer.reset_parameters()
    for name, tensor in _state(layer).items():
        assert torch.equal(tensor, initial[name]), name


def test_an_unbuilt_layer_has_nothing_to_reset():
    layer = BatchNormalization()
    layer.reset_parameters()
    layer.reset_running_stats()
    assert not layer.built
    y = layer(torch.randn(4, 3), training=True)
    assert y.shape == (4, 3)
