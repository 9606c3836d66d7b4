"""fused_trim: mini-batch trimming as one fused cross-entropy operation."""

from ._common import TrimInfo
from .functional import trimmed_cross_entropy

__all__ = ["TrimInfo", "trimmed_cross_entropy"]
__version__ = "0.1.0"
