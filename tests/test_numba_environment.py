"""The package under Numba's process-wide settings: its on-disk cache (entries that later
processes load must run, and must be of the current sources; no writable cache folder at all),
and Numba's JIT switched off.

Oracles: float64 NumPy sums of the same arrays, float64 formulas, and a process's exit status (a
segmentation fault kills it with SIGSEGV).
"""

from __future__ import annotations

from pathlib import Path

from batchnorm import kernels
from batchnorm.kernels._jit import SOURCES_DIGEST, sources_digest
from tests.snippets import run_program

# One step per process, all sharing one cache folder. "backward" compiles the training backward
# (threaded build, channel planes), whose gradient-sums runner is then on disk; "sums" compiles
# the gradient-sums kernel, which calls the same runner. Each prints its largest error against
# float64 NumPy.
_STEP = """
import sys
import numpy as np
from batchnorm import kernels
rows, channels, inner = 64, 8, 1024  # 2^19 values: the threaded build
rng = np.random.default_rng(0)
x = rng.standard_normal((rows, channels, inner), dtype=np.float32)
dy = rng.standard_normal((rows, channels, inner), dtype=np.float32)
blocks = kernels.blocks_for(x.size, rows, inner)
assert blocks > 1
mean = x.astype(np.float64).mean((0, 2))[None]
dy_sum = dy.astype(np.float64).sum((0, 2))
if sys.argv[1] == "sums":
    sums = kernels.gradient_sums.planes.parallel(dy, x, mean, 1, rows, blocks)
    print(np.abs(sums[0, 0] - dy_sum).max() / np.abs(dy_sum).max())
else:
    variance = x.astype(np.float64).var((0, 2))[None]
    total = np.full((1, channels), float(rows * inner))
    _, doffset = kernels.train_backward.planes.parallel(
        dy, x, np.zeros((1, 1), np.float32), None, mean, variance, total,
        np.ones(channels, np.float32), 1e-3, 1, rows, blocks, np.empty_like(x),
    )
    print(np.abs(doffset - dy_sum).max() / np.abs(dy_sum).max())
"""


def test_a_kernel_compiled_beside_a_cached_runner_loads_in_later_processes(tmp_path):
    # A kernel compiled in a process that had loaded its threaded runner from the cache was
    # cached in a form that crashed every process loading it (Numba's issue 8578): here the
    # third process, which loads the gradient-sums kernel the second one compiled.
    for step in ("backward", "sums", "sums"):
        result = run_program(_STEP, step, NUMBA_CACHE_DIR=str(tmp_path))
        assert result.returncode == 0, (step, result.returncode, result.stderr[-3000:])
        assert float(result.stdout.strip()) < 1e-12, (step, result.stdout)


def test_the_sources_digest_changes_with_any_source_file(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "b.py").write_text("y = 2\n")
    (tmp_path / "notes.txt").write_text("not a source\n")
    before = sources_digest(tmp_path)
    (tmp_path / "notes.txt").write_text("changed\n")
    assert sources_digest(tmp_path) == before
    (tmp_path / "b.py").write_text("y = 3\n")
    edited = sources_digest(tmp_path)
    assert edited != before
    (tmp_path / "c.py").write_text("")
    assert sources_digest(tmp_path) not in (before, edited)


def test_compiled_functions_are_named_for_the_current_sources():
    # Numba keys a cache entry by the function's name and its own file's stamp: with the digest
    # of every kernel source in the name, an edit to a helper in another file cannot leave a
    # kernel calling it running the old code from the cache.
    assert sources_digest(Path(kernels.__file__).parent) == SOURCES_DIGEST
    for dispatcher in (
        kernels.train_forward.planes.serial,
        kernels.train_backward.rows.parallel,
        kernels.train_backward.narrow.serial,
        kernels._statistics.moments_rows_block,
        kernels._statistics.sum_blocks,
    ):
        assert dispatcher.py_func.__name__.endswith(f"_{SOURCES_DIGEST}")


