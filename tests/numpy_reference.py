"""A plain float64 NumPy batch norm, written from the formulas in SEMANTICS.md, as an independent oracle."""

from __future__ import annotations

import numpy as np


def reference_train_step(
    x,
    mean_state,
    var_state,
    gamma,
    beta,
    *,
    axes,
    momentum,
    epsilon,
    unbiased=False,
    virtual_batch_size=None,
    weights=None,
):
    """One training step in float64: returns (y, new_moving_mean, new_moving_variance).

    Statistics arrays are per channel (``x.shape[a] for a in axes``).
    """
    x = np.asarray(x, dtype=np.float64)
    ndim = x.ndim
    channel_shape = tuple(x.shape[a] for a in axes)
    view = [x.shape[i] if i in axes else 1 for i in range(ndim)]
    reduce = tuple(i for i in range(ndim) if i not in axes)
    gamma = np.ones(channel_shape) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(channel_shape) if beta is None else np.asarray(beta, np.float64)
    if virtual_batch_size is None:
        groups = [np.arange(x.shape[0])]
    else:
        ghost_count = x.shape[0] // virtual_batch_size
        groups = [np.arange(j, x.shape[0], ghost_count) for j in range(ghost_count)]
    y = np.empty_like(x)
    means, variances, counts = [], [], []
    for index in groups:
        part = x[index]
        w = (
            np.ones(part.shape)
            if weights is None
            else np.broadcast_to(np.asarray(weights, np.float64), x.shape)[index]
        )
        total = w.sum(axis=reduce, keepdims=True)
        mean = np.where(
            total > 0, (w * part).sum(axis=reduce, keepdims=True) / np.maximum(total, 1e-300), 0
        )
        var = np.where(
            total > 0,
            (w * (part - mean) ** 2).sum(axis=reduce, keepdims=True) / np.maximum(total, 1e-300),
            0,
        )
        y[index] = (part - mean) / np.sqrt(var + epsilon) * gamma.reshape(view) + beta.reshape(view)
        count = total.reshape(channel_shape)
        counts.append(count)
        means.append(mean.reshape(channel_shape))
        stored = var.reshape(channel_shape)
        if unbiased:
            stored = stored * np.where(count > 1, count / np.maximum(count - 1, 1), 1.0)
        variances.append(stored)
    batch_mean, batch_var = np.mean(means, axis=0), np.mean(variances, axis=0)
    new_mean = mean_state * momentum + batch_mean * (1 - momentum)
    new_var = var_state * momentum + batch_var * (1 - momentum)
    # A channel whose weights sum to 0 saw no sample: its statistics stay (as an empty batch).
    seen = np.mean(counts, axis=0) > 0
    return y, np.where(seen, new_mean, mean_state), np.where(seen, new_var, var_state)


def reference_inference(x, mean_state, var_state, gamma, beta, *, axes, epsilon):
    x = np.asarray(x, dtype=np.float64)
    view = [x.shape[i] if i in axes else 1 for i in range(x.ndim)]
    channel_shape = tuple(x.shape[a] for a in axes)
    gamma = np.ones(channel_shape) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(channel_shape) if beta is None else np.asarray(beta, np.float64)
    return (x - mean_state.reshape(view)) / np.sqrt(
        var_state.reshape(view) + epsilon
    ) * gamma.reshape(view) + beta.reshape(view)
