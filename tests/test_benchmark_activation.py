"""The activation bench: the memory measure's mechanics, the fused timing's structure, the tables
and the verdicts (no assertion on time)."""

from __future__ import annotations

import pytest
import torch

from batchnorm.bench._activation import (
    MEMORY_VARIANTS,
    conv_stack,
    measure_step_in_subprocess,
    saved_bytes,
    stack_input,
    training_step,
)
from batchnorm.bench._benchmark import BenchCase, format_table, run_fused_case, summarise

TINY = {"blocks": 2, "channels": 4, "size": 6, "batch": 3}


def _trained(variant: str) -> tuple[torch.nn.Module, torch.Tensor, float]:
    model = conv_stack(variant, TINY["blocks"], TINY["channels"])
    x = stack_input(TINY["batch"], TINY["channels"], TINY["size"])
    # The input's gradient too: the first block's batch norm then sees an input that needs it.
    x.requires_grad_()
    loss = training_step(model, x)
    return model, x, loss


def test_every_variant_computes_the_same_step():
    separate, x_separate, loss_separate = _trained("separate")
    for variant in ("fused", "in_place"):
        model, x, loss = _trained(variant)
        assert loss == pytest.approx(loss_separate, rel=1e-5)
        torch.testing.assert_close(x.grad, x_separate.grad, rtol=1e-4, atol=1e-6)
        convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
        reference = [m for m in separate if isinstance(m, torch.nn.Conv2d)]
        for conv, conv_reference in zip(convs, reference, strict=True):
            torch.testing.assert_close(
                conv.weight.grad, conv_reference.weight.grad, rtol=1e-4, atol=1e-6
            )


def test_the_in_place_variant_overwrites_the_conv_output():
    model = conv_stack("in_place", 1, 4)
    x = stack_input(2, 4, 5)
    conv_output = model[0](x)
    before = conv_output.clone()
    y = model[1](conv_output, training=True)
    assert y.data_ptr() == conv_output.data_ptr() and not torch.equal(conv_output, before)


def test_saved_bytes_shrink_from_separate_to_fused_to_in_place():
    x = stack_input(TINY["batch"], TINY["channels"], TINY["size"])
    block = x.numel() * x.element_size()
    saved = {
        variant: saved_bytes(conv_stack(variant, TINY["blocks"], TINY["channels"]), x)
        for variant in MEMORY_VARIANTS
    }
    assert saved["in_place"] < saved["fused"] < saved["separate"]
    # Per block: separate keeps three tensors of the block's size, fused two, in place one
    # (besides the input, the loss's input and a few per-channel statistics).
    blocks = TINY["blocks"] * block
    assert saved["separate"] - saved["fused"] == pytest.approx(blocks, rel=0.05)
    assert saved["fused"] - saved["in_place"] == pytest.approx(blocks, rel=0.05)


def test_measure_step_in_a_fresh_process_reports_a_peak_or_says_why_not():
    result = measure_step_in_subprocess("in_place", device="cpu", **TINY)
    assert set(result) == {"peak_bytes", "peak_method", "saved_bytes", "loss"}
    if result["peak_bytes"] is None:
        assert result["peak_method"].startswith("none (")
    else:
        assert result["peak_method"] == "resident memory" and result["peak_bytes"] > 0
    _, _, loss = _trained("in_place")
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    x = stack_input(TINY["batch"], TINY["channels"], TINY["size"])
    assert result["saved_bytes"] == saved_bytes(conv_stack("in_place", 2, 4), x)


def test_unknown_variant_is_refused():
    with pytest.raises(
        ValueError, match=r"`variant` must be one of .* Received: variant='inplace'"
    ):
        conv_stack("inplace", 1, 4)


@pytest.mark.parametrize(("shape", "axis"), [((6, 4, 3, 3), 1), ((6, 3, 3, 4), -1), ((8, 5), -1)])
def test_run_fused_case_structure(shape, axis):
    result = run_fused_case(BenchCase("tiny", shape, axis, True), rounds=1)
    assert result["name"] == "tiny" and result["shape"] == list(shape)
    assert set(result["modes"]) == {"train forward", "train forward+backward"}
    for numbers in result["modes"].values():
        assert set(numbers["seconds"]) == {"fused", "separate", "torch"}
        assert all(seconds > 0 for seconds in numbers["seconds"].values())
        for key in ("ratio", "ratio_to_torch"):
            assert set(numbers[key]) == {"value", "spread"} and numbers[key]["value"] > 0


