"""Synchronized batch norm over gloo processes against one process running the concatenated batch."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import BatchNormalization, BatchNormStatistics, SyncBatchNormalization
from batchnorm.functional import batch_norm
from batchnorm.functional._validation import normalize_axes
from tests import sync_workers
from tests.sync_workers import SCENARIOS, make_layer, run_scenario, scenario_data, spawn

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """One spawn of 2 gloo processes runs every 2-rank check; the tests below read its files."""
    directory = tmp_path_factory.mktemp("two_ranks")
    tasks = ["layers-float64", "layers-float32", "layers-bfloat16", "torch-ops", "ddp", "fsdp"]
    tasks += ["fsdp-bfloat16", "fsdp-checkpoint"]
    tasks.append("errors")
    spawn(sync_workers.suite_worker, 2, directory, tasks)
    return directory


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    directory = tmp_path_factory.mktemp("three_ranks")
    spawn(sync_workers.suite_worker, 3, directory, ["layers-float64"])
    return directory


def _rank_results(directory, prefix, world_size):
    return [
        torch.load(directory / f"{prefix}{r}.pt", weights_only=False) for r in range(world_size)
    ]


def _close(actual, expected, dtype, what):
    tolerance = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance, msg=what)


def _check_against_reference(ranks, reference, dtype, name, gamma_key="gamma_grad"):
    _close(torch.cat([r["y"] for r in ranks]), reference["y"], dtype, f"{name}: y")
    _close(torch.cat([r["x_grad"] for r in ranks]), reference["x_grad"], dtype, f"{name}: dx")
    # gamma/beta gradients are local per rank; DDP sums (averages) them like this.
    _close(sum(r["gamma_grad"] for r in ranks), reference[gamma_key], dtype, f"{name}: dgamma")
    _close(sum(r["beta_grad"] for r in ranks), reference["beta_grad"], dtype, f"{name}: dbeta")
    for key, value in reference["statistics"].items():
        _close(ranks[0]["statistics"][key], value, dtype, f"{name}: {key}")
        for other in ranks[1:]:
            assert torch.equal(other["statistics"][key], ranks[0]["statistics"][key]), key
    inference = torch.cat([r["inference"] for r in ranks])
    _close(inference, reference["inference"], dtype, f"{name}: inference")


def _expected_collectives(world_size, first_task):
    """Per scenario: forward, backward, forward. A forward gathers once, twice when its
    ghost_batches * channels exceeds every earlier call's on the group (the first task of a
    process starts from a fresh group; later ones find the largest scenario already exchanged)."""
    slots = {}
    for name, spec in SCENARIOS.items():
        x = scenario_data(name, world_size, torch.float64)["steps"][0]["x"]
        channels = math.prod(x.shape[a] for a in normalize_axes(spec["kwargs"]["axis"], x.ndim))
        slots[name] = channels * spec.get("ghost_batches", 1)
    largest = 0 if first_task else max(slots.values())
    expected = {}
    for name, needed in slots.items():
        expected[name] = ["all_gather"] * (2 if needed > largest else 1)
        expected[name] += ["all_reduce", "all_gather"]
        largest = max(largest, needed)
    return expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_synchronized_layer_on_cuda_tensors_equals_concatenated_batch(tmp_path):
    # Two gloo processes sharing one GPU: the layer's statistics travel through host memory.
    spawn(sync_workers.cuda_worker, 2, tmp_path)
    results = _rank_results(tmp_path, "cuda-rank", 2)
    for name in SCENARIOS:
        data = scenario_data(name, 2, torch.float32)
        ghosts = data["ghosts"]
        virtual = None if ghosts is None else sum(data["sizes"]) // ghosts
        reference = run_scenario(
            make_layer(name, torch.float32, virtual), data["steps"], slice(None)
        )
        ranks = [results[r][name] for r in range(2)]
        _check_against_reference(ranks, reference, torch.float32, f"cuda {name}")


def _torch_reference(steps, dtype):
    module = sync_workers.torch_batch_norm(dtype)
    result = {}
    for index, step in enumerate(steps):
        x = step["x"].clone().requires_grad_(True)
        y = module(x)
        if index == 0:
            (y * step["cotangent"]).sum().backward()
            result.update(y=y.detach(), x_grad=x.grad, gamma_grad=module.weight.grad.clone())
            result["beta_grad"] = module.bias.grad.clone()
    result["statistics"] = {
        "moving_mean": module.running_mean.clone(),
        "moving_variance": module.running_var.clone(),
    }
    result["inference"] = module.eval()(steps[0]["x"]).detach()
    return result


@pytest.mark.parametrize(
    ("world_size", "dtype", "path"),
    [
        (2, torch.float64, "kernels"),
        (3, torch.float64, "kernels"),
        (2, torch.float32, "kernels"),
        (2, torch.bfloat16, "kernels"),  # read as bits, float32 parameters
        (2, torch.float64, "torch-ops"),
    ],
)
def test_synchronized_layer_equals_concatenated_batch(request, world_size, dtype, path):
    directory = request.getfixturevalue("two_ranks" if world_size == 2 else "three_ranks")
    prefix = ("torch-ops-" if path == "torch-ops" else "") + f"{dtype}-rank".replace("torch.", "")
    results = _rank_results(directory, prefix, world_size)
    first_task = dtype == torch.float64 and path == "kernels"
    collectives = _expected_collectives(world_size, first_task)
    for name in SCENARIOS:
        data = scenario_data(name, world_size, dtype)
        ghosts = data["ghosts"]
        virtual = None if ghosts is None else sum(data["sizes"]) // ghosts
        reference = run_scenario(make_layer(name, dtype, virtual), data["steps"], slice(None))
        ranks = [results[r][name] for r in range(world_size)]
        _check_against_reference(ranks, reference, dtype, name)
        # Forward: one all_gather of header and statistics (two where the group grows); backward:
        # one all_reduce; inference: nothing.
        assert all(r["collectives"] == collectives[name] for r in ranks), ranks[0]["collectives"]
    assert all(r["global_stats"] == {"collectives": [], "same_as_local": True} for r in results)
    if dtype == torch.bfloat16:
        # A converted bfloat16 module keeps bfloat16 parameters: each rank's gamma gradient is
        # rounded before the ranks' gradients are added, which a one-process reference is not.
        return
    data = scenario_data("uneven_nchw", world_size, dtype)
    reference = _torch_reference(data["steps"], dtype)
    ranks = [results[r]["torch_converted"] for r in range(world_size)]
    _check_against_reference(ranks, reference, dtype, "convert_sync(BatchNorm2d)")


def test_errors_raise_on_every_rank(two_ranks):
    first, second = _rank_results(two_ranks, "errors", 2)
    for messages in (first, second):
        assert "same channel shape on every rank" in messages["channels"]
        assert "rank 0: 3 channels, rank 1: 4 channels" in messages["channels"]
        assert messages["channels_state_unchanged"] == "True"
        assert "same number of ghost batches" in messages["ghosts"]
        assert "rank 0: 2, rank 1: 3" in messages["ghosts"]
        assert messages["recovered"] == "no error"
        assert messages["all_empty_unchanged"] == "True"
        for name in ("double_backward", "gradient_penalty"):
            assert "Synchronized batch norm is not twice differentiable" in messages[name]
        assert messages["not_initialized"].startswith("RuntimeError: ")
        assert "torch.distributed is not initialised" in messages["not_initialized"]
    assert first["group_of_one_equal"] == "True"
    assert "not a member of `process_group`" in second["non_member"]
    assert "not a member of the `process_group`" in second["non_member_functional"]
    assert first["timeout"].startswith("RuntimeError: Synchronized batch norm: all_gather")
    assert "timeout 2 s" in first["timeout"]


def test_call_order_errors_raise_on_every_rank(two_ranks):
    first, second = _rank_results(two_ranks, "errors", 2)
    for messages in (first, second):
        # Layers of different sizes, after their first calls: one all_gather, an error everywhere.
        assert messages["order_sizes"].startswith("ValueError: Synchronized batch norm needs")
        assert "same synchronized layers in the same order" in messages["order_sizes"]
        assert "rank 0: 8 channels, rank 1: 16 channels" in messages["order_sizes"]
        assert messages["order_sizes_collectives"] == "all_gather"
        assert messages["order_sizes_state_unchanged"] == "True"
        assert "rank 0: 8 channels, rank 1: 32 channels" in messages["order_new_larger"]
        # Same size, swapped: not detectable (see _synchronized's docstring), the statistics mix.
        assert messages["order_equal_sizes"] == "no error"
        found = re.search(
            r"rank 0: call (\d+) \(16 gradient sums\), rank 1: call (\d+) \(32 gradient sums\)",
            messages["order_backward"],
        )
        assert found and int(found[2]) == int(found[1]) + 1, messages["order_backward"]
        assert messages["order_backward"].startswith("RuntimeError: Synchronized batch norm: the")
        assert messages["order_backward_recovered"] == "no error"
        assert messages["out_of_step"].startswith("RuntimeError: Synchronized batch norm: the")
        found = re.search(r"per rank: rank 0: (\d+), rank 1: (\d+)", messages["out_of_step"])
        assert found and int(found[2]) == int(found[1]) + 1, messages["out_of_step"]
        assert messages["realigned"] == "no error"
    assert first["order_sizes"] == second["order_sizes"].replace("(16,)", "(8,)")


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp", "fsdp-bfloat16", "fsdp-checkpoint"])
def test_data_parallel_cnn_matches_single_process_training(two_ranks, wrapper):
    """DistributedDataParallel and FSDP2's fully_shard, each rank on half of every batch;
    "fsdp-bfloat16" with FSDP2's mixed precision (bfloat16 parameters and inputs in the forward,
    float32 gradient reduction and weights), against float64 training at bfloat16's tolerance:
    the layer normalises bfloat16 inputs with bfloat16 gamma and beta, and keeps its moving
    statistics in float32; "fsdp-checkpoint" with the conv-norm-relu block under activation
    checkpointing, whose recomputation steps the moving statistics of the synchronized layer
    no second time."""
    model = sync_workers.cnn_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, target in sync_workers.cnn_data(sync_workers.DDP_STEPS):
        loss = nn.functional.mse_loss(model(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    expected = model.state_dict()
    renamed = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean"}
    renamed["running_var"] = "moving_variance"
    tolerance = TOLERANCE[torch.bfloat16 if wrapper == "fsdp-bfloat16" else torch.float64]
    for state in _rank_results(two_ranks, wrapper, 2):
        for key, value in expected.items():
            if key.endswith("num_batches_tracked"):
                continue
            module, _, leaf = key.rpartition(".")
            ours = f"{module}.{renamed[leaf]}" if module == "norm" else key
            if wrapper == "fsdp-bfloat16":
                assert state[ours].dtype == torch.float32, key
            torch.testing.assert_close(
                state[ours].to(value.dtype), value, rtol=tolerance, atol=tolerance, msg=key
            )


def test_without_process_group_behaves_as_unsynchronized():
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    mask = (torch.rand(6, 3, 3) > 0.3).double()
    synchronized = SyncBatchNormalization(4, axis=1, dtype="float64", momentum=0.5)
    plain = BatchNormalization(4, axis=1, dtype="float64", momentum=0.5, fused=False)
    for call in (
        lambda layer: layer(x, training=True),
        lambda layer: layer(x, training=True, mask=mask),
        lambda layer: layer(x, training=False),
    ):
        assert torch.equal(call(synchronized), call(plain))
        assert torch.equal(synchronized.moving_variance, plain.moving_variance)
    assert synchronized.fused is False


def test_configs_and_arguments():
    layer = BatchNormalization(3, synchronized=True)
    config = layer.get_config()
    assert config["synchronized"] is True
    assert "synchronized" not in BatchNormalization(3).get_config()
    rebuilt = BatchNormalization.from_config(config)
    assert rebuilt.synchronized and rebuilt.fused is False
    assert SyncBatchNormalization.from_config(config).synchronized
    keras_config = {"name": "bn", "axis": -1, "synchronized": True, "fused": None}
    assert BatchNormalization.from_config(keras_config).synchronized
    with pytest.raises(ValueError, match=r"`fused=True` is not supported when `synchronized=True`"):
        BatchNormalization(synchronized=True, fused=True)
    with pytest.raises(
        TypeError, match=r"`synchronized` must be True or False. Received: synchronized='yes'"
    ):
        BatchNormalization(synchronized="yes")
    with pytest.raises(ValueError, match=r"`process_group` is only used with `synchronized=True`"):
        BatchNormalization(process_group=object())
    with pytest.raises(
        TypeError, match=r"`process_group` must be a torch.distributed.ProcessGroup"
    ):
        SyncBatchNormalization(process_group="world")
    with pytest.raises(ValueError, match=r"SyncBatchNormalization is always synchronized"):
        SyncBatchNormalization(synchronized=False)


def test_explicit_group_without_initialised_distributed_raises():
    x = torch.randn(4, 3)
    statistics = BatchNormStatistics(torch.zeros(3), torch.ones(3))
    with pytest.raises(RuntimeError, match=r"torch.distributed is not initialised"):
        batch_norm(x, statistics, training=True, synchronized=True, process_group=object())
    # Inference never communicates, so it needs no group.
    y, _ = batch_norm(x, statistics, training=False, synchronized=True, process_group=object())
    assert y.shape == x.shape


def test_convert_sync_replaces_every_batch_norm():
    model = nn.Sequential(
        nn.Conv1d(2, 3, 1),
        nn.BatchNorm1d(3, momentum=0.25, eps=1e-4),
        nn.Sequential(nn.BatchNorm2d(3, affine=False).double()),
        BatchNormalization(3, axis=1, fused=True),
        nn.SyncBatchNorm(3),
        nn.BatchNorm2d(3, momentum=None, track_running_stats=False),
        nn.LazyBatchNorm3d(),
    )
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[1].weight.fill_(2.0)
    weight = model[1].weight
    converted = batchnorm.convert_sync(model)
    assert converted is model
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    layers = [m for m in model.modules() if isinstance(m, BatchNormalization)]
    assert len(layers) == 6 and all(m.synchronized and m.fused is False for m in layers)
    first = model[1]
    assert first.momentum == pytest.approx(0.75) and first.epsilon == 1e-4 and first.axis == 1
    assert torch.equal(first.gamma, weight) and torch.all(first.moving_mean == 0.5)
    assert first.moving_variance_estimator == "unbiased"
    inner = model[2][0]
    assert not inner.center and not inner.scale and inner.moving_mean.dtype == torch.float64
    # A layer that resolved to tf-keras' fused path keeps its unbiased moving variance.
    assert model[3].moving_variance_estimator == "unbiased"
    assert model[5].use_global_stats is False and model[5].moving_average == "debiased"
    assert set(first.state_dict()) == {"gamma", "beta", "moving_mean", "moving_variance"}
    single = batchnorm.convert_sync(nn.BatchNorm3d(2))
    assert isinstance(single, BatchNormalization) and single.synchronized


def test_convert_sync_keeps_torch_numerics_without_group():
    reference = sync_workers.torch_batch_norm(torch.float64)
    converted = batchnorm.convert_sync(sync_workers.torch_batch_norm(torch.float64))
    for _ in range(2):
        x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
        torch.testing.assert_close(converted(x), reference(x))
    torch.testing.assert_close(converted.moving_variance, reference.running_var)
    torch.testing.assert_close(converted.moving_mean, reference.running_mean)


def test_convert_sync_trains_an_in_place_layer_without_overwriting_its_input():
    in_place = BatchNormalization(3, axis=1, activation="leaky_relu", memory="in_place")
    reference = BatchNormalization(3, axis=1, activation="leaky_relu")
    converted = batchnorm.convert_sync(in_place)
    assert converted.synchronized and converted.memory == "default"
    x = torch.randn(4, 3, 5, 5)
    given = x.clone()
    torch.testing.assert_close(converted(x, training=True), reference(x, training=True))
    assert torch.equal(x, given)


def test_convert_sync_errors():
    with pytest.raises(
        TypeError, match=r"`process_group` must be a torch.distributed.ProcessGroup"
    ):
        batchnorm.convert_sync(nn.BatchNorm1d(3), process_group=3.5)
    with pytest.raises(ValueError, match=r"`process_group` is only used with `synchronized=True`"):
        BatchNormalization(3, process_group=object())


def test_convert_sync_after_a_checkpoint_of_the_fused_path_keeps_its_variance():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    source = BatchNormalization(3, axis=1)
    source(x, training=True)  # rank 4, axis 1: tf-keras' fused path, the unbiased variance
    for layer in (BatchNormalization(3, axis=1), BatchNormalization(axis=1)):
        layer.load_state_dict(source.state_dict())
        synchronized = batchnorm.convert_sync(layer)
        assert synchronized.moving_variance_estimator == "unbiased"
        synchronized(x, training=True)  # raised: the biased path met the recorded unbiased one


def test_synchronized_switched_back_off_takes_the_automatic_path_again():
    layer = BatchNormalization(axis=1)
    layer.synchronized = True
    layer.build((None, 3, 5, 5))
    assert layer.fused is False  # synchronized: non-fused
    layer.synchronized = False
    assert layer.fused is True and "fused" not in layer.get_config()  # as a fresh layer's


def test_a_layer_training_in_place_cannot_be_set_synchronized():
    layer = BatchNormalization(3, memory="in_place")
    with pytest.raises(ValueError, match="does not combine with `synchronized=True`"):
        layer.synchronized = True
    assert layer.synchronized is False
    assert isinstance(batchnorm.convert_sync(nn.Sequential(layer))[0], BatchNormalization)


def test_a_layer_constructed_synchronized_switched_off_takes_the_automatic_path():
    layer = BatchNormalization(axis=1, synchronized=True)
    assert "fused" not in layer.get_config()  # tf-keras writes none for a synchronized layer
    layer.build((None, 3, 5, 5))
    assert layer.fused is False
    layer.synchronized = False
    assert layer.fused is True


@pytest.mark.parametrize("switch", ["synchronized", "renorm"])
def test_a_setting_undone_before_the_first_call_takes_the_path_from_config_takes(switch):
    torch.manual_seed(0)
    x = torch.randn(16, 3, 4, 4)
    layer = BatchNormalization(axis=1, momentum=0.0, **{switch: True})
    setattr(layer, switch, False)  # before: fused stayed False, the config said automatic
    copy_ = BatchNormalization.from_config(layer.get_config())
    layer(x, training=True)
    copy_(x, training=True)
    assert layer.fused is copy_.fused is True
    torch.testing.assert_close(layer.moving_variance, copy_.moving_variance, rtol=0, atol=0)
