"""Properties of BatchNormalization: statistics, modes, trainable, round trips, torch interop."""

from __future__ import annotations

import copy
import io
import json
import pickle

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

import batchnorm
from batchnorm import BatchNormalization
from batchnorm.functional import BatchNormStatistics, batch_norm
from tests.backends import torch_ops_and_kernels


def snapshot(layer):
    return {k: v.clone() for k, v in layer.state_dict().items()}


def assert_same_state(before, layer):
    after = layer.state_dict()
    assert before.keys() == after.keys()
    for key, value in before.items():
        assert torch.equal(value, after[key]), key


@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((64, 5), -1),
        ((16, 3, 6, 6), 1),
        ((16, 6, 6, 3), -1),
        ((8, 4, 3, 5, 2), [1, 3]),
        ((10, 7, 4), 1),
    ],
)
def test_training_output_has_zero_mean_unit_std_per_channel(shape, axis):
    torch.manual_seed(0)
    layer = BatchNormalization(axis=axis, epsilon=1e-6)
    x = torch.randn(shape) * 3 + 2
    y = layer(x, training=True).detach().double()
    axes = layer._axes
    reduce = tuple(i for i in range(len(shape)) if i not in axes)
    assert torch.allclose(y.mean(reduce), torch.zeros(()).double(), atol=1e-5)
    assert torch.allclose(y.std(reduce, unbiased=False), torch.ones(()).double(), atol=1e-4)


def test_momentum_zero_makes_moving_statistics_the_batch_statistics():
    layer = BatchNormalization(momentum=0.0, fused=False)
    x = torch.randn(32, 4) * 2 + 1
    layer(x, training=True)
    torch.testing.assert_close(layer.moving_mean, x.mean(0))
    torch.testing.assert_close(layer.moving_variance, x.var(0, unbiased=False))


def test_fused_layer_stores_bessel_corrected_variance():
    layer = BatchNormalization(axis=1, momentum=0.0)
    x = torch.randn(4, 3, 2, 2)
    layer(x, training=True)
    assert layer.fused is True
    torch.testing.assert_close(layer.moving_variance, x.var((0, 2, 3), unbiased=True))


@pytest.mark.parametrize("renorm", [False, True])
def test_inference_leaves_buffers_untouched(renorm):
    layer = BatchNormalization(3, axis=1, renorm=renorm)
    layer(torch.randn(8, 3, 4), training=True)
    before = snapshot(layer)
    layer.eval()
    layer(torch.randn(8, 3, 4))
    layer.train()
    layer(torch.randn(8, 3, 4), training=False)
    assert_same_state(before, layer)


def test_training_none_follows_module_mode():
    layer = BatchNormalization(2)
    x = torch.randn(16, 2) + 5
    layer.eval()
    torch.testing.assert_close(layer(x), (x - 0) / torch.sqrt(torch.tensor(1 + 1e-3)))
    layer.train()
    layer(x)
    assert not torch.equal(layer.moving_mean, torch.zeros(2))


def test_trainable_false_freezes_and_forces_inference():
    layer = BatchNormalization(3)
    layer(torch.randn(8, 3), training=True)
    layer.trainable = False
    assert not layer.gamma.requires_grad and not layer.beta.requires_grad
    before = snapshot(layer)
    x = torch.randn(8, 3)
    y = layer(x, training=True)
    assert_same_state(before, layer)
    torch.testing.assert_close(y, layer(x, training=False))
    layer.trainable = True
    assert layer.gamma.requires_grad
    layer(x, training=True)
    assert not torch.equal(layer.moving_mean, before["moving_mean"])


def test_one_value_per_channel_gives_beta():
    layer = BatchNormalization(3)
    layer.set_weights([np.full(3, 2.0), np.array([0.1, -0.2, 0.3]), np.zeros(3), np.ones(3)])
    y = layer(torch.randn(1, 3), training=True)
    np.testing.assert_array_equal(y.detach().numpy(), np.array([[0.1, -0.2, 0.3]], np.float32))


@pytest.fixture
def default_float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def test_dtype_none_takes_torchs_default_dtype_as_torchs_modules_do(default_float64):
    """Keras' dtype=None is its global policy; torch's is the default dtype: after
    torch.set_default_dtype(torch.float64) the layer's weights are float64, lazy or not, like
    nn.BatchNorm1d's beside it, and its moving statistics follow a float64 reference."""
    torch.manual_seed(0)
    x = torch.randn(16, 4) * 3 + 1e4
    for layer in (BatchNormalization(), BatchNormalization(4), BatchNormalization(4, axis=1)):
        layer(x, training=True)
        assert layer.get_config()["dtype"] == "float64"
        for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
            assert tensor.dtype == torch.nn.BatchNorm1d(4).weight.dtype == torch.float64, name
        expected = 0.01 * x.var(0, unbiased=False) + 0.99
        torch.testing.assert_close(layer.moving_variance, expected, rtol=1e-12, atol=0)
    # An explicit dtype, and a float32 torch module converted, stay float32.
    assert BatchNormalization(4, dtype="float32").gamma.dtype == torch.float32
    converted = batchnorm.from_torch(torch.nn.BatchNorm1d(4, dtype=torch.float32))
    assert converted.gamma.dtype == converted.moving_mean.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_keep_their_dtype_with_float32_state(dtype):
    layer = BatchNormalization(4)
    x = torch.randn(32, 4)
    y = layer(x.to(dtype), training=True)
    assert y.dtype == dtype
    assert layer.moving_mean.dtype == torch.float32 and layer.gamma.dtype == torch.float32
    reference = BatchNormalization(4)
    expected = reference(x.to(dtype).float(), training=True)
    torch.testing.assert_close(y.float(), expected.to(dtype).float())
    torch.testing.assert_close(layer.moving_variance, reference.moving_variance)


def test_matches_torch_batchnorm_with_conventions_mapped():
    torch.manual_seed(1)
    ours = BatchNormalization(5, axis=1, momentum=0.9, epsilon=1e-5, fused=True)
    theirs = torch.nn.BatchNorm2d(5, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        ours.gamma.copy_(torch.rand(5) + 0.5)
        ours.beta.copy_(torch.randn(5))
        theirs.weight.copy_(ours.gamma)
        theirs.bias.copy_(ours.beta)
    for _ in range(5):
        x = torch.randn(6, 5, 3, 4) * 2 + 1
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y1, y2 = ours(x1, training=True), theirs(x2)
        dy = torch.randn_like(y1)
        (y1 * dy).sum().backward()
        (y2 * dy).sum().backward()
        torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.gamma.grad, theirs.weight.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.beta.grad, theirs.bias.grad, rtol=1e-4, atol=1e-5)
        ours.gamma.grad = ours.beta.grad = theirs.weight.grad = theirs.bias.grad = None
    torch.testing.assert_close(ours.moving_mean, theirs.running_mean)
    torch.testing.assert_close(ours.moving_variance, theirs.running_var)
    theirs.eval()
    x = torch.randn(2, 5, 3, 4)
    torch.testing.assert_close(ours(x, training=False), theirs(x), rtol=1e-5, atol=1e-5)


