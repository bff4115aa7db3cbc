"""The demo's three measures: validation on population statistics against a hand computation,
the per-epoch table, the plain-words summary and the moving-average note."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from batchnorm.demo._comparison import compare
from batchnorm.demo._datasets import load_dataset
from batchnorm.demo._measures import POPULATION_KEYS
from batchnorm.demo._models import batch_norm_layers, classic_network, placement_network
from batchnorm.demo._population import population_statistics_measurement
from batchnorm.demo._report import history_table, table_legend
from batchnorm.demo._summary import epochs_table, moving_average_notes, plain_summary
from batchnorm.demo._training import HISTORY_KEYS, Split, fit

LABELS = {"with_bn": "with BN", "without_bn": "without BN"}


@pytest.fixture(scope="module")
def tiny_split():
    data = load_dataset(None).limited(150, 50)
    return Split(
        data.train_images.flatten(1),
        data.train_labels,
        data.validation_images.flatten(1),
        data.validation_labels,
    )


def _numpy_population_validation(model, split):
    """Dense -> ReLU -> BN (population mean, biased variance) -> Dense, in float64 NumPy."""
    dense, norm, head = model[1], batch_norm_layers(model)[0], model[4]

    def weights(layer):
        return layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()

    w1, b1 = weights(dense)
    w2, b2 = weights(head)
    gamma, beta = norm.gamma.detach().double().numpy(), norm.beta.detach().double().numpy()

    def hidden(inputs):
        return np.maximum(inputs.double().numpy() @ w1.T + b1, 0.0)

    train = hidden(split.train_inputs)
    mean = train.mean(axis=0)
    # tf-keras stores the biased variance for Dense outputs (its non-fused path: tf.nn.moments)
    variance = ((train - mean) ** 2).mean(axis=0)
    normalized = gamma * (hidden(split.validation_inputs) - mean) / np.sqrt(variance + 1e-3) + beta
    logits = normalized @ w2.T + b2
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_softmax = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    labels = split.validation_labels.numpy()
    loss = -log_softmax[np.arange(len(labels)), labels].mean()
    return loss, (logits.argmax(axis=1) == labels).mean(), mean


def test_population_validation_equals_a_hand_computation(tiny_split):
    model = classic_network(64, with_batch_norm=True, seed=7)
    history = fit(
        model,
        tiny_split,
        epochs=2,
        batch_size=32,
        seed=7,
        label="t",
        stream=io.StringIO(),
        after_epoch=population_statistics_measurement(tiny_split, batch_size=40),
    )
    loss, accuracy, mean = _numpy_population_validation(model, tiny_split)
    assert history["population_val_loss"][-1] == pytest.approx(loss, rel=1e-5)
    assert history["population_val_accuracy"][-1] == pytest.approx(accuracy)
    # the measured copy was recalibrated, not the trained network: its moving mean still lags
    moving_mean = batch_norm_layers(model)[0].moving_mean.double().numpy()
    assert np.abs(moving_mean - mean).max() > 0.01


def test_measuring_population_statistics_leaves_training_unchanged(tiny_split):
    runs = {}
    for measured in (False, True):
        model = classic_network(64, with_batch_norm=True, seed=3)
        measurement = population_statistics_measurement(tiny_split) if measured else None
        history = fit(
            model,
            tiny_split,
            epochs=2,
            batch_size=64,
            seed=3,
            label="t",
            stream=io.StringIO(),
            after_epoch=measurement,
        )
        runs[measured] = (history, model.state_dict())
    (plain, plain_state), (measured, measured_state) = runs[False], runs[True]
    assert set(measured) == set(HISTORY_KEYS) | set(POPULATION_KEYS)
    assert {key: measured[key] for key in HISTORY_KEYS} == plain
    for key, value in plain_state.items():
        torch.testing.assert_close(measured_state[key], value, rtol=0, atol=0)


def test_compare_measures_population_statistics_of_every_network_with_batch_norm():
    data = load_dataset(None).limited(100, 30)
    result = compare(
        {
            "with_bn": lambda: classic_network(64, with_batch_norm=True, seed=0, momentum=0.9),
            "without_bn": lambda: classic_network(64, with_batch_norm=False, seed=0),
            "conv": lambda: placement_network(8, 8, batch_norm_before_relu=True, seed=0),
        },
        {**LABELS, "conv": "Conv-BN-ReLU"},
        data,
        flatten=False,
        epochs=2,
        batch_size=50,
        seed=0,
        stream=io.StringIO(),
    )
    assert set(result.histories["without_bn"]) == set(HISTORY_KEYS)
    for name in ("with_bn", "conv"):
        history = result.histories[name]
        assert set(history) == set(HISTORY_KEYS) | set(POPULATION_KEYS)
        assert all(0 <= value <= 1 for value in history["population_val_accuracy"])
        assert len(history["population_val_loss"]) == 2
    assert result.momenta == {"with_bn": 0.9, "conv": 0.99}
    assert result.steps_per_epoch == 2


def _history(train, moving, population=None):
    history = {
        "train_loss": [1.0] * len(train),
        "train_accuracy": train,
        "val_loss": [2.0] * len(train),
        "val_accuracy": moving,
    }
    if population is not None:
        history["population_val_loss"] = [0.5] * len(train)
        history["population_val_accuracy"] = population
    return history


# The digits' story in miniature: BN trains faster, lags on the moving averages, leads on
# population statistics.
STORY = {
    "with_bn": _history(
        [0.83, 0.97, 0.99, 1.0], [0.70, 0.89, 0.94, 0.96], [0.97, 0.98, 0.98, 0.98]
    ),
    "without_bn": _history([0.70, 0.90, 0.96, 0.97], [0.90, 0.93, 0.95, 0.95]),
}


def test_summary_says_who_reached_the_target_first_on_each_measure():
    text = plain_summary(STORY, LABELS, 0.95)
    assert text == (
        "In words: on training accuracy, with BN reached 95.0% first (epoch 2; without BN at "
        "epoch 3). On validation accuracy with the moving averages (as Keras evaluates), without "
        "BN reached 95.0% first (epoch 3; with BN at epoch 4). On validation accuracy with "
        "population statistics, with BN reached 95.0% first (epoch 1; without BN at epoch 3)."
    )
    rows = [line.split() for line in epochs_table(STORY, LABELS, 0.95).splitlines()[1:]]
    assert [row[-2:] for row in rows] == [["2", "3"], ["4", "3"], ["1", "3"]]
    tied = plain_summary(STORY, LABELS, 0.99)
    assert "with BN reached 99.0% first (epoch 3; without BN did not in 4 epochs)" in tied
    assert "no run reached 99.0% in 4 epochs" in tied
    both = plain_summary(STORY, LABELS, 0.5)
    assert "with BN and without BN reached 50.0% at the same epoch (1)" in both


def test_moving_average_note_only_where_it_applies_with_the_real_epochs():
    (note,) = moving_average_notes(STORY, LABELS, 0.95, 23, {"with_bn": 0.99})
    assert "with BN reached 95.0% validation accuracy at epoch 1 on population statistics" in note
    assert "but only at epoch 4 on the moving averages" in note
    # 0.99**23 = 0.794 after epoch 1; 0.99**69 = 0.500 after epoch 3, the last one behind
    assert "they mix the batch statistics of about the last 100 steps, computed with" in note
    assert "hold 79% of their initial values (mean 0, variance 1) after epoch 1" in note
    assert "and 50% after epoch 3." in note
    never = moving_average_notes(STORY, LABELS, 0.97, 23, {"with_bn": 0.99})
    assert len(never) == 1 and "not in 4 epochs on the moving averages" in never[0]
    assert "40% after epoch 4" in never[0]  # 0.99**92 = 0.397
    (settled,) = moving_average_notes(STORY, LABELS, 0.97, 500, {"with_bn": 0.9})
    # 0.9**500 < 1e-22: no share worth a number
    assert "about the last 10 steps" in settled and "faded within epoch 1" in settled
    assert "%" not in settled.split("moving averages lag")[1]
    # moving averages no later than population statistics, or a target never reached: no note
    assert moving_average_notes(STORY, LABELS, 0.6, 23, {"with_bn": 0.99}) == []
    assert moving_average_notes(STORY, LABELS, 0.99, 23, {"with_bn": 0.99}) == []
    plain = {"without_bn": STORY["without_bn"]}
    assert moving_average_notes(plain, LABELS, 0.95, 23, {}) == []


def test_history_table_puts_the_three_measures_side_by_side():
    lines = history_table(STORY, LABELS).splitlines()
    groups = [title.strip() for title in lines[0].split("|")[1:]]
    assert groups == [
        "training (batch statistics)",
        "validation, moving averages",
        "validation, population statistics",
    ]
    assert [name.strip() for name in lines[1].split("|")[1:]] == [
        "with BN",
        "without BN",
        "with BN",
        "without BN",
        "with BN",
    ]
    first = [float(value) for value in lines[4].replace("|", " ").split()]
    assert first == [1, 1.0, 0.83, 1.0, 0.70, 2.0, 0.70, 2.0, 0.90, 0.5, 0.97]
    assert len(lines) == 4 + 4
    assert "without BN: no batch norm" in table_legend(STORY, LABELS)
    big = {"without_bn": _history([0.1], [0.1])}
    big["without_bn"]["train_loss"] = [12345.678]
    assert "1.235e+04" in history_table(big, LABELS)
    assert "population" not in history_table(big, LABELS)
