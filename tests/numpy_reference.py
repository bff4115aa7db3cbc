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


def reference_renorm_step(
    x, upstream, state, gamma, beta, *, momentum, renorm_momentum, epsilon, clipping
):
    """One Batch Renormalization training step over the last axis in float64 (SEMANTICS.md 10).

    ``state``: dict of moving_mean, moving_stddev, renorm_mean, renorm_stddev. Returns
    ``(y, dx, dgamma, dbeta, new_state)``, new_state with moving_variance too; r and d are
    constants to the gradients.
    """
    x = np.asarray(x, np.float64).reshape(-1, np.shape(x)[-1])
    dy = np.asarray(upstream, np.float64).reshape(x.shape)
    gamma, beta = np.asarray(gamma, np.float64), np.asarray(beta, np.float64)
    mean, variance = x.mean(0), x.var(0)
    stddev = np.sqrt(variance + epsilon)
    renorm_stddev = np.maximum(state["renorm_stddev"], np.sqrt(epsilon))
    r = np.clip(stddev / renorm_stddev, clipping.get("rmin"), clipping.get("rmax"))
    d = (mean - state["renorm_mean"]) / renorm_stddev
    if "dmax" in clipping:
        d = np.clip(d, -clipping["dmax"], clipping["dmax"])
    x_hat = (x - mean) / stddev
    y = x_hat * (r * gamma) + (d * gamma + beta)
    dx = (r * gamma / stddev) * (dy - dy.mean(0) - x_hat * (dy * x_hat).mean(0))
    dgamma = (dy * (x_hat * r + d)).sum(0)
    dbeta = dy.sum(0)

    def step(old, new, m):
        return old * m + new * (1 - m)

    moving_stddev = step(state["moving_stddev"], stddev, momentum)
    new_state = {
        "moving_mean": step(state["moving_mean"], mean, momentum),
        "moving_stddev": moving_stddev,
        "moving_variance": np.maximum(moving_stddev**2 - epsilon, 0.0),
        "renorm_mean": step(state["renorm_mean"], mean, renorm_momentum),
        "renorm_stddev": step(state["renorm_stddev"], stddev, renorm_momentum),
    }
    return y, dx, dgamma, dbeta, new_state
