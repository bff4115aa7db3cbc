#!/usr/bin/env bash
# The GPU checks of the native backend, in one run, for a session that is lent a CUDA machine
# (issue 13): the CUDA tests of the suite, then `batchnorm bench --device cuda`. Run from the repo
# root, e.g. through the device tool: `bash tools/device_check.sh` (about 5 minutes on an H200).
# Writes $OUT/cuda-tests.log, $OUT/bench-cuda.json and $OUT/bench-cuda.log when $OUT is set.
set -uo pipefail
OUT=${OUT:-device-check}
mkdir -p "$OUT"
python3 -m venv .venv-device
.venv-device/bin/python -m pip install -q --upgrade pip
# CUDA torch of the pinned version (the machine's registry); the rest from constraints.txt.
grep -v '^torch==' constraints.txt > "$OUT/constraints-device.txt"
.venv-device/bin/python -m pip install -q "torch==2.13.0" -c "$OUT/constraints-device.txt" -e ".[dev]"
.venv-device/bin/python -c "import torch; print(torch.__version__, torch.cuda.get_device_name())"
PYTHONUNBUFFERED=1 .venv-device/bin/python -m pytest -q -rs -k "cuda" tests 2>&1 | tee "$OUT/cuda-tests.log"
PYTHONUNBUFFERED=1 .venv-device/bin/batchnorm bench --device cuda --no-compile-time --allocators default \
    --repeats 3 --json "$OUT/bench-cuda.json" 2>&1 | tee "$OUT/bench-cuda.log"
