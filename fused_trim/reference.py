"""Pure PyTorch trimmed cross-entropy: the oracle of every test and the fallback everywhere.

Written to be obviously correct, not fast. It works on the normalised problem that
:mod:`fused_trim.functional` hands every backend: ``input (M, C)`` or, for inputs with spatial
dimensions, ``(N, C, S)`` with ``M = N * S``; ``target (M,)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._common import as_rows, compute_k, ranking_scores


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample_loss(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float
) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy of ``input (M, C)`` as ``F.cross_entropy(reduction="none")`` defines it.

    Computed in float32 (float64 for float64 input). Returns ``(loss, w_y)``: the loss and the
    class weight of each row's target (1 without ``weight``), both 0 on ignored rows.
    """
    x = input.to(_compute_dtype(input.dtype))
    num_classes = x.shape[1]
    valid = target != ignore_index
    safe_t = torch.where(valid, target, torch.zeros_like(target)).long()
    logp = F.log_softmax(x, dim=1)
    nll = -logp.gather(1, safe_t[:, None])[:, 0]
    w = None if weight is None else weight.detach().to(x.dtype)  # no gradient to the weights
    w_y = torch.ones_like(nll) if w is None else w[safe_t]
    loss = w_y * nll
    if label_smoothing > 0.0:
        smooth = -(logp.sum(1) if w is None else (logp * w).sum(1))
        loss = (1.0 - label_smoothing) * loss + (label_smoothing / num_classes) * smooth
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(valid, loss, zero), torch.where(valid, w_y, zero)


def select(losses: Tensor, valid: Tensor, k: int, keep: str) -> Tensor:
    """Flat indices of the kept set: the ``k`` largest (``"hardest"``) or smallest (``"easiest"``)
    valid losses, ties to the lower index, NaN ranked above +inf (``torch.sort``'s order).
    The indices come in ranking order."""
    candidates = valid.nonzero()[:, 0]
    order = torch.sort(losses[candidates], descending=keep == "hardest", stable=True).indices
    return candidates[order[:k]]


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
    """The whole contract on ``input (M, C)`` or ``(N, C, S)``, ``target (M,)``.

    Returns ``(out, losses, kept, k, threshold)``; ``out`` is 0-dim for ``"mean"``/``"sum"`` and
    ``(M,)`` for ``"none"``. Only ``out`` carries gradient, and only through the kept rows.
    ``losses`` are the per-sample losses in the accumulation dtype (fp32; fp64 for fp64 input), as
    every backend returns them; the rest is in the input dtype. ``score_offset`` (``(M,)``, or
    ``None``): rank ``losses - score_offset`` (:func:`fused_trim._common.ranking_scores`) instead
    of the losses; ``threshold`` is then the k-th score.
    """
    input = as_rows(input)
    valid = target != ignore_index
    with torch.no_grad():
        losses, _ = per_sample_loss(input, target, weight, ignore_index, label_smoothing)
    scores = ranking_scores(losses, score_offset)
    k = compute_k(valid.sum(), keep_ratio)
    idx = select(scores, valid, int(k), keep)
    kept = torch.zeros_like(valid)
    kept[idx] = True
    nan = torch.full((), float("nan"), dtype=losses.dtype, device=losses.device)
    threshold = scores[idx[-1]] if idx.numel() else nan

    # Recompute the kept rows with autograd: the gradient is exactly zero everywhere else.
    kept_loss, kept_w = per_sample_loss(input[idx], target[idx], weight, ignore_index, label_smoothing)
    if reduction == "none":
        out = torch.zeros(target.shape, dtype=kept_loss.dtype, device=input.device)
        out = out.index_put((idx,), kept_loss)
    elif reduction == "sum":
        out = kept_loss.sum()
    else:
        out = kept_loss.sum() / kept_w.sum()
    return (
        out.to(input.dtype),
        losses,
        kept,
        k,
        threshold.to(input.dtype),
    )


