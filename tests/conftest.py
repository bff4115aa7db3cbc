"""Shared test fixtures: the tf-keras golden cases and a plain float64 NumPy reference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture(scope="session")
def keras_golden() -> tuple[dict, dict]:
    document = json.loads((GOLDEN / "keras_cases.json").read_text())
    with np.load(GOLDEN / "keras_cases.npz") as data:
        arrays = {key: data[key] for key in data.files}
    return document, arrays
