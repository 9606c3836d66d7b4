"""Triton backend: fused forward, on-device exact-k selection and a kept-rows-only backward."""

from __future__ import annotations

from torch import Tensor

from .function import REDUCTION_CODE, trimmed_ce_fwd

__all__ = ["trimmed_cross_entropy_2d"]


def trimmed_cross_entropy_2d(
    input: Tensor,
    target: Tensor,
    keep_ratio: float | Tensor,
    keep: str,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The contract on ``input (M, C)`` or ``(N, C, S)`` (read in place), ``target (M,)``.

    Returns ``(out, losses, kept, k, threshold)``, ``losses`` in the accumulation dtype (see
    :func:`fused_trim.reference.trimmed_cross_entropy_2d`).

    ``keep_ratio`` may also be a 0-dim int64 tensor: an exact count (see :mod:`fused_trim.distributed`).
    """
    ratio_t = None
    if isinstance(keep_ratio, Tensor):
        if keep_ratio.device != input.device:
            if not keep_ratio.is_floating_point():
                raise ValueError(f"an exact keep count must be on {input.device}, got {keep_ratio.device}")
            keep_ratio = float(keep_ratio)  # a host value costs no synchronisation
        else:
            ratio_t, keep_ratio = keep_ratio, 1.0
    out, losses, kept, k, threshold, _, _ = trimmed_ce_fwd(
        input, target, weight, float(keep_ratio), ratio_t, keep == "hardest", ignore_index, label_smoothing,
        REDUCTION_CODE[reduction],
    )
    return out, losses.detach(), kept, k, threshold.detach()
