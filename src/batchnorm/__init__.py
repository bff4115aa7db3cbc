"""batchnorm: the complete Keras/TensorFlow batch-normalization system for PyTorch.

Example:
    >>> import torch, batchnorm
    >>> layer = batchnorm.BatchNormalization(axis=1)       # NCHW, built on the first call
    >>> y = layer(torch.randn(8, 3, 5, 5), training=True)  # batch statistics, moving update
    >>> y = layer(torch.randn(2, 3, 5, 5), training=False) # moving statistics
"""

from batchnorm import constraints, functional, initializers, keras, regularizers
from batchnorm.functional import BatchNormStatistics
from batchnorm.interop import convert, convert_sync, from_caffe, from_torch, to_torch
from batchnorm.layers import (
    FRAMEWORK_PRESETS,
    BatchNormalization,
    SampleNormalization,
    SyncBatchNormalization,
    porting_table,
)
from batchnorm.tools import (
    DiagnosisReport,
    FoldedBatchNorm,
    FoldResult,
    LayerDiagnosis,
    RecalibrationResult,
    apply_constraints,
    apply_constraints_after_step,
    diagnose,
    fold,
    fold_weights,
    freeze,
    frozen,
    recalibrate,
    unfreeze,
)

__version__ = "0.1.0"

__all__ = [
    "FRAMEWORK_PRESETS",
    "BatchNormStatistics",
    "BatchNormalization",
    "DiagnosisReport",
    "FoldResult",
    "FoldedBatchNorm",
    "LayerDiagnosis",
    "RecalibrationResult",
    "SampleNormalization",
    "SyncBatchNormalization",
    "__version__",
    "apply_constraints",
    "apply_constraints_after_step",
    "constraints",
    "convert",
    "convert_sync",
    "diagnose",
    "fold",
    "fold_weights",
    "freeze",
    "from_caffe",
    "from_torch",
    "frozen",
    "functional",
    "initializers",
    "keras",
    "porting_table",
    "recalibrate",
    "regularizers",
    "to_torch",
    "unfreeze",
]
