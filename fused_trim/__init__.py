"""fused_trim: mini-batch trimming as one fused cross-entropy operation."""

__version__ = "0.1.0"  # the one version source: pyproject.toml reads it

from ._common import TrimInfo
from .functional import resolve_backend, trimmed_cross_entropy, trimmed_linear_cross_entropy
from .nn import TrimmedCrossEntropyLoss, TrimmedLinearCrossEntropyLoss
from .schedules import (
    ConstantSchedule,
    CosineSchedule,
    KeepRatioSchedule,
    LinearSchedule,
    LinearStepSchedule,
    OrderedSGDSchedule,
    StepSchedule,
    WarmupSchedule,
)

__all__ = [
    "TrimInfo",
    "resolve_backend",
    "trimmed_cross_entropy",
    "trimmed_linear_cross_entropy",
    "TrimmedCrossEntropyLoss",
    "TrimmedLinearCrossEntropyLoss",
    "KeepRatioSchedule",
    "LinearSchedule",
    "LinearStepSchedule",
    "WarmupSchedule",
    "CosineSchedule",
    "StepSchedule",
    "ConstantSchedule",
    "OrderedSGDSchedule",
]
