"""The layer's shortcut for repeated plain calls on CPU (:class:`DirectCalls`) against torch.

The shortcut decides once what a call does from the layer's settings and the input's signature.
These tests change what it decided from (settings, modes, tensors, memory, copies) between calls
and check every time against ``torch.nn.BatchNorm1d`` / ``BatchNorm2d`` with the conventions
mapped (Keras momentum m is torch momentum 1 - m; the stored variance is the biased one unless
the layer is fused).
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
from torch import nn

from batchnorm import BatchNormalization
from batchnorm.functional import register_backend
from batchnorm.functional._cpu_backend import NUMBA_CPU
from tests.backends import assert_equal_to_reference, torch_ops_and_kernels


def _pair(channels: int, dims: int, momentum: float = 0.9, dtype=torch.float32):
    """Our layer (axis 1, unbiased moving variance like torch) and torch's, same parameters."""
    layer = BatchNormalization(
        channels,
        axis=1,
        momentum=momentum,
        epsilon=1e-5,
        moving_variance_estimator="unbiased",
        dtype=dtype,
    )
    reference = (nn.BatchNorm2d if dims == 4 else nn.BatchNorm1d)(
        channels, eps=1e-5, momentum=1 - momentum, dtype=dtype
    )
    torch.manual_seed(3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
        layer.gamma.copy_(reference.weight)
        layer.beta.copy_(reference.bias)
    return layer, reference


def _check_state(layer, reference):
    torch.testing.assert_close(layer.moving_mean, reference.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.moving_variance, reference.running_var, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(32, 64), (8, 16, 8, 8), (64, 40, 33)])
def test_repeated_calls_follow_torch_with_gradients(shape):
    layer, reference = _pair(shape[1], len(shape))
    generator = torch.Generator().manual_seed(0)
    for step in range(4):
        x = torch.randn(shape, generator=generator) * (1 + step) + step
        upstream = torch.randn(shape, generator=generator)
        ours_x, their_x = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours, theirs = layer(ours_x, training=True), reference(their_x)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        ours.backward(upstream)
        theirs.backward(upstream)
        torch.testing.assert_close(ours_x.grad, their_x.grad, rtol=1e-4, atol=1e-5)
        _check_state(layer, reference)
        with torch.no_grad():
            torch.testing.assert_close(
                layer(x, training=False), reference.eval()(x), rtol=1e-5, atol=1e-5
            )
        reference.train()
    torch.testing.assert_close(layer.gamma.grad, reference.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.beta.grad, reference.bias.grad, rtol=1e-4, atol=1e-4)


def test_settings_changed_between_calls_take_effect():
    layer, reference = _pair(6, 2)
    x = torch.randn(10, 6) * 3 + 1
    with torch.no_grad():
        layer(x, training=True)
        reference(x)
        layer.momentum = 0.5  # a new momentum for the next steps
        reference.momentum = 0.5
        layer(x * 2, training=True)
        reference(x * 2)
        _check_state(layer, reference)
        layer.epsilon = 1e-1
        reference.eps = 1e-1
        reference.eval()
        torch.testing.assert_close(layer(x, training=False), reference(x), rtol=1e-5, atol=1e-5)
        before = layer.moving_mean.clone()
        layer.trainable = False  # frozen: inference mode even with training=True
        torch.testing.assert_close(layer(x, training=True), reference(x), rtol=1e-5, atol=1e-5)
        assert torch.equal(layer.moving_mean, before)
        layer.trainable = True
        layer.eval()  # training=None follows the module mode
        torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
        layer.train()
        layer(x)
        assert not torch.equal(layer.moving_mean, before)


def test_replaced_tensors_and_memory_are_followed():
    layer, reference = _pair(5, 2)
    x = torch.randn(12, 5) + 2
    with torch.no_grad():
        layer(x, training=True)
        reference(x)
        # .data = : same tensor object, new memory
        layer.moving_mean.data = reference.running_mean.clone()
        layer.moving_variance.data = reference.running_var.clone()
        layer(x * 3, training=True)
        reference(x * 3)
        _check_state(layer, reference)
        # load_state_dict with assign=True: new tensor objects
        state = {k: v.clone() for k, v in layer.state_dict().items()}
        layer.load_state_dict(state, assign=True)
        layer(x - 1, training=True)
        reference(x - 1)
        _check_state(layer, reference)
        # a float64 layer reads float64 inputs
        layer.double()
        reference.double()
        y = layer(x.double(), training=True)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, reference(x.double()), rtol=1e-10, atol=1e-10)
        _check_state(layer, reference)