def test_training_tensor_compiles_without_graph_break():
    layer = BatchNormalization(3, axis=1)
    reference = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(8, 3, 4)
    y_train = compiled(x, training=torch.tensor(True))
    torch.testing.assert_close(y_train, reference(x, training=True))
    torch.testing.assert_close(layer.moving_mean, reference.moving_mean)
    before = snapshot(layer)
    y_test = compiled(x, training=torch.tensor(False))
    torch.testing.assert_close(y_test, reference(x, training=False))
    assert_same_state(before, layer)


def test_stateless_batch_norm_with_vmap_and_functional_call():
    state = BatchNormStatistics(torch.zeros(3), torch.ones(3))
    xs = torch.randn(4, 10, 3)

    def step(x):
        return batch_norm(x, state, training=True, momentum=0.5)

    ys, new_states = torch.func.vmap(step)(xs)
    for i in range(4):
        y, new = batch_norm(xs[i], state, training=True, momentum=0.5)
        torch.testing.assert_close(ys[i], y)
        torch.testing.assert_close(new_states.moving_mean[i], new.moving_mean)
    assert torch.equal(state.moving_mean, torch.zeros(3))

    layer = BatchNormalization(3)
    params = {k: v.clone() for k, v in layer.state_dict().items()}
    y = torch.func.functional_call(layer, params, (xs[0],), {"training": False})
    torch.testing.assert_close(y, layer(xs[0], training=False))


def _trained_pair():
    """This layer and ``nn.BatchNorm1d`` with the same gamma, beta, moving statistics and
    epsilon, both in inference."""
    torch.manual_seed(0)
    ours = BatchNormalization(4)
    ours(torch.randn(16, 4) * 2 + 1, training=True)
    with torch.no_grad():
        ours.gamma.copy_(torch.randn(4))
        ours.beta.copy_(torch.randn(4))
    theirs = torch.nn.BatchNorm1d(4, eps=ours.epsilon)
    with torch.no_grad():
        theirs.weight.copy_(ours.gamma)
        theirs.bias.copy_(ours.beta)
        theirs.running_mean.copy_(ours.moving_mean)
        theirs.running_var.copy_(ours.moving_variance)
    return ours.eval(), theirs.eval()


def test_torch_func_transforms_see_through_the_layer():
    # Under vmap/grad/jacrev the layer's parameters are functorch wrappers without storage
    # (functional_call puts them in the layer): those calls take the torch ops, and give what
    # nn.BatchNorm1d gives under the same transforms.
    ours, theirs = _trained_pair()
    x = torch.randn(8, 4)
    names = {"gamma": "weight", "beta": "bias"}

    def gradients(module, per_sample):
        params = {n: p.detach() for n, p in module.named_parameters()}
        buffers = dict(module.named_buffers())

        def loss(p, x):
            return torch.func.functional_call(module, (p, buffers), (x,)).pow(2).sum()

        if per_sample:
            found = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[:, None])
        else:
            found = torch.func.grad(loss)(params, x)
        return {names.get(n, n): g for n, g in found.items()}

    for per_sample in (False, True):
        torch.testing.assert_close(gradients(ours, per_sample), gradients(theirs, per_sample))
    torch.testing.assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(theirs)(x))
    # And the layer's own call afterwards still takes the kernels' shortcut, on its own tensors.
    torch.testing.assert_close(ours(x), theirs(x))
    assert vars(ours)["_direct_calls"] is not None


# torch's forward AD loads its decompositions through torch.jit.script on first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("training", [True, False])
def test_forward_mode_ad_gives_torchs_tangents(training):
    # torch.autograd.forward_ad: the kernels' autograd functions have no forward-mode
    # derivative (a dual input raised NotImplementedError); inside dual_level() the layer takes
    # the torch ops: the output and tangent are nn.BatchNorm1d's, and the moving statistics
    # step as in a plain call.
    ours, theirs = _trained_pair()
    ours.train(training), theirs.train(training)
    x, tangent = torch.randn(8, 4) * 2 + 1, torch.randn(8, 4)
    plain = copy.deepcopy(ours)
    plain(x)
    results = []
    for module in (ours, theirs):
        with forward_ad.dual_level():
            y = module(forward_ad.make_dual(x, tangent))
            results.append(forward_ad.unpack_dual(y))
    (y_ours, t_ours), (y_theirs, t_theirs) = results
    torch.testing.assert_close(y_ours, y_theirs)
    torch.testing.assert_close(t_ours, t_theirs)
    torch.testing.assert_close(ours.moving_mean, plain.moving_mean)
    torch.testing.assert_close(ours.moving_variance, plain.moving_variance)


@pytest.mark.parametrize("training", [True, False])
def test_vectorized_jacobians_are_torchs(training):
    # torch.autograd.functional.jacobian(vectorize=True) runs the backward under the older vmap,
    # with a batched upstream gradient that the kernels cannot read ("Batching rule not
    # implemented for aten::detach"): such a backward takes the torch ops.
    ours, theirs = _trained_pair()
    ours.double().train(training), theirs.double().train(training)
    x = torch.randn(8, 4, dtype=torch.float64) * 2 + 1
    jacobians = [
        torch.autograd.functional.jacobian(module, x, vectorize=True) for module in (ours, theirs)
    ]
    torch.testing.assert_close(*jacobians)


@pytest.mark.parametrize("training", [True, False])
def test_batched_gradients_equal_one_backward_each(training):
    # torch.autograd.grad(is_grads_batched=True), through an NCHW layer with a fused activation:
    # the batched backward (torch ops) gives each gradient the kernels' backward gives alone.
    torch.manual_seed(0)
    layer = BatchNormalization(axis=1, activation="elu")
    layer(torch.randn(4, 3, 5, 5), training=True)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    upstream = torch.randn(5, 4, 3, 5, 5)
    y = layer(x, training=training)
    inputs = (x, layer.gamma, layer.beta)
    batched = torch.autograd.grad(y, inputs, upstream, retain_graph=True, is_grads_batched=True)
    for i, gradient in enumerate(upstream):
        alone = torch.autograd.grad(y, inputs, gradient, retain_graph=True)
        for found, expected in zip(batched, alone, strict=True):
            torch.testing.assert_close(found[i], expected, rtol=1e-5, atol=1e-5)


