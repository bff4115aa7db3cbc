"""Model tools over every batch norm in a model, ours and torch's: freeze, fold, recalibrate
(precise statistics), diagnose and inspect, apply constraints; with the progress bar they share.
"""

from batchnorm.tools._apply_constraints import apply_constraints, apply_constraints_after_step
from batchnorm.tools._diagnose import diagnose
from batchnorm.tools._diagnosis_report import DiagnosisReport, LayerDiagnosis
from batchnorm.tools._fold import FoldedBatchNorm, FoldResult, fold
from batchnorm.tools._fold_weights import fold_weights
from batchnorm.tools._freeze import freeze, frozen, unfreeze
from batchnorm.tools._inspect import inspect_checkpoint
from batchnorm.tools._recalibrate import RecalibrationResult, recalibrate

__all__ = [
    "DiagnosisReport",
    "FoldResult",
    "FoldedBatchNorm",
    "LayerDiagnosis",
    "RecalibrationResult",
    "apply_constraints",
    "apply_constraints_after_step",
    "diagnose",
    "fold",
    "fold_weights",
    "freeze",
    "frozen",
    "inspect_checkpoint",
    "recalibrate",
    "unfreeze",
]
