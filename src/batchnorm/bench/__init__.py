"""The benchmark behind ``batchnorm bench``: batchnorm against torch native and the copy floor in
one process, synchronized batch norm over 2 gloo processes, and the bar chart of the results.
"""

from batchnorm.bench._benchmark import format_table, run_benchmark
from batchnorm.bench._sync import format_sync_table, run_sync_benchmark

__all__ = ["format_sync_table", "format_table", "run_benchmark", "run_sync_benchmark"]
