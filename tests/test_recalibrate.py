"""recalibrate: population statistics against a float64 NumPy computation over the concatenated data."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from batchnorm import BatchNormalization, freeze, recalibrate
from batchnorm.tools._progress import Progress
from tests.distributed_recalibrate_worker import TwoNormNet, rank_batches
from tests.test_convert_activation import conv_model_with_dropout_inside_a_batch_norm

ROOT = Path(__file__).resolve().parent.parent


def numpy_population(model: TwoNormNet, batches: list[torch.Tensor]) -> dict[str, np.ndarray]:
    """bn1's input over all samples; bn2's input with bn1 normalising each batch by its own
    (biased) statistics, as in training; dropout off."""

    def array(t: torch.Tensor) -> np.ndarray:
        return t.detach().numpy().astype(np.float64)

    w1, b1, w2, b2 = (
        array(p) for p in (model.lin1.weight, model.lin1.bias, model.lin2.weight, model.lin2.bias)
    )
    gamma, beta, eps = array(model.bn1.gamma), array(model.bn1.beta), model.bn1.epsilon
    first, second = [], []
    for x in batches:
        h = array(x) @ w1.T + b1
        first.append(h)
        y = gamma * (h - h.mean(0)) / np.sqrt(h.var(0) + eps) + beta
        second.append(np.maximum(y, 0) @ w2.T + b2)
    h1, h2 = np.concatenate(first), np.concatenate(second)
    return {
        "bn1.moving_mean": h1.mean(0),
        "bn1.moving_variance": h1.var(0),  # ours, non-fused: biased
        "bn2.running_mean": h2.mean(0),
        "bn2.running_var": h2.var(0, ddof=1),  # torch: unbiased
        "per_batch_average_var": np.mean([h.var(0, ddof=1) for h in second], axis=0),
    }


def trained_net() -> TwoNormNet:
    torch.manual_seed(0)
    model = TwoNormNet()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 4))
    return model.train()


def test_recalibrate_equals_statistics_over_the_concatenated_data():
    model = trained_net()
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randn(n, 4, generator=generator) * 2 + 1 for n in (5, 17, 3, 9)]
    tracked = int(model.bn2.num_batches_tracked)
    result = recalibrate(model, [(x, torch.zeros(len(x))) for x in batches], progress=False)
    expected = numpy_population(model, batches)
    state = model.state_dict()
    for key in ("bn1.moving_mean", "bn1.moving_variance", "bn2.running_mean", "bn2.running_var"):
        np.testing.assert_allclose(state[key].numpy(), expected[key], rtol=2e-6, atol=1e-6)
    # Pooled exactly: the average of the per-batch variances is measurably different.
    assert np.abs(expected["per_batch_average_var"] - expected["bn2.running_var"]).max() > 1e-3
    assert result.batches == 4 and result.samples == {"bn1": 34, "bn2": 34}
    assert result.skipped == {}
    assert model.training and model.drop.training  # modes restored
    assert int(model.bn2.num_batches_tracked) == tracked


def test_batch_formats_and_num_batches():
    generator = torch.Generator().manual_seed(2)
    batches = [torch.randn(n, 4, generator=generator) for n in (6, 4, 8)]
    reference = trained_net()
    recalibrate(reference, batches[:2], progress=False)
    for given in ([{"input": x} for x in batches], [[x] for x in batches], iter(batches)):
        model = trained_net()
        result = recalibrate(model, given, num_batches=2, progress=False)
        assert result.batches == 2
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, reference.state_dict()[key], rtol=0, atol=0)
    # An iterator is left at the first batch not used: nothing is drawn and dropped.
    shared = iter(batches)
    recalibrate(trained_net(), shared, num_batches=2, progress=False)
    assert next(shared) is batches[2]


def conv_net() -> nn.Module:
    """torch batch norms only, no dropout: what torch.optim.swa_utils.update_bn handles too."""
    torch.manual_seed(5)
    return nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3), nn.ReLU(), nn.BatchNorm2d(4))


def drifting_images(samples: int = 96) -> torch.Tensor:
    """Channels with a mean that drifts from sample to sample, so batch means differ."""
    generator = torch.Generator().manual_seed(4)
    drift = torch.linspace(-2, 2, samples).reshape(-1, 1, 1, 1)
    scale = torch.tensor([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
    return torch.randn(samples, 3, 5, 5, generator=generator) * scale + drift + 1


@pytest.mark.parametrize("with_targets", [False, True], ids=["TensorDataset(x)", "(x, y)"])
def test_data_loader_batches_against_update_bn_and_the_population(with_targets):
    """DataLoader(TensorDataset(x)) yields 1-element lists, TensorDataset(x, y) [x, y] lists:
    the input is the first element for both, as torch.optim.swa_utils.update_bn takes it.

    update_bn resets the statistics and averages every batch with momentum=None (a cumulative
    average): with equal batch sizes its running_mean is the population mean, but its
    running_var is the mean of the per-batch unbiased variances; recalibrate stores the
    population's unbiased variance."""
    x = drifting_images()
    dataset = TensorDataset(x, torch.arange(len(x)) % 2) if with_targets else TensorDataset(x)
    loader = DataLoader(dataset, batch_size=16)
    assert isinstance(next(iter(loader)), list)

    ours, swa = conv_net(), conv_net()
    result = recalibrate(ours, loader, progress=False)
    torch.optim.swa_utils.update_bn(loader, swa)
    assert result.batches == 6 and result.samples == {"0": 96 * 25, "3": 96 * 9}
    for name in ("0", "3"):
        np.testing.assert_allclose(
            ours.get_submodule(name).running_mean.numpy(),
            swa.get_submodule(name).running_mean.numpy(),
            rtol=1e-5,
            atol=1e-6,
        )
    # The first batch norm's input is x itself: float64 NumPy statistics over all samples.
    values = x.numpy().astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(ours[0].running_mean.numpy(), values.mean(1), rtol=1e-6)
    np.testing.assert_allclose(ours[0].running_var.numpy(), values.var(1, ddof=1), rtol=1e-6)
    per_batch = np.mean(
        [b.reshape(3, -1).var(1, ddof=1) for b in np.split(values.reshape(3, 6, -1), 6, axis=1)],
        axis=0,
    )
    np.testing.assert_allclose(swa[0].running_var.numpy(), per_batch, rtol=1e-5)
    assert np.abs(per_batch - values.var(1, ddof=1)).min() > 0.1  # the drift between batches

    # One batch holding everything: both compute the population statistics.
    whole = DataLoader(dataset, batch_size=len(x))
    ours, swa = conv_net(), conv_net()
    recalibrate(ours, whole, progress=False)
    torch.optim.swa_utils.update_bn(whole, swa)
    for key, value in swa.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(ours.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_plain_tensors_and_tuples_as_update_bn_takes_them():
    x = drifting_images(48)
    reference = conv_net()
    recalibrate(reference, DataLoader(TensorDataset(x), batch_size=12), progress=False)
    for given in (
        list(x.split(12)),
        [(b, torch.zeros(len(b))) for b in x.split(12)],
        (b for b in x.split(12)),
    ):
        model = conv_net()
        assert recalibrate(model, given, progress=False).batches == 4
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, reference.state_dict()[key], rtol=0, atol=0)


