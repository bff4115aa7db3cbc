"""A training step's forward and backward, each in one kernel call.

Forward (:data:`train_forward`): batch moments, the normalising pass and the moving-average step;
backward (:data:`train_backward`): the gradient sums, the input-gradient pass and the gamma/beta
gradients. Each runs the passes of the one-pass kernels (:data:`batchnorm.kernels.batch_moments`,
:data:`batchnorm.kernels.affine_normalize`, :data:`batchnorm.kernels.gradient_sums`,
:data:`batchnorm.kernels.batch_norm_input_gradient`) with the same set-up helpers and runners;
what is saved is the Python and dispatch work between them, which dominates small inputs.

The moving statistics step in place (the arrays are views of the layer's buffers), as
``F.batch_norm`` updates ``running_mean`` and ``running_var``.

The kernels repeat those kernels' few set-up lines rather than call them: calling a kernel from
a kernel (inlined) made Numba's compilation of a first training step run 26% more Python (17.3
million calls against 13.7-14.0 million, counted with cProfile on a cold cache).
"""

from __future__ import annotations

import numpy as np

from batchnorm.kernels._elementwise import (
    activation_constants,
    affine_coefficients,
    gradient_coefficients,
    input_gradient_blocks,
    normalize_blocks,
    split_mean,
)
from batchnorm.kernels._half import narrowed, widened
from batchnorm.kernels._jit import kernel, setup_helper
from batchnorm.kernels._statistics import (
    first_values,
    gradient_sums_blocks,
    moments_blocks,
    moments_from_sums,
    sum_blocks,
)


@setup_helper
def ghost_averages(mean, variance, total):  # type: ignore[no-untyped-def]
    """The batch ``(m, v, n)`` per channel: the ``[groups, C]`` statistics averaged over the
    ghost batches (views of row 0 with one group)."""
    groups, channels = mean.shape
    if groups == 1:
        return mean[0], variance[0], total[0]
    averaged = np.empty(3 * channels, np.float64).reshape((3, channels))
    m, v, n = averaged[0], averaged[1], averaged[2]
    for c in range(channels):
        mean_sum = 0.0
        variance_sum = 0.0
        total_sum = 0.0
        for g in range(groups):
            mean_sum += mean[g, c]
            variance_sum += variance[g, c]
            total_sum += total[g, c]
        m[c] = mean_sum / groups
        v[c] = variance_sum / groups
        n[c] = total_sum / groups
    return m, v, n


@setup_helper
def renorm_composition(m, v, scale, offset, epsilon, renorm):  # type: ignore[no-untyped-def]
    """Batch Renormalization's correction, from the renorm statistics before this step's update:

    ``s = sqrt(v + epsilon)``, ``s_r = max(renorm_stddev, sqrt(epsilon))``,
    ``r = clip(s / s_r, rmin, rmax)``, ``d = clip((m - renorm_mean) / s_r, -dmax, dmax)``
    (``limits = (rmin, rmax, dmax)``, infinite where not given), written to ``correction``
    ``[2, C]`` float64; the normalising pass's ``scale' = r * scale`` and
    ``offset' = d * scale + offset`` to ``composed`` ``[2, C]`` (x's dtype), which it returns.
    A NaN stays NaN through the clipping, as through ``torch.clamp``.
    """
    _, renorm_mean, renorm_stddev, limits, _, correction, composed = renorm
    floor = np.sqrt(epsilon)
    rmin, rmax, dmax = limits[0], limits[1], limits[2]
    for c in range(m.shape[0]):
        stddev = np.float64(widened(renorm_stddev[c]))
        stddev = floor if stddev < floor else stddev
        r = np.sqrt(v[c] + epsilon) / stddev
        d = (m[c] - np.float64(widened(renorm_mean[c]))) / stddev
        r = rmin if r < rmin else r
        r = rmax if r > rmax else r
        d = -dmax if d < -dmax else d
        d = dmax if d > dmax else d
        correction[0, c] = r
        correction[1, c] = d
        gamma = np.float64(widened(scale[c]))
        composed[0, c] = r * gamma
        composed[1, c] = d * gamma + np.float64(widened(offset[c]))
    return composed


