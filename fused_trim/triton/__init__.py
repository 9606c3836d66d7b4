"""Triton backend: fused forward, on-device exact-k selection and a kept-rows-only backward.

``launch`` holds the launch helpers and the shared select, ``trimmed_ce`` the cross-entropy op,
``linear_ce`` the LM head; each kernel family has its own module.
"""

from .linear_ce import trimmed_linear_cross_entropy_2d
from .trimmed_ce import trimmed_cross_entropy_2d

__all__ = ["trimmed_cross_entropy_2d", "trimmed_linear_cross_entropy_2d"]
