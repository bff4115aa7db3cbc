"""The demo figures' layout: titles and axis labels everywhere, whole-number epoch ticks, and
legends that cover no curve (they lie outside every panel)."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from batchnorm.demo._comparison_plot import comparison_figure
from batchnorm.demo._plots import modes_figure, pyplot, shift_figure

RUNS = {
    "with_bn": {
        "train_loss": [0.55, 0.08, 0.04],
        "val_loss": [1.6, 1.4, 1.3],
        "population_val_loss": [0.10, 0.08, 0.07],
        "train_accuracy": [0.83, 0.98, 0.99],
        "val_accuracy": [0.70, 0.89, 0.92],
        "population_val_accuracy": [0.97, 0.98, 0.98],
    },
    "without_bn": {
        "train_loss": [1.7, 0.7, 0.4],
        "val_loss": [1.0, 0.4, 0.3],
        "train_accuracy": [0.70, 0.91, 0.93],
        "val_accuracy": [0.91, 0.93, 0.94],
    },
}
LABELS = {"with_bn": "with BN", "without_bn": "without BN"}


def _figures():
    yield "comparison", comparison_figure(RUNS, LABELS, "with and without BN", target=0.95)
    steps = [0, 50, 100]
    spread = {15: [-1.0, -0.5, 0.0], 50: [0.0, 0.2, 0.4], 85: [1.0, 1.1, 1.2]}
    yield (
        "shift",
        shift_figure(
            steps,
            {"with_bn": [0.1, 0.8, 0.9], "without_bn": [0.1, 0.2, 0.6]},
            {"with_bn": spread, "without_bn": spread},
            LABELS,
        ),
    )
    means = {m: [0.0, 0.5, 1.0, 1.4] for m in (0.9, 0.99)}
    variances = {m: [1.0, 1.5, 2.0, 2.5] for m in (0.9, 0.99)}
    yield "modes", modes_figure(means, variances, 3.0, 4.0)


@pytest.mark.parametrize("name", ["comparison", "shift", "modes"])
def test_every_panel_is_titled_and_labelled_and_the_legend_covers_nothing(name):
    figure = dict(_figures())[name]
    try:
        figure.canvas.draw()
        renderer = figure.canvas.get_renderer()
        assert figure._suptitle is not None and figure._suptitle.get_text()
        for axes in figure.axes:
            assert axes.get_title() and axes.get_xlabel() and axes.get_ylabel()
            assert axes.get_legend() is None
        (legend,) = figure.legends
        box = legend.get_window_extent(renderer)
        for axes in figure.axes:
            # the panel with its tick labels and axis labels, not only the plotting area
            assert not box.overlaps(axes.get_tightbbox(renderer)), axes.get_title()
        assert box.y0 >= 0 and box.x0 >= 0 and box.x1 <= figure.bbox.width
    finally:
        pyplot().close(figure)


def test_comparison_figure_shows_three_measures_with_whole_epoch_ticks():
    figure = comparison_figure(RUNS, LABELS, "title", target=0.95)
    try:
        figure.canvas.draw()
        titles = [axes.get_title() for axes in figure.axes[:3]]
        assert titles[:2] == ["training (batch statistics)", "validation, moving averages"]
        assert titles[2].startswith("validation, population statistics\n(without BN")
        for axes in figure.axes:
            low, high = axes.get_xlim()
            ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
            assert ticks and all(float(tick).is_integer() for tick in ticks)
        population = figure.axes[2]
        plotted = [list(line.get_ydata()) for line in population.get_lines()]
        assert RUNS["with_bn"]["population_val_accuracy"] in plotted
        assert RUNS["without_bn"]["val_accuracy"] in plotted  # no BN: its plain validation
        assert [axes.get_yscale() for axes in figure.axes[3:]] == ["log"] * 3
        labels = [text.get_text() for text in figure.legends[0].get_texts()]
        assert labels == ["with BN", "without BN", "target 95.0%"]
    finally:
        pyplot().close(figure)

    plain = {"without_bn": RUNS["without_bn"]}
    figure = comparison_figure(plain, LABELS, "no batch norm")
    try:
        assert len(figure.axes) == 4  # no population column without batch norm
    finally:
        pyplot().close(figure)