@setup_helper
def update_moving_statistics(  # type: ignore[no-untyped-def]
    m,
    v,
    n,
    moving_mean,
    moving_second,
    average_weight,
    debiased,
    momentum,
    unbiased,
    epsilon,
    root,
):
    """One moving-average step, in place, with the batch mean ``m``, biased variance ``v`` and
    weight ``n`` per channel (:func:`ghost_averages`); returns whether it stepped.

    With ``v' = v * n / (n - 1)`` if ``unbiased`` and ``n > 1`` (else ``v``), and the second
    statistic's target ``t = v'`` (``moving_second`` the moving variance), or with ``root``
    (Batch Renormalization: ``moving_second`` the moving stddev) ``t = sqrt(v' + epsilon)``:

    - exponential (Keras): ``M <- M - (M - m) * (1 - momentum)``, the same for the second with
      ``t``;
    - ``debiased`` (Caffe): ``s <- momentum * s + 1``, then ``M <- M + (m - M) / s``.

    A channel whose weights sum to 0 (masked out entirely) saw no sample and keeps its
    statistics, as after an empty batch; nothing steps (``s`` included) when no channel saw one.

    Computed in float64 and rounded once into the buffers' dtype (the composed torch-op path rounds
    each operation in that dtype: the two differ by at most an ulp).
    """
    channels = m.shape[0]
    seen = False
    for c in range(channels):
        if n[c] > 0.0:
            seen = True
            break
    if not seen:
        return False
    weight = 1.0
    if debiased:
        average_weight[0] = np.float64(average_weight[0]) * momentum + 1.0
        weight = np.float64(average_weight[0])
    # Branch-free over the channels (a channel that saw nothing gets its old value back), so
    # that the loop vectorises: 4096 channels took 2 us instead of 29.
    for c in range(channels):
        count = n[c]
        target = v[c] * (count / (count - 1.0)) if unbiased and count > 1.0 else v[c]
        target = np.sqrt(target + epsilon) if root else target
        old_mean = np.float64(widened(moving_mean[c]))
        old_second = np.float64(widened(moving_second[c]))
        if debiased:
            new_mean = old_mean + (m[c] - old_mean) / weight
            new_second = old_second + (target - old_second) / weight
        else:
            new_mean = old_mean - (old_mean - m[c]) * (1.0 - momentum)
            new_second = old_second - (old_second - target) * (1.0 - momentum)
        moving_mean[c] = narrowed(new_mean if count != 0.0 else old_mean, moving_mean)
        moving_second[c] = narrowed(new_second if count != 0.0 else old_second, moving_second)
    return True


@setup_helper
def update_renorm_statistics(m, v, n, moving_variance, epsilon, renorm):  # type: ignore[no-untyped-def]
    """Batch Renormalization's part of the step (tf-keras), after :func:`update_moving_statistics`
    stepped ``moving_stddev``: ``V = relu(moving_stddev^2 - epsilon)``, and ``renorm_mean`` and
    ``renorm_stddev`` step exponentially with ``renorm_momentum`` towards ``m`` and
    ``sqrt(v + epsilon)``; a channel that saw no sample keeps its values. Apart from
    :func:`update_moving_statistics` so that a step without renorm inlines none of it."""
    moving_stddev, renorm_mean, renorm_stddev, _, renorm_momentum, _, _ = renorm
    for c in range(m.shape[0]):
        count = n[c]
        stddev = np.float64(widened(moving_stddev[c]))
        variance = stddev * stddev - epsilon
        variance = 0.0 if variance < 0.0 else variance  # relu; NaN stays NaN
        old = np.float64(widened(moving_variance[c]))
        moving_variance[c] = narrowed(variance if count != 0.0 else old, moving_variance)
        old = np.float64(widened(renorm_mean[c]))
        new = old - (old - m[c]) * (1.0 - renorm_momentum)
        renorm_mean[c] = narrowed(new if count != 0.0 else old, renorm_mean)
        old = np.float64(widened(renorm_stddev[c]))
        new = old - (old - np.sqrt(v[c] + epsilon)) * (1.0 - renorm_momentum)
        renorm_stddev[c] = narrowed(new if count != 0.0 else old, renorm_stddev)