def test_update_bn_skips_our_layer_and_recalibrate_does_not():
    """update_bn looks for torch.nn.modules.batchnorm._BatchNorm only: our layer is left
    untouched, without an error or a warning."""
    layer = BatchNormalization(axis=1)
    layer.build((8, 3, 5, 5))
    loader = DataLoader(TensorDataset(drifting_images(32)), batch_size=8)
    torch.optim.swa_utils.update_bn(loader, nn.Sequential(layer))
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(3))
    recalibrate(layer, loader, progress=False)
    values = drifting_images(32).numpy().astype(np.float64).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(layer.moving_mean.numpy(), values.mean(1), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), values.var(1, ddof=1), rtol=1e-6)


def test_fused_ghost_batch_renorm_and_masked_layers():
    generator = torch.Generator().manual_seed(3)
    # Fused (rank 4, axis 1): the unbiased variance over N*H*W samples per channel.
    fused = BatchNormalization(axis=1)
    data = [torch.randn(n, 3, 4, 5, generator=generator) * 3 + 2 for n in (2, 5)]
    recalibrate(fused, data, progress=False)
    assert fused.fused
    values = np.concatenate([x.numpy() for x in data]).transpose(1, 0, 2, 3).reshape(3, -1)
    np.testing.assert_allclose(fused.moving_mean.numpy(), values.mean(1), rtol=1e-5)
    np.testing.assert_allclose(fused.moving_variance.numpy(), values.var(1, ddof=1), rtol=1e-5)

    # Ghost batches and renorm: statistics over every sample, renorm buffers consistent.
    ghost = BatchNormalization(virtual_batch_size=2, renorm=True, epsilon=1e-2)
    data = [torch.randn(n, 4, generator=generator) * 2 - 1 for n in (4, 8, 2)]
    recalibrate(ghost, data, progress=False)
    values = np.concatenate([x.numpy() for x in data]).astype(np.float64)
    mean, variance = values.mean(0), values.var(0)
    np.testing.assert_allclose(ghost.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(ghost.moving_variance.numpy(), variance, rtol=1e-5)
    np.testing.assert_allclose(ghost.moving_stddev.numpy(), np.sqrt(variance + 1e-2), rtol=1e-5)
    np.testing.assert_allclose(ghost.renorm_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(ghost.renorm_stddev.numpy(), np.sqrt(variance + 1e-2), rtol=1e-5)

    # Masks weight the samples: only unmasked positions count.
    masked = BatchNormalization(momentum=0.5)
    data = [
        (torch.randn(n, 7, 4, generator=generator), torch.rand(n, 7, generator=generator) > 0.4)
        for n in (3, 6)
    ]
    result = recalibrate(
        masked, data, progress=False, forward=lambda layer, batch: layer(batch[0], mask=batch[1])
    )
    kept = np.concatenate([x.numpy()[m.numpy()] for x, m in data]).astype(np.float64)
    np.testing.assert_allclose(masked.moving_mean.numpy(), kept.mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(masked.moving_variance.numpy(), kept.var(0), rtol=1e-5)
    assert result.samples == {"": len(kept)}


@pytest.mark.parametrize("length", [3, 5])
def test_keras_mask_with_the_channel_axis_not_last(length):
    """A mask of x's shape without its LAST axis weighs (sample, channel) pairs, broadcast along
    the last axis (Keras' reading, the layer's own): the population statistics weigh the same,
    whether or not the channel count equals the last axis' length (3 = 3 once read the other
    way, with the weights silently misplaced; 5 != 3 failed to broadcast)."""
    generator = torch.Generator().manual_seed(8)
    data = [
        (
            torch.randn(n, 3, length, generator=generator) * 2 + 1,
            (torch.rand(n, 3, generator=generator) > 0.4).float(),
        )
        for n in (6, 4)
    ]
    layer = BatchNormalization(axis=1)
    recalibrate(
        layer, data, progress=False, forward=lambda layer, batch: layer(batch[0], mask=batch[1])
    )
    x = np.concatenate([x.numpy() for x, _ in data]).astype(np.float64)
    w = np.broadcast_to(np.concatenate([m.numpy() for _, m in data])[:, :, None], x.shape)
    mean = (w * x).sum((0, 2)) / w.sum((0, 2))
    variance = (w * (x - mean[:, None]) ** 2).sum((0, 2)) / w.sum((0, 2))  # biased: not fused
    np.testing.assert_allclose(layer.moving_mean.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), variance, rtol=1e-5)


def test_frozen_and_statistics_free_layers_are_skipped():
    model = nn.Sequential(
        nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False), nn.BatchNorm1d(3)
    )
    freeze(model[2])
    before = model[2].running_mean.clone()
    result = recalibrate(model, [torch.randn(5, 3) + 4], progress=False)
    assert set(result.samples) == {"0"}
    assert result.skipped["1"].startswith("no moving statistics")
    assert result.skipped["2"].startswith("frozen")
    torch.testing.assert_close(model[2].running_mean, before, rtol=0, atol=0)
    assert model[0].running_mean.min() > 2


def test_recalibrate_errors_change_nothing():
    model = trained_net()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ValueError, match=r"`batches` is empty: recalibrate needs at least one batch"
    ):
        recalibrate(model, [], progress=False)
    with pytest.raises(
        ValueError, match=r"found no batch-norm layer.*Received: model of type Linear"
    ):
        recalibrate(nn.Linear(4, 4), [torch.randn(2, 4)])
    with pytest.raises(
        ValueError, match=r"`num_batches` must be a positive int or None. Received: num_batches=0"
    ):
        recalibrate(model, [torch.randn(2, 4)], num_batches=0)
    with pytest.raises(TypeError, match=r"`batches` must be an iterable of batches.*Tensor"):
        recalibrate(model, torch.randn(2, 4))
    with pytest.raises(TypeError, match=r'A dict batch must hold the model input under "input"'):
        recalibrate(model, [torch.randn(4, 4), {"x": torch.randn(4, 4)}], progress=False)
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module"):
        recalibrate(None, [])
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert model.training


