"""A layer without ``num_features`` builds on its first input the way torch's lazy modules do.

Its gamma/beta and buffers exist from the start as torch's ``UninitializedParameter`` /
``UninitializedBuffer`` and are materialised in place: an optimizer created before the first call
trains them (checked against ``nn.LazyBatchNorm1d``), copies, pickles and ``.to()`` keep working
before the build, and a first call that raises leaves the layer unbuilt.
"""

from __future__ import annotations

import copy
import io
import pickle
import threading

import pytest
import torch
from torch import nn
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

import batchnorm
from batchnorm import BatchNormalization


def placeholders(layer):
    return [t for t in [*layer._parameters.values(), *layer._buffers.values()] if t is not None]


def assert_unbuilt(layer, axis_given):
    assert not layer.built and layer.num_features is None
    assert layer._input_rank is None and layer._axes is None
    assert layer.axis == axis_given
    assert all(is_lazy(t) for t in placeholders(layer))
    assert "_direct_calls" not in layer.__dict__


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.5),
        lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=0.1),
    ],
)
def test_optimizer_created_before_the_first_call_trains_gamma_and_beta(make_optimizer):
    torch.manual_seed(0)
    ours = BatchNormalization(axis=1, epsilon=1e-5)
    theirs = nn.LazyBatchNorm1d(eps=1e-5)
    assert isinstance(ours.gamma, UninitializedParameter)
    assert isinstance(ours.moving_mean, UninitializedBuffer)
    optimizers = make_optimizer(ours.parameters()), make_optimizer(theirs.parameters())
    for _ in range(3):
        x = torch.randn(16, 3, 5) * 2 + 1
        upstream = torch.randn(16, 3, 5)
        for module, optimizer in zip((ours, theirs), optimizers, strict=True):
            optimizer.zero_grad()
            y = module(x, training=True) if module is ours else module(x)
            (y * upstream).sum().backward()
            optimizer.step()
    assert not torch.equal(ours.gamma, torch.ones(3)) and not torch.equal(ours.beta, torch.zeros(3))
    torch.testing.assert_close(ours.gamma, theirs.weight)
    torch.testing.assert_close(ours.beta, theirs.bias)
    assert ours.gamma is optimizers[0].param_groups[0]["params"][0]


def test_build_materialises_the_same_objects_in_place():
    layer = BatchNormalization(axis=[1, 2], renorm=True, moving_average="debiased")
    before = {name: id(t) for name, t in [*layer.named_parameters(), *layer.named_buffers()]}
    assert set(before) == {
        "gamma",
        "beta",
        "moving_mean",
        "moving_variance",
        "moving_stddev",
        "renorm_mean",
        "renorm_stddev",
        "moving_average_weight",
    }
    layer.build((4, 3, 5, 2))
    after = {name: id(t) for name, t in [*layer.named_parameters(), *layer.named_buffers()]}
    assert after == before
    assert type(layer.gamma) is nn.Parameter and type(layer.moving_mean) is torch.Tensor
    assert layer.num_features == (3, 5) and layer.gamma.shape == (3, 5)
    assert layer.moving_average_weight.dtype == torch.float64
    torch.testing.assert_close(layer.moving_stddev, torch.full((3, 5), (1 + 0.0) ** 0.5))


@pytest.mark.parametrize(
    ("num_features", "axis", "expected"),
    [(None, -1, None), (4, -1, 4), ((3, 4), [1, 2], (3, 4)), ([5], [1], 5)],
)
def test_num_features_is_an_int_for_one_axis_and_a_tuple_for_several(num_features, axis, expected):
    layer = BatchNormalization(num_features, axis=axis)
    assert layer.num_features == expected
    with pytest.raises(AttributeError):
        layer.num_features = 3


def test_to_before_the_build_sets_dtype_of_the_materialised_weights():
    layer = BatchNormalization(axis=1, moving_average="debiased").to(torch.float64)
    assert layer.gamma.dtype == torch.float64 and layer.moving_mean.dtype == torch.float64
    x = torch.randn(8, 3, 4, dtype=torch.float64)
    y = layer(x, training=True)
    assert y.dtype == torch.float64 and layer.moving_variance.dtype == torch.float64
    reference = BatchNormalization(3, axis=1, moving_average="debiased", dtype="float64")
    torch.testing.assert_close(y, reference(x, training=True))
    torch.testing.assert_close(layer.moving_variance, reference.moving_variance)


@pytest.mark.parametrize(
    "duplicate", [copy.deepcopy, lambda layer: pickle.loads(pickle.dumps(layer))]
)
def test_unbuilt_layers_copy_and_pickle_with_their_dtype(duplicate):
    layer = BatchNormalization(axis=1, moving_average="debiased", name="lazy").double()
    clone = duplicate(layer)
    assert_unbuilt(clone, 1)
    assert clone.gamma.dtype == torch.float64 and clone.moving_average_weight.dtype == torch.float64
    assert clone.gamma is not layer.gamma
    clone(torch.randn(4, 3, 2, dtype=torch.float64), training=True)
    assert clone.num_features == 3 and clone.moving_mean.dtype == torch.float64
    assert_unbuilt(layer, 1)  # the original is untouched