_WITHOUT_A_CACHE_FOLDER = """
import warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from batchnorm import BatchNormalization
torch.manual_seed(0)
x = torch.randn(16, 5) * 3 + 1
y = BatchNormalization(5, epsilon=1e-3)(x, training=False).double()
expected = x.double() / (1 + 1e-3) ** 0.5  # moving mean 0, moving variance 1
print(sum("NUMBA_CACHE_DIR" in str(w.message) for w in caught), float((y - expected).abs().max()))
"""


def test_the_package_imports_and_runs_where_no_cache_folder_is_writable():
    # A read-only install whose user cache folder is read-only too (AWS Lambda, read-only
    # containers): Numba raised "cannot cache function ... no locator available" from every
    # cached function's decorator, so `import batchnorm` failed. Numba's locators are limited
    # here to the one for IPython cells, which finds none for the package's files either.
    result = run_program(_WITHOUT_A_CACHE_FOLDER, NUMBA_CACHE_LOCATOR_CLASSES="IPythonCacheLocator")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings, error = result.stdout.split()
    assert int(warnings) == 1  # one warning, naming NUMBA_CACHE_DIR
    assert float(error) < 1e-5


_WITHOUT_JIT = """
import warnings
import torch
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    from batchnorm import BatchNormalization
torch.manual_seed(0)
x = torch.randn(6, 3, 5, dtype=torch.float64, requires_grad=True)
layer = BatchNormalization(3, axis=1, momentum=0.5, dtype=torch.float64)
y = layer(x, training=True)
y.backward(torch.ones_like(y))
detached = x.detach()
mean, variance = detached.mean((0, 2)), detached.var((0, 2), unbiased=False)
expected = (detached - mean[:, None]) / torch.sqrt(variance[:, None] + 1e-3)
errors = [
    (y - expected).abs().max(),
    x.grad.abs().max(),  # the gradient of sum(y) is 0
    (layer.moving_variance - (0.5 + 0.5 * variance)).abs().max(),
]
print(sum("NUMBA_DISABLE_JIT" in str(w.message) for w in caught), float(max(errors)))
"""


def test_the_layer_runs_with_numba_jit_disabled():
    # NUMBA_DISABLE_JIT=1 (set to debug other Numba code) makes compiled functions plain Python,
    # where the kernels' intrinsics raised NotImplementedError on the first call. The CPU then
    # takes the composed torch ops, with one warning.
    result = run_program(_WITHOUT_JIT, NUMBA_DISABLE_JIT="1")
    assert result.returncode == 0, result.stderr[-3000:]
    warnings, error = result.stdout.split()
    assert int(warnings) == 1
    assert float(error) < 1e-12


_TRAINING_STEP = """
import hashlib
import torch
from batchnorm import BatchNormalization
torch.manual_seed(0)
x = (torch.randn(8, 6, 7, 5) * 2 + 1).requires_grad_()
layer = BatchNormalization(6, axis=1)
y = layer(x, training=True)
y.backward(torch.randn_like(y))
for tensor in (y, x.grad, layer.gamma.grad, layer.moving_variance):
    print(hashlib.sha256(tensor.detach().numpy().tobytes()).hexdigest()[:16])
"""


def test_a_process_that_compiles_the_kernels_gives_the_bits_of_one_that_loads_them(tmp_path):
    # The bits of a rerun must not depend on whether the kernels came from the cache: with
    # reassociation allowed in the input gradient's loop, the first process (which compiles)
    # gave dx one ulp away, in 416 of 1680 values here, from every later one (which loads).
    compiling, loading = (
        run_program(_TRAINING_STEP, NUMBA_CACHE_DIR=str(tmp_path)) for _ in range(2)
    )
    for result in (compiling, loading):
        assert result.returncode == 0, result.stderr[-3000:]
    assert loading.stdout.split() == compiling.stdout.split()