def test_distributed_ranks_end_identical_and_exact(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT)]))
    worker = str(ROOT / "tests" / "distributed_recalibrate_worker.py")
    processes = [
        subprocess.Popen(
            [sys.executable, worker, str(rank), "2", str(port), str(tmp_path / f"{rank}.pt")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for process in processes:
        output, _ = process.communicate(timeout=120)
        assert process.returncode == 0, output.decode()
    saved = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(2)]
    assert saved[0]["batches"] == saved[1]["batches"] == 3
    for key, value in saved[0]["state"].items():
        assert torch.equal(value, saved[1]["state"][key]), key
    torch.manual_seed(0)
    expected = numpy_population(TwoNormNet(), rank_batches(0) + rank_batches(1))
    for key in ("bn1.moving_mean", "bn1.moving_variance", "bn2.running_mean", "bn2.running_var"):
        np.testing.assert_allclose(
            saved[0]["state"][key].numpy(), expected[key], rtol=2e-6, atol=1e-6
        )


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_draws_only_on_a_terminal(capsys, monkeypatch):
    terminal = FakeTerminal()
    bar = Progress("recalibrate", total=4, stream=terminal)
    for _ in range(4):
        bar.update()
    bar.close()
    drawn = terminal.getvalue()
    assert drawn.startswith("\r") and drawn.endswith("\n")
    assert drawn.rsplit("\r", 1)[-1].startswith("recalibrate: 100%") and "4/4" in drawn
    silent = Progress("recalibrate", total=4, stream=io.StringIO())
    silent.update()
    silent.close()
    assert silent.stream.getvalue() == ""
    recalibrate(trained_net(), [torch.randn(4, 4)], progress=True)  # stderr is not a terminal
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(sys, "stderr", FakeTerminal())
    recalibrate(trained_net(), [torch.randn(4, 4)], progress=False)
    assert sys.stderr.getvalue() == ""
    recalibrate(trained_net(), [torch.randn(4, 4)] * 3, progress=True)
    assert "3/3" in sys.stderr.getvalue()


def test_a_layer_not_yet_built_is_recalibrated_as_its_training_calls_see_the_batches():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3) * 2 + 1
    mask = torch.zeros(8, 4, 3)
    mask[:4] = 1
    trained = BatchNormalization(4, axis=1, momentum=0.0)
    with pytest.warns(UserWarning, match="mask"):
        trained(x, training=True, mask=mask)  # fused (rank 4, axis 1): the mask is ignored
    fresh = BatchNormalization(4, axis=1)
    with pytest.warns(UserWarning, match="mask"):
        recalibrate(fresh, [(x, mask), (x, mask)], forward=lambda m, b: m(b[0], mask=b[1]))
    torch.testing.assert_close(fresh.moving_mean, trained.moving_mean, rtol=1e-6, atol=1e-6)
    debiased = BatchNormalization(axis=1, moving_average="debiased", momentum=0.9)
    recalibrate(nn.Sequential(nn.LazyBatchNorm1d(), debiased), [x[:, :, 0] for _ in range(3)])
    assert float(debiased.moving_average_weight) == 0.0  # as built: the pass steps nothing


def test_an_in_place_layer_does_not_overwrite_the_batches():
    torch.manual_seed(0)
    data = [torch.randn(8, 12) * 3 + 2 for _ in range(2)]
    kept = [d.clone() for d in data]
    model = nn.Sequential(BatchNormalization(12, memory="in_place"), nn.Linear(12, 2))
    recalibrate(model, data)
    for batch, original in zip(data, kept, strict=True):
        torch.testing.assert_close(batch, original, rtol=0, atol=0)
    expected = torch.cat(kept).mean(0)
    torch.testing.assert_close(model[0].moving_mean, expected, rtol=1e-5, atol=1e-6)


def test_a_batch_holding_nan_is_reported_and_writes_nothing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), BatchNormalization(4))
    batches = [torch.randn(8, 3) for _ in range(3)]
    batches[1][2, 0] = float("nan")
    before = model[1].moving_mean.clone()
    result = recalibrate(model, batches)
    assert "NaN or Inf" in result.skipped["1"]
    torch.testing.assert_close(model[1].moving_mean, before, rtol=0, atol=0)


