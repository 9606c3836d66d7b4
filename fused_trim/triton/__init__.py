"""Triton backend: fused forward, on-device exact-k selection and a kept-rows-only backward."""

from __future__ import annotations

from torch import Tensor

from .function import TrimmedCrossEntropyFunction

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
    """The contract on ``input (M, C)``, ``target (M,)``; returns ``(out, losses, kept, k, threshold)``."""
    return TrimmedCrossEntropyFunction.apply(
        input, target, weight, keep_ratio, keep, ignore_index, label_smoothing, reduction
    )
