"""``SyncBatchNormalization``: batch statistics over a torch.distributed process group."""

from __future__ import annotations

from typing import Any

from batchnorm.functional._validation import check_bool
from batchnorm.layers._batch_normalization import BatchNormalization


class SyncBatchNormalization(BatchNormalization):
    """:class:`BatchNormalization` with ``synchronized=True``: statistics of the global batch.

    In training, every rank of ``process_group`` (default: the WORLD group of torch.distributed)
    contributes its per-channel count, mean and centred sum of squares; they are combined with
    the parallel variance formula

    .. math::
        \\mu = \\frac{\\sum_r n_r \\mu_r}{N}, \\quad
        \\sigma^2 = \\frac{\\sum_r M2_r + n_r (\\mu_r - \\mu)^2}{N}, \\quad N = \\sum_r n_r,

    so uneven and empty local batches are exact, and the backward all-reduces the two
    per-channel gradient sums: outputs, gradients and moving statistics equal those of one process
    running the concatenated batch. The moving statistics (Keras' update
    ``moving = momentum * moving + (1 - momentum) * batch``, biased variance as tf-keras'
    non-fused path) are identical on every rank. Inference communicates nothing. Without an
    initialised process group, or with a group of one, it computes as ``BatchNormalization``
    with ``fused=False``.

    Args:
        num_features: channel count, as :class:`BatchNormalization`.
        process_group: a ``torch.distributed.ProcessGroup``, or None for the default group.
        **kwargs: every other :class:`BatchNormalization` argument (``fused=True`` is refused).

    Example:
        >>> layer = SyncBatchNormalization(16, axis=1)  # launched with torchrun
        >>> y = layer(torch.randn(8, 16, 5, 5), training=True)
    """

    def __init__(
        self,
        num_features: Any = None,
        *,
        process_group: Any = None,
        **kwargs: Any,
    ) -> None:
        synchronized = kwargs.pop("synchronized", True)
        if not check_bool(synchronized, "synchronized"):
            raise ValueError(
                "SyncBatchNormalization is always synchronized. "
                f"Received: synchronized={synchronized!r}"
            )
        super().__init__(num_features, synchronized=True, process_group=process_group, **kwargs)