@kernel
def train_forward(  # type: ignore[no-untyped-def]
    x,
    weights,
    masked,
    groups,
    period,
    blocks,
    scale,
    offset,
    epsilon,
    out,
    moving_mean,
    moving_variance,
    average_weight,
    debiased,
    momentum,
    unbiased,
    renorm,
    activation,
    parameter,
):
    """Batch moments, ``out = f((x - mean) / sqrt(variance + epsilon) * scale + offset)`` (``f``
    the activation of code ``activation``, None for none), and the moving-average step
    (:func:`update_moving_statistics`) in one call.

    ``renorm`` (Batch Renormalization), None or ``(moving_stddev, renorm_mean, renorm_stddev,
    limits, renorm_momentum, correction, composed)``: the pass normalises with
    ``r * scale`` and ``d * scale + offset`` (:func:`renorm_composition`) and the renorm
    statistics step too.

    Returns the batch ``(mean, variance, total_weight)``, each ``[groups, C]`` float64.
    """
    rows, channels, inner = x.shape
    first = first_values(x, weights, masked, groups, period)
    partial = np.zeros((blocks, 3, groups, channels), np.float64)
    moments_blocks(x, weights, masked, first, groups, period, blocks, partial)
    mean, variance, total = moments_from_sums(partial, first, masked, rows, inner, groups, period)
    m, v, n = ghost_averages(mean, variance, total)
    if renorm is None:
        high, factor, shift = affine_coefficients(mean, variance, scale, offset, epsilon, x)
    else:
        composed = renorm_composition(m, v, scale, offset, epsilon, renorm)
        high, factor, shift = affine_coefficients(
            mean, variance, composed[0], composed[1], epsilon, x
        )
    constants = activation_constants(parameter, x)
    normalize_blocks(x, high, factor, shift, groups, period, blocks, out, activation, constants)
    # With renorm the second moving statistic is moving_stddev (renorm[0]).
    second = moving_variance if renorm is None else renorm[0]
    stepped = update_moving_statistics(
        m,
        v,
        n,
        moving_mean,
        second,
        average_weight,
        debiased,
        momentum,
        unbiased,
        epsilon,
        renorm is not None,
    )
    if renorm is not None and stepped:
        update_renorm_statistics(m, v, n, moving_variance, epsilon, renorm)
    return mean, variance, total


@kernel
def train_backward(  # type: ignore[no-untyped-def]
    dy, x, weights, masked, mean, variance, total, scale, epsilon, groups, period, blocks, out
):
    """The batch-norm backward with the batch's own statistics, in one call: ``out = dL/dx``
    (:data:`batchnorm.kernels.batch_norm_input_gradient`), returns ``(dscale, doffset)`` ``[C]``
    float64 (:func:`~batchnorm.kernels._elementwise.gradient_coefficients`).
    """
    channels = x.shape[1]
    partial = np.zeros((blocks, 2, groups, channels), np.float64)
    gradient_sums_blocks(dy, x, mean, groups, period, blocks, partial)
    sums = sum_blocks(partial)
    high, low = split_mean(mean, x)
    k_dy, mean_dy, k_normalised, inverse, parameter_gradients = gradient_coefficients(
        variance, total, scale, sums, epsilon, x
    )
    input_gradient_blocks(
        dy,
        x,
        weights,
        masked,
        high,
        low,
        inverse,
        k_dy,
        mean_dy,
        k_normalised,
        groups,
        period,
        blocks,
        out,
    )
    return parameter_gradients
