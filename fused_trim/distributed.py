"""Global trimming across data-parallel ranks.

With a ``process_group``, the kept set is chosen over the *global* batch: all ranks' valid samples,
ties going to the lower global index (rank order, then local index). Only O(1)-sized tensors
cross the network, never the logits: the global ``n``, eight 256-bin histograms of the
order-preserving 64-bit loss keys (a distributed radix select of the k-th key ``T``), the ranks'
counts of losses tied at ``T``, and the kept sum and weight. Each rank then keeps exactly its share
``k_r`` (its losses above ``T`` plus its part of the ties) with the local fused op, which picks
precisely those rows: a local top-``k_r`` is the local part of the global top-``k``.

Each rank's result is scaled so that data-parallel gradient *averaging* (DDP, FSDP) yields exactly
the gradient of the global trimmed loss:

* ``"mean"``: ``world_size * sum_{K_r} l_i / sum_{K} w_{y_i}``,
* ``"sum"``: ``world_size * sum_{K_r} l_i``,
* ``"none"``: the rank's per-sample losses on ``K_r`` (unscaled; reduce them yourself).

The value a rank returns is therefore not the global loss; ``return_info=True`` reports that as
``info.global_loss`` (the global mean or sum; the global sum for ``"none"``).

Costs: the losses are computed twice (once detached to rank them, once with the fused op), so a
step reads the logits twice in the forward. Ranking uses the per-sample losses in the
accumulation dtype (fp32; fp64 for fp64 input), as one process does: bf16 and fp16 inputs keep the
same set as a single process would, not one decided by ties after rounding. With a
``score_offset`` the ranks rank the scores ``l_i - score_offset_i`` (formed in that dtype, as one
process forms them) and each rank passes its offset on to the local op.

With ``group_ids`` each rank's groups are its own (ids local to the rank): the ranks rank the
per-group scores of all ranks' groups with the same distributed select (``n`` and ``k`` count
groups; ties go to the lower rank, then the lower group id), and each rank keeps every valid
position of its kept groups.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from ._common import (
    INT64_MAX,
    Keep,
    Reduction,
    TrimOptions,
    acc_dtype,
    exact_count_options,
    keep_k,
    ordered_keys,
    out_dtype,
    past_threshold,
    ranking_scores,
)
from ._groups import keep_positions_options, masked_target, select_groups

_INT64_MIN = -(2**63)


def _key_to_float(key: Tensor, keep: Keep) -> Tensor:
    if keep == Keep.EASIEST:
        key = -1 - key
    return (key ^ ((key >> 63) & INT64_MAX)).view(torch.float64)


def global_share(losses: Tensor, valid: Tensor, opts: TrimOptions, group) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's exact number of kept samples under a global selection.

    ``losses`` are this rank's per-sample losses in the accumulation dtype; with
    ``opts.score_offset`` (this rank's, the losses' shape) the ranking is on
    ``losses - score_offset`` in that dtype. The global ``k`` is the keep rule
    (:func:`fused_trim._common.keep_k`) over the global ``n`` and, for a threshold, the global
    count of samples past it. Returns ``(k_local, k_global, threshold)`` as 0-dim device tensors
    (``threshold``: the global k-th loss, or score), without host synchronisation (the collectives
    run on the losses' device).
    """
    dev = losses.device
    keep = opts.keep
    scores = ranking_scores(losses, opts.score_offset)
    counts = valid.sum().to(torch.int64).reshape(1)
    if opts.keep_threshold is not None:
        past = past_threshold(scores, valid, opts.keep_threshold, keep).sum().to(torch.int64).reshape(1)
        counts = torch.cat([counts, past])
    dist.all_reduce(counts, group=group)
    k = keep_k(counts[0], opts, counts[1] if opts.keep_threshold is not None else None)

    keys = ordered_keys(scores, keep)
    u = keys ^ _INT64_MIN  # unsigned order in the bits
    digits = torch.arange(256, device=dev)
    prefix = torch.zeros((), dtype=torch.int64, device=dev)
    prefix_mask = torch.zeros((), dtype=torch.int64, device=dev)
    krem = k.clone()
    for shift in range(56, -8, -8):
        match = valid & ((u & prefix_mask) == prefix)
        digit = (u >> shift) & 255
        hist = torch.zeros(256, dtype=torch.int64, device=dev).scatter_add_(0, digit, match.to(torch.int64))
        dist.all_reduce(hist, group=group)
        cum = hist.cumsum(0)
        at_or_above = cum[-1] - cum + hist
        d = torch.where(at_or_above >= krem, digits, -1).max().clamp_min(0)
        krem = krem - (cum[-1] - cum[d])
        prefix = prefix | (d << shift)
        prefix_mask = prefix_mask | (torch.full((), 255, dtype=torch.int64, device=dev) << shift)
    kth = prefix ^ _INT64_MIN

    above = (valid & (keys > kth)).sum()
    ties = (valid & (keys == kth)).sum().reshape(1)
    all_ties = [torch.zeros_like(ties) for _ in range(dist.get_world_size(group))]
    dist.all_gather(all_ties, ties, group=group)
    rank = dist.get_rank(group)
    ties_before = torch.stack(all_ties[:rank]).sum() if rank > 0 else torch.zeros((), dtype=torch.int64, device=dev)
    my_ties = (krem - ties_before).clamp(min=0).minimum(ties[0])
    threshold = torch.where(
        k > 0, _key_to_float(kth, keep), torch.full((), float("nan"), device=dev, dtype=torch.float64)
    )
    return above + my_ties, k, threshold


