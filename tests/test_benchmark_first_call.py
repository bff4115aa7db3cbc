"""The bench's first-call measure: fresh processes sharing one empty Numba cache folder."""

from __future__ import annotations

import math

from batchnorm.bench import _benchmark


def test_first_call_runs_each_input_cold_then_warm(monkeypatch):
    # One small input keeps this to two fresh processes (a compile, then a cache load); channels
    # first, the kernels quickest to compile.
    monkeypatch.setattr(_benchmark, "FIRST_CALL_INPUTS", {"small": ((2, 3, 4), 1)})
    seconds = _benchmark.first_call_seconds()
    assert set(seconds) == {"small"}
    assert seconds["small"]["shape"] == [2, 3, 4]
    assert seconds["small"]["axis"] == 1
    for name in ("cold_cache", "warm_cache"):
        assert math.isfinite(seconds["small"][name]) and seconds["small"][name] > 0
        # The training step ends before the inference call after it.
        step = seconds["small"][name.replace("_cache", "_step")]
        assert 0 < step < seconds["small"][name]
