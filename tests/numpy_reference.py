"""A plain float64 NumPy batch norm, written from the formulas in SEMANTICS.md, as an independent oracle."""

from __future__ import annotations

import numpy as np


def _channel_layout(shape, axes):
    """``(channel_shape, view, reduce)``: the statistics' shape, that shape broadcastable
    against x, and the axes reduced."""
    channel_shape = tuple(shape[a] for a in axes)
    view = [shape[i] if i in axes else 1 for i in range(len(shape))]
    reduce = tuple(i for i in range(len(shape)) if i not in axes)
    return channel_shape, view, reduce


def _per_channel(values, channel_shape, default):
    """gamma or beta as float64, ``default`` everywhere for None."""
    if values is None:
        return np.full(channel_shape, default)
    return np.asarray(values, np.float64)


def _ghost_batches(batch, virtual_batch_size):
    """The sample indices of each ghost batch: sample ``o`` is in ghost batch ``o % count``
    (tf-keras reshapes the batch to ``[virtual_batch_size, count, ...]``)."""
    if virtual_batch_size is None:
        return [np.arange(batch)]
    count = batch // virtual_batch_size
    return [np.arange(j, batch, count) for j in range(count)]


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
    channel_shape, view, reduce = _channel_layout(x.shape, axes)
    gamma = _per_channel(gamma, channel_shape, 1.0)
    beta = _per_channel(beta, channel_shape, 0.0)
    groups = _ghost_batches(x.shape[0], virtual_batch_size)
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
    channel_shape, view, _ = _channel_layout(x.shape, axes)
    gamma = _per_channel(gamma, channel_shape, 1.0)
    beta = _per_channel(beta, channel_shape, 0.0)
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


def reference_train_gradients(
    x,
    upstream,
    gamma,
    *,
    axes,
    epsilon,
    virtual_batch_size=None,
    weights=None,
    magnitudes=False,
    normalised_floor=None,
    mean_rounding=0.0,
):
    """``(dx, dgamma, dbeta)`` of ``sum(upstream * y)`` for the training output ``y`` of
    :func:`reference_train_step` (the batch's own statistics), in float64.

    Per ghost batch and channel, with ``w`` the weights (1 without), ``W = sum(w)``,
    ``m`` and ``v`` the weighted mean and variance, ``inv = 1 / sqrt(v + epsilon)`` and the
    sums over every position (masked ones too: their outputs depend on ``m`` and ``v``)
    ``S1 = sum(dy)``, ``S2 = sum(dy * (x - m))``:
    ``dx = gamma * inv * (dy - w * S1 / W - w * inv^2 * (x - m) * S2 / W)``,
    ``dgamma = sum(dy * (x - m) * inv)``, ``dbeta = sum(dy)`` (over every ghost batch).

    ``magnitudes=True`` gives the same expressions with every term and factor replaced by its
    absolute value: the size of what each result is computed from (the tests' tolerances).
    ``normalised_floor`` (per channel, with ``magnitudes``) is added to every normalised value's
    size ``|x - m| * inv``: an InPlace-ABN backward reads ``x_hat = (y - beta) / gamma`` from
    the rounded output, which is off by ``|beta / gamma|`` roundings where ``x_hat`` is tiny.
    ``mean_rounding`` (relative, with ``magnitudes``) widens every ``|x - m|`` by that much of
    ``|m|``: a mean rounded before centring.
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(upstream, dtype=np.float64)
    channel_shape, view, reduce = _channel_layout(x.shape, axes)
    gamma = _per_channel(gamma, channel_shape, 1.0)
    scale = gamma.reshape(view)
    absolute = np.abs if magnitudes else (lambda value: value)
    groups = _ghost_batches(x.shape[0], virtual_batch_size)
    all_weights = np.ones(x.shape) if weights is None else np.broadcast_to(weights, x.shape)
    dx = np.empty_like(x)
    dgamma = np.zeros(channel_shape)
    dbeta = np.zeros(channel_shape)
    for index in groups:
        part, d, w = x[index], dy[index], np.asarray(all_weights[index], np.float64)
        total = w.sum(axis=reduce, keepdims=True)
        per_weight = np.where(total > 0, 1.0 / np.maximum(total, 1e-300), 0.0)
        mean = (w * part).sum(axis=reduce, keepdims=True) * per_weight
        centred = part - mean
        inv = 1.0 / np.sqrt((w * centred**2).sum(axis=reduce, keepdims=True) * per_weight + epsilon)
        if magnitudes:
            centred = np.abs(centred) + mean_rounding * np.abs(mean)
        if normalised_floor is not None:
            centred = centred + np.reshape(normalised_floor, view) / inv
        s1 = absolute(d).sum(axis=reduce, keepdims=True)
        s2 = (absolute(d) * absolute(centred)).sum(axis=reduce, keepdims=True)
        if magnitudes:
            inner = np.abs(d) + w * s1 * per_weight + w * inv**2 * np.abs(centred) * s2 * per_weight
        else:
            inner = d - w * s1 * per_weight - w * inv**2 * centred * s2 * per_weight
        dx[index] = absolute(scale) * inv * inner
        dgamma += (absolute(d) * absolute(centred) * inv).sum(axis=reduce).reshape(channel_shape)
        dbeta += absolute(d).sum(axis=reduce).reshape(channel_shape)
    return dx, dgamma, dbeta
