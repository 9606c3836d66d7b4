"""Triton backend: fused forward, on-device exact-k selection and a kept-rows-only backward."""

from __future__ import annotations

from torch import Tensor

from .function import REDUCTION_CODE, trimmed_ce_fwd
from .linear_ce import trimmed_linear_cross_entropy_2d

__all__ = ["trimmed_cross_entropy_2d", "trimmed_linear_cross_entropy_2d"]


def device_ratio(keep_ratio: float | Tensor, device) -> tuple[float, Tensor | None]:
    """``(host ratio, device ratio tensor or None)``: a 0-dim tensor on ``device`` is read by the
    kernels; a floating one elsewhere is read on the host (no synchronisation with ``device``)."""
    if isinstance(keep_ratio, Tensor):
        if keep_ratio.device == device:
            return 1.0, keep_ratio
        if not keep_ratio.is_floating_point():
            raise ValueError(f"an exact keep count must be on {device}, got {keep_ratio.device}")
        return float(keep_ratio), None  # a host value costs no synchronisation
    return float(keep_ratio), None


def trimmed_cross_entropy_2d(
    input: Tensor,
    target: Tensor,
    keep_ratio: float | Tensor,
    keep: str,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    score_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The contract on ``input (M, C)`` or ``(N, C, S)`` (read in place), ``target (M,)``.

    Returns ``(out, losses, kept, k, threshold)``, ``losses`` in the accumulation dtype (see
    :func:`fused_trim.reference.trimmed_cross_entropy_2d`).

    ``keep_ratio`` may also be a 0-dim int64 tensor: an exact count (see :mod:`fused_trim.distributed`).
    ``score_offset`` (``(M,)`` or ``None``): rank ``losses - score_offset``.
    """
    keep_ratio, ratio_t = device_ratio(keep_ratio, input.device)
    out, losses, kept, k, threshold, _, _ = trimmed_ce_fwd(
        input, target, weight, float(keep_ratio), ratio_t, keep == "hardest", ignore_index, label_smoothing,
        REDUCTION_CODE[reduction], score_offset,
    )
    return out, losses.detach(), kept, k, threshold.detach()
