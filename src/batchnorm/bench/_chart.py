"""The benchmark as a PNG bar chart: multiples of the copy floor, batchnorm beside torch native."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_benchmark(report: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "Drawing the chart needs matplotlib: pip install 'batchnorm[plot]'"
        ) from error
    modes = list(report["cases"][0]["modes"])
    figure, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 5), sharey=False)
    for axis, mode in zip(axes, modes, strict=True):
        names = [r["name"] for r in report["cases"]]
        ours = [r["modes"][mode]["floor_multiple"]["batchnorm"] for r in report["cases"]]
        native = [r["modes"][mode]["floor_multiple"]["torch"] for r in report["cases"]]
        positions = range(len(names))
        axis.bar([p - 0.2 for p in positions], ours, width=0.4, label="batchnorm")
        axis.bar([p + 0.2 for p in positions], native, width=0.4, label="torch nn.BatchNorm")
        axis.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="copy floor")
        if max(ours + native) > 10 * min(ours + native):
            axis.set_yscale("log")  # tiny cases sit at 10-100x the floor, large ones near 1-5x
        axis.set_xticks(list(positions), names, rotation=35, ha="right", fontsize=8)
        axis.set_title(mode)
        axis.set_xlabel("case")
        axis.set_ylabel("time / one copy of the input")
    threads = report["machine"]["threads"]
    where = "CPU" if report.get("device", "cpu") == "cpu" else report.get("device_name", "device")
    figure.suptitle(
        f"batchnorm vs torch's batch norm, {where}, {threads} thread{'' if threads == 1 else 's'} (lower is better)"
    )
    # One legend for every panel, below them, where it covers no bar.
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    figure.savefig(path, dpi=110)
    plt.close(figure)