# torch's forward AD loads its decompositions through torch.jit.script on first use
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("memory", ["default", "in_place"])
@pytest.mark.parametrize("transform", ["grad", "jacrev", "jvp", "hessian"])
def test_a_training_call_under_torch_func_transforms(transform, memory):
    """A training call under torch.func.grad (a MAML-style inner loop), jacrev, jvp or hessian
    failed when it wrote the moving statistics ("attempted to call in-place operation that would
    mutate a captured Tensor"), as ``nn.BatchNorm1d`` with running statistics fails; torch's way
    out, ``torch.func.replace_all_batch_norm_modules_``, does not reach this layer. Now the
    derivatives are those of ``nn.BatchNorm1d(track_running_stats=False)``, and the moving
    statistics step as in the same call outside the transform. An in-place layer computes out
    of place there (its overwriting autograd.Function cannot run under the transforms, and its
    checks failed: "Cannot access storage of TensorWrapper")."""
    ours, _ = _trained_pair()
    ours.train().double()
    ours.memory = memory
    theirs = torch.nn.BatchNorm1d(4, eps=ours.epsilon, track_running_stats=False).double()
    with torch.no_grad():
        theirs.weight.copy_(ours.gamma), theirs.bias.copy_(ours.beta)
    x, tangent = torch.randn(6, 4, dtype=torch.float64) * 2 + 1, torch.randn(6, 4).double()
    plain = copy.deepcopy(ours)
    plain(x.clone())

    def derivative(module):
        def loss(z):
            return module(z).pow(3).sum()

        if transform == "grad":
            return torch.func.grad(loss)(x)
        if transform == "jacrev":
            return torch.func.jacrev(module)(x)
        if transform == "jvp":
            return torch.func.jvp(module, (x,), (tangent,))
        return torch.func.hessian(loss)(x)

    torch.testing.assert_close(derivative(ours), derivative(theirs))
    torch.testing.assert_close(ours.moving_mean, plain.moving_mean, rtol=1e-14, atol=0)
    torch.testing.assert_close(ours.moving_variance, plain.moving_variance, rtol=1e-14, atol=0)


# torch.compile's first use in a process loads modules that go through torch.jit
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_torch_func_transforms_traced_by_torch_compile():
    """torch.compile over a torch.func transform took the custom operators, whose autograd
    functions functorch cannot run ("must override the setup_context staticmethod"): jacrev of
    an inference call and a vmapped ensemble's training failed. They give the eager results now.
    A grad of a training call with the layer's own buffers fails there as nn.BatchNorm1d's with
    running statistics does (the copy into them does not trace), changing nothing; it must not
    leave the layer's forward skipped by later compiles (a fallback to eager there did)."""
    torch.manual_seed(0)
    ours, _ = _trained_pair()
    x = torch.randn(8, 4) * 2 + 1
    jacobian = torch.func.jacrev(lambda z: ours(z, training=False))
    torch.testing.assert_close(torch.compile(jacobian)(x), jacobian(x))

    models = [copy.deepcopy(ours) for _ in range(3)]
    params, buffers = torch.func.stack_module_state(models)
    xs = torch.randn(3, 8, 4) * 2 + 1

    def ensemble(p, b, z):
        return torch.func.functional_call(ours, (p, b), (z,), {"training": True})

    found = torch.compile(torch.func.vmap(ensemble))(params, buffers, xs)
    for i, (model, z) in enumerate(zip(models, xs, strict=True)):
        torch.testing.assert_close(found[i], model(z, training=True))
        torch.testing.assert_close(buffers["moving_mean"][i], model.moving_mean)

    before = snapshot(ours)
    gradient = torch.func.grad(lambda z: ours(z, training=True).pow(3).sum())
    with pytest.raises(RuntimeError, match="mutate a captured Tensor"):
        torch.compile(gradient)(x)
    assert_same_state(before, ours)
    torch.testing.assert_close(
        torch.compile(ours, fullgraph=True)(x, training=False), ours(x, training=False)
    )


@pytest.mark.parametrize("training", [True, False])
def test_vmapped_masks_are_checked_and_used(training):
    """A mask vmapped with the input (one per ensemble member): its value check read it as a
    bool, which vmap refuses ("data-dependent control flow"). The check reads all the vmapped
    masks' values at once; the outputs and statistics are each member's own masked call's, and
    a negative weight in any member is refused."""
    torch.manual_seed(0)
    models = [BatchNormalization(3, fused=False, renorm=True) for _ in range(2)]
    for model in models:
        model(torch.randn(6, 5, 3), training=True)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0])
    xs = torch.randn(2, 6, 5, 3) * 2 + 1
    masks = (torch.rand(2, 6, 5) > 0.3).float()

    def call(p, b, z, mask):
        return torch.func.functional_call(base, (p, b), (z,), {"training": training, "mask": mask})

    found = torch.func.vmap(call)(params, buffers, xs, masks)
    for i, (model, z, mask) in enumerate(zip(models, xs, masks, strict=True)):
        torch.testing.assert_close(found[i], model(z, training=training, mask=mask))
        torch.testing.assert_close(buffers["moving_mean"][i], model.moving_mean)
    masks[1, 0, 0] = -1.0
    with pytest.raises(ValueError, match="a mask with negative values"):
        torch.func.vmap(call)(params, buffers, xs, masks)


def test_maml_inner_steps_under_grad_with_functional_call():
    """Gradients with respect to gamma and beta passed in by functional_call, through a
    channels-first layer with a tensor ``training`` flag: those of torch's module without
    running statistics; the moving statistics step once per call, as outside the transform."""
    torch.manual_seed(0)
    ours = BatchNormalization(axis=1)
    ours(torch.randn(4, 3, 5, 5), training=True)
    theirs = torch.nn.BatchNorm2d(3, eps=ours.epsilon, track_running_stats=False)
    plain = copy.deepcopy(ours)
    params = {"gamma": torch.randn(3), "beta": torch.randn(3)}
    x = torch.randn(4, 3, 5, 5) * 3 - 1
    for _ in range(2):
        found = torch.func.grad(
            lambda p: (
                torch.func.functional_call(ours, p, (x,), {"training": torch.tensor(True)})
                .pow(2)
                .mean()
            )
        )(params)
        expected = torch.func.grad(
            lambda p: (
                torch.func.functional_call(theirs, {"weight": p["gamma"], "bias": p["beta"]}, (x,))
                .pow(2)
                .mean()
            )
        )(params)
        torch.testing.assert_close(found, expected, rtol=1e-4, atol=1e-5)
        plain(x, training=True)
        torch.testing.assert_close(ours.moving_mean, plain.moving_mean)
        torch.testing.assert_close(ours.moving_variance, plain.moving_variance)
        params = {n: p - 0.1 * found[n] for n, p in params.items()}