def test_nan_padding_of_weight_zero_does_not_reach_the_statistics():
    torch.manual_seed(0)
    layer = BatchNormalization(3)
    x = torch.randn(4, 6, 3) + 5
    mask = torch.ones(4, 6)
    mask[:, 4:] = 0
    x[:, 4:] = float("nan")  # padding the mask excludes, as the layer's training call does
    recalibrate(layer, [(x, mask)], forward=lambda m, b: m(b[0], mask=b[1]))
    torch.testing.assert_close(layer.moving_mean, x[:, :4].mean((0, 1)), rtol=1e-6, atol=1e-6)


def test_a_dropout_inside_a_batch_norm_stays_off_during_the_pass():
    """recalibrate called train() on each batch norm, which switched on the dropout it holds:
    the next layer's population variance came out ~2.5x too large."""
    torch.manual_seed(0)
    model = conv_model_with_dropout_inside_a_batch_norm()
    model[1].drop.train()  # a mode of its own, to be given back exactly
    modes = [m.training for m in model.modules()]
    batches = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    with torch.no_grad():  # float64 reference: layer 1 on batch statistics, no dropout
        inputs = torch.cat(
            [
                model[2](
                    torch.relu(
                        nn.functional.batch_norm(
                            model[0](x), None, None, model[1].weight, model[1].bias, True
                        )
                    )
                )
                for x in batches
            ]
        ).double()
    recalibrate(model, batches, progress=False)
    expected = inputs.var(dim=(0, 2, 3)).to(torch.float32)
    torch.testing.assert_close(model[3].running_var, expected, rtol=1e-5, atol=1e-6)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.parametrize("num_features", [None, 6])
def test_a_pass_that_raises_leaves_an_unbuilt_layer_unbuilt(num_features):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), BatchNormalization(num_features, axis=1))
    layer = model[1]
    before = (layer.built, layer.axis, layer.fused, layer._input_rank, sorted(model.state_dict()))
    batches = [torch.randn(4, 3, 5, 5) for _ in range(2)]
    with pytest.raises(TypeError, match="Each batch must be a tensor"):
        recalibrate(model, [batches[0], "not a batch"], progress=False)
    after = (layer.built, layer.axis, layer.fused, layer._input_rank, sorted(model.state_dict()))
    assert after == before
    # and it builds again as its first call would: the population statistics are written
    recalibrate(model, batches, progress=False)
    with torch.no_grad():
        inputs = torch.cat([model[0](x) for x in batches]).double()
    expected = inputs.mean(dim=(0, 2, 3)).to(torch.float32)
    torch.testing.assert_close(layer.moving_mean, expected, rtol=1e-5, atol=1e-6)
