"""Activation checkpointing (``torch.utils.checkpoint``) steps the moving statistics once per
training step, as the same model trained without it does.

The checkpoint runs a checkpointed forward again during the backward; ``nn.BatchNorm2d`` then
updates its running statistics twice per step (pytorch issue 96136), and a renorm layer's
recomputation read the renorm statistics that its own forward had already stepped, which made
the reentrant checkpoint's gradients wrong. The oracle is the same model trained without
checkpointing (bit-equal buffers and gradients), and ``nn.BatchNorm2d`` for the plain layer's
moving mean.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from batchnorm import BatchNormalization

MASK = torch.rand(8, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.3

CASES = {
    "plain": ({}, {}),
    "renorm": (
        {"renorm": True, "renorm_clipping": {"rmax": 3.0, "dmax": 5.0}, "renorm_momentum": 0.9},
        {},
    ),
    "ghost batches": ({"virtual_batch_size": 2}, {}),
    "mask": ({"fused": False}, {"mask": MASK}),
    "in place": ({"memory": "in_place"}, {}),
    "activation": ({"activation": "relu"}, {}),
    "tensor training flag": ({}, {"training": torch.tensor(True)}),
    "debiased": ({"moving_average": "debiased"}, {}),
}


class Block(nn.Module):
    def __init__(self, call: dict, **options):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = BatchNormalization(axis=1, momentum=0.9, **options)
        self.call = call

    def forward(self, x):
        call = {"training": True, **self.call}
        mask = call.pop("mask", None)
        if mask is not None:  # a Keras mask: the input without its last axis
            call["mask"] = mask.permute(0, 2, 1)[..., : x.shape[2]].permute(0, 2, 1)
        return torch.relu(self.bn(self.conv(x).permute(0, 2, 3, 1), **call).permute(0, 3, 1, 2))


def train(model, steps, checkpointed, reentrant):
    gradients = []
    for step in range(steps):
        model.zero_grad()
        x = (
            torch.randn(8, 3, 6, 6, generator=torch.Generator().manual_seed(step)) + step
        ).requires_grad_()
        y = checkpoint(model, x, use_reentrant=reentrant) if checkpointed else model(x)
        y.square().sum().backward()
        gradients.append([x.grad, *(p.grad for p in model.parameters())])
    return gradients


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
@pytest.mark.parametrize("case", list(CASES))
def test_a_checkpointed_model_trains_as_without_checkpointing(case, reentrant):
    options, call = CASES[case]
    torch.manual_seed(0)
    model = Block(call, **options)
    plain = copy.deepcopy(model)
    got = train(model, 3, checkpointed=True, reentrant=reentrant)
    expected = train(plain, 3, checkpointed=False, reentrant=reentrant)
    for step_got, step_expected in zip(got, expected, strict=True):
        for a, b in zip(step_got, step_expected, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    for (name, a), b in zip(model.bn.named_buffers(), plain.bn.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_the_moving_mean_steps_once_per_step_as_nn_batchnorm_without_checkpointing(reentrant):
    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(5, 4), BatchNormalization(momentum=0.9))
    reference = nn.Sequential(copy.deepcopy(ours[0]), nn.BatchNorm1d(4, momentum=0.1, eps=1e-3))
    weights = torch.randn(16, 4)
    for step in range(4):
        x = torch.randn(16, 5).requires_grad_() + step
        (checkpoint(ours, x, use_reentrant=reentrant) * weights).sum().backward()
        (reference(x) * weights).sum().backward()
    torch.testing.assert_close(ours[1].moving_mean, reference[1].running_mean)
    torch.testing.assert_close(ours[0].weight.grad, reference[0].weight.grad, rtol=1e-4, atol=1e-4)


def test_a_shared_renorm_layer_recomputed_after_its_later_call_warns():
    """The reentrant checkpoint recomputes the second block first; the first block's
    recomputation can no longer read the renorm statistics its forward read."""
    torch.manual_seed(0)
    layer = BatchNormalization(renorm=True, renorm_momentum=0.5)
    layer(torch.randn(8, 4) * 3 + 1, training=True)
    x = torch.randn(8, 4, requires_grad=True)
    y = checkpoint(lambda t: layer(t, training=True) * 2, x, use_reentrant=True)
    y = checkpoint(lambda t: layer(t, training=True) ** 2, y, use_reentrant=True)
    before = [b.clone() for b in layer.buffers()]
    with pytest.warns(UserWarning, match="after another training call of the same layer"):
        y.sum().backward()
    for a, b in zip(layer.buffers(), before, strict=True):  # still stepped once per call
        assert torch.equal(a, b)


def test_a_shared_plain_layer_steps_once_per_call():
    torch.manual_seed(0)
    layer = BatchNormalization(momentum=0.5)
    twin = copy.deepcopy(layer)
    weights = torch.randn(8, 4)
    x = torch.randn(8, 4, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = checkpoint(lambda t: layer(t, training=True) * weights, x, use_reentrant=True)
        y = checkpoint(lambda t: layer(t, training=True) * weights, y, use_reentrant=True)
        y.sum().backward()
    got = x.grad
    x.grad = None
    (twin(twin(x, training=True) * weights, training=True) * weights).sum().backward()
    torch.testing.assert_close(got, x.grad, rtol=0, atol=0)
    for a, b in zip(layer.buffers(), twin.buffers(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_compiled_model_with_a_checkpoint_inside_steps_once():
    """torch.compile traces the checkpoint as one region: its recomputation is part of the
    compiled backward, which does not write the buffers again."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), BatchNormalization(momentum=0.9), nn.Linear(4, 3))
    model[1](torch.randn(2, 4), training=True)
    plain = copy.deepcopy(model)
    compiled = torch.compile(lambda v: checkpoint(model, v, use_reentrant=False))
    x = torch.randn(8, 4)
    compiled(x).square().sum().backward()
    plain(x).square().sum().backward()
    torch.testing.assert_close(model[1].moving_mean, plain[1].moving_mean)
    torch.testing.assert_close(model[1].moving_variance, plain[1].moving_variance)
    torch.testing.assert_close(model[0].weight.grad, plain[0].weight.grad)