def test_vmapped_training_takes_stacked_moving_statistics_and_refuses_unstacked_ones():
    """Each vmapped batch has its own statistics: stacked buffers (an ensemble through
    stack_module_state and functional_call, grad inside vmap too) take them, as each model's own
    call would; the layer's own unstacked buffers get a clear error and stay as they were."""
    torch.manual_seed(0)
    models = [BatchNormalization(4) for _ in range(3)]
    for model in models:
        model(torch.randn(8, 4), training=True)
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0])
    xs = torch.randn(3, 8, 4) * 2 + 1

    def loss(p, b, z):
        return torch.func.functional_call(base, (p, b), (z,), {"training": True}).pow(3).sum()

    found = torch.func.vmap(torch.func.grad(loss))(params, buffers, xs)
    for i, (model, z) in enumerate(zip(models, xs, strict=True)):
        model(z, training=True).pow(3).sum().backward()
        torch.testing.assert_close(found["gamma"][i], model.gamma.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(buffers["moving_mean"][i], model.moving_mean)
        torch.testing.assert_close(buffers["moving_variance"][i], model.moving_variance)
    before = snapshot(base)
    with pytest.raises(RuntimeError, match=r"training under torch.func.vmap.*stack_module_state"):
        torch.func.vmap(lambda z: base(z, training=True))(xs)
    assert_same_state(before, base)


def test_state_dict_round_trip_into_unbuilt_layer():
    layer = BatchNormalization(axis=1, renorm=True, gamma_initializer="random_normal")
    for _ in range(3):
        layer(torch.randn(8, 4, 5), training=True)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    restored = BatchNormalization(axis=1, renorm=True)
    restored.load_state_dict(torch.load(buffer))
    assert_same_state(layer.state_dict(), restored)
    x = torch.randn(8, 4, 5)
    torch.testing.assert_close(restored(x, training=True), layer(x, training=True))
    assert_same_state(layer.state_dict(), restored)


def test_config_round_trip_is_json_serialisable():
    layer = BatchNormalization(
        axis=[1, 3],
        momentum=0.9,
        epsilon=1e-4,
        renorm=True,
        renorm_clipping={"rmax": 2.0, "dmax": 1.0},
        gamma_regularizer="l2",
        beta_constraint="non_neg",
        moving_variance_initializer={"class_name": "Constant", "config": {"value": 2.0}},
        virtual_batch_size=2,
        name="bn",
    )
    layer.build((4, 3, 5, 6))
    config = json.loads(json.dumps(layer.get_config()))
    clone = BatchNormalization.from_config(config)
    assert clone.get_config() == {**config, "num_features": config["num_features"]}
    clone.build((4, 3, 5, 6))
    assert clone.get_config() == config
    assert [w.shape for w in clone.get_weights()] == [w.shape for w in layer.get_weights()]


def test_pickle_round_trip():
    layer = BatchNormalization(3, gamma_regularizer="l1", beta_constraint="max_norm")
    layer(torch.randn(5, 3), training=True)
    clone = pickle.loads(pickle.dumps(layer))
    assert_same_state(layer.state_dict(), clone)
    assert clone.get_config() == layer.get_config()


def test_set_weights_accepts_flat_and_keras_shapes():
    layer = BatchNormalization(axis=[1, 2])
    layer.build((2, 3, 4))
    values = [np.arange(12, dtype=np.float32) + i for i in range(4)]
    layer.set_weights([v.reshape(1, 3, 4) for v in values])
    assert [w.shape for w in layer.get_weights()] == [(1, 3, 4)] * 4
    layer.set_weights(values)
    np.testing.assert_array_equal(layer.get_weights()[2].reshape(-1), values[2])


def test_losses_are_differentiable_penalties():
    layer = BatchNormalization(
        3, gamma_regularizer={"class_name": "L2", "config": {"l2": 0.5}}, beta_regularizer="l1"
    )
    with torch.no_grad():
        layer.beta.copy_(torch.tensor([1.0, -2.0, 0.5]))
    gamma_loss, beta_loss = layer.losses
    assert gamma_loss.item() == pytest.approx(0.5 * 3)
    assert beta_loss.item() == pytest.approx(0.01 * 3.5)
    (gamma_loss + beta_loss).backward()
    torch.testing.assert_close(layer.gamma.grad, torch.ones(3))


def test_constraints_applied_after_each_optimizer_step():
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), BatchNormalization(3, beta_constraint="non_neg")
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
    handle = batchnorm.apply_constraints_after_step(optimizer, model)
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(torch.randn(8, 4)).sum() + model[1].beta.sum()
        loss.backward()
        optimizer.step()
        assert (model[1].beta >= 0).all()
    handle.remove()


def test_apply_constraints_after_step_registers_one_hook_however_often_called():
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), BatchNormalization(beta_constraint="non_neg")
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # before the layer is built
    calls = []
    constraint = model[1].beta_constraint
    model[1].beta_constraint = lambda w: calls.append(1) or constraint(w)
    handles = [batchnorm.apply_constraints_after_step(optimizer, model) for _ in range(3)]
    assert handles[0] is handles[1] is handles[2]
    model(torch.randn(8, 4)).sum().backward()
    optimizer.step()
    assert calls == [1]
    handles[0].remove()
    optimizer.step()
    assert calls == [1]
    again = batchnorm.apply_constraints_after_step(optimizer, model)
    assert again is not handles[0]
    optimizer.step()
    assert calls == [1, 1]
    other = torch.nn.Sequential(BatchNormalization(3))
    assert batchnorm.apply_constraints_after_step(optimizer, other) is not again


def test_variance_scaling_initializer_statistics():
    from batchnorm import initializers

    init = initializers.get(
        {
            "class_name": "VarianceScaling",
            "config": {"scale": 2.0, "mode": "fan_in", "distribution": "uniform", "seed": 3},
        }
    )
    sample = init((40000,))
    limit = np.sqrt(3 * 2.0 / 40000)
    assert sample.abs().max() <= limit
    assert sample.std().item() == pytest.approx(np.sqrt(2.0 / 40000), rel=0.02)
    assert torch.equal(sample, init((40000,)))
    assert torch.equal(initializers.get("constant")((2,)), torch.zeros(2))


