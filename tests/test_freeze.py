"""freeze / unfreeze / frozen: statistics stay fixed through model.train() and optimizer steps."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchNormalization, freeze, frozen, unfreeze
from batchnorm.tools._freeze import FrozenBatchNorm2d, is_frozen


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 5, 1),
        BatchNormalization(axis=1, momentum=0.5),
        nn.Flatten(),
        nn.Linear(5 * 9, 3),
        nn.BatchNorm1d(3),
    )
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 5, 5) * 2 + 1)
    return model


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "moving" in k}


def train_step(model: nn.Module, x: torch.Tensor) -> None:
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


def test_freeze_survives_train_and_an_optimizer_step():
    model = make_model()
    before = statistics(model)
    gamma_before = model[4].gamma.detach().clone()
    keys = list(model.state_dict())
    freeze(model)
    for _ in range(3):
        model.train()
        train_step(model, torch.randn(8, 3, 5, 5) * 3 - 2)
    for key, value in statistics(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    torch.testing.assert_close(model[4].gamma.detach(), gamma_before, rtol=0, atol=0)
    x = torch.randn(6, 3, 5, 5)
    model.train()
    with torch.no_grad():
        in_training = model(x)
    model.eval()
    with torch.no_grad():
        in_inference = model(x)
    torch.testing.assert_close(in_training, in_inference, rtol=0, atol=0)
    assert list(model.state_dict()) == keys
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[1], FrozenBatchNorm2d)
    assert model[4].use_global_stats is True
    assert not model[1].weight.requires_grad and not model[4].gamma.requires_grad


def test_freeze_statistics_only_keeps_gamma_and_beta_training():
    model = make_model()
    before = statistics(model)
    weight_before = model[1].weight.detach().clone()
    gamma_before = model[4].gamma.detach().clone()
    freeze(model, affine=False)
    model.train()
    train_step(model, torch.randn(8, 3, 5, 5))
    for key, value in statistics(model).items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert not torch.equal(model[1].weight.detach(), weight_before)
    assert not torch.equal(model[4].gamma.detach(), gamma_before)


def test_unfreeze_restores_previous_settings_and_updates_again():
    model = make_model()
    model[7].bias.requires_grad_(False)  # a choice of the user's that unfreeze must keep
    model[4].use_global_stats = False
    freeze(model)
    freeze(model)  # freezing twice remembers the original settings, not the frozen ones
    unfreeze(model)
    assert type(model[1]) is nn.BatchNorm2d and not is_frozen(model[1])
    assert model[4].use_global_stats is False
    assert model[1].weight.requires_grad and not model[7].bias.requires_grad
    before = statistics(model)
    with torch.no_grad():
        model.train()(torch.randn(8, 3, 5, 5))
    assert not torch.equal(statistics(model)["1.running_mean"], before["1.running_mean"])


def test_frozen_context_manager_restores_the_outer_state():
    model = make_model()
    freeze(model[7], affine=False)  # already frozen before the context
    with frozen(model) as inside:
        assert inside is model
        assert isinstance(model[1], FrozenBatchNorm2d) and not model[7].weight.requires_grad
        before = statistics(model)
        with torch.no_grad():
            model.train()(torch.randn(8, 3, 5, 5))
        for key, value in statistics(model).items():
            torch.testing.assert_close(value, before[key], rtol=0, atol=0)
    assert type(model[1]) is nn.BatchNorm2d and model[4].use_global_stats is None
    assert is_frozen(model[7]) and model[7].weight.requires_grad  # as it was


def test_frozen_model_copies_pickles_and_reloads():
    model = freeze(make_model())
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert isinstance(clone[1], FrozenBatchNorm2d) and clone[4].use_global_stats is True
        unfreeze(clone)
        assert type(clone[1]) is nn.BatchNorm2d
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = make_model()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))


def test_freeze_errors_change_nothing():
    with pytest.raises(
        TypeError, match=r"`freeze` takes an nn.Module.*Received: model of type str"
    ):
        freeze("model")
    with pytest.raises(ValueError, match=r"`freeze` found no batch-norm layer.*Linear"):
        freeze(nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"`unfreeze` found no batch-norm layer"):
        unfreeze(nn.Sequential(nn.ReLU()))
    with pytest.raises(ValueError, match=r"`statistics` or `affine` must be True"):
        freeze(make_model(), statistics=False, affine=False)
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match=r"Cannot freeze the statistics of 1 \(BatchNorm1d\)"):
        freeze(model)
    assert type(model[0]) is nn.BatchNorm1d and model[0].weight.requires_grad
    freeze(model, statistics=False)  # gamma/beta alone can be frozen
    assert not model[1].weight.requires_grad

    class CustomNorm(nn.BatchNorm2d):
        pass

    with pytest.raises(ValueError, match=r"class .*CustomNorm is not one of torch.nn.BatchNorm1d"):
        freeze(nn.Sequential(CustomNorm(3)))
    with pytest.raises(ValueError, match=r"`frozen` found no batch-norm layer"), frozen(nn.ReLU()):
        pass


def test_frozen_sync_batch_norm_runs_on_cpu_in_training_mode():
    torch.manual_seed(0)
    norm = nn.SyncBatchNorm(3)
    with torch.no_grad():
        norm.running_mean.copy_(torch.tensor([1.0, -1.0, 0.5]))
    x = torch.randn(4, 3, 2)
    freeze(norm).train()
    expected = (x - norm.running_mean[:, None]) / torch.sqrt(norm.running_var[:, None] + norm.eps)
    torch.testing.assert_close(norm(x), expected)
    unfreeze(norm)
    assert type(norm) is nn.SyncBatchNorm


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("start", ["torch", "batchnorm"])
def test_convert_keeps_a_frozen_batch_norm_frozen(start, affine):
    """convert turned freeze's FrozenBatchNorm2d into a plain layer whose statistics trained
    again (3.2 off after model.train()) and which unfreeze could not restore; a frozen layer
    going to torch was refused (use_global_stats=True). Both directions now give a module
    frozen as freeze would freeze it, which unfreeze restores."""
    torch.manual_seed(0)
    source = (
        nn.BatchNorm2d(4)
        if start == "torch"
        else BatchNormalization(
            4, axis=1, momentum=0.9, epsilon=1e-5, moving_variance_estimator="unbiased"
        )
    )
    model = nn.Sequential(nn.Conv2d(3, 4, 3), source)
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6) * 2 + 1)
    freeze(model, affine=affine)
    model.train()
    x = torch.randn(8, 3, 6, 6)
    expected = model(x)
    converted = batchnorm.convert(
        copy.deepcopy(model), to="batchnorm" if start == "torch" else "torch"
    )
    converted.train()
    statistics = [t.clone() for t in converted[1].buffers()]
    torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5)
    for before, after in zip(statistics, converted[1].buffers(), strict=True):
        assert torch.equal(before, after)
    assert is_frozen(converted[1])
    assert all(p.requires_grad is not affine for p in converted[1].parameters())
    unfreeze(converted)
    assert not is_frozen(converted[1])
    assert all(p.requires_grad for p in converted[1].parameters())
    converted(x)  # training again: the statistics move
    assert not torch.equal(statistics[0], next(converted[1].buffers()))


class _Positive(nn.Module):
    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w.abs() + 0.1


def test_a_parametrized_torch_batch_norm_freezes_unfreezes_and_keeps_its_parametrization():
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn(torch.randn(8, 3, 4, 4) * 2 + 1)
    parametrize.register_parametrization(bn, "weight", _Positive())
    x = torch.randn(4, 3, 4, 4)
    expected = copy.deepcopy(bn).eval()(x)
    freeze(bn).train()
    assert parametrize.is_parametrized(bn, "weight")
    torch.testing.assert_close(bn(x), expected, rtol=0, atol=0)
    unfreeze(bn)
    assert isinstance(bn, nn.BatchNorm2d) and not is_frozen(bn)
    assert parametrize.is_parametrized(bn, "weight")
    assert bn.parametrizations.weight.original.requires_grad


def test_unfreeze_after_a_parametrization_registered_on_the_frozen_module():
    from torch.nn.utils import parametrize

    bn = freeze(nn.BatchNorm2d(3))
    parametrize.register_parametrization(bn, "weight", _Positive())
    unfreeze(bn)
    assert parametrize.is_parametrized(bn, "weight") and not is_frozen(bn)
    assert bn.parametrizations.weight.original.requires_grad  # the frozen flag undone
    bn.train()(torch.randn(4, 3, 2, 2))  # weight still computed by the parametrization


def test_convert_to_torch_of_a_frozen_parametrized_layer_keeps_both():
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = nn.Sequential(BatchNormalization(4, axis=1, moving_variance_estimator="unbiased"))
    parametrize.register_parametrization(model[0], "gamma", _Positive())
    x = torch.randn(2, 4, 3, 3)
    expected = model.eval()(x)
    freeze(model)
    batchnorm.convert(model, to="torch")
    assert parametrize.is_parametrized(model[0], "weight") and is_frozen(model[0])
    torch.testing.assert_close(model.train()(x), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [lambda: nn.BatchNorm1d(3), lambda: BatchNormalization(3)])
def test_freeze_drops_leftover_gradients_so_no_optimizer_moves_gamma(make):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), make(), nn.Linear(3, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    model(torch.randn(8, 4)).sum().backward()  # a gradient left on gamma and beta
    freeze(model)
    before = [p.detach().clone() for p in model[1].parameters()]
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
        model(torch.randn(8, 4)).sum().backward()
    for old, new in zip(before, model[1].parameters(), strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=0)


def test_frozen_block_gives_back_the_gradients_accumulated_before_it():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), BatchNormalization(4), nn.Linear(4, 1))
    model(torch.randn(8, 3)).sum().backward()
    before = [p.grad.clone() for p in model[1].parameters()]
    with frozen(model):
        assert all(p.grad is None for p in model[1].parameters())  # no step moves them here
        model(torch.randn(8, 3)).sum().backward()  # an auxiliary loss, gamma/beta frozen
    for parameter, gradient in zip(model[1].parameters(), before, strict=True):
        torch.testing.assert_close(parameter.grad, gradient, rtol=0, atol=0)


def test_frozen_with_affine_false_keeps_the_gradients_made_inside():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), BatchNormalization(4), nn.Linear(4, 1))
    with frozen(model, affine=False):  # statistics frozen, gamma/beta still train
        model(torch.randn(8, 3)).sum().backward()
        inside = [p.grad.clone() for p in model[1].parameters()]
    for parameter, gradient in zip(model[1].parameters(), inside, strict=True):
        torch.testing.assert_close(parameter.grad, gradient, rtol=0, atol=0)  # were put back None


@pytest.mark.parametrize("statistics", [True, False])
def test_freeze_of_an_uninitialised_lazy_batch_norm_names_it_and_changes_nothing(statistics):
    """With statistics=False the lazy layer was not checked: torch's "uninitialized parameter"
    error came from inside the loop, with the layers before it left frozen."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.LazyBatchNorm2d()
    )
    with pytest.raises(ValueError, match=r"Cannot freeze .* of 3 \(LazyBatchNorm2d\)"):
        freeze(model, statistics=statistics)
    assert type(model[1]) is nn.BatchNorm2d and not is_frozen(model[1])
    assert all(p.requires_grad for p in model[1].parameters())
    model(torch.randn(2, 3, 4, 4))  # initialised: it freezes
    freeze(model, statistics=statistics)
    assert not any(p.requires_grad for p in model[3].parameters())
