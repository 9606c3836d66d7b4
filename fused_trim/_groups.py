"""Group keep rules: the unit ranked and counted is a group of positions (a sequence, an image, a
document), shared by every backend.

A group layout reaches the backends in ``TrimOptions.group_ids`` as either

* an ``int`` ``B`` (``group_ids="rows"``): the ``M`` flat positions form ``B`` consecutive runs of
  ``M // B`` positions, group ``b`` the ``b``-th index of the target's first dimension; or
* a flat ``(M,)`` int64 tensor of ids in ``[0, M)`` (any order, gaps allowed).

The stage runs in ``O(M)`` on the device, with static shapes (buffers of ``M`` groups for explicit
ids, no ``unique()``), without atomics on floating-point values and without a host
synchronisation: per-group sums in a fixed order (a row sum for ``"rows"``; a stable sort of the ids
and a segmented sum for explicit ids), the keep rule (:func:`fused_trim._common.rule_k`) over the
groups with a valid position, a sort-based exact select of the groups (ties to the lower group id,
NaN above ``+inf``), and the per-position kept mask by a gather. Each backend then reduces (and
differentiates) its plain per-position losses over that mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ._common import Reduction, TrimOptions, host_k, ranking_scores, rule_k, stable_select

GROUP_REDUCTIONS = ("mean", "sum")

GroupIds = Tensor | int


def num_groups(group_ids: GroupIds, num_positions: int) -> int:
    """The length of the per-group buffers: ``B`` for rows, ``M`` for explicit ids."""
    return group_ids if isinstance(group_ids, int) else num_positions


def _segment_sum(values: Tensor, group_ids: GroupIds) -> Tensor:
    """Per-group sums of ``values`` (``(M,)``) in a fixed order (bitwise repeatable): a row sum for
    ``B`` rows, else a segmented sum over the positions sorted stably by id (each group's positions
    in index order)."""
    m = values.shape[0]
    if isinstance(group_ids, int):
        if group_ids == 0:
            return values.new_zeros((0,))
        return values.reshape(group_ids, m // group_ids).sum(1)
    if m == 0:
        return values.new_zeros((0,))
    order = torch.sort(group_ids, stable=True).indices
    lengths = torch.zeros(m, dtype=torch.int64, device=values.device)
    lengths = lengths.scatter_add(0, group_ids, torch.ones_like(group_ids))  # integer: exact
    return torch.segment_reduce(values[order], "sum", lengths=lengths, unsafe=True)


def _segment_count(mask: Tensor, group_ids: GroupIds) -> Tensor:
    """Per-group counts of a bool ``mask`` (``(M,)``): integer sums, exact in any order."""
    m = mask.shape[0]
    ones = mask.to(torch.int64)
    if isinstance(group_ids, int):
        return ones.reshape(group_ids, m // group_ids).sum(1) if group_ids else ones.new_zeros((0,))
    return torch.zeros(m, dtype=torch.int64, device=mask.device).scatter_add(0, group_ids, ones)


def group_scores(scores: Tensor, valid: Tensor, group_ids: GroupIds, group_reduction: str) -> tuple[Tensor, Tensor]:
    """``(scores, valid)`` per group: the mean (``"mean"``) or sum (``"sum"``) of each group's valid
    positions' ``scores``, summed in float64 and returned in ``scores``' dtype; a group takes part
    when it has a valid position. A group without one holds 0."""
    s = torch.where(valid, scores.to(torch.float64), 0.0)
    total = _segment_sum(s, group_ids)
    count = _segment_count(valid, group_ids)
    gvalid = count > 0
    if group_reduction == "mean":
        total = total / count.clamp(min=1).to(torch.float64)
    return torch.where(gvalid, total, 0.0).to(scores.dtype), gvalid


def group_of_position(group_mask: Tensor, group_ids: GroupIds, num_positions: int) -> Tensor:
    """Each position's entry of the per-group ``group_mask`` (a gather)."""
    if isinstance(group_ids, int):
        if group_ids == 0:
            return group_mask.new_zeros((num_positions,))
        return group_mask[:, None].expand(group_ids, num_positions // group_ids).reshape(-1)
    return group_mask.gather(0, group_ids)


def select_groups(
    losses: Tensor,
    valid: Tensor,
    opts: TrimOptions,
    share: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The kept positions under ``opts``' keep rule applied to ``opts.group_ids``' groups.

    ``losses`` and ``valid`` are per position ``(M,)`` (losses in the accumulation dtype); the
    groups are ranked by the mean (or sum) of their valid positions' scores
    (:func:`fused_trim._common.ranking_scores`). ``share``, when given, maps the per-group
    ``(scores, valid)`` to the exact number of groups to keep (global trimming). Returns
    ``(kept, k, threshold)``: the per-position bool mask (every valid position of a kept group),
    the number of kept groups and the k-th group score.
    """
    scores = ranking_scores(losses, opts.score_offset)
    gscores, gvalid = group_scores(scores, valid, opts.group_ids, opts.group_reduction)
    if share is None:
        k = rule_k(gscores, gvalid, opts)
    else:
        k = share(gscores, gvalid).minimum(gvalid.sum())
    gkept, _, threshold = stable_select(gscores, gvalid, k, opts.keep)  # ties to the lower group id
    kept = group_of_position(gkept, opts.group_ids, losses.shape[0]) & valid
    return kept, k, threshold


def group_info(losses: Tensor, kept: Tensor, valid: Tensor, opts: TrimOptions) -> tuple[Tensor, Tensor]:
    """``TrimInfo.group_scores`` and ``TrimInfo.group_kept`` from a backend's per-position losses
    and kept mask: the scores the selection ranked (bitwise: the same function formed them) and
    whether each group has a kept position; ``(B,)`` for rows, else ``(M,)`` indexed by id."""
    scores = ranking_scores(losses, opts.score_offset)
    gscores, _ = group_scores(scores, valid, opts.group_ids, opts.group_reduction)
    gkept = _segment_count(kept, opts.group_ids) > 0
    return gscores, gkept


def group_rows_bound(opts: TrimOptions, num_positions: int) -> int:
    """A bound on the kept positions known on the host (the rows an LM head's backward gathers):
    ``k`` whole rows of ``M // B`` positions for ``"rows"`` with a Python float ratio or int count,
    else every position."""
    b = opts.group_ids
    if not isinstance(b, int) or b == 0 or opts.keep_threshold is not None:
        return num_positions
    if opts.keep_count is not None:
        if isinstance(opts.keep_count, Tensor):
            return num_positions
        return min(b, int(opts.keep_count)) * (num_positions // b)
    if isinstance(opts.keep_ratio, Tensor):
        return num_positions
    return host_k(b, opts.keep_ratio) * (num_positions // b)


def keep_positions_options(opts: TrimOptions) -> TrimOptions:
    """``opts`` for a backend that is to keep every valid position of a target masked to the kept
    positions (:func:`masked_target`): the ratio 1.0, no score offset, no groups."""
    return opts._replace(
        keep_ratio=1.0, keep_count=None, keep_threshold=None, min_kept=0, group_ids=None, score_offset=None
    )


def reduce_kept(
    losses: Tensor, kept: Tensor, target: Tensor, opts: TrimOptions, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """The reduction of the per-position ``losses`` over a given ``kept`` mask, for backends whose
    kernels take the kept set and a per-row gradient scale from outside: ``(out, kept_f, scale)``
    with ``out`` in ``dtype`` (sums in row order, fixed), ``kept_f`` the mask as 0/1 in the losses'
    dtype and ``scale`` the 0-dim divisor of the gradient (``sum_K w[y_i]`` for ``"mean"``, else 1)."""
    acc = losses.dtype
    kept_f = kept.to(acc)
    total = torch.where(kept, losses, 0.0).sum()
    if opts.weight is None:
        w_y = kept_f
    else:
        w = opts.weight.detach().to(device=losses.device, dtype=acc)
        w_y = torch.where(kept, w[target.clamp(0, w.shape[0] - 1).long()], 0.0)
    one = torch.ones((), dtype=acc, device=losses.device)
    if opts.reduction == Reduction.NONE:
        return torch.where(kept, losses, 0.0).to(dtype), kept_f, one
    if opts.reduction == Reduction.SUM:
        return total.to(dtype), kept_f, one
    denom = w_y.sum()
    return (total / denom).to(dtype), kept_f, denom


def masked_target(target: Tensor, kept: Tensor, ignore_index: int) -> Tensor:
    """``target`` with every position outside ``kept`` set to ``ignore_index``."""
    return torch.where(kept, target, ignore_index)
