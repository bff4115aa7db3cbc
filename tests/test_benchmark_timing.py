"""The bench's timing loop (batchnorm.bench._benchmark.interleaved_timings)."""

from __future__ import annotations

import torch

from batchnorm.bench._benchmark import interleaved_timings


def test_timed_functions_run_with_the_process_thread_count():
    # torch.utils.benchmark.Timer runs its statement on one thread unless told otherwise: the
    # bench would then time one-thread kernels while reporting the process's thread count.
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    seen: list[int] = []
    try:
        timings = interleaved_timings(
            {"probe": lambda: seen.append(torch.get_num_threads())}, rounds=2, min_run_time=0.001
        )
    finally:
        torch.set_num_threads(previous)
    assert set(seen) == {2}
    assert timings["probe"].seconds > 0


def test_a_single_measurement_has_no_certain_spread():
    """A function slower than min_run_time in one round gives one block: its spread was 0, so
    its verdict looked certain with no evidence."""
    import time

    timings = interleaved_timings({"slow": lambda: time.sleep(0.02)}, rounds=1, min_run_time=0.001)
    assert timings["slow"].spread == 1.0


def _case(name, large, ratios):
    modes = {
        mode: {
            "ratio_to_torch": {"value": value, "spread": spread},
            "floor_multiple": {"batchnorm": value},
            "floor_spread": spread,
        }
        for mode, (value, spread) in ratios.items()
    }
    return {"name": name, "large": large, "modes": modes}


def test_a_target_over_several_modes_takes_the_worst_verdict():
    """The verdict came from the mode with the largest value alone: 1.28 (+-1.41) printed
    "unclear" beside a mode at 1.03 (+-0.07), clearly over 0.8; and "met" beside a mode whose
    spread crossed the bound."""
    from batchnorm.bench._benchmark import MODES, summarise

    clearly_over = dict.fromkeys(MODES, (0.5, 0.01)) | {
        MODES[0]: (1.28, 1.41),
        MODES[1]: (1.03, 0.07),
    }
    crossing = dict.fromkeys(MODES, (0.5, 0.01)) | {MODES[0]: (0.70, 0.05), MODES[1]: (0.65, 0.40)}
    targets = summarise(
        [_case("over", True, clearly_over), _case("crossing", True, crossing)], [], []
    )["targets"]
    verdicts = {t["target"].split(":")[0]: t for t in targets if "time / torch" in t["target"]}
    assert verdicts["over"]["verdict"] == "NO" and verdicts["over"]["measured"] == 1.03
    assert verdicts["crossing"]["verdict"] == "unclear"
    floors = [t for t in targets if "copy floor" in t["target"]]
    assert floors[0]["verdict"] == "unclear"  # train forward <= 1.8: 1.28 (+-1.41) decides


def test_the_fresh_floor_copies_into_the_inputs_own_dtype():
    """bfloat16 and float16 inputs were copied into float64 memory four times their size."""
    from batchnorm.bench._benchmark import fresh_copy

    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        x = torch.randn(4, 5).to(dtype)
        copy = fresh_copy(x)
        assert copy.dtype == dtype and torch.equal(copy, x)


def test_the_table_gives_the_huge_page_ratio_with_its_spread():
    """The THP allocator's ours/torch was printed bare (1.29 where its spread was 1.36)."""
    from batchnorm.bench._benchmark import MODES, format_table

    numbers = {
        "seconds": {"batchnorm": 1e-3, "torch": 2e-3, "torch functional": 2e-3},
        "ratio_to_torch": {"value": 0.5, "spread": 0.1},
        "floor_multiple": {"batchnorm": 1.5, "torch": 3.0},
        "fresh_floor_multiple": {"batchnorm": 1.0, "torch": 2.0},
    }
    case = {"name": "dense NC", "shape": [8, 4], "modes": {MODES[0]: numbers}}
    thp_case = {**case, "modes": {MODES[0]: {"ratio_to_torch": {"value": 1.29, "spread": 1.36}}}}
    report = {
        "cases": [case],
        "extra_cases": [],
        "models": [],
        "summary": {"targets": []},
        "huge_page_run": {"cases": [thp_case], "extra_cases": []},
    }
    assert "| 0.50 (+-0.10) | 1.29 (+-1.36) |" in format_table(report)
