"""The compiled native op (``fused_trim._C``) and its autograd glue.

The C++/CUDA sources in ``csrc/`` are not built yet; until they are, this backend reports itself
unavailable and ``backend="auto"`` falls back to the reference.
"""

from __future__ import annotations

import torch
from torch import Tensor

try:  # pragma: no cover - depends on whether the extension was built
    from . import _C  # type: ignore[attr-defined]
except ImportError as exc:  # pragma: no cover
    _C = None
    _IMPORT_ERROR = str(exc)
else:  # pragma: no cover
    _IMPORT_ERROR = ""


def unavailable_reason(device: torch.device) -> str | None:
    """Why the native op cannot run on ``device``, or ``None`` when it can."""
    if _C is None:
        return f"the compiled extension fused_trim._C is not built ({_IMPORT_ERROR})"
    return None


def is_available(device: torch.device) -> bool:
    """Whether ``backend="native"`` can run on ``device``."""
    return unavailable_reason(device) is None


def trimmed_cross_entropy_2d(*args, **kwargs) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The native op on the normalised ``(M, C)`` problem (see :mod:`fused_trim.reference`)."""
    raise RuntimeError(f"backend='native' cannot run here: {unavailable_reason(torch.device('cpu'))}")
