"""Output memory reuse of the CPU kernels (batchnorm.functional._output_memory): an output's
memory is handed out again only once nothing refers to it, and what is kept is bounded."""

from __future__ import annotations

import gc
import math

import numpy as np
import pytest
import torch

from batchnorm import BatchNormalization
from batchnorm.functional import _output_memory as output_memory
from batchnorm.functional import release_output_memory

LARGE = (64, 16, 32, 32)  # 4 MiB of float32: above the size that is kept


@pytest.fixture
def layer() -> BatchNormalization:
    torch.manual_seed(0)
    return BatchNormalization(16, axis=1, beta_initializer="random_normal")


def test_memory_of_a_dropped_output_is_reused(layer: BatchNormalization) -> None:
    x = torch.randn(LARGE)
    first = layer(x, training=False)
    pointer = first.data_ptr()
    del first
    gc.collect()
    assert layer(x, training=False).data_ptr() == pointer


@pytest.mark.parametrize(
    "keep",
    [
        lambda y: y,
        lambda y: y.view(-1)[7:],
        lambda y: y.numpy(),
        lambda y: y[:, 3],
        lambda y: torch.utils.dlpack.from_dlpack(torch.utils.dlpack.to_dlpack(y)),
    ],
    ids=["tensor", "view", "numpy", "slice", "dlpack"],
)
def test_memory_still_referenced_is_never_handed_out(layer: BatchNormalization, keep) -> None:  # type: ignore[no-untyped-def]
    x = torch.randn(LARGE)
    with torch.no_grad():
        y = layer(x, training=False)
    expected = y.clone()
    kept = keep(y)
    del y
    gc.collect()
    for _ in range(3):
        with torch.no_grad():
            other = layer(torch.randn(LARGE) * 5 + 3, training=False)
        assert other.data_ptr() != expected.data_ptr()
        del other
    again = torch.as_tensor(kept)
    assert torch.equal(again, keep(expected) if not isinstance(kept, np.ndarray) else expected)


def test_outputs_saved_for_backward_survive_later_calls(layer: BatchNormalization) -> None:
    x1 = torch.randn(LARGE, requires_grad=True)
    x2 = torch.randn(LARGE, requires_grad=True)
    reference = BatchNormalization(16, axis=1)
    reference.load_state_dict(layer.state_dict())
    # The squares keep the layer's outputs for their backward while the second call runs.
    loss = layer(x1, training=True).square().sum() + layer(x2, training=True).square().sum()
    loss.backward()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        expected = sum(
            reference(x, training=True).square().sum() for x in (x1.detach(), x2.detach())
        )
    torch.testing.assert_close(loss.detach(), expected)
    a = x1.detach().clone().requires_grad_()
    reference(a, training=True).square().sum().backward()  # type: ignore[no-untyped-call]
    assert x1.grad is not None and a.grad is not None
    # The first call's gradient: layer's moving statistics differ, its batch statistics do not.
    torch.testing.assert_close(x1.grad, a.grad)


def test_small_outputs_and_a_zero_limit_keep_nothing(
    layer: BatchNormalization, monkeypatch: pytest.MonkeyPatch
) -> None:
    release_output_memory()
    before = output_memory.kept_bytes()
    layer(torch.randn(4, 16, 3, 3), training=False)
    assert output_memory.kept_bytes() == before
    monkeypatch.setitem(output_memory._state, "limit", 0)
    layer(torch.randn(LARGE), training=False)
    assert output_memory.kept_bytes() == before