def _fused_result(value: float, spread: float) -> dict:
    ratio = {"value": value, "spread": spread}
    numbers = {
        "seconds": {"fused": 1e-3 * value, "separate": 1e-3, "torch": 2e-3},
        "spread": {"fused": spread / 2, "separate": spread / 2, "torch": 0.0},
        "ratio": ratio,
        "ratio_to_torch": {"value": value / 2, "spread": spread / 2},
    }
    return {
        "name": "conv-early NCHW",
        "shape": [64, 64, 56, 56],
        "modes": {"train forward": numbers},
    }


def _memory(peak_in_place: float | None) -> dict:
    peaks = {"separate": 100.0, "fused": 80.0, "in_place": peak_in_place}
    saved = {"separate": 30.0, "fused": 20.0, "in_place": 10.0}
    return {
        "shape": [32, 64, 56, 56],
        "blocks": 8,
        "activation": "leaky_relu",
        "peak_method": "resident memory"
        if peak_in_place
        else "none (no counter): saved bytes only",
        "peak_bytes": {k: None if peak_in_place is None else v for k, v in peaks.items()},
        "saved_bytes": saved,
        "loss": dict.fromkeys(peaks, 0.5),
        "peak_ratio": {
            k: None if peak_in_place is None or v is None else v / 100.0 for k, v in peaks.items()
        },
        "saved_ratio": {k: v / 30.0 for k, v in saved.items()},
    }


@pytest.mark.parametrize(
    ("value", "spread", "verdict"),
    [(0.6, 0.05, "met"), (0.95, 0.05, "NO"), (0.75, 0.2, "unclear")],
)
def test_fused_verdicts(value, spread, verdict):
    targets = summarise([], [], [], [_fused_result(value, spread)], None)["targets"]
    (target,) = targets
    assert target["target"] == "conv-early NCHW: fused relu / BN then ReLU (train forward) <= 0.8"
    assert target["verdict"] == verdict and target["met"] == (verdict == "met")


@pytest.mark.parametrize(("peak", "verdict"), [(50.0, "met"), (90.0, "NO")])
def test_memory_verdict_uses_the_peak_ratio(peak, verdict):
    (target,) = summarise([], [], [], None, _memory(peak))["targets"]
    assert target["measured"] == pytest.approx(peak / 100.0) and target["verdict"] == verdict
    assert "peak memory" in target["target"] and "saved for backward: 0.33" in target["target"]


def test_memory_without_a_peak_counter_sets_no_target():
    assert summarise([], [], [], None, _memory(None))["targets"] == []


def _report(memory: dict) -> dict:
    return {
        "cases": [],
        "extra_cases": [],
        "models": [],
        "fused_activation": [_fused_result(0.7, 0.02)],
        "memory": memory,
        "summary": summarise([], [], [], [_fused_result(0.7, 0.02)], memory),
    }


def test_format_table_shows_the_activation_sections():
    table = format_table(_report(_memory(50.0)))
    assert "| fused activation | shape | mode | fused ms | BN then ReLU ms |" in table
    assert (
        "| conv-early NCHW | 64x64x56x56 | train forward | 0.70 | 1.00 | 2.00 | 0.70 (+-0.02) |"
        in table
    )
    assert "| 8 x conv-BN-leaky_relu 32x64x56x56, training step | peak MB |" in table
    assert "| in_place | 0.0 | 0.0 | 0.50 | 0.33 |" in table
    assert "peak measured by: resident memory" in table
    assert "in-place / separate, peak memory of a training step" in table


def test_format_table_without_a_peak_says_so():
    table = format_table(_report(_memory(None)))
    assert "| in_place | - | 0.0 | - | 0.33 |" in table
    assert "peak measured by: none (no counter): saved bytes only" in table


def test_format_table_of_a_report_without_activation_sections():
    report = _report(_memory(50.0))
    del report["fused_activation"], report["memory"]
    assert "fused activation" not in format_table(report)
