"""The demos' figures, drawn with matplotlib's Agg backend (no display needed), and their layout.

Every figure has a title, a title and labelled axes on each panel, and one legend below the panels,
outside every axes, so that no legend covers a curve. The per-epoch comparison figure of
``batchnorm demo`` and ``batchnorm demo placement`` is in :mod:`batchnorm.demo._comparison_plot`.

Example:
    >>> plot_modes({0.9: [0.0, 0.3]}, {0.9: [1.0, 1.2]}, 3.0, 4.0,
    ...            Path("/tmp/modes.png"))  # doctest: +SKIP
    PosixPath('/tmp/modes.png')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

_LEGEND_GAP = 0.01  # figure fraction between the legend and the panels' tick labels


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend; an ImportError that says what to install."""
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the demo plots need matplotlib: pip install 'batchnorm[demo]'"
        ) from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def lay_out(figure: Any, handles: Sequence[Any], title: str, columns: int | None = None) -> Any:
    """Title the figure, put one legend of ``handles`` below the panels, and fit the panels above.

    The legend sits in a strip at the bottom of the figure that ``tight_layout`` leaves free, so it
    overlaps no axes. Returns the legend.
    """
    figure.suptitle(title)
    legend = figure.legend(
        handles=list(handles),
        loc="lower center",
        ncol=columns or len(handles),
        frameon=False,
        fontsize=9,
    )
    figure.canvas.draw()
    strip = legend.get_window_extent().height / figure.bbox.height + _LEGEND_GAP
    figure.tight_layout(rect=(0.0, strip, 1.0, 1.0))
    return legend


def save(figure: Any, path: Path) -> Path:
    """Write ``figure`` as a PNG (creating the folder) and release it; returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    figure.clf()
    pyplot().close(figure)
    return path


def shift_figure(
    steps: list[int],
    val_accuracy: Mapping[str, list[float]],
    percentiles: Mapping[str, Mapping[int, list[float]]],
    labels: Mapping[str, str],
) -> Any:
    """Ioffe & Szegedy's Figure 1: validation accuracy, and the sigmoid input's percentiles.

    ``val_accuracy[run]`` and ``percentiles[run][q]`` hold one value per entry of ``steps``.
    """
    plt = pyplot()
    figure, axes = plt.subplots(1, 3, figsize=(14, 4.6))
    handles = [
        axes[0].plot(steps, val_accuracy[name], color=f"C{index}", label=label)[0]
        for index, (name, label) in enumerate(labels.items())
    ]
    axes[0].set(
        xlabel="training steps", ylabel="validation accuracy", title="(a) validation accuracy"
    )
    low, high = [], []
    for letter, panel, (name, label) in zip("bc", axes[1:], labels.items(), strict=True):
        lines = [
            panel.plot(steps, percentiles[name][q], style, color="k", label=f"{q}th percentile")[0]
            for q, style in zip((15, 50, 85), (":", "-", "--"), strict=True)
        ]
        low.append(min(percentiles[name][15]))
        high.append(max(percentiles[name][85]))
        panel.set(
            xlabel="training steps",
            ylabel="input to one sigmoid (last hidden layer)",
            title=f"({letter}) that sigmoid's input, {label}",
        )
    for panel in axes[1:]:
        panel.set_ylim(min(low) - 0.2, max(high) + 0.2)
    for panel in axes:
        panel.grid(alpha=0.3)
    title = "Internal covariate shift (after Ioffe & Szegedy 2015, Figure 1)"
    lay_out(figure, handles + lines, title)
    return figure


def plot_shift(
    steps: list[int],
    val_accuracy: Mapping[str, list[float]],
    percentiles: Mapping[str, Mapping[int, list[float]]],
    labels: Mapping[str, str],
    path: Path,
) -> Path:
    """Draw :func:`shift_figure` and write it as a PNG at ``path``; returns the path."""
    return save(shift_figure(steps, val_accuracy, percentiles, labels), path)


def modes_figure(
    moving_mean: Mapping[float, list[float]],
    moving_variance: Mapping[float, list[float]],
    true_mean: float,
    true_variance: float,
) -> Any:
    """The moving mean and variance of one channel against steps, one line per momentum.

    ``moving_mean[momentum]`` / ``moving_variance[momentum]``: the value after each step.
    """
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.6))
    handles = []
    for index, (momentum, means) in enumerate(moving_mean.items()):
        steps = range(len(means))
        line = axes[0].plot(steps, means, color=f"C{index}", label=f"momentum {momentum}")[0]
        axes[1].plot(steps, moving_variance[momentum], color=f"C{index}")
        handles.append(line)
    handles.append(
        axes[0].axhline(true_mean, color="k", linestyle=":", label="the data's true value")
    )
    axes[1].axhline(true_variance, color="k", linestyle=":")
    axes[0].set(
        xlabel="training steps (symmetric log scale)",
        ylabel="moving mean of channel 0",
        title="moving mean",
    )
    axes[1].set(
        xlabel="training steps (symmetric log scale)",
        ylabel="moving variance of channel 0",
        title="moving variance",
    )
    for panel in axes:
        panel.set_xscale("symlog", linthresh=10)
        panel.set_xlim(0, len(next(iter(moving_mean.values()))) - 1)
        panel.grid(alpha=0.3)
    title = "How the moving statistics used in inference converge (Keras momentum)"
    lay_out(figure, handles, title)
    return figure


def plot_modes(
    moving_mean: Mapping[float, list[float]],
    moving_variance: Mapping[float, list[float]],
    true_mean: float,
    true_variance: float,
    path: Path,
) -> Path:
    """Draw :func:`modes_figure` and write it as a PNG at ``path``; returns the path."""
    return save(modes_figure(moving_mean, moving_variance, true_mean, true_variance), path)
