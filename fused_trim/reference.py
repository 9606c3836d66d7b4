"""Pure PyTorch trimmed cross-entropy: the oracle of every test and the fallback everywhere.

Written to be obviously correct, not fast. It works on the normalised problem that
:mod:`fused_trim.functional` hands every backend: ``input (M, C)`` or, for inputs with spatial
dimensions, ``(N, C, S)`` with ``M = N * S``; ``target (M,)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ._common import Keep, Reduction, TrimOptions, acc_dtype, as_rows, compute_k, ranking_scores


def per_sample_loss(
    input: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int, label_smoothing: float
) -> tuple[Tensor, Tensor]:
    """Per-row cross-entropy of ``input (M, C)`` as ``F.cross_entropy(reduction="none")`` defines it.

    Computed in float32 (float64 for float64 input). Returns ``(loss, w_y)``: the loss and the
    class weight of each row's target (1 without ``weight``), both 0 on ignored rows.
    """
    x = input.to(acc_dtype(input.dtype))
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


def select(losses: Tensor, valid: Tensor, k: int, keep: Keep) -> Tensor:
    """Flat indices of the kept set: the ``k`` largest (``"hardest"``) or smallest (``"easiest"``)
    valid losses, ties to the lower index, NaN ranked above +inf (``torch.sort``'s order).
    The indices come in ranking order."""
    candidates = valid.nonzero()[:, 0]
    order = torch.sort(losses[candidates], descending=keep == Keep.HARDEST, stable=True).indices
    return candidates[order[:k]]


def _kept_set(
    scores: Tensor, valid: Tensor, k: Tensor, keep: Keep
) -> tuple[Tensor, Tensor, Tensor]:
    """``(idx, kept, threshold)`` of the selection: the kept indices in ranking order, the kept
    mask and the k-th score (NaN when ``k == 0``), in the scores' dtype."""
    idx = select(scores, valid, int(k), keep)
    kept = torch.zeros_like(valid)
    kept[idx] = True
    nan = torch.full((), float("nan"), dtype=scores.dtype, device=scores.device)
    return idx, kept, scores[idx[-1]] if idx.numel() else nan


def _reduce(kept_loss: Tensor, kept_w: Tensor, idx: Tensor, num_rows: int, reduction: Reduction) -> Tensor:
    """The kept rows' losses reduced: their sum, their weighted mean, or ``(num_rows,)`` with the
    losses at ``idx`` and 0 elsewhere."""
    if reduction == Reduction.NONE:
        out = torch.zeros(num_rows, dtype=kept_loss.dtype, device=kept_loss.device)
        return out.index_put((idx,), kept_loss)
    if reduction == Reduction.SUM:
        return kept_loss.sum()
    return kept_loss.sum() / kept_w.sum()


def trimmed_cross_entropy_2d(
    input: Tensor, target: Tensor, opts: TrimOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole contract on ``input (M, C)`` or ``(N, C, S)``, ``target (M,)`` and ``opts``.

    Returns ``(out, losses, kept, k, threshold)``; ``out`` is 0-dim for ``"mean"``/``"sum"`` and
    ``(M,)`` for ``"none"``. Only ``out`` carries gradient, and only through the kept rows.
    ``losses`` are the per-sample losses in the accumulation dtype (fp32; fp64 for fp64 input), as
    every backend returns them; the rest is in the input dtype. With ``opts.score_offset`` the
    selection ranks ``losses - score_offset`` (:func:`fused_trim._common.ranking_scores`) instead
    of the losses, and ``threshold`` is the k-th score. Every other backend's entry point has this
    contract.
    """
    input = as_rows(input)
    ce_opts = (opts.weight, opts.ignore_index, opts.label_smoothing)
    valid = target != opts.ignore_index
    with torch.no_grad():
        losses, _ = per_sample_loss(input, target, *ce_opts)
    scores = ranking_scores(losses, opts.score_offset)
    k = compute_k(valid.sum(), opts.keep_ratio)
    idx, kept, threshold = _kept_set(scores, valid, k, opts.keep)

    # Recompute the kept rows with autograd: the gradient is exactly zero everywhere else.
    kept_loss, kept_w = per_sample_loss(input[idx], target[idx], *ce_opts)
    out = _reduce(kept_loss, kept_w, idx, target.shape[0], opts.reduction)
    return out.to(input.dtype), losses, kept, k, threshold.to(input.dtype)


# ------------------------------------------------------------------------------------------------
# The LM head: trimmed_linear_cross_entropy
# ------------------------------------------------------------------------------------------------


def _linear_logits(input: Tensor, linear_weight: Tensor, linear_bias: Tensor | None) -> Tensor:
    """``F.linear`` in the accumulation dtype (fp32 for bf16/fp16 inputs: the logits are never rounded)."""
    acc = acc_dtype(input.dtype)
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
        acc = acc_dtype(input.dtype)
        empty = input.new_empty((0,), dtype=acc)
        return empty, empty
    return torch.cat(losses), torch.cat(wys)


def trimmed_linear_cross_entropy_2d(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    opts: TrimOptions,
    share: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The LM-head contract on ``input (N, D)``, ``linear_weight (V, D)``, ``target (N,)`` and ``opts``.

    The forward computes every row's loss in chunks of ``opts.chunk_size`` rows, selects the kept
    set on those losses, and recomputes only the kept rows' logits with autograd, again in chunks
    and under activation checkpointing, so neither pass holds more than ``chunk_size x V`` logits.
    ``share``, when given, maps ``(losses, valid)`` to the exact number of rows to keep (a 0-dim
    int64 tensor; global trimming). Returns ``(out, losses, kept, k, threshold)`` as
    :func:`trimmed_cross_entropy_2d` does. Every other backend's LM-head entry point has this
    contract.
    """
    ce_opts = (opts.weight, opts.ignore_index, opts.label_smoothing)
    chunk_size = opts.chunk_size
    valid = target != opts.ignore_index
    losses, _ = linear_ce_rows(input, linear_weight, linear_bias, target, *ce_opts, chunk_size)
    k = compute_k(valid.sum(), opts.keep_ratio if share is None else share(losses, valid))
    scores = ranking_scores(losses, opts.score_offset)
    idx, kept, threshold = _kept_set(scores, valid, k, opts.keep)

    def kept_rows(x: Tensor, t: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
        return per_sample_loss(_linear_logits(x, w, b), t, *ce_opts)

    idx = idx.sort().values  # row order: the sums run in a fixed order
    parts, wys = [], []
    for start in range(0, max(idx.numel(), 1), chunk_size):  # (an empty chunk keeps the graph)
        rows = idx[start : start + chunk_size]
        loss, w_y = checkpoint(
            kept_rows, input[rows], target[rows], linear_weight, linear_bias, use_reentrant=False
        )
        parts.append(loss)
        wys.append(w_y)
    out = _reduce(torch.cat(parts), torch.cat(wys), idx, target.shape[0], opts.reduction)
    return out.to(input.dtype), losses, kept, k, threshold.to(input.dtype)