@pytest.mark.parametrize("renorm", [False, True])
def test_selective_activation_checkpointing_steps_once(renorm):
    """Selective checkpointing replays the forward's operators through a dispatch mode; the
    layer's own bookkeeping (copies of its statistics) must not be among them: the backward
    failed with "aten.clone.default encountered during backward but not found in storage". Under
    the mode the layer takes the torch ops, so the oracle (the kernels, no checkpoint) agrees
    within float32 rounding."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        saved = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE

    def contexts():
        return create_selective_checkpoint_contexts(policy)

    torch.manual_seed(0)
    options = {"renorm": True, "renorm_clipping": {"rmax": 2.0, "dmax": 1.0}} if renorm else {}
    model = nn.Sequential(
        nn.Linear(4, 4), BatchNormalization(momentum=0.8, **options), nn.Linear(4, 3)
    )
    plain = copy.deepcopy(model)
    for step in range(3):
        x, weights = torch.randn(8, 4) + step, torch.randn(8, 3)
        model.zero_grad(), plain.zero_grad()
        y = checkpoint(model, x, use_reentrant=False, context_fn=contexts)
        (y * weights).sum().backward()
        (plain(x) * weights).sum().backward()
        for a, b in zip(model[1].buffers(), plain[1].buffers(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model[0].weight.grad, plain[0].weight.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("memory", ["default", "in_place"])
def test_a_computed_gamma_under_checkpointing_is_read_alive_by_the_backward(memory):
    """gamma computed by a parametrization is a new tensor on every forward; under
    non-reentrant checkpointing the forward's saved tensors are dropped, and the kernels'
    backward read gamma through the forward's NumPy view, which (since this session's view
    cache) no longer kept it alive: the backward read whatever took its memory (dx 100% off,
    or 1e34). Oracle: the same step without checkpointing."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, gamma):
            return gamma * 2.0

    torch.manual_seed(0)
    x0, dy = torch.randn(32, 16), torch.randn(32, 16)

    def gradients(use_checkpoint):
        layer = BatchNormalization(axis=-1, memory=memory, activation="leaky_relu")
        layer.build((4, 16))
        parametrize.register_parametrization(layer, "gamma", Double())
        x = x0.clone().requires_grad_()

        def block(inputs):
            return layer(inputs * 1)  # in place needs an input nothing else keeps

        y = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
        clobber = [torch.full((16,), 1e6) for _ in range(200)]  # reuse freed memory
        (y * dy).sum().backward()
        del clobber
        return x.grad, layer.parametrizations.gamma.original.grad

    for ours, expected in zip(gradients(True), gradients(False), strict=True):
        torch.testing.assert_close(ours, expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_fresh_checkpointed_layer_compiles_with_fullgraph():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(5, 6), BatchNormalization(6), nn.Linear(6, 3))
    twin = copy.deepcopy(body)
    x = torch.randn(8, 5)
    # The layer's first call under tracing cached its options in its __dict__: a side effect
    # dynamo refuses inside the checkpoint's higher-order op.
    compiled = torch.compile(lambda v: checkpoint(body, v, use_reentrant=False), fullgraph=True)
    compiled(x).sum().backward()
    twin(x).sum().backward()
    torch.testing.assert_close(body[1].moving_mean, twin[1].moving_mean)
    torch.testing.assert_close(body[1].gamma.grad, twin[1].gamma.grad, rtol=1e-5, atol=1e-6)