def test_unbuilt_state_dict_holds_no_tensors_and_loads_with_weights_only():
    layer = BatchNormalization(axis=1)
    state = layer.state_dict()
    assert list(state) == []
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    other = BatchNormalization(axis=1)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    assert_unbuilt(other, 1)


def test_config_round_trip_of_an_unbuilt_layer():
    layer = BatchNormalization(axis=1, momentum=0.9, gamma_regularizer="l2")
    clone = BatchNormalization.from_config(layer.get_config())
    assert_unbuilt(clone, 1)
    assert clone.get_config() == layer.get_config()
    assert clone.losses == [] and layer.losses == []
    clone.apply_constraints()  # nothing to constrain yet


def test_direct_calls_shortcut_serves_a_lazily_built_layer():
    torch.manual_seed(0)
    lazy = BatchNormalization(momentum=0.5)
    eager = BatchNormalization(6, momentum=0.5)
    for step in range(4):
        x = torch.randn(16, 6) + step
        torch.testing.assert_close(lazy(x, training=True), eager(x, training=True), rtol=0, atol=0)
        torch.testing.assert_close(lazy.moving_mean, eager.moving_mean, rtol=0, atol=0)
    direct_calls = lazy.__dict__["_direct_calls"]
    assert direct_calls is not None and direct_calls.current()
    x = torch.randn(16, 6)
    torch.testing.assert_close(lazy(x, training=False), eager(x, training=False), rtol=0, atol=0)


def test_model_tools_accept_unbuilt_layers():
    lazy_torch = batchnorm.to_torch(BatchNormalization.like("torch"), dims=1)
    assert isinstance(lazy_torch, nn.LazyBatchNorm1d) and lazy_torch.has_uninitialized_params()
    model = nn.Sequential(nn.Linear(4, 3), BatchNormalization(), nn.ReLU())
    converted = batchnorm.from_torch(nn.LazyBatchNorm2d())
    assert_unbuilt(converted, 1)
    frozen = batchnorm.freeze(copy.deepcopy(model))
    y = frozen(torch.randn(5, 4))
    assert y.shape == (5, 3) and frozen[1].num_features == 3


def _bad_adjustment(shape):
    return torch.ones(5), torch.zeros(5)


@pytest.mark.parametrize(
    ("kwargs", "call", "error", "match"),
    [
        (
            {"axis": 1, "adjustment": _bad_adjustment},
            lambda layer: layer(torch.randn(4, 3, 2), training=True),
            ValueError,
            r"`adjustment` must return a scale that broadcasts against x",
        ),
        (
            {"axis": 1},
            lambda layer: layer(torch.randn(2, 3, 4, 4), training=True, mask=torch.ones(7)),
            ValueError,
            r"`mask` must have the shape of `x`",
        ),
        (
            {"axis": -1, "virtual_batch_size": 3},
            lambda layer: layer(torch.randn(8, 3), training=True),
            ValueError,
            r"`virtual_batch_size` must divide the batch size",
        ),
        (
            {"axis": -1, "fused": True},
            lambda layer: layer(torch.randn(8, 3), training=True),
            ValueError,
            r"`fused=True` only support 4D or 5D input tensors",
        ),
    ],
)
def test_a_first_call_that_raises_leaves_the_layer_unbuilt(kwargs, call, error, match):
    layer = BatchNormalization(**kwargs)
    fused_before, parameters = layer.fused, list(layer.parameters())
    with pytest.raises(error, match=match):
        call(layer)
    assert_unbuilt(layer, kwargs["axis"])
    assert layer.fused is fused_before
    assert all(a is b for a, b in zip(layer.parameters(), parameters, strict=True))
    layer.adjustment = None
    layer.virtual_batch_size = None
    layer.fused = None
    layer(torch.randn(8, 3, 2, 2), training=True)  # another rank now builds it
    assert layer.built and layer._input_rank == 4


def test_a_first_call_that_raises_on_a_layer_with_num_features_unlocks_its_rank():
    layer = BatchNormalization(3, axis=1, adjustment=_bad_adjustment)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"`adjustment` must return a scale that broadcasts"):
        layer(torch.randn(4, 3, 2), training=True)
    assert layer.built and layer._input_rank is None and layer.axis == 1
    for key, value in layer.state_dict().items():
        assert torch.equal(value, before[key]), key
    layer.adjustment = None
    layer(torch.randn(4, 3, 2, 2), training=True)
    assert layer._input_rank == 4


def test_replicating_an_unbuilt_layer_for_data_parallel_is_refused():
    with pytest.raises(RuntimeError, match=r"uninitialized parameters, which `DataParallel`"):
        BatchNormalization()._replicate_for_data_parallel()
    built = BatchNormalization(3)
    replica = built._replicate_for_data_parallel()
    assert replica._update_lock is not built._update_lock


def test_first_calls_from_two_threads_build_once():
    layer = BatchNormalization(moving_average="debiased", momentum=1.0)
    parameters = list(layer.parameters())
    barrier = threading.Barrier(2)
    x = torch.randn(8, 5)

    def call():
        barrier.wait()
        for _ in range(50):
            layer(x, training=True)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(a is b for a, b in zip(layer.parameters(), parameters, strict=True))
    assert layer.moving_average_weight.item() == 100


