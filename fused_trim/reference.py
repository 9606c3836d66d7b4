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

from ._common import (
    Reduction,
    TrimOptions,
    acc_dtype,
    as_rows,
    first_equal_rows,
    out_dtype,
    ranking_scores,
    rule_k,
    stable_select,
)
from ._groups import select_groups


def per_sample_loss(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    logit_softcap: float | None = None,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row cross-entropy of ``input (M, C)`` as ``F.cross_entropy(reduction="none")`` defines it.

    Computed in float32 (float64 for float64 input). With ``logit_softcap`` ``c`` every logit
    ``z`` is first ``c * tanh(z / c)``; with ``z_loss`` ``λ`` each loss gains ``λ * lse**2`` (the
    logsumexp of the capped logits; not weighted by the class weight). Returns ``(loss, w_y,
    lse)``: the loss, the class weight of each row's target (1 without ``weight``) and the row's
    logsumexp, all 0 on ignored rows.
    """
    x = input.to(acc_dtype(input.dtype))
    if logit_softcap is not None:
        x = logit_softcap * torch.tanh(x / logit_softcap)
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
    lse = torch.logsumexp(x, dim=1)
    if z_loss != 0.0:
        loss = loss + z_loss * lse * lse
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    return torch.where(valid, loss, zero), torch.where(valid, w_y, zero), torch.where(valid, lse, zero).detach()


# The selection of the whole contract, shared with the group stage (fused_trim._common).
select = stable_select


def _ce_options(opts: TrimOptions) -> tuple:
    """``per_sample_loss``'s options from ``opts``: weight, ignore index, smoothing, cap, z."""
    return opts.weight, opts.ignore_index, opts.label_smoothing, opts.logit_softcap, opts.z_loss


def _gather_bound(k: Tensor, rows: int) -> int:
    """How many rows of the ranking order the backward recomputes: exactly ``k`` in eager mode;
    under ``torch.compile`` every row (``k`` is a device value there, and a bound computed from a
    float ratio becomes a symbolic size that activation checkpointing cannot take), the rows
    beyond ``k`` masked out. Compiled, the reference therefore recomputes all rows."""
    return rows if torch.compiler.is_compiling() else int(k)


def _kept_rows(order: Tensor, kept: Tensor, bound: int) -> tuple[Tensor, Tensor]:
    """The first ``bound`` rows of the ranking order in row order (the sums then run in a fixed
    order) and which of them are kept."""
    rows = order[:bound].sort().values
    return rows, kept[rows]


def _selection(
    losses: Tensor, valid: Tensor, opts: TrimOptions, share: Callable[[Tensor, Tensor], Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    """The kept set of either kind: ``(kept, order, k, threshold, bound)``, ``order`` every row with
    the kept ones first and ``bound`` how many of them the backward recomputes (:func:`_gather_bound`).
    With ``opts.group_ids`` the groups' selection (:func:`fused_trim._groups.select_groups`; ``k``
    and ``threshold`` of the groups), else the samples' (:func:`select`)."""
    if opts.group_ids is not None:
        kept, k, threshold = select_groups(losses, valid, opts, share)
        order = torch.sort((~kept).to(torch.int8), stable=True).indices  # the kept rows first
        return kept, order, k, threshold, _gather_bound(kept.sum(), valid.shape[0])
    scores = ranking_scores(losses, opts.score_offset)
    k = rule_k(scores, valid, opts) if share is None else share(losses, valid).minimum(valid.sum())
    kept, order, threshold = select(scores, valid, k, opts.keep)
    return kept, order, k, threshold, _gather_bound(k, valid.shape[0])


def trimmed_cross_entropy_2d(
    input: Tensor, target: Tensor, opts: TrimOptions
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The whole contract on ``input (M, C)`` or ``(N, C, S)``, ``target (M,)``.

    Returns ``(out, losses, kept, k, threshold, lse)``; ``out`` is 0-dim for ``"mean"``/``"sum"``
    and ``(M,)`` for ``"none"``. Only ``out`` carries gradient, and only through the kept rows.
    ``losses`` (with ``opts.z_loss``, the z term included) and ``lse`` (the rows' logsumexp of the
    capped logits, 0 on ignored rows; ``None`` where a backend path cannot give it) are per sample in
    the accumulation dtype (fp32; fp64 for fp64 input), as every backend returns them; ``out`` and
    ``threshold`` are in ``opts.result_dtype`` (default: the input dtype; fp32 under autocast).
    ``score_offset`` (``(M,)``, or ``None``): rank ``losses - score_offset``
    (:func:`fused_trim._common.ranking_scores`) instead of the losses; ``threshold`` is then the
    k-th score.
    """
    _, keep, weight, ignore_index, label_smoothing, reduction, score_offset = opts[:7]
    ce = _ce_options(opts)
    input = as_rows(input)
    valid = target != ignore_index
    with torch.no_grad():
        losses, _, lse = per_sample_loss(input, target, *ce)
    kept, order, k, threshold, bound = _selection(losses, valid, opts)

    # Recompute the kept rows with autograd: the gradient is exactly zero everywhere else. Rows
    # gathered beyond k (under compile) become zeros with an ignored target: they add nothing,
    # not even 0 * NaN.
    rows, mask = _kept_rows(order, kept, bound)
    x = torch.where(mask[:, None], input[rows], 0)
    t = torch.where(mask, target[rows], ignore_index)
    kept_loss, kept_w, _ = per_sample_loss(x, t, *ce)
    if reduction == Reduction.NONE:
        out = torch.zeros(target.shape, dtype=kept_loss.dtype, device=input.device)
        out = out.index_put((rows,), kept_loss)
    elif reduction == Reduction.SUM:
        out = kept_loss.sum()
    else:
        out = kept_loss.sum() / kept_w.sum()
    dtype = out_dtype(opts, input.dtype)
    return out.to(dtype), losses, kept, k, threshold.to(dtype), lse


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
    logit_softcap: float | None = None,
    z_loss: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Every row's loss of ``F.linear(input, linear_weight, linear_bias)``, ``chunk_size`` rows of
    logits at a time (detached). Returns ``(loss, w_y, lse)`` in the accumulation dtype, ``(N,)``
    (:func:`per_sample_loss`). Bitwise equal rows with equal targets get the same loss and lse
    (:func:`fused_trim._common.first_equal_rows`)."""
    losses, wys, lses = [], [], []
    ce = (weight, ignore_index, label_smoothing, logit_softcap, z_loss)
    with torch.no_grad():
        for start in range(0, input.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            logits = _linear_logits(input[rows], linear_weight, linear_bias)
            loss, w_y, lse = per_sample_loss(logits, target[rows], *ce)
            losses.append(loss)
            wys.append(w_y)
            lses.append(lse)
    if not losses:
        acc = acc_dtype(input.dtype)
        empty = input.new_empty((0,), dtype=acc)
        return empty, empty, empty
    first = first_equal_rows(input, target)
    return torch.cat(losses)[first], torch.cat(wys), torch.cat(lses)[first]


def trimmed_linear_cross_entropy_2d(
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    opts: TrimOptions,
    share: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The LM-head contract on ``input (N, D)``, ``linear_weight (V, D)``, ``target (N,)``.

    The forward computes every row's loss in chunks of ``chunk_size`` rows, selects the kept set
    on those losses, and recomputes only the kept rows' logits with autograd, again in chunks and
    under activation checkpointing, so neither pass holds more than ``chunk_size x V`` logits.
    The head is converted to the accumulation dtype once, so that its gradient is summed over the
    chunks in fp32 (bf16/fp16 heads) and rounded once. ``share``, when given, maps
    ``(losses, valid)`` to the exact number of rows to keep (a 0-dim int64 tensor; global
    trimming); with ``opts.group_ids`` it maps the per-group ``(scores, valid)`` to the number of
    groups (:func:`fused_trim._groups.select_groups`). ``score_offset`` (``(N,)`` or ``None``):
    rank ``losses - score_offset``. Returns
    ``(out, losses, kept, k, threshold, lse)`` as :func:`trimmed_cross_entropy_2d` does.
    """
    _, keep, weight, ignore_index, label_smoothing, reduction, score_offset, chunk_size = opts[:8]
    valid = target != ignore_index
    ce = _ce_options(opts)
    losses, _, lse = linear_ce_rows(input, linear_weight, linear_bias, target, *ce[:3], chunk_size, *ce[3:])
    kept, order, k, threshold, bound = _selection(losses, valid, opts, share)

    acc = losses.dtype
    head = linear_weight.to(acc)
    bias = None if linear_bias is None else linear_bias.to(acc)

    def kept_rows(x: Tensor, t: Tensor, w: Tensor, b: Tensor | None) -> tuple[Tensor, Tensor]:
        loss, w_y, _ = per_sample_loss(F.linear(x.to(acc), w, b), t, *ce)
        return loss, w_y

    # Rows gathered beyond k (under compile) become zeros with an ignored target: a NaN hidden
    # state outside K reaches no gradient, not even as 0 * NaN.
    rows, mask = _kept_rows(order, kept, bound)
    parts, wys = [], []
    for start in range(0, max(rows.shape[0], 1), chunk_size):  # (an empty chunk keeps the graph)
        r, m = rows[start : start + chunk_size], mask[start : start + chunk_size]
        x = torch.where(m[:, None], input[r], 0)
        t = torch.where(m, target[r], ignore_index)
        loss, w_y = checkpoint(kept_rows, x, t, head, bias, use_reentrant=False)
        parts.append(loss)
        wys.append(w_y)
    kept_loss, kept_w = torch.cat(parts), torch.cat(wys)
    if reduction == Reduction.NONE:
        out = torch.zeros(target.shape, dtype=acc, device=input.device).index_put((rows,), kept_loss)
    elif reduction == Reduction.SUM:
        out = kept_loss.sum()
    else:
        out = kept_loss.sum() / kept_w.sum()
    dtype = out_dtype(opts, input.dtype)
    return out.to(dtype), losses, kept, k, threshold.to(dtype), lse
