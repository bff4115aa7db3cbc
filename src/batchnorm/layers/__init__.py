"""The layers: BatchNormalization, SampleNormalization and SyncBatchNormalization as torch modules,
with what they are built from (arguments, lazy weights and build, call inputs and step, checkpoints,
config, repr, dtype policy, fused rule, Keras weights, objects, presets).
"""

from batchnorm.layers._batch_normalization import BatchNormalization
from batchnorm.layers._presets import FRAMEWORK_PRESETS, porting_table
from batchnorm.layers._sample_normalization import SampleNormalization
from batchnorm.layers._sync_batch_normalization import SyncBatchNormalization

__all__ = [
    "FRAMEWORK_PRESETS",
    "BatchNormalization",
    "SampleNormalization",
    "SyncBatchNormalization",
    "porting_table",
]
