"""Other frameworks' batch norms in and out: torch.nn.BatchNorm* and SyncBatchNorm, Caffe blobs,
and Keras files (tf-keras .h5, Keras 3 .keras; public as :mod:`batchnorm.keras`).
"""

from batchnorm.interop._caffe import from_caffe
from batchnorm.interop._sync_conversion import convert_sync
from batchnorm.interop._torch_conversion import convert, from_torch, to_torch

__all__ = ["convert", "convert_sync", "from_caffe", "from_torch", "to_torch"]