@pytest.mark.parametrize("training", [False, True])
def test_a_strided_view_at_the_same_address_is_followed(training):
    """``.data = flat[::2]`` after ``flat[:C]``: the address stays, the strides change. The kept
    views were checked by address only: the layer normalised with the old gamma (27 off) and
    stepped the moving mean into the wrong memory (the odd slots of `store`)."""
    layer, reference = _pair(4, 2)
    x = torch.randn(16, 4) * 3 + 5
    flat = torch.tensor([1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0])
    store = torch.zeros(8)
    layer.train(training)
    reference.train(training)
    with torch.no_grad():
        for gamma, moving_mean in ((flat[:4], store[:4]), (flat[::2], store[::2])):
            store.zero_()
            layer.gamma.data, reference.weight.data = gamma, gamma
            layer.moving_mean.data = moving_mean
            reference.running_mean.data = torch.zeros(4)
            torch.testing.assert_close(layer(x), reference(x), rtol=1e-5, atol=1e-5)
            if training:
                torch.testing.assert_close(moving_mean, reference.running_mean)
                assert int((store != 0).sum()) == 4  # nothing written beside the view


@pytest.mark.parametrize("training", [False, True])
def test_functional_call_with_views_of_one_flat_vector(training):
    """Parameters unflattened from one vector (a hypernetwork's), through the general path's
    kept views: a tensor at the same address with other strides got the old view's array
    (after a freed view's id went to the next view: 2 to 7 calls in 20 wrong; here, the same
    tensor object with its `.data` replaced, every other call)."""
    layer, reference = _pair(4, 2)
    layer.train(training)
    reference.train(training)
    flat = torch.tensor([1.0, 10.0, 2.0, 20.0, 3.0, 30.0, 4.0, 40.0])
    x = torch.randn(16, 4)
    gamma = flat[:4]
    for step in range(6):
        gamma.data = flat[:4] if step % 2 == 0 else flat[::2]
        y = torch.func.functional_call(layer, {"gamma": gamma}, (x,))
        expected = torch.func.functional_call(reference, {"weight": gamma}, (x,))
        torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_copies_do_not_share_state():
    layer, _ = _pair(4, 2)
    x = torch.randn(9, 4) + 5
    with torch.no_grad():
        layer(x, training=True)
        twin = copy.deepcopy(layer)
        buffer = io.BytesIO()
        torch.save(layer, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        pickled = pickle.loads(pickle.dumps(layer))
        before = layer.moving_mean.clone()
        for other in (twin, loaded, pickled):
            other(x * 2, training=True)
            assert torch.equal(layer.moving_mean, before)
            assert not torch.equal(other.moving_mean, before)
            layer(x, training=False)


def test_another_cpu_backend_is_used_when_registered():
    layer, reference = _pair(3, 2)
    x = torch.randn(7, 3) * 2
    with torch.no_grad():
        layer(x, training=True)
        reference(x)
        register_backend("cpu", None)  # the torch-op backend
        try:
            torch.testing.assert_close(layer(x, training=True), reference(x), rtol=1e-5, atol=1e-5)
        finally:
            register_backend("cpu", NUMBA_CPU)
        _check_state(layer, reference)


def test_new_signatures_and_bad_inputs_take_the_general_path():
    layer, _ = _pair(4, 2)
    with torch.no_grad():
        layer(torch.randn(8, 4), training=True)
        with pytest.raises(ValueError, match="built for"):
            layer(torch.randn(8, 5), training=True)
        with pytest.raises(ValueError, match="rank"):
            layer(torch.randn(8, 4, 2), training=True)
        before = layer.moving_mean.clone()
        empty = layer(torch.empty(0, 4), training=True)
        assert empty.shape == (0, 4)
        assert torch.equal(layer.moving_mean, before)
        strided = torch.randn(4, 16)[:, ::2].t()  # (8, 4), not contiguous
        expected = layer(strided.contiguous(), training=False)
        torch.testing.assert_close(layer(strided, training=False), expected)


MASKED_CASES = [
    # (shape, axis, mask shape, options, memory format)
    ((16, 10, 6), -1, (16, 10), {}, None),  # a Keras mask, channels last
    ((8, 6, 5, 5), 1, (8, 5, 5), {}, None),  # one weight per position, planes
    ((8, 6, 5, 5), 1, (8, 5, 5), {}, torch.channels_last),  # planes stored channels last
    ((16, 10, 6), -1, (16, 10), {"virtual_batch_size": 4}, None),
    ((16, 10, 6), -1, (16, 10), {"renorm": True, "renorm_clipping": {"rmax": 1.5}}, None),
    ((16, 10, 6), -1, (16, 10), {"activation": "relu"}, None),
]


@pytest.mark.parametrize(("shape", "axis", "mask_shape", "options", "memory"), MASKED_CASES)
def test_masked_calls_take_the_shortcut_and_equal_the_torch_op_path(
    shape, axis, mask_shape, options, memory, monkeypatch
):
    """Masked training and inference calls run the shortcut; float64 results (outputs,
    gradients, buffers, over three steps with a bool, an integer and a float mask) equal the
    composed torch-op path's."""
    from batchnorm.functional._direct_step import DirectCalls

    covered = []
    original = DirectCalls.__call__

    def spy(self, x, training, mask=None):
        y = original(self, x, training, mask)
        covered.append(y is not None)
        return y

    monkeypatch.setattr(DirectCalls, "__call__", spy)
    generator = torch.Generator().manual_seed(5)
    inputs = [
        torch.randn(shape, generator=generator, dtype=torch.float64) * 3 + 1 for _ in range(3)
    ]
    if memory is not None:
        inputs = [x.contiguous(memory_format=memory) for x in inputs]
    draws = [torch.rand(mask_shape, generator=generator) for _ in range(3)]
    masks = [draws[0] > 0.3, (draws[1] > 0.5).to(torch.int64), draws[2] * 2]
    upstream = torch.randn(shape, generator=generator, dtype=torch.float64)

    def run():
        layer = BatchNormalization(
            shape[axis], axis=axis, fused=False, dtype=torch.float64, **options
        )
        outputs = []
        for x, mask in zip(inputs, masks, strict=True):
            x_grad = x.clone().requires_grad_()
            y = layer(x_grad, training=True, mask=mask)
            y.backward(upstream)
            outputs += [y.detach(), x_grad.grad, layer(x, training=False, mask=mask)]
        return [*outputs, *(p.grad for p in layer.parameters()), *layer.buffers()]

    reference, ours = torch_ops_and_kernels(run)
    assert_equal_to_reference(ours, reference, 1e-12)
    # Every call of the kernel run, the first too (it builds the layer and its shortcut, then
    # takes the shortcut).
    assert covered == [True] * 6


@pytest.mark.parametrize(
    ("shape", "memory"),
    [
        ((32, 6), None),
        ((8, 6, 5, 5), None),
        ((8, 6, 5, 5), torch.channels_last),
        ((4096, 80), None),
    ],
)
def test_inference_with_gradients_follows_torch(shape, memory):
    """A layer in inference whose gamma and beta still learn (fine-tuning with frozen
    statistics): output, first and second-order gradients equal torch's eval-mode module in
    float64, on every call of the shortcut."""
    dims = len(shape)
    layer, reference = _pair(shape[1], dims, dtype=torch.float64)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for _ in range(2):  # moving statistics away from their initial values
            x = torch.randn(shape, generator=generator, dtype=torch.float64) * 2 + 1
            layer(x, training=True)
            reference(x)
    layer.eval()
    reference.eval()
    for _ in range(3):
        x = torch.randn(shape, generator=generator, dtype=torch.float64) * 3 - 1
        if memory is not None:
            x = x.contiguous(memory_format=memory)
        upstream = torch.randn(shape, generator=generator, dtype=torch.float64)
        results = []
        for module, parameters in ((layer, [layer.gamma, layer.beta]), (reference, None)):
            parameters = parameters or [reference.weight, reference.bias]
            x_grad = x.clone().requires_grad_()
            y = module(x_grad)
            first = torch.autograd.grad(
                (y * upstream).sum(), [x_grad, *parameters], create_graph=True
            )
            second = torch.autograd.grad(
                sum((g * g).sum() for g in first), [x_grad, *parameters], allow_unused=True
            )
            y_again = module(x_grad)
            plain = torch.autograd.grad((y_again * upstream).sum(), [x_grad, *parameters])
            results.append(
                [y, *first, *(torch.zeros(()) if g is None else g for g in second), *plain]
            )
        for ours, theirs in zip(*results, strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


def test_a_training_call_between_an_inference_forward_and_its_backward_raises():
    layer = BatchNormalization(4)
    x = torch.randn(16, 4, requires_grad=True)
    layer(x, training=True)  # builds the layer and its shortcut
    y = layer(x, training=False)  # the shortcut's inference call with gradients
    layer(torch.randn(16, 4), training=True)  # steps the moving statistics in place
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_a_deleted_layers_tensors_are_freed():
    """The view cache held the tensors themselves, process-wide: a deleted layer's weights, a
    hypernetwork's whole flat output behind gamma's view (+650 MB over 700 steps) and gamma's
    autograd graph stayed alive until the cache filled. It holds weak references now."""
    import gc
    import weakref

    layer = BatchNormalization(4, axis=1)
    layer(torch.randn(8, 4), training=True)
    layer.eval()
    layer(torch.randn(8, 4))
    held = [weakref.ref(t) for t in (layer.gamma, layer.beta, layer.moving_mean)]
    flat = torch.randn(1000)
    base = weakref.ref(flat)
    other = BatchNormalization(4, axis=1)
    torch.func.functional_call(other, {"gamma": flat[:4], "beta": flat[4:8]}, (torch.randn(8, 4),))
    del layer, other, flat
    gc.collect()
    assert [reference() for reference in held] == [None, None, None]
    assert base() is None


def _assign_short_moving_variance(layer: BatchNormalization) -> torch.Tensor:
    """A 1-value moving variance viewing the start of a longer tensor, which is returned."""
    neighbour = torch.full((8,), 7.0)
    layer.moving_variance = neighbour[:1]
    return neighbour


def _assign_short_gamma(layer: BatchNormalization) -> torch.Tensor:
    layer.gamma = nn.Parameter(torch.full((3,), 2.0))
    return layer.gamma.detach().clone()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("assign", [_assign_short_moving_variance, _assign_short_gamma])
def test_a_per_channel_tensor_of_another_size_is_refused_and_nothing_around_it_written(
    training, assign
):
    """As torch.nn.BatchNorm2d ("running_var should contain 4 elements not 1") and the layer's
    general step: the shortcut read and wrote such a tensor as 4 values, past its end."""
    x = torch.randn(8, 4, 3, 3)
    torch_bn = nn.BatchNorm2d(4)
    torch_bn.running_var = torch.ones(1)
    with pytest.raises(RuntimeError, match="4 elements"):
        torch_bn(x)
    layer = BatchNormalization(4, axis=1)
    around = assign(layer)
    before = around.clone()
    with pytest.raises(ValueError, match="per-channel shape \\(4,\\)"):
        layer(x, training=training)
    assert torch.equal(around, before)


def test_a_substituted_short_buffer_is_refused_in_functional_call():
    x = torch.randn(8, 4, 3, 3)
    layer = BatchNormalization(4, axis=1)
    neighbour = torch.full((8,), 7.0)
    with pytest.raises(ValueError, match=r"statistics\.moving_variance"):
        torch.func.functional_call(
            layer, {"moving_variance": neighbour[:1]}, (x,), {"training": True}
        )
    assert torch.equal(neighbour, torch.full((8,), 7.0))


@pytest.mark.parametrize("name", ["moving_mean", "moving_variance"])
def test_a_buffer_resized_after_calls_is_refused(name):
    """``resize_`` keeps the address and the strides the shortcut compared."""
    x = torch.randn(8, 4, 3, 3)
    layer = BatchNormalization(4, axis=1)
    layer(x, training=True)
    getattr(layer, name).resize_(2)
    with pytest.raises(ValueError, match="\\(2,\\)"):
        layer(x, training=True)
