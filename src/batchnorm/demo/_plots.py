"""The demos' figures, drawn with matplotlib's Agg backend (no display needed).

Example:
    >>> runs = {"a": {"train_loss": [1.0, 0.5], "val_loss": [1.1, 0.6],
    ...               "train_accuracy": [0.5, 0.8], "val_accuracy": [0.4, 0.7]}}
    >>> plot_histories(runs, {"a": "run a"}, Path("/tmp/curves.png"), "demo")  # doctest: +SKIP
    PosixPath('/tmp/curves.png')
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from batchnorm.demo._training import History


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo plots need matplotlib: pip install 'batchnorm[demo]'"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    figure.clf()
    _pyplot().close(figure)
    return path


def plot_histories(
    runs: Mapping[str, History], labels: Mapping[str, str], path: Path, title: str
) -> Path:
    """Loss and accuracy per epoch: training dashed, validation solid, one colour per run."""
    plt = _pyplot()
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (name, history) in enumerate(runs.items()):
        colour = f"C{index}"
        epochs = range(1, len(history["val_loss"]) + 1)
        for axes, metric in ((loss_axes, "loss"), (accuracy_axes, "accuracy")):
            axes.plot(
                epochs,
                history[f"train_{metric}"],
                "--",
                color=colour,
                label=f"{labels[name]} (train)",
            )
            axes.plot(
                epochs,
                history[f"val_{metric}"],
                "-o",
                markersize=3,
                color=colour,
                label=f"{labels[name]} (validation)",
            )
    loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="loss", yscale="log")
    accuracy_axes.set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title)
    return _save(figure, path)


def plot_shift(
    steps: list[int],
    val_accuracy: Mapping[str, list[float]],
    percentiles: Mapping[str, Mapping[int, list[float]]],
    labels: Mapping[str, str],
    path: Path,
) -> Path:
    """Ioffe & Szegedy's Figure 1: validation accuracy, and the sigmoid input's percentiles.

    ``val_accuracy[run]`` and ``percentiles[run][q]`` hold one value per entry of ``steps``.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for index, (name, label) in enumerate(labels.items()):
        axes[0].plot(steps, val_accuracy[name], color=f"C{index}", label=label)
    axes[0].set(
        xlabel="training steps", ylabel="validation accuracy", title="(a) validation accuracy"
    )
    axes[0].legend()
    low, high = [], []
    for panel, (name, label) in zip(axes[1:], labels.items(), strict=True):
        for q, style in zip((15, 50, 85), (":", "-", "--"), strict=True):
            panel.plot(
                steps,
                percentiles[name][q],
                style,
                color="k",
                label=f"{q}th percentile",
            )
        low.append(min(percentiles[name][15]))
        high.append(max(percentiles[name][85]))
        panel.set(
            xlabel="training steps",
            ylabel="input to one sigmoid (last hidden layer)",
            title=f"({'b' if panel is axes[1] else 'c'}) {label}",
        )
        panel.legend(fontsize=8)
    for panel in axes[1:]:
        panel.set_ylim(min(low) - 0.2, max(high) + 0.2)
    for panel in axes:
        panel.grid(alpha=0.3)
    figure.suptitle("Internal covariate shift (after Ioffe & Szegedy 2015, Figure 1)")
    return _save(figure, path)


def plot_modes(
    moving_mean: Mapping[float, list[float]],
    moving_variance: Mapping[float, list[float]],
    true_mean: float,
    true_variance: float,
    path: Path,
) -> Path:
    """The moving mean and variance of one channel against steps, one line per momentum.

    ``moving_mean[momentum]`` / ``moving_variance[momentum]``: the value after each step.
    """
    plt = _pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, (momentum, means) in enumerate(moving_mean.items()):
        steps = range(len(means))
        axes[0].plot(steps, means, color=f"C{index}", label=f"momentum {momentum}")
        axes[1].plot(
            steps, moving_variance[momentum], color=f"C{index}", label=f"momentum {momentum}"
        )
    axes[0].axhline(true_mean, color="k", linestyle=":", label="data mean")
    axes[1].axhline(true_variance, color="k", linestyle=":", label="data variance")
    axes[0].set(xlabel="training steps", ylabel="moving_mean[0]", title="moving mean")
    axes[1].set(xlabel="training steps", ylabel="moving_variance[0]", title="moving variance")
    for panel in axes:
        panel.set_xscale("symlog", linthresh=10)
        panel.set_xlim(0, len(next(iter(moving_mean.values()))) - 1)
        panel.grid(alpha=0.3)
        panel.legend(fontsize=8)
    figure.suptitle("How the moving statistics used in inference converge (Keras momentum)")
    return _save(figure, path)