@pytest.mark.parametrize("as_submodule", [False, True])
def test_torch_compile_builds_an_unbuilt_layer_before_tracing(as_submodule):
    # torch.compile builds lazy modules before it traces them, so the graph sees real weights.
    torch.manual_seed(0)
    layer, reference = BatchNormalization(axis=1), BatchNormalization(axis=1)
    model = nn.Sequential(nn.Identity(), layer) if as_submodule else layer
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    for _ in range(2):
        x = torch.randn(8, 3, 4)
        y = compiled(x) if as_submodule else compiled(x, training=torch.tensor(True))
        torch.testing.assert_close(y, reference(x, training=True))
    assert layer.num_features == 3 and not hasattr(layer, "_initialize_hook")
    torch.testing.assert_close(layer.moving_mean, reference.moving_mean)


@pytest.mark.parametrize("first_training", [True, False])
def test_a_layer_built_under_inference_mode_trains_afterwards(first_training):
    """A lazy model is often built by one dummy call under ``torch.inference_mode()``; weights
    made there were inference tensors, and every later training call failed ("Inference tensors
    cannot be saved for backward"). Against ``nn.BatchNorm2d`` (momentum and epsilon mapped),
    which is not lazy and so holds normal tensors from the start."""
    torch.manual_seed(0)
    x, upstream = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    ours, sample = BatchNormalization(axis=1), batchnorm.SampleNormalization(axis=1)
    reference = nn.BatchNorm2d(4, momentum=0.01, eps=1e-3)
    reference.train(first_training)
    with torch.inference_mode():
        ours(x, training=first_training)
        reference(x)
        sample(x)
    tensors = [*ours.parameters(), *ours.buffers(), *sample.parameters()]
    assert tensors and not any(t.is_inference() for t in tensors)
    results = []
    for layer, call in ((ours, lambda v: ours(v, training=True)), (reference.train(), reference)):
        source = x.clone().requires_grad_()
        output = call(source)
        output.backward(upstream)
        weight = layer.gamma if layer is ours else layer.weight
        results.append((output, source.grad, weight.grad))
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    mean = ours.moving_mean
    torch.testing.assert_close(mean, reference.running_mean, rtol=1e-6, atol=1e-7)
    source = x.clone().requires_grad_()
    sample(source).sum().backward()
    assert sample.gamma.grad is not None and source.grad is not None


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_torch_compile_with_dynamic_shapes_builds_an_unbuilt_layer():
    """With dynamic shapes the build sees symbolic sizes; the build's shape check took only
    ints and refused them (a TypeError inside dynamo), once a test before had made dynamo mark
    the shapes dynamic."""
    torch._dynamo.reset()
    layer = BatchNormalization(axis=1)
    compiled = torch.compile(nn.Sequential(nn.Identity(), layer), backend="eager", dynamic=True)
    assert compiled(torch.randn(8, 3, 4)).shape == (8, 3, 4)
    assert layer.num_features == 3


def test_functional_call_on_an_unbuilt_layer_is_refused_and_changes_nothing():
    layer = BatchNormalization(axis=1)
    passed = {"gamma": torch.full((4,), 2.0), "beta": torch.ones(4)}
    passed.update(moving_mean=torch.zeros(4), moving_variance=torch.ones(4))
    kept = {k: v.clone() for k, v in passed.items()}
    x = torch.randn(8, 4, 3, 3)
    # Before: the build replaced the passed tensors with the initializers' (y 11 off), wrote
    # them into the caller's dict, and left the layer built over its placeholders.
    with pytest.raises(ValueError, match="not built, but its beta, gamma"):
        torch.func.functional_call(layer, passed, (x,), {"training": True})
    for name, value in kept.items():
        torch.testing.assert_close(passed[name], value, rtol=0, atol=0)
    assert_unbuilt(layer, 1)
    layer(x, training=True)  # an ordinary first call still builds it
    assert layer.built


def test_an_unbuilt_debiased_layer_converted_deep_copies_and_pickles_its_float64_counter():
    import copy
    import pickle

    layer = BatchNormalization.like("caffe").float()  # no num_features: unbuilt
    copied = copy.deepcopy(layer)  # torch's placeholder refused: "uninitialized parameter"
    restored = pickle.loads(pickle.dumps(layer))
    for other in (copied, restored):
        other(torch.randn(4, 3), training=True)
        assert other.moving_average_weight.dtype == torch.float64  # came back float32


def test_an_unbuilt_layer_made_on_the_meta_device_names_the_way_that_works():
    with torch.device("meta"):
        layer = BatchNormalization(axis=1)
    x = torch.randn(8, 4, 3, 3)
    with pytest.raises(RuntimeError, match=r"build it there first.*to_empty"):
        layer(x)  # suggested `.to(x.device)`, which cannot copy out of a meta tensor
    layer.build((None, 4, 3, 3))  # the way the message names
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert layer(x).shape == x.shape
