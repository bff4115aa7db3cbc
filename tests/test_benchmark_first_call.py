"""The bench's first-call measure: fresh processes sharing one empty Numba cache folder."""

from __future__ import annotations

import math
import statistics

from batchnorm.bench import _benchmark


def test_first_call_runs_each_input_cold_then_warm(monkeypatch):
    # One small input and one round keep this to two fresh processes (a compile, then a cache
    # load); channels first, the kernels quickest to compile.
    monkeypatch.setattr(_benchmark, "FIRST_CALL_INPUTS", {"small": ((2, 3, 4), 1)})
    seconds = _benchmark.first_call_seconds(rounds=1)
    assert set(seconds) == {"small"}
    assert seconds["small"]["shape"] == [2, 3, 4]
    assert seconds["small"]["axis"] == 1
    for name in ("cold_cache", "warm_cache"):
        assert math.isfinite(seconds["small"][name]) and seconds["small"][name] > 0
        # The training step ends before the inference call after it.
        step = seconds["small"][name.replace("_cache", "_step")]
        assert 0 < step < seconds["small"][name]
    # One round: no spread.
    assert set(seconds["small"]["spread"].values()) == {0.0}


def _first_call(cold: list[float], warm: list[float]) -> dict[str, dict[str, object]]:
    """A first_call_seconds result for one input from the step's runs (totals 0.1 s later)."""
    runs = {"cold_step": cold, "warm_step": warm}
    runs["cold_cache"] = [v + 0.1 for v in cold]
    runs["warm_cache"] = [v + 0.1 for v in warm]
    middle = {name: statistics.median(v) for name, v in runs.items()}
    spread = {name: (max(v) - min(v)) / middle[name] for name, v in runs.items()}
    return {"dense": {"shape": [64, 1000], "axis": -1, **middle, "spread": spread}}


def test_first_step_targets_take_the_spread_of_the_rounds():
    summary = _benchmark.summarise([], [], [], None, None, _first_call([2.5, 2.7], [0.3, 0.3]))
    cold, warm = summary["targets"]
    assert cold["target"] == "dense 64x1000: first training step, cold cache, seconds <= 3.0"
    assert cold["measured"] == 2.6 and math.isclose(cold["spread"], 0.2 / 2.6)
    assert cold["verdict"] == "met"  # 2.6 * (1 + 0.077) <= 3.0
    assert warm["target"] == "dense 64x1000: first training step, warm cache, seconds <= 0.5"
    assert warm["verdict"] == "met"
    # Above the bound by more than the spread: NO; within it: unclear.
    (cold, _) = _benchmark.summarise([], [], [], None, None, _first_call([3.3, 3.32], [0.3]))[
        "targets"
    ]
    assert cold["verdict"] == "NO"
    (cold, _) = _benchmark.summarise([], [], [], None, None, _first_call([2.8, 3.2], [0.3]))[
        "targets"
    ]
    assert cold["verdict"] == "unclear"