# ------------------------------------------------------------------------------------------------
# The LM head: trimmed_linear_cross_entropy
# ------------------------------------------------------------------------------------------------


def _linear_logits(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None) -> Tensor:
    """``F.linear`` in the accumulation dtype (fp32 for bf16/fp16 inputs: the logits are never rounded)."""
    acc = _compute_dtype(input.dtype)
    bias = None if linear_bias is None else linear_bias.to(acc)
    return F.linear(input.to(acc), linear_weight.to(acc), bias)


def linear_ce_rows(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    chunk_size: int,
) -> tuple[Tensor, Tensor]:
    """Every row's loss of ``F.linear(input, linear_weight, linear_bias)``, ``chunk_size`` rows of
    logits at a time (detached). Returns ``(loss, w_y)`` in the accumulation dtype, ``(N,)``."""
    losses, wys = [], []
    with torch.no_grad():
        for start in range(0, input.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _linear_logits(input[rows], linear_weight, linear_bias)
            loss, w_y = per_sample_loss(logits, target[rows], weight, ignore_index, label_smoothing)
            losses.append(loss)
            wys.append(w_y)
    if not losses:
        acc = _compute_dtype(input.dtype)
        empty = input.new_empty((0,), dtype=acc)
        return empty, empty
    return torch.cat(losses), torch.cat(wys)


def trimmed_linear_cross_entropy_2d(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    keep_ratio: float | Tensor,
    keep: str,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    chunk_size: int,
    share=None,
    score_offset: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The LM-head contract on ``input (N, D)``, ``linear_weight (V, D)``, ``target (N,)``.

    The forward computes every row's loss in chunks of ``chunk_size`` rows, selects the kept set
    on those losses, and recomputes only the kept rows' logits with autograd, again in chunks and
    under activation checkpointing, so neither pass holds more than ``chunk_size x V`` logits.
    ``share``, when given, maps ``(losses, valid)`` to the exact number of rows to keep (a 0-dim
    int64 tensor; global trimming). ``score_offset`` (``(N,)`` or ``None``): rank
    ``losses - score_offset``. Returns ``(out, losses, kept, k, threshold)`` as
    :func:`trimmed_cross_entropy_2d` does.
    """
    valid = target != ignore_index
    losses, _ = linear_ce_rows(
        input, linear_weight, linear_bias, target, weight, ignore_index, label_smoothing, chunk_size
    )
    k = compute_k(valid.sum(), keep_ratio if share is None else share(losses, valid))
    scores = ranking_scores(losses, score_offset)
    idx = select(scores, valid, int(k), keep)
    kept = torch.zeros_like(valid)
    kept[idx] = True
    nan = torch.full((), float("nan"), dtype=losses.dtype, device=losses.device)
    threshold = scores[idx[-1]] if idx.numel() else nan

    def kept_rows(x: Tensor, t: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
        return per_sample_loss(_linear_logits(x, w, b), t, weight, ignore_index, label_smoothing)

    idx = idx.sort().values  # row order: the sums run in a fixed order
    parts, wys = [], []
    for start in range(0, max(idx.numel(), 1), chunk_size):  # (an empty chunk keeps the graph)
        rows = idx[start : start + chunk_size]
        loss, w_y = checkpoint(
            kept_rows, input[rows], target[rows], linear_weight, linear_bias, use_reentrant=False
        )
        parts.append(loss)
        wys.append(w_y)
    acc = losses.dtype
    kept_loss, kept_w = torch.cat(parts), torch.cat(wys)
    if reduction == "none":
        out = torch.zeros(target.shape, dtype=acc, device=input.device).index_put((idx,), kept_loss)
    elif reduction == "sum":
        out = kept_loss.sum()
    else:
        out = kept_loss.sum() / kept_w.sum()
    return out.to(input.dtype), losses, kept, k, threshold.to(input.dtype)