def test_mask_excludes_positions_from_statistics():
    layer = BatchNormalization(2, momentum=0.0)
    x = torch.randn(4, 6, 2)
    mask = torch.ones(4, 6, dtype=torch.bool)
    mask[:, 3:] = False
    layer(x, training=True, mask=mask)
    kept = x[:, :3].reshape(-1, 2)
    torch.testing.assert_close(layer.moving_mean, kept.mean(0))
    torch.testing.assert_close(layer.moving_variance, kept.var(0, unbiased=False))


def test_fused_layer_ignores_mask_with_warning_like_tf_keras():
    layer = BatchNormalization(2)
    x = torch.randn(2, 3, 3, 2)
    with pytest.warns(UserWarning, match="Masking is not supported with `fused=True`"):
        y = layer(x, training=True, mask=torch.zeros(2, 3, 3))
    torch.testing.assert_close(y, BatchNormalization(2)(x, training=True))


def test_empty_batch_updates_nothing():
    layer = BatchNormalization(3)
    before = snapshot(layer)
    y = layer(torch.randn(0, 3), training=True)
    assert y.shape == (0, 3)
    assert_same_state(before, layer)


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (
            lambda: BatchNormalization(axis=1),
            "num_features=None, axis=1, momentum=0.99, epsilon=0.001",
        ),
        (
            lambda: BatchNormalization(5, axis=-1),
            "num_features=5, axis=-1, momentum=0.99, epsilon=0.001",
        ),
        (
            lambda: BatchNormalization(
                (3, 4), axis=(1, 3), momentum=0.9, epsilon=1e-5, center=False, fused=False
            ),
            "num_features=(3, 4), axis=[1, 3], momentum=0.9, epsilon=1e-05, center=False, "
            "fused=False",
        ),
        (
            lambda: BatchNormalization(
                4,
                gamma_initializer="random_normal",
                beta_regularizer="l2",
                renorm=True,
                renorm_clipping={"rmax": 3.0},
                trainable=False,
                virtual_batch_size=2,
                moving_variance_estimator="unbiased",
                moving_average="debiased",
                use_global_stats=True,
                dtype="float64",
            ),
            "num_features=4, axis=-1, momentum=0.99, epsilon=0.001, "
            "gamma_initializer=RandomNormal(mean=0.0, stddev=0.05, seed=None), "
            "beta_regularizer=L2(l2=0.01), renorm=True, renorm_clipping={'rmax': 3.0}, "
            "trainable=False, virtual_batch_size=2, moving_variance_estimator='unbiased', "
            "moving_average='debiased', use_global_stats=True, dtype='float64'",
        ),
        (
            lambda: BatchNormalization(3, synchronized=True, adjustment=_unit_adjustment),
            "num_features=3, axis=-1, momentum=0.99, epsilon=0.001, "
            "adjustment=_unit_adjustment, synchronized=True",
        ),
    ],
)
def test_repr_shows_every_option_that_differs_from_the_default(layer, expected):
    layer = layer()
    assert repr(layer) == f"BatchNormalization({expected})"


def test_repr_keeps_the_axis_as_given_after_the_build():
    layer = BatchNormalization(axis=-1)
    layer(torch.randn(4, 3), training=True)
    assert layer.axis == [1]
    assert (
        repr(layer) == "BatchNormalization(num_features=3, axis=-1, momentum=0.99, epsilon=0.001)"
    )


def _unit_adjustment(shape):
    return torch.ones(()), torch.zeros(())


def test_lazy_build_from_first_input_and_explicit_build():
    layer = BatchNormalization(axis=1)
    parameters = list(layer.parameters())
    assert not layer.built and layer.num_features is None
    assert all(isinstance(p, torch.nn.parameter.UninitializedParameter) for p in parameters)
    layer.build((2, 7, 3))
    assert layer.gamma.shape == (7,) and layer.axis == [1] and layer.num_features == 7
    assert all(a is b for a, b in zip(layer.parameters(), parameters, strict=True))
    lazy = BatchNormalization(axis=-1)
    lazy(torch.randn(4, 5))
    assert lazy.moving_variance.shape == (5,) and lazy.axis == [1]


def test_adjustment_varying_inside_a_channel_uses_elementwise_scale():
    torch.manual_seed(4)
    x = torch.randn(6, 3, dtype=torch.float64)
    a = torch.rand(6, 3, dtype=torch.float64) + 0.5
    b = torch.randn(6, 3, dtype=torch.float64)
    layer = BatchNormalization(3, adjustment=lambda shape: (a, b), dtype="float64", momentum=0.0)
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor([1.5, 0.5, 2.0]))
        layer.beta.copy_(torch.tensor([0.1, 0.2, 0.3]))
    y = layer(x, training=True)
    xhat = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3)
    expected = xhat * (a * layer.gamma) + (b * layer.gamma + layer.beta)
    torch.testing.assert_close(y, expected.detach())
    torch.testing.assert_close(layer.moving_mean, x.mean(0))
    torch.testing.assert_close(
        layer(x, training=False),
        (
            (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-3) * layer.gamma + layer.beta
        ).detach(),
    )


class Recorder(TorchDispatchMode):
    """A dispatch mode that records the names of the operators it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_fake_tensors_and_dispatch_modes_see_torch_operators():
    """FakeTensorMode (shape propagation, memory estimation) and every TorchDispatchMode must see
    each operator: a fake input reached the kernels and failed (".numpy() is not supported for
    tensor subclasses"), a layer made with num_features under FakeTensorMode failed as
    nn.LazyBatchNorm2d does (its lazy placeholders), and a mode saw no arithmetic at all."""
    with FakeTensorMode():
        layer = BatchNormalization(4, axis=1, renorm=True)
        x = torch.randn(2, 4, 3, 3, requires_grad=True)
        y = layer(x, training=True)
        y.sum().backward()
    assert isinstance(y, FakeTensor) and y.shape == x.shape
    assert isinstance(layer.gamma.grad, FakeTensor)

    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3)
    layer = BatchNormalization(4, axis=1, momentum=0.9, moving_variance_estimator="unbiased")
    reference = nn.BatchNorm2d(4, eps=1e-3)
    arithmetic = {"mul", "sub", "add", "rsqrt", "var_mean", "mean", "sum"}
    with Recorder() as recorder:
        y = layer(x, training=True)
    assert recorder.names & arithmetic
    torch.testing.assert_close(y, reference(x))
    torch.testing.assert_close(layer.moving_variance, reference.running_var)
    # A backward under a mode, of a forward outside it.
    ours, theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn_like(x)
    y = layer(ours, training=True)
    with Recorder() as recorder:
        y.backward(upstream)
    assert recorder.names & arithmetic
    reference(theirs).backward(upstream)
    torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize(
    "options", [{}, {"activation": "elu"}, {"virtual_batch_size": 4}, {"masked": True}]
)
def test_an_in_place_backward_under_a_dispatch_mode_shows_its_arithmetic(options):
    """memory='in_place', forward outside a dispatch mode and backward inside it: the backward
    called the kernels directly, unseen by the mode (a FlopCounterMode around the backward alone
    counted nothing of it). It now takes the torch ops there, with the kernels' gradients."""
    options = dict(options)
    masked = options.pop("masked", False)
    torch.manual_seed(0)
    x = torch.randn(8, 4, 3, 3) * 2 + 1
    mask = (torch.rand(8, 3, 3) > 0.3).float() if masked else None
    upstream = torch.randn_like(x)
    gradients = []
    for recording in (False, True):
        layer = BatchNormalization(4, axis=1, fused=False, memory="in_place", **options)
        a = x.clone().requires_grad_()
        y = layer(a * 1, training=True, mask=mask)
        recorder = Recorder()
        if recording:
            with recorder:
                y.backward(upstream)
            assert {"sum", "rsqrt"} <= recorder.names, recorder.names
        else:
            y.backward(upstream)
        gradients.append((a.grad, layer.gamma.grad, layer.beta.grad))
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-5, atol=1e-5)


