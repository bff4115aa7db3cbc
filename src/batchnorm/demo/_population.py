"""Validation with population statistics: recalibrate a copy of the network, then evaluate it.

Keras evaluates a batch-normalized network on the moving averages of the batch statistics, which
lag behind the weights: after ``t`` steps a fraction ``momentum**t`` of their initial values
(mean 0, variance 1) remains, 79% after 23 steps at Keras' momentum 0.99. The batch-norm paper
(Ioffe & Szegedy 2015, Algorithm 2) normalises at inference with statistics of the whole training
set computed after training instead. After each epoch this measures exactly that, on a deep copy:
:func:`batchnorm.recalibrate` runs the training inputs through the copy and stores in each batch
norm the mean and variance of its input over all ``N`` training samples,

.. math::
    \\mu = \\frac{1}{N} \\sum_i x_i, \\qquad
    \\sigma^2 = \\frac{1}{N} \\sum_i (x_i - \\mu)^2 \\;\\text{or}\\;
    \\frac{1}{N - 1} \\sum_i (x_i - \\mu)^2

(whichever variance the layer stores: tf-keras' rule, the biased one for ``Dense`` outputs and
the unbiased one for the fused 4-D case), and the copy is evaluated in inference mode,
``y = gamma * (x - mu) / sqrt(sigma^2 + epsilon) + beta``. The network being trained is not
touched, so training is the same with or without this measurement.

Example:
    >>> from batchnorm.demo._models import classic_network
    >>> data = Split(torch.rand(100, 64), torch.randint(0, 10, (100,)),
    ...              torch.rand(20, 64), torch.randint(0, 10, (20,)))
    >>> measure = population_statistics_measurement(data)
    >>> sorted(measure(classic_network(64, with_batch_norm=True, seed=0)))
    ['population_val_accuracy', 'population_val_loss']
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from batchnorm.demo._measures import POPULATION_STATISTICS
from batchnorm.demo._training import EpochMeasurement, Split, evaluate
from batchnorm.tools import recalibrate

# Samples per batch of the recalibration pass. Every demo network has one batch norm, whose input
# does not depend on how the samples are batched, so the statistics are the same for any size;
# large batches make the pass over the training set cheap next to an epoch of training.
RECALIBRATION_BATCH = 2048


def recalibrated_copy(model: nn.Module, train_inputs: torch.Tensor, batch_size: int) -> nn.Module:
    """A deep copy of ``model`` whose batch norms hold the population statistics of the inputs.

    Args:
        model: the network (left unchanged).
        train_inputs: the training inputs, run through the copy in batches of ``batch_size``
            (with one batch norm, as in the demos, the statistics do not depend on the batches;
            with several, the later ones see inputs normalised with each batch's statistics, as
            in training).
        batch_size: samples per batch of the recalibration pass.
    """
    recalibrated = copy.deepcopy(model)
    recalibrate(recalibrated, list(torch.split(train_inputs, batch_size)), progress=False)
    return recalibrated


def population_statistics_validation(
    model: nn.Module, data: Split, batch_size: int = RECALIBRATION_BATCH
) -> dict[str, float]:
    """Validation loss and accuracy of ``model`` recalibrated on ``data``'s training inputs."""
    recalibrated = recalibrated_copy(model, data.train_inputs, batch_size)
    loss, accuracy = evaluate(recalibrated, data.validation_inputs, data.validation_labels)
    return {POPULATION_STATISTICS.loss_key: loss, POPULATION_STATISTICS.accuracy_key: accuracy}


def population_statistics_measurement(
    data: Split, batch_size: int = RECALIBRATION_BATCH
) -> EpochMeasurement:
    """``fit``'s ``after_epoch`` measurement: validation on population statistics each epoch."""
    return lambda model: population_statistics_validation(model, data, batch_size)