def test_the_limit_bounds_what_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    release_output_memory()
    size = 1 << 20
    monkeypatch.setitem(output_memory._state, "limit", 3 * size)
    held = [output_memory.empty((size // 4,), np.float32) for _ in range(5)]
    assert output_memory.kept_bytes() <= 3 * size
    assert len({a.ctypes.data for a in held}) == 5  # all in use: five distinct arrays
    del held
    # Unused arrays of another shape are given back to make room.
    fresh = output_memory.empty((size // 2,), np.float32)
    assert output_memory.kept_bytes() <= 3 * size
    del fresh
    assert release_output_memory() == 0
    assert output_memory.kept_bytes() == 0


def test_release_reports_memory_in_use(layer: BatchNormalization) -> None:
    release_output_memory()
    y = layer(torch.randn(LARGE), training=False)
    assert release_output_memory() == y.numel() * y.element_size()
    del y
    gc.collect()
    assert release_output_memory() == 0


def test_a_bad_environment_value_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCHNORM_OUTPUT_MEMORY_MB", "lots")
    with pytest.raises(ValueError, match=r"BATCHNORM_OUTPUT_MEMORY_MB.*'lots'"):
        output_memory._limit_from_environment()
    monkeypatch.setenv("BATCHNORM_OUTPUT_MEMORY_MB", "1.5")
    assert output_memory._limit_from_environment() == int(1.5 * (1 << 20))


@pytest.mark.parametrize(
    "shape", [(32, 4096), LARGE, (3, 5, 4099)], ids=["torch.empty", "kept", "odd-sized rows"]
)
def test_outputs_from_the_aligned_size_start_on_a_cache_line(shape: tuple[int, ...]) -> None:
    """Training output, input gradient and inference output start on a 64-byte boundary, as
    torch's allocator places them (np.empty gives 16 or 32), and hold the values of an output
    computed into torch's own memory."""
    assert math.prod(shape) * 4 >= output_memory.ALIGNED_FROM
    torch.manual_seed(1)
    layer = BatchNormalization(shape[1], axis=1)
    x = torch.randn(shape, requires_grad=True)
    upstream = torch.randn(shape)
    outputs = []
    for _ in range(3):  # the kept arrays are handed out again from the second call
        y = layer(x, training=True)
        y.backward(upstream)
        with torch.no_grad():
            inferred = layer(x, training=False)
        outputs.append((y.detach(), x.grad, inferred))
        x.grad = None
    reference = torch.nn.functional.batch_norm(
        x.detach(), None, None, training=True, eps=layer.epsilon
    )
    for y, dx, inferred in outputs:
        assert [t.data_ptr() % output_memory.ALIGNMENT for t in (y, dx, inferred)] == [0, 0, 0]
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-5)


def test_half_precision_outputs_from_torch_memory_hold_the_kernel_results() -> None:
    """A bfloat16 output of 256 KiB comes from torch.empty (viewed by the kernels as its bits):
    the training output and input gradient equal the float32 computation's, rounded."""
    shape = (64, 2048)
    assert output_memory.source(shape, np.int16) == "torch"
    torch.manual_seed(2)
    x = torch.randn(shape).to(torch.bfloat16).requires_grad_()
    upstream = torch.randn(shape).to(torch.bfloat16)
    layer = BatchNormalization(shape[1])
    y = layer(x, training=True)
    y.backward(upstream)
    x32 = x.detach().float().requires_grad_()
    reference = torch.nn.functional.batch_norm(x32, None, None, training=True, eps=layer.epsilon)
    reference.backward(upstream.float())
    assert y.dtype == x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference.detach(), rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(x.grad.float(), x32.grad, rtol=1.6e-2, atol=1e-2)


def test_aligned_empty_is_an_array_of_the_shape_and_dtype_on_the_boundary() -> None:
    for shape, dtype in [((3, 7), np.float32), ((5,), np.float64), ((2, 3, 4), np.uint16)]:
        array = output_memory.aligned_empty(shape, dtype)
        assert (array.shape, array.dtype) == (shape, np.dtype(dtype))
        assert array.ctypes.data % output_memory.ALIGNMENT == 0 and array.flags.c_contiguous
        array[...] = 1  # writable, all of it
        assert array.sum() == math.prod(shape)


def test_memory_of_a_live_half_precision_output_is_never_handed_out() -> None:
    """A bfloat16 output's tensor holds a view of the kept array's buffer, not the array: its
    memory was handed out again for the input gradient, and the output read as that."""
    torch.manual_seed(0)
    layer = BatchNormalization(16, axis=1)
    x = (torch.randn(LARGE) * 3 + 2).to(torch.bfloat16).requires_grad_()
    y = layer(x, training=True)
    expected = torch.nn.functional.batch_norm(
        x.detach().float(), None, None, training=True, eps=layer.epsilon
    )
    y.backward(torch.randn(LARGE).to(torch.bfloat16))
    assert x.grad is not None and x.grad.data_ptr() != y.data_ptr()
    torch.testing.assert_close(y.detach().float(), expected, rtol=0.01, atol=0.02)