def test_ghost_batch_configs_keep_unbuilt_axes_and_shift_built_tf_keras_ones():
    """tf-keras writes a built ghost-batch layer's axes shifted by the ghost dimension (all >= 2,
    as axis 0 is refused); an unbuilt layer's as given. This layer's own unbuilt config of
    axis [2, 3] came back as [1, 2], and tf-keras' unbuilt {"axis": [1]} failed to load."""
    layer = BatchNormalization(axis=[2, 3], virtual_batch_size=2)
    assert BatchNormalization.from_config(json.loads(json.dumps(layer.get_config()))).axis == [2, 3]
    unbuilt_tf_keras = {"axis": [1], "virtual_batch_size": 2}  # tf_keras' get_config(), unbuilt
    assert BatchNormalization.from_config(unbuilt_tf_keras).axis == [1]
    built_tf_keras = {"axis": [2], "virtual_batch_size": 2}  # tf_keras' for axis=1, built
    assert BatchNormalization.from_config(built_tf_keras).axis == [1]


def test_keras_3_variance_scaling_configs_with_fan_axes_load():
    """Keras 3.15 writes `input_axes` and `output_axes` for VarianceScaling and its presets
    (these dicts are keras.layers.BatchNormalization(...).get_config()'s): refused before."""
    config = {
        "gamma_initializer": {
            "module": "keras.initializers",
            "class_name": "VarianceScaling",
            "config": {
                "seed": 1,
                "scale": 2.0,
                "mode": "fan_out",
                "distribution": "uniform",
                "input_axes": [0],
                "output_axes": [1],
            },
            "registered_name": None,
        },
        "moving_mean_initializer": {
            "module": "keras.initializers",
            "class_name": "GlorotUniform",
            "config": {"seed": None, "input_axes": None, "output_axes": None},
            "registered_name": None,
        },
    }
    layer = BatchNormalization.from_config(config)
    initializer = layer.gamma_initializer
    assert (initializer.input_axes, initializer.output_axes) == ([0], [1])
    # fan_out = the size of axis 1 (100), not of the last axis' receptive field; Keras 3 draws
    # std 0.1414 for this shape (sqrt(2 / 100))
    sample = initializer((400, 100))
    assert sample.std().item() == pytest.approx(np.sqrt(2.0 / 100), rel=0.02)
    assert layer.get_config()["gamma_initializer"]["config"]["output_axes"] == [1]


def test_unsorted_axes_take_keras_arrays_in_axis_position_order():
    """axis=[3, 1]: the layer keeps channels in ascending axis order, (3, 6) for (N, 3, 5, 6).
    tf-keras' get_weights() arrays (1, 3, 1, 6) built an unbuilt layer for (6, 3), which then
    refused its own input."""
    arrays = [np.arange(18, dtype=np.float32).reshape(1, 3, 1, 6) + i for i in range(4)]
    layer = BatchNormalization(axis=[3, 1])
    layer.set_weights(arrays)
    assert layer.num_features == (3, 6)
    layer(torch.randn(2, 3, 5, 6), training=False)
    for got, given in zip(layer.get_weights(), arrays, strict=True):
        np.testing.assert_array_equal(got, given)


def test_set_weights_refuses_arrays_with_channels_in_another_order():
    """(6, 3) arrays for a (3, 6) layer were reshaped, scrambling channels (tf-keras refuses)."""
    layer = BatchNormalization((3, 6), axis=[1, 3])
    before = [w.copy() for w in layer.get_weights()]
    for shape in ((6, 3), (1, 6, 1, 3)):
        with pytest.raises(ValueError, match=r"per-channel shape \(3, 6\).*Received: shape"):
            layer.set_weights([np.ones(shape, np.float32)] * 4)
    for got, was in zip(layer.get_weights(), before, strict=True):
        np.testing.assert_array_equal(got, was)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_keep_the_scale_factor_in_float64(dtype):
    """`.to(float16)` converted Caffe's scale factor, which the kernels then read and wrote as
    the bits of a float16: 4 batches stored 2.4e-7, and the average was lost on `.float()`."""
    generator = torch.Generator().manual_seed(4)
    batches = [torch.randn(8, 3, generator=generator) * 2 + i for i in range(5)]
    reference = BatchNormalization(3, moving_average="debiased", momentum=1.0)
    layer = BatchNormalization(3, moving_average="debiased", momentum=1.0).to(dtype)
    assert layer.moving_average_weight.dtype == torch.float64
    for batch in batches[:4]:
        reference(batch.to(dtype).float(), training=True)
        layer(batch.to(dtype), training=True)
    assert layer.moving_average_weight.item() == 4.0
    layer.float()
    layer(batches[4], training=True)
    reference(batches[4], training=True)
    assert layer.moving_average_weight.item() == 5.0
    torch.testing.assert_close(layer.moving_mean, reference.moving_mean, rtol=1e-2, atol=1e-2)


