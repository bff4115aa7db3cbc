"""batchnorm: the complete Keras/TensorFlow batch-normalization system for PyTorch.

Example:
    >>> import torch, batchnorm
    >>> layer = batchnorm.BatchNormalization(axis=1)       # NCHW, built on the first call
    >>> y = layer(torch.randn(8, 3, 5, 5), training=True)  # batch statistics, moving update
    >>> y = layer(torch.randn(2, 3, 5, 5), training=False) # moving statistics
"""

from batchnorm import constraints, functional, initializers, keras, regularizers
from batchnorm._batch_normalization import BatchNormalization
from batchnorm._caffe import from_caffe
from batchnorm._constraint_hook import apply_constraints, apply_constraints_after_step
from batchnorm._diagnose import diagnose
from batchnorm._diagnosis_report import DiagnosisReport, LayerDiagnosis
from batchnorm._fold import FoldedBatchNorm, FoldResult, fold
from batchnorm._fold_weights import fold_weights
from batchnorm._freeze import freeze, frozen, unfreeze
from batchnorm._presets import FRAMEWORK_PRESETS, porting_table
from batchnorm._recalibrate import RecalibrationResult, recalibrate
from batchnorm._sample_normalization import SampleNormalization
from batchnorm._sync_batch_normalization import SyncBatchNormalization, convert_sync
from batchnorm._torch_conversion import convert, from_torch, to_torch
from batchnorm.functional import BatchNormStatistics

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