def trimmed_cross_entropy_global(
    backend_fn: Callable, input: Tensor, target: Tensor, opts: TrimOptions, group
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Global trimming on the normalised ``(M, C)`` problem with one backend's 2-D entry point.

    With ``opts.score_offset`` the ranks rank ``l_i - score_offset_i`` (see :func:`global_share`).
    Returns ``(out, losses, kept, k_global, threshold, lse, global_loss)``.
    """
    valid = target != opts.ignore_index
    with torch.no_grad():
        every_row = opts._replace(
            keep_ratio=1.0,
            keep_count=None,
            keep_threshold=None,
            min_kept=0,
            reduction=Reduction.NONE,
            score_offset=None,
            group_ids=None,
        )
        _, losses, _, _, _, lse = backend_fn(input.detach(), target, every_row)
    if opts.group_ids is None:
        k_local, k_global, threshold = global_share(losses, valid, opts, group)
        out, _, kept, _, _, _ = backend_fn(input, target, _local_options(opts, k_local))
    else:
        found: dict[str, Tensor] = {}
        kept, _, _ = select_groups(losses, valid, opts, _group_share(opts, group, found))
        local = _local_options(keep_positions_options(opts), None)
        out, _, kept, _, _, _ = backend_fn(input, masked_target(target, kept, opts.ignore_index), local)
        k_global, threshold = found["k"], found["threshold"]
    dtype = out_dtype(opts, input.dtype)
    out, global_loss = _scale_for_averaging(out, kept, target, opts, dtype, group)
    return out, losses, kept, k_global, threshold.to(dtype), lse, global_loss


def trimmed_linear_cross_entropy_global(
    backend_fn: Callable,
    input: Tensor,
    linear_weight: Tensor,
    linear_bias: Tensor | None,
    target: Tensor,
    opts: TrimOptions,
    group,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None, Tensor]:
    """Global trimming of the LM head with one backend's 2-D entry point.

    The backend computes every row's loss once (one pass over ``V``) and hands the losses to
    :func:`global_share` through its ``share`` hook; it then keeps exactly this rank's share.
    Returns ``(out, losses, kept, k_global, threshold, lse, global_loss)``.
    """
    found: dict[str, Tensor] = {}

    def share(losses: Tensor, valid: Tensor) -> Tensor:
        k_local, found["k"], found["threshold"] = global_share(losses, valid, opts, group)
        return k_local

    if opts.group_ids is not None:
        share = _group_share(opts, group, found)
    local = _local_options(opts, None)
    out, losses, kept, _, _, lse = backend_fn(input, linear_weight, linear_bias, target, local, share=share)
    dtype = out_dtype(opts, input.dtype)
    out, global_loss = _scale_for_averaging(out, kept, target, opts, dtype, group)
    return out, losses, kept, found["k"], found["threshold"].to(dtype), lse, global_loss


def _group_share(opts: TrimOptions, group, found: dict[str, Tensor]) -> Callable[[Tensor, Tensor], Tensor]:
    """The ``share`` hook of group trimming: this rank's number of kept groups under the global
    selection of every rank's groups (each rank's groups its own; ties go to the lower rank, then
    the lower group id), given the per-group ``(scores, valid)`` (the offset already in the scores).
    Stores the global ``k`` and threshold in ``found``."""

    def share(scores: Tensor, valid: Tensor) -> Tensor:
        k_local, found["k"], found["threshold"] = global_share(scores, valid, opts._replace(score_offset=None), group)
        return k_local

    return share


def _local_options(opts: TrimOptions, count: Tensor | None) -> TrimOptions:
    """The local op's options: this rank's exact ``count`` (or, ``None``, the ``share`` hook's,
    which replaces every keep rule), and the kept losses summed (or per sample) for
    :func:`_scale_for_averaging` to scale."""
    local_reduction = Reduction.NONE if opts.reduction == Reduction.NONE else Reduction.SUM
    if count is not None:
        opts = exact_count_options(opts, count)
    return opts._replace(reduction=local_reduction)


def _scale_for_averaging(
    out: Tensor, kept: Tensor, target: Tensor, opts: TrimOptions, dtype: torch.dtype, group
) -> tuple[Tensor, Tensor]:
    """This rank's local kept sum (or per-sample losses) scaled for DDP's gradient averaging, and
    the global loss to log (see the module docstring)."""
    world = dist.get_world_size(group)
    acc = acc_dtype(dtype)
    weight, reduction = opts.weight, opts.reduction
    if weight is None:
        w_y = kept.to(acc)
    else:
        w_y = torch.where(kept, weight.to(acc)[target.clamp(0, weight.shape[0] - 1).long()], 0)
    local_sum = out.detach().to(acc).sum()
    totals = torch.stack([local_sum, w_y.sum()])
    dist.all_reduce(totals, group=group)
    if reduction == Reduction.MEAN:
        global_loss = totals[0] / totals[1]
        out = out * (world / totals[1]).to(out.dtype)
    elif reduction == Reduction.SUM:
        global_loss = totals[0]
        out = out * world
    else:
        global_loss = totals[0]
    return out, global_loss.to(dtype)