def test_constraints_after_a_step_leave_frozen_layers_alone():
    """Keras constrains only the variables its optimizer updates: a trainable=False layer's beta
    kept [-1, 2, -3, 4] in tf-keras and Keras 3 fit(); it was projected to [0, 2, 0, 4]."""
    frozen = BatchNormalization(4, beta_constraint="non_neg", trainable=False)
    trained = BatchNormalization(4, beta_constraint="non_neg")
    beta = torch.tensor([-1.0, 2.0, -3.0, 4.0])
    with torch.no_grad():
        frozen.beta.copy_(beta)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), frozen, trained)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=10.0)
    batchnorm.apply_constraints_after_step(optimizer, model)
    (model(torch.randn(8, 4)).sum() - 100 * trained.beta.sum()).backward()
    optimizer.step()
    assert torch.equal(frozen.beta.detach(), beta)
    assert (trained.beta >= 0).all()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize(
    ("x", "axis"),
    [
        (torch.randn(4, 3, 5, 6), [1, 3]),  # channel axes not adjacent: the kernels read a copy
        (torch.randn(4, 5, 6, 3).permute(0, 3, 1, 2), [1, 3]),  # channels last, adjacent there
        (torch.randn(4, 3, 5, 6).permute(0, 2, 1, 3), [2, 3]),
        (torch.randn(4, 3, 5, 12)[..., ::2], 1),  # not dense: a contiguous output
    ],
)
def test_output_is_laid_out_as_torch_lays_out_x(x, axis, training, requires_grad):
    """An eager output has the strides torch's own ops give a result of x
    (``torch.empty_like(x)``'s), as under torch.compile: before, axes [1, 3] of a contiguous
    NCHW x came back in the kernels' order, and ``y.view(n, -1)`` failed on it. The values are
    the torch ops backend's, and the input gradient reaches x in x's layout."""
    x = x.detach().requires_grad_(requires_grad)
    layer = BatchNormalization(axis=axis, fused=False)
    layer.build(x.shape)
    with torch.no_grad():
        layer.gamma.uniform_(0.5, 2.0)
        layer.beta.normal_()

    def run():
        y = copy.deepcopy(layer)(x, training=training)
        gradient = None
        if requires_grad:
            (gradient,) = torch.autograd.grad(
                (y * torch.linspace(-1, 2, y.numel()).view_as(y)).sum(), x
            )
        return [y, gradient]

    expected, (y, gradient) = torch_ops_and_kernels(run)
    assert y.stride() == torch.empty_like(x).stride()
    if x.is_contiguous():
        assert y.view(x.shape[0], -1).shape == (x.shape[0], x[0].numel())
    torch.testing.assert_close(y, expected[0], rtol=1e-5, atol=1e-5)
    if requires_grad:
        torch.testing.assert_close(gradient, expected[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["train", "eval", "frozen"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "shape",
    [(2, 8, 9, 9), (8, 16, 64, 64)],  # torch's allocator; from 1 MiB, NumPy's
)
def test_an_in_place_operation_after_a_channels_last_layer_runs(shape, dtype, mode):
    """A channels-last output was a permuted view of fresh memory, and autograd refuses an
    in-place operation on a view made inside a custom function: nn.ReLU(inplace=True) or
    `out += identity` after the layer failed in training, in inference with gradients and
    when frozen (a channels-last ResNet trained with nn.BatchNorm2d, not after convert)."""
    torch.manual_seed(0)
    x = torch.randn(shape).to(dtype=dtype, memory_format=torch.channels_last)
    layer = BatchNormalization(
        shape[1], axis=1, use_global_stats=True if mode == "frozen" else None
    )
    reference = torch.nn.BatchNorm2d(shape[1], eps=layer.epsilon, momentum=0.01).to(dtype)
    reference.train(mode == "train")
    if dtype != torch.float32:
        layer = layer.to(dtype)
    results = []
    for module in (layer, reference):
        source = x.clone().requires_grad_()
        y = module(source, training=mode == "train") if module is layer else module(source)
        assert y.is_contiguous(memory_format=torch.channels_last)
        y.mul_(2)  # in place (as nn.ReLU(inplace=True); smooth, so bfloat16 signs do not matter)
        (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
        results.append((y.detach().float(), source.grad.float()))
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    for ours, expected in zip(*results, strict=True):
        torch.testing.assert_close(ours, expected, rtol=tolerance, atol=tolerance)


def _stored_variances(layer: BatchNormalization, x: torch.Tensor) -> torch.Tensor:
    layer(x, training=True)
    return layer.moving_variance.detach().clone()


def test_fused_assigned_after_construction_is_kept_by_the_config_and_resolved_on_a_built_layer():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    biased = x.var((0, 2, 3), unbiased=False)
    unbiased = x.var((0, 2, 3), unbiased=True)
    layer = BatchNormalization(axis=1, momentum=0.0)
    layer.fused = False  # before the build: the non-fused path, the biased variance
    torch.testing.assert_close(_stored_variances(layer, x), biased)
    assert layer.get_config()["fused"] is False
    copy_ = BatchNormalization.from_config(layer.get_config())
    torch.testing.assert_close(_stored_variances(copy_, x), biased)
    layer.fused = None  # tf-keras' automatic choice for rank 4, axis 1: fused (unbiased)
    assert layer.fused is True and "fused" not in layer.get_config()
    torch.testing.assert_close(_stored_variances(layer, x), unbiased)
    dense = BatchNormalization(momentum=0.0)
    dense(torch.randn(8, 3), training=True)
    with pytest.raises(ValueError, match="only support 4D or 5D"):
        dense.fused = True  # tf-keras' build refuses fused=True on rank 2
    assert dense.fused is False


def test_synchronized_assigned_before_the_build_takes_the_non_fused_path():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    layer = BatchNormalization(axis=1, momentum=0.0)
    layer.synchronized = True  # as the constructor's synchronized=True: fused=False
    torch.testing.assert_close(_stored_variances(layer, x), x.var((0, 2, 3), unbiased=False))
    assert layer.fused is False


@pytest.mark.parametrize(
    ("name", "l1", "l2"),
    # tf-keras 2.20.1: "l1_l2" is its l1_l2() function (0.01 each); "L1L2" the class (0 each),
    # as Keras 3.15.1 reads "L1L2" and "l1l2".
    [("l1_l2", 0.01, 0.01), ("L1L2", 0.0, 0.0), ("l1l2", 0.0, 0.0)],
)
def test_regularizer_names_resolve_as_keras_resolves_them(name, l1, l2):
    layer = BatchNormalization(4, gamma_regularizer=name)
    with torch.no_grad():
        layer.gamma.fill_(2.0)
    (loss,) = layer.losses
    assert float(loss.detach()) == pytest.approx(l1 * 8.0 + l2 * 16.0)


@pytest.mark.parametrize(
    ("alias", "class_name"),
    [("zero", "Zeros"), ("one", "Ones"), ("normal", "RandomNormal"), ("uniform", "RandomUniform")],
)
def test_keras_short_initializer_names_are_taken(alias, class_name):
    layer = BatchNormalization(64, gamma_initializer=alias)
    assert layer.get_config()["gamma_initializer"]["class_name"] == class_name
    gamma = layer.gamma.detach()
    if alias in ("zero", "one"):
        assert torch.equal(gamma, torch.full_like(gamma, float(alias == "one")))
    else:  # Keras' defaults: stddev 0.05, range [-0.05, 0.05]
        assert 0 < float(gamma.abs().max()) < (0.3 if alias == "normal" else 0.05)


def test_compute_output_shape_is_the_input_shape():
    layer = BatchNormalization(axis=1)
    assert layer.compute_output_shape((None, 4, 3)) == (None, 4, 3)
    assert layer.compute_output_shape((None, None, 3)) == (None, None, 3)  # as Keras returns it
    with pytest.raises(TypeError, match="input_shape"):
        layer.compute_output_shape((None, "4", 3))


def test_the_l1_l2_function_named_in_a_dict_keeps_its_defaults():
    # tf-keras 2.20.1 deserialises {"class_name": "l1_l2"} through its l1_l2() function.
    layer = BatchNormalization(4, gamma_regularizer={"class_name": "l1_l2", "config": {"l1": 0.5}})
    assert layer.get_config()["gamma_regularizer"]["config"] == {"l1": 0.5, "l2": 0.01}


@pytest.mark.parametrize(
    "setting",
    [
        ("renorm", True),
        ("virtual_batch_size", 2),
        ("adjustment", lambda shape: (torch.ones(shape[-1]), torch.zeros(shape[-1]))),
    ],
)
def test_options_assigned_before_the_first_call_rule_out_the_fused_path(setting):
    torch.manual_seed(0)
    x = torch.randn(4, 2, 2, 3) * 2 + 1  # rank 4, axis -1: fused unless an option rules it out
    name, value = setting
    given = BatchNormalization(momentum=0.0, **{name: value})
    assigned = BatchNormalization(momentum=0.0)
    setattr(assigned, name, value)  # before: the build took the fused path (n/(n-1) variance)
    given(x, training=True)
    assigned(x, training=True)
    assert given.fused is False and assigned.fused is False
    torch.testing.assert_close(assigned.moving_variance, given.moving_variance, rtol=0, atol=0)


def test_compute_output_shape_takes_what_build_takes_and_checks_the_axis():
    import numpy as np

    layer = BatchNormalization(axis=1)
    assert layer.compute_output_shape(np.array([2, 3])) == (2, 3)
    assert layer.compute_output_shape((np.int64(2), 3)) == (2, 3)
    with pytest.raises(ValueError, match="out of range"):
        layer.compute_output_shape((2,))


def test_a_layer_run_through_functorch_transforms_still_copies_and_saves():
    """torch's ensemble recipe (stack_module_state, vmap of functional_call) and jacrev over the
    buffers swap functorch wrappers in for the call; the layer remembered one, and deepcopy and
    torch.save failed ever after ("Cannot access storage of BatchedTensorImpl"), as
    nn.BatchNorm1d's never do."""
    x = torch.randn(2, 8, 3)
    models = [BatchNormalization(3) for _ in range(2)]
    for model in models:
        model(x[0], training=False)
    params, buffers = torch.func.stack_module_state(models)
    torch.func.vmap(
        lambda p, b, z: torch.func.functional_call(models[0], (p, b), (z,), {"training": False})
    )(params, buffers, x)
    copied = copy.deepcopy(models[0])
    torch.save(models[0], io.BytesIO())
    torch.testing.assert_close(copied(x[1], training=False), models[1](x[1], training=False))

    layer = BatchNormalization(3)
    layer(x[0], training=True)
    parameters, own_buffers = dict(layer.named_parameters()), dict(layer.named_buffers())
    torch.func.jacrev(
        lambda b: torch.func.functional_call(layer, (parameters, b), (x[0],), {"training": False})
    )(own_buffers)
    layer(x[1], training=True)
    copied = copy.deepcopy(layer)
    torch.testing.assert_close(copied(x[1], training=False), layer(x[1], training=False))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_an_in_place_layer_goes_through_forward_mode_ad():
    """As memory="default" (the README's promise): the in-place autograd.Function has no jvp,
    and a dual input raised NotImplementedError there."""
    x, tangent = torch.randn(8, 3, 4, 4), torch.randn(8, 3, 4, 4)
    in_place = BatchNormalization(3, axis=1, memory="in_place")
    default = BatchNormalization(3, axis=1)
    for _ in range(2):  # the first call and the shortcut's
        results = []
        for layer in (in_place, default):
            with forward_ad.dual_level():
                y = layer(forward_ad.make_dual(x.clone(), tangent), training=True)
                results.append(forward_ad.unpack_dual(y))
        (y_in_place, t_in_place), (y_default, t_default) = results
        torch.testing.assert_close(y_in_place, y_default)
        torch.testing.assert_close(t_in_place, t_default)
        assert torch.equal(in_place.moving_mean, default.moving_mean)


def test_a_compiled_layer_takes_input_as_a_keyword_before_any_eager_call():
    """torch.compile hands forward's arguments to the lazy-module hook of a layer not called
    yet: ``input=`` (what torch's batch norms take) raised a TypeError there, as
    nn.BatchNorm1d's does not."""
    x = torch.randn(8, 4)
    expected = torch.compile(nn.BatchNorm1d(4, eps=1e-3), backend="eager")(input=x)
    for layer in (BatchNormalization(4), BatchNormalization()):
        torch.testing.assert_close(torch.compile(layer, backend="eager")(input=x), expected)


@pytest.mark.parametrize("setting", ["renorm_clipping", "activation_param"])
def test_fullgraph_with_dynamic_floats_traces_the_setting_checks(setting):
    """Under torch.compile(dynamic=True) float arguments are symbolic: math.isnan and
    math.isfinite in the checks broke the graph (fullgraph=True raised), a comparison does not."""
    torch._dynamo.reset()
    x = torch.randn(8, 3)
    statistics = BatchNormStatistics(
        torch.zeros(3), torch.ones(3), torch.ones(3), torch.zeros(3), torch.ones(3)
    )

    def normalize(z, value):
        if setting == "renorm_clipping":
            return batch_norm(z, statistics, training=True, renorm_clipping={"rmax": value})[0]
        plain = BatchNormStatistics(torch.zeros(3), torch.ones(3))
        return batch_norm(z, plain, training=True, activation="leaky_relu", activation_param=value)[
            0
        ]

    compiled = torch.compile(normalize, dynamic=True, fullgraph=True, backend="eager")
    for value in (1.5, 0.2):
        torch.testing.assert_close(compiled(x, value), normalize(x, value))
